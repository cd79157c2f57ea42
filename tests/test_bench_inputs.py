"""Bad input to the benchmark and check tools (ove-bench-*, ove-gpu-check,
tools/bench_export_memory.py): each is refused with exit status 2 and an error naming the flag,
before any benchmark runs; the work each would do is replaced here by a function that fails the
test if it is reached."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_pipeline import synthetic
from ove_jax import benchmarks, cli, host_runtime, kmeans_backends, metrics
from ove_jax import gpu_check as gpu_check_lib
from ove_jax_tools import (
  bench_encoder,
  bench_export_memory,
  bench_kmeans,
  bench_kmeans_backends,
  bench_matmul,
  bench_selection,
  gpu_check,
)


def refused(main, argv, capsys) -> str:
  """main(argv) refuses (exit status 2, from main or from argparse); the last line of its
  stderr, the error (argparse prints its usage above it)."""
  try:
    status = main(argv)
  except SystemExit as e:
    status = e.code
  err = capsys.readouterr().err
  assert status == 2, (status, err)
  assert 'Traceback' not in err
  return err.strip().splitlines()[-1]


def reached(*args, **kwargs):
  raise AssertionError('the work ran before the input was checked')


@pytest.fixture
def no_work(monkeypatch):
  """Every tool's first expensive step fails the test (and the host tuning is left alone)."""
  monkeypatch.setattr(host_runtime, 'configure', lambda *a, **k: {})
  monkeypatch.setattr(gpu_check_lib, 'run', reached)
  monkeypatch.setattr(metrics, 'matmul_peak_flops', reached)
  monkeypatch.setattr(metrics, 'matmul_flops', reached)
  monkeypatch.setattr(kmeans_backends, 'kmeans_throughput', reached)
  monkeypatch.setattr(kmeans_backends, 'bench', reached)
  monkeypatch.setattr(bench_selection, 'synthetic_clip', reached)
  monkeypatch.setattr(bench_export_memory, 'run', reached)


# -- --json / --out ------------------------------------------------------------------------------

TOOLS = {
  'ove-gpu-check': (gpu_check.main, ['--platform=cpu', '--tiny'], '--out'),
  'ove-bench-encoder': (bench_encoder.main, ['--skip-torch'], '--json'),
  'ove-bench-matmul': (bench_matmul.main, ['--widths', '64'], '--json'),
  'ove-bench-kmeans': (bench_kmeans.main, ['--n', '100', '--k', '4'], '--json'),
  'ove-bench-kmeans-backends': (bench_kmeans_backends.main, ['--n', '100', '--k', '4'], '--json'),
  'ove-bench-selection': (bench_selection.main, ['--clips', '1'], '--json'),
  'bench_export_memory': (bench_export_memory.main, ['--workdir', 'run'], '--json'),
}


@pytest.mark.parametrize('tool', list(TOOLS))
def test_an_output_file_that_cannot_be_written_is_refused_first(tool, tmp_path, capsys, no_work):
  main, argv, flag = TOOLS[tool]
  afile = tmp_path / 'afile'
  afile.write_text('')
  cases = [
    (str(tmp_path), f'{tmp_path}: a folder; give the path of a file'),
    (f'{afile}/x.json', f'{afile}/x.json: its folder {afile} cannot be made: a file'),
    (f'{afile}/deeper/x.json', f'(inside {afile}, a file)'),
  ]
  for path, message in cases:
    err = refused(main, [*argv, f'{flag}={path}'], capsys)
    assert flag in err and message in err, err


def test_output_file_checks_and_writes(tmp_path, monkeypatch):
  nested = tmp_path / 'new' / 'sub' / 'x.json'
  assert cli.output_file(str(nested)) == str(nested)  # a missing folder is made when written
  assert cli.output_file('') == ''
  assert cli.output_file_problem('gs://bucket/x.json') is None
  cli.write_output_json(str(nested), {'b': 1, 'a': [2]})
  assert list(json.loads(nested.read_text())) == ['b', 'a']  # the order as given
  with pytest.raises(Exception, match=f'{tmp_path}: a folder'):
    cli.output_file(str(tmp_path))
  monkeypatch.setattr(os, 'access', lambda path, mode: False)  # a read-only tree (even for root)
  assert cli.output_file_problem(str(tmp_path / 'a' / 'x.json')) == (
    f'the folder {tmp_path} is not writable; give a path you may write to'
  )


# -- ove-bench-selection -------------------------------------------------------------------------


def test_bench_selection_refuses_bad_clips_and_sizes(tmp_path, capsys, no_work):
  missing, notes, folder = tmp_path / 'missing.mp4', tmp_path / 'notes.txt', tmp_path / 'adir'
  notes.write_text('not a video\n' * 20)
  folder.mkdir()
  cases = [
    (['--speed', str(missing)], f'--speed {missing}: no such file'),
    (['--speed', str(notes)], f'--speed {notes}: not a video'),
    (['--speed', str(folder)], f'--speed {folder}: is a directory'),
    (['--speed', '--clips', '0'], '--speed: give video files, or --clips 1 or more'),
    (['--clips', '0'], '--clips 0: the quality run needs at least 1 synthetic clip'),
    (['--clips', '-1'], "argument --clips: '-1': a whole number >= 0"),
    (['--frames', '16', '--budget', '99999'], '--budget 99999: more than the 4096 patches'),
    (['--budget', '-4'], "argument --budget: '-4': a whole number >= 1"),
    (['--budget', '0'], "argument --budget: '0': a whole number >= 1"),
    (['--frames', '0'], "argument --frames: '0': a whole number >= 1"),
    (['--repeat', '0'], "argument --repeat: '0': a whole number >= 1"),
    (['--patch-size', '15'], '--resolution 224: not a multiple of --patch-size 15'),
  ]
  for argv, message in cases:
    err = refused(bench_selection.main, argv, capsys)
    assert message in err, (argv, err)


def test_bench_selection_speed_mode_takes_files_alone(tmp_path, capsys, monkeypatch):
  """--clips 0 with files measures the files only (no synthetic clip is made)."""
  monkeypatch.setattr(bench_selection, 'synthetic_clip', reached)
  path = synthetic.make_clip(0, num_frames=8, height=64, width=64).write(tmp_path / 'a.mp4')
  argv = ['--speed', path, '--clips', '0', '--frames', '8', '--repeat', '1']
  assert bench_selection.main([*argv, f'--json={tmp_path / "out" / "speed.json"}']) == 0
  rows = json.loads((tmp_path / 'out' / 'speed.json').read_text())
  assert [r['clip'] for r in rows] == ['a.mp4'] and '| a.mp4 |' in capsys.readouterr().out
  # A clip the options cannot select from (a 640x16 strip under letterbox) is named, exit 2.
  wide = synthetic.make_clip(0, num_frames=8, height=16, width=640).write(tmp_path / 'wide.mp4')
  argv = ['--speed', wide, '--clips', '0', '--frames', '8', '--repeat', '1']
  with pytest.raises(SystemExit) as stop:
    bench_selection.main([*argv, '--budget', '512', '--variant', 'geometry=letterbox'])
  assert stop.value.code == 2
  assert 'wide.mp4: no selection to time: ' in capsys.readouterr().err


# -- ove-bench-kmeans, ove-bench-kmeans-backends -------------------------------------------------


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--n', '0'], "argument --n: '0': a whole number >= 1"),
    (['--n', '-5'], "argument --n: '-5'"),
    (['--n', '10', '--k', '50'], '--k 50: more centres than the 10 points (--n)'),
    (['--d', '0'], "argument --d: '0'"),
    (['--k', '0'], "argument --k: '0'"),
    (['--repeats', '0'], "argument --repeats: '0'"),
    (['--chunk', '0'], "argument --chunk: '0'"),
    (['--devices', '-2'], "argument --devices: '-2'"),
    (['--devices', '0'], "argument --devices: '0'"),
  ],
)
def test_bench_kmeans_refuses_bad_sizes(argv, message, capsys, no_work):
  assert message in refused(bench_kmeans.main, argv, capsys)


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--n', '100', '--k', '500'], '--k 500: more centres than the 100 points (--n)'),
    (['--k', '0'], "argument --k: '0': a whole number >= 1"),
    (['--n', '0'], "argument --n: '0'"),
    (['--d', '0'], "argument --d: '0'"),
    (['--clusters', '0'], "argument --clusters: '0'"),
    (['--iters', '0'], "argument --iters: '0'"),
    (['--repeats', '0'], "argument --repeats: '0'"),
    (['--backends', ','], "--backends ',': choose one or more of jax"),
  ],
)
def test_bench_kmeans_backends_refuses_bad_sizes(argv, message, capsys, no_work):
  assert message in refused(bench_kmeans_backends.main, argv, capsys)


def test_bench_kmeans_backends_refuses_more_centres_than_feature_rows(tmp_path, capsys, no_work):
  features = tmp_path / 'f.npy'
  np.save(features, np.zeros((300, 4), np.float32))
  err = refused(bench_kmeans_backends.main, ['--features', str(features), '--k', '500'], capsys)
  assert f'--features {features}: 300 points, fewer than --k 500 centres' in err
  np.save(features, np.zeros((0, 4), np.float32))
  err = refused(bench_kmeans_backends.main, ['--features', str(features), '--k', '5'], capsys)
  assert 'shape (0, 4); expected [N, D]' in err


# -- ove-gpu-check, ove-bench-matmul -------------------------------------------------------------


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--peak-flops=-1'], "argument --peak-flops: '-1': a finite number >= 0"),
    (['--peak-flops=nan'], "argument --peak-flops: 'nan'"),
    (['--peak-flops=inf'], "argument --peak-flops: 'inf'"),
    (['--devices=0'], "argument --devices: '0': a whole number >= 1"),
    (['--warmup=-1'], "argument --warmup: '-1': a whole number >= 0"),
    (['--classes=-1'], "argument --classes: '-1'"),
  ],
)
def test_gpu_check_range_errors_name_the_flag(argv, message, capsys, no_work):
  assert message in refused(gpu_check.main, ['--platform=cpu', *argv], capsys)


def test_step_timing_refuses_a_negative_peak():
  with pytest.raises(ValueError, match=r'peak_flops=-1.0\): a finite FLOP/s >= 0'):
    gpu_check_lib.StepTiming(peak_flops=-1.0)


@pytest.mark.parametrize(
  'widths, message',
  [
    ('60', "'60': each width must be a positive multiple of 64 (head_dim 64)"),
    ('64,100', "'64,100': each width must be a positive multiple of 64"),
    ('wide', "'wide': give comma-separated integers"),
    ('', '--widths: give at least one width'),
  ],
)
def test_bench_matmul_refuses_widths_its_heads_do_not_divide(widths, message, capsys, no_work):
  assert message in refused(bench_matmul.main, ['--widths', widths], capsys)


def test_width_list():
  assert benchmarks.width_list('64, 128,') == (64, 128) and benchmarks.width_list('') == ()


# -- tools/bench_export_memory.py --cli ----------------------------------------------------------

STAND_IN = """
import os

def main(argv):
  with open(os.path.join(argv[argv.index('--out') + 1], 'model.safetensors'), 'wb') as f:
    f.write(bytes(64))
  return STATUS
"""


@pytest.mark.parametrize('status', [0, 1], ids=['exported', 'failed'])
def test_cli_export_leaves_nothing_in_the_temporary_folder(tmp_path, monkeypatch, status):
  """--cli's export (here by a stand-in converter) is written under the child's working folder,
  which goes when the measurement ends, also when the export failed."""
  source = tmp_path / 'source'
  (source / 'tools').mkdir(parents=True)
  (source / 'tools' / 'convert_checkpoint.py').write_text(STAND_IN.replace('STATUS', str(status)))
  temp = tmp_path / 'temp'
  temp.mkdir()
  monkeypatch.setenv('TMPDIR', str(temp))
  monkeypatch.setattr('tempfile.tempdir', str(temp))
  if status:
    with pytest.raises(RuntimeError, match='measurement failed'):
      bench_export_memory.measure('run', str(source), bench_export_memory.CLI_LOAD)
  else:
    result = bench_export_memory.measure('run', str(source), bench_export_memory.CLI_LOAD)
    assert result['param_bytes'] == 64
  assert os.listdir(temp) == []
