"""Cluster labels (docs/spec.md §3): k-means over teacher features, each sample's nearest centres.

  x, ids = load_features('feats.npz')                 # [N, D] or [N, F, D] -> unit rows
  x = teacher_features(encoder, records)              # or an ove_jax encoder over records
  report = make_labels(x, '/data/labels', k=2000)     # labels.npy, centres.npy, report.json

Features. A file holds [N, D] (one feature per sample) or [N, F, D] (F per-frame features of a
video: each frame L2-normalised, the F concatenated and re-normalised, as the paper does with 8
MetaCLIP frames); a `.npz` holds `features` and optionally `ids`. Or an ove_jax encoder is the
teacher, run on precomputed records: an image record gives one feature (224 centre crop); a
video record gives 8 uniform frames (one per bin of its timeline, seeded per record), each
encoded alone on the 16 x 16 grid at t = 0, pooled, and combined as above.

Clustering. scikit-learn (Lloyd, one init) or `ove_jax.kmeans` (centres sharded over the mesh,
points in chunks); the default is scikit-learn when k * N is small. Features are L2-normalised
first and the JAX k-means is spherical (cosine), as the labels are by cosine; scikit-learn runs
Euclidean k-means on the normalised features.

Outputs: labels.npy int32 [N, n] (the n = 10 nearest centres by cosine, nearest first),
centres.npy float32 [k, D], ids.npy (when the features had ids), report.json: k, N, inertia,
iterations, empty clusters, cluster sizes (min / median / max and a histogram). With records,
OUT/records/ holds a copy of every input shard (same file names, records format) with `labels`
replaced. Bad input raises `LabelsError`, whose message names the argument (spelled as the
`ove-cluster-labels` flag of the same name) and the file.
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

import numpy as np

from data_pipeline import fileio
from ove_jax.vectors import l2_normalize

NUM_LABELS = 10
FRAMES = 8                  # frames per video feature (docs/spec.md §3)
SKLEARN_MAX_WORK = 1 << 26  # k * N up to which the default backend is scikit-learn
BACKENDS = ('sklearn', 'jax')


class LabelsError(ValueError):
  """Bad input; the message names the argument or file."""


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------

def combine_frames(f_NxFxD: np.ndarray) -> np.ndarray:
  """Per-frame L2 normalisation, concatenation, re-normalisation (docs/spec.md §3): [N, F*D]."""
  n = f_NxFxD.shape[0]
  return l2_normalize(l2_normalize(f_NxFxD.astype(np.float32)).reshape(n, -1))


def prepare_features(feats: np.ndarray, where: str = 'features') -> np.ndarray:
  """Checked float32 unit rows [N, D] of [N, D] or [N, F, D] (per-frame) features."""
  feats = np.asarray(feats)
  if feats.ndim not in (2, 3) or feats.dtype.kind not in 'fiu' or 0 in feats.shape:
    raise LabelsError(f'{where}: array of shape {feats.shape} ({feats.dtype}); expected '
                      'numbers of shape [N, D] or [N, F, D] (per-frame features)')
  if not np.isfinite(feats).all():
    raise LabelsError(f'{where}: holds NaN or infinite values')
  return combine_frames(feats) if feats.ndim == 3 else l2_normalize(feats.astype(np.float32))


def load_features(path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """(features [N, D] float32 unit rows, ids or None) from a .npy / .npz."""
  where = f'--features {path}'
  if not os.path.isfile(path):
    raise LabelsError(f'{where}: no such file')
  try:
    data = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise LabelsError(f'{where}: not a .npy / .npz file ({e})') from None
  ids = None
  if isinstance(data, np.lib.npyio.NpzFile):
    with data:
      if 'features' not in data.files:
        raise LabelsError(f'{where}: the .npz has {sorted(data.files)}; it needs `features` '
                          '(and optionally `ids`)')
      feats = data['features']
      ids = data['ids'] if 'ids' in data.files else None
  else:
    feats = data
  if ids is not None and len(ids) != len(feats):
    raise LabelsError(f'{where}: {len(ids)} ids for {len(feats)} feature rows')
  return prepare_features(feats, where), ids


def record_shards(pattern: str) -> list[str]:
  """The ArrayRecord shards of a precompute output folder (its finished shards, in order) or of
  a glob; a folder's plan, progress and failure files are not shards and are skipped."""
  from data_pipeline import precompute, sources
  try:
    if os.path.isdir(pattern):
      paths = precompute.shard_files(pattern)
    else:
      paths = [p for p in sources.expand_paths(pattern)
               if os.path.isfile(p) and '.array_record' in os.path.basename(p)]
  except FileNotFoundError as e:
    raise LabelsError(f'--records {pattern}: {e}') from None
  if not paths:
    raise LabelsError(f'--records {pattern}: no ArrayRecord shards (*.array_record*) there')
  return paths


def read_shards(paths: Sequence[str]) -> list[list[dict]]:
  """Every shard's records, shard by shard."""
  from data_pipeline import precompute
  return [precompute.read_shard(p) for p in paths]


def record_frames(record: dict, index: int, seed: int) -> np.ndarray:
  """uint8 [F, 256, 588]: one 224 centre crop of an image record, 8 uniform frames of a video."""
  from data_pipeline import transforms
  if 'image' in record:
    # ImageTransform wants labels, which records get only from cluster labels: any will do here.
    transform = transforms.ImageTransform(resolution=transforms.VIDEO_RESOLUTION, crop='center',
                                          flip_prob=0.0)
    sample = transform({**record, 'labels': np.zeros(1, np.int32)}, np.random.default_rng(0))
    return sample['patches'][None]
  transform = transforms.VideoTransform(mode_probs=(0, 1, 0), num_frames=FRAMES)
  patches, _ = transform.frames(record, np.random.default_rng([seed, index]), collage=False)
  return patches.reshape(FRAMES, -1, transforms.PATCH_DIM)


def teacher_features(model, recs: Sequence[dict], batch: int = 32, seed: int = 0) -> np.ndarray:
  """Pooled embeddings of every record's frames, each frame alone at t = 0, combined per record:
  float32 unit rows [N, D] (D = F x width for videos)."""
  import jax
  from flax import nnx
  from tqdm import tqdm

  from data_pipeline import transforms

  forward = nnx.jit(lambda m, p, pos: m(p, pos)['pooled'][:, 0])
  frames = [record_frames(r, i, seed) for i, r in enumerate(recs)]
  counts = {len(f) for f in frames}
  if len(counts) > 1:
    raise LabelsError('--records mixes image and video records; cluster each kind separately')
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
  return combine_frames(f) if f.shape[1] > 1 else l2_normalize(f[:, 0])


# ------------------------------------------------------------------------------------------------
# Clustering
# ------------------------------------------------------------------------------------------------

def initial_centres(init: str, k: int, d: int):
  """'k-means++', 'random', or the [k, D] centres of a .npy file."""
  if init in ('k-means++', 'random'):
    return init
  if not os.path.isfile(init):
    raise LabelsError(f'--init {init}: not "k-means++", "random" or an existing .npy file')
  c = np.load(init, allow_pickle=False)
  if c.shape != (k, d):
    raise LabelsError(f'--init {init}: centres of shape {c.shape}; expected {(k, d)}')
  return c.astype(np.float32)


def cluster(x_NxD: np.ndarray, k: int, *, backend: str | None = None, init: str = 'k-means++',
            iters: int = 100, tol: float = 1e-4, seed: int = 0, chunk: int | None = None,
            mesh=None) -> dict[str, Any]:
  """Centres, sizes, inertia and iteration count of the chosen backend (None: scikit-learn when
  k * N <= SKLEARN_MAX_WORK, else the JAX k-means on `mesh`)."""
  start = initial_centres(init, k, x_NxD.shape[1])
  backend = backend or ('sklearn' if k * len(x_NxD) <= SKLEARN_MAX_WORK else 'jax')
  if backend not in BACKENDS:
    raise LabelsError(f'--backend {backend}: choose one of {BACKENDS}')
  if backend == 'sklearn':
    from sklearn.cluster import KMeans
    km = KMeans(k, init=start, n_init=1, max_iter=iters, tol=tol, random_state=seed,
                algorithm='lloyd').fit(x_NxD)
    sizes = np.bincount(km.labels_, minlength=k)
    return {'backend': backend, 'centres': km.cluster_centers_.astype(np.float32),
            'inertia': float(km.inertia_), 'iterations': int(km.n_iter_), 'sizes': sizes,
            'empty_reseeded': None, 'converged': int(km.n_iter_) < iters,
            'objective': 'squared euclidean on L2-normalised features'}
  import jax

  from ove_jax import kmeans
  with jax.set_mesh(mesh or default_mesh()):
    r = kmeans.fit(x_NxD, k, init=start, iters=iters, tol=tol, seed=seed, spherical=True,
                   chunk=chunk)
  return {'backend': backend, 'centres': r.centres, 'inertia': r.inertia, 'iterations': r.n_iter,
          'sizes': r.sizes, 'empty_reseeded': r.empty_reseeded, 'converged': r.converged,
          'objective': 'spherical: sum of 2 - 2 cos (squared distance on the sphere)'}


def default_mesh():
  """Every device on the data axis: centres and points are sharded over all of them anyway."""
  from ove_jax import sharding
  return sharding.make_mesh({'data': -1})


def size_report(sizes: np.ndarray, bins: int = 10) -> dict:
  """Min, median, max and a histogram of the cluster sizes."""
  counts, edges = np.histogram(sizes, bins=min(bins, max(1, int(sizes.max()) + 1)))
  return {'min': int(sizes.min()), 'median': float(np.median(sizes)), 'max': int(sizes.max()),
          'histogram': {'edges': [float(e) for e in edges], 'counts': counts.tolist()}}


# ------------------------------------------------------------------------------------------------
# Records and the whole run
# ------------------------------------------------------------------------------------------------

def write_records(shards: Sequence[str], shard_records: Sequence[Sequence[dict]],
                  labels_NxL: np.ndarray, out_dir: str) -> list[str]:
  """Copies of the input shards with `labels` replaced, row i of labels for record i in order."""
  from data_pipeline import precompute, records
  os.makedirs(out_dir, exist_ok=True)
  written, i = [], 0
  for path, recs in zip(shards, shard_records):
    target = os.path.join(out_dir, os.path.basename(path))
    if os.path.abspath(target) == os.path.abspath(path):
      raise LabelsError(f'--out: {target} would overwrite its input shard')
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


def make_labels(x_NxD: np.ndarray, out: str, *, k: int, num_labels: int = NUM_LABELS,
                ids: np.ndarray | None = None, shards: Sequence[str] = (),
                shard_records: Sequence[Sequence[dict]] = (), source: str = '',
                backend: str | None = None, init: str = 'k-means++', iters: int = 100,
                tol: float = 1e-4, seed: int = 0, chunk: int | None = None, mesh=None,
                start: float | None = None) -> dict[str, Any]:
  """Clusters the unit rows `x_NxD`, labels every row with its `num_labels` nearest centres and
  writes labels.npy, centres.npy, ids.npy (with `ids`), report.json and, with `shards`, the
  relabelled records into `out`. Returns the report (`start`: the perf_counter its `seconds`
  count from; default now)."""
  import jax

  from ove_jax import kmeans

  start = time.perf_counter() if start is None else start
  if k < 1:
    raise LabelsError(f'--k {k}: must be >= 1')
  if num_labels < 1:
    raise LabelsError(f'--num-labels {num_labels}: must be >= 1')
  n = len(x_NxD)
  if k > n:
    raise LabelsError(f'--k {k} is more than the N = {n} samples of {source or "the features"}')
  num_records = sum(len(r) for r in shard_records)
  if shards and num_records != n:
    raise LabelsError(f'{num_records} records but {n} feature rows ({source})')
  mesh = mesh or default_mesh()
  result = cluster(x_NxD, k, backend=backend, init=init, iters=iters, tol=tol, seed=seed,
                   chunk=chunk, mesh=mesh)
  with jax.set_mesh(mesh):
    labels, _ = kmeans.nearest(x_NxD, result['centres'], min(num_labels, k), spherical=True,
                               chunk=chunk)
  os.makedirs(out, exist_ok=True)
  np.save(os.path.join(out, 'labels.npy'), labels.astype(np.int32))
  np.save(os.path.join(out, 'centres.npy'), result['centres'].astype(np.float32))
  if ids is not None:
    np.save(os.path.join(out, 'ids.npy'), ids)
  sizes = np.asarray(result['sizes'])
  report = {
      'k': k, 'N': n, 'D': int(x_NxD.shape[1]), 'backend': result['backend'],
      'objective': result['objective'], 'inertia': result['inertia'],
      'iterations': result['iterations'], 'converged': bool(result['converged']),
      'empty_clusters': int(np.sum(sizes == 0)), 'empty_reseeded': result['empty_reseeded'],
      'sizes': size_report(sizes), 'num_labels': int(labels.shape[1]), 'source': source,
      'seconds': round(time.perf_counter() - start, 3)}
  if shards:
    written = write_records(shards, shard_records, labels, os.path.join(out, 'records'))
    report['records'] = {'shards': len(written), 'dir': os.path.join(out, 'records')}
  fileio.write_json(os.path.join(out, 'report.json'), report, sort_keys=False)
  return report
