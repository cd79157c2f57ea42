"""Image corpora in a bucket: ove-precompute-images reads a folder (a prefix, class per top
subfolder or a labels .npy), a webdataset tar set and parquet files from gs:// and s3:// (the
local API servers of tests/conftest.py), in worker processes, with no local copy, into shards in
the bucket; each run's records and failures are those of the same corpus read from local files,
names aside."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from test_precompute_images import BAD, GOOD, LABELS, ORDER

from data_pipeline import image_precompute, paths, precompute, shards, sources


@pytest.fixture(params=['gcs', 's3'])
def bucket(request):
  return request.getfixturevalue(request.param)


def _records(out: str) -> dict:
  """source -> (image bytes, labels) of every record of a run."""
  found = {}
  for path in shards.shard_files(out):
    for r in shards.read_shard(path):
      found[r['source']] = (r['image'], tuple(r['labels'].tolist()) if 'labels' in r else None)
  return found


def _failures(out: str) -> list[str]:
  with paths.open_file(paths.join(out, precompute.FAILURES), encoding='utf-8') as f:
    return sorted(json.loads(line)['file'] for line in f if line.strip())


def _same_run(local_source: str, url_source: str, local_root: str, url_root: str, tmp, **kw):
  """Runs both sources, the local one into a local folder and the bucket's into the bucket; the
  URL run's records and failures are the local run's, with the local root's name replaced by
  the bucket's."""
  runs = []
  bucket_out = paths.join(paths.buckets_in(url_root)[0], f'{tmp.name}-out')
  for source, workers, out in ((local_source, 0, str(tmp / 'out')), (url_source, 2, bucket_out)):
    summary = image_precompute.precompute_images(
      source, out, num_shards=2, workers=workers, progress=False, **kw
    )
    assert summary['complete'] and precompute.check(out)['complete']
    runs.append((_records(out), _failures(out)))
  (local, local_failed), (remote, remote_failed) = runs
  assert local and all(name.startswith(url_root) for name in remote)
  assert {k.replace(local_root, url_root): v for k, v in local.items()} == remote
  assert [f.replace(local_root, url_root) for f in local_failed] == remote_failed
  return remote, remote_failed


def test_image_folder_in_a_bucket(bucket, tmp_path):
  root = tmp_path / 'imgs'
  for i, name in enumerate(ORDER):
    folder = root / ('cats' if i % 2 else 'dogs') / ('deep' if i % 3 == 0 else '')
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(GOOD[name] if name in GOOD else BAD[name][0])
  (root / 'cats' / 'notes.txt').write_text('not an image')
  paths.upload_folder(str(root), paths.join(bucket, 'imgs'))
  # A sibling prefix that starts with the same letters is not part of the folder.
  paths.upload(str(root / 'cats' / 'notes.txt'), paths.join(bucket, 'imgsX/cats/extra.png'))
  url = paths.join(bucket, 'imgs')
  assert image_precompute.source_kind(url) == 'folder'
  assert sources.image_files(url) == sources.image_files(str(root))
  assert len(sources.image_files(url)) == len(ORDER)
  # The trainer's folder source reads the prefix too ('folder:gs://...').
  folder = sources.open_source(f'folder:{url}')
  first = folder[0]['raw']
  assert first['source'] == paths.join(url, folder.files[0])
  assert first['image'] == (root / folder.files[0]).read_bytes()

  records, failed = _same_run(
    str(root), url, str(root), url, tmp_path, labels='folders', shuffle_seed=None
  )
  assert len(records) == len(GOOD) and len(failed) == len(BAD)
  for source, (_, labels) in records.items():
    assert labels == ((0,) if '/cats/' in source else (1,))
  # A labels table in the bucket: a row per image in sorted relative-name order.
  table = np.arange(len(ORDER), dtype=np.int64) + 7
  np.save(tmp_path / 'labels.npy', table)
  paths.upload(str(tmp_path / 'labels.npy'), paths.join(bucket, 'labels.npy'))
  out = str(tmp_path / 'out-table')
  image_precompute.precompute_images(
    url, out, labels=paths.join(bucket, 'labels.npy'), workers=0, progress=False
  )
  order = sources.image_files(url)
  for source, (_, labels) in _records(out).items():
    assert labels == (int(table[order.index(source[len(url) + 1 :])]),)


def test_tar_set_and_parquet_in_a_bucket(bucket, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  local = tmp_path / 'data'
  local.mkdir()
  for t in range(2):
    with tarfile.open(local / f'shard-{t:03d}.tar', 'w') as tar:
      for name in ORDER[t::2]:
        for member, payload in (
          (name, GOOD[name] if name in GOOD else BAD[name][0]),
          (name.split('.')[0] + '.cls', ' '.join(map(str, LABELS[name])).encode()),
        ):
          info = tarfile.TarInfo(member)
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))
  cells = [GOOD[n] if n in GOOD else BAD[n][0] for n in ORDER]
  table = pa.table({'jpg': cells, 'label': [LABELS[n][0] for n in ORDER]})
  pq.write_table(table, local / 'part-0.parquet', row_group_size=3)
  data = paths.join(bucket, 'data')
  paths.upload_folder(str(local), data)

  pattern = 'shard-{000..001}.tar'
  assert image_precompute.source_kind(paths.join(data, pattern)) == 'tar'
  assert sources.expand_files(paths.join(data, 'shard-*.tar')) == [
    paths.join(data, f'shard-{t:03d}.tar') for t in range(2)
  ]
  records, failed = _same_run(
    str(local / pattern), paths.join(data, pattern), str(local), data, tmp_path
  )
  assert len(records) == len(GOOD) and len(failed) == len(BAD)
  for source, (_, labels) in records.items():
    assert labels == LABELS[source.rsplit('#', 1)[1]]

  records, failed = _same_run(
    str(local / '*.parquet'),
    paths.join(data, '*.parquet'),
    str(local),
    data,
    tmp_path / 'pq',
    label_columns=['label'],
  )
  assert len(records) == len(GOOD) and len(failed) == len(BAD)
  for source, (_, labels) in records.items():
    assert labels == (LABELS[ORDER[int(source.rsplit('#', 1)[1])]][0],)


def test_missing_objects_are_named(gcs, tmp_path):
  with pytest.raises(FileNotFoundError, match='gs://nobucket-of-ove: no such bucket'):
    image_precompute.source_kind('gs://nobucket-of-ove/imgs')
  with pytest.raises(FileNotFoundError, match='gs://'):
    image_precompute.source_kind('gs:/bucket/imgs')  # one slash
  with pytest.raises(FileNotFoundError, match='not a folder .or a bucket prefix'):
    image_precompute.source_kind(paths.join(gcs, 'nothing/here'))
  with pytest.raises(FileNotFoundError, match=r"no files match '.*/nothing-\*\.tar'"):
    sources.expand_files(paths.join(gcs, 'nothing-*.tar'))
  with pytest.raises(FileNotFoundError, match='labels .*/none.npy: no such file'):
    image_precompute.list_images(gcs, kind='folder', labels=paths.join(gcs, 'none.npy'))
