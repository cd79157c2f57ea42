"""MetricWriter and read_metrics, the peak FLOP/s table and CPU measurement, and the Watchdog."""

import dataclasses
import glob
import json
import math
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ove_jax import metrics as metrics_lib
from ove_jax.metrics import MetricWriter, Watchdog, peak_flops_per_device, read_metrics

# ------------------------------------------------------------------------------------------------
# MetricWriter
# ------------------------------------------------------------------------------------------------


def _lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_writer_jsonl_and_tensorboard(tmp_path):
  workdir = str(tmp_path / 'run')
  with MetricWriter(workdir) as writer:
    writer.write(
      1,
      {
        'video/loss': jnp.float32(2.5),
        'lr': np.float64(1e-3),
        'tokens': np.int64(7),
        'ok': True,
        'grad_norm': float('nan'),
        'max': jnp.array([float('inf')]),
      },
    )
    writer.write(2, {'video/loss': jnp.bfloat16(1.5), 'min': -float('inf')})
    writer.write_text(0, 'config', 'lr: 1e-3')
  lines = _lines(workdir)
  assert lines == [
    {
      'step': 1,
      'video/loss': 2.5,
      'lr': 1e-3,
      'tokens': 7,
      'ok': 1,
      'grad_norm': 'nan',
      'max': 'inf',
    },
    {'step': 2, 'video/loss': 1.5, 'min': '-inf'},
  ]
  assert type(lines[0]['tokens']) is int and type(lines[0]['video/loss']) is float
  events = glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))
  assert len(events) == 1 and os.path.getsize(events[0]) > 0


def test_writer_rejects_non_scalars(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match='not a scalar'):
      writer.write(1, {'loss': np.zeros(3)})
    with pytest.raises(ValueError, match="'step'"):
      writer.write(1, {'step': 3})


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  with MetricWriter(str(workdir), enabled=False) as writer:
    writer.write(1, {'loss': 1.0})
    writer.write_text(1, 'config', 'x')
    writer.flush()
  assert not workdir.exists()


def test_read_metrics_keeps_last_line_of_resumed_steps(tmp_path):
  workdir = str(tmp_path)
  with MetricWriter(workdir) as writer:  # the first run reaches step 3; its checkpoint is at 1
    for step in (1, 2, 3):
      writer.write(step, {'loss': float(step), 'grad_norm': float('nan')})
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 4, "lo')  # killed mid-line
  with MetricWriter(workdir) as writer:  # the resumed run rewrites steps 2 and 3
    for step in (2, 3, 4):
      writer.write(step, {'loss': 10.0 * step, 'grad_norm': float('inf')})
  rows = read_metrics(workdir)
  assert [row['step'] for row in rows] == [1, 2, 3, 4]
  assert [row['loss'] for row in rows] == [1.0, 20.0, 30.0, 40.0]
  assert math.isnan(rows[0]['grad_norm'])
  assert rows[1]['grad_norm'] == math.inf


def test_read_metrics_takes_the_file_and_merges_lines_of_a_step(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  with open(path, 'w') as f:
    f.write(
      '{"step": 5, "loss": 2.0, "lr": 0.1}\n["not", "a", "line"]\n'
      '{"step": 5, "probe/top1": 0.5, "lr": 0.2}\n{"step": 3, "loss": "nan"}\n'
    )
  assert read_metrics(path) == read_metrics(str(tmp_path))
  assert read_metrics(path)[1] == {'step': 5, 'probe/top1': 0.5, 'lr': 0.2}
  merged = read_metrics(path, merge_steps=True)
  assert [row['step'] for row in merged] == [3, 5] and math.isnan(merged[0]['loss'])
  assert merged[1] == {'step': 5, 'loss': 2.0, 'lr': 0.2, 'probe/top1': 0.5}
  with pytest.raises(FileNotFoundError):
    read_metrics(str(tmp_path / 'none'))


# ------------------------------------------------------------------------------------------------
# Peak FLOP/s
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FakeDevice:
  device_kind: str
  platform: str = 'gpu'


@pytest.mark.parametrize(
  'kind, flops',
  [
    ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA H200', 989e12),
    ('NVIDIA A100-SXM4-80GB', 312e12),
    ('NVIDIA A100 80GB PCIe', 312e12),
    ('NVIDIA L4', 121e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5e', 197e12),
    ('TPU v5', 459e12),
    ('TPU v5p', 459e12),
    ('TPU v6 lite', 918e12),
    ('TPU v6e', 918e12),
  ],
)
def test_peak_table(kind, flops):
  peak, source = peak_flops_per_device(FakeDevice(kind, 'tpu' if 'TPU' in kind else 'gpu'))
  assert peak == flops
  assert source.startswith('table:')


@pytest.mark.parametrize('kind', ['NVIDIA L40S', 'NVIDIA H100 NVL', 'TPU v4 lite', 'Some NPU', ''])
def test_peak_unknown_accelerator(kind):
  assert peak_flops_per_device(FakeDevice(kind)) == (0.0, 'unknown: set config.peak_flops')


def test_peak_override_wins():
  assert peak_flops_per_device(FakeDevice('Some NPU'), override=5e14) == (5e14, 'config.peak_flops')
  assert peak_flops_per_device(jax.devices('cpu')[0], override=1e12)[0] == 1e12


def test_peak_measured_on_cpu():
  peak, source = peak_flops_per_device(jax.devices('cpu')[0])
  assert peak > 0
  assert source.startswith('measured fp32 matmul on the host')
  n = len(jax.local_devices(backend='cpu'))
  if n > 1:
    assert f'shared by {n} virtual devices' in source
  # Cached: a second call measures nothing and returns the same number.
  assert peak_flops_per_device(jax.devices('cpu')[-1]) == (peak, source)
  assert metrics_lib._host_flops == pytest.approx(peak * n)


def test_matmul_peak_flops_measures_the_dtype():
  # A 256 matmul takes microseconds: the figure is positive and finite, not a size-free constant.
  small = metrics_lib.matmul_peak_flops('float32', repeats=2, size=256)
  bf16 = metrics_lib.matmul_peak_flops('bfloat16', repeats=2, size=256)
  assert 0 < small < math.inf and 0 < bf16 < math.inf


# ------------------------------------------------------------------------------------------------
# Watchdog
# ------------------------------------------------------------------------------------------------


def test_watchdog_fires_once_on_stall(capfd):
  fired = []
  event = threading.Event()

  def on_timeout():
    fired.append(1)
    event.set()

  with Watchdog(0.1, on_timeout=on_timeout) as watchdog:
    watchdog.kick(step=7)
    assert event.wait(4.0)
    time.sleep(0.3)  # more timeouts pass without a kick: still one report
  err = capfd.readouterr().err
  assert fired == [1]
  assert err.count('Watchdog:') == 1
  assert 'last kicked step: 7' in err and 'timeout 0.1 s' in err
  assert 'most recent call first' in err  # faulthandler's stacks
  assert 'test_watchdog_fires_once_on_stall' in err  # the main thread's frame is in them


def test_watchdog_quiet_while_kicked(capfd):
  fired = []
  with Watchdog(2.0, on_timeout=lambda: fired.append(1)) as watchdog:
    for step in range(20):
      time.sleep(0.02)
      watchdog.kick(step)
  assert not fired
  assert 'Watchdog' not in capfd.readouterr().err


def test_watchdog_rearms_after_kick(capfd):
  event = threading.Event()
  with Watchdog(0.1, on_timeout=event.set) as watchdog:
    assert event.wait(4.0)
    event.clear()
    watchdog.kick(step=3)
    assert event.wait(4.0)
  err = capfd.readouterr().err
  assert 'last kicked step: none yet' in err and 'last kicked step: 3' in err


def test_watchdog_allows_the_first_step_longer(capfd):
  """Until the first kick the first-step limit holds (compilation), then the steady one."""
  event = threading.Event()
  with Watchdog(0.1, first_timeout_seconds=1.0, on_timeout=event.set) as watchdog:
    assert not event.wait(0.6)  # past the steady limit, within the first-step one
    watchdog.kick(step=1)
    start = time.monotonic()
    assert event.wait(4.0)
    assert time.monotonic() - start < 0.9  # the steady limit now, not the first-step one
  err = capfd.readouterr().err
  assert err.count('Watchdog:') == 1 and 'timeout 0.1 s' in err and 'last kicked step: 1' in err
  with Watchdog(0.1, first_timeout_seconds=0.2, on_timeout=event.clear) as watchdog:
    assert watchdog.first_timeout_seconds == 0.2
  with pytest.raises(ValueError, match='first_timeout_seconds'):
    Watchdog(1.0, first_timeout_seconds=-1)


def test_watchdog_disabled():
  with Watchdog(0) as watchdog:
    watchdog.kick(1)
    assert not any(t.name == 'ove-watchdog' for t in threading.enumerate())
  with pytest.raises(ValueError):
    Watchdog(-1)
