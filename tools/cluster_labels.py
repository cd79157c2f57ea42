"""Cluster labels (SPEC §3): k-means over teacher features, then each sample's nearest centres.

  # features you computed (an [N, D] array, or [N, F, D] per-frame features of videos)
  python tools/cluster_labels.py --features feats.npy --k 400000 --out /data/labels_video
  # an ove_jax encoder as the teacher, run over precomputed records; relabelled copies of the
  # records are written to OUT/records/
  python tools/cluster_labels.py --teacher /ckpt/ove_hf --records '/data/codec/ove_codec-*' \
      --k 2000 --out /data/labels
  # the sharded JAX k-means on 8 virtual CPU devices (on TPU/GPU: --mesh over the real devices)
  python tools/cluster_labels.py --features feats.npz --k 5000 --backend jax --devices 8 \
      --mesh 2,4,1 --out /tmp/labels

Features. `--features FILE.npy` holds [N, D] (one feature per sample) or [N, F, D] (F per-frame
features of a video: each frame L2-normalised, the F concatenated and re-normalised, as the
paper does with 8 MetaCLIP frames); a `.npz` holds `features` and optionally `ids`. Or
`--teacher DIR`: an ove_jax encoder (a release-format Hugging Face directory, or a training
workdir) run on the records of `--records GLOB`: an image record gives one feature (224 centre
crop); a video record gives 8 uniform frames (one per bin of its timeline, seeded per record),
each encoded alone on the 16 x 16 grid at t = 0, pooled, and combined as above.

Clustering. k-means with `--backend sklearn` (scikit-learn, Lloyd, one init) or `--backend jax`
(`ove_jax.kmeans`: centres sharded over the mesh, points in chunks); the default is sklearn when
k * N is small. Features are L2-normalised first and the JAX k-means is spherical (cosine), as
the labels are by cosine; scikit-learn runs Euclidean k-means on the normalised features.

Outputs in `--out`: labels.npy int32 [N, n] (the n = 10 nearest centres by cosine, nearest
first), centres.npy float32 [k, D], report.json (printed too): k, N, inertia, iterations, empty
clusters, cluster sizes (min / median / max and a histogram). With `--records`, OUT/records/
holds a copy of every input shard (same file names, records format) with `labels` replaced.
Installed as the console script `ove-cluster-labels`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

NUM_LABELS = 10
FRAMES = 8                  # frames per video feature (SPEC §3)
SKLEARN_MAX_WORK = 1 << 26  # k * N up to which the default backend is scikit-learn


class UsageError(ValueError):
  """Bad input; the message names the flag or file. Exit code 2."""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='ove-cluster-labels', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_argument_group('features (one of)')
  src.add_argument('--features', help='.npy [N, D] or [N, F, D], or .npz with `features` (and '
                   'optionally `ids`)')
  src.add_argument('--teacher', help='ove_jax encoder: release-format HF dir or training workdir')
  p.add_argument('--records', help='precompute output folder, or glob of record shards: the teacher\'s input, and/or records '
                 'to write relabelled copies of (one per feature row, in sorted shard order)')
  p.add_argument('--step', type=int, help='checkpoint step of a training workdir (default latest)')
  p.add_argument('--batch', type=int, default=32, help='frames per teacher forward')
  p.add_argument('--k', type=int, required=True, help='number of centres')
  p.add_argument('--num-labels', type=int, default=NUM_LABELS, help='nearest centres per sample')
  p.add_argument('--backend', choices=('sklearn', 'jax'),
                 help=f'default: sklearn when k * N <= {SKLEARN_MAX_WORK}, else jax')
  p.add_argument('--init', default='k-means++',
                 help='"k-means++", "random", or a .npy of [k, D] initial centres')
  p.add_argument('--iters', type=int, default=100, help='at most this many Lloyd iterations')
  p.add_argument('--tol', type=float, default=1e-4)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--chunk', type=int, help='points scored at once by the JAX k-means')
  p.add_argument('--mesh', help='data,fsdp,tensor sizes of the JAX mesh (default: all devices '
                 'on data)')
  p.add_argument('--devices', type=int, help='virtual CPU devices to start JAX with')
  p.add_argument('--out', required=True, help='output folder')
  return p


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------

def _l2(x: np.ndarray, axis: int = -1) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def combine_frames(f_NxFxD: np.ndarray) -> np.ndarray:
  """Per-frame L2 normalisation, concatenation, re-normalisation (SPEC §3): [N, F*D]."""
  n = f_NxFxD.shape[0]
  return _l2(_l2(f_NxFxD.astype(np.float32)).reshape(n, -1))


def load_features(path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """(features [N, D] float32 unit rows, ids or None) from a .npy / .npz."""
  if not os.path.isfile(path):
    raise UsageError(f'--features {path}: no such file')
  try:
    data = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise UsageError(f'--features {path}: not a .npy / .npz file ({e})') from None
  ids = None
  if isinstance(data, np.lib.npyio.NpzFile):
    with data:
      if 'features' not in data.files:
        raise UsageError(f'--features {path}: the .npz has {sorted(data.files)}; it needs '
                         '`features` (and optionally `ids`)')
      feats = data['features']
      ids = data['ids'] if 'ids' in data.files else None
  else:
    feats = data
  if feats.ndim not in (2, 3) or feats.dtype.kind not in 'fiu' or 0 in feats.shape:
    raise UsageError(f'--features {path}: array of shape {feats.shape} ({feats.dtype}); expected '
                     'numbers of shape [N, D] or [N, F, D] (per-frame features)')
  if ids is not None and len(ids) != len(feats):
    raise UsageError(f'--features {path}: {len(ids)} ids for {len(feats)} feature rows')
  if not np.isfinite(feats).all():
    raise UsageError(f'--features {path}: holds NaN or infinite values')
  feats = combine_frames(feats) if feats.ndim == 3 else _l2(feats.astype(np.float32))
  return feats, ids


def _shards(pattern: str) -> list[str]:
  """The ArrayRecord shards of a precompute output folder (its finished shards, in order) or of
  a glob; a folder's plan, progress and failure files are not shards and are skipped."""
  from data_pipeline import precompute, sources
  if os.path.isdir(pattern):
    try:
      paths = precompute.shard_files(pattern)
    except FileNotFoundError as e:
      raise UsageError(f'--records {pattern}: {e}') from None
  else:
    try:
      paths = [p for p in sources.expand_paths(pattern)
               if os.path.isfile(p) and '.array_record' in os.path.basename(p)]
    except FileNotFoundError as e:
      raise UsageError(f'--records {pattern}: {e}') from None
  if not paths:
    raise UsageError(f'--records {pattern}: no ArrayRecord shards (*.array_record*) there')
  return paths


def load_teacher(path: str, step=None):
  if not os.path.isdir(path):
    raise UsageError(f'--teacher {path}: no such folder')
  # A training workdir has a config.json too (the experiment's): the weights file decides.
  if os.path.exists(os.path.join(path, 'model.safetensors')):
    from ove_jax import convert
    return convert.load_pytorch(path)
  from ove_jax_tools.convert_checkpoint import trained_encoder
  try:
    model, _, _ = trained_encoder(path, step)
  except FileNotFoundError as e:
    raise UsageError(f'--teacher {path}: neither a release-format directory (model.safetensors) nor a '
                     f'training workdir ({e})') from None
  return model


def record_frames(record: dict, index: int, seed: int) -> np.ndarray:
  """uint8 [F, 256, 588]: one 224 centre crop of an image record, 8 uniform frames of a video."""
  from data_pipeline import transforms
  if 'image' in record:
    # ImageTransform wants labels, which records get only from this tool: any will do here.
    transform = transforms.ImageTransform(resolution=transforms.VIDEO_RESOLUTION, crop='center',
                                          flip_prob=0.0)
    sample = transform({**record, 'labels': np.zeros(1, np.int32)}, np.random.default_rng(0))
    return sample['patches'][None]
  transform = transforms.VideoTransform(mode_probs=(0, 1, 0), num_frames=FRAMES)
  patches, _ = transform.frames(record, np.random.default_rng([seed, index]), collage=False)
  return patches.reshape(FRAMES, -1, transforms.PATCH_DIM)


def teacher_features(model, recs: list[dict], batch: int, seed: int) -> np.ndarray:
  """Pooled embeddings of every record's frames, each frame alone at t = 0, combined per record."""
  import jax
  from flax import nnx
  from data_pipeline import transforms
  from tqdm import tqdm

  forward = nnx.jit(lambda m, p, pos: m(p, pos)['pooled'][:, 0])
  frames = [record_frames(r, i, seed) for i, r in enumerate(recs)]
  counts = {len(f) for f in frames}
  if len(counts) > 1:
    raise UsageError('--records mixes image and video records; cluster each kind separately')
  flat = np.concatenate(frames).astype(np.uint8)               # [N*F, 256, 588]
  grid = transforms.VIDEO_RESOLUTION // transforms.PATCH
  pos = np.broadcast_to(transforms.grid_positions(0, grid, grid), (batch, grid * grid, 3))
  out = []
  for start in tqdm(range(0, len(flat), batch), desc='teacher', unit='batch'):
    part = flat[start:start + batch]
    n = len(part)
    if n < batch:  # one compiled shape for every batch
      part = np.concatenate([part, np.zeros((batch - n, *part.shape[1:]), part.dtype)])
    out.append(np.asarray(jax.device_get(forward(model, transforms.normalize(part), pos)))[:n])
  f = np.concatenate(out).astype(np.float32).reshape(len(recs), counts.pop(), -1)
  return combine_frames(f) if f.shape[1] > 1 else _l2(f[:, 0])


# ------------------------------------------------------------------------------------------------
# Clustering
# ------------------------------------------------------------------------------------------------

def _init(args, d: int):
  if args.init in ('k-means++', 'random'):
    return args.init
  if not os.path.isfile(args.init):
    raise UsageError(f'--init {args.init}: not "k-means++", "random" or an existing .npy file')
  c = np.load(args.init, allow_pickle=False)
  if c.shape != (args.k, d):
    raise UsageError(f'--init {args.init}: centres of shape {c.shape}; expected {(args.k, d)}')
  return c.astype(np.float32)


def _mesh(args):
  import jax
  n = jax.device_count()
  if args.mesh:
    try:
      shape = tuple(int(v) for v in args.mesh.split(','))
    except ValueError:
      shape = ()
    if len(shape) != 3 or min(shape) < 1:
      raise UsageError(f'--mesh {args.mesh}: expected three sizes data,fsdp,tensor like 2,4,1')
  else:
    shape = (n, 1, 1)
  if int(np.prod(shape)) != n:
    raise UsageError(f'--mesh {args.mesh}: {int(np.prod(shape))} devices; JAX has {n} (set '
                     '--devices on CPU)')
  return jax.make_mesh(shape, ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def cluster(x_NxD: np.ndarray, args, mesh) -> dict:
  """Centres, sizes, inertia and iteration count of the chosen backend."""
  init = _init(args, x_NxD.shape[1])
  backend = args.backend or ('sklearn' if args.k * len(x_NxD) <= SKLEARN_MAX_WORK else 'jax')
  if backend == 'sklearn':
    from sklearn.cluster import KMeans
    km = KMeans(args.k, init=init, n_init=1, max_iter=args.iters, tol=args.tol,
                random_state=args.seed, algorithm='lloyd').fit(x_NxD)
    sizes = np.bincount(km.labels_, minlength=args.k)
    return {'backend': backend, 'centres': km.cluster_centers_.astype(np.float32),
            'inertia': float(km.inertia_), 'iterations': int(km.n_iter_), 'sizes': sizes,
            'empty_reseeded': None, 'converged': int(km.n_iter_) < args.iters,
            'objective': 'squared euclidean on L2-normalised features'}
  import jax
  from ove_jax import kmeans
  with jax.set_mesh(mesh):
    r = kmeans.fit(x_NxD, args.k, init=init, iters=args.iters, tol=args.tol, seed=args.seed,
                   spherical=True, chunk=args.chunk)
  return {'backend': backend, 'centres': r.centres, 'inertia': r.inertia, 'iterations': r.n_iter,
          'sizes': r.sizes, 'empty_reseeded': r.empty_reseeded, 'converged': r.converged,
          'objective': 'spherical: sum of 2 - 2 cos (squared distance on the sphere)'}


def size_report(sizes: np.ndarray, bins: int = 10) -> dict:
  counts, edges = np.histogram(sizes, bins=min(bins, max(1, int(sizes.max()) + 1)))
  return {'min': int(sizes.min()), 'median': float(np.median(sizes)), 'max': int(sizes.max()),
          'histogram': {'edges': [float(e) for e in edges], 'counts': counts.tolist()}}


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------

def write_records(shards: list[str], shard_records: list[list[dict]], labels_NxL: np.ndarray,
                  out_dir: str) -> list[str]:
  """Copies of the input shards with `labels` replaced, row i of labels for record i in order."""
  from data_pipeline import precompute, records
  os.makedirs(out_dir, exist_ok=True)
  written, i = [], 0
  for path, recs in zip(shards, shard_records):
    target = os.path.join(out_dir, os.path.basename(path))
    if os.path.abspath(target) == os.path.abspath(path):
      raise UsageError(f'--out: {target} would overwrite its input shard')
    writer = precompute.ShardWriter(target)
    try:
      for record in recs:
        writer.write(records.encode({**record, 'labels': labels_NxL[i]}))
        i += 1
      writer.commit()
    except BaseException:
      writer.abandon()
      raise
    written.append(target)
  return written


def run(args) -> dict:
  if bool(args.features) == bool(args.teacher):
    raise UsageError('give exactly one of --features FILE and --teacher DIR')
  if args.teacher and not args.records:
    raise UsageError('--teacher needs --records GLOB (the records to encode)')
  if args.k < 1:
    raise UsageError(f'--k {args.k}: must be >= 1')
  if args.num_labels < 1:
    raise UsageError(f'--num-labels {args.num_labels}: must be >= 1')
  if args.devices:
    import jax
    try:
      jax.config.update('jax_num_cpu_devices', args.devices)
    except RuntimeError as e:
      raise UsageError(f'--devices {args.devices}: JAX has started already ({e})') from None
  start = time.perf_counter()
  shards, shard_records = [], []
  if args.records:
    from data_pipeline import precompute
    shards = _shards(args.records)
    shard_records = [precompute.read_shard(p) for p in shards]
  recs = [r for rs in shard_records for r in rs]
  ids = None
  if args.features:
    x, ids = load_features(args.features)
    source = f'--features {args.features}'
    if args.records and len(recs) != len(x):
      raise UsageError(f'--records {args.records}: {len(recs)} records but {len(x)} feature rows '
                       f'in --features {args.features}')
  else:
    model = load_teacher(args.teacher, args.step)
    x = teacher_features(model, recs, args.batch, args.seed)
    source = f'--records {args.records}'
  n = len(x)
  if args.k > n:
    raise UsageError(f'--k {args.k} is more than the N = {n} samples of {source}')
  mesh = _mesh(args)
  result = cluster(x, args, mesh)
  import jax
  from ove_jax import kmeans
  with jax.set_mesh(mesh):
    labels, _ = kmeans.nearest(x, result['centres'], min(args.num_labels, args.k),
                               spherical=True, chunk=args.chunk)
  os.makedirs(args.out, exist_ok=True)
  np.save(os.path.join(args.out, 'labels.npy'), labels.astype(np.int32))
  np.save(os.path.join(args.out, 'centres.npy'), result['centres'].astype(np.float32))
  if ids is not None:
    np.save(os.path.join(args.out, 'ids.npy'), ids)
  sizes = np.asarray(result['sizes'])
  report = {
      'k': args.k, 'N': n, 'D': int(x.shape[1]), 'backend': result['backend'],
      'objective': result['objective'], 'inertia': result['inertia'],
      'iterations': result['iterations'], 'converged': bool(result['converged']),
      'empty_clusters': int(np.sum(sizes == 0)), 'empty_reseeded': result['empty_reseeded'],
      'sizes': size_report(sizes), 'num_labels': int(labels.shape[1]), 'source': source,
      'seconds': round(time.perf_counter() - start, 3)}
  if args.records:
    written = write_records(shards, shard_records, labels, os.path.join(args.out, 'records'))
    report['records'] = {'shards': len(written), 'dir': os.path.join(args.out, 'records')}
  with open(os.path.join(args.out, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
  return report


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    report = run(args)
  except UsageError as e:
    print(f'ove-cluster-labels: error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(report, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
