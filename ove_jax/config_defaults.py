"""Every key an experiment config has, with its default, and the shrink to a CPU smoke run.

`defaults()` is the one list of keys: an experiment builds on it, validation (ove_jax.config)
refuses keys it lacks, and a new key goes here with a comment saying what it does. The values are
the release's where docs/spec.md §4-5 has them. `ove_jax.config` re-exports `defaults` and
`cpu_smoke`, so experiments call them as `config_lib.defaults()`.
"""

from __future__ import annotations

import ml_collections

# Sections whose keys are fixed by defaults() (a typo there must not be silently ignored).
FIXED_SECTIONS = (
  'mesh',
  'distributed',
  'metrics',
  'model',
  'init',
  'loss',
  'optim',
  'builtin',
  'probe',
)


def defaults() -> ml_collections.ConfigDict:
  """Every key an experiment may set, with the release's values where docs/spec.md §4-5 has
  them."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 10
  c.checkpoint_every = 100
  c.keep_checkpoints = 3  # the last N checkpoints ...
  c.keep_every = 0  # ... plus every M-th step for good (0: none)
  c.eval_every = 0  # evaluation loss every N steps (0: never); a multiple of log_every
  c.eval_steps = 2  # batches per evaluation
  # Per head, where evaluation batches come from: a source string like data.heads.<name>.source.
  # Heads not named here evaluate on their training source, reshuffled (not held out).
  c.eval_sources = ml_collections.ConfigDict()
  # Probes during training (ove_jax/training_probes.py): every probe_every steps (0: never; a
  # multiple of log_every) the probes train on the frozen encoder's features of a held-out set of
  # labelled video records and log probe/<probe>_top1. source: comma-separated globs of the
  # records; label: the label slot; mode: 'codec' or 'uniform' (num_frames frames; 0: the codec
  # budget in frames); the first max_records records, test_fraction of them the probes' test part.
  c.probe_every = 0
  c.probe = ml_collections.ConfigDict(dict(source='', label=0, probes=('knn', 'linear')))
  c.probe.update(mode='codec', num_frames=0, test_fraction=0.3, max_records=512)
  c.probe.update(batch_size=8, knn_k=20)
  c.accumulate = 1  # micro-batches per step (gradient accumulation by scan)
  c.peak_flops = 0.0  # per device, for MFU; 0: the device table, or measured on CPU
  c.cpu_devices = 0  # virtual CPU devices per process (CPU only; 0: as started)
  # No finished step (nor evaluation, nor save) in this time: every thread's stack to stderr, then
  # exit with preemption.HANG_EXIT_CODE. 0: off. The real experiments set it; it must cover an
  # evaluation's or a save's first compilation too.
  c.watchdog_seconds = 0.0
  # The limit until this process's first step has finished (the restore and the step's
  # compilation); 0: watchdog_seconds.
  c.watchdog_first_step_seconds = 0.0
  # JAX's persistent compilation cache (distributed.use_compilation_cache): a restart loads its
  # executables instead of compiling. In the workdir by default ('{workdir}' is replaced), so it
  # outlives a preempted machine and every host of the run shares it; '' turns it off, and
  # JAX_COMPILATION_CACHE_DIR in the environment wins.
  c.compilation_cache_dir = '{workdir}/compilation_cache'
  c.profile_start = -1  # first step of a profiler trace into <workdir>/profile (-1: none)
  c.profile_steps = 3
  # Where metrics lines go (metrics.WRITERS): metrics.jsonl (read back by read_metrics and the
  # tools), TensorBoard, Weights & Biases (pip install 'ove_jax[wandb]'). The wandb_* keys are
  # wandb.init's project, name, entity and mode ('' leaves each to wandb and its WANDB_*
  # environment variables; mode 'offline' keeps the run on disk under <workdir>/wandb).
  c.metrics = ml_collections.ConfigDict(dict(writers=('jsonl', 'tensorboard')))
  c.metrics.update(wandb_project='ove_jax', wandb_name='', wandb_entity='', wandb_mode='')

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # one size may be -1
  # How many TPU slices (or GPU nodes) each axis spans; each divides its axis's size above. The
  # batch axes go across slices, fsdp/tensor within (sharding.make_hybrid_mesh).
  c.mesh.update(dict(dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  # jax.distributed.initialize's timeouts, in seconds (multi-process runs only).
  c.distributed = ml_collections.ConfigDict(dict(initialization_timeout=300, heartbeat_timeout=100))
  c.rules = ()  # ((logical name, mesh axes), ...) overriding sharding.DEFAULT_RULES

  c.model = ml_collections.ConfigDict(dict(preset='tiny', dtype='bfloat16', remat='none'))
  c.model.update(attention='xla', rope_theta=10000.0)
  c.model.rope = '3d'  # '3d' (the release), '1d' or 'none': models.encoder.ROPE_VARIANTS
  # Blocks through one nnx.scan; None: the preset's default (on for base/large/huge, off for
  # tiny/small).
  c.model.scan_layers = None

  c.init = ml_collections.ConfigDict(
    dict(
      pytorch='',  # a release-format directory (config.json + model.safetensors)
      checkpoint='',  # an earlier stage's workdir or checkpoint step directory
      heads='keep',  # with `checkpoint`: 'keep' its heads (all must exist there),
      # 'matching' (keep those it has, same shape; others fresh), 'fresh'
      release_centres='',  # head=SOURCE,...: Partial FC centres from the release's per-rank
      # .npy shards (a %03d template, a glob or a folder)
    )
  )

  # Defaults of every head's Partial FC loss (docs/spec.md §4); heads.<name> may override any.
  # positive_headroom: room for positives past a class block's quota (x quota).
  c.loss = ml_collections.ConfigDict(dict(sample_rate=0.1, num_slots=8, margin=0.3, scale=64.0))
  c.loss.update(filter_threshold=0.75, sampling_blocks=256, init_std=0.01, positive_headroom=1.0)
  c.heads = ml_collections.ConfigDict()  # name -> {num_classes, weight, [loss overrides]}

  # AdamW (ove_jax/optim.py): warmup (steps, or a fraction of total_steps < 1), then decay to
  # end_lr_fraction of lr; clipping at clip_norm per parameter group.
  c.optim = ml_collections.ConfigDict(
    dict(lr=1e-3, warmup=0.1, decay='linear', end_lr_fraction=0.0)
  )
  c.optim.update(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, weight_decay_mask='all')
  c.optim.clip_norm = 5.0

  # The input pipeline (data_pipeline.pipeline.PipelineConfig); heads' `rows` are GLOBAL rows,
  # divided among the hosts. Sources may name '{builtin:video}' / '{builtin:image}'.
  c.data = ml_collections.ConfigDict(dict(seed=0, worker_count=2, worker_buffer=2, mixing='all'))
  c.data.update(patch_dtype='float32', local_cache_dir='', heads=ml_collections.ConfigDict())
  # Built-in synthetic data (data_pipeline.builtin), generated on first use. `policy` is the codec
  # selection's frame policy (docs/spec.md §2.6: 'paper', 'first_frame', 'zero'); like budget, a
  # value other than the data's needs its own root.
  c.builtin = ml_collections.ConfigDict(
    dict(enabled=False, root='', clips=32, images=64, budget=1024, policy='zero')
  )
  return c


def cpu_smoke(
  c: ml_collections.ConfigDict, *, data_root: str = '', steps: int = 3
) -> ml_collections.ConfigDict:
  """Shrinks experiment `c` to a few steps on 8 virtual CPU devices on the built-in data (the
  experiment then sets its heads): the tiny preset in float32, data 4 x fsdp 2, every class scored
  (the class counts are tiny), 3 label slots (built-in samples have 3 labels), no input workers."""
  c.total_steps = steps
  c.log_every = 1
  c.checkpoint_every = steps
  c.keep_every = 0
  c.eval_every = 0
  c.accumulate = 1
  c.cpu_devices = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 2, 1
  c.model.preset, c.model.dtype, c.model.remat = 'tiny', 'float32', 'none'
  c.builtin.enabled = True
  c.builtin.root = data_root
  c.builtin.clips, c.builtin.images, c.builtin.budget = 8, 16, 512  # as demo_cpu's smoke
  c.loss.sampling_blocks, c.loss.sample_rate, c.loss.num_slots = 8, 1.0, 3
  c.data.worker_count = 0
  c.data.patch_dtype = 'float32'
  return c
