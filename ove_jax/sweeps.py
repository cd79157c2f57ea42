"""Sweeps: an experiment's `sweep(add, arg)` as one run folder and one trainer command per point.

  points = expand('experiments/ablations.py:smoke,study=selection')
  configs = {p.name: point_config(spec, p) for p in points}          # validated, as the trainer
  commands = {p.name: train_command(spec, root, p, configs[p.name]) for p in points}
  check_saved_configs(root, points, configs)    # runs already in root were made with these
  failures = sweep_runs.run_points(root, points, configs, commands)  # one after another, here
  columns, rows = gather(root, points, configs, failures)           # the results table
  write_results(root, columns, rows)                                 # results.csv, results.md

An experiment file defines, next to `get_config(arg)`:

  def sweep(add, arg=None):        # arg: the same typed argument string as get_config's
    for lr in (1e-3, 3e-4):
      add(**{'optim.lr': lr})       # dotted config keys, as in --config.optim.lr=0.001
    # several keys that make one setting, named by a label (the run's name and table columns):
    add(label={'selection': 'uniform'}, **{'data.heads.video.video_modes': (0, 1, 0, 0)})

Each point runs in <root>/<name>. The name comes from the label, else from the overrides (each
key shortened to its last dotted parts that tell it apart within the point), with characters
other than letters, digits and `._=,+-` replaced: `selection=uniform`, `rope=1d`,
`margin=0.3`. The same overrides always give the same name. Its command is
`python -m ove_jax.train --config=SPEC --workdir=<root>/<name> --config.KEY=VALUE ...`: the
point's overrides, then the common ones (which may not set a swept key). Points whose built-in
data would be the same (builtin.enabled with no builtin.root) share one folder under
<root>/builtin_data, named by the data's parameters, instead of making it once per run.

A run counts as finished when its newest committed checkpoint is of step total_steps
(`checkpoint_state`; one beyond it is a failure that names both). How `--run` runs the points,
skips, resumes and reports them, and stops on SIGTERM or SIGINT: `ove_jax.sweep_runs`. A run
already in <root> that was made with another config than the sweep gives now (its
`config.json`, RESUMABLE_KEYS aside) is refused by `check_saved_configs`, naming the point and
the keys (saved -> now), so that its results are never reported under settings they were not
made with. The results table holds per point its swept values, status, final step, and from
metrics.jsonl the loss, each head's accuracy, the eval/* and probe/* values (the latest value of
each key). A config error (an experiment file that does not load, a sweep() that raises or does
not take (add, arg=None), an unknown key in a point, a value that does not survive the command
line, a duplicate name) raises `config.ConfigError` naming the file or the point and the key,
before anything runs. The command line is `ove-sweep`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import re
import shlex
from typing import Any, Mapping, Sequence

from data_pipeline import fileio, paths
from ove_jax import config as config_lib

RESULTS_CSV = 'results.csv'
RESULTS_MD = 'results.md'
SWEEP_JSON = 'sweep.json'
TRAIN_LOG = 'train.log'
BUILTIN_DIR = 'builtin_data'
_NAME_CHARS = re.compile(r'[^A-Za-z0-9._=,+-]')
_MAX_NAME = 120


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: its folder name, its overrides (dotted key -> value, in the order the
  experiment gave them) and its table columns (the label, else the shortened keys)."""

  name: str
  overrides: Mapping[str, Any]
  columns: Mapping[str, Any]

  def override_args(self) -> list[str]:
    """The overrides as the trainer's `--config.` arguments (without that prefix)."""
    return [f'{key}={format_value(value)}' for key, value in self.overrides.items()]


# ------------------------------------------------------------------------------------------------
# Expansion and names
# ------------------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
  """A value as `--config.key=` text that config.apply_override turns back into the value."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return repr(value)


def _name_value(value: Any) -> str:
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, (list, tuple)):
    return '-'.join(_name_value(v) for v in value)
  if value is None:
    return 'none'
  return value if isinstance(value, str) else repr(value)


def short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Each dotted key's last part, or as many last parts as tell it apart from the others."""
  out = {}
  for key in keys:
    parts = key.split('.')
    for n in range(1, len(parts) + 1):
      short = '.'.join(parts[-n:])
      if not any(
        other != key and (other == short or other.endswith('.' + short)) for other in keys
      ):
        break
    out[key] = short
  return out


def point_name(columns: Mapping[str, Any]) -> str:
  """The run folder's name of a point with these columns: stable, filesystem-safe."""
  text = ','.join(f'{k}={_name_value(v)}' for k, v in columns.items()) or 'baseline'
  safe = _NAME_CHARS.sub('_', text)
  if safe.startswith(('.', '-')):
    safe = '_' + safe
  if len(safe) > _MAX_NAME:  # keep it readable and unique: a prefix and a digest of the whole
    safe = safe[: _MAX_NAME - 11] + '-' + hashlib.sha1(text.encode()).hexdigest()[:10]
  return safe


def expand(spec: str) -> list[Point]:
  """The points of the experiment `spec` (`name_or_path[:arg]`), from its sweep(add, arg)."""
  path, arg = config_lib.split_spec(spec)  # a path, or a shipped experiment's name
  module = config_lib.load_module(path)  # a ConfigError names a file that cannot be loaded
  sweep_fn = getattr(module, 'sweep', None)
  usage = 'define sweep(add, arg=None) that calls add(**overrides) once per run'
  if sweep_fn is None:
    raise config_lib.ConfigError(
      f'{path} has no sweep(add, arg=None) function; {usage} (see the ove_jax.sweeps docstring)'
    )
  points: list[Point] = []

  def add(label: Mapping[str, Any] | None = None, **overrides: Any) -> None:
    where = f'{path}: sweep point {len(points) + 1}'
    if label is not None and (
      not isinstance(label, Mapping) or not label or not all(isinstance(k, str) for k in label)
    ):
      raise config_lib.ConfigError(
        f'{where}: label={label!r}; give a non-empty dict of '
        'column name -> value, e.g. label={"selection": "uniform"}'
      )
    reserved = sorted(set(label or ()) & {'name', 'status', 'step'})
    if reserved:
      raise config_lib.ConfigError(
        f"{where}: label column(s) {reserved} are the results table's own; rename them"
      )
    columns = (
      dict(label)
      if label
      else {short: overrides[key] for key, short in short_keys(list(overrides)).items()}
    )
    points.append(Point(point_name(columns), dict(overrides), columns))

  try:
    signature = inspect.signature(sweep_fn)
    # sweep(add, arg=None), or sweep(add): one sweep whatever the argument.
    call = (add, arg or None) if len(signature.parameters) >= 2 else (add,)
    signature.bind(*call)
  except (TypeError, ValueError):
    raise config_lib.ConfigError(
      f'{path}: sweep is {getattr(sweep_fn, "__name__", "sweep")}'
      f'{_signature_text(sweep_fn)}; {usage}'
    ) from None
  try:
    sweep_fn(*call)
  except config_lib.ConfigError:
    raise
  except Exception as e:  # the experiment's own code
    raise config_lib.ConfigError(
      f'{path}: sweep({arg}) raised {config_lib.error_text(e)}'
    ) from None
  if not points:
    raise config_lib.ConfigError(f'{path}: sweep({arg or ""}) added no points')
  seen: dict[str, Point] = {}
  for point in points:
    if point.name in seen:
      raise config_lib.ConfigError(
        f'{path}: two sweep points are both named {point.name!r} '
        f'({dict(seen[point.name].overrides)}'
        f' and {dict(point.overrides)}); give them labels that differ'
      )
    seen[point.name] = point
  return points


def _signature_text(fn) -> str:
  try:
    return str(inspect.signature(fn))
  except (TypeError, ValueError):
    return ' (not a function)'


def select(points: Sequence[Point], only: Sequence[str] | None) -> list[Point]:
  """The points named in `only` (all of them when None), in sweep order."""
  if only is None:
    return list(points)
  names = {p.name for p in points}
  unknown = [n for n in only if n not in names]
  if unknown:
    raise config_lib.ConfigError(
      f'--only names {unknown}; the points are {", ".join(sorted(names))}'
    )
  return [p for p in points if p.name in only]


def point_config(spec: str, point: Point, common: Sequence[str] = ()):
  """The validated config of one point, made the way the trainer will make it: the experiment,
  then the point's overrides as command-line text, then `common`."""
  swept = set(point.overrides)
  for item in common:
    key = item.partition('=')[0]
    if key in swept:
      raise config_lib.ConfigError(
        f'--config.{item}: {key} is swept by the experiment (point {point.name}); change the '
        'sweep, or run that point by hand with python -m ove_jax.train'
      )
  try:
    config = config_lib.load(spec, [*point.override_args(), *common])
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f'sweep point {point.name}: {e}') from None
  flat = config_lib.flatten(config)
  for key, value in point.overrides.items():
    got = flat.get(key)
    want = tuple(value) if isinstance(value, list) else value
    if got != want or type(got) is not type(want) and not _same_number(got, want):
      raise config_lib.ConfigError(
        f'sweep point {point.name}: {key}={value!r} becomes {got!r} on the command line '
        f'(the key holds a {type(got).__name__}); give a value of that type'
      )
  return config


def _same_number(a, b) -> bool:
  numbers = (int, float)
  return (
    isinstance(a, numbers)
    and isinstance(b, numbers)
    and not isinstance(a, bool)
    and not isinstance(b, bool)
    and a == b
  )


def builtin_folder(config) -> str | None:
  """The shared built-in data folder name of a config that makes its own (None otherwise)."""
  from data_pipeline import builtin

  b = config.builtin
  if not b.enabled or b.root:
    return None
  # Its version too: data of an older layout is refused by builtin.ensure, not silently reused.
  return (
    f'budget{b.budget}_policy-{b.policy}_clips{b.clips}_images{b.images}_'
    f'seed{config.seed}_v{builtin.VERSION}'
  )


def train_command(
  spec: str, root: str, point: Point, config, common: Sequence[str] = (), python: str = 'python'
) -> list[str]:
  """argv of the point's trainer run."""
  args = [
    python,
    '-m',
    'ove_jax.train',
    f'--config={spec}',
    f'--workdir={paths.join(root, point.name)}',
  ]
  args += [f'--config.{item}' for item in [*point.override_args(), *common]]
  folder = builtin_folder(config)
  if folder:
    args.append(f'--config.builtin.root={shared_builtin_root(root, folder)}')
  return args


def shared_builtin_root(root: str, folder: str) -> str:
  """The shared built-in data folder `folder` (builtin_folder's name) of the sweep in `root`:
  generated data is local files, so a URL root keeps it in its local folder."""
  return os.path.join(paths.local_folder(root), BUILTIN_DIR, folder)


# ------------------------------------------------------------------------------------------------
# Run state and results
# ------------------------------------------------------------------------------------------------


def is_finished(run_dir: str, total_steps: int) -> bool:
  """The newest committed checkpoint in `run_dir` is the trainer's of step `total_steps`."""
  return checkpoint_state(run_dir, total_steps) == 'finished'


def checkpoint_state(run_dir: str, total_steps: int) -> str | None:
  """'finished' when the newest committed checkpoint in `run_dir` is of step `total_steps`, the
  failure text when it is beyond it (a run made with a larger total_steps: the trainer has
  nothing to do), None otherwise."""
  from ove_jax import checkpoint

  steps = checkpoint.list_steps(run_dir)
  if not steps or steps[-1] < total_steps:
    return None
  if steps[-1] == total_steps:
    return 'finished'
  return (
    f'failed (its checkpoint of step {steps[-1]} is beyond total_steps {total_steps}; give '
    f'--config.total_steps={steps[-1]} or more, or a new --root)'
  )


# Keys a resume may change (docs/training.md#checkpoints): where and how the run goes on (another
# mesh or number of processes, its watchdog, profiling, logging and compilation cache) and how far
# (a larger total_steps continues it; a checkpoint beyond a smaller one is reported).
RESUMABLE_KEYS = tuple(
  'total_steps mesh. distributed. watchdog_seconds watchdog_first_step_seconds '
  'compilation_cache_dir profile_start profile_steps log_every metrics.'.split()
)


def saved_config_changes(run_dir: str, config) -> dict[str, tuple[Any, Any]]:
  """{key: (saved value, value now)} of the keys where the config the trainer saved in
  `<run_dir>/config.json` differs from `config` as the point's command gives it, RESUMABLE_KEYS
  aside; {} when there is none. A key the saved config lacks (one added to the code since)
  counts only when `config` gives it another value than the default. The shared built-in data
  folder counts by its name (the data's parameters), not by where it is: a URL root's local
  folder depends on the machine's cache folder."""
  saved = fileio.read_json(paths.join(run_dir, 'config.json'))
  if not isinstance(saved, dict):
    return {}
  old = config_lib.flatten(saved)
  new, defaults = (_as_saved(c) for c in (config, config_lib.defaults()))
  folder = builtin_folder(config)
  if folder:  # train_command gives the point the shared folder of its built-in data
    kept = str(old.get('builtin.root', ''))
    same = os.path.basename(kept.rstrip('/')) == folder
    new['builtin.root'] = kept if same else shared_builtin_root(paths.dirname(run_dir), folder)
  missing = object()
  changes = {}
  for key in sorted(set(old) | set(new)):
    if key.startswith(RESUMABLE_KEYS):
      continue
    before, after = old.get(key, missing), new.get(key, missing)
    if before is missing and after == defaults.get(key, missing):
      continue
    if before != after:
      changes[key] = tuple('(unset)' if v is missing else v for v in (before, after))
  return changes


def _as_saved(config) -> dict[str, Any]:
  """The flattened config as the trainer's config.json holds it (tuples as lists)."""
  return config_lib.flatten(json.loads(json.dumps(config.to_dict(), default=list)))


def check_saved_configs(root: str, points: Sequence[Point], configs: Mapping[str, Any]) -> None:
  """Raises ConfigError naming each point whose run in `root` was made with another config than
  the sweep would run now (its results would be reported under settings they were not made with),
  with the keys that differ (saved -> now)."""
  problems = []
  for point in points:
    changes = saved_config_changes(paths.join(root, point.name), configs[point.name])
    if changes:
      text = ', '.join(f'{k} {old!r} -> {new!r}' for k, (old, new) in changes.items())
      problems.append(f'{point.name} ({text})')
  if problems:
    raise config_lib.ConfigError(
      f'runs in {root} were made with another config than this sweep gives: '
      f"{'; '.join(problems)}; give a new --root, or remove those runs' folders to run them again"
    )


def final_metrics(run_dir: str) -> dict[str, Any]:
  """Every key's latest value in `<run_dir>/metrics.jsonl` (by step, a later line of the same
  step winning: a resumed run rewrites steps, and probes may log on a line of their own); {}
  when there is none. Lines that are not JSON (a killed run's last) are skipped."""
  from ove_jax import metrics as metrics_lib

  try:
    lines = metrics_lib.read_metrics(run_dir, merge_steps=True)
  except FileNotFoundError:
    return {}
  out: dict[str, Any] = {}
  for line in lines:
    out.update(line)
  return out


def result_keys(metrics: Mapping[str, Any]) -> list[str]:
  """The reported metrics of one run: loss, <head>/accuracy, eval/*, probe/*."""
  heads = sorted(k for k in metrics if re.fullmatch(r'[^/]+/accuracy', k))
  evals = sorted(k for k in metrics if k.startswith('eval/'))
  probes = sorted(k for k in metrics if k.startswith('probe/'))
  return [k for k in ('loss',) if k in metrics] + heads + evals + probes


def gather(
  root: str,
  points: Sequence[Point],
  configs: Mapping[str, Any],
  failures: Mapping[str, str] | None = None,
) -> tuple[list[str], list[dict]]:
  """(columns, one row per point) of the results table."""
  failures = failures or {}
  rows, metric_keys, label_keys = [], [], []
  for point in points:
    run_dir = paths.join(root, point.name)
    metrics = final_metrics(run_dir)
    state = checkpoint_state(run_dir, configs[point.name].total_steps)
    if point.name in failures:
      status = failures[point.name]
    elif state:
      status = state
    elif paths.isdir(run_dir):
      status = 'unfinished'
    else:
      status = 'not started'
    row = {
      'name': point.name,
      **{k: _cell(v) for k, v in point.columns.items()},
      'status': status,
      'step': metrics.get('step', ''),
    }
    for key in result_keys(metrics):
      row[key] = metrics[key]
      if key not in metric_keys:
        metric_keys.append(key)
    for key in point.columns:
      if key not in label_keys:
        label_keys.append(key)
    rows.append(row)
  order = {k: i for i, k in enumerate(result_keys(dict.fromkeys(metric_keys)))}
  columns = ['name', *label_keys, 'status', 'step', *sorted(metric_keys, key=order.get)]
  return columns, rows


def _cell(value):
  return _name_value(value) if isinstance(value, (list, tuple, bool)) or value is None else value


def write_results(
  root: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> tuple[str, str]:
  """results.csv (full precision) and results.md (a Markdown table, 4 significant digits)."""
  csv_path, md_path = paths.join(root, RESULTS_CSV), paths.join(root, RESULTS_MD)
  buffer = io.StringIO()
  writer = csv.DictWriter(
    buffer, fieldnames=list(columns), extrasaction='ignore', lineterminator='\n'
  )
  writer.writeheader()
  for row in rows:
    writer.writerow({k: row.get(k, '') for k in columns})
  fileio.write_atomic(csv_path, buffer.getvalue())
  fileio.write_atomic(md_path, markdown_table(columns, rows))
  return csv_path, md_path


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
  def cell(value):
    if isinstance(value, float):
      return 'nan' if math.isnan(value) else f'{value:.4g}'
    return str(value).replace('|', '\\|')

  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(row.get(k, '')) for k in columns) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def write_sweep_json(
  root: str,
  spec: str,
  points: Sequence[Point],
  commands: Mapping[str, Sequence[str]],
  status: Mapping[str, str],
) -> str:
  path = paths.join(root, SWEEP_JSON)
  fileio.write_atomic(
    path,
    json.dumps(
      {
        'config': spec,
        'points': [
          {
            'name': p.name,
            'overrides': dict(p.overrides),
            'columns': dict(p.columns),
            'command': shlex.join(commands[p.name]),
            'status': status.get(p.name, ''),
          }
          for p in points
        ],
      },
      indent=2,
      default=list,
    )
    + '\n',
  )
  return path


# ------------------------------------------------------------------------------------------------
# Modes
# ------------------------------------------------------------------------------------------------


def job_array_text(spec: str, root: str, commands: Sequence[Sequence[str]], path: str) -> str:
  """The job array file `path`: a comment on how to index it, then one command a line."""
  n, here = len(commands), os.getcwd()
  header = [
    f'# ove-sweep job array: {n} runs of {spec} under {root}',
    '# Array task i runs the (i+1)-th line that is not a comment, from the directory the',
    f'# sweep was made in ({here}). A SLURM wrapper (sbatch wrapper.sh):',
    '#   #!/bin/bash',
    f'#   #SBATCH --array=0-{n - 1}',
    f'#   cd {shlex.quote(here)}',
    f'#   eval "$({_commands_of(path)} | sed -n "$((SLURM_ARRAY_TASK_ID + 1))p")"',
    '# Any scheduler: replace SLURM_ARRAY_TASK_ID by its task index. A finished run started',
    '# again ends at once; an unfinished one resumes. Results afterwards:',
    f'#   ove-sweep --config={shlex.quote(spec)} --root={shlex.quote(root)} --collect',
  ]
  return '\n'.join(header + [shlex.join(c) for c in commands]) + '\n'


# Prints an object (a job array file at gs://...) with the Python the array tasks run.
_CAT_OBJECT = (
  'import sys; from data_pipeline import paths; '
  'sys.stdout.write(paths.read_bytes(sys.argv[1]).decode())'
)


def _commands_of(path: str) -> str:
  """The shell command that prints the lines of the job array file `path` (a local path or a
  URL) that are not comments."""
  if paths.is_url(path):
    return f"python -c {shlex.quote(_CAT_OBJECT)} {shlex.quote(path)} | grep -v '^#'"
  return f"grep -v '^#' {shlex.quote(path)}"


def write_job_array(
  path: str, spec: str, root: str, points: Sequence[Point], commands: Mapping[str, Sequence[str]]
) -> str:
  """The job array file `path` (one command a line; a URL is written to the object store) and
  <root>/sweep.json; returns `path`."""
  path = paths.absolute(path)  # a URL (gs://...) stays one
  paths.makedirs(paths.dirname(path))
  paths.makedirs(root)
  fileio.write_atomic(path, job_array_text(spec, root, [commands[p.name] for p in points], path))
  write_sweep_json(root, spec, points, commands, {})
  return path


def collect(
  root: str,
  spec: str,
  points: Sequence[Point],
  configs: Mapping[str, Any],
  commands: Mapping[str, Sequence[str]],
  failures: Mapping[str, str] | None = None,
) -> tuple[str, str]:
  """The results of the runs in `root`: sweep.json (with each point's status), results.csv and
  results.md; returns the paths of the last two."""
  paths.makedirs(root)
  columns, rows = gather(root, points, configs, failures)
  write_sweep_json(root, spec, points, commands, {r['name']: r['status'] for r in rows})
  return write_results(root, columns, rows)
