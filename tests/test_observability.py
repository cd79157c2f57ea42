"""Observability: the metrics writers chosen by config (jsonl, TensorBoard, wandb offline) in a
short training run and its resume, the input wait of the slowest process, and device memory."""

import glob
import os
import struct
import subprocess
import sys

import pytest

from ove_jax import config as config_lib
from ove_jax import metrics as metrics_lib
from ove_jax import reporter as reporter_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, 'experiments', 'demo_cpu.py')


def wandb_history(path):
  """{step: {key: value}} of the history records in a .wandb run file.

  The file is wandb's header (':W&B', magic, version: 7 bytes) then LevelDB-log records (crc32,
  little-endian length, type; 32 KiB blocks) each holding a protobuf `Record`.
  """
  from wandb.proto import wandb_internal_pb2

  data = open(path, 'rb').read()
  assert data[:4] == b':W&B', path
  block, position, pending, history = 32768, 7, b'', {}
  while position + 7 <= len(data):
    if block - position % block < 7:  # a block's tail too short for a header is padding
      position += block - position % block
      continue
    length, kind = struct.unpack('<HB', data[position + 4 : position + 7])
    pending += data[position + 7 : position + 7 + length]
    position += 7 + length
    if kind in (2, 3):  # FIRST, MIDDLE: the record goes on in the next block
      continue
    record, pending = wandb_internal_pb2.Record.FromString(pending), b''
    if record.WhichOneof('record_type') == 'history':
      # A key with '/' is stored split, in nested_key.
      history[record.history.step.num] = {
        '/'.join(item.nested_key) or item.key: item.value_json for item in record.history.item
      }
  return history


def train(workdir, steps, data_root):
  """The demo's smoke run on the session's built-in data (`builtin_root`)."""
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # the experiment asks for its 8 CPU devices itself
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  env['WANDB_MODE'] = 'offline'  # also set by the config below: either alone keeps it offline
  env.pop('WANDB_API_KEY', None)
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'ove_jax.train',
      f'--config={DEMO}:smoke,workers=0,steps={steps},data_root={data_root}',
      f'--workdir={workdir}',
      '--config.log_every=1',
      '--config.checkpoint_every=2',
      "--config.metrics.writers=('jsonl','tensorboard','wandb')",
      '--config.metrics.wandb_mode=offline',
      '--config.metrics.wandb_name=smoke',
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def test_jsonl_tensorboard_and_offline_wandb_in_a_run_and_its_resume(tmp_path, builtin_root):
  workdir = str(tmp_path / 'run')
  train(workdir, steps=4, data_root=builtin_root)
  run_id = open(os.path.join(workdir, metrics_lib.WANDB_RUN_ID_FILE)).read().strip()
  printed = train(workdir, steps=6, data_root=builtin_root)  # resumes from the checkpoint of step 4
  assert f'wandb:       {os.path.join(workdir, metrics_lib.WANDB_DIR)}' in printed
  assert open(os.path.join(workdir, metrics_lib.WANDB_RUN_ID_FILE)).read().strip() == run_id

  lines = {m['step']: m for m in metrics_lib.read_metrics(workdir)}
  assert sorted(lines) == [1, 2, 3, 4, 5, 6]
  for step in (3, 4, 6):  # the first step of each process compiles and has no rates
    line = lines[step]
    assert 0 <= line['input_wait/mean'] <= line['input_wait/max'] <= 1, line
    assert line['input_wait/slowest_process'] == 0
    assert line['input_wait/max'] == pytest.approx(line['input_wait_fraction'], rel=1e-5)
  assert 'input_wait/max' not in lines[1] and 'input_wait/max' not in lines[5]
  assert not any(k.startswith('memory/') for k in lines[6])  # CPU reports no memory
  assert glob.glob(os.path.join(workdir, metrics_lib.TENSORBOARD_DIR, 'events.out.tfevents.*'))

  # Both processes wrote to the same wandb run (one id), under the workdir, with every loss.
  runs = sorted(glob.glob(os.path.join(workdir, metrics_lib.WANDB_DIR, 'offline-run-*')))
  assert len(runs) == 2 and all(r.endswith('-' + run_id) for r in runs), runs
  history = {}
  for run in runs:
    history.update(wandb_history(os.path.join(run, f'run-{run_id}.wandb')))
  assert sorted(history) == [1, 2, 3, 4, 5, 6]
  for step, line in lines.items():
    assert float(history[step]['loss']) == pytest.approx(line['loss'], rel=1e-6), step
  assert float(history[4]['input_wait/max']) == pytest.approx(lines[4]['input_wait/max'])


class FakeDevice:
  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    return self.stats


def test_device_memory_is_the_fullest_device_and_nothing_where_unreported():
  devices = [
    FakeDevice({'bytes_in_use': 5, 'peak_bytes_in_use': 40, 'bytes_limit': 100}),
    FakeDevice({'bytes_in_use': 30, 'peak_bytes_in_use': 35}),
  ]
  assert metrics_lib.device_memory(devices) == {
    'memory/bytes_in_use': 30,
    'memory/peak_bytes_in_use': 40,
  }
  assert metrics_lib.device_memory([FakeDevice(None), FakeDevice({})]) == {}
  assert metrics_lib.device_memory() == {}  # the CPU devices of the tests report None


def run_reporter(tmp_path, steps: dict, *, log_every: int, wait: float = 0.0) -> None:
  """A StepReporter (jsonl only) fed one finished step per entry of `steps` (step -> extra
  scalars besides the loss, norms and counts), as the trainer feeds it."""
  import jax
  import jax.numpy as jnp

  reporter = reporter_lib.StepReporter(
    str(tmp_path),
    total_steps=max(steps),
    log_every=log_every,
    start=0,
    peak_per_device=0.0,
    devices=1,
    checkpoints=str(tmp_path),
    main_process=True,
    writers=('jsonl',),
  )
  cpu = jax.devices('cpu')[0]
  for step, extra in steps.items():
    scalars = {'loss': 1.0, 'param_norm': 2.0, 'clips': 4.0, 'tokens': 64.0, 'skipped': 0.0}
    device_metrics = {
      k: jax.device_put(jnp.float32(v), cpu) for k, v in {**scalars, **extra}.items()
    }
    reporter.finish(reporter_lib.StepResult(step, device_metrics, wait=wait, seconds=1.0))
  reporter.close()


def test_reporter_logs_device_memory_where_the_backend_reports_it(tmp_path, monkeypatch):
  import jax

  monkeypatch.setattr(
    jax,
    'local_devices',
    lambda *a, **k: [FakeDevice({'bytes_in_use': 7 << 20, 'peak_bytes_in_use': 9 << 20})],
  )
  run_reporter(tmp_path, {1: {}, 2: {}}, log_every=1, wait=0.25)
  lines = metrics_lib.read_metrics(str(tmp_path))
  assert lines[1]['memory/bytes_in_use'] == 7 << 20
  assert lines[1]['memory/peak_bytes_in_use'] == 9 << 20
  assert lines[1]['input_wait/max'] == lines[1]['input_wait/mean'] == pytest.approx(0.25)
  assert not os.path.exists(os.path.join(tmp_path, metrics_lib.TENSORBOARD_DIR))  # not chosen


@pytest.mark.parametrize(
  'writers, message',
  [
    ("('jsonl','mlflow')", "unknown writer(s) ['mlflow']; known: jsonl, tensorboard, wandb"),
    ('()', 'a non-empty tuple of names'),
    ("('jsonl','jsonl')", 'names a writer twice'),
  ],
)
def test_writer_names_are_checked_with_the_config(writers, message):
  c = config_lib.load(DEMO + ':smoke')
  config_lib.apply_override(c, f'metrics.writers={writers}')
  with pytest.raises(config_lib.ConfigError, match='metrics.writers') as e:
    config_lib.validate(c)
  assert message in str(e.value)
  with pytest.raises(ValueError, match='mlflow'):
    metrics_lib.MetricWriter('/nonexistent', writers=('mlflow',))


def test_positives_dropped_between_metrics_lines_are_summed_and_warned(tmp_path, caplog):
  drops = {1: 0.0, 2: 5.0, 3: 0.0, 4: 0.0, 5: 0.0, 6: 0.0}  # only at step 2, not a logged one
  run_reporter(tmp_path, {step: {'ocr/dropped': d} for step, d in drops.items()}, log_every=3)
  lines = {line['step']: line for line in metrics_lib.read_metrics(str(tmp_path))}
  assert sorted(lines) == [3, 6]
  assert lines[3]['ocr/dropped'] == 5.0 and lines[6]['ocr/dropped'] == 0.0
  warnings = [r.getMessage() for r in caplog.records if 'left out of the loss' in r.getMessage()]
  assert (
    len(warnings) == 1
    and warnings[0].startswith('step 2: ')
    and "'ocr/dropped': 5.0" in warnings[0]
  )
