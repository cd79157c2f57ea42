"""Image corpora into shards (data_pipeline.image_precompute, ove-precompute-images): a folder, a
webdataset tar set and a parquet file, each with a corpus of bad images. Every bad image is in
the failure manifest; every good one is read by the image (and OCR) head through the trainer's
pipeline with its labels; a resumed run redoes nothing."""

import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from data_pipeline import (
  image_precompute,
  packing,
  pipeline,
  precompute,
  shards,
  sources,
  transforms,
)
from ove_jax_tools import precompute_images as cli


def encoded(image: Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


def bomb_png() -> bytes:
  """A small PNG whose header says 20000 x 20000 (400 M pixels): pillow's own bomb error."""
  data = encoded(Image.new('L', (8, 8)), 'PNG')
  ihdr = struct.pack('>II', 20000, 20000) + data[24:29]
  return data[:16] + ihdr + struct.pack('>I', zlib.crc32(b'IHDR' + ihdr)) + data[33:]


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8)
DEEP = (np.arange(36 * 30).reshape(36, 30) * 60).astype(np.uint16)  # 16-bit, 0..64740
JPEG = encoded(Image.fromarray(RGB), 'JPEG')
CMYK = encoded(Image.new('CMYK', (30, 20), (0, 200, 255, 10)), 'JPEG')
# name -> (bytes, what the trainer must see: None = the file's own decode).
GOOD = {
  'rgb.jpg': JPEG,
  'grey.png': encoded(Image.fromarray(RGB[..., 0]), 'PNG'),
  'rgba.webp': encoded(Image.fromarray(np.dstack([RGB, RGB[..., :1]]), 'RGBA'), 'WEBP'),
  'cmyk.jpg': CMYK,  # converted to RGB, kept
  'deep.png': encoded(Image.fromarray(DEEP), 'PNG'),  # 16-bit grey: 8-bit, kept
}
# name -> (bytes, a word its manifest reason must hold).
BAD = {
  'truncated.jpg': (JPEG[: len(JPEG) // 2], 'truncated'),
  'text.jpg': (b'not an image, just text\n', 'not an image'),
  'bomb.png': (bomb_png(), 'decompression bomb'),
  'float.png': (encoded(Image.fromarray(np.ones((8, 8), np.float32)), 'TIFF'), 'mode F'),
  'empty.png': (b'', 'empty'),
}
EXPECTED_PIXELS = {
  'cmyk.jpg': np.asarray(Image.open(io.BytesIO(CMYK)).convert('RGB')),
  'deep.png': np.repeat((DEEP >> 8).astype(np.uint8)[..., None], 3, axis=2),
}
ORDER = sorted(GOOD) + sorted(BAD)
LABELS = {name: (i, 100 + i) for i, name in enumerate(ORDER)}


def all_records(out_dir: str, name: str = 'images') -> tuple[str, list[dict]]:
  pattern = os.path.join(out_dir, f'{name}-*.array_record')
  paths = sorted(p for p in os.listdir(out_dir) if p.endswith('.array_record'))
  return pattern, [r for p in paths for r in shards.read_shard(os.path.join(out_dir, p))]


def check_corpus(
  out_dir: str, bad: dict, labels: dict, extra_bad: dict = None, ocr: bool = False
) -> None:
  """Every bad image (and `extra_bad`: name -> word) in the manifest, the good ones read by the
  image head with their labels and the pixels meant."""
  extra_bad = extra_bad or {}
  with open(os.path.join(out_dir, precompute.FAILURES), encoding='utf-8') as f:
    failures = [json.loads(line) for line in f if line.strip()]
  reasons = {}
  for entry in failures:
    matches = [n for n in [*bad, *extra_bad] if entry['file'].endswith(n)]
    assert len(matches) == 1, entry
    reasons[matches[0]] = entry['reason']
  assert sorted(reasons) == sorted([*bad, *extra_bad])
  for name, (_, word) in bad.items():
    assert word in reasons[name], (name, reasons[name])
  for name, word in extra_bad.items():
    assert word in reasons[name], (name, reasons[name])

  pattern, records = all_records(out_dir)
  by_name = {}
  for r in records:
    matches = [n for n in GOOD if r['source'].endswith(n)]
    assert len(matches) == 1, r['source']
    by_name[matches[0]] = r
  assert sorted(by_name) == sorted(GOOD)
  for name, r in by_name.items():
    assert tuple(r['labels'].tolist()) == labels[name]
    pixels = np.asarray(transforms.decode_image(r['image']))
    if name in EXPECTED_PIXELS:
      np.testing.assert_array_equal(pixels, EXPECTED_PIXELS[name])
      assert r['image'].startswith(b'\x89PNG')  # converted, stored lossless
    else:
      assert r['image'] == GOOD[name]  # kept as it came

  heads = [('image', dict(tokens_per_row=256))]
  if ocr:
    heads.append(('ocr', dict(tokens_per_row=1024)))
  for kind, options in heads:
    head = pipeline.HeadConfig(kind=kind, source=pattern, rows=1, **options)
    cfg = pipeline.PipelineConfig(heads={kind: head}, num_epochs=1, worker_count=0)
    ds = pipeline.sample_dataset(kind, head, cfg)
    assert len(ds) == len(GOOD)
    seen = set()
    for i in range(len(ds)):
      sample = ds[i]
      assert packing.SKIPPED not in sample, sample
      record = records[sample['index']]
      np.testing.assert_array_equal(
        sample['labels'], transforms.cyclic_labels(record['labels'], head.get('num_labels'))
      )
      side = head.get('resolution') // transforms.PATCH
      assert sample['patches'].shape == (side * side, transforms.PATCH_DIM)
      seen.add(sample['index'])
    assert seen == set(range(len(GOOD)))


def write_files(folder: str, names, prefix: str = '') -> None:
  for name in names:
    data = GOOD[name] if name in GOOD else BAD[name][0]
    with open(os.path.join(folder, prefix + name), 'wb') as f:
      f.write(data)


def test_folder_with_bad_images(tmp_path):
  folder = tmp_path / 'images'
  folder.mkdir()
  write_files(str(folder), ORDER)
  # Labels .npy: a row per image in sorted relative-path order (sources.ImageFolderSource's).
  np.save(tmp_path / 'labels.npy', np.asarray([LABELS[n] for n in sorted(ORDER)], np.int32))
  out = str(tmp_path / 'out')
  summary = image_precompute.precompute_images(
    str(folder), out, labels=str(tmp_path / 'labels.npy'), num_shards=3, workers=0, progress=False
  )
  assert summary['complete'] and summary['records'] == len(GOOD)
  assert summary['failures'] == len(BAD)
  check_corpus(out, BAD, LABELS, ocr=True)
  # The shards are where the experiments look: OUT/NAME-*.array_record.
  assert sorted(os.path.basename(p) for p in shards.shard_files(out)) == [
    f'images-train-{i:05d}-of-00003.array_record' for i in range(3)
  ]


def test_tar_set_with_bad_images_and_labels(tmp_path):
  # Two webdataset shards: labels as key.cls text or key.json; a sample with a bad label and one
  # without a label in a labelled set are failures too.
  names = ORDER
  for t in range(2):
    with tarfile.open(tmp_path / f'shard-{t:03d}.tar', 'w') as tar:

      def add(member: str, data: bytes):
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

      for i, name in enumerate(names[t::2]):
        key, ext = name.split('.')
        add(name, GOOD[name] if name in GOOD else BAD[name][0])
        if i % 2:
          add(f'{key}.cls', ' '.join(map(str, LABELS[name])).encode())
        else:
          add(f'{key}.json', json.dumps({'label': list(LABELS[name]), 'caption': 'x'}).encode())
      if t == 0:
        add('badlabel.jpg', JPEG)
        add('badlabel.cls', b'cat')
        add('nolabel.jpg', JPEG)
  out = str(tmp_path / 'out')
  summary = image_precompute.precompute_images(
    str(tmp_path / 'shard-{000..001}.tar'), out, num_shards=2, workers=2, progress=False
  )
  assert summary['complete']
  check_corpus(
    out,
    BAD,
    LABELS,
    extra_bad={
      'badlabel.jpg': "label 'cat' is not integer ids",
      'nolabel.jpg': "no label (key.cls, or key.json field 'label')",
    },
  )
  # Tar sets keep their order (sequential reads): shard 0 starts with the first tar's first key.
  first = shards.read_record(shards.shard_files(out)[0], 0)
  assert first['source'].endswith(f'shard-000.tar#{ORDER[0]}')


def test_parquet_with_bad_images_and_the_command_line(tmp_path, capsys):
  import pyarrow as pa
  import pyarrow.parquet as pq

  names = ORDER + ['null.jpg']
  cells = [
    {'bytes': GOOD[n] if n in GOOD else BAD[n][0], 'path': n}
    if n != 'null.jpg'
    else {'bytes': None, 'path': n}
    for n in names
  ]
  # The `datasets` Image feature's layout: a {bytes, path} struct; labels a list<int> column.
  table = pa.table(
    {
      'image': cells,
      'labels': [list(LABELS.get(n, (0,))) for n in names],
      'caption': ['x'] * len(names),
    }
  )
  pq.write_table(table, tmp_path / 'part-0.parquet', row_group_size=4)
  out = str(tmp_path / 'out')
  argv = [
    str(tmp_path / '*.parquet'),
    out,
    '--label-column',
    'labels',
    '--num-shards=2',
    '--workers=0',
    '--no-progress',
  ]
  assert cli.main(argv) == 0
  assert json.loads(capsys.readouterr().out)['records'] == len(GOOD)
  # Manifest entries name the row; map them back to the test's names.
  with open(os.path.join(out, precompute.FAILURES), encoding='utf-8') as f:
    rows = {int(json.loads(line)['file'].rsplit('#', 1)[1]) for line in f}
  assert sorted(names[r] for r in rows) == sorted([*BAD, 'null.jpg'])
  _, records = all_records(out)
  for r in records:
    r['source'] = names[int(r['source'].rsplit('#', 1)[1])]  # row -> name, for check_corpus
  assert sorted(r['source'] for r in records) == sorted(GOOD)
  for r in records:
    assert tuple(r['labels'].tolist()) == LABELS[r['source']]
  head = pipeline.HeadConfig(
    kind='image', source=os.path.join(out, 'images-*.array_record'), rows=1, tokens_per_row=256
  )
  ds = pipeline.sample_dataset(
    'image', head, pipeline.PipelineConfig(heads={'image': head}, num_epochs=1, worker_count=0)
  )
  for i in range(len(ds)):
    sample = ds[i]
    assert packing.SKIPPED not in sample
    np.testing.assert_array_equal(
      sample['labels'], transforms.cyclic_labels(LABELS[records[sample['index']]['source']], 10)
    )
  assert cli.main(['--check', out]) == 0
  # Bad input: a clear error naming it, exit 2; a missing column names the columns there.
  for argv in (
    [str(tmp_path / 'none-*.parquet'), out, '--workers=0'],
    [str(tmp_path / '*.parquet'), str(tmp_path / 'o2'), '--image-column=jpg', '--workers=0'],
  ):
    with pytest.raises(SystemExit) as exit_info:
      cli.main(argv)
    assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert 'none-*.parquet' in err and "no column(s) ['jpg']" in err


def test_resume_redoes_nothing_and_tasks_split_the_plan(tmp_path):
  folder = tmp_path / 'images'
  for cls in ('a', 'b'):
    (folder / cls).mkdir(parents=True)
    write_files(str(folder / cls), ORDER)
  out = str(tmp_path / 'out')
  run = dict(labels='folders', num_shards=4, workers=0, progress=False)
  first = image_precompute.precompute_images(str(folder), out, max_shards=1, **run)
  assert first['shards_written'] == 1 and not first['complete']
  done = shards.shard_files(out)
  assert len(done) == 1
  with open(done[0], 'rb') as f:
    shard0 = f.read()
  second = image_precompute.precompute_images(str(folder), out, **run)
  assert second['complete'] and second['shards_skipped'] == 1 and second['shards_written'] == 3
  total = 2 * len(ORDER)
  assert first['clips_processed'] + second['clips_processed'] == total
  assert second['records'] == 2 * len(GOOD) and second['failures'] == 2 * len(BAD)
  with open(done[0], 'rb') as f:
    assert f.read() == shard0
  third = image_precompute.precompute_images(str(folder), out, **run)
  assert third['clips_processed'] == 0 and third['shards_written'] == 0
  assert third['shards_skipped'] == 4
  # Class-per-folder labels: a/ is 0, b/ is 1.
  _, records = all_records(out)
  for r in records:
    assert r['labels'].tolist() == [int('/b/' in r['source'])]
  # A different plan in the same folder is refused.
  with pytest.raises(precompute.PlanMismatch, match='max_pixels'):
    image_precompute.precompute_images(str(folder), out, max_pixels=1000, **run)
  # Two tasks over one plan: the first leaves the other's shards missing, the second completes.
  split = str(tmp_path / 'split')
  t0 = image_precompute.precompute_images(str(folder), split, task_index=0, num_tasks=2, **run)
  assert not t0['complete'] and precompute.check(split)['missing'] == [1, 3]
  assert cli.main(['--check', split]) == 1
  t1 = image_precompute.precompute_images(str(folder), split, task_index=1, num_tasks=2, **run)
  assert t1['complete'] and precompute.check(split)['complete']
  for a, b in zip(shards.shard_files(out), shards.shard_files(split)):
    with open(a, 'rb') as fa, open(b, 'rb') as fb:
      assert fa.read() == fb.read()  # the same plan gives the same shards, however it is split


def test_list_file_with_labels(tmp_path):
  folder = tmp_path / 'images'
  folder.mkdir()
  write_files(str(folder), ['rgb.jpg', 'deep.png', 'text.jpg'])
  (tmp_path / 'list.tsv').write_text(
    '# path<TAB>labels\nimages/rgb.jpg\t3,4\nimages/deep.png\t5 6\nimages/text.jpg\t7\n'
  )
  out = str(tmp_path / 'out')
  summary = image_precompute.precompute_images(
    str(tmp_path / 'list.tsv'), out, workers=0, progress=False
  )
  assert summary['records'] == 2 and summary['failures'] == 1
  _, records = all_records(out)
  assert {os.path.basename(r['source']): r['labels'].tolist() for r in records} == {
    'rgb.jpg': [3, 4],
    'deep.png': [5, 6],
  }


def test_listing_errors_name_the_input(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothing'):
    image_precompute.list_images(str(tmp_path / 'nothing-{0..1}.tar'))
  assert sources.expand_braces('s-{008..010}.tar') == [
    's-008.tar',
    's-009.tar',
    's-010.tar',
  ]
  (tmp_path / 'x.tar').write_bytes(b'\x1f\x8b' + b'0' * 600)  # gzip-compressed: no offsets
  items, _ = image_precompute.list_images(str(tmp_path / 'x.tar'))
  assert len(items) == 1 and 'decompressed' in items[0].problem
  # A tar cut short: the samples before the cut are kept, the cut one and the rest are listed.
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w') as tar:
    for i in range(4):
      info = tarfile.TarInfo(f'{i}.jpg')
      info.size = len(JPEG)
      tar.addfile(info, io.BytesIO(JPEG))
  cut = 512 + 2 * (512 + -(-len(JPEG) // 512) * 512)  # into the third member's data
  (tmp_path / 'cut.tar').write_bytes(buffer.getvalue()[:cut])
  summary = image_precompute.precompute_images(
    str(tmp_path / 'cut.tar'), str(tmp_path / 'out'), workers=0, progress=False
  )
  assert summary['records'] == 2
  with open(tmp_path / 'out' / precompute.FAILURES, encoding='utf-8') as f:
    reasons = {json.loads(line)['file'].rsplit('#', 1)[1]: json.loads(line)['reason'] for line in f}
  assert sorted(reasons) == ['(rest)', '2.jpg'] and 'cut short' in reasons['2.jpg']
  assert 'unreadable tar after 3 samples' in reasons['(rest)']
  # A folder given as tar or parquet, labels that are not there: named before anything runs.
  for kind in ('tar', 'parquet'):
    with pytest.raises(ValueError, match=f"a folder, but kind '{kind}' reads files"):
      image_precompute.list_images(str(tmp_path), kind=kind)
  with pytest.raises(FileNotFoundError, match='labels bogus.npy: no such file'):
    image_precompute.list_images(str(tmp_path), kind='folder', labels='bogus.npy')
  with pytest.raises(FileNotFoundError, match='nothing: no such folder'):
    precompute.check(str(tmp_path / 'nothing'))


def refusal(argv, capsys) -> str:
  """The one-line error of a command line refused with exit status 2."""
  with pytest.raises(SystemExit) as exit_info:
    cli.main([*argv, '--workers=0', '--no-progress'])
  assert exit_info.value.code == 2
  return capsys.readouterr().err


def test_bad_label_files_are_refused_naming_the_file_and_row(tmp_path, capsys):
  folder = tmp_path / 'images'
  folder.mkdir()
  write_files(str(folder), ['rgb.jpg', 'grey.png', 'deep.png'])
  # Casting would store 0.5 as 0 and keep -2: whole numbers >= 0 only; an empty file is named.
  for name, table, message in (
    ('half.npy', np.asarray([0.0, 0.5, 1.5]), 'row 1 holds [0.5] (2 bad row(s))'),
    ('neg.npy', np.asarray([[1, 2], [3, 4], [5, -2]]), 'row 2 holds [5, -2]'),
    ('nan.npy', np.asarray([0.0, 1.0, np.nan]), 'row 2 holds [nan]'),
    ('text.npy', np.asarray(['a', 'b', 'c']), 'dtype <U1; give integer label ids'),
    ('empty.npy', None, 'empty (0 bytes)'),
  ):
    path = tmp_path / name
    if table is None:
      path.write_bytes(b'')
    else:
      np.save(path, table)
    err = refusal([str(folder), str(tmp_path / name[:-4]), '--labels', str(path)], capsys)
    assert f'labels {path}: {message}' in err, err
    assert not (tmp_path / name[:-4]).exists()  # refused before anything was written
  # Floats that are whole numbers are ids.
  np.save(tmp_path / 'whole.npy', np.asarray([2.0, 0.0, 1.0]))
  out = str(tmp_path / 'out')
  assert cli.main([str(folder), out, '--labels', str(tmp_path / 'whole.npy'), '--workers=0']) == 0
  _, records = all_records(out)
  assert sorted(r['labels'].tolist() for r in records) == [[0], [1], [2]]


def test_list_labels_are_all_or_nothing_and_an_image_list_says_images(tmp_path, capsys):
  folder = tmp_path / 'images'
  folder.mkdir()
  write_files(str(folder), ['rgb.jpg', 'deep.png'])
  for text, message in (
    ('images/rgb.jpg\t3\n# a comment\n\nimages/deep.png\n', ':4: no label ids, but line 1 has'),
    ('images/rgb.jpg\t3\nimages/deep.png\t4,-2\n', ':2: label ids 4,-2; ids are whole numbers'),
  ):
    (tmp_path / 'list.tsv').write_text(text)
    err = refusal([str(tmp_path / 'list.tsv'), str(tmp_path / 'out')], capsys)
    assert f'list.tsv{message}' in err, err
  err = refusal([str(folder / 'rgb.jpg'), str(tmp_path / 'out')], capsys)
  assert 'rgb.jpg: not a text list of images' in err and 'video' not in err


def test_unreadable_parquet_file_is_a_failure_and_the_run_goes_on(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  names = ['rgb.jpg', 'grey.png', 'cmyk.jpg']
  table = pa.table({'image': [GOOD[n] for n in names], 'labels': [[i] for i in range(3)]})
  pq.write_table(table, tmp_path / 'b-good.parquet')
  # Sorted first: the image column is found in the first file pyarrow reads.
  (tmp_path / 'a-garbage.parquet').write_bytes(b'not parquet at all' * 8)
  (tmp_path / 'c-empty.parquet').write_bytes(b'')
  summary = image_precompute.precompute_images(
    str(tmp_path / '*.parquet'),
    str(tmp_path / 'out'),
    label_columns=['labels'],
    workers=0,
    progress=False,
  )
  assert summary['complete'] and summary['records'] == 3 and summary['failures'] == 2
  with open(tmp_path / 'out' / precompute.FAILURES, encoding='utf-8') as f:
    reasons = {json.loads(line)['file']: json.loads(line)['reason'] for line in f}
  for name in ('a-garbage.parquet', 'c-empty.parquet'):
    assert (
      f'{tmp_path / name}: unreadable parquet file (ArrowInvalid'
      in reasons[f'{tmp_path / name}#(file)']
    )
  with pytest.raises(ValueError, match='pyarrow reads none of the 2 parquet file'):
    image_precompute.list_images(str(tmp_path / '[ac]-*.parquet'))


def test_out_dir_that_is_a_file_is_refused_first(tmp_path, capsys):
  (tmp_path / 'afile').write_text('')
  # The source is never listed: a missing one would be named otherwise.
  for out, message in (
    ('afile', 'a file, not a folder; give a new or existing one'),
    ('afile/sub', f'a file, not a folder (inside {tmp_path / "afile"}, a file)'),
  ):
    err = refusal([str(tmp_path / 'none-*.tar'), str(tmp_path / out)], capsys)
    assert f'OUT_DIR {tmp_path / out}: {message}' in err, err


def test_command_line_refuses_bad_counts(tmp_path, capsys):
  for flag, value, message in (
    ('--num-shards', '0', "'0': a whole number >= 1"),
    ('--images-per-shard', '-3', "'-3': a whole number >= 1"),
    ('--workers', '-1', "'-1': a whole number >= 0"),
    ('--image-timeout', '-1', "'-1': seconds >= 0 (0: no limit)"),
  ):
    with pytest.raises(SystemExit) as e:
      cli.main([str(tmp_path), str(tmp_path / 'out'), flag, value])
    assert e.value.code == 2
    assert f'{flag}: {message}' in capsys.readouterr().err


def test_unlabelled_images_get_cluster_labels_then_train(tmp_path):
  """No labels in the source: the shards take their labels from ove-cluster-labels --records,
  whose relabelled copies the image head reads."""
  from ove_jax_tools import cluster_labels

  folder = tmp_path / 'images'
  folder.mkdir()
  write_files(str(folder), ORDER)
  out = str(tmp_path / 'laion')
  summary = image_precompute.precompute_images(
    str(folder), out, name='laion', num_shards=2, workers=0, progress=False
  )
  assert summary['records'] == len(GOOD)
  _, records = all_records(out, 'laion')
  assert all('labels' not in r for r in records)
  features = np.random.default_rng(1).normal(size=(len(GOOD), 8)).astype(np.float32)
  np.save(tmp_path / 'features.npy', features)
  assert cluster_labels.main(
    [
      '--features',
      str(tmp_path / 'features.npy'),
      '--records',
      out,
      '--k',
      '2',
      '--num-labels',
      '2',
      '--out',
      str(tmp_path / 'labels'),
    ]
  ) in (0, None)
  labels_NxL = np.load(tmp_path / 'labels' / 'labels.npy')
  relabelled = str(tmp_path / 'labels' / 'records')
  pattern, records = all_records(relabelled, 'laion')
  assert [r['source'] for r in records] == [r['source'] for r in all_records(out, 'laion')[1]]
  head = pipeline.HeadConfig(kind='image', source=pattern, rows=1, tokens_per_row=256)
  ds = pipeline.sample_dataset(
    'image', head, pipeline.PipelineConfig(heads={'image': head}, num_epochs=1, worker_count=0)
  )
  assert len(ds) == len(GOOD)
  for i in range(len(ds)):
    sample = ds[i]
    np.testing.assert_array_equal(
      sample['labels'], transforms.cyclic_labels(labels_NxL[sample['index']], 10)
    )
