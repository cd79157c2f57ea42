"""Experiment configs: `get_config(arg)` argument strings, loading, overrides, validation.

An experiment is a Python file with `get_config(arg)` returning an ml_collections ConfigDict
built on `defaults()` (every key and its default: ove_jax/config_defaults.py, re-exported here).
The repository's `experiments/` folder ships with the package (installed as `ove_jax_experiments`),
so an experiment is named from any directory, or given by path:

  ove-train --config=demo_cpu:smoke --workdir=/tmp/run \\
      --config.total_steps=50 --config.optim.lr=3e-4
  ove-train --config=experiments/demo_cpu.py:smoke ...    (the same file; or any other path)

Every key or value error (an unknown key, a value outside its allowed set, a mesh that does not
divide the devices, a batch that does not divide the mesh) is a `ConfigError` that names the key
and what it accepts, raised before anything is compiled.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import math
import os
from typing import Any, Mapping, Sequence

import ml_collections

from ove_jax.config_defaults import FIXED_SECTIONS, defaults
from ove_jax.config_defaults import cpu_smoke as cpu_smoke  # experiments call config_lib.cpu_smoke

INIT_HEADS = ('keep', 'matching', 'fresh')


class ConfigError(ValueError):
  """A wrong key or value in an experiment config or an override."""


HEAD_LOSS_KEYS = (
  'sample_rate',
  'num_slots',
  'margin',
  'scale',
  'filter_threshold',
  'sampling_blocks',
  'positive_headroom',
)


def head(num_classes: int, weight: float = 1.0, **loss_overrides) -> ml_collections.ConfigDict:
  """One head's section: its classes, loss weight, and any of the `loss` keys for this head alone
  (None: the `loss` section's value), so `--config.heads.video.sample_rate=0.2` works."""
  unknown = sorted(set(loss_overrides) - set(HEAD_LOSS_KEYS))
  if unknown:
    raise ConfigError(f'head(): unknown loss key(s) {unknown}; allowed: {list(HEAD_LOSS_KEYS)}')
  fields = {k: loss_overrides.get(k) for k in HEAD_LOSS_KEYS}
  return ml_collections.ConfigDict(dict(num_classes=num_classes, weight=weight, **fields))


# ------------------------------------------------------------------------------------------------
# get_config(arg): typed argument strings such as 'variant=L/14,frames=64,smoke'
# ------------------------------------------------------------------------------------------------


def parse_arg(arg: str | None, **defaults_: Any) -> ml_collections.ConfigDict:
  """Parses `arg` against typed defaults; a bare word is a boolean flag set to True."""
  out = ml_collections.ConfigDict(defaults_)
  for item in (arg or '').split(','):
    item = item.strip()
    if not item:
      continue
    key, eq, text = item.partition('=')
    key = key.strip()
    if key not in defaults_:
      raise ConfigError(
        f'unknown experiment argument {key!r}; allowed: '
        f'{", ".join(f"{k}={v!r}" for k, v in defaults_.items())}'
      )
    out[key] = _coerce(f'argument {key}', defaults_[key], text.strip() if eq else 'true')
  return out


def _coerce(name: str, current: Any, text: str) -> Any:
  if isinstance(current, bool):
    low = text.lower()
    if low in ('1', 'true', 'yes', 'on'):
      return True
    if low in ('0', 'false', 'no', 'off'):
      return False
    raise ConfigError(f'{name}={text!r}: expected true or false')
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f'{name}={text!r}: expected an integer') from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f'{name}={text!r}: expected a number') from None
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f'{name}={text!r}: expected a Python literal such as (1, 8)') from None
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  return value


# ------------------------------------------------------------------------------------------------
# Loading and overriding
# ------------------------------------------------------------------------------------------------

EXPERIMENTS_PACKAGE = 'ove_jax_experiments'  # setup.cfg installs experiments/ under this name


def experiments_dir() -> str:
  """The folder of the experiments that ship with ove_jax: in a source checkout (this package's
  folder beside setup.cfg, whether installed editable or put on PYTHONPATH) its `experiments/`,
  else the installed `ove_jax_experiments` (a namespace package: located, never imported)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  checkout = os.path.join(root, 'experiments')
  if os.path.isfile(os.path.join(root, 'setup.cfg')) and os.path.isdir(checkout):
    return checkout
  try:
    found = importlib.util.find_spec(EXPERIMENTS_PACKAGE)
  except (ImportError, ValueError):
    found = None
  if found is not None and found.submodule_search_locations:
    return os.path.abspath(list(found.submodule_search_locations)[0])
  raise ConfigError(
    f'the experiments that ship with ove_jax are not installed (no package '
    f'{EXPERIMENTS_PACKAGE!r} and no checkout at {root}); reinstall ove_jax, or '
    'give an experiment file by path'
  )


def experiment_names() -> list[str]:
  """The names of the shipped experiments (`stage2_video`, ...), sorted."""
  return sorted(
    name[:-3]
    for name in os.listdir(experiments_dir())
    if name.endswith('.py') and not name.startswith(('_', '.'))
  )


def experiment_path(name_or_path: str) -> str:
  """The file of an experiment given by path (`experiments/stage2_video.py`, `my/exp.py`) or by
  name (`stage2_video`, `stage2_video.py`). A path that exists is that file; otherwise a bare
  name, or the repository's spelling `experiments/<name>.py`, is the shipped experiment, so
  README's commands also work outside a checkout."""
  text = name_or_path.strip()
  if os.path.isfile(text):
    return text
  head, base = os.path.split(text)
  name = base[:-3] if base.endswith('.py') else base
  if os.path.normpath(head) in ('.', 'experiments') and name:
    shipped = os.path.join(experiments_dir(), f'{name}.py')
    if os.path.isfile(shipped):
      return shipped
  if os.path.isdir(text):
    raise ConfigError(
      f'--config={name_or_path}: {text!r} is a folder, not an experiment file; give the '
      f'experiment file in it (--config={os.path.join(text, "NAME.py")}[:args])'
    )
  names = experiment_names()
  raise ConfigError(
    f'--config={name_or_path}: no experiment file {text!r} and no shipped '
    f'experiment of that name; the experiments are {", ".join(names)} (in '
    f'{experiments_dir()}): give one by name (--config=NAME[:args]) or a path '
    'to your own file (--config=path/to/exp.py[:args])'
  )


def split_spec(spec: str) -> tuple[str, str]:
  """'name_or_path[:arg]' -> (the experiment's file, arg or '')."""
  where, _, arg = spec.partition(':')
  return experiment_path(where), arg


def load_experiment(spec: str):
  """(module, arg) of `name_or_path[:arg]`: the experiment file imported, its argument string."""
  path, arg = split_spec(spec)
  return load_module(path), arg


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`name[:arg]` or `path/to/experiment.py[:arg]` with `key.sub=value` overrides applied, then
  validated."""
  module, arg = load_experiment(spec)
  if getattr(module, 'PROBE_SUITE', False):
    raise ConfigError(
      f'--config={spec}: {module.__file__} holds probe benchmarks, not a '
      f'training run; run it with ove-probe-suite --config={spec} ...'
    )
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{module.__file__} has no get_config(arg) function')
  try:
    config = module.get_config(arg or None)
  except ConfigError:
    raise
  except Exception as e:  # a bad argument, or the experiment's own bug
    raise ConfigError(f'{module.__file__}: get_config({arg!r}) failed: {error_text(e)}') from None
  for item in overrides:
    apply_override(config, item)
  validate(config)
  return config


def load_module(path: str):
  """Imports an experiment file by path (experiments are files, not a package); an experiment
  builds on another with `load_module(os.path.join(os.path.dirname(__file__), 'other.py'))`."""
  name = f'ove_experiment_{os.path.splitext(os.path.basename(path))[0]}'
  # The loader given: without it a file not named .py (`mycfg`, `notes.txt`) gets no spec.
  module_spec = importlib.util.spec_from_file_location(
    name, path, loader=importlib.machinery.SourceFileLoader(name, path)
  )
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except ConfigError:
    raise
  except Exception as e:  # the experiment's own code: a syntax error, a failed import, ...
    raise ConfigError(f'{path} cannot be loaded: {error_text(e)}') from None
  return module


def error_text(e: BaseException) -> str:
  """An exception of an experiment file's code in one line (a syntax error with its line)."""
  if isinstance(e, SyntaxError):
    return f'SyntaxError: {e.msg} (line {e.lineno})'
  return f'{type(e).__name__}: {e}'


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """Applies 'a.b=value' (the text after --config.)."""
  key, eq, text = item.partition('=')
  if not eq:
    raise ConfigError(f'--config.{item}: expected --config.{key}=VALUE')
  node, parts = config, key.split('.')
  for depth, part in enumerate(parts):
    where = '.'.join(parts[:depth]) or 'the config'
    if parts[:depth] == ['eval_sources'] and depth == len(parts) - 1:
      with config.unlocked():
        node[part] = text  # a mapping of head -> source: new keys are expected
      return
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      known = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
      raise ConfigError(
        f'--config.{key}: {where} has no key {part!r}; its keys: {", ".join(known)}'
      )
    if depth == len(parts) - 1:
      current = node[part]
      if isinstance(current, (ml_collections.ConfigDict, dict)):
        raise ConfigError(
          f'--config.{key} is a section ({", ".join(sorted(current.keys()))}); set one of its keys'
        )
      with config.unlocked():
        node[part] = _coerce(f'--config.{key}', current, text)
    else:
      node = node[part]


# ------------------------------------------------------------------------------------------------
# Validation (no devices needed; the trainer checks the mesh against the devices it has)
# ------------------------------------------------------------------------------------------------


def _one_of(key, value, allowed):
  if value not in allowed:
    raise ConfigError(f'{key}={value!r}; allowed values: {", ".join(map(str, allowed))}')


def _at_least(key, value, low):
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    raise ConfigError(f'{key}={value!r}; must be an integer >= {low}')


def validate(config: ml_collections.ConfigDict) -> None:
  from data_pipeline import pipeline
  from data_pipeline.codec.options import POLICIES
  from ove_jax import optim
  from ove_jax.metrics import check_writers
  from ove_jax.models import PRESETS
  from ove_jax.models.attention import IMPLEMENTATIONS
  from ove_jax.models.encoder import REMAT_POLICIES, ROPE_VARIANTS

  missing = sorted(set(defaults().keys()) - set(config.keys()))
  if missing:
    raise ConfigError(
      f'the config lacks {", ".join(missing)}: build it on ove_jax.config.defaults()'
    )
  unknown = sorted(set(config.keys()) - set(defaults().keys()))
  if unknown:
    raise ConfigError(
      f'unknown top-level key(s) {", ".join(unknown)}; known: '
      f'{", ".join(sorted(defaults().keys()))}'
    )
  reference = defaults()
  for section in FIXED_SECTIONS:
    extra = sorted(set(config[section].keys()) - set(reference[section].keys()))
    lacking = sorted(set(reference[section].keys()) - set(config[section].keys()))
    if extra or lacking:
      raise ConfigError(
        f'{section}: '
        + '; '.join(
          ([f'unknown key(s) {extra}'] if extra else [])
          + ([f'missing key(s) {lacking}'] if lacking else [])
        )
        + f'; its keys: {", ".join(sorted(reference[section].keys()))}'
      )
  for key in (
    'total_steps',
    'log_every',
    'checkpoint_every',
    'keep_checkpoints',
    'accumulate',
    'eval_steps',
  ):
    _at_least(key, config[key], 1)
  for key in ('keep_every', 'eval_every', 'probe_every', 'profile_steps', 'cpu_devices'):
    _at_least(key, config[key], 0)
  for key in ('watchdog_seconds', 'watchdog_first_step_seconds'):
    if not isinstance(config[key], (int, float)) or config[key] < 0:
      raise ConfigError(
        f'{key}={config[key]!r}; must be a number of seconds >= 0 (0: off / default)'
      )
  if config.keep_every and config.keep_every % config.checkpoint_every:
    raise ConfigError(
      f'keep_every={config.keep_every} must be a multiple of checkpoint_every='
      f'{config.checkpoint_every} (only saved steps can be kept)'
    )
  if config.optim.warmup >= 1 and config.optim.warmup != int(config.optim.warmup):
    raise ConfigError(
      f'optim.warmup={config.optim.warmup}: a step count (a whole number >= 1) '
      'or a fraction of total_steps (< 1)'
    )
  if config.eval_every and config.eval_every % config.log_every:
    raise ConfigError(
      f'eval_every={config.eval_every} must be a multiple of log_every='
      f'{config.log_every} (evaluations are logged on metrics lines)'
    )
  if config.probe_every:
    from ove_jax import training_probes  # JAX and the probes, only for runs that probe

    training_probes.check(config)

  try:
    check_writers(config.metrics.writers)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _one_of('metrics.wandb_mode', config.metrics.wandb_mode, ('', 'online', 'offline', 'disabled'))

  m = config.model
  _one_of('model.preset', m.preset, sorted(PRESETS))
  _one_of('model.dtype', m.dtype, ('float32', 'bfloat16', 'float16'))
  _one_of('model.remat', m.remat, REMAT_POLICIES)
  _one_of('model.attention', m.attention, IMPLEMENTATIONS)
  _one_of('model.rope', m.rope, ROPE_VARIANTS)
  if m.get('scan_layers') is not None and type(m.scan_layers) is not bool:  # 'yes', 1
    raise ConfigError(
      f'model.scan_layers={m.scan_layers!r}; allowed values: True, False, None (the preset '
      'decides: scanned for base/large/huge); on the command line --config.model.scan_layers=False'
    )
  _one_of('builtin.policy', config.builtin.policy, POLICIES)

  sizes = {k: v for k, v in config.mesh.items() if not k.startswith('dcn_')}
  if sum(v == -1 for v in sizes.values()) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
    raise ConfigError(f'mesh {sizes}: sizes are >= 1, and at most one may be -1 (the rest)')
  for axis, size in sizes.items():
    _at_least(f'mesh.dcn_{axis}', config.mesh[f'dcn_{axis}'], 1)
    if size != -1 and size % config.mesh[f'dcn_{axis}']:
      raise ConfigError(
        f'mesh.dcn_{axis}={config.mesh[f"dcn_{axis}"]} must divide mesh.{axis}='
        f'{size} (the slices or nodes the axis spans)'
      )
  for key in ('initialization_timeout', 'heartbeat_timeout'):
    _at_least(f'distributed.{key}', config.distributed[key], 1)

  _one_of('init.heads', config.init.heads, INIT_HEADS)
  if config.init.pytorch and config.init.checkpoint:
    raise ConfigError('init.pytorch and init.checkpoint are both set; choose one')

  o = config.optim
  _one_of('optim.decay', o.decay, optim.DECAYS)
  _one_of('optim.weight_decay_mask', o.weight_decay_mask, optim.DECAY_MASKS)
  if not o.lr > 0 or o.warmup < 0 or not 0 <= o.end_lr_fraction <= 1:
    raise ConfigError(
      f'optim: lr={o.lr} must be > 0, warmup={o.warmup} >= 0 (steps, or a '
      f'fraction < 1), end_lr_fraction={o.end_lr_fraction} in [0, 1]'
    )

  heads = set(config.heads.keys())
  data_heads = set(config.data.heads.keys())
  if not heads:
    raise ConfigError('no heads: set heads.<name> = ove_jax.config.head(num_classes)')
  if heads != data_heads:
    raise ConfigError(
      f'heads {sorted(heads)} and data.heads {sorted(data_heads)} must name the same heads'
    )
  for name in sorted(heads):
    head_loss_config(config, name)  # raises on bad loss values
  if config.accumulate > 1 and config.data.mixing != 'all':
    raise ConfigError('accumulate > 1 needs data.mixing="all" (every micro-batch has every head)')
  try:
    pipeline.PipelineConfig.from_dict(
      pipeline_dict(config, placeholder_sources=True, source_overrides=dict(config.eval_sources))
    )
  except (ValueError, TypeError) as e:
    raise ConfigError(f'data: {e}') from None


def check_layout(
  config, mesh_shape: Mapping[str, int], batch_axes: Sequence[str], process_count: int
) -> None:
  """What a mesh of `mesh_shape` (batch split over `batch_axes`) must fit for this config: every
  head's class blocks, every head's global rows, and whole batch shards for each process."""
  devices = math.prod(mesh_shape.values())
  for name in config.heads:
    inherited = config.heads[name].get('sampling_blocks') is None  # fixed for every head then
    try:
      head_loss_config(config, name).check_devices(
        devices, name, 'loss.sampling_blocks' if inherited else ''
      )
    except ValueError as e:
      note = f' (inherited by heads.{name} and every head without its own)' if inherited else ''
      raise ConfigError(f'{e}{note}') from None
  batch_shards = math.prod(mesh_shape[a] for a in batch_axes)
  axes = ' x '.join(batch_axes)
  for name, h in config.data.heads.items():
    if h.rows % batch_shards:
      raise ConfigError(
        f'data.heads.{name}.rows={h.rows} (global rows) is not divisible by the '
        f'{batch_shards} batch shards of the mesh ({axes}); set it to a multiple of '
        f'{batch_shards} (e.g. --config.data.heads.{name}.rows='
        f'{batch_shards * max(1, round(h.rows / batch_shards))}) or use fewer batch shards'
      )
  if batch_shards % process_count:
    raise ConfigError(
      f'the mesh has {batch_shards} batch shards ({axes}) for {process_count} processes: each '
      'process must feed whole batch shards, so make mesh.data x mesh.fsdp a multiple of the '
      'process count'
    )


def head_loss_config(config, name: str):
  from ove_jax import losses

  h = dict(config.heads[name])
  allowed = {'num_classes', 'weight'} | set(HEAD_LOSS_KEYS)
  unknown = sorted(set(h) - allowed)
  if unknown:
    raise ConfigError(f'heads.{name}: unknown key(s) {unknown}; allowed: {sorted(allowed)}')
  if 'num_classes' not in h:
    raise ConfigError(f'heads.{name}.num_classes is not set')
  merged = {**dict(config.loss), **{k: v for k, v in h.items() if v is not None}}
  try:
    return losses.PartialFCConfig(
      num_classes=merged['num_classes'],
      sample_rate=merged['sample_rate'],
      num_slots=merged['num_slots'],
      margin=merged['margin'],
      scale=merged['scale'],
      filter_threshold=merged['filter_threshold'],
      sampling_blocks=merged['sampling_blocks'],
      positive_headroom=merged['positive_headroom'],
      seed=config.seed,
    )
  except ValueError as e:
    # Name the key the user set: the head's own, else the loss default it inherits.
    field = str(e).split('=', 1)[0]
    if h.get(field) is not None:
      key = f'heads.{name}.{field}'
    elif field in config.loss:
      key = f'loss.{field} (inherited by heads.{name})'
    else:
      key = f'heads.{name}'
    raise ConfigError(f'{key}: {e}') from None


def pipeline_dict(
  config,
  *,
  process_index: int = 0,
  process_count: int = 1,
  sources: Mapping[str, str] | None = None,
  placeholder_sources: bool = False,
  source_overrides: Mapping[str, str] | None = None,
) -> dict:
  """The PipelineConfig dict of this host: global rows divided among the hosts, builtin sources
  filled in, and any head's source replaced by `source_overrides` (evaluation)."""
  data = config.data.to_dict()
  heads = {}
  overrides = dict(source_overrides or {})
  unknown = sorted(set(overrides) - set(data['heads']))
  if unknown:
    raise ConfigError(
      f'eval_sources names head(s) {unknown}; the heads are {sorted(data["heads"])}'
    )
  for name, h in data.pop('heads').items():
    h = dict(h)
    if name in overrides:
      h['source'] = overrides[name]
    rows = h.get('rows', 8)
    if rows % process_count:
      raise ConfigError(
        f'data.heads.{name}.rows={rows} (global) is not divisible by the {process_count} processes'
      )
    h['rows'] = rows // process_count
    src = h.get('source', '')
    if isinstance(src, str) and src.startswith('{builtin:'):
      if placeholder_sources:
        src = '/dev/null'
      elif sources is None or src not in sources:
        raise ConfigError(f'data.heads.{name}.source={src!r} needs builtin.enabled=True')
      else:
        src = sources[src]
    h['source'] = src
    heads[name] = h
  data['heads'] = heads
  data.update(seed=data.get('seed', 0), process_index=process_index, process_count=process_count)
  return data


def flatten(config, prefix: str = '') -> dict[str, Any]:
  """{'optim.lr': 0.001, ...}: the config as sorted dotted keys (golden snapshots, logs)."""
  out = {}
  for key in sorted(config.keys()):
    value = config[key]
    name = f'{prefix}{key}'
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = value
  return out
