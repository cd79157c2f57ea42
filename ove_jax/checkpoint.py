"""Checkpoints on disk: the one module that knows their layout.

Two kinds of directory:

- A training run's checkpoints, `<workdir>/checkpoints/<step>/`, written by orbax's
  CheckpointManager with three items: `state` (params, optimiser state and step as nested dicts
  of arrays), `data` (each process's input-iterator position) and `meta` (the run's config,
  encoder config, process count and mesh). Every read goes through orbax's own API (its step
  listing, its metadata, partial restore): nothing here knows orbax's file names.
- A parameter directory, `params/` (an orbax PyTree of the encoder's parameters as a nested dict
  with string keys, e.g. params['blocks']['0']['mlp']['fc1']['kernel']) and
  `encoder_config.json`, made by `save_params`.

Plain dicts, not module objects, so that refactoring a module never breaks a checkpoint.
Exporting an encoder reads only its parameters (`restore_params`): the optimiser's moments, twice
the parameters' size, are never read. (The release's own format, which ove_jax.convert writes, is
docs/spec.md §1.4.)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from data_pipeline import fileio, paths
from ove_jax import encoder_source, orbax_leftovers, sharding
from ove_jax.models.encoder import PRESETS, Encoder, EncoderConfig

PARAMS_DIR, CONFIG_FILE = 'params', 'encoder_config.json'
CHECKPOINT_DIR = 'checkpoints'  # of a training workdir
STATE, DATA, META = 'state', 'data', 'meta'  # the items of a training checkpoint step
ENCODER = ('params', 'encoder')  # where the encoder sits in the train state

ACCEPTED = (
  f'a training workdir, its {CHECKPOINT_DIR} folder or one step folder; a '
  'release-format (Hugging Face) directory with config.json and model.safetensors (or '
  'shards), or its hub id org/name[@revision] (from the local cache offline); an '
  f'ove_jax parameter directory ({CONFIG_FILE} and {PARAMS_DIR}/); or random:<preset> '
  f'with a preset of {sorted(PRESETS)}'
)


# The URL schemes where orbax can keep checkpoints (besides local paths): gs:// through
# TensorStore's gcs driver. orbax-checkpoint 0.12.8 normalises `s3://bucket/key` to
# `s3:/bucket/key` and then refuses it as not absolute (OCDBT) or writes a local folder named
# `s3:` (without OCDBT); TensorStore's s3 driver would also need an endpoint that orbax never
# passes (docs/storage.md).
CHECKPOINT_SCHEMES = ('gs',)


def check_checkpoint_path(path: str) -> None:
  """Raises ValueError naming `path` and the way out where orbax cannot keep checkpoints (an
  existing file, an s3:// or other non-gs:// URL), before anything is written or trained."""
  if not paths.is_url(path):
    blocked = paths.not_a_folder(path)
    if blocked:
      raise ValueError(f'{path}: {blocked}; give a new or existing folder')
    return
  scheme = path.split('://', 1)[0].lower()
  if scheme not in CHECKPOINT_SCHEMES:
    why = ' (it turns s3://bucket/key into s3:/bucket/key)' if scheme == 's3' else ''
    raise ValueError(
      f'{path}: orbax-checkpoint {ocp.__version__} cannot keep checkpoints at a {scheme}:// '
      f'URL{why}; put the workdir on gs:// or a local path (a bucket mounted with gcsfuse, '
      'mountpoint-s3 or s3fs-fuse is a local path)'
    )


# ------------------------------------------------------------------------------------------------
# Nested dicts
# ------------------------------------------------------------------------------------------------


def nest(flat: dict[tuple, np.ndarray], key=str) -> dict:
  """{('blocks', 0, 'mlp', 'fc1', 'kernel'): a} -> {'blocks': {'0': {...}}}: string keys, or keys
  as `key` makes them (`key=lambda k: k` keeps list indices as ints, as nnx.to_pure_dict does)."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(key(k), {})
    node[key(path[-1])] = value
  return tree


def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
  """The inverse of `nest`; digit-only keys become ints again (list indices)."""
  flat = {}
  for key, value in tree.items():
    k = int(key) if isinstance(key, str) and key.isdigit() else key
    if isinstance(value, dict):
      flat.update(flatten(value, prefix + (k,)))
    else:
      flat[prefix + (k,)] = value
  return flat


# ------------------------------------------------------------------------------------------------
# Parameter directories
# ------------------------------------------------------------------------------------------------


def save_params(directory: str, cfg: EncoderConfig, params: dict[tuple, np.ndarray]) -> str:
  directory = paths.absolute(directory)
  check_checkpoint_path(directory)
  paths.makedirs(directory)
  target = paths.join(directory, PARAMS_DIR)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, nest({k: np.asarray(v) for k, v in params.items()}), force=True)
  checkpointer.wait_until_finished()
  fileio.write_json(paths.join(directory, CONFIG_FILE), dataclasses.asdict(cfg))
  return directory


def encoder_config(fields: dict, source: str) -> EncoderConfig:
  """EncoderConfig from its saved fields (encoder_config.json, a training checkpoint's meta)."""
  known = {f.name for f in dataclasses.fields(EncoderConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'{source}: unknown field {unknown[0]!r}; known fields: {sorted(known)}')
  return EncoderConfig(**fields)


def load_params(directory: str) -> tuple[EncoderConfig, dict[tuple, np.ndarray]]:
  directory = paths.absolute(directory)
  check_checkpoint_path(directory)
  config_path = paths.join(directory, CONFIG_FILE)
  if not paths.isfile(config_path):
    raise FileNotFoundError(
      f'{config_path} is missing; {directory} is not an ove_jax parameter '
      'directory (made by save_params or ove-convert from-hf)'
    )
  cfg = encoder_config(fileio.read_json(config_path), config_path)
  tree = ocp.StandardCheckpointer().restore(paths.join(directory, PARAMS_DIR))
  return cfg, {k: np.asarray(jax.device_get(v)) for k, v in flatten(tree).items()}


# ------------------------------------------------------------------------------------------------
# A training run's checkpoints: managers, steps, meta
# ------------------------------------------------------------------------------------------------


def root_of(workdir: str) -> str:
  """The checkpoints folder of a training workdir (a local folder or a URL: `gs://b/run`
  gives `gs://b/run/checkpoints`, handed to orbax as it is)."""
  return paths.join(paths.absolute(workdir), CHECKPOINT_DIR)


def open_manager(
  root: str,
  *,
  max_to_keep: int | None = None,
  keep_period: int | None = None,
  create: bool = False,
  asynchronous: bool = False,
) -> ocp.CheckpointManager:
  """An orbax CheckpointManager on a checkpoints folder: for writing (the trainer: `create`,
  `asynchronous`, retention) or for reading (the defaults). A reading manager knows the handler
  of every item, so that asking for a step's metadata reads it without orbax warning about items
  it cannot interpret, and reads at most 1 GB at a time (orbax's restore_concurrent_gb), so a
  restore holds its result and little more."""
  check_checkpoint_path(root)
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    keep_period=keep_period,
    create=create,
    enable_async_checkpointing=asynchronous,
  )
  handlers = None
  if not create:
    import grain

    handlers = {
      STATE: ocp.PyTreeCheckpointHandler(restore_concurrent_gb=1),
      META: ocp.JsonCheckpointHandler(),
      DATA: grain.checkpoint.CheckpointHandler(),
    }
  return ocp.CheckpointManager(root, options=options, item_handlers=handlers)


def _steps_in(root: str) -> list[int]:
  if not paths.isdir(root):
    return []
  return sorted(open_manager(root).all_steps())


def list_steps(workdir: str) -> list[int]:
  """The committed checkpoint steps of a training workdir (or of its checkpoints folder), in
  order, as orbax lists them: a step still being written, or cut short, is not among them."""
  for root in (root_of(workdir), paths.absolute(workdir)):
    steps = _steps_in(root)
    if steps:
      return steps
  return []


TRAINING = (
  f'a training workdir (<workdir>/{CHECKPOINT_DIR}/<step>), its checkpoints folder or '
  'one step folder'
)


def locate(path: str, step: int | None = None, *, accepted: str = TRAINING) -> tuple[str, int]:
  """(checkpoints folder, step) for a training workdir, its checkpoints folder or one step
  folder; `step` picks one of a folder's steps (default: the latest). `accepted` is what the
  error says a caller takes when `path` is none of them."""
  path = paths.absolute(path)
  if not paths.isdir(path):
    raise FileNotFoundError(_not_a_directory(path, accepted))
  for root in (root_of(path), path):
    steps = _steps_in(root)
    if steps:
      if step is None:
        return root, steps[-1]
      if step not in steps:
        raise FileNotFoundError(f'{path}: no checkpoint of step {step}; {root} has steps {steps}')
      return root, step
  parent, name = paths.dirname(path), paths.basename(path)
  names = ocp.step.standard_name_format()
  found = [s for s in _steps_in(parent) if names.build_name(s) == name]
  if found and step in (None, found[0]):
    return parent, found[0]
  if found:
    raise FileNotFoundError(f'{path} is the checkpoint of step {found[0]}, not of step {step}')
  raise FileNotFoundError(f'{path}: no committed training checkpoint there; expected {accepted}')


def read_meta(path: str, step: int | None = None) -> dict:
  """The `meta` item of a checkpoint step (config, encoder config, process count, mesh), read
  through orbax; `path` is a workdir, its checkpoints folder or a step folder. {} for a step
  written without one."""
  root, step = locate(path, step)
  return _meta(open_manager(root), step)


class DamagedCheckpointError(ValueError):
  """A committed step whose files cannot be read (a copy or upload cut short, a disk error).
  args: what is wrong (ending with the folder's steps), then ove-convert's way on."""

  def __str__(self) -> str:
    return ', '.join(self.args)


def _read(manager: ocp.CheckpointManager, step: int, what: str, read):
  """read(), with any error of orbax or tensorstore beneath it (plain Exceptions, KeyErrors,
  OSErrors) as a DamagedCheckpointError naming the step and the steps beside it."""
  try:
    return read()
  except Exception as e:  # pylint: disable=broad-except
    orbax_leftovers.quiet()  # the restore's other reads end later: not as tracebacks
    raise _damaged(manager, step, what, str(e).strip().splitlines()[:1]) from e


def _damaged(manager, step: int, what: str, reason: list) -> DamagedCheckpointError:
  steps = sorted(manager.all_steps())
  others = [s for s in steps if s != step]
  way = f'pass another (--step {others[-1]})' if others else 'restore the folder from a copy'
  return DamagedCheckpointError(
    f'{manager.directory} step {step}: {what} cannot be read ({(reason or [""])[0][:200]}); the '
    f'step is incomplete or damaged (a copy or upload cut short, a disk error): it has steps '
    f'{steps}',
    way,
  )


def _items(manager: ocp.CheckpointManager, step: int):
  """The step's item metadata (meta, state, data); a step holding neither meta nor state is
  damaged."""
  items = _read(manager, step, 'the metadata', lambda: manager.metadata(step).item_metadata)
  if META not in items.keys() and STATE not in items.keys():
    raise _damaged(manager, step, 'the train state', ['no meta/ and no state/ in the step'])
  return items


def _meta(manager: ocp.CheckpointManager, step: int) -> dict:
  if META not in _items(manager, step).keys():
    return {}
  args = ocp.args.Composite(**{META: ocp.args.JsonRestore()})
  return dict(_read(manager, step, 'meta/', lambda: manager.restore(step, args=args))[META])


class Position:
  """An input position (`iterator.get_state()`, as JSON) in the form Grain's orbax handler saves."""

  def __init__(self, state_json: str):
    self._json = state_json

  def get_state(self) -> bytes:
    return self._json.encode()


def save(
  manager: ocp.CheckpointManager, step: int, state, position: str, meta: Mapping[str, Any]
) -> None:
  """Saves step `step` (asynchronously with a trainer's manager): the train state, this
  process's input position after the step's batches (JSON) and the run's meta."""
  import grain

  manager.save(
    step,
    args=ocp.args.Composite(
      **{
        STATE: ocp.args.StandardSave(state),
        DATA: grain.checkpoint.CheckpointSave(Position(position)),
        META: ocp.args.JsonSave(json.loads(json.dumps(dict(meta), default=list))),
      }
    ),
  )


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state, iterator=None):
  """The whole train state at `step`, placed as `abstract_state` says (ShapeDtypeStructs with
  shardings: any mesh shape, any process count), and the input iterator moved to where it was
  (this process's own saved position: same process count only; None leaves it alone)."""
  import grain

  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(iterator)
  args = ocp.args.Composite(**items)
  return _read(manager, step, 'state/', lambda: manager.restore(step, args=args))[STATE]


# ------------------------------------------------------------------------------------------------
# Parameters only
# ------------------------------------------------------------------------------------------------


def _child(node, key, where: str):
  """node[key] for a key that may be saved as a string ('0') and asked for as an int (0)."""
  for k in (key, str(key)):
    if isinstance(node, Mapping) and k in node:
      return node[k]
  have = sorted(map(str, node)) if isinstance(node, Mapping) else []
  raise ValueError(f'{where}: no {key!r} in the checkpoint (it has {have})')


def restore_params(
  path: str, step: int | None = None, *, subtree: Sequence[str] = ENCODER, target=None
) -> tuple[Any, dict, int]:
  """(a part of the parameters, the run's meta, step) of a training checkpoint.

  Only the leaves under `subtree` of the train state are read, with orbax's partial restore
  (e.g. ('params', 'encoder'), ('params', 'heads', 'video') or ('params',)): never the optimiser
  state. With `target` (the subtree as jax.ShapeDtypeStructs with shardings, keys as
  nnx.to_pure_dict makes them) the arrays are restored straight onto those shardings, whatever
  mesh wrote them; without it, onto the host as numpy arrays keyed as saved (strings).
  `path` is a training workdir, its checkpoints folder or one step folder.
  """
  root, step = locate(path, step)
  manager = open_manager(root)
  node = _saved(manager, step, subtree, f'{root} step {step}')
  if target is None:
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), node)
  else:
    _check_shapes(node, target, '/'.join(subtree))
    item = target
  return (
    _restore_parts(manager, step, tuple(subtree), item, target is None),
    _meta(manager, step),
    step,
  )


PART_BYTES = 64 * 2**20  # restore at most about this much per orbax call


def _restore_parts(manager: ocp.CheckpointManager, step: int, subtree: tuple, item, host: bool):
  """The leaves of `item` (ShapeDtypeStructs at `subtree` of the state) restored a part at a time
  (a dict of more than PART_BYTES goes key by key), so that what orbax holds in flight besides
  the result stays small: one block of a large encoder, not the whole of it."""
  leaves = jax.tree.leaves(item)
  if (
    isinstance(item, Mapping)
    and len(leaves) > 1
    and sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in leaves) > PART_BYTES
  ):
    return {k: _restore_parts(manager, step, subtree + (k,), v, host) for k, v in item.items()}
  if host:
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  else:
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  nested, nested_args = item, restore_args
  for key in reversed(subtree):
    nested, nested_args = {key: nested}, {key: nested_args}
  args = ocp.args.Composite(
    **{STATE: ocp.args.PyTreeRestore(item=nested, restore_args=nested_args, partial_restore=True)}
  )
  restored = _read(manager, step, 'state/', lambda: manager.restore(step, args=args))[STATE]
  for key in subtree:
    restored = _child(restored, key, 'the restored state')
  return restored


def _saved(manager: ocp.CheckpointManager, step: int, subtree: Sequence[str], where: str):
  """The orbax metadata (shape, dtype) of the train state's leaves under `subtree`."""
  items = _items(manager, step)
  if STATE not in items.keys():
    raise _damaged(manager, step, 'the train state', ['no state/ in the step'])
  node = getattr(items[STATE], 'tree', items[STATE])
  for key in subtree:
    node = _child(node, key, where)
  return node


def param_shapes(path: str, step: int | None = None, *, subtree: Sequence[str] = ('params',)):
  """The shapes (tuples) of the saved leaves under `subtree`, nested as saved; nothing is read
  but orbax's metadata. E.g. `param_shapes(run, subtree=('params', 'heads'))` -> {'video':
  (1024, 768), ...}."""
  root, step = locate(path, step)
  node = _saved(open_manager(root), step, subtree, f'{root} step {step}')
  return jax.tree.map(lambda m: tuple(m.shape), node)


def _check_shapes(saved, target, prefix: str) -> None:
  """Every leaf of `target` exists in `saved` (metadata) with the same shape."""
  if isinstance(target, Mapping):
    for k, v in target.items():
      _check_shapes(_child(saved, k, prefix), v, f'{prefix}/{k}')
  elif tuple(saved.shape) != tuple(target.shape):
    raise ValueError(
      f'{prefix}: shape {tuple(saved.shape)} in the checkpoint, {tuple(target.shape)} here'
    )


def place(host_tree, target_tree, prefix: str = ''):
  """`host_tree` (numpy leaves, keys as saved) placed like `target_tree` (jax arrays or
  ShapeDtypeStructs with shardings, keys as nnx.to_pure_dict makes them): its dtypes and
  shardings. A missing key or a shape that differs is a ValueError naming the key."""
  if isinstance(target_tree, Mapping):
    return {
      k: place(
        _child(host_tree, k, prefix or 'the source'), v, f'{prefix}/{k}' if prefix else str(k)
      )
      for k, v in target_tree.items()
    }
  value = np.asarray(host_tree)
  if tuple(value.shape) != tuple(target_tree.shape):
    raise ValueError(
      f'{prefix}: shape {tuple(value.shape)} in the source, {tuple(target_tree.shape)} in this run'
    )
  return jax.device_put(value.astype(target_tree.dtype, copy=False), target_tree.sharding)


# ------------------------------------------------------------------------------------------------
# One encoder from anywhere
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedEncoder:
  """An encoder ready for inference (float32, no remat, XLA attention) and where it came from."""

  model: Encoder
  config: EncoderConfig
  step: int | None  # the training step, for a training checkpoint
  heads: list[str]  # the cluster heads the checkpoint also holds (not loaded)
  source: str  # for people: 'training run /x step 20', 'random init base', ...


def _inference(cfg: EncoderConfig) -> EncoderConfig:
  return dataclasses.replace(cfg, dtype='float32', remat='none', attention='xla')


def encoder_from_tree(cfg: EncoderConfig, tree: dict, source: str) -> Encoder:
  """An encoder whose parameters are `tree` (nested, numpy leaves), built without a random init.
  Leaves are moved into the model one at a time and dropped from `tree` (which is emptied), so
  the parameters are held once, not twice. With a mesh set, each is placed by its logical axes."""
  from flax import nnx

  abstract = nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = flatten(tree)
  tree.clear()
  mesh = sharding.current_mesh()
  leaves = []
  for path, var in nnx.to_flat_state(state):
    name = '/'.join(map(str, path))
    if path not in flat:
      raise ValueError(f'{source}: parameter {name} is missing')
    value = flat.pop(path)
    expected = var.get_raw_value().shape
    if tuple(value.shape) != tuple(expected):
      raise ValueError(
        f'{source}: parameter {name} has shape {tuple(value.shape)}, expected {tuple(expected)}'
      )
    spec = sharding.logical_to_spec(var.get_metadata().get('out_sharding') or ()) if mesh else None
    leaves.append((path, var.replace(jax.device_put(np.asarray(value, np.float32), spec))))
    del value
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def encoder_source_error(path: str) -> str | None:
  """Why `load_encoder` cannot read `path` (no such directory, nor random:<preset>, nor a hub
  id), without reading it; None when it may."""
  if encoder_source.encoder_kind(path) in ('random', 'hub') or paths.isdir(paths.absolute(path)):
    return None
  return _not_a_directory(path, ACCEPTED)


def _not_a_directory(path: str, accepted: str) -> str:
  if paths.isfile(paths.absolute(path)):
    from ove_jax.convert import hub

    return f'{hub.file_not_directory(paths.absolute(path))}: {accepted}'
  return f'{path}: no such directory; expected {accepted}'


def load_encoder(path: str, *, step: int | None = None, seed: int = 0) -> LoadedEncoder:
  """The encoder of `path`: a training workdir, its checkpoints folder or one step folder (only
  the encoder's parameters are read), a release-format / Hugging Face directory, an ove_jax
  parameter directory, or `random:<preset>` (a fresh init with `seed`). `step` picks a training
  checkpoint (default: the latest; for anything else than a training run it is a ValueError).
  FileNotFoundError / ValueError name the path and what is accepted."""
  kind = encoder_source.encoder_kind(path)  # one decision, shared with the probe suite
  if step is not None and kind != 'training':
    raise ValueError(
      f'{path}: step={step} picks a checkpoint of a training run, and this is '
      f'{encoder_source.ENCODER_KINDS[kind]}'
    )
  if kind == 'random':
    preset = path.split(':', 1)[1]
    if preset not in PRESETS:
      raise ValueError(f'{path}: unknown preset {preset!r}; choose one of {sorted(PRESETS)}')
    from flax import nnx

    cfg = _inference(EncoderConfig.preset(preset))
    return LoadedEncoder(
      Encoder(cfg, rngs=nnx.Rngs(seed)), cfg, None, [], f'random init {preset} (seed {seed})'
    )
  full = paths.absolute(path)
  error = encoder_source_error(path)
  if error:
    raise FileNotFoundError(error)
  if kind == 'hub':  # org/name[@rev]: the hub's cache
    from ove_jax import convert

    model = convert.load_pytorch(path)
    return LoadedEncoder(model, model.cfg, None, [], f'Hugging Face hub id {path}')
  # A training workdir holds a config.json too (the experiment's): the weights file decides, or,
  # without one, a release config.json (then load_pytorch names the missing weights file). A
  # gs:// / s3:// URL is read in place (convert.hf reads through data_pipeline.paths).
  if kind == 'release':
    from ove_jax import convert

    model = convert.load_pytorch(full)
    return LoadedEncoder(model, model.cfg, None, [], f'release-format directory {full}')
  if kind == 'params':
    cfg, flat = load_params(full)
    cfg = _inference(cfg)
    return LoadedEncoder(
      encoder_from_tree(cfg, nest(flat), full), cfg, None, [], f'ove_jax parameter directory {full}'
    )
  root, found = locate(full, step, accepted=ACCEPTED)
  meta = read_meta(root, found)
  where = f'{root} step {found}'
  heads = sorted(meta['config'].get('heads', {})) if 'config' in meta else []
  cfg = _inference(
    encoder_config(_child(meta, 'encoder_config', f'{where} meta'), f'{where} (meta)')
  )
  if sharding.current_mesh() is not None:  # placed by the logical axes on that mesh
    model = encoder_from_tree(cfg, restore_params(root, found)[0], where)
  else:  # straight into device arrays: the parameters are held once, with no host copy
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, np.float32, sharding=device), nnx.to_pure_dict(state)
    )
    nnx.replace_by_pure_dict(state, restore_params(root, found, target=target)[0])
    model = nnx.merge(graphdef, state)
  return LoadedEncoder(model, cfg, found, heads, f'training run {full} step {found}')
