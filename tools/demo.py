"""End-to-end demo on built-in data, CPU (README's first command).

  python tools/demo.py --workdir /tmp/ove_demo

What it runs today, on an 8-virtual-device CPU mesh (data 2 x fsdp 2 x tensor 2):
  1. makes two 64-frame clips (a textured square moving over a photograph, drawn in numpy);
  2. picks K = 2048 of each clip's 16,384 patches by temporal change (a frame-difference
     stand-in for the codec selection of `data_pipeline.codec`, which replaces it when it lands)
     and, for comparison, 8 whole frames placed on the 64-frame grid at the same budget;
  3. packs both selections into rows of the encoder's native interface and runs the tiny encoder
     sharded over the mesh, checking it against a single-device run of the same weights;
  4. exports the encoder to the release's PyTorch format and, when torch is installed, checks
     our PyTorch port on the exported directory against the JAX features.
It writes `summary.json` into the work directory. The pretraining, labels and probe stages join
this demo as the trainer and data pipeline land (issues 3-5).
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


def make_clip(seed: int, frames: int = 64, size: int = 224):
  """A textured square moving across a photograph.

  Returns the clip, uint8 [T, H, W, 3], and which 14x14 patches the square touches [T, 16, 16].
  """
  import numpy as np
  from sklearn.datasets import load_sample_images

  rng = np.random.RandomState(seed)
  photo = load_sample_images().images[seed % 2]
  y0, x0 = rng.randint(0, photo.shape[0] - size), rng.randint(0, photo.shape[1] - size)
  background = photo[y0:y0 + size, x0:x0 + size].astype(np.float32)
  texture = rng.randint(0, 255, size=(8, 8, 3)).repeat(6, 0).repeat(6, 1).astype(np.float32)
  side = texture.shape[0]
  start = rng.randint(0, size - side, 2).astype(np.float32)
  velocity = rng.uniform(-2.5, 2.5, 2).astype(np.float32)
  clip = np.empty((frames, size, size, 3), np.uint8)
  on_object = np.zeros((frames, size // 14, size // 14), bool)
  for t in range(frames):
    y, x = np.clip(start + velocity * t, 0, size - side).astype(int)
    frame = background.copy()
    frame[y:y + side, x:x + side] = texture
    clip[t] = frame
    on_object[t, y // 14:(y + side - 1) // 14 + 1, x // 14:(x + side - 1) // 14 + 1] = True
  return clip, on_object


def normalise(clip_uint8):
  import numpy as np
  from ove_jax.models import CLIP_MEAN, CLIP_STD
  return ((clip_uint8.astype(np.float32) / 255.0 - np.array(CLIP_MEAN, np.float32))
          / np.array(CLIP_STD, np.float32))


def select_by_change(clip, budget: int, patch: int = 14):
  """Top-`budget` patches by mean absolute temporal difference, sorted by (t, h, w)."""
  import numpy as np
  x = clip.astype(np.float32).mean(-1)
  diff = np.abs(np.diff(x, axis=0, prepend=x[:1]))
  t, h, w = diff.shape
  scores = diff.reshape(t, h // patch, patch, w // patch, patch).mean((2, 4))
  scores[0] = scores[1:].max() + 1  # frame 0 has no predecessor: keep it whole (first-frame-dense)
  flat = np.sort(np.argsort(-scores.reshape(-1), kind='stable')[:budget])
  hp, wp = h // patch, w // patch
  return flat, np.stack([flat // (hp * wp), (flat // wp) % hp, flat % wp], -1)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', default='/tmp/ove_demo')
  parser.add_argument('--budget', type=int, default=2048)
  parser.add_argument('--devices', type=int, default=8, help='virtual CPU devices')
  args = parser.parse_args(argv)
  if args.budget % 256 or not 256 <= args.budget <= 64 * 256:
    parser.error(f'--budget {args.budget}: use a multiple of 256 (whole 224x224 frames, for the '
                 'uniform-frame comparison) between 256 and 16384')
  _set_cpu_devices(args.devices)

  import jax
  import numpy as np
  from flax import nnx
  from jax.sharding import AxisType

  from ove_jax import convert
  from ove_jax.models import EncoderConfig, create_encoder, patchify, uniform_frame_times

  start = time.time()
  os.makedirs(args.workdir, exist_ok=True)
  summary = {}

  def stage(name):
    print(f'[{time.time() - start:6.1f}s] {name}', flush=True)

  stage('1/4 making two 64-frame clips on built-in photographs')
  clips, on_object = zip(*[make_clip(seed) for seed in (0, 1)])

  n_frames = args.budget // 256
  stage(f'2/4 selecting K={args.budget} patches per clip (temporal change) and {n_frames} '
        'uniform frames')
  rows_patches, rows_pos = [], []
  share_on_object = {'change': [], 'uniform_frames': []}
  selections = [select_by_change(clip, args.budget) for clip in clips]
  for clip, (flat, pos) in zip(clips, selections):
    tokens = np.asarray(patchify(normalise(clip)[None], 14))[0]
    rows_patches.append(tokens[flat])
    rows_pos.append(pos)
  times = uniform_frame_times(n_frames)
  for clip_mask, (flat, pos) in zip(on_object, selections):
    share_on_object['change'].append(float(clip_mask[tuple(pos.T)].mean()))
    share_on_object['uniform_frames'].append(float(clip_mask[times].mean()))
  print(f'        share of kept patches on the moving object: temporal change '
        f'{np.mean(share_on_object["change"]):.2f}, uniform frames '
        f'{np.mean(share_on_object["uniform_frames"]):.2f} (same budget)')
  uniform_tokens = [np.asarray(patchify(normalise(c[times])[None], 14))[0] for c in clips]
  grid = np.stack(np.meshgrid(times, np.arange(16), np.arange(16), indexing='ij'), -1)
  uniform_pos = grid.reshape(-1, 3)

  # Packed rows: row 0 holds the two codec-style selections, row 1 the two uniform ones; each
  # row has 4096 tokens and two segments.
  patches = np.stack([np.concatenate(rows_patches), np.concatenate(uniform_tokens)])
  positions = np.stack([np.concatenate(rows_pos), np.concatenate([uniform_pos, uniform_pos])])
  segments = np.repeat(np.repeat([[1, 2]], args.budget, axis=1), 2, axis=0).astype(np.int32)

  stage(f'3/4 tiny encoder, sharded over {jax.device_count()} devices vs one device')
  cfg = EncoderConfig.preset('tiny')
  forward = nnx.jit(lambda m, p, q, s: m(p, q, s, num_segments=2)['pooled'])
  single = create_encoder(cfg, seed=0)
  ref = np.asarray(forward(single, patches, positions, segments))
  data = 2 if jax.device_count() % 8 == 0 else 1
  mesh = jax.make_mesh((data, 2, jax.device_count() // (2 * data)), ('data', 'fsdp', 'tensor'),
                       axis_types=(AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    sharded = create_encoder(cfg, seed=0)
    t0 = time.time()
    out = np.asarray(forward(sharded, patches, positions, segments))
    seconds = time.time() - t0
  diff = float(np.abs(out - ref).max())
  print(f'        pooled embeddings [rows, segments, C] = {out.shape}; sharded vs single device '
        f'max |difference| {diff:.1e}; first call {seconds:.1f}s (includes compilation)')
  cos = (out[0] * out[1]).sum(-1) / np.linalg.norm(out[0], axis=-1) / np.linalg.norm(out[1],
                                                                                       axis=-1)
  summary.update(mesh=dict(mesh.shape), sharded_vs_single_max_abs_diff=diff,
                 share_of_kept_patches_on_object=share_on_object,
                 cosine_codec_vs_uniform_embedding=[float(c) for c in cos])

  stage('4/4 exporting to the release format and checking our PyTorch port on it')
  export = os.path.join(args.workdir, 'hf_export')
  convert.save_pytorch(single, export)
  try:
    import torch
    from ove_jax.convert import torch_model
    port = torch_model.load_pretrained(export).eval()
    with torch.no_grad():
      ref_torch = port.forward_tokens(torch.from_numpy(patches[:1, :args.budget]),
                                      torch.from_numpy(positions[:1, :args.budget]))
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
    print(f'  {key:38s} {value}')
  print(f'\nwrote {os.path.join(args.workdir, "summary.json")}')
  ok = diff < 1e-4 and summary.get('torch_port_max_rel_diff', 0.0) < 1e-4
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
