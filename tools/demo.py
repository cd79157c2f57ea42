"""End-to-end pretraining demo on built-in data, CPU (README's first command).

  python tools/demo.py --workdir /tmp/ove_demo                       # a few minutes on 2 cores
  python tools/demo.py --workdir /tmp/ove_quick --smoke --train-steps 6   # the tests' version

The stages (each prints its progress):
  1. writes synthetic 64-frame H.264 clips (textured objects moving over photographs, with
     B-frames; `data_pipeline.synthetic`) and precomputes their codec selections, K = 2048 of
     16,384 patches per clip (`data_pipeline.precompute`) into ArrayRecord shards; draws one
     selection as PNG/GIF;
  2. measures, with the clips' ground-truth motion, the share of kept patches that land on moving
     objects: codec selection vs uniform frames vs random patches at the same budget;
  3. reads the shards back through the Grain pipeline (codec mode, packed rows, worker process)
     and runs the tiny encoder on a batch, sharded over an 8-virtual-device CPU mesh
     (data 2 x fsdp 2 x tensor 2), checked against a single-device run;
  4. makes the built-in data (`data_pipeline.builtin`): 256 clips of one textured object each,
     codec-selected at K = 512, and 256 stills for pretraining, plus 96 held-out clips for the
     probes' test split;
  5. cluster labels from a teacher (`tools/cluster_labels.py`): k-means (k = 32 for clips, 16 for
     images) over the teacher's features, each sample labelled with its nearest centres, the
     clips' records rewritten with them. The teacher is an ORACLE: no teacher network can be
     downloaded here (the paper's is MetaCLIP-H/14), so each sample's teacher feature embeds
     the generator's ground truth of its object (texture, motion direction, shape; one-hot
     blocks weighted 1, 0.8, 0.6). The student never sees those attributes, only cluster ids;
     a real teacher is one flag away (`cluster_labels.py --teacher DIR` or `--features`);
  6. pretrains the tiny encoder from scratch on the cluster labels with the trainer
     (`ove_jax.train`, experiments/demo_cpu.py:student=...: video and image heads, Partial FC
     with CosFace, 8-device CPU mesh data 4 x fsdp 2); metrics in <workdir>/train/metrics.jsonl
     and TensorBoard, checkpoints in <workdir>/train/checkpoints;
  7. probes the frozen encoder (`ove_jax.evaluators`) on the object's texture (4 classes; the
     256 pretraining clips with their true labels train the probes, the 96 held-out clips test
     them): pretrained vs random-init encoder on codec inputs, and codec vs uniform-frame inputs
     (K / 256 = 2 whole frames: the same 512 tokens) on the pretrained encoder. Attentive probe
     (SPEC §6, 30 epochs, several seeds), logistic regression and k-NN on the pooled embedding;
     the summary's `probe_top1_*` are the logistic-regression probe's (see README);
  8. exports the trained encoder of the last checkpoint to the release's PyTorch format
     (<workdir>/hf_export, as `tools/convert_checkpoint.py from-train` does) and, when torch is
     installed, checks our PyTorch port on the exported directory against the JAX encoder.
It writes `summary.json` into the work directory and exits non-zero when a check fails: the
sharded vs single-device run or the PyTorch port differ by 1e-4 or more, or the training loss
did not fall (last logged loss >= first).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time


def _set_cpu_devices(n: int):
  # Must happen before JAX initialises its backend.
  flag = f'--xla_force_host_platform_device_count={n}'
  if flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()


EXPERIMENT = 'demo_cpu.py'
TEXTURE_LABEL = 3        # builtin clips' labels: fine, shape, direction, texture
HEADLINE_PROBE = 'linear'  # the summary's probe_top1_*: logistic regression on the pooled embedding
_TEST_SEED = 1000        # the held-out clips' data seed, offset from --seed


def oracle_features(attributes):
  """The demo's teacher: per sample, one-hot blocks of its object's ground truth (texture 1.0,
  direction 0.8 when the sample has one, shape 0.6), [N, D] float32.

  Stands in for a teacher network's features (the paper clusters MetaCLIP-H/14's). The weights
  order what k-means splits on first; the cluster ids, not these vectors, are what the student
  learns from.
  """
  import numpy as np
  from data_pipeline import synthetic
  blocks = (('texture', len(synthetic.TEXTURES), 1.0),
            ('direction', len(synthetic.DIRECTIONS), 0.8), ('shape', len(synthetic.SHAPES), 0.6))
  rows = []
  for a in attributes:
    rows.append(np.concatenate([np.eye(n, dtype=np.float32)[a[name]] * w if name in a
                                else np.zeros(n, np.float32) for name, n, w in blocks]))
  return np.stack(rows)


def _read_records(source: str) -> list:
  from data_pipeline import precompute
  return [r for path in source.split(',') for r in precompute.read_shard(path)]


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
  parser.add_argument('--seed', type=int, default=0,
                      help='seeds the built-in data, the pretraining and the random-init baseline')
  parser.add_argument('--test-clips', type=int, default=None,
                      help='held-out clips for the probes\' test split (default 96; 8 --smoke)')
  parser.add_argument('--k', type=int, default=None,
                      help='k-means centres for the clips (default 32; 8 --smoke); images get '
                      'half')
  parser.add_argument('--probe-seeds', default=None,
                      help='probe seeds, comma-separated (default 0,1,2; 0 --smoke)')
  parser.add_argument('--probe-epochs', type=int, default=None,
                      help='attentive probe epochs (default 30, SPEC §6 for small sets; 2 --smoke)')
  parser.add_argument('--smoke', action='store_true',
                      help='a quick run for the tests: the experiment\'s smoke variant (8 clips '
                      'and 16 images of built-in data), 8 held-out clips, k = 8, short probes')
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
  if args.seed < 0:
    parser.error(f'--seed {args.seed}: must be >= 0')
  args.test_clips = args.test_clips or (8 if args.smoke else 96)
  args.k = args.k or (8 if args.smoke else 32)
  args.probe_epochs = args.probe_epochs or (2 if args.smoke else 30)
  try:
    args.probe_seeds = [int(x) for x in (args.probe_seeds or ('0' if args.smoke else '0,1,2'))
                        .split(',') if x.strip()]
  except ValueError:
    parser.error(f'--probe-seeds {args.probe_seeds!r}: expected comma-separated integers')
  if args.test_clips < 2 or args.k < 2 or args.probe_epochs < 1 or not args.probe_seeds:
    parser.error('--test-clips and --k must be at least 2, --probe-epochs at least 1, and '
                 '--probe-seeds must name a seed')
  try:
    experiment = _find_experiment()
  except FileNotFoundError as e:
    parser.error(str(e))
  _set_cpu_devices(args.devices)

  import jax
  import numpy as np
  from flax import nnx
  from jax.sharding import AxisType

  from data_pipeline import builtin, codec, pipeline, precompute, synthetic, video
  from ove_jax import config as config_lib, convert, evaluators, metrics as metrics_lib, train
  from ove_jax.models import EncoderConfig, create_encoder
  from ove_jax_tools import cluster_labels, convert_checkpoint, visualize_selection

  start = time.time()
  args.workdir = os.path.abspath(args.workdir)
  os.makedirs(args.workdir, exist_ok=True)
  # The experiment, loaded (and validated) before anything runs. The student's config names
  # the cluster labels, made in stage 5: here the default variant checks the arguments and gives
  # the built-in data's sizes.
  exp_args = (['smoke'] if args.smoke else []) + (
      [f'steps={args.train_steps}'] if args.train_steps is not None else [])
  data_root = os.path.join(args.workdir, f'builtin_data{"_smoke" if args.smoke else ""}'
                           f'{"_seed%d" % args.seed if args.seed else ""}')
  labels_dir = os.path.join(args.workdir, 'cluster_labels')
  overrides = [f'cpu_devices={args.devices}', f'seed={args.seed}']

  def load_config(*extra):
    spec = experiment + ':' + ','.join(exp_args + list(extra))
    config = config_lib.load(spec, overrides)
    if config.total_steps < 3 * config.log_every:
      # Short runs log more often, so that the loss has a first and a last line to compare.
      log_every = max(1, config.total_steps // 3)
      config = config_lib.load(spec, overrides + [f'log_every={log_every}'] + (
          ['eval_every=0'] if config.eval_every % log_every else []))
    return spec, config

  try:
    _, data_config = load_config(f'data_root={data_root}')
  except config_lib.ConfigError as e:
    print(f'config error: {e}', file=sys.stderr)
    return 2
  train_dir = os.path.join(args.workdir, 'train')
  _fresh_train_dir(train_dir)
  summary = {}

  def stage(name):
    print(f'[{time.time() - start:6.1f}s] {name}', flush=True)

  stage(f'1/8 writing {args.clips} synthetic 64-frame clips (H.264 with B-frames)')
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

  stage(f'1/8 precomputing codec selections, K={args.budget} of 16384 patches per clip')
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

  stage('2/8 share of kept patches on moving objects (same budget)')
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

  stage('3/8 Grain pipeline -> packed rows -> tiny encoder, sharded vs one device')
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

  stage(f'4/8 built-in data: {data_config.builtin.clips} clips and {data_config.builtin.images} '
        f'stills to pretrain on, {args.test_clips} held-out clips to test the probes on')
  made = builtin.ensure(data_root, clips=data_config.builtin.clips,
                        images=data_config.builtin.images, budget=data_config.builtin.budget,
                        seed=args.seed, workers=2)
  held_out = builtin.ensure(data_root + '_test', clips=args.test_clips, images=1,
                            budget=data_config.builtin.budget, seed=args.seed + _TEST_SEED,
                            workers=2)
  train_records = _read_records(made['video_source'])
  test_records = _read_records(held_out['video_source'])
  summary.update(pretrain_clips=len(train_records), pretrain_images=made['images'],
                 test_clips=len(test_records), builtin_data=data_root)

  stage(f'5/8 cluster labels: k-means over the teacher\'s features (k = {args.k} for clips, '
        f'{max(2, args.k // 2)} for images), nearest centres as labels; teacher: an oracle '
        '(the generator\'s ground truth: no teacher network can be downloaded here)')
  shutil.rmtree(labels_dir, ignore_errors=True)
  images_dir = os.path.join(data_root, 'images')
  image_truth = np.load(os.path.join(images_dir, 'labels.npy'))
  reports = {}
  for kind, feats, k, extra in (
      ('video', oracle_features([builtin.video_attributes(r['labels'])
                                 for r in train_records]), args.k,
       ['--records', ','.join(made['video_source'].split(','))]),
      ('image', oracle_features([builtin.image_attributes(row) for row in image_truth]),
       max(2, args.k // 2), [])):
    out = os.path.join(labels_dir, kind)
    os.makedirs(out)
    np.savez(os.path.join(out, 'teacher_features.npz'), features=feats)
    report = cluster_labels.run(cluster_labels.build_parser().parse_args(
        ['--features', os.path.join(out, 'teacher_features.npz'), '--k', str(k),
         '--backend', 'sklearn', '--seed', str(args.seed), '--out', out] + extra))
    sizes = report['sizes']
    print(f'        {kind}: {report["N"]} samples -> k = {k}, cluster sizes {sizes["min"]} / '
          f'{sizes["median"]:g} / {sizes["max"]} (min / median / max), '
          f'{report["iterations"]} iterations')
    reports[kind] = {'k': k, 'N': report['N'], 'sizes': sizes, 'inertia': report['inertia']}
  # How much of each attribute the clip clusters carry (what the student can learn from them).
  from sklearn.metrics import normalized_mutual_info_score
  nearest = np.load(os.path.join(labels_dir, 'video', 'labels.npy'))[:, 0]
  truth = [builtin.video_attributes(r['labels']) for r in train_records]
  nmi = {name: round(float(normalized_mutual_info_score([t[name] for t in truth], nearest)), 3)
         for name in ('texture', 'direction', 'shape')}
  print('        clip clusters vs ground truth, normalised mutual information: '
        + ', '.join(f'{k} {v}' for k, v in nmi.items()))
  summary.update(teacher='oracle: ground-truth object attributes (texture, direction, shape)',
                 cluster_labels=labels_dir, clusters=reports, cluster_nmi=nmi)

  try:
    _, config = load_config(f'student={labels_dir}', f'data_root={data_root}')
  except config_lib.ConfigError as e:
    print(f'config error: {e}', file=sys.stderr)
    return 2
  train_mesh = dict(zip(('data', 'fsdp', 'tensor'), train.mesh_shape(config, jax.device_count())))
  stage(f'6/8 pretraining the tiny encoder from scratch on the cluster labels '
        f'(experiments/{EXPERIMENT}:student=..., {config.total_steps} steps, heads '
        f'{", ".join(sorted(config.heads))}), {jax.device_count()}-device CPU mesh '
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

  # Orbax warns that a step's `state` folder has no _CHECKPOINT_METADATA (the step folder has).
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    trained, step, _ = convert_checkpoint.trained_encoder(train_dir)
  finally:
    absl_logging.set_verbosity(absl_logging.WARNING)
  random_init = create_encoder(trained.cfg, seed=args.seed)
  frames = data_config.builtin.budget // evaluators.features.FRAME_TOKENS
  stage(f'7/8 probes on the object\'s texture ({len(synthetic.TEXTURES)} classes; '
        f'{len(train_records)} train / {len(test_records)} held-out test clips): pretrained '
        f'(step {step}) vs random-init encoder, codec patches vs {frames} uniform frames at '
        f'{data_config.builtin.budget} tokens; probe seeds {args.probe_seeds}')
  t0 = time.time()
  probes = {}
  attentive = evaluators.AttentiveConfig(epochs=args.probe_epochs)
  samples = {mode: [evaluators.video_samples(records, mode, frames, seed=args.seed,
                                             label_index=TEXTURE_LABEL)
                    for records in (train_records, test_records)]
             for mode in ('codec', 'uniform')}
  for name, encoder, mode in (('pretrained', trained, 'codec'),
                              ('random_init', random_init, 'codec'),
                              ('pretrained', trained, 'uniform')):
    train_samples, test_samples = samples[mode]
    result = evaluators.evaluate(encoder, train_samples, test_samples, seeds=args.probe_seeds,
                                 attentive=attentive, progress=True)
    probes.setdefault(name, {})[mode] = {
        probe: {'top1': round(result[probe]['top1'], 4),
                'top1_std': round(result[probe]['top1_std'], 4)}
        for probe in evaluators.PROBES}
    print(f'        {name:11s} {mode:7s} ' + '   '.join(
        f'{probe} {result[probe]["top1"]:.3f} ± {result[probe]["top1_std"]:.3f}'
        for probe in evaluators.PROBES), flush=True)
  headline = lambda name, mode: probes[name][mode][HEADLINE_PROBE]['top1']
  summary.update(
      probe_label='texture', probe_headline=HEADLINE_PROBE, probe_seeds=args.probe_seeds,
      probe_top1_pretrained=headline('pretrained', 'codec'),
      probe_top1_random_init=headline('random_init', 'codec'),
      probe_top1_codec_inputs=headline('pretrained', 'codec'),
      probe_top1_uniform_inputs=headline('pretrained', 'uniform'),
      probes=probes, probe_seconds=round(time.time() - t0, 1))

  stage('8/8 exporting the trained encoder to the release format and checking our PyTorch port '
        'on it')
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
    if key not in ('probes', 'clusters'):
      print(f'  {key:42s} {value}')
  print(f'\nprobe top-1 on the held-out clips\' texture (mean ± std over probe seeds '
        f'{args.probe_seeds}; headline: {HEADLINE_PROBE})')
  print(f'  {"encoder":12s} {"inputs":8s} ' + ''.join(f'{p:>16s}' for p in evaluators.PROBES))
  for name, modes in probes.items():
    for mode, entry in modes.items():
      print(f'  {name:12s} {mode:8s} ' + ''.join(
          f'{entry[p]["top1"]:>9.3f} ± {entry[p]["top1_std"]:.3f}' for p in evaluators.PROBES))
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
