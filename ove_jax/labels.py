"""Cluster labels (docs/spec.md §3): k-means over teacher features, each sample's nearest centres.

  x, ids = load_features('feats.npz')                 # [N, D] or [N, F, D] -> unit rows
  x = teacher_features(encoder, records)              # or an ove_jax encoder over records
  # or a transformers model: ove_jax.hf_teacher.sharded_teacher_features
  report = make_labels(x, '/data/labels', k=2000)     # labels.npy, centres.npy, report.json

Features. A file holds [N, D] (one feature per sample) or [N, F, D] (F per-frame features of a
video: each frame L2-normalised, the F concatenated and re-normalised, as the paper does with 8
MetaCLIP frames); a `.npz` holds `features` and optionally `ids`. Or an ove_jax encoder is the
teacher, run on precomputed records: an image record gives one feature (224 centre crop); a
video record gives 8 uniform frames (one per bin of its timeline, seeded per record), each
encoded alone on the 16 x 16 grid at t = 0, pooled, and combined as above. Or a transformers
vision model is the teacher on the same frames, its features written in resumable shards
(`ove_jax.hf_teacher`).

Clustering. scikit-learn (Lloyd, one init), `ove_jax.kmeans` (centres sharded over the mesh,
points in chunks) or faiss (`ove_jax.kmeans_backends.fit`); the default ('auto') is scikit-learn
when k * N is small, else JAX. Init: k-means++ (k distinct random points instead above
kmeans.PLUSPLUS_MAX_K centres, with a note), random, or given centres. Features are
L2-normalised first and the JAX and faiss k-means are spherical (cosine), as the labels are by
cosine; scikit-learn runs Euclidean k-means on the normalised features.

Outputs: labels.npy int32 [N, n] (the n = 10 nearest centres by cosine, nearest first),
centres.npy float32 [k, D], ids.npy (when the features had ids), report.json: k, N, init,
inertia, iterations, empty clusters, cluster sizes (min / median / max and a histogram). With
records, OUT/records/ holds a copy of every input shard (same file names, records format) with
`labels` replaced. Bad input raises `LabelsError`, whose message names the argument (spelled as the
`ove-cluster-labels` flag of the same name) and the file.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import numpy as np

from data_pipeline import fileio, paths
from ove_jax.vectors import l2_normalise

NUM_LABELS = 10
FRAMES = 8  # frames per video feature (docs/spec.md §3)
SKLEARN_MAX_WORK = 1 << 26  # k * N up to which the default backend is scikit-learn
SPHERICAL_OBJECTIVE = 'spherical: sum of 2 - 2 cos (squared distance on the sphere)'
SKLEARN_OBJECTIVE = 'squared euclidean on L2-normalised features'
BACKENDS = ('auto', 'sklearn', 'jax', 'faiss')


class LabelsError(ValueError):
  """Bad input; the message names the argument or file."""


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------


def combine_frames(f_NxFxD: np.ndarray) -> np.ndarray:
  """Per-frame L2 normalisation, concatenation, re-normalisation (docs/spec.md §3): [N, F*D]."""
  n = f_NxFxD.shape[0]
  return l2_normalise(l2_normalise(f_NxFxD.astype(np.float32)).reshape(n, -1))


def prepare_features(feats: np.ndarray, where: str = 'features') -> np.ndarray:
  """Checked float32 unit rows [N, D] of [N, D] or [N, F, D] (per-frame) features."""
  feats = np.asarray(feats)
  if feats.ndim not in (2, 3) or feats.dtype.kind not in 'fiu' or 0 in feats.shape:
    raise LabelsError(
      f'{where}: array of shape {feats.shape} ({feats.dtype}); expected '
      'numbers of shape [N, D] or [N, F, D] (per-frame features)'
    )
  if not np.isfinite(feats).all():
    raise LabelsError(f'{where}: holds NaN or infinite values')
  return combine_frames(feats) if feats.ndim == 3 else l2_normalise(feats.astype(np.float32))


def read_array_file(path: str, what: str):
  """`fileio.read_arrays` (an array, or a dict of a .npz's arrays) with its errors, which name
  the file and what is wrong (missing, empty, truncated, pickled), as LabelsError."""
  try:
    return fileio.read_arrays(path, what)
  except fileio.ArrayFileError as e:
    raise LabelsError(str(e)) from None


def load_features(path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """(features [N, D] float32 unit rows, ids or None) from a .npy / .npz."""
  where = f'--features {path}'
  data = read_array_file(path, '--features')
  ids = None
  if isinstance(data, dict):
    if 'features' not in data:
      raise LabelsError(
        f'{where}: the .npz has {sorted(data)}; it needs `features` (and optionally `ids`)'
      )
    feats, ids = data['features'], data.get('ids')
  else:
    feats = data
  if ids is not None and (ids.ndim != 1 or len(ids) != len(feats)):
    raise LabelsError(f'{where}: ids of shape {ids.shape} for {len(feats)} feature rows')
  return prepare_features(feats, where), ids


def record_shards(pattern: str) -> list[str]:
  """The ArrayRecord shards of a complete precompute output folder (in shard order) or of a
  glob; a folder's plan, progress and failure files are not shards and are skipped. A folder
  whose plan has unfinished shards is refused (a glob of its shards labels the finished ones)."""
  from data_pipeline import shards as shard_lib
  from data_pipeline import sources

  a_glob = f"--records '{paths.join(pattern, '*.array_record*')}'"
  try:
    if paths.isdir(pattern):
      plan = shard_lib.read_plan(pattern)
      if plan is None:
        raise LabelsError(
          f'--records {pattern}: no {shard_lib.PLAN}, so not a precompute output folder; for the '
          f'shards in it (relabelled copies in OUT/records/, say) give a glob: {a_glob}'
        )
      found = shard_lib.shard_files(pattern)
      if len(found) < plan['num_shards']:
        missing = [
          i
          for i in range(plan['num_shards'])
          if shard_lib.shard_path(pattern, plan, i) not in found
        ]
        raise LabelsError(
          f'--records {pattern}: {len(found)} of its {plan["num_shards"]} shards are finished '
          f'(not: {", ".join(map(str, missing[:5]))}{" ..." if len(missing) > 5 else ""}); '
          f'finish the precompute (run its command again), or label only the finished shards '
          f'with {a_glob}'
        )
    else:
      found = [
        p
        for p in sources.expand_paths(pattern)
        if paths.isfile(p) and '.array_record' in paths.basename(p)
      ]
  except FileNotFoundError as e:
    raise LabelsError(f'--records {pattern}: {e}') from None
  if not found:
    raise LabelsError(f'--records {pattern}: no ArrayRecord shards (*.array_record*) there')
  return found


def read_shards(shard_paths: Sequence[str]) -> list[list[dict]]:
  """Every shard's records, shard by shard; a shard that cannot be read is a LabelsError."""
  from data_pipeline import shards as shard_lib

  out = []
  for path in shard_paths:
    try:
      out.append(shard_lib.read_shard(path))
    except Exception as e:  # the reader's own error for a damaged file, whatever its type
      raise LabelsError(
        f'--records: cannot read {path} ({type(e).__name__}: {e}); precompute it again, or '
        'leave it out of --records'
      ) from None
  return out


def frames_per_record(recs: Sequence[dict]) -> int:
  """Frames a teacher encodes per record: 1 for image records, FRAMES for video records."""
  if not recs:
    raise LabelsError('--records: the shards hold no records')
  if len({'image' in r for r in recs}) > 1:
    raise LabelsError('--records mixes image and video records; cluster each kind separately')
  return 1 if 'image' in recs[0] else FRAMES


def record_frames(record: dict, index: int, seed: int) -> np.ndarray:
  """uint8 [F, 256, 588]: one 224 centre crop of an image record, 8 uniform frames of a video."""
  from data_pipeline import transforms

  if 'image' in record:
    # ImageTransform wants labels, which records get only from cluster labels: any will do here.
    transform = transforms.ImageTransform(
      resolution=transforms.VIDEO_RESOLUTION, crop='centre', flip_prob=0.0
    )
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
  frames = frames_per_record(recs)
  flat = np.concatenate([record_frames(r, i, seed) for i, r in enumerate(recs)])
  flat = flat.astype(np.uint8)  # [N*F, 256, 588]
  grid = transforms.VIDEO_RESOLUTION // transforms.PATCH
  pos = np.broadcast_to(transforms.grid_positions(0, grid, grid), (batch, grid * grid, 3))
  out = []
  for start in tqdm(range(0, len(flat), batch), desc='teacher', unit='batch'):
    part = flat[start : start + batch]
    n = len(part)
    if n < batch:  # one compiled shape for every batch
      part = np.concatenate([part, np.zeros((batch - n, *part.shape[1:]), part.dtype)])
    out.append(np.asarray(jax.device_get(forward(model, transforms.normalise(part), pos)))[:n])
  f = np.concatenate(out).astype(np.float32).reshape(len(recs), frames, -1)
  return combine_frames(f) if f.shape[1] > 1 else l2_normalise(f[:, 0])


# ------------------------------------------------------------------------------------------------
# Clustering
# ------------------------------------------------------------------------------------------------


def initial_centres(init: str | np.ndarray, k: int, d: int | None = None, where: str = '--init'):
  """'k-means++', 'random', or float32 [k, D] centres: an array, or those of a .npy file (checked:
  k rows of finite numbers, D = `d` when given; `where` names an array in messages).
  """
  if isinstance(init, str):
    if init in ('k-means++', 'random'):
      return init
    if not paths.exists(init):
      raise LabelsError(f'--init {init}: not "k-means++", "random" or an existing .npy file')
    where = f'--init {init}'
    init = read_array_file(init, '--init')
    if isinstance(init, dict):
      raise LabelsError(f'{where}: a .npz; give a .npy of [k, D] centres')
  c = np.asarray(init)
  if c.ndim != 2 or c.shape[0] != k or c.shape[1] != (d or c.shape[1]) or c.dtype.kind not in 'fiu':
    raise LabelsError(
      f'{where}: centres of shape {c.shape} ({c.dtype}); expected numbers of shape '
      f"{(k, d or 'D')} (--k centres of the features' width)"
    )
  if not np.isfinite(c).all():
    raise LabelsError(f'{where}: holds NaN or infinite values')
  return c.astype(np.float32)


def check_settings(
  *,
  k: int,
  num_labels: int = NUM_LABELS,
  backend: str | None = None,
  init: str | np.ndarray = 'k-means++',
  iters: int = 100,
  tol: float = 1e-4,
  chunk: int | None = None,
  n: int | None = None,
  d: int | None = None,
  source: str = '',
  init_about: str = '--init',
):
  """Checks every k-means setting before any work (`n` samples of width `d` of `source`: when
  known) and returns `init` checked (`initial_centres`: a file's centres are read once; an
  array's messages name it as `init_about`)."""
  if k < 1:
    raise LabelsError(f'--k {k}: must be >= 1')
  if num_labels < 1:
    raise LabelsError(f'--num-labels {num_labels}: must be >= 1')
  if backend not in BACKENDS + (None,):
    raise LabelsError(f'--backend {backend}: choose one of {BACKENDS}')
  if iters < 1:
    raise LabelsError(f'--iters {iters}: must be >= 1 (Lloyd iterations)')
  if not tol >= 0:  # NaN too
    raise LabelsError(f'--tol {tol}: must be >= 0')
  if chunk is not None and chunk < 1:
    raise LabelsError(f'--chunk {chunk}: must be >= 1 (points scored at once)')
  if n is not None and k > n:
    raise LabelsError(f'--k {k} is more than the N = {n} samples of {source or "the features"}')
  return initial_centres(init, k, d, init_about)


def cluster(
  x_NxD: np.ndarray,
  k: int,
  *,
  backend: str | None = None,
  init: str = 'k-means++',
  iters: int = 100,
  tol: float = 1e-4,
  seed: int = 0,
  chunk: int | None = None,
  mesh=None,
) -> dict[str, Any]:
  """Centres, sizes, inertia and iteration count of the chosen backend (None or 'auto':
  scikit-learn when k * N <= SKLEARN_MAX_WORK, else the JAX k-means on `mesh`; 'faiss':
  spherical faiss k-means through `ove_jax.kmeans_backends.fit`). 'k-means++' for more than
  `kmeans.PLUSPLUS_MAX_K` centres starts from random points (a note on stderr says so)."""
  from ove_jax import kmeans, kmeans_backends

  start = check_settings(
    k=k, backend=backend, init=init, iters=iters, tol=tol, chunk=chunk, d=x_NxD.shape[1]
  )
  if kmeans.init_method(start, k) is not start:
    print(f'note: {kmeans.plusplus_note(k)}', file=sys.stderr)
    start = kmeans.init_method(start, k)
  if backend in (None, 'auto'):
    backend = 'sklearn' if k * len(x_NxD) <= SKLEARN_MAX_WORK else 'jax'
  if backend == 'sklearn':
    from sklearn.cluster import KMeans

    km = KMeans(
      k, init=start, n_init=1, max_iter=iters, tol=tol, random_state=seed, algorithm='lloyd'
    ).fit(x_NxD)
    sizes, n_iter = np.bincount(km.labels_, minlength=k), int(km.n_iter_)
    # centres, inertia, n_iter, sizes, labels, empty_reseeded (not reported), converged
    r = kmeans.KMeans(
      km.cluster_centers_, float(km.inertia_), n_iter, sizes, km.labels_, -1, n_iter < iters
    )
  else:
    import jax

    try:
      with jax.set_mesh(mesh or default_mesh()):
        fit = dict(chunk=chunk, init=start, iters=iters, tol=tol, seed=seed, spherical=True)
        r = kmeans_backends.fit(x_NxD, k, backend=backend, **fit)
    except ImportError as e:  # faiss not installed
      raise LabelsError(f'--backend {backend}: {e}') from None
  return {
    'backend': backend,
    'centres': np.asarray(r.centres, np.float32),
    'inertia': r.inertia,
    'iterations': r.n_iter,
    'sizes': r.sizes,
    'empty_reseeded': None if r.empty_reseeded < 0 else r.empty_reseeded,
    'converged': r.converged,
    'objective': SPHERICAL_OBJECTIVE if backend != 'sklearn' else SKLEARN_OBJECTIVE,
    'init': start if isinstance(start, str) else 'given centres',
  }


def default_mesh():
  """Every device on the data axis: centres and points are sharded over all of them anyway."""
  from ove_jax import sharding

  return sharding.make_mesh({'data': -1})


def size_report(sizes: np.ndarray, bins: int = 10) -> dict:
  """Min, median, max and a histogram of the cluster sizes."""
  counts, edges = np.histogram(sizes, bins=min(bins, max(1, int(sizes.max()) + 1)))
  return {
    'min': int(sizes.min()),
    'median': float(np.median(sizes)),
    'max': int(sizes.max()),
    'histogram': {'edges': [float(e) for e in edges], 'counts': counts.tolist()},
  }


# ------------------------------------------------------------------------------------------------
# Records and the whole run
# ------------------------------------------------------------------------------------------------


def records_copy(records_dir: str, shard: str) -> str:
  """Where `write_records` copies `shard` to; refused when that is the shard itself."""
  target = paths.join(records_dir, paths.basename(shard))
  if paths.absolute(target) == paths.absolute(shard):
    raise LabelsError(f'--out: {target} would overwrite its input shard; give another --out')
  return target


def check_out(out: str, shards: Sequence[str] = ()) -> None:
  """Makes the output folder, before any work: refused when `out` is a file, cannot be made, or
  would have the relabelled copies of `shards` overwrite them."""
  blocked = paths.not_a_folder(out) or paths.buckets_problem(out)  # a file; a missing bucket
  if blocked:
    raise LabelsError(f'--out {out}: {blocked}; give a folder (made when missing)')
  for shard in shards:
    records_copy(paths.join(out, 'records'), shard)
  try:
    paths.makedirs(out)  # a local folder or a URL (data_pipeline.paths)
  except OSError as e:
    raise LabelsError(f'--out {out}: cannot make the folder ({e})') from None


def write_records(
  shards: Sequence[str],
  shard_records: Sequence[Sequence[dict]],
  labels_NxL: np.ndarray,
  out_dir: str,
) -> list[str]:
  """Copies of the input shards with `labels` replaced, row i of labels for record i in order."""
  from data_pipeline import precompute, records

  paths.makedirs(out_dir)
  written, i = [], 0
  for path, recs in zip(shards, shard_records):
    target = records_copy(out_dir, path)
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


def make_labels(
  x_NxD: np.ndarray,
  out: str,
  *,
  k: int,
  num_labels: int = NUM_LABELS,
  ids: np.ndarray | None = None,
  shards: Sequence[str] = (),
  shard_records: Sequence[Sequence[dict]] = (),
  source: str = '',
  chunk: int | None = None,
  mesh=None,
  start: float | None = None,
  **cluster_options,
) -> dict[str, Any]:
  """Clusters the unit rows `x_NxD`, labels every row with its `num_labels` nearest centres and
  writes labels.npy, centres.npy, ids.npy (with `ids`), report.json and, with `shards`, the
  relabelled records into `out`. Returns the report (`start`: the perf_counter its `seconds`
  count from; default now). `cluster_options` (backend, init, iters, tol, seed) go to `cluster`
  as they are."""
  import jax

  from ove_jax import kmeans

  start = time.perf_counter() if start is None else start
  n = len(x_NxD)
  settings = {key: v for key, v in cluster_options.items() if key != 'seed'}
  cluster_options['init'] = check_settings(
    k=k, num_labels=num_labels, chunk=chunk, n=n, d=x_NxD.shape[1], source=source, **settings
  )
  if num_labels > k:  # a sample has only k nearest centres
    print(
      f'warning: --num-labels {num_labels} > --k {k}: each sample gets its {k} nearest centres '
      '(report.json and labels.npy say so)',
      file=sys.stderr,
    )
  num_records = sum(len(r) for r in shard_records)
  if shards and num_records != n:
    raise LabelsError(f'{num_records} records but {n} feature rows ({source})')
  check_out(out, shards)
  mesh = mesh or default_mesh()
  result = cluster(x_NxD, k, chunk=chunk, mesh=mesh, **cluster_options)
  with jax.set_mesh(mesh):
    labels, _ = kmeans.nearest(
      x_NxD, result['centres'], min(num_labels, k), spherical=True, chunk=chunk
    )
  fileio.write_npy(paths.join(out, 'labels.npy'), labels.astype(np.int32))
  fileio.write_npy(paths.join(out, 'centres.npy'), result['centres'].astype(np.float32))
  if ids is not None:
    fileio.write_npy(paths.join(out, 'ids.npy'), ids)
  sizes = np.asarray(result['sizes'])
  report = {
    'k': k,
    'N': n,
    'D': int(x_NxD.shape[1]),
    'backend': result['backend'],
    'init': result['init'],
    'objective': result['objective'],
    'inertia': result['inertia'],
    'iterations': result['iterations'],
    'converged': bool(result['converged']),
    'empty_clusters': int(np.sum(sizes == 0)),
    'empty_reseeded': result['empty_reseeded'],
    'sizes': size_report(sizes),
    'num_labels': int(labels.shape[1]),
    'source': source,
    'seconds': round(time.perf_counter() - start, 3),
  }
  if shards:
    written = write_records(shards, shard_records, labels, paths.join(out, 'records'))
    report['records'] = {'shards': len(written), 'dir': paths.join(out, 'records')}
  fileio.write_json(paths.join(out, 'report.json'), report, sort_keys=False)
  return report
