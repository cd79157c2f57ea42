"""Experiment files: every named argument validates, the release's numbers are what the configs
say, overrides apply, bad keys and values are named, and a stage-2 smoke run trains end to end."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest

from ove_jax import config as config_lib
from ove_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every experiment file with the argument strings its docstring names.
ARGUMENTS = {
  'demo_cpu.py': ['', 'smoke', 'steps=5,workers=0', 'codec=1,uniform=0,collage=0'],
  'stage1_image.py': ['', 'smoke', 'paper', 'paper,batch=4096', 'samples=1e6,blocks=512'],
  'stage2_video.py': [
    '',
    'smoke',
    'paper',
    'gpus=8',
    'gpus=256,fsdp=16',
    'init=/ckpt/stage1,heads=keep',
    'smoke,steps=2',
  ],
  'huge.py': ['', 'smoke', 'gpus=512,fsdp=32', 'gpus=8,fsdp=8'],
  'ablations.py': [
    '',
    'smoke',
    'smoke,study=budget,steps=3,workers=0',
    'study=rope,gpus=8',
    'budget=1024,policy=paper',
  ],
  # Probe recipes for ove-probe-suite (PROBE_SUITE = True), not trainer configs.
  'probe_benchmarks.py': [
    '',
    'smoke',
    'data_root=/data/ap',
    'name=hmdb51,seeds=1',
    'name=mine,train=/d/t.csv,test=/d/v.csv,num_classes=5',
  ],
}
PROBE_EXPERIMENTS = ('probe_benchmarks.py',)
CASES = [
  (name, arg) for name, args in ARGUMENTS.items() for arg in args if name not in PROBE_EXPERIMENTS
]
PROBE_CASES = [(name, arg) for name in PROBE_EXPERIMENTS for arg in ARGUMENTS[name]]


def _path(name):
  return os.path.join(REPO, 'experiments', name)


def _get(name, arg=''):
  return config_lib.load_module(_path(name)).get_config(arg or None)


def test_every_experiment_file_is_covered():
  found = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, 'experiments', '*.py'))}
  assert found == set(ARGUMENTS)
  assert {f'{name}.py' for name in config_lib.experiment_names()} == found


def test_experiments_resolve_by_name_and_by_path_from_any_directory(tmp_path, monkeypatch):
  by_path = config_lib.flatten(config_lib.load(f'{_path("stage2_video.py")}:gpus=64'))
  assert by_path['accumulate'] == 8
  monkeypatch.chdir(tmp_path)  # no experiments/ here: names and README's spelling still resolve
  for spec in (
    'stage2_video:gpus=64',
    'stage2_video.py:gpus=64',
    'experiments/stage2_video.py:gpus=64',
    './experiments/stage2_video.py:gpus=64',
  ):
    assert config_lib.flatten(config_lib.load(spec)) == by_path, spec
  shipped = config_lib.experiment_path('stage2_video')
  assert os.path.samefile(shipped, _path('stage2_video.py'))
  assert config_lib.split_spec('huge:gpus=8,fsdp=8') == (
    config_lib.experiment_path('huge'),
    'gpus=8,fsdp=8',
  )


def test_a_file_given_by_path_wins_and_may_build_on_a_shipped_experiment(tmp_path, monkeypatch):
  mine = tmp_path / 'experiments' / 'demo_cpu.py'  # shadows the shipped name, by path only
  mine.parent.mkdir()
  mine.write_text(
    'from ove_jax import config as config_lib\n'
    "demo = config_lib.load_module(config_lib.experiment_path('demo_cpu'))\n"
    'def get_config(arg=None):\n'
    '  c = demo.get_config(arg)\n'
    '  c.total_steps = 7\n'
    '  return c\n'
  )
  monkeypatch.chdir(tmp_path)
  assert config_lib.load('experiments/demo_cpu.py:smoke').total_steps == 7
  assert config_lib.load(f'{mine}:smoke').total_steps == 7
  assert config_lib.load('demo_cpu:smoke').total_steps == _get('demo_cpu.py', 'smoke').total_steps
  assert config_lib.load('demo_cpu:smoke').total_steps != 7


@pytest.mark.parametrize('spec', ['stage3_video', 'experiments/nope.py:smoke', 'elsewhere/x.py'])
def test_unknown_experiment_lists_the_shipped_ones(spec, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(spec)
  message = str(e.value)
  assert f'--config={spec.partition(":")[0]}: no experiment file' in message
  for name in ARGUMENTS:
    assert name[:-3] in message
  assert '--config=path/to/exp.py' in message


@pytest.mark.parametrize('name', ['mycfg', 'notes.txt'])
def test_an_experiment_file_without_py_extension_loads(name, tmp_path, capsys):
  path = tmp_path / name
  path.write_text(open(_path('demo_cpu.py')).read())
  config = config_lib.load(f'{path}:smoke', ['total_steps=7'])
  assert config.total_steps == 7
  assert config.model.preset == _get('demo_cpu.py', 'smoke').model.preset
  # Not Python: the config error of any broken file, naming it.
  path.write_text('just some notes\n')
  assert train.main([f'--config={path}', f'--workdir={tmp_path / "run"}']) == 2
  err = capsys.readouterr().err
  assert f'{path} cannot be loaded: SyntaxError' in err and 'Traceback' not in err, err


@pytest.mark.parametrize(
  'source, message',
  [
    ('def get_config(arg):\n  return (\n', 'cannot be loaded: SyntaxError'),
    ('import no_such_module_here\n', "cannot be loaded: ModuleNotFoundError: No module named 'no_"),
    ('def get_config(arg):\n  raise KeyError(arg)\n', "get_config('x') failed: KeyError: 'x'"),
  ],
)
def test_a_broken_experiment_file_is_a_config_error(source, message, tmp_path, capsys):
  path = tmp_path / 'broken.py'
  path.write_text(source)
  assert train.main([f'--config={path}:x', f'--workdir={tmp_path / "run"}']) == 2
  err = capsys.readouterr().err
  assert str(path) in err and message in err, err
  assert 'Traceback' not in err and not (tmp_path / 'run').exists()


def test_cli_resolves_a_name_outside_the_checkout(tmp_path):
  # A config error about an override means the experiment was found and built first.
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'ove_jax.train',
      '--config=demo_cpu:smoke',
      f'--workdir={tmp_path / "run"}',
      '--config.optim.nope=1',
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2, proc.stderr
  assert "config error: --config.optim.nope: optim has no key 'nope'" in proc.stderr


@pytest.mark.parametrize('name, arg', CASES, ids=[f'{n[:-3]}:{a or "default"}' for n, a in CASES])
def test_named_arguments_validate(name, arg):
  c = _get(name, arg)
  config_lib.validate(c)
  devices = c.cpu_devices if c.cpu_devices else _gpus(name, arg)
  # What the trainer checks against the devices: the mesh, rows per batch shard, class blocks.
  data, fsdp, _ = train.mesh_shape(c, devices)
  for h in c.data.heads.values():
    assert h.rows % (data * fsdp) == 0
  for head in c.heads:
    config_lib.head_loss_config(c, head).check_devices(devices, head)
  if 'smoke' in arg:
    assert c.model.preset == ('huge_smoke' if name == 'huge.py' else 'tiny')
    assert c.builtin.enabled and c.cpu_devices == 8
    assert c.total_steps <= 20
  else:
    assert not c.builtin.enabled or name == 'demo_cpu.py'


@pytest.mark.parametrize(
  'name, arg', PROBE_CASES, ids=[f'{n[:-3]}:{a or "default"}' for n, a in PROBE_CASES]
)
def test_probe_recipes_load_and_are_refused_as_training_runs(name, arg):
  c = _get(name, arg)
  assert c.benchmarks and tuple(c.modes) and tuple(c.seeds)
  for entry in c.benchmarks:
    assert entry['num_classes'] > 1 and entry['batch_size'] >= 1 and entry['epochs'] >= 1
    assert entry['train'] and entry['test'] and entry['learning_rates']
  if 'smoke' in arg:
    assert all(e['epochs'] == 1 for e in c.benchmarks) and tuple(c.seeds) == (0,)
  with pytest.raises(config_lib.ConfigError, match='ove-probe-suite'):
    config_lib.load(f'{_path(name)}:{arg}' if arg else _path(name))


def _gpus(name, arg):
  a = dict(item.split('=') for item in arg.split(',') if '=' in item)
  return int(a.get('gpus', {'stage1_image.py': 8, 'huge.py': 256}.get(name, 128)))


def _global_batch(c):
  return sum(h.rows for h in c.data.heads.values()) * c.accumulate


def test_demo_video_modes_are_the_release_mix_at_an_equal_token_count():
  c = _get('demo_cpu.py')
  video = c.data.heads.video
  assert tuple(video.video_modes) == (0.5, 0.375, 0.125)  # codec, uniform, collage
  assert video.num_frames * 256 == c.builtin.budget == video.tokens_per_row  # 2 frames = 512
  assert tuple(_get('demo_cpu.py', 'codec=1,uniform=0,collage=0').data.heads.video.video_modes) == (
    1.0,
    0.0,
    0.0,
  )
  with pytest.raises(config_lib.ConfigError, match="video modes' weights"):
    _get('demo_cpu.py', 'codec=0,uniform=0,collage=0')


def test_stage1_release_values():
  c = _get('stage1_image.py')
  assert (c.model.preset, c.model.dtype) == ('base', 'bfloat16')
  o = c.optim
  assert (o.lr, o.warmup, o.weight_decay, o.decay, o.clip_norm) == (1e-3, 0.1, 0.05, 'linear', 5.0)
  assert (o.b1, o.b2, o.eps) == (0.9, 0.999, 1e-8)
  assert c.heads.image.num_classes == 2_000_000
  h = c.data.heads.image
  assert (h.rows, h.tokens_per_row, h.max_segments, h.num_labels, h.resolution) == (
    1024,
    256,
    1,
    10,
    224,
  )
  assert (h.crop, h.flip_prob) == ('random_resized', 0.5)
  assert c.total_steps == 12_695_312  # round(13e9 / 1024), as the docstring says
  paper = _get('stage1_image.py', 'paper,batch=2048')
  assert (paper.model.preset, paper.optim.weight_decay) == ('large', 0.2)
  assert paper.data.heads.image.rows == 2048 and paper.total_steps == round(13e9 / 2048)


def test_stage2_release_values():
  c = _get('stage2_video.py')
  assert (c.model.preset, c.model.dtype, c.model.remat) == ('large', 'bfloat16', 'full')
  assert (c.optim.lr, c.optim.warmup, c.optim.weight_decay) == (5e-5, 1e-4, 0.05)
  assert _get('stage2_video.py', 'paper').optim.lr == 1e-4
  assert {n: h.num_classes for n, h in c.heads.items()} == {
    'image': 2_000_000,
    'ocr': 365_187,
    'video': 400_000,
  }
  rows = {n: h.rows for n, h in c.data.heads.items()}
  assert rows == {'image': 16 * 128, 'ocr': 8 * 128, 'video': 16 * 128}
  assert c.accumulate == 4 and _global_batch(c) == 20_480
  assert (c.mesh.data, c.mesh.fsdp) == (-1, 8) and c.loss.sampling_blocks == 1024
  d = c.data.heads
  assert (d.image.resolution, d.image.tokens_per_row, d.image.num_labels) == (448, 1024, 10)
  assert (d.ocr.resolution, d.ocr.crop, d.ocr.flip_prob, d.ocr.num_labels) == (
    448,
    'centre',
    0.0,
    100,
  )
  assert (d.video.tokens_per_row, d.video.num_frames, tuple(d.video.video_modes)) == (
    2048,
    8,
    (0.5, 0.375, 0.125),
  )
  # Fewer GPUs keep the global batch by accumulating more.
  eight = _get('stage2_video.py', 'gpus=8')
  assert eight.accumulate == 64 and _global_batch(eight) == 20_480
  init = _get('stage2_video.py', 'init=/ckpt/stage1,heads=keep')
  assert (init.init.checkpoint, init.init.heads) == ('/ckpt/stage1', 'keep')


def test_huge_is_stage2_on_the_huge_preset():
  c = _get('huge.py')
  assert (c.model.preset, c.mesh.fsdp, c.accumulate) == ('huge', 16, 2)
  assert _global_batch(c) == 20_480
  stage2 = _get('stage2_video.py')
  assert c.optim.to_dict() == stage2.optim.to_dict()
  assert set(c.data.heads) == set(stage2.data.heads)


def test_batch_that_does_not_split_is_refused():
  with pytest.raises(config_lib.ConfigError, match=r'batch=1000 is not a multiple of the 5120'):
    config_lib.load(f'{_path("stage2_video.py")}:batch=1000')


def test_overrides_apply():
  c = config_lib.load(
    f'{_path("stage2_video.py")}:smoke',
    ['optim.lr=0.5', 'data.heads.video.rows=16', 'model.remat=full'],
  )
  assert (c.optim.lr, c.data.heads.video.rows, c.model.remat) == (0.5, 16, 'full')


def test_unknown_override_key_names_the_key_and_the_section_keys():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(f'{_path("stage1_image.py")}:smoke', ['optim.nope=1'])
  message = str(e.value)
  assert 'optim.nope' in message and "'nope'" in message
  for key in ('b1', 'clip_norm', 'lr', 'warmup', 'weight_decay'):
    assert key in message


@pytest.mark.parametrize(
  'override, allowed',
  [
    ('model.preset=giant', ('model.preset', 'giant', 'base', 'huge', 'large', 'tiny')),
    ('optim.decay=step', ('optim.decay', 'step', 'linear', 'cosine', 'constant')),
  ],
)
def test_bad_values_name_the_key_and_the_allowed_values(override, allowed):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(f'{_path("stage2_video.py")}:smoke', [override])
  for word in allowed:
    assert word in str(e.value)


def test_unknown_experiment_argument_lists_the_allowed_ones():
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(f'{_path("huge.py")}:gpu=8')
  message = str(e.value)
  assert "unknown experiment argument 'gpu'" in message
  for arg in (
    'smoke=False',
    'paper=False',
    'gpus=256',
    'fsdp=16',
    'batch=20480',
    'init=',
    'heads=',
  ):
    assert arg in message


def test_cli_config_error_exits_2_without_traceback(tmp_path, run_trainer):
  proc, _ = run_trainer(
    '--config=experiments/demo_cpu.py:smoke',
    f'--workdir={tmp_path / "run"}',
    '--config.optim.nope=1',
    timeout=60,
  )
  assert proc.returncode == 2, proc.stderr
  assert "config error: --config.optim.nope: optim has no key 'nope'" in proc.stderr
  assert 'Traceback' not in proc.stderr + proc.stdout
  assert not os.path.exists(tmp_path / 'run')  # refused before anything started


def test_stage2_smoke_trains_end_to_end(tmp_path, builtin_root, run_trainer):
  # Every head (image, OCR, video in all three modes) with 2 accumulated micro-batches, 3 steps
  # on 8 virtual CPU devices: about 35 s here (plus 6 s when it makes the built-in data).
  workdir = tmp_path / 'stage2'
  proc, seconds = run_trainer(
    f'--config=experiments/stage2_video.py:smoke,data_root={builtin_root}', f'--workdir={workdir}'
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'metrics.jsonl') as f:
    lines = [json.loads(line) for line in f]
  assert lines and all('step' in line and 'loss' in line for line in lines)
  assert lines[-1]['step'] == 3
  for head in ('image', 'ocr', 'video'):
    assert lines[-1][f'{head}/dropped'] == 0
  assert os.path.isdir(workdir / 'checkpoints' / '3')
  print(f'stage2 smoke: {seconds:.1f} s')


def test_huge_smoke_is_huge_at_a_cpu_width(tmp_path, builtin_root, run_trainer):
  c, full = _get('huge.py', 'smoke'), _get('huge.py')
  small, huge = train.encoder_config(c), train.encoder_config(full)
  assert (small.head_dim, small.mlp_dim / small.width) == (huge.head_dim, huge.mlp_dim / huge.width)
  assert small.depth == math.ceil(huge.depth * small.width / huge.width) and small.scan_layers
  assert (
    (c.model.dtype, c.model.remat) == (full.model.dtype, full.model.remat) == ('bfloat16', 'full')
  )
  assert c.mesh.fsdp > c.mesh.data > 1 and full.mesh.fsdp == 16
  assert c.loss.sample_rate == full.loss.sample_rate == 0.1
  assert set(c.heads) == set(full.heads) and c.accumulate == full.accumulate == 2
  workdir = tmp_path / 'huge'
  proc, seconds = run_trainer(
    f'--config=huge:smoke,data_root={builtin_root}', f'--workdir={workdir}'
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'metrics.jsonl') as f:
    lines = [json.loads(line) for line in f]
  assert [line['step'] for line in lines if 'loss' in line] == [1, 2, 3]
  assert all(math.isfinite(line['loss']) for line in lines if 'loss' in line)
  for head in ('image', 'ocr', 'video'):
    assert lines[-1][f'{head}/dropped'] == 0
  assert os.path.isdir(workdir / 'checkpoints' / '3')
  print(f'huge smoke: {seconds:.1f} s')
