"""The release's LLaVA data path (data_pipeline/llava.py, tools/llava_data.py), synthetic clips."""

import dataclasses
import functools
import hashlib
import io
import json
import os
import re

import av
import numpy as np
import pytest
from PIL import Image

from data_pipeline import (
  codec,
  fileio,
  llava,
  llava_import,
  locks,
  records,
  sources,
  synthetic,
  transforms,
)
from data_pipeline.codec import geometry
from data_pipeline.shard_plan import Aborted
from data_pipeline.tokens import PATCH, VIDEO_GRID, VIDEO_RESOLUTION
from ove_jax_tools import llava_data

T, RES, PS, K, IMAGES = 64, 576, 16, 10368, 8
SIDE = RES // PS


def letterboxed(path: str, frame_ids) -> np.ndarray:
  """The sampled frames decoded here one by one, letterboxed onto the R x R canvas."""
  wanted = {int(i) for i in frame_ids}
  got = {}
  with av.open(path) as container:
    for i, frame in enumerate(container.decode(video=0)):
      if i in wanted:
        got[i] = geometry.letterbox_frame(frame, RES)
  return np.stack([got[int(i)] for i in frame_ids])


def sha8(text):
  return hashlib.sha1(text.encode()).hexdigest()[:8]


@pytest.fixture(scope='module')
def made(tmp_path_factory):
  root = tmp_path_factory.mktemp('llava')
  clip = synthetic.make_clip(5, num_frames=T, height=96, width=160)
  video = str(root / 'walk.mp4')
  with open(video, 'wb') as f:
    f.write(clip.data)
  bad = str(root / 'broken.mp4')
  with open(bad, 'wb') as f:
    f.write(b'not a video')
  dataset = str(root / 'data.jsonl')
  with open(dataset, 'w') as f:
    for row in (
      {
        'id': 7,
        'video': video,
        'conversations': [
          {'from': 'human', 'value': '<video>\nWhat moves?'},
          {'from': 'gpt', 'value': 'A cube.'},
        ],
      },
      {'id': 8, 'video': bad, 'conversations': []},
    ):
      f.write(json.dumps(row) + '\n')
  args = dict(
    visidx_root=str(root / 'vis'),
    image_root=str(root / 'img'),
    out_jsonl=str(root / 'out' / 'train.jsonl'),
  )
  settings = llava.Settings(image_format='png')
  counts = llava.run(dataset, settings=settings, **args)
  return dict(
    root=root, video=video, bad=bad, dataset=dataset, args=args, counts=counts, settings=settings
  )


def test_stage1_files_have_the_release_names_and_shapes(made):
  assert made['counts'] == {'clips': 2, 'made': 1, 'skipped': 0, 'failed': 1}
  video = made['video']
  prefix = f'sample_7__walk__{sha8(video)}__{sha8(video + "|7|0")}_T{T}_square{RES}_p{PS}_K{K}'
  vis = made['args']['visidx_root']
  # Beside them, what the run was made with (`check_settings`).
  assert sorted(os.listdir(vis)) == sorted(
    [llava.SETTINGS_FILE, *(prefix + s for s in llava.STAGE1_SUFFIXES)]
  )
  thw = np.load(os.path.join(vis, prefix + '.visidx_thw.npy'))
  frame_ids = np.load(os.path.join(vis, prefix + '.frame_ids.npy'))
  assert thw.dtype == np.int32 and thw.shape == (K, 3)
  assert frame_ids.dtype == np.int32 and frame_ids.shape == (T,)
  sel = codec.select(
    video, num_frames=T, budget=K, resolution=RES, patch_size=PS, preset='release_llava'
  )
  np.testing.assert_array_equal(thw, sel.positions)
  np.testing.assert_array_equal(frame_ids, sel.frame_ids)
  # The first frame whole (padding too), then only patches inside the picture.
  valid = geometry.valid_patches(96, 160, RES, PS, 'letterbox')
  assert (thw[:, 0] == 0).sum() == SIDE * SIDE
  later = thw[thw[:, 0] > 0]
  assert valid[later[:, 1], later[:, 2]].all() and not valid.all()
  with open(os.path.join(vis, prefix + '.meta.json')) as f:
    meta = json.load(f)
  assert meta['K'] == K and meta['hb'] == SIDE and meta['video'] == video
  assert meta['valid_ranges']['S_valid'] == valid.sum()
  # stage1 counts the selected patches on padding (before its 'exclude' policy): frame 0's
  assert meta['padding_patch_filtered'] == SIDE * SIDE - valid.sum() > 0
  box = geometry.canvas(96, 160, RES, 'letterbox')
  assert (meta['pad_info']['Hn'], meta['pad_info']['pad_top']) == (box.new_h, box.top)


def test_canvases_hold_exactly_the_selected_pixels(made):
  video = made['video']
  pack = os.path.join(made['args']['image_root'], f'sample_7__walk__{sha8(video)}')
  names = [f'walk_{i:03d}.png' for i in range(IMAGES)]
  assert sorted(os.listdir(pack)) == sorted(names + ['positions_thw.npy'])
  canvases = np.stack([np.asarray(Image.open(os.path.join(pack, n))) for n in names])
  assert canvases.shape == (IMAGES, RES, RES, 3)
  positions = np.load(os.path.join(pack, 'positions_thw.npy'))
  per_image = K // IMAGES
  # Canvas 0 is the whole first frame; positions_thw lists the packed canvases' patches only.
  assert positions.dtype == np.int32 and positions.shape == (K - per_image, 3)
  sel = codec.select(
    video, num_frames=T, budget=K, resolution=RES, patch_size=PS, preset='release_llava'
  )
  np.testing.assert_array_equal(positions, sel.positions[per_image:])
  frames = letterboxed(video, sel.frame_ids)
  np.testing.assert_array_equal(canvases[0], frames[0])
  for j, (t, h, w) in enumerate(positions):
    image, cell = 1 + j // per_image, j % per_image
    y, x = (cell // SIDE) * PS, (cell % SIDE) * PS
    np.testing.assert_array_equal(
      canvases[image, y : y + PS, x : x + PS],
      frames[t, h * PS : (h + 1) * PS, w * PS : (w + 1) * PS],
    )


def test_jsonl_failures_and_rerun(made):
  out = made['args']['out_jsonl']
  with open(out) as f:
    lines = [json.loads(line) for line in f]
  assert len(lines) == 1 and set(lines[0]) == {'id', 'conversations', 'image', 'positions_thw'}
  line = lines[0]
  assert line['id'] == '7' and len(line['image']) == IMAGES
  human = line['conversations'][0]['value']
  assert human == '\n'.join(['<image>'] * IMAGES) + '\nWhat moves?'
  assert human.count('<image>') == len(line['image'])
  assert line['conversations'][1] == {'from': 'gpt', 'value': 'A cube.'}
  assert all(os.path.exists(p) for p in line['image'] + [line['positions_thw']])
  failures = llava.read_failures(out + '.failures.jsonl')
  assert [(e['id'], e['video']) for e in failures] == [('8', made['bad'])]
  assert 'broken.mp4' in failures[0]['reason']
  # A re-run skips the finished clip (files untouched) and the known failure.
  stamp = os.stat(line['positions_thw']).st_mtime_ns
  counts = llava.run(made['dataset'], settings=made['settings'], **made['args'])
  assert counts == {'clips': 2, 'made': 0, 'skipped': 1, 'failed': 1}
  assert os.stat(line['positions_thw']).st_mtime_ns == stamp
  with open(out) as f:
    assert [json.loads(x) for x in f] == lines


def test_conversation_rewrite_follows_stage2():
  two = '<image>\n<image>'
  assert llava.conversations_with_images([{'from': 'human', 'value': 'a <video> b <video>'}], 2)[0][
    'value'
  ] == (f'a {two} b <video>')
  assert llava.conversations_with_images([{'from': 'human', 'value': 'Q'}], 2)[0]['value'] == (
    f'{two}\nQ'
  )
  kept = [{'from': 'human', 'value': '<image>\nQ'}, {'from': 'human', 'value': '<video>'}]
  assert llava.conversations_with_images(kept, 2) == kept


def write_release_files(folder, video, thw, frame_ids, grid=SIDE):
  prefix = os.path.join(
    folder,
    f'sample_1__clip__{sha8(video)}__00000000_T{len(frame_ids)}'
    f'_square{grid * PS}_p{PS}_K{len(thw)}',
  )
  np.save(prefix + '.visidx_thw.npy', np.asarray(thw, np.int32))
  np.save(prefix + '.frame_ids.npy', np.asarray(frame_ids, np.int32))
  with open(prefix + '.meta.json', 'w') as f:
    json.dump({'video': video, 'hb': grid, 'wb': grid, 'K': len(thw)}, f)
  return prefix + '.visidx_thw.npy'


def test_release_files_round_trip_into_records(tmp_path):
  rng = np.random.default_rng(0)
  flat = rng.choice(16 * SIDE * SIDE, size=900, replace=False)
  thw = np.stack(np.unravel_index(flat, (16, SIDE, SIDE)), 1)  # the release's top-k order
  path = write_release_files(str(tmp_path), '/videos/clip.mp4', thw, np.arange(0, 160, 10))
  record = records.decode(records.encode(llava_import.release_record(path)))
  assert record['source'] == '/videos/clip.mp4'
  assert record['geometry'] == 'letterbox'  # the pipeline's transform follows it
  assert record['positions'].dtype == np.int16 and record['frame_ids'].dtype == np.int32
  np.testing.assert_array_equal(record['positions'], np.unique(thw, axis=0))
  np.testing.assert_array_equal(record['frame_ids'], np.arange(0, 160, 10))
  with pytest.raises(ValueError, match='frame ids .* missing'):
    os.remove(path.replace('.visidx_thw.npy', '.frame_ids.npy'))
    llava_import.release_record(path)
  np.save(path, np.zeros((4, 2), np.int32))
  np.save(tmp_path / 'x.frame_ids.npy', np.arange(16, dtype=np.int32))
  with pytest.raises(ValueError, match=r'visidx_thw.npy: expected integer \[K, 3\]'):
    llava_import.release_record(path, frame_ids_path=str(tmp_path / 'x.frame_ids.npy'))


def test_regrid_keeps_cells_mostly_covered():
  whole = np.argwhere(np.ones((1, SIDE, SIDE), bool))
  np.testing.assert_array_equal(
    llava_import.regrid(whole, 1, SIDE, 16), np.argwhere(np.ones((1, 16, 16), bool))
  )
  assert len(llava_import.regrid(np.array([[0, 5, 5]]), 1, SIDE, 16)) == 0  # a fifth of a cell
  block = np.argwhere(np.ones((1, 3, 3), bool))  # covers cell (0, 0)
  np.testing.assert_array_equal(llava_import.regrid(block, 1, SIDE, 16), [[0, 0, 0]])
  same = np.array([[0, 1, 2], [2, 3, 4]])
  np.testing.assert_array_equal(llava_import.regrid(same, 3, 16, 16), same)


def test_import_tool_gives_records_the_pipeline_trains_on(made, tmp_path, capsys):
  # OUT a folder: named before any file is read.
  assert llava_data.main(['import', made['args']['visidx_root'], str(tmp_path)]) == 2
  assert f'OUT {tmp_path}: a folder' in capsys.readouterr().err
  out = str(tmp_path / 'release.array_record')
  assert llava_data.main(['import', made['args']['visidx_root'], out, '--model-grid=16']) == 0
  source = sources.open_source(out)
  assert len(source) == 1
  record = sources.to_record(source[0]['raw'])
  assert record['positions'][:, 1:].max() < VIDEO_GRID and record['source'] == made['video']
  # The first frame (whole on the 36 grid) is whole on ours too.
  assert (record['positions'][:, 0] == 0).sum() == VIDEO_GRID * VIDEO_GRID
  transform = transforms.VideoTransform(mode_probs=(1.0, 0.0, 0.0), geometry='letterbox')
  sample = transform(dict(record, labels=[1]), np.random.default_rng(0))
  expected = transforms.codec_patches(
    made['video'], record['frame_ids'], record['positions'], 'letterbox'
  )
  np.testing.assert_array_equal(sample['patches'], expected)
  frame0 = geometry.decode_canvas(
    made['video'], record['frame_ids'][:1], VIDEO_RESOLUTION, 'letterbox'
  )[0]
  np.testing.assert_array_equal(sample['patches'][0], frame0[:PATCH, :PATCH].reshape(-1))


def test_import_lists_unreadable_file_sets_and_goes_on(tmp_path, capsys):
  thw = np.argwhere(np.ones((2, SIDE, SIDE), bool))[::7]
  os.makedirs(tmp_path / 'v')
  good, cut, alone = (
    write_release_files(str(tmp_path / 'v'), f'/videos/{name}.mp4', thw, [0, 5])
    for name in ('good', 'cut', 'alone')
  )
  data = open(cut, 'rb').read()
  open(cut, 'wb').write(data[: len(data) // 2])  # a copy cut short
  os.remove(alone.replace('.visidx_thw.npy', '.frame_ids.npy'))
  out = str(tmp_path / 'release.array_record')
  assert llava_data.main(['import', str(tmp_path / 'v'), out]) == 0
  assert json.loads(capsys.readouterr().out)['failed'] == 2
  assert [
    r['source'] for r in map(sources.to_record, (x['raw'] for x in sources.open_source(out)))
  ] == ['/videos/good.mp4']
  failed = {e['file']: e['reason'] for e in llava.read_failures(out + '.failures.jsonl')}
  assert sorted(failed) == sorted([cut, alone]) and good not in failed
  assert 'frame ids' in failed[alone] and cut in failed[cut]
  # Nothing readable: exit 1, and the shard of the run before is left as it was; no file sets
  # at all: exit 2, naming the folder.
  os.remove(good)
  before = open(out, 'rb').read()
  assert llava_data.main(['import', str(tmp_path / 'v'), out]) == 1
  assert open(out, 'rb').read() == before
  capsys.readouterr()
  assert llava_data.main(['import', str(tmp_path / 'nodir'), out]) == 2
  assert 'nodir: no such folder; give the folder of the stage1' in capsys.readouterr().err
  os.makedirs(tmp_path / 'empty')
  assert llava_data.main(['import', str(tmp_path / 'empty'), out]) == 2
  assert 'empty: no *.visidx_thw.npy files found' in capsys.readouterr().err


def test_import_warns_of_videos_not_found_from_where_it_runs(tmp_path, monkeypatch, capsys):
  # `make` ran in ll/ with the video written as ../corpus/s1.mp4; the path in meta.json is read
  # from the folder the import (and later the training) runs in.
  os.makedirs(tmp_path / 'corpus')
  (tmp_path / 'corpus' / 's1.mp4').write_bytes(b'only its existence is checked')
  os.makedirs(tmp_path / 'll' / 'visidx')
  thw = np.argwhere(np.ones((2, SIDE, SIDE), bool))[::7]
  for name in ('a', 'b'):
    os.makedirs(tmp_path / 'll' / 'visidx' / name)
    write_release_files(str(tmp_path / 'll' / 'visidx' / name), '../corpus/s1.mp4', thw, [0, 5])

  def run(folder, *flags):
    monkeypatch.chdir(folder)
    visidx = 'visidx' if folder.name == 'll' else 'll/visidx'
    assert llava_data.main(['import', visidx, 'x.array_record', *flags]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err

  counts, err = run(tmp_path)
  assert counts['records'] == 2 and counts['videos_missing'] == 2
  assert err.count('warning') == 1 and 'warning: 2 of 2 records name a video not found' in err
  assert '(e.g. ../corpus/s1.mp4)' in err and '--video-root ROOT' in err
  counts, err = run(tmp_path / 'll')  # where make ran: found
  assert counts['videos_missing'] == 0 and 'warning' not in err
  counts, err = run(tmp_path / 'll', '--video-root=../corpus')  # readers join ../corpus
  assert counts['videos_missing'] == 0 and 'warning' not in err
  source = sources.open_source(str(tmp_path / 'll' / 'x.array_record'))
  assert sources.to_record(source[0]['raw'])['source'] == 's1.mp4'


def test_make_tool_jpeg_and_flags(tmp_path):
  clip = synthetic.make_clip(2, num_frames=8, height=80, width=64, codec='mpeg4')
  video = str(tmp_path / 'tall.mp4')
  with open(video, 'wb') as f:
    f.write(clip.data)
  listing = tmp_path / 'videos.txt'
  listing.write_text(video + '\n')
  out = str(tmp_path / 'train.jsonl')
  assert (
    llava_data.main(
      [
        'make',
        str(listing),
        '--visidx-root',
        str(tmp_path / 'v'),
        f'--image-root={tmp_path / "i"}',
        '--out-jsonl',
        out,
        '--num-frames=8',
        '--resolution=192',
        '--budget=576',
        '--num-images=4',
        '--options={"camera_compensation": "none"}',
      ]
    )
    == 0
  )
  with open(out) as f:
    line = json.loads(f.readline())
  assert [os.path.basename(p) for p in line['image']] == [f'tall_{i:03d}.jpg' for i in range(4)]
  got = np.asarray(Image.open(io.BytesIO(open(line['image'][0], 'rb').read())))
  sel = codec.select(
    video,
    num_frames=8,
    budget=576,
    resolution=192,
    patch_size=16,
    preset='release_llava',
    camera_compensation='none',
  )
  first = geometry.decode_canvas(video, sel.frame_ids[:1], 192, 'letterbox')[0]
  assert got.shape == (192, 192, 3)
  assert np.abs(got.astype(np.int16) - first).mean() < 3  # JPEG quality 95
  np.testing.assert_array_equal(np.load(line['positions_thw']), sel.positions[144:])
  with pytest.raises(SystemExit):
    llava_data.main(
      [
        'make',
        str(listing),
        '--visidx-root',
        'v',
        '--image-root',
        'i',
        '--out-jsonl',
        out,
        '--options',
        '[1]',
      ]
    )
  assert re.search('ove-llava-data', llava_data.parser().format_usage())


def test_make_names_each_broken_canvas_rule(tmp_path, capsys):
  # Each rule gets its own message naming the rule, the values and the fix; all are refused
  # before the list is read (the dataset does not exist here).
  cases = {
    ('--budget=9000', '--num-images=7', '--no-first-full'): 'budget=9000, num_images=7: every '
    'canvas holds the same number of patches, so the budget must be a multiple of --num-images '
    '(9000 / 7 leaves 5); give --budget 8995 or 9002',
    ('--budget=20000', '--num-images=2', '--no-first-full'): 'budget=20000, num_images=2: 10000 '
    'patches a canvas exceed its 36x36 = 1296 cells (resolution 576 / patch_size 16); give '
    '--budget at most 2592, or more --num-images',
    ('--resolution=500',): 'resolution=500, patch_size=16: a canvas side must be a whole number '
    'of patches; give --resolution a multiple of --patch-size (496 or 512; the release: 576)',
    ('--budget=9000', '--num-images=7'): 'so the budget must be num_images x 1296 = 9072',
    ('--num-images=0',): 'num_images=0: give --num-images a whole number >= 1',
  }
  roots = ['--visidx-root', 'v', '--image-root', 'i', '--out-jsonl', str(tmp_path / 'o.jsonl')]
  for flags, message in cases.items():
    assert llava_data.main(['make', str(tmp_path / 'none.jsonl'), *roots, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith('ove-llava-data: ') and message in err and err.count('\n') == 1
  with pytest.raises(ValueError, match=r'budget=5, num_images=2: .* give --budget 4 or 6'):
    llava.pack_canvases(np.zeros((1, 32, 32, 3), np.uint8), np.zeros((5, 3)), 2, 16)
  assert not os.listdir(tmp_path)


def test_make_refuses_options_and_selectors_that_cannot_make_its_files(made, tmp_path):
  args = dict(made['args'], out_jsonl=str(tmp_path / 'train.jsonl'))
  run = functools.partial(llava.run, made['dataset'], settings=made['settings'], workers=0)
  for options, message in (
    ({'geometry': 'crop'}, "geometry='crop' .*: the release's LLaVA canvases are letterboxed"),
    ({'policy': 'zero'}, "policy='zero': canvas 0 is the whole first frame"),
  ):
    with pytest.raises(ValueError, match=message):
      run(**args, **options)
  with pytest.raises(ValueError, match='selector data_pipeline.codec:select_random: it must take'):
    run(**args, selector='data_pipeline.codec:select_random')
  crop = dataclasses.replace(made['settings'], preset='release_train')  # a crop preset
  with pytest.raises(ValueError, match="geometry='crop' .preset release_train"):
    llava.run(made['dataset'], settings=crop, workers=0, **args)
  # Another jsonl over the same roots with other options: the roots remember what made them.
  with pytest.raises(ValueError, match='ove-llava-settings.json: .*other settings .*options'):
    run(**args, centre_prior=0.3)
  assert not os.path.exists(args['out_jsonl'])


def test_a_run_begun_under_an_earlier_meaning_of_the_preset_is_refused(made, tmp_path):
  from data_pipeline.codec.release import PRESETS

  recorded = fileio.read_json(os.path.join(made['args']['visidx_root'], llava.SETTINGS_FILE))
  assert recorded['preset'] == 'release_llava'
  assert recorded['preset_values'] == json.loads(json.dumps(PRESETS['release_llava']))
  # Roots an earlier version filled: its settings file has no preset values (or older ones).
  args = {k: str(tmp_path / k) for k in ('visidx_root', 'image_root')}
  del recorded['preset_values']
  for root in args.values():
    os.makedirs(root)
    fileio.write_json(os.path.join(root, llava.SETTINGS_FILE), recorded)
  out = str(tmp_path / 'train.jsonl')
  with pytest.raises(ValueError, match=r'other settings \(preset_values: None then, \{'):
    llava.run(made['dataset'], settings=made['settings'], workers=0, out_jsonl=out, **args)
  assert not os.path.exists(out) and sorted(os.listdir(args['visidx_root'])) == [
    llava.SETTINGS_FILE
  ]


def test_a_run_whose_first_clips_all_fail_for_its_own_reasons_stops_and_keeps_nothing(
  tmp_path, capsys
):
  # A selector that fails every clip (a bug, not the videos) stops the run after 16 clips, and
  # none of them is kept as a known failure: the mended run makes them.
  video = synthetic.make_clip(1, num_frames=8, height=64, width=64).write(tmp_path / 'a.mp4')
  dataset = tmp_path / 'data.txt'
  dataset.write_text(''.join(f'{tmp_path}/error-{i}.mp4\n' for i in range(16)) + video + '\n')
  args = dict(
    visidx_root=str(tmp_path / 'v'),
    image_root=str(tmp_path / 'i'),
    out_jsonl=str(tmp_path / 'train.jsonl'),
    settings=llava.Settings(num_frames=4, resolution=64, budget=32, num_images=2),
    selector='precompute_faults:select',
    workers=0,
  )
  with pytest.raises(Aborted, match='first 16 clips all failed .*the selector failed'):
    llava.run(str(dataset), **args)
  assert llava.read_failures(args['out_jsonl'] + '.failures.jsonl') == []
  assert not os.path.exists(args['out_jsonl'])
  # The command line: the reason and exit 1, not a traceback.
  flags = ['--visidx-root', args['visidx_root'], '--image-root', args['image_root']]
  flags += ['--out-jsonl', args['out_jsonl'], '--workers', '0', '--num-frames', '4']
  flags += ['--resolution', '64', '--budget', '32', '--num-images', '2']
  assert llava_data.main(['make', str(dataset), *flags, '--selector', args['selector']]) == 1
  err = capsys.readouterr().err
  assert 'stopped: the first 16 clips' in err and 'the same command with that mended' in err
  # Mended (codec.select itself): the run is not refused as other settings, and the 16 names,
  # which are no videos, are now the videos' failures, not the selector's.
  counts = llava.run(str(dataset), **dict(args, selector=None))
  assert counts == {'clips': 17, 'made': 1, 'skipped': 0, 'failed': 16}


def test_make_options_hint_names_a_key_make_accepts(tmp_path, capsys):
  listing = tmp_path / 'videos.txt'
  listing.write_text(str(tmp_path / 'missing.mp4') + '\n')
  flags = ['--visidx-root', str(tmp_path / 'v'), '--image-root', str(tmp_path / 'i')]
  flags += ['--out-jsonl', str(tmp_path / 'train.jsonl'), '--workers=0']
  with pytest.raises(SystemExit) as exit:
    llava_data.main(['make', str(listing), *flags, '--options', '[1]'])
  err = capsys.readouterr().err.splitlines()[-1]  # after argparse's usage lines
  assert exit.value.code == 2 and err.startswith('ove-llava-data make: error: argument --options')
  assert '"budget"' not in err
  example = re.search(r"\('(\{.*\})'\)", err).group(1)
  assert example == '{"camera_compensation": "median"}'
  # Following the hint gets past every check: the run goes on to the (missing) video.
  assert llava_data.main(['make', str(listing), *flags, '--options', example]) == 0
  assert json.loads(capsys.readouterr().out)['failed'] == 1


def test_tasks_split_the_list(made):
  out = made['args']['out_jsonl']
  with open(out) as f:
    whole = f.read()
  counts = [
    llava.run(made['dataset'], settings=made['settings'], task_index=i, num_tasks=2, **made['args'])
    for i in range(2)
  ]
  # Which task takes a row is the release stage2's rule, sha1('video|id|row')[:8] mod N, so our
  # shards and the release's hold the same rows. Here one clip was made before, one fails.
  items = llava.read_items(made['dataset'])
  tasks = {}
  for item in items:
    key = f'{item.video}|{item.id}|{item.row}'.encode()
    tasks[item.id] = int(hashlib.sha1(key).hexdigest()[:8], 16) % 2
    assert llava.release_task(item, 2) == tasks[item.id]
  # (The paths are the test's temporary folder, so the split differs from run to run.)
  assert [c['clips'] for c in counts] == [list(tasks.values()).count(t) for t in range(2)]
  assert sum(c['skipped'] for c in counts) == 1 and sum(c['failed'] for c in counts) == 1
  shards = [llava.task_jsonl(out, i, 2) for i in range(2)]
  assert shards[1].endswith('train.jsonl.shard01of02.jsonl')
  assert sorted(''.join(open(p).read() for p in shards).splitlines()) == sorted(whole.splitlines())
  failed_task = tasks['8']
  assert [e['id'] for e in llava.read_failures(shards[failed_task] + '.failures.jsonl')] == ['8']
  assert counts[failed_task]['failed'] == 1
  with pytest.raises(ValueError, match='task_index=2, num_tasks=2'):
    llava.run(made['dataset'], task_index=2, num_tasks=2, **made['args'])
  # A budget that cannot fill the canvases stops the run before any clip is tried, naming the
  # rule it breaks (each rule is checked alone in test_make_names_each_broken_canvas_rule).
  split = llava.Settings(budget=10001, first_full=False)
  with pytest.raises(ValueError, match='budget=10001, num_images=8: .* a multiple of'):
    llava.run(made['dataset'], settings=split, **made['args'])
  with pytest.raises(ValueError, match='1300 patches a canvas exceed its 36x36 = 1296 cells'):
    over = llava.Settings(budget=8 * 1300, first_full=False)
    llava.run(made['dataset'], settings=over, **made['args'])


def test_a_segfault_and_a_hang_cost_their_clip_and_a_second_run_refuses(tmp_path):
  # Faults come through the real `selector` hook (tests/precompute_faults.py): 'segfault*'
  # kills its worker with SIGSEGV as a decoder bug does, 'hang*' never returns.
  video = synthetic.make_clip(1, num_frames=8, height=64, width=64).write(tmp_path / 'a.mp4')
  rows = [video, str(tmp_path / 'segfault-decoder.mp4'), str(tmp_path / 'hang-forever.mp4'), video]
  dataset = tmp_path / 'data.jsonl'
  dataset.write_text(
    ''.join(
      json.dumps({'id': i, 'video': v, 'conversations': []}) + '\n' for i, v in enumerate(rows)
    )
  )
  settings = llava.Settings(
    num_frames=4, resolution=64, budget=32, num_images=2, image_format='png'
  )
  args = dict(
    visidx_root=str(tmp_path / 'v'),
    image_root=str(tmp_path / 'i'),
    out_jsonl=str(tmp_path / 'out' / 'train.jsonl'),
    settings=settings,
  )
  timeout = 6.0  # far above what one of these clips takes, even on a loaded machine
  counts = llava.run(
    str(dataset),
    workers=2,
    clip_timeout=timeout,
    selector='precompute_faults:select',
    **args,
  )
  assert counts == {'clips': 4, 'made': 2, 'skipped': 0, 'failed': 2}
  out = args['out_jsonl']
  with open(out) as f:
    lines = f.read()
  assert [json.loads(line)['id'] for line in lines.splitlines()] == ['0', '3']
  reasons = {e['id']: e['reason'] for e in llava.read_failures(out + '.failures.jsonl')}
  assert sorted(reasons) == ['1', '2']
  assert 'SIGSEGV' in reasons['1'] and 'segfault-decoder.mp4' in reasons['1']
  assert f'timed out after {timeout:g} s' in reasons['2'] and 'hang-forever.mp4' in reasons['2']
  # The re-run (the faults still there) does not try the known failures again: their entries
  # come back as they were written (marked here), not as a new crash or time-out would write
  # them. A clip whose files are all there counts as made, even when listed as failed (a
  # worker killed after its last write), and a clip redone before them loses none of them.
  failures_file = out + '.failures.jsonl'
  entries = llava.read_failures(failures_file)
  for e in entries:
    e['reason'] += ' [first run]'
  first = json.dumps({'id': '0', 'video': video, 'reason': 'killed after its files'})
  with open(failures_file, 'w') as f:
    f.write(''.join(json.dumps(e) + '\n' for e in [json.loads(first)] + entries))
  os.remove(json.loads(lines.splitlines()[1])['positions_thw'])  # row 3 is made again
  counts = llava.run(
    str(dataset), workers=2, clip_timeout=timeout, selector='precompute_faults:select', **args
  )
  assert counts == {'clips': 4, 'made': 1, 'skipped': 1, 'failed': 2}
  assert open(out).read() == lines
  assert llava.read_failures(failures_file) == entries
  # Settings of the run and a bad OVE_SELECT_THREADS fail before any clip, not once per clip.
  with pytest.raises(ValueError, match='options budget: these come from the settings'):
    llava.run(str(dataset), budget=16, **args)
  with pytest.raises(ValueError, match="unknown option 'colour'"):
    llava.run(str(dataset), colour='red', **args)
  with pytest.raises(ValueError, match='workers=-1'):
    llava.run(str(dataset), workers=-1, **args)
  # A second run on the same jsonl while one holds it refuses, naming the holder.
  with locks.hold(str(tmp_path / 'out'), 'train.jsonl', 'the first run', kind='ove-llava-data'):
    with pytest.raises(locks.Locked, match='in use by another ove-llava-data run.*the first run'):
      llava.run(str(dataset), **args)
    flags = ['--visidx-root', args['visidx_root'], '--image-root', args['image_root']]
    assert llava_data.main(['make', str(dataset), *flags, '--out-jsonl', out]) == 2
  with pytest.raises(ValueError, match='selector .*no_such_module'):
    llava.run(str(dataset), selector='no_such_module:select', **args)
  flags += ['--out-jsonl', out, '--options', '{"workers": 3}']
  assert llava_data.main(['make', str(dataset), *flags]) == 2
  # A run stopped in the middle keeps the failures it met (appended as they happen).
  stopped = tmp_path / 'stopped.txt'
  stopped.write_text(f'{tmp_path / "missing.mp4"}\n{tmp_path / "interrupt-now.mp4"}\n')
  out = str(tmp_path / 'stopped' / 'train.jsonl')
  with pytest.raises(KeyboardInterrupt):
    llava.run(
      str(stopped), **dict(args, out_jsonl=out), workers=0, selector='precompute_faults:select'
    )
  assert [e['id'] for e in llava.read_failures(out + '.failures.jsonl')] == ['0']


def test_a_worker_killed_while_writing_leaves_no_temporary(tmp_path, monkeypatch):
  """A worker killed (SIGKILL) after starting a clip's files: its temporary file goes with it,
  the clip is a failure, and another process's temporary beside it is left alone."""
  video = synthetic.make_clip(1, num_frames=8, height=64, width=64).write(tmp_path / 'a.mp4')
  torn = str(tmp_path / 'torn-write.mp4')
  dataset = tmp_path / 'data.txt'
  dataset.write_text(f'{video}\n{torn}\n')
  settings = llava.Settings(
    num_frames=4, resolution=64, budget=32, num_images=2, image_format='png'
  )
  roots = dict(visidx_root=str(tmp_path / 'v'), image_root=str(tmp_path / 'i'))
  item = llava.read_items(str(dataset))[1]
  paths = llava.clip_paths(item, **roots, s=settings)
  os.makedirs(os.path.dirname(paths['images'][0]))
  other = paths['images'][0] + '.tmp-1-0000abcd'  # another writer's, in flight
  open(other, 'wb').close()
  monkeypatch.setenv('OVE_TEST_TORN_PATH', paths['images'][0])
  out = str(tmp_path / 'train.jsonl')
  counts = llava.run(
    str(dataset),
    out_jsonl=out,
    settings=settings,
    workers=1,
    selector='precompute_faults:select_torn',
    **roots,
  )
  assert counts == {'clips': 2, 'made': 1, 'skipped': 0, 'failed': 1}
  (failure,) = llava.read_failures(out + '.failures.jsonl')
  assert failure['video'] == torn and 'SIGKILL' in failure['reason']
  left = sorted(p for p in os.listdir(os.path.dirname(other)) if '.tmp-' in p)
  assert left == [os.path.basename(other)]
  assert not [p for p in os.listdir(roots['visidx_root']) if '.tmp-' in p]


def test_bad_dataset_lines_and_select_threads_are_named(tmp_path, monkeypatch, capsys):
  dataset = tmp_path / 'data.jsonl'
  dataset.write_text('{"id": 1, "video": "a.mp4"}\n{"id": 2, "video": \n')
  args = dict(visidx_root=str(tmp_path / 'v'), image_root=str(tmp_path / 'i'))
  out = str(tmp_path / 'train.jsonl')
  with pytest.raises(ValueError, match=r'data.jsonl, line 2: not a JSON object'):
    llava.run(str(dataset), out_jsonl=out, workers=0, **args)
  dataset.write_text('{"id": 1, "video": "a.mp4"}\n')
  monkeypatch.setenv('OVE_SELECT_THREADS', 'many')
  with pytest.raises(ValueError, match="OVE_SELECT_THREADS='many'"):
    llava.run(str(dataset), out_jsonl=out, **args)
  assert not os.path.exists(out + '.failures.jsonl')


def test_release_task_is_stage2s_rule_on_fixed_rows():
  # Fixed paths, so the split does not depend on a temporary folder: the release's stage2 puts
  # row r of (video, id) in shard int(sha1('video|id|r')[:8], 16) % N.
  rows = [llava.Item(str(i), f'/data/v{i % 3}.mp4', [], i) for i in range(40)]
  for n in (1, 2, 7):
    got = [llava.release_task(item, n) for item in rows]
    want = [
      int(hashlib.sha1(f'/data/v{i % 3}.mp4|{i}|{i}'.encode()).hexdigest()[:8], 16) % n
      for i in range(40)
    ]
    assert got == want and set(got) == set(range(n))
  # Not the round-robin rows I, I+N, ... it replaced.
  assert [llava.release_task(item, 2) for item in rows[:8]] != [0, 1] * 4


def test_a_failures_line_torn_by_a_killed_run_is_left_out(tmp_path):
  # The failures file is appended to as failures happen: a run killed mid-write leaves half a
  # line, which must not stop the next run.
  path = tmp_path / 'train.jsonl.failures.jsonl'
  path.write_text('{"id": "3", "video": "/v/a.mp4", "reason": "x"}\n{"id": "4", "video": "/v/b')
  assert llava.read_failures(str(path)) == [{'id': '3', 'video': '/v/a.mp4', 'reason': 'x'}]
  assert llava.read_failures(str(tmp_path / 'none.jsonl')) == []
