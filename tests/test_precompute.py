"""Offline codec precompute (tools/precompute_codec.py) and the selection visualiser.

The corpus is made here: small H.264 clips of a moving square encoded with PyAV and a labelled
synthetic clip with B-frames (data_pipeline.synthetic), mixed with every kind of bad file a crawl
produces. The selection is the real `data_pipeline.codec.select`
at a small size (8 frames at 112 px: an 8 x 8 patch grid), so the whole module stays a few
seconds of CPU per run of the corpus.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import types

import av
import numpy as np
import pytest
from PIL import Image

from data_pipeline import pictures, precompute, records, synthetic
from data_pipeline.codec import release
from ove_jax_tools import precompute_codec, visualize_selection

NUM_FRAMES, BUDGET, RESOLUTION, PATCH = 8, 48, 112, 14
GRID = RESOLUTION // PATCH
FLAGS = [
  '--num-frames',
  str(NUM_FRAMES),
  '--budget',
  str(BUDGET),
  '--resolution',
  str(RESOLUTION),
  '--no-progress',
]
OPTIONS = {'num_frames': NUM_FRAMES, 'budget': BUDGET, 'resolution': RESOLUTION}


def write_clip(path, seed: int, frames: int = 16, size: int = 112, faststart: bool = False):
  """A textured square moving over noise, as H.264 in an mp4."""
  rng = np.random.RandomState(seed)
  background = rng.randint(0, 256, (size, size, 3)).astype(np.uint8)
  square = rng.randint(0, 256, (4, 4, 3)).astype(np.uint8).repeat(6, 0).repeat(6, 1)
  velocity = rng.randint(2, 5, 2)
  container = av.open(str(path), 'w', options={'movflags': 'faststart'} if faststart else {})
  with container:
    stream = container.add_stream('libx264', rate=25)
    stream.width = stream.height = size
    stream.pix_fmt = 'yuv420p'
    stream.options = {
      'x264-params': 'keyint=8:min-keyint=8:scenecut=0:bframes=0:ref=1',
      'preset': 'ultrafast',
    }
    for t in range(frames):
      frame = background.copy()
      y, x = (8 + velocity * t) % (size - 24)
      frame[y : y + 24, x : x + 24] = square
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  good = {}
  for i in range(5):
    folder = root / f'class{i % 2}'
    folder.mkdir(exist_ok=True)
    path = folder / f'clip{i}.mp4'
    write_clip(path, seed=i)
    good[str(path)] = (i, 100 + i)
  clip = synthetic.make_clip(seed=4, num_frames=16, height=96, width=128, bframes=2, gop=8)
  labels = clip.labels
  path = clip.write(root / 'synthetic.mp4')
  good[path] = (labels['shape_id'], labels['texture_id'], labels['direction_id'])
  bad = {
    name: root / name
    for name in (
      'zero.mp4',
      'random.mp4',
      'notes.txt',
      'audio.m4a',
      'missing.mp4',
      'truncated.mp4',
      'truncated_faststart.mp4',
    )
  }
  bad['zero.mp4'].write_bytes(b'')
  bad['random.mp4'].write_bytes(np.random.RandomState(0).bytes(5000))
  bad['notes.txt'].write_text('not a video\n' * 50)
  synthetic.write_audio_only(bad['audio.m4a'])
  # Cut in half: with the index at the end the file cannot be opened; with the index first
  # (faststart) it opens and promises frames that are not there.
  for name, faststart in (('truncated.mp4', False), ('truncated_faststart.mp4', True)):
    whole = root / f'whole_{name}'
    write_clip(whole, seed=9, faststart=faststart)
    data = whole.read_bytes()
    bad[name].write_bytes(data[: len(data) // 2])
    whole.unlink()
  list_path = root / 'videos.txt'
  lines = ['# a comment, then good clips and bad files, each with labels (all or none)']
  # Labels as "a,b" and as "a b c": both separators are accepted.
  lines += [
    f'{os.path.relpath(p, root)}\t' + (',' if i % 2 else ' ').join(map(str, labels))
    for i, (p, labels) in enumerate(good.items())
  ]
  lines += [f'{name}\t0' for name in bad]  # relative to the list file, like the good ones
  list_path.write_text('\n'.join(lines) + '\n')
  return types.SimpleNamespace(
    root=root, list=str(list_path), good=good, bad={str(p) for p in bad.values()}
  )


def run_tool(list_path, out_dir, *extra):
  assert precompute_codec.main([list_path, str(out_dir), *FLAGS, *extra]) == 0
  with open(os.path.join(out_dir, 'summary.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def first_run(corpus, tmp_path_factory):
  """The corpus precomputed once by the command line, over 2 spawned worker processes."""
  out = tmp_path_factory.mktemp('run') / 'out'
  summary = run_tool(corpus.list, out, '--num-shards', '3', '--workers', '2')
  return out, summary


def all_records(out_dir):
  return [r for path in precompute.shard_files(str(out_dir)) for r in precompute.read_shard(path)]


def comparable(record):
  # Timings differ from run to run; everything else must not.
  return {k: v for k, v in record.items() if 'second' not in k and 'time' not in k}


def assert_same_records(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    x, y = comparable(x), comparable(y)
    assert sorted(x) == sorted(y)
    for key in x:
      if isinstance(x[key], (bytes, str)):
        assert x[key] == y[key], key
      else:
        assert np.asarray(x[key]).dtype == np.asarray(y[key]).dtype, key
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def failures(out_dir):
  with open(os.path.join(out_dir, 'failures.jsonl')) as f:
    return [json.loads(line) for line in f]


def shard_state(out_dir):
  paths = sorted(p for p in os.listdir(out_dir) if '.array_record-' in p)
  return {
    p: (os.stat(os.path.join(out_dir, p)).st_mtime_ns, open(os.path.join(out_dir, p), 'rb').read())
    for p in paths
  }


def test_bad_files_go_to_the_manifest_and_good_clips_to_the_shards(corpus, first_run):
  out, summary = first_run
  assert summary['complete'] and summary['shards'] == 3 and summary['shards_written'] == 3
  assert summary['records'] == len(corpus.good)
  assert summary['failures'] == len(corpus.bad)
  assert summary['clips_kept_fraction'] == pytest.approx(
    len(corpus.good) / (len(corpus.good) + len(corpus.bad))
  )
  assert summary['patches_kept_fraction'] == pytest.approx(BUDGET / (NUM_FRAMES * GRID * GRID))
  assert summary['clips_per_second'] > 0

  got = all_records(out)
  assert sorted(r['source'] for r in got) == sorted(corpus.good)
  for r in got:
    assert r['positions'].shape == (BUDGET, 3) and r['positions'].dtype == np.int16
    assert r['positions'][:, 0].max() < NUM_FRAMES and r['positions'][:, 1:].max() < GRID
    flat = np.ravel_multi_index(tuple(r['positions'].T.astype(np.int64)), (NUM_FRAMES, GRID, GRID))
    assert np.all(np.diff(flat) > 0)  # sorted by (t, h, w), no duplicates
    assert r['frame_ids'].shape == (NUM_FRAMES,) and r['frame_ids'].dtype == np.int32
    assert np.all(np.diff(r['frame_ids']) >= 0) and r['frame_ids'].max() <= 15
    assert r['picture_types'].dtype == np.uint8 and r['picture_types'][0] == 1  # an I-frame
    assert set(r['picture_types'].tolist()) <= {1, 2, 3}
    assert tuple(r['labels'].tolist()) == corpus.good[r['source']]
    with open(r['source'], 'rb') as f:
      assert r['video'] == f.read()  # small clips travel inside the record
    assert any(k.startswith('stats_') for k in r)

  entries = failures(out)
  assert sorted(e['file'] for e in entries) == sorted(corpus.bad)
  for e in entries:
    assert e['file'] in e['reason']
  # The names of the reasons, so a bad file cannot be dropped for the wrong cause.
  reasons = {os.path.basename(e['file']): e['reason'] for e in entries}
  assert 'no such file' in reasons['missing.mp4']
  assert 'empty' in reasons['zero.mp4']
  assert 'no video stream' in reasons['audio.m4a']


def test_rerun_skips_finished_shards_and_resumes_a_killed_run(corpus, first_run, tmp_path):
  out, _ = first_run
  copy = tmp_path / 'copy'
  shutil.copytree(out, copy)  # keeps mtimes
  before = shard_state(copy)

  # The same command again: nothing to do, nothing touched.
  summary = run_tool(corpus.list, copy, '--num-shards', '3', '--workers', '2')
  assert summary['shards_skipped'] == 3 and summary['shards_written'] == 0
  assert summary['clips_processed'] == 0 and summary['records'] == len(corpus.good)
  assert shard_state(copy) == before
  assert failures(copy) == failures(out)

  # A lost shard is redone alone, identical in content.
  lost = sorted(before)[1]
  os.remove(copy / lost)
  summary = run_tool(corpus.list, copy, '--num-shards', '3', '--workers', '0')
  assert summary['shards_skipped'] == 2 and summary['shards_written'] == 1
  after = shard_state(copy)
  assert {p: v for p, v in after.items() if p != lost} == {
    p: v for p, v in before.items() if p != lost
  }
  assert_same_records(
    precompute.read_shard(str(copy / lost)), precompute.read_shard(str(out / lost))
  )
  assert failures(copy) == failures(out)

  # A shard damaged after its marker was written (cut short, overwritten) is read back on the
  # next run and redone, not skipped: the corpus is complete again, and --check agrees.
  for name in sorted(before)[0], sorted(before)[2]:
    with open(copy / name, 'r+b') as f:
      f.truncate(1000)
  flags = ['--num-shards', '3', '--workers', '0']
  summary = run_tool(corpus.list, copy, *flags, '--max-shards', '1')  # one of them now
  assert summary['shards_damaged'] == [0, 2] and summary['shards_damaged_redone'] == [0]
  assert not summary['complete'] and precompute.check(str(copy))['missing'] == [2]
  summary = run_tool(corpus.list, copy, *flags)
  assert summary['shards_damaged_redone'] == [2] and summary['shards_written'] == 1
  assert summary['complete'] and summary['records'] == len(corpus.good)
  for name in sorted(before):
    assert_same_records(
      precompute.read_shard(str(copy / name)), precompute.read_shard(str(out / name))
    )
  assert precompute.check(str(copy))['complete']

  # A run killed after its first shard, with a half-written temp file and a shard that was
  # renamed but never marked done, is completed by running the command again.
  killed = tmp_path / 'killed'
  summary = run_tool(
    corpus.list, killed, '--num-shards', '3', '--workers', '0', '--max-shards', '1'
  )
  assert not summary['complete'] and summary['shards_finished'] == 1
  names = sorted(before)
  (killed / (names[1] + '.tmp')).write_bytes(b'half a shard')
  (killed / names[2]).write_bytes(b'renamed, but no done marker')
  summary = run_tool(corpus.list, killed, '--num-shards', '3', '--workers', '0')
  assert summary['complete'] and summary['shards_skipped'] == 1
  assert summary['shards_written'] == 2 and summary['records'] == len(corpus.good)
  assert not os.path.exists(killed / (names[1] + '.tmp'))
  # Deterministic: the same shards as the 2-worker run, clip for clip.
  assert_same_records(all_records(killed), all_records(out))
  assert failures(killed) == failures(out)


def test_a_different_plan_in_the_same_folder_is_refused(corpus, first_run, capsys):
  out, _ = first_run
  state = shard_state(out)
  argv = [corpus.list, str(out), *FLAGS, '--num-shards', '3', '--budget', '40']
  assert precompute_codec.main(argv) == 2
  assert 'budget' in capsys.readouterr().err  # names what changed
  assert shard_state(out) == state


def test_a_plan_keeps_what_its_preset_meant(tmp_path, capsys):
  """A run with a preset records the preset's values: a run begun when the preset meant other
  values (its plan without them, or with others) is a different run, not resumed under the new
  meaning."""
  clip = synthetic.make_clip(seed=1, num_frames=8, height=64, width=64).write(tmp_path / 'a.mp4')
  options = {'preset': 'release_train', 'num_frames': 4, 'budget': 16, 'resolution': 56}
  out = str(tmp_path / 'out')
  precompute.precompute([clip], out, options=options, workers=0, progress=False)
  plan_file = os.path.join(out, 'plan.json')
  with open(plan_file) as f:
    plan = json.load(f)
  assert plan['preset_values'] == json.loads(json.dumps(release.PRESETS['release_train']))
  del plan['preset_values']  # as an earlier version wrote it
  with open(plan_file, 'w') as f:
    json.dump(plan, f)
  with pytest.raises(precompute.PlanMismatch, match='preset_values'):
    precompute.precompute([clip], out, options=options, workers=0, progress=False)


def test_tfds_format_reads_the_same_records(corpus, first_run, tmp_path):
  import tensorflow_datasets as tfds

  from data_pipeline import sources

  out, _ = first_run
  expected = all_records(out)
  # Through data_pipeline.sources, the way training reads the default format.
  source = sources.open_source(str(out / 'ove_codec-train.array_record-*'))
  assert_same_records([sources.to_record(source[i]['raw']) for i in range(len(source))], expected)

  data_dir = tmp_path / 'tfds'
  tfds_out = data_dir / 'ove_codec' / '1.0.0'
  summary = run_tool(
    corpus.list, tfds_out, '--num-shards', '3', '--workers', '0', '--format', 'tfds'
  )
  assert summary['records'] == len(expected)
  assert_same_records(
    [precompute.tfds_data_source(str(tfds_out))[i] for i in range(len(expected))], expected
  )
  by_name = tfds.data_source('ove_codec', split='train', data_dir=str(data_dir), download=False)
  assert len(by_name) == len(expected)
  assert_same_records(
    [records.decode(ex['record']) for ex in by_name.__getitems__(list(range(len(expected))))],
    expected,
  )
  spec = sources.open_source(f'tfds:ove_codec?split=train&data_dir={data_dir}')
  assert_same_records([sources.to_record(spec[i]['raw']) for i in range(len(spec))], expected)
  assert_same_records(all_records(tfds_out), expected)
  with pytest.raises(ValueError, match='not as a TFDS'):
    precompute.tfds_data_source(str(out))


def test_inputs_and_shard_plan(corpus, tmp_path):
  clips = precompute.read_inputs(corpus.list)
  assert len(clips) == len(corpus.good) + len(corpus.bad)
  assert {c.path: c.labels for c in clips if c.path in corpus.good} == corpus.good
  assert {c.labels for c in clips if c.path not in corpus.good} == {(0,)}
  # A folder: video extensions only, recursively, sorted.
  found = [os.path.relpath(c.path, corpus.root) for c in precompute.read_inputs(str(corpus.root))]
  # Video extensions only (no .txt, .m4a), what exists (no missing.mp4), each folder sorted.
  assert found == [
    'random.mp4',
    'synthetic.mp4',
    'truncated.mp4',
    'truncated_faststart.mp4',
    'zero.mp4',
    'class0/clip0.mp4',
    'class0/clip2.mp4',
    'class0/clip4.mp4',
    'class1/clip1.mp4',
    'class1/clip3.mp4',
  ]
  bad_list = tmp_path / 'bad.txt'
  bad_list.write_text('a.mp4\tseven\n')
  with pytest.raises(ValueError, match=r'bad.txt:1'):
    precompute.read_inputs(str(bad_list))

  items = [precompute.Clip(f'/v/{i}.mp4') for i in range(103)]
  plan = precompute.plan_shards(items, 10, shuffle_seed=0)
  assert plan == precompute.plan_shards(list(items), 10, shuffle_seed=0)  # deterministic
  assert sorted(c.path for s in plan for c in s) == sorted(c.path for c in items)
  assert {len(s) for s in plan} == {10, 11}
  assert plan != precompute.plan_shards(items, 10, shuffle_seed=1)
  assert precompute.plan_shards(items, 10, shuffle_seed=None)[0] == items[:10]
  assert len(precompute.plan_shards(items[:3], 10)) == 3  # never an empty shard


def test_wrong_options_stop_the_run_early(corpus, tmp_path, capsys):
  # An unknown option is refused before any clip is read.
  argv = [corpus.list, str(tmp_path / 'a'), *FLAGS, '--options', '{"no_such_option": 1}']
  assert precompute_codec.main(argv) == 2
  assert 'no_such_option' in capsys.readouterr().err
  # So are a misspelt preset, a bad decode_thread and a budget larger than the grid: what
  # codec.select checks before it opens a clip (each would fail every clip).
  for bad, words in (
    (['--options', json.dumps({'preset': 'release_lava'})], 'release_lava'),
    (['--options', json.dumps({'decode_thread': 'yes'})], 'decode_thread'),
    (['--budget', str(10**6)], 'budget'),
  ):
    argv = [corpus.list, str(tmp_path / 'a'), *FLAGS, *bad]
    assert precompute_codec.main(argv) == 2
    assert words in capsys.readouterr().err
  assert not (tmp_path / 'a').exists() or not any((tmp_path / 'a').iterdir())
  # An OUT_DIR that is a file, or lies inside one, is named before the list is read.
  (tmp_path / 'afile').write_text('')
  for out in ('afile', 'afile/sub'):
    assert precompute_codec.main([str(tmp_path / 'no-list.txt'), str(tmp_path / out)]) == 2
    assert f'OUT_DIR {tmp_path / out}: a file, not a folder' in capsys.readouterr().err
  # A video list's labels are all or nothing, and ids >= 0 (file:line named, nothing read).
  for text, message in (
    ('a.mp4\t3\n# a comment\nb.mp4\n', 'videos.tsv:3: no label ids, but line 1 has some'),
    ('a.mp4\t3\nb.mp4\t1,-4\n', 'videos.tsv:2: label ids 1,-4; ids are whole numbers >= 0'),
  ):
    (tmp_path / 'videos.tsv').write_text(text)
    assert precompute_codec.main([str(tmp_path / 'videos.tsv'), str(tmp_path / 'b')]) == 2
    assert message in capsys.readouterr().err
  # A selector's own options are its own to check: one that fails every clip with ValueError
  # rather than VideoError stops the run after 16 clips instead of listing a corpus as bad.
  good = next(iter(corpus.good))
  run = functools.partial(
    precompute.precompute,
    [good] * 20,
    str(tmp_path / 'b'),
    workers=0,
    progress=False,
    selector='precompute_faults:select',
    clips_per_shard=4,
  )
  with pytest.raises(precompute.Aborted, match='first 16 clips all failed'):
    run(options={**OPTIONS, 'budget': 10**6})
  # Nothing of the stopped run is kept (its four shards of failures, their markers, the
  # failures' lines), so the run with the option mended selects those clips, not skips them.
  assert sorted(os.listdir(tmp_path / 'b')) == ['.lock-task-00000-of-00001', 'progress']
  assert not os.listdir(tmp_path / 'b' / 'progress')
  summary = run(options=OPTIONS)
  assert summary['records'] == 20 and summary['failures'] == 0 and summary['complete']
  # The command line says what stopped it and that a re-run starts afresh (exit 1).
  (tmp_path / 'twenty.txt').write_text(f'{good}\n' * 20)
  argv = [str(tmp_path / 'twenty.txt'), str(tmp_path / 'c'), *FLAGS, '--workers', '0']
  argv += ['--selector', 'precompute_faults:select']
  assert precompute_codec.main([*argv, '--budget', str(10**6)]) == 1
  err = capsys.readouterr().err
  assert 'stopped: the first' in err and 'nothing this run wrote is kept' in err


def test_overlay_dims_dropped_patches_and_outlines_kept_ones():
  frames = np.full((2, 28, 28, 3), 200, np.uint8)
  mask = np.zeros((2, 2, 2), bool)
  mask[0, 0, 0] = mask[1, 1, 1] = True
  shown = visualize_selection.overlay(frames, mask, dim=0.25)
  assert np.all(shown[0, 1:13, 1:13] == 200)  # inside the kept patch: untouched
  assert np.all(shown[0, 0, :14] == pictures.OUTLINE)  # its border: outlined
  assert np.all(shown[0, 14:, :] == 50) and np.all(shown[1, :14, :] == 50)  # dimmed


def test_visualize_a_video_and_a_record(first_run, tmp_path):
  video = synthetic.make_clip(seed=7, num_frames=16, height=112, width=112).write(
    tmp_path / 'synthetic.mp4'
  )
  out = tmp_path / 'video'
  assert (
    visualize_selection.main(
      [
        video,
        '--out',
        str(out),
        '--num-frames',
        str(NUM_FRAMES),
        '--budget',
        str(BUDGET),
        '--resolution',
        str(RESOLUTION),
        '--heatmap',
        '--cols',
        '4',
      ]
    )
    == 0
  )
  png = Image.open(out / 'selection.png')
  assert png.size[0] == 4 * RESOLUTION + 3 * 2  # 4 frames per row, 2 px gaps
  gif = Image.open(out / 'selection.gif')
  assert gif.n_frames == NUM_FRAMES
  assert os.path.getsize(out / 'heatmap.png') > 0

  shard = precompute.shard_files(str(first_run[0]))[0]
  out = tmp_path / 'record'
  assert visualize_selection.main([shard, '--index', '0', '--out', str(out), '--heatmap']) == 0
  gif = Image.open(out / 'selection.gif')
  assert gif.n_frames == NUM_FRAMES and gif.size[0] == RESOLUTION  # options from plan.json
  assert os.path.getsize(out / 'heatmap.png') > 0
  # A tile of the grid is its frame with exactly the record's patches bright: check the frame
  # with a partial selection (whole frames and empty frames would hide a wrong mask).
  from data_pipeline.video import decode_frames

  record = precompute.read_record(shard, 0)
  frames = decode_frames(record['video'], record['frame_ids'], RESOLUTION)
  kept = visualize_selection.kept_mask(record['positions'], NUM_FRAMES, GRID)
  counts = kept.sum((1, 2))
  t = int(np.argmax(np.where(counts < GRID * GRID, counts, 0)))
  assert 0 < counts[t] < GRID * GRID
  x = t * (RESOLUTION + 2)  # one row of 8 tiles, 2 px apart
  tile = np.asarray(Image.open(out / 'selection.png').convert('RGB'))[
    :RESOLUTION, x : x + RESOLUTION
  ]
  kept = kept[t].repeat(PATCH, 0).repeat(PATCH, 1)
  dimmed = (frames[t].astype(np.float32) * 0.3).astype(np.uint8)
  np.testing.assert_array_equal(tile[~kept], dimmed[~kept])
  as_is = np.all(tile == frames[t], -1) | np.all(tile == pictures.OUTLINE, -1)
  assert as_is[kept].all()
  # A record that is not there is an error, not a traceback.
  assert visualize_selection.main([shard, '--index', '99', '--out', str(out)]) == 2
  # An --out that cannot be a folder is named before any selection runs; --cols is >= 1.
  (tmp_path / 'afile').write_text('')
  assert visualize_selection.main([video, '--out', str(tmp_path / 'afile')]) == 2
  with pytest.raises(SystemExit):
    visualize_selection.main([video, '--out', str(out), '--cols', '0'])
  # A shard away from its run's plan.json (how imported LLaVA records come): its heatmap would
  # be another selection's unless the settings are given.
  alone = tmp_path / 'alone'
  alone.mkdir()
  shutil.copy(shard, alone)
  moved = str(alone / os.path.basename(shard))
  args = [moved, '--index', '0', '--out', str(tmp_path / 'alone-out'), '--heatmap']
  assert visualize_selection.main(args) == 2
  sizes = ['--num-frames', str(NUM_FRAMES), '--budget', str(BUDGET)]
  assert visualize_selection.main([*args, *sizes, '--resolution', str(RESOLUTION)]) == 0
