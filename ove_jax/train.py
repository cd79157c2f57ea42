"""The one trainer: cluster-discrimination pretraining of the encoder on a device mesh.

  python -m ove_jax.train --config=experiments/demo_cpu.py[:args] --workdir=DIR \\
      [--config.key=value ...]

Reads top to bottom: command line, mesh, model and optimiser, sharded init, step, data,
checkpoints (save / restore / initialise from another run), evaluation, the loop. A restart in
the same workdir resumes from its last checkpoint: parameters, optimiser, step and every host's
input-iterator position, so the resumed run repeats the uninterrupted one exactly.

Multi-host: run one copy per host (tools/launch_local.py does it on one machine); each loads its
share of the global batch, every process writes its part of the checkpoints, only process 0
writes metrics.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from data_pipeline import fileio, tokens
from ove_jax import config as config_lib
from ove_jax import checkpoint, distributed, losses, metrics as metrics_lib, optim, sharding
from ove_jax.models import Encoder, EncoderConfig, encoder_flops

log = logging.getLogger('ove_jax.train')

CHECKPOINT_DIR = checkpoint.CHECKPOINT_DIR
BATCH_FIELDS = ('patches', 'positions', 'segment_ids', 'labels', 'segment_valid', 'sample_index',
                'skipped')


class TrainingError(RuntimeError):
  """The run cannot go on (diverged, data ran out); the message says what and where."""


# ------------------------------------------------------------------------------------------------
# Mesh
# ------------------------------------------------------------------------------------------------

def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
  """The config's mesh sizes (`config.mesh`, one may be -1) resolved for `num_devices`."""
  try:
    return sharding.mesh_shape(dict(config.mesh), num_devices)
  except ValueError as e:
    raise config_lib.ConfigError(f'{e} (e.g. --config.mesh.data=-1)') from None


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  mesh_shape(config, len(devices))
  return sharding.make_mesh(dict(config.mesh), devices)


def rules_of(config) -> tuple:
  custom = {name: axes for name, axes in (config.rules or ())}
  return tuple((name, custom.pop(name, axes)) for name, axes in sharding.DEFAULT_RULES) + tuple(
      custom.items())


# ------------------------------------------------------------------------------------------------
# Model and optimiser
# ------------------------------------------------------------------------------------------------

def encoder_config(config) -> EncoderConfig:
  m = config.model
  return EncoderConfig.preset(m.preset, dtype=m.dtype, remat=m.remat, attention=m.attention,
                              rope_theta=m.rope_theta, rope=m.rope)


class PretrainModel(nnx.Module):
  """The encoder and one matrix of class centres per head (rows sharded by `classes`)."""

  def __init__(self, cfg: EncoderConfig, heads: Mapping[str, losses.PartialFCConfig], *,
               rngs: nnx.Rngs, rules=sharding.DEFAULT_RULES, init_std: float = 0.01):
    self.encoder = Encoder(cfg, rngs=rngs, rules=rules)
    init = nnx.with_partitioning(nnx.initializers.normal(init_std), ('classes', 'centre_embed'),
                                 sharding_rules=rules)
    eager = sharding.current_mesh() is not None
    with nnx.use_eager_sharding(eager):
      self.heads = nnx.Dict({name: nnx.Param(init(rngs.params(), (h.padded_classes, cfg.width)))
                             for name, h in sorted(heads.items())})


def _nest(items) -> dict:
  # Keys as they are (ints for list indices), the layout of nnx.to_pure_dict.
  return checkpoint.nest(dict(items), key=lambda k: k)




class Program:
  """What one config compiles on one mesh: sharded init, the train step, the eval step."""

  def __init__(self, config, mesh: jax.sharding.Mesh):
    self.config, self.mesh = config, mesh
    self.rules = rules_of(config)
    self.encoder_cfg = encoder_config(config)
    self.heads = {name: config_lib.head_loss_config(config, name) for name in config.heads}
    for name, h in self.heads.items():
      try:
        h.check_devices(mesh.size, name)
      except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    self.weights = {name: float(config.heads[name].get('weight', 1.0)) for name in self.heads}
    self.accumulate = config.accumulate
    self.batch_axes = sharding.batch_axes(mesh, self.rules)
    batch_shards = int(np.prod([mesh.shape[a] for a in self.batch_axes]))
    for name, h in config.data.heads.items():
      if h.rows % batch_shards:
        raise config_lib.ConfigError(
            f'data.heads.{name}.rows={h.rows} (global rows) is not divisible by the '
            f'{batch_shards} batch shards of the mesh ({" x ".join(self.batch_axes)})')
    if batch_shards % jax.process_count():
      raise config_lib.ConfigError(
          f'the mesh has {batch_shards} batch shards ({" x ".join(self.batch_axes)}) for '
          f'{jax.process_count()} processes: each process must feed whole batch shards, so make '
          'mesh.data x mesh.fsdp a multiple of the process count')
    self.tx, self.lr = optim.make(config.optim, config.total_steps)

    with jax.set_mesh(mesh):
      abstract = nnx.eval_shape(self._model)
    self.graphdef, abstract_state = nnx.split(abstract)
    flat = nnx.to_flat_state(abstract_state)
    self.param_shardings = _nest(
        (path, NamedSharding(mesh, sharding.logical_to_spec(
            var.get_metadata().get('out_sharding') or (), self.rules))) for path, var in flat)
    abstract_params = nnx.to_pure_dict(abstract_state)
    replicated = NamedSharding(mesh, P())
    opt_abstract = jax.eval_shape(self.tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, opt_abstract, self.param_shardings,
        transform_non_params=lambda _: replicated)
    self.state_shardings = {'params': self.param_shardings, 'opt_state': opt_shardings,
                            'step': replicated}
    abstract_state_tree = {'params': abstract_params, 'opt_state': opt_abstract,
                           'step': jax.ShapeDtypeStruct((), jnp.int32)}
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state_tree, self.state_shardings)
    self.init = jax.jit(self._init, out_shardings=self.state_shardings)
    self.step = jax.jit(self._step, out_shardings=(self.state_shardings, replicated),
                        donate_argnums=0)
    self.evaluate = jax.jit(self._evaluate, out_shardings=replicated)

  def _model(self) -> PretrainModel:
    return PretrainModel(self.encoder_cfg, self.heads, rngs=nnx.Rngs(self.config.seed),
                         rules=self.rules, init_std=self.config.loss.init_std)

  def _init(self):
    params = nnx.to_pure_dict(nnx.state(self._model()))
    return {'params': params, 'opt_state': self.tx.init(params),
            'step': jnp.zeros((), jnp.int32)}

  # ----------------------------------------------------------------------------------------------
  # The step
  # ----------------------------------------------------------------------------------------------

  def _loss(self, params, micro_batch, step, micro):
    model = nnx.merge(self.graphdef, params)
    total, aux = 0.0, {}
    for name in sorted(micro_batch):
      b = micro_batch[name]
      patches = b['patches']
      if patches.dtype == jnp.uint8:
        patches = tokens.normalize(patches)
      rows, segments, n = b['labels'].shape
      out = model.encoder(patches, b['positions'], b['segment_ids'], num_segments=segments)
      e = out['pooled'].reshape(rows * segments, -1)
      res = losses.partial_fc_loss(
          e, b['segment_valid'].reshape(-1), b['labels'].reshape(rows * segments, n),
          b['sample_index'].reshape(-1), model.heads[name][...], step, self.heads[name],
          self.rules, micro=micro)
      total = total + self.weights[name] * res['loss']
      aux.update({f'{name}/{k}': v for k, v in res.items()})
    aux['loss'] = total
    return total, aux

  def _grads(self, params, batch, step):
    """Mean gradient and metrics over the micro-batches of `batch` ([A, rows, ...] leaves)."""
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)

    def body(carry, micro):
      acc, i = carry
      (_, aux), grads = grad_fn(params, micro, step, i)
      return (jax.tree.map(jnp.add, acc, grads), i + 1), aux

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, _), aux = jax.lax.scan(body, (zeros, jnp.int32(0)), batch)
    grads = jax.tree.map(lambda g: g / self.accumulate, grads)
    aux = {k: jnp.sum(v) if k.endswith('/dropped') else jnp.mean(v) for k, v in aux.items()}
    return grads, aux

  def _step(self, state, batch):
    params, step = state['params'], state['step']
    grads, aux = self._grads(params, batch, step)
    updates, opt_state = self.tx.update(grads, state['opt_state'], params)
    params = optax.apply_updates(params, updates)
    aux.update({f'grad_norm/{g}': n for g, n in optim.group_norms(grads).items()})
    aux['param_norm'] = optax.tree.norm(params)
    aux['lr'] = self.lr(step)
    # Counted on the global batch (every host's rows), not on the host that logs.
    aux['clips'] = sum(jnp.sum(b['segment_valid']) for b in batch.values()).astype(jnp.float32)
    aux['tokens'] = sum(jnp.sum(b['segment_ids'] > 0) for b in batch.values()).astype(jnp.float32)
    aux['skipped'] = sum(jnp.sum(b['skipped']) for b in batch.values()).astype(jnp.float32)
    return {'params': params, 'opt_state': opt_state, 'step': step + 1}, aux

  def _evaluate(self, params, batch, step):
    aux = jax.lax.map(lambda micro: self._loss(params, micro, step, 0)[1], batch)
    return {k: jnp.sum(v) if k.endswith('/dropped') else jnp.mean(v) for k, v in aux.items()}

  # ----------------------------------------------------------------------------------------------
  # Host batches -> global arrays
  # ----------------------------------------------------------------------------------------------

  def device_batch(self, host_batches: Sequence[Mapping[str, Mapping[str, np.ndarray]]]):
    """Stacks this host's micro-batches ({head: fields}) and makes global [A, rows, ...] arrays
    whose rows are split over the batch axes of the mesh, each host holding its share."""
    heads = sorted(host_batches[0])
    out = {}
    for name in heads:
      fields = {}
      for key in BATCH_FIELDS:
        if key == 'skipped':  # this host's dropped records, on its first row (summed in the step)
          rows = np.asarray(host_batches[0][name]['segment_valid']).shape[0]
          local = np.zeros((len(host_batches), rows), np.int32)
          local[:, 0] = [int(b[name]['num_skipped']) for b in host_batches]
        else:
          local = np.stack([np.asarray(b[name][key]) for b in host_batches])
        if key == 'sample_index':
          local = (local % (2**31 - 1)).astype(np.int32)
        spec = P(None, self.batch_axes or None)
        global_shape = (local.shape[0], local.shape[1] * jax.process_count()) + local.shape[2:]
        fields[key] = jax.make_array_from_process_local_data(
            NamedSharding(self.mesh, spec), local, global_shape)
      out[name] = fields
    return out

  def flops_per_step(self, batch) -> int:
    """Analytic matmul FLOPs of one step (encoder forward + backward, and the heads' logits)."""
    total = 0
    for name, b in batch.items():
      a, rows, length = b['patches'].shape[:3]
      _, _, segments, n = b['labels'].shape
      total += a * rows * encoder_flops(self.encoder_cfg, length, num_segments=segments,
                                        backward=True)
      total += a * losses.loss_flops(self.heads[name], rows * segments, self.encoder_cfg.width, n)
    return total


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def checkpoint_manager(workdir: str, config):
  return checkpoint.open_manager(
      checkpoint.root_of(workdir), max_to_keep=config.keep_checkpoints,
      keep_period=config.keep_every or None, create=True, asynchronous=True)


def save(manager, step: int, state, position: str, config, program: Program) -> None:
  """Saves step `step`: the train state, this process's input position after the step's batches
  (`position`, from DevicePrefetch), and the run's meta."""
  meta = {'step': step, 'config': config.to_dict(),
          'encoder_config': dataclasses.asdict(program.encoder_cfg),
          'process_count': jax.process_count(), 'mesh': dict(program.mesh.shape)}
  checkpoint.save(manager, step, state, position, meta)


def restore(manager, step: int, iterator, program: Program):
  """The train state at `step`, placed on this program's mesh (any mesh shape), and the input
  iterator moved to where it was."""
  saved_processes = checkpoint.read_meta(str(manager.directory), step).get(
      'process_count', jax.process_count())
  if saved_processes != jax.process_count():
    raise TrainingError(
        f'{os.path.join(str(manager.directory), str(step))} was saved by {saved_processes} '
        f'process(es) and this run has {jax.process_count()}: the input position is saved per '
        'process, so resume with the same number of processes (the mesh shape may change), or '
        'start a new workdir with --config.init.checkpoint=<this workdir> to keep the weights')
  return checkpoint.restore_state(manager, step, program.abstract_state, iterator)


def load_checkpoint_params(path: str) -> tuple[dict, dict, int]:
  """(params as nested numpy dicts, the run's meta, step) of a training checkpoint, on the host:
  for exporting and for starting a later stage, whatever mesh wrote it."""
  return checkpoint.restore_params(path, subtree=('params',))


def _put_like(value: np.ndarray, like: jax.Array, name: str) -> jax.Array:
  if tuple(value.shape) != tuple(like.shape):
    raise config_lib.ConfigError(f'{name}: shape {tuple(value.shape)} in the source, '
                                 f'{tuple(like.shape)} in this run')
  return jax.device_put(np.asarray(value, like.dtype), like.sharding)


# What must agree for an encoder's weights to load into another run's encoder.
_ARCH_FIELDS = ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size', 'use_head')


def initialise_from(state, config, program: Program):
  """Replaces freshly initialised parameters by a released PyTorch model's or an earlier
  stage's (init.pytorch / init.checkpoint). Optimiser state and step start fresh."""
  params = state['params']
  if config.init.pytorch:
    from ove_jax.convert import hf
    directory = config.init.pytorch
    raw, tensors = hf.read_directory(directory)
    source_cfg = hf.config_from_hf(raw, source=directory)
    mine = program.encoder_cfg
    for field in _ARCH_FIELDS:
      if getattr(source_cfg, field) != getattr(mine, field):
        raise config_lib.ConfigError(
            f'init.pytorch={directory}: its {field} is {getattr(source_cfg, field)}, this run\'s '
            f'model.preset={config.model.preset} has {getattr(mine, field)}')
    flat = hf.hf_to_params(tensors, mine, source=directory)
    new = {}
    for path, like in jax.tree_util.tree_leaves_with_path(params['encoder']):
      key = tuple(k.key for k in path)
      if key not in flat:
        raise config_lib.ConfigError(f'init.pytorch={directory} has no weights for '
                                     f'encoder/{"/".join(map(str, key))}')
      new[key] = _put_like(flat[key], like, 'encoder/' + '/'.join(map(str, key)))
    params = {**params, 'encoder': _nest(new.items())}
    log.info('initialised the encoder from %s (heads fresh)', directory)
  elif config.init.checkpoint:
    source, meta, step = load_checkpoint_params(config.init.checkpoint)
    saved = meta.get('encoder_config', {})
    for field in _ARCH_FIELDS:
      if field in saved and saved[field] != getattr(program.encoder_cfg, field):
        raise config_lib.ConfigError(
            f'init.checkpoint={config.init.checkpoint}: its encoder has {field}='
            f'{saved[field]} (model.preset={meta.get("config", {}).get("model", {}).get("preset")}'
            f'), this run\'s model.preset={config.model.preset} has '
            f'{getattr(program.encoder_cfg, field)}')
    def take(tree, like, prefix):
      if isinstance(like, dict):
        return {k: take(tree.get(str(k), tree.get(k)) if isinstance(tree, dict) else None,
                        v, f'{prefix}/{k}') for k, v in like.items()}
      if tree is None:
        raise config_lib.ConfigError(f'init.checkpoint: {prefix} is missing in the source')
      return _put_like(tree, like, prefix)
    params = {**params, 'encoder': take(source['encoder'], params['encoder'], 'encoder')}
    kept = []
    for name in params['heads'] if config.init.heads != 'fresh' else ():
      theirs = source.get('heads', {}).get(name)
      if config.init.heads == 'matching' and (
          theirs is None or tuple(theirs.shape) != tuple(params['heads'][name].shape)):
        continue
      if theirs is None:
        raise config_lib.ConfigError(
            f'init.heads=keep: the source has no head {name!r} (it has '
            f'{sorted(source.get("heads", {}))}); use --config.init.heads=matching (keep the '
            'heads it has, start the others fresh) or fresh')
      params['heads'][name] = _put_like(theirs, params['heads'][name], f'heads/{name}')
      kept.append(name)
    log.info('initialised from %s step %d (heads kept: %s)', config.init.checkpoint, step,
             ', '.join(kept) or 'none')
  return {**state, 'params': params}


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def data_sources(config, workdir: str) -> dict[str, str]:
  """The built-in data's source strings (generated on first use) when builtin.enabled."""
  if not config.builtin.enabled:
    return {}
  from data_pipeline import builtin
  root = config.builtin.root or os.path.join(workdir, 'builtin_data')
  info = builtin.ensure(root, clips=config.builtin.clips, images=config.builtin.images,
                        budget=config.builtin.budget, policy=config.builtin.policy,
                        seed=config.seed,
                        progress=jax.process_index() == 0)
  return {'{builtin:video}': info['video_source'], '{builtin:image}': info['image_source']}


def make_iterator(config, sources: Mapping[str, str], *, seed_offset: int = 0,
                  worker_count: int | None = None, evaluation: bool = False):
  from data_pipeline import pipeline
  data = config_lib.pipeline_dict(
      config, process_index=jax.process_index(), process_count=jax.process_count(),
      sources=sources, source_overrides=dict(config.eval_sources) if evaluation else None)
  data['seed'] = (data['seed'] + seed_offset) % 2**32
  if worker_count is not None:
    data['worker_count'] = worker_count
  return pipeline.make_iterator(data)


class DevicePrefetch:
  """Reads this host's batches and puts them on the devices in a background thread, `size` steps
  ahead, so the step waits neither for the input workers (while they keep up) nor for the
  host-to-device copy. Each item carries the iterator position after its batches: what a
  checkpoint saved after that step must hold, however far the thread has read ahead."""

  _END = object()

  def __init__(self, iterator, program: Program, accumulate: int, size: int = 2):
    self._iterator, self._program, self._accumulate = iterator, program, accumulate
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='device-prefetch', daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self):
    try:
      while not self._stop.is_set():
        host = [next(self._iterator) for _ in range(self._accumulate)]
        position = json.dumps(self._iterator.get_state())
        item = (self._program.device_batch(host), position)
        if not self._put(item):
          return
    except StopIteration:
      self._put(self._END)
    except BaseException as e:  # pylint: disable=broad-except  -- re-raised in the train loop
      self._put(e)

  def next(self):
    """(device batch, input position after it); blocks until the thread has one."""
    item = self._queue.get()
    if item is self._END:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self._stop.set()
    while True:  # unblock a put, then let the thread see the stop flag
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=10)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

class _Stop:
  """SIGTERM (preemption) asks for a clean save at the end of the current step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if hasattr(signal, 'SIGTERM'):
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: no handler, no clean stop
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def _fetch(tree) -> dict[str, float]:
  # One batched device-to-host read (every metric is a replicated scalar).
  values = jax.device_get({k: v.addressable_data(0) for k, v in tree.items()})
  return {k: float(v) for k, v in values.items()}


def _local_devices(config) -> int | None:
  # A launcher's OVE_LOCAL_DEVICE_COUNT states the topology it started; it wins over the config.
  env = os.environ.get('OVE_LOCAL_DEVICE_COUNT')
  return int(env) if env else (config.cpu_devices or None)


# Keys that may change between a run and its resumption (layout, logging, housekeeping).
_RESUME_FREE = ('mesh.', 'cpu_devices', 'log_every', 'checkpoint_every', 'keep_', 'eval_',
                'profile_', 'watchdog_seconds', 'peak_flops', 'init.', 'builtin.root',
                'data.worker_buffer')
# Keys whose change makes the saved state unusable (shapes), not merely the resumption inexact.
_RESUME_FATAL = ('model.preset', 'heads.', 'loss.sampling_blocks', 'rules')


def check_resume(saved: Mapping[str, Any], config) -> None:
  """Names what changed since the checkpoint was written: an error where the saved state cannot
  fit, a warning where the resumed run will not repeat the uninterrupted one."""
  before = config_lib.flatten(ml_collections.ConfigDict(saved))
  now = config_lib.flatten(config)
  same = lambda k: json.dumps(before.get(k), default=list) == json.dumps(now.get(k), default=list)
  changed = sorted(k for k in set(before) | set(now)
                   if not same(k) and not k.startswith(_RESUME_FREE))
  fatal = [k for k in changed if k.startswith(_RESUME_FATAL)]
  if fatal:
    raise config_lib.ConfigError(
        'the checkpoint in this workdir was written with other values of '
        + ', '.join(f'{k} ({before.get(k)!r} then, {now.get(k)!r} now)' for k in fatal)
        + '; use another --workdir, or start from it with --config.init.checkpoint=<workdir>')
  if changed:
    log.warning('resuming with changed config values (the run will not repeat the original '
                'exactly): %s', ', '.join(f'{k}: {before.get(k)!r} -> {now.get(k)!r}'
                                          for k in changed))


def _agree(flag: bool) -> bool:
  """True on every process when it is true on any (a SIGTERM reaches hosts at different steps;
  all must save and stop at the same one or the collectives hang)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))) > 0)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the experiment in `workdir`; returns the last logged metrics."""
  info = distributed.initialize(local_device_count=_local_devices(config))
  main_process = info['process_index'] == 0
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(config)
  peak, peak_source = metrics_lib.peak_flops_per_device(override=config.peak_flops)
  log.info('peak FLOP/s per device for MFU: %.3g (%s)', peak, peak_source)
  log.info('mesh %s on %d devices (%d processes)', dict(mesh.shape), mesh.size,
           info['process_count'])

  with jax.set_mesh(mesh):
    program = Program(config, mesh)
    manager = checkpoint_manager(workdir, config)
    start = manager.latest_step()
    if start is not None:
      check_resume(checkpoint.read_meta(workdir, start).get('config', {}), config)
    sources = data_sources(config, workdir)
    iterator = make_iterator(config, sources)
    if start is not None:
      state = restore(manager, start, iterator, program)
      log.info('resumed from %s step %d', workdir, start)
    else:
      state = program.init()
      state = initialise_from(state, config, program)
      start = 0
    if main_process:
      fileio.write_json(os.path.join(workdir, 'config.json'), config.to_dict(), sort_keys=False,
                        default=list)

    writer = metrics_lib.MetricWriter(workdir, enabled=main_process)
    last: dict[str, Any] = {}
    step = start
    pending = None          # (step, device metrics, input wait, seconds)
    window = dict.fromkeys(('seconds', 'wait', 'steps', 'clips', 'tokens', 'skipped'), 0.0)
    carry: dict[str, float] = {}   # eval results and save timings, for the next metrics line
    flops = None
    profiling = False
    progress = _progress(config.total_steps, start, main_process)

    def finish(entry):
      """Host side of a finished step: NaN check, then the metrics line every log_every."""
      nonlocal last
      done_step, device_metrics, wait, seconds = entry
      values = _fetch(device_metrics)
      # Inf gradients with a finite loss give NaN weights through the clip (5 / inf * inf):
      # check what the update produced too, so such a state is never saved.
      bad = [k for k in ('loss', 'param_norm', *sorted(k for k in values
                                                       if k.startswith('grad_norm/')))
             if not np.isfinite(values[k])]
      if bad:
        raise TrainingError(
            f'{", ".join(f"{k} is {values[k]}" for k in bad)} at step {done_step}; stopping '
            f'without saving this state. The last checkpoint is in '
            f'{os.path.join(workdir, CHECKPOINT_DIR)}; lower optim.lr or check the data of this '
            'step.')
      counts = {k: values.pop(k) for k in ('clips', 'tokens', 'skipped')}
      if done_step > start + 1:  # the first step of a process compiles: not in the rates
        window['seconds'] += seconds
        window['wait'] += wait
        window['steps'] += 1
        for k, v in counts.items():
          window[k] += v
      progress.update(1)
      progress.set_postfix(loss=f'{values["loss"]:.3f}', refresh=False)
      if done_step % config.log_every and done_step != config.total_steps:
        return
      dropped = {k: v for k, v in values.items() if k.endswith('/dropped') and v > 0}
      if dropped:
        log.warning('step %d: positives left out of the loss (more positives in a class block '
                    'than it keeps; raise sample_rate or sampling_blocks): %s', done_step, dropped)
      line = dict(values)
      if window['steps']:
        secs = window['seconds']
        line.update(step_seconds=secs / window['steps'], clips_per_second=window['clips'] / secs,
                    tokens_per_second=window['tokens'] / secs,
                    input_wait_fraction=window['wait'] / secs)
        if peak > 0 and flops:
          line['mfu'] = flops * window['steps'] / secs / (peak * mesh.size)
      line['skipped_records'] = window['skipped']
      line.update(carry)
      carry.clear()
      writer.write(done_step, line)
      last = {'step': done_step, **line}
      for k in window:
        window[k] = 0.0

    watchdog = metrics_lib.Watchdog(config.watchdog_seconds)
    prefetch = DevicePrefetch(iterator, program, config.accumulate)
    tick = time.perf_counter()
    with _Stop() as stop:
      try:
        while step < config.total_steps:
          if step == config.profile_start:
            jax.profiler.start_trace(os.path.join(workdir, 'profile'))
            profiling = True
          t0 = time.perf_counter()
          try:
            batch, position = prefetch.next()
          except StopIteration:
            raise TrainingError(f'the input ran out at step {step} (data.num_epochs is set); '
                                'unset it to repeat the data') from None
          wait = time.perf_counter() - t0
          if flops is None:
            flops = program.flops_per_step(batch)
          state, device_metrics = program.step(state, batch)
          step += 1
          if pending is not None:
            finish(pending)
          now = time.perf_counter()
          pending = (step, device_metrics, wait, now - tick)
          tick = now
          watchdog.kick(step)
          if profiling and step >= config.profile_start + config.profile_steps:
            jax.profiler.stop_trace()
            profiling = False
          if config.eval_every and step % config.eval_every == 0:
            t_eval = time.perf_counter()
            results = evaluate(program, state, make_iterator(
                config, sources, seed_offset=1, worker_count=0, evaluation=True), config, step)
            carry.update(results, eval_seconds=time.perf_counter() - t_eval)
            tick = time.perf_counter()  # evaluation time is not the next step's
          # Several hosts agree on a SIGTERM at log and checkpoint steps only: the check is a
          # collective and a host wait, too dear for every step. One host stops at once.
          due = step % config.checkpoint_every == 0 or step == config.total_steps
          if jax.process_count() == 1 or due or step % config.log_every == 0:
            stopping = _agree(stop.requested)
          else:
            stopping = False
          if due or stopping:
            finish(pending)
            pending = None
            t_save = time.perf_counter()
            save(manager, step, state, position, config, program)
            carry['checkpoint_seconds'] = time.perf_counter() - t_save
            tick = time.perf_counter()
          if stopping:
            log.warning('SIGTERM: saved step %d in %s; exiting', step, workdir)
            break
        if pending is not None:
          finish(pending)
      finally:
        prefetch.close()
        manager.wait_until_finished()
        watchdog.close()
        progress.close()
        writer.close()
        if profiling:
          jax.profiler.stop_trace()
  if stop.requested:
    last['stopped'] = 'SIGTERM'
  return last


def evaluate(program: Program, state, iterator, config, step: int) -> dict[str, float]:
  """Loss and accuracy on `eval_steps` batches of every head (from `eval_sources`, else the
  training data reshuffled), no update."""
  totals: dict[str, float] = {}
  for i in range(config.eval_steps):
    host = [next(iterator) for _ in range(config.accumulate)]
    values = _fetch(program.evaluate(state['params'], program.device_batch(host),
                                     jnp.int32(-1 - i)))
    for k, v in values.items():
      totals[k] = totals.get(k, 0.0) + v / config.eval_steps
  return {f'eval/{k}': v for k, v in totals.items()}


def _progress(total: int, start: int, enabled: bool):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, disable=not enabled, desc='train', unit='step',
              dynamic_ncols=True, mininterval=1.0)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

USAGE = ('python -m ove_jax.train --config=experiments/<name>.py[:args] --workdir=DIR '
         '[--config.key=value ...]')


def parse_args(argv: Sequence[str]) -> tuple[str, str, list[str]]:
  spec = workdir = None
  overrides = []
  for arg in argv:
    if arg.startswith('--config.'):
      overrides.append(arg[len('--config.'):])
    elif arg.startswith('--config='):
      spec = arg[len('--config='):]
    elif arg.startswith('--workdir='):
      workdir = arg[len('--workdir='):]
    elif arg in ('-h', '--help'):
      print(__doc__)
      raise SystemExit(0)
    else:
      raise config_lib.ConfigError(f'unknown argument {arg!r}; usage: {USAGE}')
  if not spec or not workdir:
    raise config_lib.ConfigError(f'--config and --workdir are required; usage: {USAGE}')
  return spec, workdir, overrides


def main(argv: Sequence[str] | None = None) -> int:
  # force: absl (imported with orbax) may already have put its own handler on the root logger,
  # which would make basicConfig a no-op and drop every INFO line.
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s', force=True)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every step of its work at INFO
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    spec, workdir, overrides = parse_args(argv)
    config = config_lib.load(spec, overrides)   # before JAX starts: errors come fast
    train(config, workdir)
  except config_lib.ConfigError as e:
    print(f'config error: {e}', file=sys.stderr)
    return 2
  except TrainingError as e:
    print(f'training stopped: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
