"""ove-gpu-check on CPU: the tool's own run end to end (tiny sizes), its JSON report, and that
its comparison fails a wrong attention path."""

import dataclasses
import json
import sys

import numpy as np
import pytest

from ove_jax import gpu_check, gpu_report
from ove_jax_tools import gpu_check as tool


def test_cpu_mode_end_to_end(tmp_path, capsys):
  out = tmp_path / 'report' / 'gpu.json'
  code = tool.main(
    [
      '--platform=cpu',
      '--tiny',
      '--paths',
      'jax,cudnn,pallas_gpu',
      '--warmup=1',
      '--steps=1',
      f'--out={out}',
    ]
  )
  printed = capsys.readouterr().out
  assert code == 0, printed
  report = json.loads(out.read_text())
  assert json.loads(printed.strip().splitlines()[-1]) == report  # the last line is the JSON
  assert report['platform'] == 'cpu' and report['tiny']
  by = {(r['implementation'], r['dtype']): r for r in report['attention']}
  assert set(by) == {
    (p, d) for p in ('jax', 'cudnn', 'pallas_gpu') for d in ('float32', 'bfloat16')
  }
  for dtype, tol in (('float32', 1e-4), ('bfloat16', 1e-2)):
    assert by['cudnn', dtype]['status'] == 'skipped'
    assert 'needs a GPU' in by['cudnn', dtype]['reason']
    for path in ('jax', 'pallas_gpu'):
      r = by[path, dtype]
      assert r['status'] == 'pass' and r['tolerance'] == tol
      assert 0 <= r['max_rel'] <= tol and set(r['errors']) == {'out', 'dq', 'dk', 'dv'}
  assert by['pallas_gpu', 'float32']['interpret'] and not by['jax', 'float32']['interpret']
  (step,) = report['steps']
  assert step['status'] == 'pass' and step['preset'] == 'tiny'
  assert np.isfinite(step['loss']) and step['step_seconds'] > 0 and step['timed_steps'] == 1
  assert step['flops_per_step'] > 0 and 0 < step['mfu']
  assert (
    step['plan']['total_bytes']
    == (
      step['plan']['argument_bytes']
      + step['plan']['output_bytes']
      - step['plan']['alias_bytes']
      + step['plan']['temp_bytes']
    )
    > 0
  )
  assert set(step['rows']) == {'image', 'ocr', 'video'}
  assert report['summary'] == {'pass': 5, 'fail': 0, 'skipped': 2, 'error': 0, 'ok': True}
  assert 'no GPU: the GPU checks above are skipped, not passed' in printed


def test_base_and_large_are_skipped_without_gpu():
  results = gpu_check.check_steps('cpu', [None], ('base', 'large'), tiny=False)
  assert [(r['preset'], r['status']) for r in results] == [
    ('base', 'skipped'),
    ('large', 'skipped'),
  ]
  assert all('needs a GPU' in r['reason'] for r in results)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_a_wrong_attention_fails_the_comparison(dtype):
  inputs = gpu_check.packed_inputs(2, 64, 2, 64)
  reference = gpu_check.attention_outputs('xla', inputs, dtype)
  tol = gpu_check.TOLERANCES[dtype]
  assert gpu_check.compare(reference, reference, tol)['status'] == 'pass'
  # Attention that ignores the segments (one segment a row): outputs and gradients differ.
  q, k, v, segment_ids, cot = inputs
  unmasked = gpu_check.attention_outputs('xla', (q, k, v, np.ones_like(segment_ids), cot), dtype)
  result = gpu_check.compare(unmasked, reference, tol)
  assert result['status'] == 'fail' and result['max_rel'] > tol
  # A small perturbation of the output alone, past the tolerance, fails too; NaN fails.
  perturbed = dict(reference, out=reference['out'] + 3 * tol * reference['out'].max())
  assert gpu_check.compare(perturbed, reference, tol)['status'] == 'fail'
  nan = dict(reference, dq=np.full_like(reference['dq'], np.nan))
  assert gpu_check.compare(nan, reference, tol)['status'] == 'fail'


def test_attention_plan_by_platform():
  names = ('jax', 'cudnn', 'splash', 'pallas_gpu')
  assert gpu_check.attention_plan('gpu', names) == [
    ('jax', False, ''),
    ('cudnn', False, ''),
    ('splash', False, 'needs a TPU; the backend is gpu'),
    ('pallas_gpu', False, ''),
  ]
  cpu = gpu_check.attention_plan('cpu', names)
  assert [(n, i) for n, i, _ in cpu] == [
    ('jax', False),
    ('cudnn', False),
    ('splash', True),
    ('pallas_gpu', True),
  ]
  assert cpu[1][2] == 'needs a GPU; the backend is cpu'


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--paths=flash'], "'flash' is not an attention path"),
    (['--presets=giant'], "'giant' is not a preset"),
    (['--steps=0'], "argument --steps: '0': a whole number >= 1"),
  ],
)
def test_bad_flags(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    tool.main(argv)
  assert e.value.code == 2 and message in capsys.readouterr().err


def test_timing_flags_reach_the_step_as_one_setting(monkeypatch, capsys):
  """--warmup, --steps and --peak-flops arrive at check_step as one StepTiming (the step itself
  is replaced by a recorder here; test_cpu_mode_end_to_end times a real one)."""
  seen = []

  def record(config, devices, timing=gpu_check.StepTiming()):
    seen.append(timing)
    return {'preset': config.model.preset, 'status': 'skipped', 'reason': 'recorded'}

  monkeypatch.setattr(gpu_check, 'check_step', record)
  argv = ['--platform=cpu', '--tiny', '--paths=jax', '--warmup=0', '--steps=3']
  assert tool.main([*argv, '--peak-flops=2.5e12']) == 0, capsys.readouterr().out
  assert seen == [gpu_check.StepTiming(warmup=0, steps=3, peak_flops=2.5e12)]
  assert gpu_check.StepTiming() == gpu_check.StepTiming(warmup=2, steps=5, peak_flops=0.0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    seen[0].steps = 1
  for bad in ({'steps': 0}, {'warmup': -1}):
    with pytest.raises(ValueError, match='warmup must be >= 0 and steps >= 1'):
      gpu_check.StepTiming(**bad)


def test_platform_gpu_without_a_gpu_is_refused(capsys, monkeypatch):
  monkeypatch.setattr(tool, 'nvidia_visible', lambda: False)
  assert tool.main(['--platform=gpu']) == 2  # isolated: refused before any child starts
  assert '--platform=gpu, but no NVIDIA GPU is visible' in capsys.readouterr().err
  monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.75')  # restored after the test
  assert tool.main(['--platform=gpu', '--no-isolate']) == 2
  assert "--platform=gpu, but JAX's backend is 'cpu'" in capsys.readouterr().err


def test_a_visible_gpu_that_jax_did_not_start_is_refused(capsys, monkeypatch):
  """jax 0.10.2 falls back to the CPU with only a warning when its CUDA plugin fails: with a GPU
  in sight, auto refuses instead of reporting CPU figures as the GPU check's."""
  monkeypatch.setattr(tool, 'nvidia_visible', lambda: True)
  monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.75')
  assert tool.main(['--platform=auto', '--no-isolate', '--tiny']) == 2
  assert 'a GPU is visible' in capsys.readouterr().err


def fake_children(monkeypatch, replace):
  """child_command with the parts named in `replace` swapped for other programs."""
  real = tool.child_command

  def command(flags):
    for part, program in replace.items():
      if f'--part={part}' in flags:
        return [sys.executable, '-c', program]
    return real(flags)

  monkeypatch.setattr(tool, 'child_command', command)


def test_isolated_parts_and_a_crashing_step(tmp_path, monkeypatch, capsys):
  """Off the CPU each part runs in a child process: a child that dies (a segfault in a kernel)
  is its part's error result, and the parts before it keep theirs, in --out too."""
  out = tmp_path / 'gpu.json'
  argv = ['--platform=cpu', '--isolate', '--tiny', '--paths=jax', '--warmup=0', '--steps=1']
  assert tool.main([*argv, f'--out={out}']) == 0, capsys.readouterr()
  report = json.loads(out.read_text())
  assert report['isolated'] and report['complete'] and report['platform'] == 'cpu'
  assert [r['status'] for r in report['attention']] == ['pass', 'pass']
  assert [(r['preset'], r['status']) for r in report['steps']] == [('tiny', 'pass')]
  assert report['environment']['jaxlib']

  crash = 'import os, signal; os.kill(os.getpid(), signal.SIGSEGV)'
  fake_children(monkeypatch, {'steps:tiny': crash})
  assert tool.main([*argv, f'--out={out}']) == 1
  report = json.loads(out.read_text())
  assert [r['status'] for r in report['attention']] == ['pass', 'pass']
  (step,) = report['steps']
  assert step['status'] == 'error' and 'signal SIGSEGV' in step['reason'], step
  assert report['summary']['error'] == 1 and not report['summary']['ok']


def test_a_hanging_part_is_stopped_at_the_deadline(tmp_path, monkeypatch, capsys):
  out = tmp_path / 'gpu.json'
  hang = 'import time; time.sleep(120)'
  fake_children(monkeypatch, {'attention': hang, 'steps:tiny': hang})
  argv = ['--platform=cpu', '--isolate', '--tiny', '--deadline=8', f'--out={out}']
  assert tool.main(argv) == 1
  report = json.loads(out.read_text())
  (attention,) = report['attention']
  assert attention['status'] == 'error' and 'stopped at the deadline' in attention['reason']
  (step,) = report['steps']
  assert step['status'] == 'error' and 'not started: the --deadline of 8 s' in step['reason']


def test_results_reach_the_report_file_as_they_come(tmp_path, monkeypatch, capsys):
  """--out is rewritten after each result: what a run killed in its step had is on disk."""
  out = tmp_path / 'gpu.json'
  seen = []

  def step_reading_the_report(config, devices, timing=gpu_check.StepTiming()):
    seen.append(json.loads(out.read_text()))
    raise RuntimeError('out of memory')

  monkeypatch.setattr(gpu_check, 'check_step', step_reading_the_report)
  argv = ['--platform=cpu', '--tiny', '--paths=jax', f'--out={out}']
  assert tool.main(argv) == 1
  (during,) = seen
  assert not during['complete'] and len(during['attention']) == 2 and during['steps'] == []
  final = json.loads(out.read_text())
  assert final['complete'] and final['steps'][0]['status'] == 'error'
  assert 'out of memory' in final['steps'][0]['reason']


def test_a_step_whose_attention_raises_runs_again_on_xla(monkeypatch):
  calls = []

  def step(config, devices, timing=gpu_check.StepTiming()):
    calls.append(config.model.attention)
    if config.model.attention != 'xla':
      raise RuntimeError('cuDNN: no kernel for this configuration')
    return {'preset': config.model.preset, 'status': 'pass', 'attention': 'xla'}

  monkeypatch.setattr(gpu_check, 'check_step', step)
  (result,) = gpu_check.check_steps('gpu', [None], ('tiny',), tiny=True, attention_impl='cudnn')
  # xla's figures, but a fail: the path asked for did not run.
  assert calls == ['cudnn', 'xla'] and result['status'] == 'fail'
  assert result['attention_fallback']['from'] == 'cudnn'
  assert 'no kernel' in result['attention_fallback']['reason']
  # Not for a path given on purpose, nor when the step ran out of memory.
  calls.clear()
  (result,) = gpu_check.check_steps(
    'gpu', [None], ('tiny',), tiny=True, attention_impl='cudnn', fallback=False
  )
  assert calls == ['cudnn'] and result['status'] == 'error'

  def out_of_memory(config, devices, timing=gpu_check.StepTiming()):
    calls.append(config.model.attention)
    raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.1GiB')

  calls.clear()
  monkeypatch.setattr(gpu_check, 'check_step', out_of_memory)
  (result,) = gpu_check.check_steps('gpu', [None], ('tiny',), tiny=True, attention_impl='cudnn')
  assert calls == ['cudnn'] and result['status'] == 'error'


def test_a_report_read_back_prints_its_non_finite_figures():
  """A NaN-producing kernel's errors are 'inf' once through JSON: the table still prints."""
  r = {'implementation': 'pallas_gpu', 'dtype': 'bfloat16', 'status': 'fail'}
  line = gpu_report.attention_line(
    json.loads(json.dumps(gpu_report.json_safe({**r, 'max_rel': float('inf'), 'tolerance': 0.01})))
  )
  assert 'fail' in line and 'inf' in line and '0.01' in line


def test_step_attention_follows_the_attention_checks():
  def results(**status):
    return [
      {'implementation': name, 'dtype': dtype, 'status': st}
      for name, st in status.items()
      for dtype in ('float32', 'bfloat16')
    ]

  assert gpu_check.step_attention_for('gpu', results(cudnn='pass', pallas_gpu='pass')) == 'cudnn'
  assert gpu_check.step_attention_for('gpu', results(cudnn='fail', pallas_gpu='pass')) == (
    'pallas_gpu'
  )
  assert gpu_check.step_attention_for('gpu', results(cudnn='error', pallas_gpu='fail')) == 'xla'
  assert gpu_check.step_attention_for('cpu', results(cudnn='pass')) == 'xla'
  assert gpu_report.json_safe({'a': [float('inf'), 1.5], 'b': float('nan')}) == {
    'a': ['inf', 1.5],
    'b': 'nan',
  }


@pytest.mark.parametrize('preset', ['base', 'large'])
def test_gpu_step_is_stage2_per_gpu(preset):
  """The GPU steps' config (not run here): stage 2's heads and per-GPU batch on one device, the
  preset scanned, and a synthetic batch of its shapes that the trainer's Program accepts."""
  import jax

  from ove_jax import train

  c = gpu_check.step_config(preset, 1, attention_impl='cudnn')
  assert (c.model.preset, c.model.attention, c.model.dtype, c.accumulate) == (
    preset,
    'cudnn',
    'bfloat16',
    1,
  )
  assert {n: h.num_classes for n, h in c.heads.items()} == {
    'image': 2_000_000,
    'ocr': 365_187,
    'video': 400_000,
  }
  assert {n: (h.rows, h.tokens_per_row) for n, h in c.data.heads.items()} == {
    'image': (16, 1024),
    'ocr': (8, 1024),
    'video': (16, 2048),
  }
  program = train.Program(c, train.make_mesh(c, jax.devices()[:1]))
  assert program.encoder_cfg.scan_layers
  host = gpu_check.synthetic_batch(program, c)
  for name, h in c.data.heads.items():
    b = host[name]
    assert b['patches'].shape == (h.rows, h.tokens_per_row, program.encoder_cfg.patch_dim)
    assert b['patches'].dtype == np.uint8 and b['labels'].shape == (h.rows, 1, h.num_labels)
    assert 0 <= b['labels'].min() and b['labels'].max() < c.heads[name].num_classes
    assert set(b) - {'num_skipped'} == set(train.BATCH_FIELDS) - {'skipped'}
  assert gpu_check.step_config(preset, 1, classes=1000).heads.ocr.num_classes == 1000
