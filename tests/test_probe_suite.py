"""Benchmark sources and recipes (data_pipeline.benchmarks, experiments/probe_benchmarks.py) and
the probe suite (ove_jax.probe_suite, tools/probe_suite.py) on encoded synthetic clips."""

import csv
import os
import shutil

import numpy as np
import pytest

from data_pipeline import benchmarks, synthetic
from ove_jax import config as config_lib
from ove_jax_tools import probe_suite as suite_tool

DIRECTIONS = ('E', 'W')


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """12 encoded clips (label = direction E / W) in release-format lists: 8 train, 4 test."""
  root = tmp_path_factory.mktemp('probe_data')
  (root / 'videos').mkdir()
  clips = []
  for i in range(12):
    clip = synthetic.make_clip(i, num_frames=16, height=64, width=64, direction=DIRECTIONS[i % 2])
    path = clip.write(root / 'videos' / f'clip{i}.mp4')
    clips.append(benchmarks.ProbeClip(str(path), i % 2))
  benchmarks.write_video_list(str(root / 'train.csv'), clips[:8], root=str(root))
  benchmarks.write_video_list(str(root / 'test.csv'), clips[8:], root=str(root))
  return root


def _args(root, out, *extra):
  config = (
    f'probe_benchmarks:name=toy,train={root}/train.csv,test={root}/test.csv,'
    'num_classes=2,batch_size=4,epochs=1,val_fraction=0.25'
  )
  return [
    f'--config={config}',
    '--encoders',
    'random:tiny',
    '--modes',
    'uniform:1,codec:256',
    '--seeds',
    '0',
    '--eval-batch-size',
    '4',
    '--out',
    str(out),
    *extra,
  ]


def _table(out):
  with open(out / 'results.csv') as f:
    return list(csv.DictReader(f))


def _stamps(out):
  return {n: os.stat(out / 'cells' / n).st_mtime_ns for n in sorted(os.listdir(out / 'cells'))}


@pytest.fixture(scope='module')
def finished(dataset, tmp_path_factory):
  """A suite folder whose two cells (uniform:1, codec:256 of random:tiny) are done."""
  out = tmp_path_factory.mktemp('finished') / 'suite'
  assert suite_tool.main(_args(dataset, out)) == 0
  return out


@pytest.fixture
def suite_copy(finished, tmp_path):
  out = tmp_path / 'suite'
  shutil.copytree(finished, out)
  return out


def test_suite_writes_the_table(finished):
  out = finished
  rows = _table(out)
  assert [(r['benchmark'], r['mode'], r['encoder'], r['status']) for r in rows] == [
    ('toy', 'uniform:1', 'random:tiny', 'ok'),
    ('toy', 'codec:256', 'random:tiny', 'ok'),
  ]
  for r in rows:
    assert 0 <= float(r['top1']) <= float(r['top5']) <= 1
    assert (r['num_train'], r['num_val'], r['num_test'], r['tokens']) == ('6', '2', '4', '256')
  table = (out / 'results.md').read_text()
  assert '| toy | codec:256 | random:tiny (seed 0) |' in table and 'top-5' in table
  assert [r['encoder_version'] for r in rows] == ['seed 0', 'seed 0']
  assert len(os.listdir(out / 'selections')) == 12  # every clip's codec:256 selection, kept


def test_resume_skips_cells_of_the_same_settings_and_refuses_changed_ones(
  dataset, suite_copy, capsys
):
  out = suite_copy
  stamps = _stamps(out)
  capsys.readouterr()
  assert suite_tool.main(_args(dataset, out, '--eval-batch-size', '2')) == 0  # speed only
  assert capsys.readouterr().out.count('done before, skipped') == 2
  assert _stamps(out) == stamps
  # Other settings into the same folder: refused before any cell runs, naming the cells and
  # the settings that differ, and the fixes; nothing is rewritten.
  for extra, change in (
    (('--seeds', '0,1', '--epochs', '2'), 'epochs 1 -> 2; seeds [0] -> [0, 1]'),
    (('--encoder-seed', '5'), 'encoder_seed 0 -> 5'),
  ):
    assert suite_tool.main(_args(dataset, out, *extra)) == 2  # the last --seeds counts
    err = capsys.readouterr().err
    assert (
      f'2 finished cell(s) there ran with other settings: toy uniform:1 random:tiny ({change})'
      in err
    )
    assert 'new --out' in err and '--rerun-changed' in err
    assert _stamps(out) == stamps
  # --rerun-changed runs them again at the new settings; the table holds this command's cells
  # only (the codec cell, not in it, stays on disk).
  args = _args(dataset, out, '--encoder-seed', '5', '--rerun-changed')
  args[args.index('uniform:1,codec:256')] = 'uniform:1'
  assert suite_tool.main(args) == 0
  printed = capsys.readouterr().out
  assert '[1/1] toy uniform:1 random:tiny: running' in printed and 'skipped' not in printed
  assert '1 cell file(s) of other commands kept' in printed
  assert [(r['mode'], r['status']) for r in _table(out)] == [('uniform:1', 'ok')]
  assert len(os.listdir(out / 'cells')) == 2
  args = _args(dataset, out, '--encoder-seed', '5')
  args[args.index('uniform:1,codec:256')] = 'uniform:1'
  assert suite_tool.main(args) == 0
  assert 'done before, skipped' in capsys.readouterr().out


def _one_mode(args, encoder):
  """`args` (of `_args`) for the uniform:1 cell of `encoder` only."""
  args[args.index('uniform:1,codec:256')] = 'uniform:1'
  args[args.index('random:tiny')] = encoder
  return args


def test_a_training_run_trained_on_is_a_changed_setting(dataset, smoke_run, tmp_path, capsys):
  workdir = tmp_path / 'run'
  shutil.copytree(smoke_run[0], workdir)
  later = tmp_path / 'step5'
  shutil.move(workdir / 'checkpoints' / '5', later)  # the run at step 3
  out = tmp_path / 'suite'
  assert suite_tool.main(_one_mode(_args(dataset, out), str(workdir))) == 0
  assert [(r['encoder'], r['encoder_version']) for r in _table(out)] == [(str(workdir), 'step 3')]
  assert f'| {workdir} (step 3) |' in (out / 'results.md').read_text()
  stamps = _stamps(out)
  shutil.move(later, workdir / 'checkpoints' / '5')  # trained on to step 5
  capsys.readouterr()
  assert suite_tool.main(_one_mode(_args(dataset, out), str(workdir))) == 2
  err = capsys.readouterr().err
  assert f'ran with other settings: toy uniform:1 {workdir} (encoder_step 3 -> 5)' in err
  assert '--rerun-changed' in err and _stamps(out) == stamps
  assert suite_tool.main(_one_mode(_args(dataset, out, '--rerun-changed'), str(workdir))) == 0
  assert 'running' in capsys.readouterr().out
  assert [r['encoder_version'] for r in _table(out)] == ['step 5']
  assert suite_tool.main(_one_mode(_args(dataset, out), str(workdir))) == 0
  assert 'done before, skipped' in capsys.readouterr().out
  # A step folder names its step.
  step3 = str(workdir / 'checkpoints' / '3')
  assert suite_tool.main(_one_mode(_args(dataset, out), step3)) == 0
  assert [r['encoder_version'] for r in _table(out)] == ['step 3']


def test_an_export_rewritten_in_place_is_a_changed_setting(dataset, tmp_path, capsys):
  from ove_jax import convert
  from ove_jax.models import EncoderConfig, create_encoder

  export, out = tmp_path / 'export', tmp_path / 'suite'
  convert.save_pytorch(create_encoder(EncoderConfig.preset('tiny'), seed=5), str(export))
  assert suite_tool.main(_one_mode(_args(dataset, out), str(export))) == 0
  (version,) = [r['encoder_version'] for r in _table(out)]
  assert version.startswith('weights ')
  capsys.readouterr()
  assert suite_tool.main(_one_mode(_args(dataset, out), str(export))) == 0  # the same files
  assert 'done before, skipped' in capsys.readouterr().out
  stamps = _stamps(out)
  # Another model written over it (same names and sizes), later.
  convert.save_pytorch(create_encoder(EncoderConfig.preset('tiny'), seed=7), str(export))
  weights = export / 'model.safetensors'
  stat = weights.stat()
  os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  assert suite_tool.main(_one_mode(_args(dataset, out), str(export))) == 2
  err = capsys.readouterr().err
  assert f'toy uniform:1 {export} (encoder_weights 2 file(s), ' in err
  assert f'id {version.split()[1]} -> 2 file(s), ' in err and _stamps(out) == stamps
  assert suite_tool.main(_one_mode(_args(dataset, out, '--rerun-changed'), str(export))) == 0
  assert [r['encoder_version'] for r in _table(out)] != [version]


def test_encoder_kinds_and_versions(smoke_run, tmp_path):
  from ove_jax import checkpoint, convert
  from ove_jax.encoder_source import encoder_identity, encoder_kind
  from ove_jax.models import EncoderConfig, create_encoder

  model = create_encoder(EncoderConfig.preset('tiny'), seed=5)
  params = checkpoint.save_params(str(tmp_path / 'params'), model.cfg, convert.model_params(model))
  workdir = smoke_run[0]
  assert [encoder_kind(s) for s in ('random:tiny', 'org/name', params, workdir)] == [
    'random',
    'hub',
    'params',
    'training',
  ]
  assert encoder_identity('random:tiny', seed=3) == {'encoder_seed': 3}
  assert encoder_identity(workdir) == {'encoder_step': 5}
  assert encoder_identity(workdir, step=3) == {'encoder_step': 3}
  first = encoder_identity(params)['encoder_weights']
  assert first == encoder_identity(params)['encoder_weights']
  config = tmp_path / 'params' / checkpoint.CONFIG_FILE
  config.write_text(config.read_text() + ' ')  # a byte more
  assert encoder_identity(params)['encoder_weights'] != first


def test_probe_refuses_step_for_anything_but_a_training_run(tmp_path, capsys, monkeypatch):
  from ove_jax import checkpoint, convert
  from ove_jax.models import EncoderConfig, create_encoder
  from ove_jax_tools import probe as probe_tool

  export = tmp_path / 'export'
  convert.save_pytorch(create_encoder(EncoderConfig.preset('tiny'), seed=5), str(export))

  def never(*args, **kwargs):
    raise AssertionError('the encoder was loaded')

  monkeypatch.setattr(checkpoint, 'load_encoder', never)
  data = ['--builtin', str(tmp_path / 'data'), '--out', str(tmp_path / 'r.json')]
  for spec, kind in ((str(export), 'a release-format directory'), ('random:tiny', 'a random:')):
    assert probe_tool.main(['--checkpoint', spec, '--step', '4', *data]) == 2
    err = capsys.readouterr().err
    only = '--step 4: picks a checkpoint of a training workdir only'
    assert f'{only}, and --checkpoint {spec} is {kind}' in err
    assert 'drop --step' in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / 'data').exists() and not (tmp_path / 'r.json').exists()


def test_a_failed_cell_is_recorded_run_again_and_leaves_no_stale_row(dataset, tmp_path, capsys):
  (tmp_path / 'garbage.mp4').write_bytes(b'not a video' * 100)
  lines = (dataset / 'train.csv').read_text().splitlines()
  lines = [f'{dataset}/{line}' for line in lines]
  lines[2] = f'{tmp_path}/garbage.mp4,0'
  (tmp_path / 'train.csv').write_text('\n'.join(lines) + '\n')
  out = tmp_path / 'suite'
  args = _args(dataset, out)
  args[0] = args[0].replace(
    f'name=toy,train={dataset}/train.csv', f'name=bad,train={tmp_path}/train.csv'
  )
  args[args.index('uniform:1,codec:256')] = 'uniform:1'
  for _ in range(2):  # recorded with its error, and run again by the rerun
    capsys.readouterr()
    assert suite_tool.main(args) == 1
    assert 'skipped' not in capsys.readouterr().out
    rows = _table(out)
    assert [(r['benchmark'], r['status']) for r in rows] == [('bad', 'failed')]
    assert 'garbage.mp4' in rows[0]['error']
  # Another plan into the same folder: its own table and exit status.
  args = _args(dataset, out)
  args[args.index('uniform:1,codec:256')] = 'uniform:1'
  assert suite_tool.main(args) == 0
  assert [(r['benchmark'], r['status']) for r in _table(out)] == [('toy', 'ok')]
  assert 'bad' not in (out / 'results.md').read_text()


def test_damaged_cell_and_selection_files_are_named_and_redone(
  dataset, suite_copy, capsys, monkeypatch
):
  from ove_jax import checkpoint

  out = suite_copy
  cells = sorted(os.listdir(out / 'cells'))
  for name in cells:
    (out / 'cells' / name).write_text('')
  selection = out / 'selections' / sorted(os.listdir(out / 'selections'))[0]
  selection.write_bytes(b'')
  loads = []
  load = checkpoint.load_encoder
  monkeypatch.setattr(checkpoint, 'load_encoder', lambda *a, **k: loads.append(a) or load(*a, **k))
  capsys.readouterr()
  assert suite_tool.main(_args(dataset, out)) == 0
  printed = capsys.readouterr().out
  for name in cells:
    assert f'{out}/cells/{name}: unreadable cell file (JSONDecodeError' in printed
  assert f'the cached codec selection {selection}: empty (0 bytes)' in printed
  assert 'making the selection again' in printed
  assert selection.stat().st_size > 0 and len(os.listdir(out / 'selections')) == 12
  assert [r['status'] for r in _table(out)] == ['ok', 'ok']
  assert loads == [('random:tiny',)]  # loaded once for both cells


def test_bad_input_is_refused_before_any_cell_runs(dataset, tmp_path, capsys):
  def refused(config_from, config_to, message, *, encoder='random:tiny', out=None):
    out = out or tmp_path / 'bad'
    args = _args(dataset, out)
    args[0] = args[0].replace(config_from, config_to)
    args[args.index('random:tiny')] = encoder
    assert suite_tool.main(args) == 2
    assert message in capsys.readouterr().err
    assert not os.path.isdir(out / 'cells') or not os.listdir(out / 'cells')

  def a_list(name, line):
    lines = (dataset / 'train.csv').read_text().splitlines()
    lines[2] = line
    (tmp_path / name).write_text(''.join(f'{dataset}/{x}\n' for x in lines))
    return f'train={tmp_path}/{name}'

  train = f'train={dataset}/train.csv'
  refused('val_fraction=0.25', 'val_fraction=0', 'the config: val_fraction=0.0: must be in (0, 1)')
  refused(
    'val_fraction=0.25',
    'val_fraction=0.01',
    '8 training clip(s) with val_fraction 0.01 leave 8 to train and 0 to validate',
  )
  refused(train, train.replace('train.csv', 'nosuch.csv'), 'no such video list')
  refused(
    train,
    a_list('label.csv', 'videos/clip2.mp4,5'),
    'label.csv:3: label 5 is outside 0..1 (num_classes 2)',
  )
  refused(
    train,
    a_list('missing.csv', 'videos/none.mp4,0'),
    f'missing.csv:3: {dataset}/videos/none.mp4: no such video file',
  )
  refused(
    train,
    a_list('segment.csv', 'videos/clip2.mp4,0,5000,6000'),
    "segment.csv:3: the segment 5000..6000 (end exclusive) runs past the video's 16 frames",
  )
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'trunc').mkdir()
  (tmp_path / 'trunc' / 'model.safetensors').write_bytes(b'\xff' * 8)
  for encoder, message in (
    ('random:nosuchpreset', "--encoders random:nosuchpreset: unknown preset 'nosuchpreset'"),
    (str(tmp_path / 'none'), 'none: no such directory; expected'),
    (str(tmp_path / 'empty'), 'empty: no committed training checkpoint there'),
    (str(tmp_path / 'trunc'), 'trunc: config.json is missing'),
  ):
    refused('', '', message, encoder=f'random:tiny,{encoder}')
  (tmp_path / 'afile').write_text('')
  refused('', '', 'afile: a file, not a folder', out=tmp_path / 'afile')
  inside = f'afile/out: a file, not a folder (inside {tmp_path / "afile"}, a file)'
  refused('', '', inside, out=tmp_path / 'afile' / 'out')
  assert (
    suite_tool.main(_args(dataset, tmp_path / 'bad', '--selection-cache', str(tmp_path / 'afile')))
    == 2
  )
  assert '--selection-cache' in capsys.readouterr().err


def test_selections_are_read_back_from_the_cache(dataset, tmp_path, monkeypatch):
  from data_pipeline import codec, probe_inputs

  clips = benchmarks.read_video_list(str(dataset / 'test.csv'))
  made = probe_inputs.ClipSampler(clips, 'codec:128', selection_cache=str(tmp_path))
  first = made.sample(1, train=False, rng=np.random.default_rng(0))

  def fail(*args, **kwargs):
    raise AssertionError('the selection was made again')

  monkeypatch.setattr(codec, 'select', fail)
  again = probe_inputs.ClipSampler(clips, 'codec:128', selection_cache=str(tmp_path))
  second = again.sample(1, train=False, rng=np.random.default_rng(0))
  assert np.array_equal(first['patches'], second['patches'])
  assert np.array_equal(first['positions'], second['positions'])


def test_a_video_replaced_at_its_path_gets_a_new_selection(dataset, tmp_path):
  from data_pipeline import probe_inputs

  video = tmp_path / 'clip.mp4'
  shutil.copy(dataset / 'videos' / 'clip0.mp4', video)
  clips = [benchmarks.ProbeClip(str(video), 0)]
  cache = tmp_path / 'selections'

  def positions():
    sampler = probe_inputs.ClipSampler(clips, 'codec:64', selection_cache=str(cache))
    return np.asarray(sampler.selection(0).positions)

  first = positions()
  shutil.copy(dataset / 'videos' / 'clip1.mp4', video)  # re-encoded: another clip, same path
  stat = video.stat()
  os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  second = positions()
  fresh = probe_inputs.ClipSampler(clips, 'codec:64').selection(0).positions
  assert len(os.listdir(cache)) == 2 and np.array_equal(second, fresh)
  assert not np.array_equal(first, second)


def test_suite_refuses_bad_input(dataset, tmp_path, capsys):
  assert suite_tool.main(_args(dataset, tmp_path, '--modes', 'frames:8')) == 2
  assert '--modes' in capsys.readouterr().err
  assert suite_tool.main(_args(dataset, tmp_path, '--benchmarks', 'ssv2')) == 2
  assert '--benchmarks' in capsys.readouterr().err
  bad = ['--config=probe_benchmarks:name=mine', '--encoders', 'random:tiny', '--out', str(tmp_path)]
  assert suite_tool.main(bad) == 2
  assert 'num_classes' in capsys.readouterr().err
  assert suite_tool.main(['--encoders', 'random:tiny']) == 2  # --config and --out missing
  assert 'required' in capsys.readouterr().err
  assert suite_tool.build_parser().prog == 'ove-probe-suite'


def test_recipes_are_the_release_ones(tmp_path):
  module, _ = config_lib.load_experiment('probe_benchmarks')
  config = module.get_config(f'data_root={tmp_path}')
  recipes = {e['name']: e for e in config.benchmarks}
  assert {n: r['num_classes'] for n, r in recipes.items()} == {
    'ssv2': 174,
    'diving48': 48,
    'perception_test': 63,
    'epic_verb': 97,
    'epic_noun': 300,
    'hmdb51': 51,
    'k400': 400,
    'charadesego': 157,
  }
  assert {n: (r['batch_size'], r['epochs']) for n, r in recipes.items()} == {
    'ssv2': (32, 10),
    'diving48': (32, 30),
    'perception_test': (32, 30),
    'epic_verb': (128, 10),
    'epic_noun': (128, 10),
    'hmdb51': (16, 30),
    'k400': (128, 10),
    'charadesego': (128, 10),
  }
  assert recipes['ssv2']['train'] == f'{tmp_path}/ssv2_hevc/ssv2_train_new.csv'
  assert recipes['k400']['test'] == f'{tmp_path}/k400_hevc/val_new.csv'
  assert all(r['learning_rates'] == (1e-4,) for r in recipes.values())
  assert tuple(config.modes) == ('codec:2048', 'codec:4096', 'uniform:8', 'uniform:16')
  assert tuple(config.seeds) == (0, 1, 2) and config.end_learning_rate == 1e-7


def test_video_lists_and_example_sources(tmp_path):
  (tmp_path / 'a.csv').write_text('v/x.mp4,3\n\n/abs/y.mp4,1,10,40\n# note\nz.mp4 2\n')
  clips = benchmarks.read_video_list(str(tmp_path / 'a.csv'))
  assert [(c.video, c.label, c.start, c.end) for c in clips] == [
    (f'{tmp_path}/v/x.mp4', 3, None, None),
    ('/abs/y.mp4', 1, 10, 40),
    (f'{tmp_path}/z.mp4', 2, None, None),
  ]
  assert benchmarks.open_clips(f'list:{tmp_path}/a.csv?root=/r')[0].video == '/r/v/x.mp4'
  (tmp_path / 'bad.csv').write_text('x.mp4,1\ny.mp4,cat\n')
  with pytest.raises(benchmarks.BenchmarkError, match='bad.csv:2'):
    benchmarks.read_video_list(str(tmp_path / 'bad.csv'))
  with pytest.raises(benchmarks.BenchmarkError, match='no such video list'):
    benchmarks.open_clips(str(tmp_path / 'none.csv'))
  # Examples as TFDS (frames arrays) and Hugging Face datasets (path / bytes dicts) give them.
  frames = np.zeros((5, 32, 48, 3), np.uint8)
  examples = [
    {'video': frames, 'label': np.int64(4)},
    {'video': {'path': '/d/v.mp4', 'bytes': None}, 'label': 2},
    {'video': {'bytes': b'123'}, 'label': 0},
  ]
  got = benchmarks.clips_from_examples(examples)
  assert got[0].video.shape == frames.shape and got[0].label == 4
  assert (got[1].video, got[2].video) == ('/d/v.mp4', b'123')
  with pytest.raises(benchmarks.BenchmarkError, match="no field 'action'"):
    benchmarks.clips_from_examples(examples, label='action')
  with pytest.raises(benchmarks.BenchmarkError, match='unknown option'):
    benchmarks.open_clips('hf:/d?splt=train')


def test_a_frames_array_clip_feeds_both_modes():
  from data_pipeline import probe_inputs

  frames = synthetic.make_clip(3, num_frames=16, height=64, width=80, keep_frames=True).frames
  clips = [benchmarks.ProbeClip(frames, 1), benchmarks.ProbeClip(frames, 0, start=2, end=14)]
  for mode, tokens in (('uniform:2', 512), ('codec:128', 128)):
    sampler = probe_inputs.ClipSampler(clips, mode, augment=None)
    for i in range(2):
      sample = sampler.sample(i, train=False, rng=np.random.default_rng(0))
      assert sample['patches'].shape == (tokens, 588) and sample['positions'].shape == (tokens, 3)
  past = [benchmarks.ProbeClip(frames, 1, start=2, end=40, name='list.csv:7')]
  with pytest.raises(ValueError, match="list.csv:7: the segment 2..40 .* the video's 16 frames"):
    probe_inputs.ClipSampler(past, 'uniform:2').sample(0, train=False, rng=None)


def test_a_tfds_video_dataset_is_a_source(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class OveProbeTestVideos(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            'frames': tfds.features.Tensor(shape=(None, 32, 40, 3), dtype=np.uint8),
            'action': tfds.features.Tensor(shape=(), dtype=np.int64),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'test': self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        yield i, {'frames': np.full((6 + i, 32, 40, 3), 40 * i, np.uint8), 'action': i}

  OveProbeTestVideos(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  clips = benchmarks.open_clips(
    f'tfds:ove_probe_test_videos?split=test&data_dir={tmp_path}&video=frames&label=action'
  )
  # (TFDS stores the examples in its own order)
  assert sorted((c.label, c.video.shape[0]) for c in clips) == [(0, 6), (1, 7), (2, 8)]
  from data_pipeline import probe_inputs

  which = [c.label for c in clips].index(2)
  sample = probe_inputs.ClipSampler(clips, 'uniform:2').sample(
    which, train=False, rng=np.random.default_rng(0)
  )
  assert sample['label'] == 2 and np.all(sample['patches'] == 80)
  with pytest.raises(benchmarks.BenchmarkError, match='datasets'):
    benchmarks.open_clips('hf:/nowhere?split=train')  # `datasets` is not installed here
