"""End-to-end pretraining demo on built-in data, CPU (README's first command).

  python tools/demo.py --workdir /tmp/ove_demo                       # a few minutes on 2 cores
  python tools/demo.py --workdir /tmp/ove_quick --smoke --train-steps 6   # the tests' version

The stages (each prints its progress):
  1. writes synthetic 64-frame H.264 clips (textured objects moving over photographs, with
     B-frames; `data_pipeline.synthetic`), labelled by object shape and motion direction;
  2. precomputes their codec selections, K = 2048 of 16,384 patches per clip
     (`data_pipeline.precompute`, the library behind tools/precompute_codec.py) into ArrayRecord
     shards, and draws one selection as PNG/GIF;
  3. measures, with the clips' ground-truth motion, the share of kept patches that land on moving
     objects: codec selection vs uniform frames vs random patches at the same budget;
  4. reads the shards back through the Grain pipeline (codec mode, packed rows, worker process)
     and runs the tiny encoder on a batch, sharded over an 8-virtual-device CPU mesh
     (data 2 x fsdp 2 x tensor 2), checked against a single-device run;
  5. pretrains the tiny encoder with the trainer (`ove_jax.train`, in this process) on the
     experiment experiments/demo_cpu.py: built-in synthetic clips and images (generated on first
     use into <workdir>/builtin_data, reused by later runs), video and image heads, 8-device CPU
     mesh (data 4 x fsdp 2); metrics in <workdir>/train/metrics.jsonl and TensorBoard,
     checkpoints in <workdir>/train/checkpoints (a previous demo's run there is replaced);
  6. exports the trained encoder of the last checkpoint to the release's PyTorch format
     (<workdir>/hf_export, as `tools/convert_checkpoint.py from-train` does) and, when torch is
     installed, checks our PyTorch port on the exported directory against the JAX encoder built
     from the same parameters.
It writes `summary.json` into the work directory and exits non-zero when a check fails: the
sharded vs single-device run or the PyTorch port differ by 1e-4 or more, or the training loss
did not fall (last logged loss >= first).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _set_cpu_devices(n: int):
  # Must happen before JAX initialises its backend.
  flag = f'--xla_force_host_platform_device_count={n}'
  if flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()


EXPERIMENT = 'demo_cpu.py'


def _find_experiment(name: str = EXPERIMENT) -> str:
  """experiments/<name> of the repository: next to tools/ (this file), next to the ove_jax
  package (an editable install), or under the current directory."""
  import ove_jax  # no JAX import: safe before the device count is set
  roots = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
           os.path.dirname(os.path.dirname(os.path.abspath(ove_jax.__file__))), os.getcwd()]
  candidates = list(dict.fromkeys(os.path.join(r, 'experiments', name) for r in roots))
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f'the pretraining stage needs the experiment file experiments/{name}, which is not '
      f'installed with the package; looked for {", ".join(candidates)}. Run the demo from a '
      'checkout of the repository (pip install -e . there, or cd into it).')


def _fresh_train_dir(path: str) -> None:
  """Removes an earlier demo's training run from `path` (the trainer would resume it)."""
  import shutil
  if not os.path.exists(path) or not os.listdir(path):
    return
  if not any(os.path.exists(os.path.join(path, n)) for n in ('checkpoints', 'metrics.jsonl',
                                                              'config.json')):
    raise SystemExit(f'error: {path} exists and is not a training run of this demo; move it or '
                     'pick another --workdir')
  shutil.rmtree(path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', default='/tmp/ove_demo')
  parser.add_argument('--clips', type=int, default=8)
  parser.add_argument('--budget', type=int, default=2048)
  parser.add_argument('--devices', type=int, default=8, help='virtual CPU devices')
  parser.add_argument('--train-steps', type=int, default=None,
                      help='pretraining steps (default: the experiment\'s, 300; 20 with --smoke)')
  parser.add_argument('--smoke', action='store_true',
                      help='the experiment\'s smoke variant: built-in data of 8 clips and 16 '
                      'images instead of 48 and 96, logs every 2 steps (the tests use it)')
  args = parser.parse_args(argv)
  if args.train_steps is not None and args.train_steps < 2:
    parser.error('--train-steps must be at least 2 (the demo compares the first and last loss)')
  if args.devices < 2 or args.devices % 2:
    parser.error('--devices must be even (the meshes have an fsdp axis of 2)')
  if args.budget % 256 or not 256 <= args.budget <= 64 * 256:
    parser.error(f'--budget {args.budget}: use a multiple of 256 (whole 224x224 frames, for the '
                 'uniform-frame comparison) between 256 and 16384')
  if args.clips < 2:
    parser.error('--clips must be at least 2')
  try:
    experiment = _find_experiment()
  except FileNotFoundError as e:
    parser.error(str(e))
  _set_cpu_devices(args.devices)

  import jax
  import numpy as np
  from flax import nnx
  from jax.sharding import AxisType

  from data_pipeline import codec, pipeline, precompute, synthetic, video
  from ove_jax import config as config_lib, convert, metrics as metrics_lib, train
  from ove_jax.models import EncoderConfig, create_encoder
  from ove_jax_tools import convert_checkpoint, visualize_selection

  start = time.time()
  args.workdir = os.path.abspath(args.workdir)
  os.makedirs(args.workdir, exist_ok=True)
  # The experiment, loaded (and validated) before anything runs.
  exp_args = (['smoke'] if args.smoke else []) + (
      [f'steps={args.train_steps}'] if args.train_steps is not None else [])
  spec = experiment + (':' + ','.join(exp_args) if exp_args else '')
  data_root = os.path.join(args.workdir, 'builtin_data' + ('_smoke' if args.smoke else ''))
  overrides = [f'builtin.root={data_root}', f'cpu_devices={args.devices}']
  try:
    config = config_lib.load(spec, overrides)
    if config.total_steps < 3 * config.log_every:
      # Short runs log more often, so that the loss has a first and a last line to compare.
      log_every = max(1, config.total_steps // 3)
      overrides += [f'log_every={log_every}'] + (
          ['eval_every=0'] if config.eval_every % log_every else [])
      config = config_lib.load(spec, overrides)
  except config_lib.ConfigError as e:
    print(f'config error: {e}', file=sys.stderr)
    return 2
  train_dir = os.path.join(args.workdir, 'train')
  _fresh_train_dir(train_dir)
  summary = {}

  def stage(name):
    print(f'[{time.time() - start:6.1f}s] {name}', flush=True)

  stage(f'1/6 writing {args.clips} synthetic 64-frame clips (H.264 with B-frames)')
  clip_dir = os.path.join(args.workdir, 'videos')
  os.makedirs(clip_dir, exist_ok=True)
  clips, lines = [], []
  for seed in range(args.clips):
    clip = synthetic.make_clip(seed, num_frames=64, bframes=2, num_objects=1,
                               background='pan' if seed % 2 else 'static')
    path = clip.write(os.path.join(clip_dir, f'clip{seed:03d}.mp4'))
    # Two labels per clip for now (object shape, motion direction); cluster labels replace them
    # in the demo (issue 5).
    labels = [clip.labels['shape_id'], len(synthetic.SHAPES) + clip.labels['direction_id']]
    clips.append((path, clip))
    lines.append(f'{os.path.basename(path)}\t{labels[0]},{labels[1]}')
  list_file = os.path.join(clip_dir, 'clips.tsv')
  with open(list_file, 'w') as f:
    f.write('\n'.join(lines) + '\n')

  stage(f'2/6 precomputing codec selections, K={args.budget} of 16384 patches per clip')
  record_dir = os.path.join(args.workdir, 'records')
  options = {'num_frames': 64, 'budget': args.budget, 'resolution': 224, 'patch_size': 14,
             'policy': 'zero', 'camera_compensation': 'median'}
  result = precompute.precompute(list_file, record_dir, options=options, clips_per_shard=4,
                                 workers=1, progress=True)
  shards = precompute.shard_files(record_dir)
  first = precompute.read_record(shards[0], 0)
  frames = video.decode_frames(first.get('video') or first['source'], first['frame_ids'])
  pictures = visualize_selection.render(frames, first['frame_ids'], first['positions'],
                                        first['picture_types'],
                                        os.path.join(args.workdir, 'selection'))
  print(f'        {result["records"]} clips in {len(shards)} shards; selection '
        f'pictures: {", ".join(pictures.values())}')
  summary.update(records=record_dir, selection_pictures=pictures)

  stage('3/6 share of kept patches on moving objects (same budget)')
  # Codec selections come from the records just written; the baselines are cheap to compute.
  codec_by_source = {}
  for shard in shards:
    for record in precompute.read_shard(shard):
      codec_by_source[os.path.abspath(record['source'])] = (record['frame_ids'],
                                                            record['positions'])
  missing = [p for p, _ in clips if os.path.abspath(p) not in codec_by_source]
  if missing:
    raise SystemExit(f'error: no codec record for {missing[0]}; see '
                     f'{os.path.join(record_dir, "failures.jsonl")} for why it failed')
  shares = {'codec': [], 'uniform_frames': [], 'random_patches': []}
  for path, clip in clips:
    uniform = codec.select_uniform_frames(path, budget=args.budget)
    rand = codec.select_random(path, budget=args.budget)
    for name, (frame_ids, positions) in (
        ('codec', codec_by_source[os.path.abspath(path)]),
        ('uniform_frames', (uniform.frame_ids, uniform.positions)),
        ('random_patches', (rand.frame_ids, rand.positions))):
      mask = clip.patch_mask(frame_ids)
      shares[name].append(float(mask[tuple(np.asarray(positions).T)].mean()))
  for name, values in shares.items():
    print(f'        {name:15s} {np.mean(values):.3f}')
  summary['share_of_kept_patches_on_moving_objects'] = {
      k: round(float(np.mean(v)), 4) for k, v in shares.items()}

  stage('4/6 Grain pipeline -> packed rows -> tiny encoder, sharded vs one device')
  cfg_pipe = pipeline.PipelineConfig.from_dict({
      'seed': 0, 'worker_count': 1, 'num_epochs': 1,
      'heads': {'video': {'kind': 'video', 'source': ','.join(shards), 'rows': 2,
                          'tokens_per_row': 2 * args.budget, 'max_segments': 2,
                          'num_labels': 2, 'video_modes': (1.0, 0.0, 0.0)}}})
  batch = next(pipeline.make_iterator(cfg_pipe))['video']
  patches, positions, segments = batch['patches'], batch['positions'], batch['segment_ids']
  print(f'        batch: patches {patches.shape}, {int(batch["segment_valid"].sum())} clips '
        f'in {patches.shape[0]} rows')
  cfg = EncoderConfig.preset('tiny')
  forward = nnx.jit(lambda m, p, q, s: m(p, q, s, num_segments=2)['pooled'])
  single = create_encoder(cfg, seed=0)
  ref = np.asarray(forward(single, patches, positions, segments))
  data = 2 if jax.device_count() % 8 == 0 else 1
  mesh = jax.make_mesh((data, 2, jax.device_count() // (2 * data)), ('data', 'fsdp', 'tensor'),
                       axis_types=(AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    sharded = create_encoder(cfg, seed=0)
    out = np.asarray(forward(sharded, patches, positions, segments))
  diff = float(np.abs(out - ref).max())
  print(f'        pooled [rows, segments, C] = {out.shape}; sharded vs one device max '
        f'|difference| {diff:.1e}')
  summary.update(mesh=dict(mesh.shape), sharded_vs_single_max_abs_diff=diff)

  train_mesh = dict(zip(('data', 'fsdp', 'tensor'), train.mesh_shape(config, jax.device_count())))
  stage(f'5/6 pretraining the tiny encoder (experiments/{EXPERIMENT}'
        f'{":" + ",".join(exp_args) if exp_args else ""}, {config.total_steps} steps) on the '
        f'built-in data, {jax.device_count()}-device CPU mesh '
        f'({" x ".join(f"{k} {v}" for k, v in train_mesh.items() if v > 1)})')
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every step of its work at INFO
  t0 = time.time()
  try:
    train.train(config, train_dir)
  except train.TrainingError as e:
    print(f'error: training stopped: {e}', file=sys.stderr)
    return 1
  train_seconds = time.time() - t0
  logged = metrics_lib.read_metrics(train_dir)
  loss_first, loss_last = logged[0]['loss'], logged[-1]['loss']
  waits = [line['input_wait_fraction'] for line in logged[1:] if 'input_wait_fraction' in line]
  wait = float(np.mean(waits)) if waits else float('nan')
  print(f'        {logged[-1]["step"]} steps in {train_seconds:.0f} s; loss {loss_first:.3f} '
        f'(step {logged[0]["step"]}) -> {loss_last:.3f} (step {logged[-1]["step"]}); '
        f'input wait {wait:.1%} of step time')
  summary.update(
      train_steps=int(logged[-1]['step']), train_mesh=train_mesh,
      train_loss_first=round(float(loss_first), 4), train_loss_last=round(float(loss_last), 4),
      train_input_wait_fraction=round(wait, 4), train_seconds=round(train_seconds, 1),
      tensorboard=os.path.join(train_dir, metrics_lib.TENSORBOARD_DIR),
      checkpoints=os.path.join(train_dir, train.CHECKPOINT_DIR),
      metrics=os.path.join(train_dir, metrics_lib.METRICS_FILE))

  stage('6/6 exporting the trained encoder to the release format and checking our PyTorch port '
        'on it')
  # Orbax warns that a step's `state` folder has no _CHECKPOINT_METADATA (the step folder has).
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    trained, step, _ = convert_checkpoint.trained_encoder(train_dir)
  finally:
    absl_logging.set_verbosity(absl_logging.WARNING)
  export = os.path.join(args.workdir, 'hf_export')
  convert.save_pytorch(trained, export)
  ref = np.asarray(forward(trained, patches, positions, segments))
  print(f'        step {step} -> {export}')
  summary.update(export=export, export_step=step)
  try:
    import torch
    from ove_jax.convert import torch_model
    port = torch_model.load_pretrained(export).eval()
    n = int((segments[0] == 1).sum())
    with torch.no_grad():
      ref_torch = port.forward_tokens(torch.from_numpy(np.asarray(patches[:1, :n])),
                                      torch.from_numpy(np.asarray(positions[:1, :n])))
    rel = float(np.abs(ref_torch['pooler_output'].numpy()[0] - ref[0, 0]).max()
                / np.abs(ref[0, 0]).max())
    print(f'        PyTorch port vs JAX, pooled embedding: max relative difference {rel:.1e}')
    summary['torch_port_max_rel_diff'] = rel
  except ImportError:
    print('        torch not installed: pip install "ove_jax[torch]" to check the port')

  summary['seconds'] = round(time.time() - start, 1)
  with open(os.path.join(args.workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  print('\nsummary')
  for key, value in summary.items():
    print(f'  {key:42s} {value}')
  print(f'\nselection pictures: {", ".join(pictures.values())}')
  print(f'TensorBoard logs:   {summary["tensorboard"]}  (tensorboard --logdir '
        f'{summary["tensorboard"]})')
  print(f'wrote {os.path.join(args.workdir, "summary.json")}')
  failures = []
  if not diff < 1e-4:
    failures.append(f'sharded vs single device differ by {diff:.1e}')
  if not summary.get('torch_port_max_rel_diff', 0.0) < 1e-4:
    failures.append(f'the PyTorch port differs by {summary["torch_port_max_rel_diff"]:.1e}')
  if not loss_last < loss_first:
    failures.append(f'the training loss did not fall ({loss_first:.4f} -> {loss_last:.4f})')
  for failure in failures:
    print(f'error: {failure}', file=sys.stderr)
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
