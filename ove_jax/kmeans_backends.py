"""One k-means interface over three engines: the sharded JAX k-means, scikit-learn and faiss.

Cluster labels need k in the millions (docs/spec.md §3: 2M image centres, 400k video centres).
`ove_jax.kmeans` shards the centres over the mesh; faiss is the field's tool for one GPU host
(`pip install 'ove-jax[faiss]'` for faiss-cpu; a GPU build of faiss is used when it is the one
installed); scikit-learn is the reference the others are checked against. All three take the
same points [N, D] float32, k, initial centres, iterations and metric, and their results are
scored by one function (`objective`), so they compare on equal terms:

- euclidean: Lloyd's objective, the sum of squared distances to the nearest centre;
- spherical: points and centres L2-normalised, assignment by cosine, the objective sum(2 - 2 cos)
  (the squared distance on the sphere), as `ove_jax.kmeans.fit(spherical=True)`.
  scikit-learn has no spherical k-means: it runs Euclidean Lloyd on the normalised points and
  its centres are normalised at the end (close to spherical k-means for compact clusters, and
  scored by the same spherical objective).

Initial centres come from `initial_centres` (k-means++ from `ove_jax.kmeans`, random points
instead above `kmeans.PLUSPLUS_MAX_K` centres; k random points; or an array), so the three start
from the same centres. Every engine runs `iters` centre updates
(faiss has no tolerance; pass tol=0 to the others for the same count) and the returned labels,
sizes and inertia belong to the returned centres.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from ove_jax import kmeans
from ove_jax.vectors import l2_normalise

BACKENDS = ('jax', 'sklearn', 'faiss')


def unit(x: np.ndarray) -> np.ndarray:
  """Rows L2-normalised, as float32 (ove_jax.vectors.l2_normalise)."""
  return l2_normalise(np.asarray(x, np.float32))


def initial_centres(
  x_NxD: np.ndarray,
  k: int,
  init: str | np.ndarray = 'k-means++',
  seed: int = 0,
  spherical: bool = False,
) -> np.ndarray:
  """[k, D] float32 starting centres shared by every backend (unit rows when spherical).

  'k-means++' is `ove_jax.kmeans.kmeans_plusplus` (on a subsample of large data; k distinct
  random points, logged, for k > kmeans.PLUSPLUS_MAX_K), 'random' is k distinct points; an array
  is checked and used as given.
  """
  x = unit(x_NxD) if spherical else np.asarray(x_NxD, np.float32)
  return kmeans.initial_centres(x, k, init, seed, spherical)  # kmeans.fit's own init


def assign(
  x_NxD: np.ndarray, centres_KxD: np.ndarray, *, spherical: bool = False, backend: str = 'jax'
) -> tuple[np.ndarray, np.ndarray]:
  """Nearest centre of every point: (labels int32 [N], squared distances float32 [N]).

  Spherical: on the unit sphere (distance 2 - 2 cos). The assignment step of every backend, and
  what the bench times.
  """
  x = unit(x_NxD) if spherical else np.asarray(x_NxD, np.float32)
  c = unit(centres_KxD) if spherical else np.asarray(centres_KxD, np.float32)
  if backend == 'jax':
    ids, scores = kmeans.nearest(x, c, 1, spherical=spherical)
    d = 2.0 - 2.0 * scores[:, 0] if spherical else scores[:, 0]
    return ids[:, 0], np.maximum(d, 0.0).astype(np.float32)
  if backend == 'sklearn':
    from sklearn.metrics import pairwise_distances_argmin_min

    ids, d = pairwise_distances_argmin_min(x, c)  # Euclidean; on the sphere the same order
    return ids.astype(np.int32), (d.astype(np.float32) ** 2)
  if backend == 'faiss':
    faiss = _faiss()
    index = faiss.IndexFlatIP(c.shape[1]) if spherical else faiss.IndexFlatL2(c.shape[1])
    index = _on_gpu(faiss, index)
    index.add(np.ascontiguousarray(c))
    d, ids = index.search(np.ascontiguousarray(x), 1)
    d = 2.0 - 2.0 * d[:, 0] if spherical else d[:, 0]
    return ids[:, 0].astype(np.int32), np.maximum(d, 0.0).astype(np.float32)
  raise ValueError(f'backend={backend!r}; use one of {BACKENDS}')


def objective(x_NxD: np.ndarray, centres_KxD: np.ndarray, *, spherical: bool = False) -> float:
  """Sum of squared distances of the points to their nearest centre (on the sphere if
  spherical): the one score every backend's result is compared by."""
  return float(np.sum(assign(x_NxD, centres_KxD, spherical=spherical)[1], dtype=np.float64))


def _faiss():
  try:
    import faiss
  except ImportError as e:
    raise ImportError(
      "backend='faiss' needs faiss: pip install 'ove-jax[faiss]' (faiss-cpu), "
      'or a GPU build of faiss from conda'
    ) from e
  return faiss


def _has_gpu(faiss) -> bool:
  return hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > 0


def _on_gpu(faiss, index):
  """The index on GPU 0 when this faiss is a GPU build with a visible GPU, else as it is."""
  if _has_gpu(faiss):
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
  return index


def fit(
  x_NxD: np.ndarray, k: int, *, backend: str = 'jax', chunk: int | None = None, **settings
) -> kmeans.KMeans:
  """Lloyd k-means of the rows of `x_NxD` with `backend` ('jax', 'sklearn' or 'faiss').

  Same arguments as `ove_jax.kmeans.fit` (`kmeans.FitSettings`; chunk: JAX only; tol: not
  faiss, which always runs `iters` updates). The result's inertia is `objective` of its centres;
  empty_reseeded is -1 where the backend does not report it (scikit-learn, faiss).
  """
  s = kmeans.FitSettings(**settings)
  iters, tol, seed, spherical = s.iters, s.tol, s.seed, s.spherical
  x = unit(x_NxD) if spherical else np.asarray(x_NxD, np.float32)
  if x.ndim != 2 or not 1 <= k <= len(x):
    raise ValueError(f'points of shape {x.shape} and k={k}; expected [N, D] and 1 <= k <= N')
  c0 = initial_centres(x, k, s.init, seed, spherical)
  if backend == 'jax':
    return kmeans.fit(
      x, k, init=c0, iters=iters, tol=tol, seed=seed, spherical=spherical, chunk=chunk
    )
  if backend == 'sklearn':
    from sklearn.cluster import KMeans as SkKMeans

    sk = SkKMeans(
      k, init=c0, n_init=1, max_iter=iters, tol=tol, algorithm='lloyd', random_state=seed
    ).fit(x)
    centres, n_iter = sk.cluster_centers_.astype(np.float32), int(sk.n_iter_)
    converged = n_iter < iters
  elif backend == 'faiss':
    faiss = _faiss()
    # No subsampling (faiss trains on 256 points per centre by default) and no warnings for
    # small clusters: the same data the other backends see.
    km = faiss.Kmeans(
      x.shape[1],
      k,
      niter=iters,
      spherical=spherical,
      seed=seed,
      max_points_per_centroid=len(x),
      min_points_per_centroid=1,
      gpu=_has_gpu(faiss),
    )
    km.train(np.ascontiguousarray(x), init_centroids=np.ascontiguousarray(c0))
    centres, n_iter, converged = np.asarray(km.centroids, np.float32), iters, False
  else:
    raise ValueError(f'backend={backend!r}; use one of {BACKENDS}')
  if spherical:
    centres = unit(centres)
  labels, d = assign(x, centres, spherical=spherical, backend='jax')
  return kmeans.KMeans(
    centres=centres,
    inertia=float(np.sum(d, dtype=np.float64)),
    n_iter=n_iter,
    sizes=np.bincount(labels, minlength=k).astype(np.int64),
    labels=labels,
    empty_reseeded=-1,
    converged=converged,
  )


@dataclasses.dataclass
class BenchRow:
  backend: str
  assign_points_per_s: float  # points assigned to their nearest of k centres per second
  fit_s: float  # wall time of `fit` (initial centres given)
  objective: float  # `objective` of the fitted centres
  n_iter: int


def bench(
  x_NxD: np.ndarray,
  k: int,
  *,
  backends=BACKENDS,
  iters: int = 10,
  spherical: bool = False,
  seed: int = 0,
  repeats: int = 3,
) -> list[BenchRow]:
  """Every backend on the same data from the same k-means++ centres: assignment throughput (the
  best of `repeats` timed passes after a warm-up, which also compiles JAX), fit time and final
  objective (tol=0: every backend runs `iters` updates)."""
  x = unit(x_NxD) if spherical else np.asarray(x_NxD, np.float32)
  c0 = initial_centres(x, k, 'k-means++', seed, spherical)
  rows = []
  for name in backends:
    assign(x, c0, spherical=spherical, backend=name)
    best = float('inf')
    for _ in range(repeats):
      t = time.perf_counter()
      assign(x, c0, spherical=spherical, backend=name)
      best = min(best, time.perf_counter() - t)
    t = time.perf_counter()
    result = fit(x, k, backend=name, init=c0, iters=iters, tol=0.0, seed=seed, spherical=spherical)
    rows.append(
      BenchRow(name, len(x) / best, time.perf_counter() - t, result.inertia, result.n_iter)
    )
  return rows


def kmeans_throughput(
  n: int,
  d: int,
  k: int,
  *,
  chunk: int | None = None,
  repeats: int = 3,
  sklearn: bool = True,
  say: Callable[[str], None] = print,
) -> dict:
  """One Lloyd pass of `ove_jax.kmeans` (assignment and per-cluster sums, on points already on
  the devices of the current mesh) against scikit-learn's `KMeans.predict` (assignment only) on
  the same N random points and k centres: best of `repeats` after a warm-up, in points x
  centres per second."""
  import warnings

  import jax

  from ove_jax import benchmarks, sharding

  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, d)).astype(np.float32)
  centres = x[rng.choice(n, k, replace=False)]
  pairs = n * k
  mesh = sharding.current_mesh()
  figures = {
    'n': n,
    'd': d,
    'k': k,
    'devices': mesh.size,
    'mesh': list(mesh.shape.values()),
    'platform': jax.devices()[0].platform,
  }
  lay = kmeans.layout(n, k, chunk)
  xs, valid, _ = kmeans.put_points(x, lay)
  cs = kmeans.put_centres(centres, lay)
  run = lambda: jax.block_until_ready(kmeans.lloyd_pass(xs, valid, cs, lay, False))
  t_jax = min(benchmarks.time_runs(run, warmup=1, repeats=repeats)['times_s'])
  figures.update(
    jax_seconds=t_jax, jax_pairs_per_second=pairs / t_jax, jax_chunk=lay.rows * lay.devices
  )
  say(
    f'N={n} D={d} k={k} on {mesh.size} {figures["platform"]} device(s), mesh '
    f'{tuple(figures["mesh"])}, chunk {figures["jax_chunk"]}'
  )
  say(
    f'  jax Lloyd pass (assign + sums)  {t_jax * 1e3:9.1f} ms   '
    f'{pairs / t_jax:.3e} points x centres / s'
  )
  if sklearn:
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():  # fitted on the centres themselves, only to make predict()
      warnings.simplefilter('ignore')
      km = KMeans(k, init=centres, n_init=1, max_iter=1).fit(centres)
    km.cluster_centers_ = centres.copy()  # the same centres as the JAX pass
    t_sk = min(benchmarks.time_runs(lambda: km.predict(x), warmup=1, repeats=repeats)['times_s'])
    figures.update(
      sklearn_seconds=t_sk, sklearn_pairs_per_second=pairs / t_sk, jax_over_sklearn=t_sk / t_jax
    )
    say(
      f'  sklearn predict (assign)        {t_sk * 1e3:9.1f} ms   '
      f'{pairs / t_sk:.3e} points x centres / s'
    )
    say(f'  jax / sklearn throughput: {t_sk / t_jax:.2f}x')
  return figures
