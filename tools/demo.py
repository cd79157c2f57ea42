"""End-to-end demo on built-in data, CPU (README's first command).

  python tools/demo.py --workdir /tmp/ove_demo

What it runs today (each stage prints its progress):
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
  5. exports the encoder to the release's PyTorch format and, when torch is installed, checks our
     PyTorch port on the exported directory against the JAX features.
It writes `summary.json` into the work directory. The pretraining, labels and probe stages join
this demo as the trainer lands (issues 4-5).
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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', default='/tmp/ove_demo')
  parser.add_argument('--clips', type=int, default=8)
  parser.add_argument('--budget', type=int, default=2048)
  parser.add_argument('--devices', type=int, default=8, help='virtual CPU devices')
  args = parser.parse_args(argv)
  if args.budget % 256 or not 256 <= args.budget <= 64 * 256:
    parser.error(f'--budget {args.budget}: use a multiple of 256 (whole 224x224 frames, for the '
                 'uniform-frame comparison) between 256 and 16384')
  if args.clips < 2:
    parser.error('--clips must be at least 2')
  _set_cpu_devices(args.devices)

  import jax
  import numpy as np
  from flax import nnx
  from jax.sharding import AxisType

  from data_pipeline import codec, pipeline, precompute, records, synthetic, video
  from ove_jax import convert
  from ove_jax.models import EncoderConfig, create_encoder
  from ove_jax_tools import visualize_selection

  start = time.time()
  os.makedirs(args.workdir, exist_ok=True)
  summary = {}

  def stage(name):
    print(f'[{time.time() - start:6.1f}s] {name}', flush=True)

  stage(f'1/5 writing {args.clips} synthetic 64-frame clips (H.264 with B-frames)')
  clip_dir = os.path.join(args.workdir, 'videos')
  os.makedirs(clip_dir, exist_ok=True)
  clips, lines = [], []
  for seed in range(args.clips):
    clip = synthetic.make_clip(seed, num_frames=64, bframes=2, num_objects=1,
                               background='pan' if seed % 2 else 'static')
    path = clip.write(os.path.join(clip_dir, f'clip{seed:03d}.mp4'))
    # Two labels per clip for now (object shape, motion direction); cluster labels replace them
    # when tools/cluster_labels.py lands.
    labels = [clip.labels['shape_id'], len(synthetic.SHAPES) + clip.labels['direction_id']]
    clips.append((path, clip))
    lines.append(f'{os.path.basename(path)}\t{labels[0]},{labels[1]}')
  list_file = os.path.join(clip_dir, 'clips.tsv')
  with open(list_file, 'w') as f:
    f.write('\n'.join(lines) + '\n')

  stage(f'2/5 precomputing codec selections, K={args.budget} of 16384 patches per clip')
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

  stage('3/5 share of kept patches on moving objects (same budget)')
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

  stage('4/5 Grain pipeline -> packed rows -> tiny encoder, sharded vs one device')
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

  stage('5/5 exporting to the release format and checking our PyTorch port on it')
  export = os.path.join(args.workdir, 'hf_export')
  convert.save_pytorch(single, export)
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
  summary['export'] = export
  with open(os.path.join(args.workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  print('\nsummary')
  for key, value in summary.items():
    print(f'  {key:42s} {value}')
  print(f'\nwrote {os.path.join(args.workdir, "summary.json")}')
  ok = diff < 1e-4 and summary.get('torch_port_max_rel_diff', 0.0) < 1e-4
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
