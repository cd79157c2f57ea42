"""The encoder bench's figures (ove_jax.benchmarks): the sparse speedup by wall, user and
user + system time with a verdict per measure, the CPU-time formatting, and CPU time measured
finer than clock ticks."""

import dataclasses
import json
import mmap

import numpy as np
import pytest

from ove_jax import benchmarks, host_runtime, torch_comparison


def _row(median_s, user_s, sys_s, flops):
  return {'median_s': median_s, 'user_s': user_s, 'sys_s': sys_s, 'flops': flops, 'tokens': 1}


def test_sparse_speedup_per_measure():
  rows = {
    'JAX sparse': _row(0.1, 0.16, 0.02, 8e9),
    'JAX dense': _row(4.0, 8.0, 0.4, 400e9),
  }
  summary = benchmarks.sparse_speedup(rows)
  np.testing.assert_allclose(summary['speedup_analytic'], 50.0)
  np.testing.assert_allclose(summary['speedup_measured'], 40.0)
  np.testing.assert_allclose(summary['speedup_fraction'], 0.8)
  np.testing.assert_allclose(summary['speedup_user'], 50.0)
  np.testing.assert_allclose(summary['speedup_user_fraction'], 1.0)
  np.testing.assert_allclose(summary['speedup_cpu'], 8.4 / 0.18)
  np.testing.assert_allclose(summary['speedup_cpu_fraction'], 8.4 / 0.18 / 50)
  wall, user, cpu = benchmarks.speedup_verdicts(summary)
  assert wall.startswith('- by wall time: 40.00x = 80.0%') and wall.endswith('NOT met)')
  assert user.startswith('- by user CPU time: 50.00x = 100.0%') and user.endswith(': met)')
  assert cpu.startswith('- by user+sys CPU time: 46.67x = 93.3%') and cpu.endswith(': met)')


def test_sparse_speedup_without_cpu_times_or_dense_case():
  rows = {'JAX sparse': _row(0.1, 0, 0, 8e9), 'JAX dense': _row(4.0, 0, 0, 400e9)}
  for row in rows.values():
    del row['user_s'], row['sys_s']
  summary = benchmarks.sparse_speedup(rows)
  assert set(summary) == {'speedup_analytic', 'speedup_measured', 'speedup_fraction'}
  assert len(benchmarks.speedup_verdicts(summary)) == 1
  assert benchmarks.sparse_speedup({'JAX sparse': rows['JAX sparse']}) == {}


def test_markdown_summary_gives_every_verdict():
  rows = {
    'JAX sparse': _row(0.1, 0.16, 0.02, 8e9),
    'JAX dense': _row(4.0, 8.0, 0.4, 400e9),
  }
  for row in rows.values():
    row.update(flops_per_s=1e9, peak_fraction=0.5, compile_s=1.0)
  setting = benchmarks.BenchSetting(
    command='ove-bench-encoder',
    info={'backend': 'cpu', 'device_kind': 'cpu', 'cpu_count': 2, 'jax': 'x'},
    tuning='host tuning: off',
    preset='micro',
    cfg=benchmarks.encoder_config('micro'),
    batch=1,
    frames=64,
    repeats=3,
    peak=1e11,
  )
  lines = benchmarks.markdown_summary(
    setting,
    rows,
    benchmarks.sparse_speedup(rows),
    [],
    {'dense': None, 'torch': 'skipped (--skip-torch)'},
  )
  text = '\n'.join(lines)
  assert '| JAX sparse | 1 | 8.0 | 100.0 ms |' in text and '| 0.160 + 0.020 |' in text
  assert '| 8.00 + 0.400 |' in text
  for label in ('wall time', 'user CPU time', 'user+sys CPU time'):
    assert f'- by {label}: ' in text

  # The side-by-side table: CPU time and page faults per step of each, warm-up rounds per width.
  def side(median, user, sys, faults):
    return {
      'median_s': median,
      'user_s': user,
      'sys_s': sys,
      'page_faults': faults,
      'warmup_rounds': 3,
    }

  torch_row = {
    **side(1.2, 2.4, 0.0, 1),
    'version': '2',
    'device': 'cpu',
    'threads': 2,
    'attention': 'eager',
  }
  comparison = {
    'width': 512,
    'depth': 2,
    'heads': 8,
    'mlp': 2048,
    'jax': side(1.0, 2.0, 0.5, 170000.0),
    'torch': torch_row,
    'speed': 1.2,
    'speed_min': 1.1,
    'speed_max': 1.3,
    'speed_cpu': 0.96,
    'check': {'agree': True, 'grad_max_rel_diff': 3e-6},
  }
  text = '\n'.join(
    benchmarks.markdown_summary(setting, rows, {}, [comparison], {'dense': 'x', 'torch': None})
  )
  assert 'alternated 3 times after 3 warm-up rounds' in text
  assert '| 1.20x [1.10, 1.30] | 0.96x | 2.00 + 0.500 | 2.40 + 0.000 | 170000, 1 | yes' in text
  assert 'Slowest width: 1.20x the PyTorch speed (aim >= 1x: met; target 1.5x: not met)' in text
  assert 'in PyTorch' not in text
  # PyTorch's own matmul peak, when measured, is printed beside JAX's.
  with_torch = dataclasses.replace(setting, torch_peak=1.25e11)
  text = '\n'.join(
    benchmarks.markdown_summary(with_torch, rows, {}, [comparison], {'dense': 'x', 'torch': None})
  )
  assert "runs at 125.0 GFLOP/s in PyTorch (1.25x JAX's 100.0)" in text


def test_torch_matmul_peak_is_measured():
  flops = torch_comparison.torch_matmul_peak_flops(repeats=2, size=256)
  assert 1e6 < flops < 1e15


def test_format_cpu_seconds():
  assert benchmarks.format_cpu_seconds(0.1723) == '0.172'
  assert benchmarks.format_cpu_seconds(8.2) == '8.20'
  assert benchmarks.format_cpu_seconds(12.34) == '12.3'


def test_cpu_time_is_finer_than_clock_ticks():
  x = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
  readings = []
  for _ in range(5):
    usage = host_runtime.process_usage()
    readings += [usage.user_s, usage.system_s]
    for _ in range(20):
      x = np.tanh(x @ x.T / 256)
  # With 10 ms ticks every reading would be a whole number of hundredths.
  assert any(abs(t * 100 - round(t * 100)) > 1e-6 for t in readings)
  result = benchmarks.time_runs(lambda: np.tanh(x @ x.T), warmup=0, repeats=3)
  assert result['user_s'] + result['sys_s'] > 0


def _grow(kept: list, pages: int = 1024):
  """Maps `pages` new anonymous pages, touches each and keeps them: `pages` page faults a call
  (an mmap, so neither malloc nor transparent huge pages change the count)."""
  block = mmap.mmap(-1, pages * mmap.PAGESIZE)
  for i in range(pages):
    block[i * mmap.PAGESIZE] = 1
  kept.append(block)


def test_paired_runs_warm_up_until_the_heap_stops_growing():
  growing, settles = [], []
  calls = {'settles': 0}

  def settling():
    calls['settles'] += 1
    if calls['settles'] <= 2:  # grows in its first two calls, then reuses what it has
      _grow(settles)

  out = benchmarks.paired_runs(
    {'still': lambda: None, 'settling': settling}, warmup=1, repeats=2, max_extra_warmup=4
  )
  # Round 1 grew (the asked-for warm-up), round 2 grew, rounds 3 and 4 were clean: timing starts.
  assert out['still']['warmup_rounds'] == out['settling']['warmup_rounds'] == 4
  assert out['settling']['page_faults'] <= benchmarks.STEADY_PAGE_FAULTS
  assert len(out['still']['times_s']) == len(out['settling']['times_s']) == 2

  # A step that never settles: the extra rounds stop at the cap, and its faults are reported.
  out = benchmarks.paired_runs(
    {'growing': lambda: _grow(growing)}, warmup=1, repeats=2, max_extra_warmup=2
  )
  assert out['growing']['warmup_rounds'] == 3
  assert out['growing']['page_faults'] >= 1024
  # No warm-up asked for: none added.
  assert (
    benchmarks.paired_runs({'growing': lambda: _grow(growing)}, warmup=0, repeats=1)['growing'][
      'warmup_rounds'
    ]
    == 0
  )
  for block in growing + settles:
    block.close()


def test_time_runs_counts_page_faults():
  kept = []
  result = benchmarks.time_runs(lambda: _grow(kept, 512), warmup=0, repeats=2)
  assert result['page_faults'] >= 512
  for block in kept:
    block.close()


def test_merge_runs_pools_the_blocks_of_one_step():
  usage = host_runtime.Usage
  a = benchmarks._summary([1.0, 3.0], [usage(2.0, 0.0, 0), usage(2.2, 2.5, 20)])
  b = benchmarks._summary([2.0], [usage(5.0, 0.3, 0)])
  merged = benchmarks.merge_runs([{**a, 'warmup_rounds': 2}, {**b, 'warmup_rounds': 2}])
  assert merged['times_s'] == [1.0, 3.0, 2.0] and merged['median_s'] == 2.0
  # CPU times are medians over the pooled runs (a faulting run decides nothing), faults a mean.
  assert merged['user_s'] == 2.2 and merged['sys_s'] == 0.3
  assert abs(merged['page_faults'] - 20 / 3) < 1e-12 and merged['warmup_rounds'] == 4
  assert merged['user_runs_s'] == [2.0, 2.2, 5.0] and merged['page_fault_runs'] == [0, 20, 0]


def test_step_matmul_shapes_cover_a_block():
  shapes = benchmarks.step_matmul_shapes(256, tokens=512)
  assert ('MLP up, weight gradient', 256, 512, 1024) in shapes
  assert ('attention values (one head)', 512, 512, 64) in shapes
  # Each distinct product once (the four attention projections share one shape).
  assert len(shapes) == 8 and len(set(shapes)) == 8
  forward = sum(2 * m * k * n for name, m, k, n in shapes if name.endswith('forward'))
  assert forward == 2 * 512 * (256 * 256 + 256 * 1024)


def test_bench_matmul_tool_prints_both_sides(tmp_path, capsys):
  from ove_jax_tools import bench_matmul

  out = tmp_path / 'matmul.json'
  assert (
    bench_matmul.main(['--widths', '64', '--tokens', '128', '--repeats', '1', '--json', str(out)])
    == 0
  )
  text = capsys.readouterr().out
  assert '| width 64: MLP up, input gradient | 128 x 256 x 64 |' in text
  rows = json.loads(out.read_text())['rows']
  assert len(rows) == 1 + 8 and all(r['jax'] > 0 and r['torch'] > 0 for r in rows)
  with pytest.raises(SystemExit):
    bench_matmul.main(['--widths', 'wide'])
