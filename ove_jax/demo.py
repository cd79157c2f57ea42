"""The end-to-end CPU demo's stages (`ove-demo`): data, codec selection, pipeline, cluster labels,
pretraining, probes, export. Each stage is a function of the library it shows; `run` chains them
and returns the summary the command prints and writes. The cluster labels' oracle teacher is
`ove_jax.demo_labels`; what a run prints and the table over runs, `ove_jax.demo_report`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any, Callable, Sequence

import numpy as np

from ove_jax import config as config_lib
from ove_jax import probes as probes_lib

EXPERIMENT = 'demo_cpu.py'
TEXTURE_LABEL = probes_lib.BUILTIN_LABELS.index('texture')  # the probes' label slot
HEADLINE_PROBE = 'linear'  # the summary's probe_top1_*: logistic regression on the pooled embedding
TEST_SEED = 1000  # the held-out clips' data seed, offset from the demo's seed
# Every encoder on both inputs: the random-init encoder's codec vs uniform gap is what the inputs
# alone give, the pretrained encoder's (pretrained on all video modes) what pretraining adds.
PROBE_RUNS = (
  ('pretrained', 'codec'),
  ('random_init', 'codec'),
  ('pretrained', 'uniform'),
  ('random_init', 'uniform'),
)
VIDEO_MODE_NAMES = ('codec', 'uniform', 'collage')  # the experiment's arguments, in this order


@dataclasses.dataclass
class Options:
  """What the demo runs with (the `ove-demo` flags, defaults resolved)."""

  workdir: str
  clips: int = 8
  budget: int = 2048
  devices: int = 8
  train_steps: int | None = None
  seed: int = 0
  test_clips: int = 96
  k: int = 32
  probe_seeds: Sequence[int] = (0,)
  probe_epochs: int = 30
  smoke: bool = False
  # Pretraining's video modes, weights of codec / uniform frames / collage (the release's).
  video_modes: Sequence[float] = (0.5, 0.375, 0.125)


class DemoError(RuntimeError):
  """A stage could not run; `exit_code` is the command's exit status (2: a config error, the
  message then is the config's)."""

  def __init__(self, message: str, exit_code: int = 1):
    super().__init__(message)
    self.exit_code = exit_code


def find_experiment(name: str = EXPERIMENT) -> str:
  """The shipped experiment file `name` (a checkout's experiments/ or the installed package's)."""
  return config_lib.experiment_path(name)


def fresh_train_dir(path: str) -> None:
  """Removes an earlier demo's training run from `path` (the trainer would resume it)."""
  if not os.path.exists(path) or not os.listdir(path):
    return
  if not any(
    os.path.exists(os.path.join(path, n)) for n in ('checkpoints', 'metrics.jsonl', 'config.json')
  ):
    raise DemoError(
      f'{path} exists and is not a training run of this demo; move it or pick another --workdir'
    )
  shutil.rmtree(path)


# ------------------------------------------------------------------------------------------------
# Stages 1-3: clips, codec selection, pipeline
# ------------------------------------------------------------------------------------------------


def write_clips(clip_dir: str, count: int) -> tuple[list, str]:
  """`count` synthetic 64-frame H.264 clips with B-frames and their list file: ([(path, clip)],
  list file)."""
  from data_pipeline import synthetic

  os.makedirs(clip_dir, exist_ok=True)
  clips, lines = [], []
  for seed in range(count):
    clip = synthetic.make_clip(
      seed, num_frames=64, bframes=2, num_objects=1, background='pan' if seed % 2 else 'static'
    )
    path = clip.write(os.path.join(clip_dir, f'clip{seed:03d}.mp4'))
    # Two labels per clip (object shape, motion direction): the list file's format wants some.
    labels = [clip.labels['shape_id'], len(synthetic.SHAPES) + clip.labels['direction_id']]
    clips.append((path, clip))
    lines.append(f'{os.path.basename(path)}\t{labels[0]},{labels[1]}')
  list_file = os.path.join(clip_dir, 'clips.tsv')
  with open(list_file, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return clips, list_file


def precompute_clips(list_file: str, record_dir: str, budget: int) -> tuple[dict, list[str]]:
  """Codec selections of the listed clips, K = `budget` of 16,384 patches: (summary, shards)."""
  from data_pipeline import precompute

  options = {
    'num_frames': 64,
    'budget': budget,
    'resolution': 224,
    'patch_size': 14,
    'policy': 'zero',
    'camera_compensation': 'median',
  }
  result = precompute.precompute(
    list_file, record_dir, options=options, clips_per_shard=4, workers=1, progress=True
  )
  return result, precompute.shard_files(record_dir)


def first_selection(shards: Sequence[str]):
  """(decoded frames, record) of the first record: what the selection pictures draw."""
  from data_pipeline import precompute, video

  first = precompute.read_record(shards[0], 0)
  return video.decode_frames(first.get('video') or first['source'], first['frame_ids']), first


def moving_shares(
  clips, shards: Sequence[str], budget: int, record_dir: str
) -> dict[str, list[float]]:
  """Per clip, the share of kept patches on moving objects (from the clips' ground truth):
  codec selection (from the records) vs uniform frames vs random patches, same budget."""
  from data_pipeline import codec, precompute

  codec_by_source = {}
  for shard in shards:
    for record in precompute.read_shard(shard):
      codec_by_source[os.path.abspath(record['source'])] = (
        record['frame_ids'],
        record['positions'],
      )
  missing = [p for p, _ in clips if os.path.abspath(p) not in codec_by_source]
  if missing:
    raise DemoError(
      f'no codec record for {missing[0]}; see '
      f'{os.path.join(record_dir, "failures.jsonl")} for why it failed'
    )
  shares = {'codec': [], 'uniform_frames': [], 'random_patches': []}
  for path, clip in clips:
    uniform = codec.select_uniform_frames(path, budget=budget)
    rand = codec.select_random(path, budget=budget)
    for name, (frame_ids, positions) in (
      ('codec', codec_by_source[os.path.abspath(path)]),
      ('uniform_frames', (uniform.frame_ids, uniform.positions)),
      ('random_patches', (rand.frame_ids, rand.positions)),
    ):
      mask = clip.patch_mask(frame_ids)
      shares[name].append(float(mask[tuple(np.asarray(positions).T)].mean()))
  return shares


def pipeline_batch(shards: Sequence[str], budget: int) -> dict:
  """One batch of the shards through the Grain pipeline (codec mode, packed rows, a worker)."""
  from data_pipeline import pipeline

  cfg = pipeline.PipelineConfig.from_dict(
    {
      'seed': 0,
      'worker_count': 1,
      'num_epochs': 1,
      'heads': {
        'video': {
          'kind': 'video',
          'source': ','.join(shards),
          'rows': 2,
          'tokens_per_row': 2 * budget,
          'max_segments': 2,
          'num_labels': 2,
          'video_modes': (1.0, 0.0, 0.0),
        }
      },
    }
  )
  # Plain copies: Grain's workers hand over arrays in shared memory, which a batch kept until the
  # interpreter exits leaves to Python's resource tracker (a "leaked shared_memory" warning).
  return {k: np.array(v) for k, v in next(pipeline.make_iterator(cfg))['video'].items()}


def pooled_forward():
  """The jitted pooled embeddings [rows, 2 segments, C] of an encoder on a packed batch."""
  from flax import nnx

  return nnx.jit(lambda m, p, q, s: m(p, q, s, num_segments=2)['pooled'])


def sharded_vs_single(batch: dict) -> tuple[np.ndarray, dict, float]:
  """The tiny encoder on `batch` sharded over a data 2 x fsdp 2 x tensor mesh and on one
  device: (sharded pooled output, mesh shape, max |difference|)."""
  import jax

  from ove_jax import sharding
  from ove_jax.models import EncoderConfig, create_encoder

  cfg = EncoderConfig.preset('tiny')
  forward = pooled_forward()
  args = batch['patches'], batch['positions'], batch['segment_ids']
  ref = np.asarray(forward(create_encoder(cfg, seed=0), *args))
  data = 2 if jax.device_count() % 8 == 0 else 1
  mesh = sharding.make_mesh({'data': data, 'fsdp': 2, 'tensor': -1})
  with jax.set_mesh(mesh):
    out = np.asarray(forward(create_encoder(cfg, seed=0), *args))
  return out, dict(mesh.shape), float(np.abs(out - ref).max())


# ------------------------------------------------------------------------------------------------
# Stages 5-8: cluster labels, pretraining, probes, export
# ------------------------------------------------------------------------------------------------


def pretrain(config, train_dir: str) -> tuple[list[dict], float]:
  """The trainer on `config` in `train_dir`: (metrics.jsonl lines, seconds)."""
  from absl import logging as absl_logging

  from ove_jax import metrics as metrics_lib
  from ove_jax import train

  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every step of its work at INFO
  start = time.time()
  try:
    stopped = train.train(config, train_dir).get('stopped')
  except train.TrainingError as e:
    raise DemoError(f'training stopped: {e}') from None
  if stopped:  # Ctrl-C or SIGTERM: the trainer saved and stopped; no report from half a run
    from ove_jax import preemption

    raise DemoError(
      f'training stopped ({stopped}); the demo starts over when run again',
      exit_code=preemption.exit_code(stopped),
    )
  return metrics_lib.read_metrics(train_dir), time.time() - start


def probe_runs(
  trained,
  random_init,
  train_records,
  test_records,
  frames: int,
  opts: Options,
  say: Callable[[str], None],
) -> dict:
  """The probes on the clips' texture: {encoder name: {input mode: {probe: top1, top1_std}}}
  for the pretrained and random-init encoders, each on codec and on uniform-frame inputs."""
  from ove_jax import evaluators

  attentive = evaluators.AttentiveConfig(epochs=opts.probe_epochs)
  samples = {
    mode: [
      evaluators.video_samples(records, mode, frames, seed=opts.seed, label_index=TEXTURE_LABEL)
      for records in (train_records, test_records)
    ]
    for mode in ('codec', 'uniform')
  }
  encoders = {'pretrained': trained, 'random_init': random_init}
  results = {}
  for name, mode in PROBE_RUNS:
    train_samples, test_samples = samples[mode]
    result = evaluators.evaluate(
      encoders[name],
      train_samples,
      test_samples,
      seeds=opts.probe_seeds,
      attentive=attentive,
      progress=True,
    )
    results.setdefault(name, {})[mode] = {
      probe: {
        'top1': round(result[probe]['top1'], 4),
        'top1_std': round(result[probe]['top1_std'], 4),
      }
      for probe in evaluators.PROBES
    }
    say(
      f'        {name:11s} {mode:7s} '
      + '   '.join(
        f'{probe} {result[probe]["top1"]:.3f} ± {result[probe]["top1_std"]:.3f}'
        for probe in evaluators.PROBES
      )
    )
  return results


def torch_port_difference(export: str, batch: dict, ref: np.ndarray) -> float | None:
  """Max relative difference of our PyTorch port on the exported directory against the JAX
  encoder's pooled embedding `ref` of the batch's first clip; None without torch."""
  try:
    import torch
  except ImportError:
    return None
  from ove_jax.convert import torch_model

  port = torch_model.load_pretrained(export).eval()
  n = int((batch['segment_ids'][0] == 1).sum())
  with torch.no_grad():
    out = port.forward_tokens(
      torch.from_numpy(np.asarray(batch['patches'][:1, :n])),
      torch.from_numpy(np.asarray(batch['positions'][:1, :n])),
    )
  return float(np.abs(out['pooler_output'].numpy()[0] - ref[0, 0]).max() / np.abs(ref[0, 0]).max())


def experiment_config(experiment: str, args: Sequence[str], overrides: Sequence[str]):
  """The demo's experiment with its argument string and overrides; short runs log more often,
  so that the loss has a first and a last line to compare."""
  from ove_jax import config as config_lib

  spec = experiment + ':' + ','.join(args)
  try:
    config = config_lib.load(spec, overrides)
    if config.total_steps < 3 * config.log_every:
      log_every = max(1, config.total_steps // 3)
      config = config_lib.load(
        spec,
        list(overrides)
        + [f'log_every={log_every}']
        + (['eval_every=0'] if config.eval_every % log_every else []),
      )
  except config_lib.ConfigError as e:
    raise DemoError(str(e), exit_code=2) from None
  return config


def run(opts: Options, draw, say: Callable[[str], None] = print) -> tuple[dict, list[str]]:
  """Runs the stages; returns (summary, failed checks). `draw(frames, frame_ids, positions,
  picture_types, out_dir)` writes the selection pictures and returns {kind: path}. Each stage
  reports its progress through `say`. The summary is also written to <workdir>/summary.json."""
  import jax

  from data_pipeline import builtin, fileio, synthetic
  from ove_jax import checkpoint, convert, demo_labels, evaluators, sharding
  from ove_jax import metrics as metrics_lib
  from ove_jax.models import create_encoder

  start = time.time()
  workdir = os.path.abspath(opts.workdir)
  os.makedirs(workdir, exist_ok=True)
  experiment = find_experiment()
  # The student's config names the cluster labels, made in stage 5: here the default variant
  # checks the arguments and gives the built-in data's sizes.
  exp_args = (
    (['smoke'] if opts.smoke else [])
    + ([f'steps={opts.train_steps}'] if opts.train_steps is not None else [])
    + [f'{name}={weight}' for name, weight in zip(VIDEO_MODE_NAMES, opts.video_modes)]
  )
  data_root = os.path.join(
    workdir,
    f'builtin_data{"_smoke" if opts.smoke else ""}{f"_seed{opts.seed}" if opts.seed else ""}',
  )
  labels_dir = os.path.join(workdir, 'cluster_labels')
  overrides = [f'cpu_devices={opts.devices}', f'seed={opts.seed}']
  data_config = experiment_config(experiment, exp_args + [f'data_root={data_root}'], overrides)
  train_dir = os.path.join(workdir, 'train')
  fresh_train_dir(train_dir)
  summary: dict[str, Any] = {'seed': opts.seed}

  def stage(name):
    say(f'[{time.time() - start:6.1f}s] {name}')

  stage(f'1/8 writing {opts.clips} synthetic 64-frame clips (H.264 with B-frames)')
  clips, list_file = write_clips(os.path.join(workdir, 'videos'), opts.clips)
  stage(f'1/8 precomputing codec selections, K={opts.budget} of 16384 patches per clip')
  record_dir = os.path.join(workdir, 'records')
  result, shards = precompute_clips(list_file, record_dir, opts.budget)
  frames, first = first_selection(shards)
  pictures = draw(
    frames,
    first['frame_ids'],
    first['positions'],
    first['picture_types'],
    os.path.join(workdir, 'selection'),
  )
  say(
    f'        {result["records"]} clips in {len(shards)} shards; selection '
    f'pictures: {", ".join(pictures.values())}'
  )
  summary.update(records=record_dir, selection_pictures=pictures)

  stage('2/8 share of kept patches on moving objects (same budget)')
  shares = moving_shares(clips, shards, opts.budget, record_dir)
  for name, values in shares.items():
    say(f'        {name:15s} {np.mean(values):.3f}')
  summary['share_of_kept_patches_on_moving_objects'] = {
    k: round(float(np.mean(v)), 4) for k, v in shares.items()
  }

  stage('3/8 Grain pipeline -> packed rows -> tiny encoder, sharded vs one device')
  batch = pipeline_batch(shards, opts.budget)
  patches = batch['patches']
  say(
    f'        batch: patches {patches.shape}, {int(batch["segment_valid"].sum())} clips '
    f'in {patches.shape[0]} rows'
  )
  out, mesh_shape, diff = sharded_vs_single(batch)
  say(
    f'        pooled [rows, segments, C] = {out.shape}; sharded vs one device max '
    f'|difference| {diff:.1e}'
  )
  summary.update(mesh=mesh_shape, sharded_vs_single_max_abs_diff=diff)

  b = data_config.builtin
  stage(
    f'4/8 built-in data: {b.clips} clips and {b.images} stills to pretrain on, '
    f'{opts.test_clips} held-out clips to test the probes on'
  )
  made = builtin.ensure(
    data_root, clips=b.clips, images=b.images, budget=b.budget, seed=opts.seed, workers=2
  )
  held_out = builtin.ensure(
    data_root + '_test',
    clips=opts.test_clips,
    images=1,
    budget=b.budget,
    seed=opts.seed + TEST_SEED,
    workers=2,
  )
  train_records = probes_lib.read_records(made['video_source'].split(','))
  test_records = probes_lib.read_records(held_out['video_source'].split(','))
  summary.update(
    pretrain_clips=len(train_records),
    pretrain_images=made['images'],
    test_clips=len(test_records),
    builtin_data=data_root,
  )

  stage(
    f"5/8 cluster labels: k-means over the teacher's features (k = {opts.k} for clips, "
    f'{max(2, opts.k // 2)} for images), nearest centres as labels; teacher: an oracle '
    "(the generator's ground truth: no teacher network can be downloaded here)"
  )
  image_truth = np.load(os.path.join(data_root, 'images', 'labels.npy'))
  reports, nmi = demo_labels.cluster_labels(
    labels_dir, train_records, made['video_source'], image_truth, opts.k, opts.seed, say
  )
  say(
    '        clip clusters vs ground truth, normalised mutual information: '
    + ', '.join(f'{k} {v}' for k, v in nmi.items())
  )
  summary.update(
    teacher='oracle: ground-truth object attributes (texture, direction, shape)',
    cluster_labels=labels_dir,
    clusters=reports,
    cluster_nmi=nmi,
  )

  config = experiment_config(
    experiment, exp_args + [f'student={labels_dir}', f'data_root={data_root}'], overrides
  )
  train_mesh = dict(
    zip(sharding.MESH_AXES, sharding.mesh_shape(dict(config.mesh), jax.device_count()))
  )
  video_head = config.data.heads.video
  modes = dict(zip(VIDEO_MODE_NAMES, (float(w) for w in video_head.video_modes)))
  stage(
    f'6/8 pretraining the tiny encoder from scratch on the cluster labels '
    f'(experiments/{EXPERIMENT}:student=..., {config.total_steps} steps, heads '
    f'{", ".join(sorted(config.heads))}; clips as '
    + ' / '.join(modes)
    + ' = '
    + ' / '.join(f'{w:g}' for w in modes.values())
    + f', {video_head.num_frames} frames), '
    f'{jax.device_count()}-device CPU mesh '
    f'({" x ".join(f"{k} {v}" for k, v in train_mesh.items() if v > 1)})'
  )
  logged, train_seconds = pretrain(config, train_dir)
  loss_first, loss_last = logged[0]['loss'], logged[-1]['loss']
  waits = [line['input_wait_fraction'] for line in logged[1:] if 'input_wait_fraction' in line]
  wait = float(np.mean(waits)) if waits else float('nan')
  say(
    f'        {logged[-1]["step"]} steps in {train_seconds:.0f} s; loss {loss_first:.3f} '
    f'(step {logged[0]["step"]}) -> {loss_last:.3f} (step {logged[-1]["step"]}); '
    f'input wait {wait:.1%} of step time'
  )
  summary.update(
    train_steps=int(logged[-1]['step']),
    train_mesh=train_mesh,
    train_loss_first=round(float(loss_first), 4),
    train_loss_last=round(float(loss_last), 4),
    train_input_wait_fraction=round(wait, 4),
    train_seconds=round(train_seconds, 1),
    train_video_modes=modes,
    train_video_frames=int(video_head.num_frames),
    tensorboard=os.path.join(train_dir, metrics_lib.TENSORBOARD_DIR),
    checkpoints=os.path.join(train_dir, checkpoint.CHECKPOINT_DIR),
    metrics=os.path.join(train_dir, metrics_lib.METRICS_FILE),
  )

  from absl import logging as absl_logging

  # Orbax warns that a step's `state` folder has no _CHECKPOINT_METADATA (the step folder has).
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    loaded = checkpoint.load_encoder(train_dir)
  finally:
    absl_logging.set_verbosity(absl_logging.WARNING)
  trained, step = loaded.model, loaded.step
  random_init = create_encoder(trained.cfg, seed=opts.seed)
  frames_per_clip = b.budget // evaluators.features.FRAME_TOKENS
  stage(
    f"7/8 probes on the object's texture ({len(synthetic.TEXTURES)} classes; "
    f'{len(train_records)} train / {len(test_records)} held-out test clips): pretrained '
    f'(step {step}) and random-init encoder, each on codec patches and on {frames_per_clip} '
    f'uniform frames at {b.budget} tokens; probe seeds {list(opts.probe_seeds)}'
  )
  t0 = time.time()
  probes = probe_runs(trained, random_init, train_records, test_records, frames_per_clip, opts, say)
  headline = lambda name, mode: probes[name][mode][HEADLINE_PROBE]['top1']
  summary.update(
    probe_label='texture',
    probe_headline=HEADLINE_PROBE,
    probe_seeds=list(opts.probe_seeds),
    probe_top1_pretrained=headline('pretrained', 'codec'),
    probe_top1_random_init=headline('random_init', 'codec'),
    probe_top1_codec_inputs=headline('pretrained', 'codec'),
    probe_top1_uniform_inputs=headline('pretrained', 'uniform'),
    probe_top1_codec_inputs_random_init=headline('random_init', 'codec'),
    probe_top1_uniform_inputs_random_init=headline('random_init', 'uniform'),
    probes=probes,
    probe_seconds=round(time.time() - t0, 1),
  )

  stage(
    '8/8 exporting the trained encoder to the release format and checking our PyTorch port on it'
  )
  export = os.path.join(workdir, 'hf_export')
  convert.save_pytorch(trained, export)
  ref = np.asarray(
    pooled_forward()(trained, batch['patches'], batch['positions'], batch['segment_ids'])
  )
  say(f'        step {step} -> {export}')
  summary.update(export=export, export_step=step)
  torch_diff = torch_port_difference(export, batch, ref)
  if torch_diff is None:
    say('        torch not installed: pip install "ove_jax[torch]" to check the port')
  else:
    say(f'        PyTorch port vs JAX, pooled embedding: max relative difference {torch_diff:.1e}')
    summary['torch_port_max_rel_diff'] = torch_diff

  summary['seconds'] = round(time.time() - start, 1)
  fileio.write_json(os.path.join(workdir, 'summary.json'), summary, sort_keys=False)
  failed = []
  if not diff < 1e-4:
    failed.append(f'sharded vs single device differ by {diff:.1e}')
  if torch_diff is not None and not torch_diff < 1e-4:
    failed.append(f'the PyTorch port differs by {torch_diff:.1e}')
  if not loss_last < loss_first:
    failed.append(f'the training loss did not fall ({loss_first:.4f} -> {loss_last:.4f})')
  return summary, failed
