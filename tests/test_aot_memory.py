"""tools/aot_memory.py: the compiled step's per-device memory, from abstract inputs only.

Two compiles of the demo config: on one device from the command line (a subprocess: the CLI
contract), and on 8 devices in-process (conftest has started JAX with 8 CPU devices; the tool
takes the first N of them). Bad input never compiles.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from ove_jax import config as config_lib
from ove_jax import memory
from ove_jax.models import EncoderConfig, num_params
from ove_jax_tools import aot_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, 'experiments', 'demo_cpu.py')
# Class counts no other dimension of the tiny model has (the demo's own may equal a head size):
# 997 and 601 classes, padded to 8 sampling blocks: 1000 and 608.
CLASSES = ('--config.heads.video.num_classes=997', '--config.heads.image.num_classes=601')
CLASSES_OVERRIDES = tuple(flag.removeprefix('--config.') for flag in CLASSES)
KEYS = (
  'devices',
  'mesh',
  'params_bytes',
  'optimizer_bytes',
  'temp_bytes',
  'total_bytes',
  'flops_per_step',
  'fits',
  'max_buffer_elements',
  'batch_by_classes_buffer',
)

jax.devices()  # the backend starts here with conftest's 8 devices; the tool then takes N of them


def cli(*argv, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)  # the tool sets its own device count
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, 'tools', 'aot_memory.py'), *argv],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def last_json(out):
  return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def one_device():
  """The demo on one device, from the command line: the loss runs unsharded there and, with the
  demo's sample_rate 1, scores every class of the batch."""
  proc = cli(f'--config={DEMO}', '--devices=1', '--mesh=1,1,1', *CLASSES)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, last_json(proc.stdout)


@pytest.fixture(scope='module')
def eight_devices():
  """The demo on 8 devices with its own mesh (data=-1 x fsdp=2), in-process."""
  import contextlib
  import io

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = aot_memory.main([f'--config={DEMO}', '--devices=8', '--device-memory=0.001', *CLASSES])
  assert code == 0
  return out.getvalue(), last_json(out.getvalue())


def test_one_device_exact_params_and_finds_the_unsharded_logits(one_device):
  out, r = one_device
  assert all(k in r for k in KEYS), sorted(r)
  assert r['devices'] == 1 and r['mesh'] == {'data': 1, 'fsdp': 1, 'tensor': 1}
  config = config_lib.load(DEMO, [c[len('--config.') :] for c in CLASSES])
  cfg = EncoderConfig.preset(config.model.preset)
  heads = {name: config_lib.head_loss_config(config, name) for name in config.heads}
  # Every parameter on the one device, float32: the encoder's and each head's padded centres.
  want = 4 * (num_params(cfg) + sum(h.padded_classes * cfg.width for h in heads.values()))
  assert r['params_bytes'] == want
  assert 2 * want <= r['optimizer_bytes'] < 2 * want + 1024  # AdamW's moments + counters
  assert r['total_bytes'] >= r['params_bytes'] + r['optimizer_bytes'] + r['temp_bytes'] > 0
  # Unsharded, the loss holds [slots, batch, classes] logits: the check must see them.
  assert r['batch_by_classes_buffer'] is True and r['batch_by_classes_unchecked'] == []
  for name, h in heads.items():
    found = memory.hlo_shapes(' '.join(r['batch_by_classes_shapes'][name]))
    assert found and all(h.padded_classes in dims for _, dims in found), found
  assert 'batch x classes buffers FOUND' in out


def test_eight_devices_shard_params_and_logits(one_device, eight_devices):
  _, one = one_device
  out, r = eight_devices
  assert all(k in r for k in KEYS), sorted(r)
  # The config's data=-1: the device count decides it.
  assert r['devices'] == 8 and r['mesh'] == {'data': 4, 'fsdp': 2, 'tensor': 1}
  # fsdp halves the encoder's matrices, the centres are split over all 8 devices.
  assert r['params_bytes'] < 0.6 * one['params_bytes']
  assert r['optimizer_bytes'] < 0.6 * one['optimizer_bytes']
  assert r['batch_bytes'] * 8 == one['batch_bytes']  # rows over data x fsdp = 8 shards
  assert r['total_bytes'] >= r['params_bytes'] + r['optimizer_bytes'] + r['temp_bytes']
  assert r['batch_by_classes_buffer'] is False and r['batch_by_classes_shapes'] == {}
  assert r['batch_by_classes_unchecked'] == []
  assert 'no batch x classes buffer' in out
  assert r['flops_per_step'] == one['flops_per_step'] > 0  # the same global batch
  assert r['max_buffer_elements'] > 0 and r['max_buffer_shape']
  assert r['fits'] == {
    'H100 80GB': True,
    'H200 141GB': True,
    'TPU v5p 95GB': True,
    'custom 0.001GB': False,
  }
  assert r['heads']['video'] == {'classes': 997, 'padded_classes': 1000, 'per_device_classes': 125}


def test_class_dimension_is_called_sharded_only_when_split(eight_devices):
  out, r = eight_devices
  assert 'no batch x classes buffer on any device (class dimension sharded)' in out
  # The same report on one device: every class on it, so nothing is sharded.
  heads = {k: dict(h, per_device_classes=h['padded_classes']) for k, h in r['heads'].items()}
  mesh = {'data': 1, 'fsdp': 1, 'tensor': 1}
  text = '\n'.join(memory.report_lines(dict(r, devices=1, mesh=mesh, heads=heads), 'demo'))
  assert 'no batch x classes buffer on any device (one device holds every class' in text
  assert 'class dimension sharded' not in text


def test_the_plan_is_of_the_accelerators_program(monkeypatch):
  """Virtual CPU devices model the target's accelerators: the step is built and traced with plain
  autodiff, not the CPU backend's own backward layouts (models/cpu_layouts.py), which are back
  on afterwards."""
  from ove_jax import train
  from ove_jax.models import cpu_layouts

  class Built(Exception):
    pass

  seen = []

  def program(*args, **kwargs):
    seen.append(cpu_layouts.enabled())
    raise Built  # what the step is traced under is known here; no need to compile it

  monkeypatch.setattr(train, 'Program', program)
  assert cpu_layouts.enabled()  # this process runs on the CPU backend with the layouts on
  with pytest.raises(Built):
    memory.analyse(config_lib.load(DEMO, CLASSES_OVERRIDES), 8)
  assert seen == [False] and cpu_layouts.enabled()


def test_batch_by_class_shapes_reads_hlo_shapes():
  text = (
    '%a = f32[3,8,56]{2,1,0} fusion(...), %b = bf16[8,256,2,56]{3,2,1,0} dot(...), '
    '%c = pred[56,8]{1,0} compare(...), %d = f32[1,56]{1,0} x, %e = s32[] constant(0)'
  )
  shapes = memory.hlo_shapes(text)
  assert ('s32', ()) in shapes and ('f32', (3, 8, 56)) in shapes
  # Adjacent batch and class dimensions only; a batch of one is no batch.
  assert memory.batch_by_class_shapes(shapes, {8, 1}, {56}) == ['f32[3,8,56]', 'pred[56,8]']
  assert memory.batch_by_class_shapes(shapes, {8}, {53}) == []
  assert memory.largest_buffer(shapes) == (
    8 * 256 * 2 * 56,
    2 * 8 * 256 * 2 * 56,
    'bf16[8,256,2,56]',
  )


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--devices=8', '--mesh=4,4,1'], '--mesh: mesh data=4 x fsdp=4 x tensor=1 needs 16 devices'),
    (['--devices=8', '--mesh=3,-1,1'], '--mesh: mesh data=3 x fsdp=-1 x tensor=1: the fixed'),
    (['--devices=8', '--mesh=2,2,2,2'], "--mesh=2,2,2,2: mesh '2,2,2,2': expected data=4"),
    (['--devices=8', '--mesh', '-1,3,1'], 'the fixed sizes (3) do not divide the 8 devices'),
    (['--devices=8', '--mesh=4x4'], '--mesh: mesh data=4 x fsdp=4 x tensor=1 needs 16 devices'),
    (['--devices=0'], '--devices=0: give the number of devices, 1 or more'),
    (['--devices=8', '--config.optim.lrr=1'], '--config: --config.optim.lrr: optim has no key'),
    (
      ['--devices=8', '--config.heads.video.sampling_blocks=4'],
      'sampling_blocks=4 is not a multiple of the 8 devices',
    ),
    (['--devices=16', '--platform=native'], 'this machine has 8 cpu device(s)'),
  ],
)
def test_bad_input_is_one_line_and_status_2(capsys, argv, message):
  code = aot_memory.main([f'--config={DEMO}', *argv])
  out, err = capsys.readouterr()
  assert code == 2 and not out
  assert err.startswith('error: ') and message in err and err.count('\n') == 1, err


def test_command_line_names_a_missing_experiment():
  proc = cli('--config=experiments/nope.py', '--devices=4')
  assert proc.returncode == 2 and proc.stderr.startswith('error: --config')
  assert 'no experiment file' in proc.stderr and 'Traceback' not in proc.stderr


def test_a_folder_as_experiment_is_named_a_folder(tmp_path, capsys):
  assert aot_memory.main([f'--config={tmp_path}:smoke', '--devices=8']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: --config') and err.count('\n') == 1, err
  assert f"'{tmp_path}' is a folder, not an experiment file" in err
  assert f'--config={tmp_path / "NAME.py"}[:args]' in err


@pytest.mark.parametrize(
  'experiment,devices,limit_gb',
  [('stage2_video', 64, 80.0), ('huge', 256, 95.0)],
)
def test_release_sized_plans_fit_with_the_defaults(experiment, devices, limit_gb):
  # The issue's limits for the runs the experiments exist for (scanned blocks, the experiments'
  # remat and accumulation): an 80 GB GPU for stage 2 on 64 devices, a TPU v5p for huge on 256.
  # 15 s each on a quiet 2-core machine; ten times that on a loaded one.
  proc = cli(f'--config={experiment}', f'--devices={devices}', timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = last_json(proc.stdout)
  assert r['devices'] == devices and r['batch_by_classes_buffer'] is False
  assert 0 < r['total_bytes'] <= limit_gb * 1e9, r['total_bytes'] / 1e9
