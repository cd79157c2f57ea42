"""Golden snapshots of every experiment's flattened config, so a changed value shows in review.

For each experiment file under experiments/, each of its named argument variants (VARIANTS
below) and each point of its sweep(add, arg) (as ove_jax/sweeps.py makes it), the config's sorted
`key: value` lines (ove_jax.config.flatten) are compared with tests/golden_configs/<file>.txt:

  <experiment>--<variant or 'default'>.txt              the variant's config
  <experiment>--<variant or 'default'>--<point>.txt     one sweep point's config

A variant whose config equals an earlier variant's of the same experiment (ablations' study=
picks only the sweep) gets no file of its own; its points do. After an intended change:

  OVE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_configs.py

rewrites the files (and deletes those no experiment makes any more); review them with git diff.
Values that depend on the machine (absolute paths of this checkout, the home or temporary
folder, the host's CPU count) are refused, so the snapshots are the same everywhere.
"""

import difflib
import glob
import os
import re
import shutil
import tempfile

import pytest

from ove_jax import config as config_lib
from ove_jax import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, 'experiments')
GOLDEN = os.path.join(REPO, 'tests', 'golden_configs')
UPDATE = os.environ.get('OVE_UPDATE_GOLDEN') == '1'
REGENERATE = 'OVE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_configs.py'

_ABLATION_STUDIES = ('budget', 'policy', 'rope', 'margin', 'scale', 'sample_rate')  # + selection
# Every experiment file and the argument variants its docstring names.
VARIANTS = {
  # (student=DIR reads a labels folder: its config holds that machine's path.)
  'demo_cpu.py': ['', 'smoke'],
  'stage1_image.py': ['', 'smoke', 'paper'],
  'stage2_video.py': ['', 'smoke', 'paper', 'gpus=8', 'release_single_node,si=/ckpt/si'],
  'huge.py': ['', 'smoke', 'gpus=512,fsdp=32', 'gpus=8,fsdp=8'],
  # The default study is selection; the others are variants of their own.
  'ablations.py': ['', 'smoke']
  + [f'{size}study={s}' for s in _ABLATION_STUDIES for size in ('', 'smoke,')],
  # A probe recipe (ove-probe-suite): its config is not a trainer's and is not validated.
  'probe_benchmarks.py': ['', 'smoke', 'data_root=/data/ap'],
}


def _safe(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9._=,+-]', '_', text)


def _machine_values(flat) -> list[str]:
  """Keys whose values name this machine's folders (they would differ on another machine)."""
  roots = {REPO, os.path.expanduser('~'), tempfile.gettempdir(), os.getcwd()} - {'/', ''}
  return [
    f'{k}={v!r}' for k, v in flat.items() if isinstance(v, str) and any(root in v for root in roots)
  ]


def render(config, title: str) -> str:
  flat = config_lib.flatten(config)
  bad = _machine_values(flat)
  if bad:
    raise AssertionError(
      f'{title}: machine-dependent value(s) would enter the snapshot: '
      f'{", ".join(bad)}; keep paths relative or placeholders'
    )
  lines = [f'# {title}', f'# After an intended change: {REGENERATE}']
  return '\n'.join(lines + [f'{k}: {v!r}' for k, v in flat.items()]) + '\n'


def snapshots(path: str, variants, stem: str | None = None) -> dict[str, str]:
  """{file name: text} of one experiment file's variants and sweep points."""
  stem = stem or os.path.splitext(os.path.basename(path))[0]
  shown = f'experiments/{os.path.basename(path)}'
  module = config_lib.load_module(path)
  out: dict[str, str] = {}
  seen: set = set()
  for variant in variants:
    spec = f'{path}:{variant}' if variant else path
    base = f'{stem}--{_safe(variant) or "default"}'
    if getattr(module, 'PROBE_SUITE', False):
      config = module.get_config(variant or None)
    else:
      config = config_lib.load(spec)
    flat = repr(sorted(config_lib.flatten(config).items()))
    if flat not in seen:
      seen.add(flat)
      out[f'{base}.txt'] = render(config, f'{shown}:{variant}')
    if hasattr(module, 'sweep'):
      for point in sweeps.expand(spec):
        args = ' '.join(f'--config.{a}' for a in point.override_args())
        out[f'{base}--{point.name}.txt'] = render(
          sweeps.point_config(spec, point), f'{shown}:{variant} sweep point {point.name} ({args})'
        )
  return out


def compare(made: dict[str, str], golden_dir: str = GOLDEN) -> list[str]:
  """One readable problem per file that is missing or differs: the changed keys and a diff."""
  problems = []
  for name, text in sorted(made.items()):
    path = os.path.join(golden_dir, name)
    if not os.path.isfile(path):
      problems.append(f'{name}: no golden file (new experiment or variant?); run {REGENERATE}')
      continue
    with open(path) as f:
      old = f.read()
    if old == text:
      continue
    pairs = lambda t: dict(
      line.split(': ', 1) for line in t.splitlines() if not line.startswith('#')
    )
    before, after = pairs(old), pairs(text)
    keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    diff = ''.join(
      difflib.unified_diff(
        old.splitlines(True), text.splitlines(True), f'golden/{name}', f'now/{name}', n=1
      )
    )
    problems.append(f'{name}: changed key(s) {", ".join(keys) or "(comments only)"}\n{diff}')
  return problems


def _made(name: str) -> dict[str, str]:
  return snapshots(os.path.join(EXPERIMENTS, name), VARIANTS[name])


def test_every_experiment_file_has_variants():
  found = {os.path.basename(p) for p in glob.glob(os.path.join(EXPERIMENTS, '*.py'))}
  assert found == set(VARIANTS), (
    f'experiments without golden variants: {sorted(found - set(VARIANTS))}; '
    f'listed but missing: {sorted(set(VARIANTS) - found)} (edit VARIANTS in this file)'
  )


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_config_matches_golden(name):
  made = _made(name)
  if UPDATE:
    os.makedirs(GOLDEN, exist_ok=True)
    for file_name, text in made.items():
      with open(os.path.join(GOLDEN, file_name), 'w') as f:
        f.write(text)
  problems = compare(made)
  if problems:
    pytest.fail(
      f'{len(problems)} golden config(s) of experiments/{name} differ. If the change '
      f'is intended: {REGENERATE}\n\n' + '\n'.join(problems),
      pytrace=False,
    )


def test_no_stale_golden_files():
  made = set()
  for name in VARIANTS:
    made |= set(_made(name))
  stale = sorted(set(os.listdir(GOLDEN)) - made)
  if UPDATE:
    for file_name in stale:
      os.remove(os.path.join(GOLDEN, file_name))
    stale = []
  assert not stale, f'golden files no experiment makes any more: {stale}; run {REGENERATE}'


def test_snapshots_do_not_depend_on_the_host(monkeypatch):
  # The CPU count is the one host value a config could read without a path showing it.
  normal = _made('ablations.py') | _made('stage2_video.py')
  monkeypatch.setattr(os, 'cpu_count', lambda: 97)
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(97)), raising=False)
  assert _made('ablations.py') | _made('stage2_video.py') == normal
  machine = config_lib.defaults()
  machine.builtin.root = os.path.join(REPO, 'data')
  with pytest.raises(AssertionError, match='machine-dependent value.*builtin.root'):
    render(machine, "a config with this checkout's path")


def test_an_edited_experiment_fails_and_names_the_key(tmp_path):
  copy = tmp_path / 'demo_cpu.py'
  shutil.copy(os.path.join(EXPERIMENTS, 'demo_cpu.py'), copy)
  source = copy.read_text()
  assert source.count('c.optim.lr = 2e-3') == 1
  copy.write_text(source.replace('c.optim.lr = 2e-3', 'c.optim.lr = 3e-3'))
  problems = compare(snapshots(str(copy), VARIANTS['demo_cpu.py'], stem='demo_cpu'))
  assert len(problems) == 2  # the default and the smoke variant both set the learning rate
  for problem, variant in zip(problems, ('default', 'smoke')):
    assert problem.startswith(f'demo_cpu--{variant}.txt: changed key(s) optim.lr\n')
    assert '\n-optim.lr: 0.002\n+optim.lr: 0.003\n' in problem
  # The unedited file matches: only the edit shows.
  assert compare(_made('demo_cpu.py')) == [] or UPDATE
