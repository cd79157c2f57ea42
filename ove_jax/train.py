"""The one trainer: cluster-discrimination pretraining of the encoder on a device mesh.

  ove-train --config experiments/demo_cpu.py[:args] --workdir DIR [--config.key=value ...]

Reads top to bottom: the mesh, the model and optimiser with their sharded init, the step,
evaluation, the loop, `main` (its flags are parsed in cli.parse_train_args). A restart in the same
workdir resumes from its last checkpoint: parameters, optimiser, step and every host's input-
iterator position, so the resumed run repeats the uninterrupted one exactly (on another process
count: the same state, the input re-derived; see resume). Its neighbours: resume (where a process
starts), train_inputs (the sources and the input iterator), checkpoint (the layout on disk),
warm_start (a first state from a release or an earlier stage), prefetch (batches onto the devices
ahead of the step), reporter (the metrics line, NaN check, MFU) and preemption (SIGTERM: save,
exit PREEMPTED_EXIT_CODE; the hang watchdog's exit).

Multi-host: one copy per host (ove-launch-local on one machine); each loads its share of the
global batch and writes its part of the checkpoints; only process 0 writes metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipeline import fileio, host_memory, paths, tokens
from ove_jax import (
  checkpoint,
  cli,
  distributed,
  host_runtime,
  losses,
  optim,
  preemption,
  resume,
  sharding,
  train_inputs,
  training_probes,
)
from ove_jax import config as config_lib
from ove_jax import metrics as metrics_lib
from ove_jax.models import Encoder, EncoderConfig, cpu_blas, encoder_flops
from ove_jax.prefetch import BATCH_FIELDS, DevicePrefetch, device_batch  # noqa: F401 (tools)
from ove_jax.reporter import StepReporter, StepResult, TrainingError

log = logging.getLogger('ove_jax.train')

CHECKPOINT_DIR = checkpoint.CHECKPOINT_DIR


# ------------------------------------------------------------------------------------------------
# Mesh
# ------------------------------------------------------------------------------------------------


def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
  """The config's mesh sizes (`config.mesh`, one may be -1) resolved for `num_devices`."""
  try:
    return sharding.mesh_shape(dict(config.mesh), num_devices)
  except ValueError as e:
    hint = '' if -1 in dict(config.mesh).values() else ' (e.g. --config.mesh.data=-1)'
    raise config_lib.ConfigError(f'{e}{hint}') from None


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The config's mesh over `devices` (default: all of this run's)."""
  devices = list(devices) if devices is not None else jax.devices()
  mesh_shape(config, len(devices))  # a ConfigError naming the fix when it does not fit
  try:  # the dcn_* sizes, checked against the resolved axes and the processes
    return sharding.make_mesh(dict(config.mesh), devices)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None


def rules_of(config) -> tuple:
  custom = {name: axes for name, axes in (config.rules or ())}
  return tuple((name, custom.pop(name, axes)) for name, axes in sharding.DEFAULT_RULES) + tuple(
    custom.items()
  )


def _local_devices(config) -> int | None:
  # A launcher's OVE_LOCAL_DEVICE_COUNT states the topology it started; it wins over the config
  # (None here: distributed.initialize reads and checks it, naming the variable).
  if os.environ.get('OVE_LOCAL_DEVICE_COUNT', '').strip():
    return None
  return config.cpu_devices or None


# ------------------------------------------------------------------------------------------------
# Model and optimiser, sharded init, the step
# ------------------------------------------------------------------------------------------------


def encoder_config(config) -> EncoderConfig:
  """The encoder of `config.model`: its preset, and every other key of the section (validate
  allows no others) as that preset's override."""
  model = config.model.to_dict()
  return EncoderConfig.preset(model.pop('preset'), **model)


class PretrainModel(nnx.Module):
  """The encoder and one matrix of class centres per head (rows sharded by `classes`)."""

  def __init__(
    self,
    cfg: EncoderConfig,
    heads: Mapping[str, losses.PartialFCConfig],
    *,
    rngs: nnx.Rngs,
    rules=sharding.DEFAULT_RULES,
    init_std: float = 0.01,
  ):
    self.encoder = Encoder(cfg, rngs=rngs, rules=rules)
    init = nnx.with_partitioning(
      nnx.initializers.normal(init_std), ('classes', 'centre_embed'), sharding_rules=rules
    )
    eager = sharding.current_mesh() is not None
    with nnx.use_eager_sharding(eager):
      self.heads = nnx.Dict(
        {
          name: nnx.Param(init(rngs.params(), (h.padded_classes, cfg.width)))
          for name, h in sorted(heads.items())
        }
      )


class Program:
  """What one config compiles on one mesh: sharded init, the train step, the eval step."""

  def __init__(self, config, mesh: jax.sharding.Mesh):
    self.config, self.mesh = config, mesh
    self.rules = rules_of(config)
    self.encoder_cfg = encoder_config(config)
    self.heads = {name: config_lib.head_loss_config(config, name) for name in config.heads}
    self.weights = {name: float(config.heads[name].get('weight', 1.0)) for name in self.heads}
    self.accumulate = config.accumulate
    self.batch_axes = sharding.batch_axes(mesh, self.rules)
    config_lib.check_layout(config, dict(mesh.shape), self.batch_axes, jax.process_count())
    self.tx, self.lr = optim.make(config.optim, config.total_steps)

    with jax.set_mesh(mesh):
      abstract = nnx.eval_shape(self._model)
    self.graphdef, abstract_state = nnx.split(abstract)
    flat = nnx.to_flat_state(abstract_state)
    self.param_shardings = checkpoint.nest(
      {path: self._sharding(var) for path, var in flat}, key=lambda k: k
    )  # int list indices, as nnx.to_pure_dict has them
    abstract_params = nnx.to_pure_dict(abstract_state)
    replicated = NamedSharding(mesh, P())
    opt_abstract = jax.eval_shape(self.tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(
      self.tx,
      lambda _, s: s,
      opt_abstract,
      self.param_shardings,
      transform_non_params=lambda _: replicated,
    )
    self.state_shardings = dict(
      params=self.param_shardings, opt_state=opt_shardings, step=replicated
    )
    abstract_state_tree = dict(
      params=abstract_params, opt_state=opt_abstract, step=jax.ShapeDtypeStruct((), jnp.int32)
    )
    self.abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state_tree,
      self.state_shardings,
    )
    self.init = jax.jit(self._init, out_shardings=self.state_shardings)
    self.step = jax.jit(
      self._step, out_shardings=(self.state_shardings, replicated), donate_argnums=0
    )
    self.evaluate = jax.jit(self._evaluate, out_shardings=replicated)

  def _sharding(self, var) -> NamedSharding:
    """Where a parameter lives: its logical axes through the rules onto the mesh."""
    axes = var.get_metadata().get('out_sharding') or ()
    return NamedSharding(self.mesh, sharding.logical_to_spec(axes, self.rules))

  def _model(self) -> PretrainModel:
    return PretrainModel(
      self.encoder_cfg,
      self.heads,
      rngs=nnx.Rngs(self.config.seed),
      rules=self.rules,
      init_std=self.config.loss.init_std,
    )

  def _init(self):
    params = nnx.to_pure_dict(nnx.state(self._model()))
    return {'params': params, 'opt_state': self.tx.init(params), 'step': jnp.zeros((), jnp.int32)}

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
        patches = tokens.normalise(patches)
      rows, segments, n = b['labels'].shape
      out = model.encoder(patches, b['positions'], b['segment_ids'], num_segments=segments)
      e = out['pooled'].reshape(rows * segments, -1)
      res = losses.partial_fc_loss(
        e,
        b['segment_valid'].reshape(-1),
        b['labels'].reshape(rows * segments, n),
        b['sample_index'].reshape(-1),
        model.heads[name][...],
        step,
        self.heads[name],
        self.rules,
        micro=micro,
      )
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

  def meta(self, step: int) -> dict:
    """What a checkpoint of this program records besides the state (checkpoint.read_meta)."""
    return {
      'step': step,
      'config': self.config.to_dict(),
      'encoder_config': dataclasses.asdict(self.encoder_cfg),
      'process_count': jax.process_count(),
      'mesh': dict(self.mesh.shape),
    }

  def device_batch(self, host_batches: Sequence[Mapping[str, Mapping[str, np.ndarray]]]):
    """This host's micro-batches as the step's global [A, rows, ...] arrays (prefetch)."""
    return device_batch(host_batches, self.mesh, self.batch_axes)

  def flops_per_step(self, batch) -> int:
    """Analytic matmul FLOPs of one step (encoder forward + backward, and the heads' logits)."""
    total = 0
    for name, b in batch.items():
      a, rows, length = b['patches'].shape[:3]
      _, _, segments, n = b['labels'].shape
      total += (
        a * rows * encoder_flops(self.encoder_cfg, length, num_segments=segments, backward=True)
      )
      total += a * losses.loss_flops(self.heads[name], rows * segments, self.encoder_cfg.width, n)
    return total


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def evaluate(program: Program, state, iterator, config) -> dict[str, float]:
  """Loss and accuracy on `eval_steps` batches of every head (from `eval_sources`, else the
  training data reshuffled), no update."""
  from ove_jax.reporter import fetch

  totals: dict[str, float] = {}
  for i in range(config.eval_steps):
    host = [next(iterator) for _ in range(config.accumulate)]
    values = fetch(program.evaluate(state['params'], program.device_batch(host), jnp.int32(-1 - i)))
    for k, v in values.items():
      totals[k] = totals.get(k, 0.0) + v / config.eval_steps
  return {f'eval/{k}': v for k, v in totals.items()}


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Loop:
  """Where the loop stands between steps."""

  state: dict  # params, opt_state, step: on the mesh
  step: int
  pending: StepResult | None = None  # the last step, reported one step late
  tick: float = 0.0  # when the last step (or evaluation, or save) ended
  started: float = 0.0  # when train() was called
  profiling: bool = False


@dataclasses.dataclass
class Run:
  """One training process's run: what the loop works with."""

  config: ml_collections.ConfigDict
  workdir: str
  program: Program
  manager: Any  # orbax CheckpointManager of <workdir>/checkpoints
  sources: dict[str, str]
  prefetch: DevicePrefetch
  reporter: StepReporter
  watchdog: metrics_lib.Watchdog
  preemption: preemption.Preemption

  def step(self, loop: Loop) -> bool:
    """Runs one step (with its profile, evaluation and checkpoint); True when a preemption
    stopped the run after saving."""
    c = self.config
    if loop.step == c.profile_start:
      jax.profiler.start_trace(paths.local_folder(paths.join(self.workdir, 'profile')))
      loop.profiling = True
    t0 = time.perf_counter()
    try:
      batch, position = self.prefetch.next()
    except StopIteration:
      raise TrainingError(
        f'the input ran out at step {loop.step} (data.num_epochs is set); '
        'unset it to repeat the data'
      ) from None
    wait = time.perf_counter() - t0
    if self.reporter.flops_per_step is None:
      self.reporter.flops_per_step = self.program.flops_per_step(batch)
    loop.state, device_metrics = self.program.step(loop.state, batch)
    loop.step += 1
    if loop.step == self.reporter.start + 1:  # compiled and ran: what a restart waits for
      jax.block_until_ready(device_metrics)
      log.info(
        'first step of this process (%d) done %.1f s after the trainer started',
        loop.step,
        time.perf_counter() - loop.started,
      )
    self.report(loop)
    now = time.perf_counter()
    loop.pending, loop.tick = StepResult(loop.step, device_metrics, wait, now - loop.tick), now
    self.watchdog.kick(loop.step)
    if loop.profiling and loop.step >= c.profile_start + c.profile_steps:
      jax.profiler.stop_trace()
      loop.profiling = False
    if c.eval_every and loop.step % c.eval_every == 0:
      t_eval = time.perf_counter()
      # Closed after its batches: its reader threads stop instead of reading ahead until
      # the garbage collector finds the iterator.
      with contextlib.closing(
        train_inputs.make_iterator(c, self.sources, seed_offset=1, worker_count=0, evaluation=True)
      ) as iterator:
        results = evaluate(self.program, loop.state, iterator, c)
      self.reporter.extra.update(results, eval_seconds=time.perf_counter() - t_eval)
      loop.tick = time.perf_counter()  # evaluation time is not the next step's
      self.watchdog.kick(loop.step)
    if training_probes.due(c, loop.step):  # probes during training (probe_every)
      self.reporter.extra.update(training_probes.run(c, self.program, loop.state))
      loop.tick = time.perf_counter()  # probe time is not the next step's
      self.watchdog.kick(loop.step)
    # Every step, on every process (the sync point needs each step): true at the same step
    # everywhere once any host got SIGTERM.
    stopping = self.preemption.reached(loop.step)
    if stopping or loop.step % c.checkpoint_every == 0 or loop.step == c.total_steps:
      self.report(loop)
      # The lines up to this step are written out (in a bucket: uploaded, docs/storage.md)
      # before the checkpoint can commit, so a run resumed from it has them.
      self.reporter.flush()
      t_save = time.perf_counter()
      checkpoint.save(self.manager, loop.step, loop.state, position, self.program.meta(loop.step))
      self.reporter.extra['checkpoint_seconds'] = time.perf_counter() - t_save
      loop.tick = time.perf_counter()
      self.watchdog.kick(loop.step)  # an evaluation or a save is progress too
    if stopping:
      interrupted = self.preemption.interrupted
      log.warning(
        '%s: saved step %d in %s; exiting with code %d',
        'interrupted (Ctrl-C)' if interrupted else 'preempted (SIGTERM)',
        loop.step,
        self.workdir,
        preemption.INTERRUPTED_EXIT_CODE if interrupted else preemption.PREEMPTED_EXIT_CODE,
      )
    return stopping

  def report(self, loop: Loop) -> None:
    if loop.pending is not None:
      self.reporter.finish(loop.pending)
      loop.pending = None


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the experiment in `workdir`; returns the last logged metrics. Process 0
  ends by printing where the checkpoints and the outputs of the metrics writers are. After a
  preemption save the result has 'stopped' (main exits with PREEMPTED_EXIT_CODE)."""
  started = time.perf_counter()
  try:  # before any process starts: an s3:// workdir would fail at the first checkpoint save
    checkpoint.check_checkpoint_path(paths.absolute(workdir))
  except ValueError as e:
    raise config_lib.ConfigError(f'--workdir {e}') from None
  # One-slash URLs, missing buckets, a URL as builtin.root, a cache folder that is a file.
  train_inputs.check_paths(config, workdir)
  training_probes.check_source(config)  # the held-out records of probe_every, if any
  # The launch's config, exit status 2: OVE_*, SLURM or Open MPI variables missing or out of
  # range, a compilation cache folder that cannot be one (JAX would only warn).
  try:
    distributed.check_compilation_cache(config.compilation_cache_dir.replace('{workdir}', workdir))
    info = distributed.initialize(
      local_device_count=_local_devices(config), **config.distributed.to_dict()
    )
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  workdir = paths.absolute(workdir)  # a URL (gs://, s3://) stays one: docs/storage.md
  # One trainer per workdir: a second one is refused while this one runs.
  with resume.workdir_lock(workdir, info['process_index'] == 0):
    done = resume.past_total_steps(workdir, config)
    if done:
      if info['process_index'] == 0:
        print(done)
      return {}
    return run_training(config, workdir, info, started)


def run_training(config, workdir: str, info: Mapping[str, int], started: float) -> dict[str, Any]:
  """`train` once the workdir is checked and locked: builds, resumes and runs the loop."""
  # Until the loop's own handler is in place, a SIGTERM exits as preempted (nothing to save).
  with preemption.exit_on_sigterm_while_starting():
    main_process = info['process_index'] == 0
    if jax.default_backend() == 'cpu':  # XLA:CPU's step temporaries live on the host heap
      log.info('malloc: %s', host_memory.configure_malloc())
      log.info(cpu_blas.describe(jax.device_count()))  # loads the library only for one device
    paths.makedirs(workdir)
    cache = distributed.use_compilation_cache(
      config.compilation_cache_dir.replace('{workdir}', workdir)
    )
    mesh = make_mesh(config)
    peak, peak_source = metrics_lib.peak_flops_per_device(override=config.peak_flops)
    log.info('peak FLOP/s per device for MFU: %.3g (%s)', peak, peak_source)
    log.info(
      'mesh %s on %d devices (%d processes); compilation cache: %s',
      dict(mesh.shape),
      mesh.size,
      info['process_count'],
      cache or 'off',
    )

    # Built-in data is made on first use: minutes, not a hang.
    sources = train_inputs.data_sources(config, workdir)
  # From here on a stall (a lost peer, a stuck input or restore) ends the process with the stacks.
  with (
    metrics_lib.Watchdog(
      config.watchdog_seconds,
      first_timeout_seconds=config.watchdog_first_step_seconds or None,
      on_timeout=preemption.exit_hung,
    ) as watchdog,
    jax.set_mesh(mesh),
    preemption.Preemption() as stop,
    # A source that cannot be read fails here, not at the first step. Closed at the end, also
    # when resuming fails (its worker processes stopped, not left to the interpreter's exit).
    contextlib.closing(train_inputs.make_iterator(config, sources)) as iterator,
  ):
    # An evaluation source is checked too (opened, no pipeline), not at the first evaluation.
    if config.eval_every:
      train_inputs.check_sources(config, sources, evaluation=True)
    program = Program(config, mesh)
    manager = checkpoint.open_manager(
      checkpoint.root_of(workdir),
      max_to_keep=config.keep_checkpoints,
      keep_period=config.keep_every or None,
      create=True,
      asynchronous=True,
    )
    state, start = resume.start_state(manager, workdir, iterator, program, config)
    if main_process:
      fileio.write_json(
        os.path.join(workdir, 'config.json'), config.to_dict(), sort_keys=False, default=list
      )
    reporter = StepReporter(
      workdir,
      total_steps=config.total_steps,
      log_every=config.log_every,
      start=start,
      peak_per_device=peak,
      devices=mesh.size,
      checkpoints=checkpoint.root_of(workdir),
      main_process=main_process,
      writers=tuple(config.metrics.writers),
      wandb_options={
        k[len('wandb_') :]: v for k, v in config.metrics.items() if k.startswith('wandb_')
      },
      run_config=config.to_dict(),
    )
    loop = Loop(state=state, step=start, tick=time.perf_counter(), started=started)
    prefetch = DevicePrefetch(iterator, program.device_batch, config.accumulate)
    run = Run(config, workdir, program, manager, sources, prefetch, reporter, watchdog, stop)
    try:
      while loop.step < config.total_steps and not run.step(loop):
        pass
      run.report(loop)
    finally:
      run.prefetch.close()
      manager.wait_until_finished()
      reporter.close()
      if loop.profiling:
        jax.profiler.stop_trace()
  why = ('Ctrl-C' if stop.interrupted else 'SIGTERM') if stop.requested else None
  last = dict(reporter.last, **({'stopped': why} if why else {}))
  if main_process:  # the manager's own list: opening another would wait for the other processes
    reporter.print_outputs(
      workdir,
      f'{f"stopped ({why}) at" if why else "finished"} step {loop.step}',
      sorted(manager.all_steps()),
    )
  return last


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
  # Before JAX starts: XLA:CPU flags (the user's own values win); malloc once the backend is known.
  tuning = host_runtime.configure(malloc=False)
  # force: absl (imported with orbax) may already have put its own handler on the root logger,
  # which would make basicConfig a no-op and drop every INFO line.
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s', force=True)
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every step of its work at INFO
  args, overrides = cli.parse_train_args(sys.argv[1:] if argv is None else argv)
  logging.info(host_runtime.describe(tuning))
  try:
    with preemption.ctrl_c_raises_interrupted():
      return _run(args, overrides)
  except (KeyboardInterrupt, preemption.Interrupted):
    print(
      f'interrupted (Ctrl-C): stopped without saving; run the same command to resume from '
      f'the last checkpoint in {args.workdir}',
      file=sys.stderr,
    )
    return preemption.INTERRUPTED_EXIT_CODE


def _run(args, overrides) -> int:
  try:
    config = config_lib.load(args.config, overrides)  # before JAX starts: errors come fast
    cpu_blas.check_setting()  # a library named by OVE_CPU_BLAS that cannot serve: exit 2 now
    if args.show_config:
      for key, value in config_lib.flatten(config).items():
        print(f'{key} = {value!r}')
      return 0
    return preemption.exit_code(train(config, args.workdir).get('stopped'))
  except (config_lib.ConfigError, cpu_blas.BlasError) as e:
    print(f'config error: {e}', file=sys.stderr)
    return 2
  except TrainingError as e:
    print(f'training stopped: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
