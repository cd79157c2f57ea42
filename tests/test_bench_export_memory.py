"""tools/bench_export_memory.py on the smallest checkpoint it takes: a tiny-preset training
workdir (conftest's smoke_run: the demo's smoke config saved as the trainer saves it), measured
on the CPU in fresh processes; its printed figures and its JSON must agree and be what they
claim."""

import json
import re

import jax
import numpy as np
import pytest

from ove_jax_tools import bench_export_memory as tool

MiB = 2**20
LINE = re.compile(
  r'(?P<name>\S+)\s+baseline\s+(?P<baseline>[\d.]+) MiB  peak beyond baseline\s+'
  r"(?P<beyond>-?[\d.]+) MiB = (?P<ratio>-?[\d.]+) x the encoder's (?P<params>[\d.]+) MiB of "
  r'parameters \((?P<seconds>[\d.]+) s\)'
)


@pytest.fixture(scope='module')
def run(smoke_run):
  """(the conftest's tiny smoke workdir, its encoder's float32 parameter bytes counted from the
  saved step-5 state: the step the tool exports, the latest)."""
  workdir, state, _ = smoke_run
  encoder = state['params']['encoder']
  return workdir, sum(4 * int(np.prod(p.shape)) for p in jax.tree.leaves(encoder))


def _check(printed: str, figures: dict, param_bytes: int, *, files: bool) -> None:
  """The printed line says what the JSON holds, and the JSON's figures hold together."""
  (match,) = [m for m in map(LINE.fullmatch, printed.splitlines()) if m]
  assert match['name'] == 'params-only'
  r = figures['params-only']
  assert set(r) == {
    'baseline_bytes',
    'peak_bytes',
    'beyond_baseline_bytes',
    'param_bytes',
    'seconds',
  }
  if files:  # the written model.safetensors: the float32 tensors plus a JSON header
    assert param_bytes < r['param_bytes'] < param_bytes + MiB
  else:  # the loaded encoder's nnx.Params, float32: the saved encoder exactly
    assert r['param_bytes'] == param_bytes
  assert r['beyond_baseline_bytes'] == r['peak_bytes'] - r['baseline_bytes']
  # The baseline is a started JAX (hundreds of MiB); holding the loaded encoder raises the
  # resident set above it by at least the encoder's parameters.
  assert r['baseline_bytes'] > 100 * MiB
  assert r['peak_bytes'] >= r['baseline_bytes'] + param_bytes
  assert r['seconds'] > 0
  assert float(match['baseline']) == pytest.approx(r['baseline_bytes'] / MiB, abs=0.051)
  assert float(match['beyond']) == pytest.approx(r['beyond_baseline_bytes'] / MiB, abs=0.051)
  assert float(match['params']) == pytest.approx(r['param_bytes'] / MiB, abs=0.051)
  assert float(match['ratio']) == pytest.approx(
    r['beyond_baseline_bytes'] / r['param_bytes'], abs=0.0051
  )
  assert float(match['ratio']) >= 1.0


@pytest.mark.parametrize('cli', [False, True], ids=['load', 'cli'])
def test_measures_the_params_only_export(run, tmp_path, capsys, cli):
  workdir, param_bytes = run
  out = tmp_path / 'figures.json'
  assert tool.main(['--workdir', workdir, f'--json={out}', *(['--cli'] if cli else [])]) == 0
  figures = json.loads(out.read_text())
  assert figures['workdir'] == workdir and figures['cli'] is cli
  assert set(figures) == {'workdir', 'cli', 'params-only'}  # no --old-source: one variant
  _check(capsys.readouterr().out, figures, param_bytes, files=cli)


def test_bad_input_is_named(run, tmp_path, capsys):
  workdir, _ = run
  empty = tmp_path / 'empty'
  empty.mkdir()
  cases = [
    (['--workdir', str(empty)], f'--workdir {empty}: no committed training checkpoint'),
    (['--workdir', str(tmp_path / 'absent')], f'--workdir {tmp_path / "absent"}: no such'),
    (
      ['--workdir', workdir, '--old-source', str(empty)],
      f'--old-source {empty}: no tools/convert_checkpoint.py with trained_encoder',
    ),
  ]
  for argv, message in cases:
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('bench_export_memory: error: ') and message in err, err
    assert 'Traceback' not in err
