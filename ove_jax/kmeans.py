"""K-means for cluster labels (docs/spec.md §3), with the centres sharded over the mesh.

The labels of a head are each sample's nearest centres of a k-means over teacher features, with k
in the millions (2M image centres, 400k video centres). An N x k distance matrix, or even the
whole centre matrix on one device, is out of the question at that size, so this is the layout of
`ove_jax.losses` again:

- the centres [k, D] are sharded by cluster over every mesh axis (k is padded to a multiple of
  the device count; a padded centre has an infinite norm, so it never wins an assignment);
- the points [N, D] are sharded by row over the same devices and visited in chunks: at chunk c
  every device all-gathers row block c of every device's shard (`chunk` points in all), scores
  them against *its own* centres only ([chunk, k_local]: the largest buffer there is), and the
  global best centre of each point comes from a `pmin` of the local minima over the mesh axes
  (ties go to the lowest centre id, so the result does not depend on the mesh);
- the update is local too: every device sees the whole chunk, so it can add the points assigned
  to *its* clusters into its own sums and counts. That is the psum over the point shards of the
  textbook formulation, done by the all-gather of the chunk instead (a [k, D] psum would put the
  whole centre matrix on every device).

Without a mesh the same code runs on a mesh of one device. Objective: the sum of squared
distances of the points to their centres, as scikit-learn's `inertia_`. With `spherical=True`
the points and the centres are L2-normalised (centre = normalised mean) and assignment is by
cosine; the objective is then sum(2 - 2 cos), the squared distance on the sphere.

Lloyd iterations follow scikit-learn's `algorithm='lloyd'`: stop when the labels stop changing or
the total squared centre shift falls to `tol` times the mean per-feature variance of the data;
then one last assignment pass, so the labels, sizes and inertia belong to the returned centres.
A cluster left empty by an update is re-seeded with the point farthest from its own centre (the
next farthest for the next empty cluster, ...), as scikit-learn does; the re-seeds are counted.

`nearest` ranks all centres per point by cosine with the same layout (top-n per shard, then the
shards' candidates merged), which is how the labels are made from the centres.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ove_jax import sharding
from ove_jax.vectors import l2_normalise

# Elements of the per-device [chunk, k_local] distance buffer the default chunk aims at: small on
# CPU, where a buffer that stays in cache is faster (bench_kmeans), large on accelerators, where a
# chunk of a few points against 250k local centres would starve the matrix units.
_BUFFER_ELEMENTS = {'cpu': 1 << 21}
_BUFFER_ELEMENTS_ACCELERATOR = 1 << 26
# k-means++ runs on at most this many points (a random subsample of larger data).
PLUSPLUS_SAMPLE = 20_000
# init='k-means++' for more centres than this runs init='random' (`init_method`): k-means++ takes
# k sequential steps over its sample, and a sample of PLUSPLUS_SAMPLE points cannot seed the
# release's 400k / 2M centres (nor seed k close to its size any better than random points).
PLUSPLUS_MAX_K = PLUSPLUS_SAMPLE // 4

log = logging.getLogger(__name__)


@dataclasses.dataclass
class KMeans:
  """A k-means result. The labels, sizes and inertia are those of the final centres."""

  centres: np.ndarray  # float32 [k, D] (unit rows when spherical)
  inertia: float  # sum of squared distances to the nearest centre
  n_iter: int  # Lloyd iterations run
  sizes: np.ndarray  # int64 [k] points per cluster
  labels: np.ndarray  # int32 [N] nearest centre of each point
  empty_reseeded: int  # empty clusters re-seeded over all iterations
  converged: bool  # stopped by the tolerance or unchanged labels, not by `iters`
  sharded_centres: jax.Array | None = None  # [k_padded, D] on the devices, by cluster


# ------------------------------------------------------------------------------------------------
# Layout: the mesh, padding and chunking
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """The sharded layout of one k-means problem (`layout`); `put_points` / `put_centres` place
  host arrays by it, and `lloyd_pass` / `fit` / `nearest` read it."""

  axes: tuple[str, ...]  # every mesh axis: centres and points are both sharded over all of them
  devices: int
  k: int
  k_local: int  # centres per device (k padded to a multiple of `devices`)
  rows: int  # points per device per chunk
  chunks: int  # chunks per pass
  n: int

  @property
  def k_padded(self) -> int:
    return self.k_local * self.devices

  @property
  def n_padded(self) -> int:
    return self.rows * self.devices * self.chunks


def _mesh_scope():
  """The mesh set with `jax.set_mesh`, or a mesh of one device (same code, no sharding)."""
  if sharding.current_mesh() is not None:
    return contextlib.nullcontext()
  one = jax.make_mesh(
    (1,) * len(sharding.MESH_AXES),
    sharding.MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES),
    devices=jax.devices()[:1],
  )
  return jax.set_mesh(one)


def layout(n: int, k: int, chunk: int | None) -> Layout:
  """How N points and k centres lie on the current mesh (set with `jax.set_mesh`): centres per
  device, points per device per chunk, chunks per pass."""
  mesh = sharding.current_mesh()
  devices = mesh.size
  k_local = -(-k // devices)
  if chunk is None:
    budget = _BUFFER_ELEMENTS.get(jax.devices()[0].platform, _BUFFER_ELEMENTS_ACCELERATOR)
    chunk = max(devices, budget // max(k_local, 1))
  if chunk < 1:
    raise ValueError(f'chunk={chunk}; must be >= 1')
  rows = max(1, min(-(-chunk // devices), -(-n // devices)))
  chunks = -(-n // (rows * devices))
  return Layout(tuple(mesh.axis_names), devices, k, k_local, rows, chunks, n)


def put_points(x_NxD: np.ndarray, lay: Layout):
  """Points padded to whole chunks and sharded by row; `valid` marks the real ones.

  Device d's shard holds rows [d*R*C, (d+1)*R*C) with R = rows, C = chunks; its c-th row block is
  its part of chunk c.
  """
  x = np.zeros((lay.n_padded, x_NxD.shape[1]), np.float32)
  x[: lay.n] = x_NxD
  valid = np.arange(lay.n_padded) < lay.n
  # Real points are spread over the devices chunk by chunk, so padding never fills a whole shard
  # while another device has all the work: global row i goes to (device, chunk, row) in
  # chunk-major order.
  order = np.arange(lay.n_padded).reshape(lay.chunks, lay.devices, lay.rows)
  order = order.transpose(1, 0, 2).reshape(-1)
  spec = P(lay.axes)
  return jax.device_put(x[order], spec), jax.device_put(valid[order], spec), order


def put_centres(c_KxD: np.ndarray, lay: Layout) -> jax.Array:
  c = np.zeros((lay.k_padded, c_KxD.shape[1]), np.float32)
  c[: lay.k] = c_KxD
  return jax.device_put(c, P(lay.axes))


# ------------------------------------------------------------------------------------------------
# One Lloyd pass: assign every point, accumulate the owners' sums and counts
# ------------------------------------------------------------------------------------------------


def _lloyd_pass(x_NxD, valid_N, centres_KxD, lay: Layout, spherical: bool):
  """(new centres, counts, labels, min sq. distances, inertia, centre shift) of one pass.

  labels / distances come back in the sharded row order of `put_points`; the new centres keep
  the old centre where a cluster got no point (the caller re-seeds those).
  """
  axes, k_local, rows = lay.axes, lay.k_local, lay.rows
  big = jnp.int32(np.iinfo(np.int32).max)

  def local(x, valid, centres):
    d = jax.lax.axis_index(axes)
    offset = d * k_local
    ids = offset + jnp.arange(k_local, dtype=jnp.int32)
    real = ids < lay.k
    # ||x - c||^2 = ||x||^2 + (||c||^2 - 2 x.c); the bracket decides the argmin. Padding: +inf.
    c_sq = jnp.where(real, jnp.sum(centres * centres, axis=1), jnp.inf)
    x_blocks = x.reshape(lay.chunks, rows, -1)
    v_blocks = valid.reshape(lay.chunks, rows)
    zero = lambda shape: jax.lax.pcast(jnp.zeros(shape, jnp.float32), axes, to='varying')

    def body(carry, block):
      sums, counts, inertia = carry
      xb, vb = block
      xc = jax.lax.all_gather(xb, axes, axis=0, tiled=True, to='invarying')  # [chunk, D]
      vc = jax.lax.all_gather(vb, axes, axis=0, tiled=True, to='invarying')
      # top_k of the negation: one pass over the buffer (min + argmin take two on XLA:CPU), and
      # it keeps the lowest index among equals.
      neg = 2.0 * jnp.dot(xc, centres.T, precision=jax.lax.Precision.HIGHEST) - c_sq[None, :]
      local_max, local_arg = jax.lax.top_k(neg, 1)
      local_min, local_arg = -local_max[:, 0], local_arg[:, 0].astype(jnp.int32)
      best = jax.lax.pmin(local_min, axes)
      label = jax.lax.pmin(jnp.where(local_min == best, offset + local_arg, big), axes)
      dist = jnp.maximum(best + jnp.sum(xc * xc, axis=1), 0.0)
      inertia = inertia + jnp.sum(jnp.where(vc, dist, 0.0))
      # The owner of each point's cluster adds it; other devices send it to a dropped bucket.
      mine = label - offset
      mine = jnp.where(vc & (mine >= 0) & (mine < k_local), mine, k_local)
      sums = sums + jax.ops.segment_sum(xc, mine, num_segments=k_local + 1)[:k_local]
      counts = (
        counts + jax.ops.segment_sum(jnp.ones_like(dist), mine, num_segments=k_local + 1)[:k_local]
      )
      own = jax.lax.dynamic_slice_in_dim(label, d * rows, rows)
      own_dist = jnp.where(vb, jax.lax.dynamic_slice_in_dim(dist, d * rows, rows), -1.0)
      return (sums, counts, inertia), (own, own_dist)

    init = (zero(centres.shape), zero((k_local,)), jnp.zeros((), jnp.float32))
    (sums, counts, inertia), (labels, dists) = jax.lax.scan(body, init, (x_blocks, v_blocks))
    new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centres)
    if spherical:
      new = jnp.where(counts[:, None] > 0, l2_normalise(new), centres)
    shift = jax.lax.psum(jnp.sum(jnp.where(real[:, None], (new - centres) ** 2, 0.0)), axes)
    return new, counts, labels.reshape(-1), dists.reshape(-1), inertia, shift

  spec = P(axes)
  return jax.shard_map(
    local,
    mesh=sharding.current_mesh(),
    in_specs=(spec, spec, spec),
    out_specs=(spec, spec, spec, spec, P(), P()),
  )(x_NxD, valid_N, centres_KxD)


# One jitted Lloyd pass on points and centres already placed by `put_points` / `put_centres`:
# what `fit` iterates, and what ove_jax.kmeans_backends.kmeans_throughput times.
lloyd_pass = jax.jit(_lloyd_pass, static_argnums=(3, 4))


@jax.jit
def _reseed(centres_KxD, x_NxD, dists_N, empty_ids_E):
  """Empty cluster j <- the j-th farthest point from its centre (padding rows have distance -1)."""
  _, far = jax.lax.top_k(dists_N, empty_ids_E.shape[0])
  return centres_KxD.at[empty_ids_E].set(x_NxD[far])


# ------------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------------


def kmeans_plusplus(
  x_NxD: np.ndarray, k: int, seed: int = 0, sample: int = PLUSPLUS_SAMPLE
) -> np.ndarray:
  """k-means++ (D^2 sampling with 2 + log k greedy trials per centre, as scikit-learn).

  Sequential in k and O(N k D) in all, so data larger than `sample` points is subsampled at random
  first: the centres then come from the subsample. `initial_centres` (every `fit`) calls it only
  for k <= PLUSPLUS_MAX_K and draws random points for more centres (`init_method`).
  """
  rng = np.random.default_rng(seed)
  x = np.asarray(x_NxD, np.float32)
  if len(x) > sample:
    x = x[np.sort(rng.choice(len(x), sample, replace=False))]
  n = len(x)
  if k > n:
    raise ValueError(
      f'k={k} centres from a k-means++ sample of {n} points; lower k, raise the '
      'sample or use init="random"'
    )
  trials = 2 + int(math.log(k))
  x_sq = np.einsum('nd,nd->n', x, x)
  centres = np.empty((k, x.shape[1]), np.float32)
  first = int(rng.integers(n))
  centres[0] = x[first]
  closest = np.maximum(x_sq - 2 * x @ x[first] + x_sq[first], 0)
  for i in range(1, k):
    total = closest.sum()
    if total <= 0:  # every point is a centre already (duplicates): any point will do
      candidates = rng.integers(n, size=trials)
    else:
      candidates = np.searchsorted(np.cumsum(closest), rng.random(trials) * total)
      candidates = np.minimum(candidates, n - 1)
    d = np.maximum(x_sq[None, :] - 2 * x[candidates] @ x.T + x_sq[candidates, None], 0)
    d = np.minimum(closest[None, :], d)
    best = int(np.argmin(d.sum(axis=1)))
    centres[i] = x[candidates[best]]
    closest = d[best]
  return centres


def init_method(init, k: int):
  """The init `initial_centres` runs for `init` and k: `init` itself, except 'random' for
  'k-means++' with k > PLUSPLUS_MAX_K (k sequential k-means++ steps over a sample of at most
  PLUSPLUS_SAMPLE points cannot seed hundreds of thousands of centres)."""
  if isinstance(init, str) and init == 'k-means++' and k > PLUSPLUS_MAX_K:
    return 'random'
  return init


def plusplus_note(k: int) -> str:
  """What is said when k-means++ gives way to random points (`init_method`)."""
  return (
    f'k = {k} centres: k-means++ is used up to k = {PLUSPLUS_MAX_K} (it seeds from a sample of '
    f'{PLUSPLUS_SAMPLE} points); starting from {k} distinct random points instead (init="random")'
  )


def initial_centres(x_NxD, k, init, seed, spherical) -> np.ndarray:
  """[k, D] float32 starting centres: k-means++ (random points for k > PLUSPLUS_MAX_K, logged:
  `init_method`), k distinct random points, or a given array (checked); unit rows when spherical.
  Shared with ove_jax.kmeans_backends."""
  if isinstance(init, str):
    if init_method(init, k) != init:
      log.warning(plusplus_note(k))
      init = 'random'
    if init == 'k-means++':
      c = kmeans_plusplus(x_NxD, k, seed)
    elif init == 'random':
      rng = np.random.default_rng(seed)
      c = x_NxD[np.sort(rng.choice(len(x_NxD), k, replace=False))]
    else:
      raise ValueError(f'init={init!r}; use "k-means++", "random" or a [k, D] array')
  else:
    c = np.asarray(init, np.float32)
    if c.shape != (k, x_NxD.shape[1]):
      raise ValueError(f'init centres of shape {c.shape}; expected {(k, x_NxD.shape[1])}')
  c = np.array(c, np.float32)
  return l2_normalise(c) if spherical else c


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def _check_points(x_NxD, k: int) -> np.ndarray:
  x = np.asarray(x_NxD, np.float32)
  if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f'points of shape {x.shape}; expected [N > 0, D > 0]')
  if not 1 <= k <= x.shape[0]:
    raise ValueError(f'k={k} centres for {x.shape[0]} points; need 1 <= k <= N')
  if not np.isfinite(x).all():
    raise ValueError('points hold NaN or infinite values')
  return x


@dataclasses.dataclass(frozen=True)
class FitSettings:
  """The Lloyd settings every k-means `fit` takes as keyword arguments (this module's,
  `kmeans_backends.fit` and `kmeans_multiprocess.fit`): one home for their names and defaults."""

  # 'k-means++' (on a subsample of at most PLUSPLUS_SAMPLE points; 'random' for k >
  # PLUSPLUS_MAX_K), 'random' (k distinct points) or a [k, D] array used as given (normalised
  # when spherical).
  init: str | np.ndarray = 'k-means++'
  iters: int = 100  # at most this many Lloyd iterations
  # Stop when the total squared centre shift is <= tol * mean feature variance (sklearn's rule).
  tol: float = 1e-4
  seed: int = 0  # of the initialisation
  spherical: bool = False  # cosine k-means on L2-normalised points and centres


def fit(x_NxD, k: int, *, chunk: int | None = None, **settings) -> KMeans:
  """Lloyd k-means of the rows of `x_NxD`; sharded over the mesh when one is set.

  Args:
    x_NxD: the points (host array; they are sharded by row over the devices).
    k: number of centres.
    chunk: points scored at once (all devices together); each device holds a
      [chunk, k / devices] buffer. Default: 2M elements per device on CPU, 64M elsewhere.
    settings: init, iters, tol, seed, spherical: see `FitSettings`.
  """
  s = FitSettings(**settings)
  x = _check_points(x_NxD, k)
  if s.spherical:
    x = l2_normalise(x)
  centres0 = initial_centres(x, k, s.init, s.seed, s.spherical)
  threshold = float(s.tol * np.mean(np.var(x, axis=0)))
  with _mesh_scope():
    lay = layout(len(x), k, chunk)
    xs, valid, order = put_points(x, lay)
    centres = put_centres(centres0, lay)
    prev, reseeded, converged, it = None, 0, False, 0
    for it in range(1, s.iters + 1):  # noqa: B007 (the pass count is reported after the loop)
      new, counts, labels, dists, _, shift = lloyd_pass(xs, valid, centres, lay, s.spherical)
      empty = np.flatnonzero(np.asarray(counts)[:k] == 0)
      if len(empty):
        # The shift counts a re-seeded centre's jump too, so a re-seed never looks converged.
        new = _reseed(new, xs, dists, jnp.asarray(empty, jnp.int32))
        shift = jnp.sum((new[:k] - centres[:k]) ** 2)
        reseeded += len(empty)
      centres = new
      same = prev is not None and not len(empty) and bool(jnp.all(labels == prev))
      if same or float(shift) <= threshold:
        converged = True
        break
      prev = labels
    _, counts, labels, _, inertia, _ = lloyd_pass(xs, valid, centres, lay, s.spherical)
    unpermute = np.empty_like(order)
    unpermute[order] = np.arange(len(order))
    labels_N = np.asarray(labels)[unpermute][: lay.n].astype(np.int32)
    return KMeans(
      centres=np.asarray(centres)[:k],
      inertia=float(inertia),
      n_iter=it,
      sizes=np.asarray(counts)[:k].astype(np.int64),
      labels=labels_N,
      empty_reseeded=reseeded,
      converged=converged,
      sharded_centres=centres,
    )


def _nearest_pass(x_NxD, valid_N, centres_KxD, lay: Layout, n: int, spherical: bool):
  axes, k_local, rows = lay.axes, lay.k_local, lay.rows
  take = min(n, k_local)

  def local(x, valid, centres):
    del valid
    d = jax.lax.axis_index(axes)
    ids = d * k_local + jnp.arange(k_local, dtype=jnp.int32)
    real = ids < lay.k
    c_sq = jnp.sum(centres * centres, axis=1)

    def body(_, xb):
      xc = jax.lax.all_gather(xb, axes, axis=0, tiled=True, to='invarying')  # [chunk, D]
      dot = jnp.dot(xc, centres.T, precision=jax.lax.Precision.HIGHEST)
      # Higher is nearer: the cosine on the sphere, minus the squared distance off it.
      score = dot if spherical else 2.0 * dot - c_sq[None, :] - jnp.sum(xc * xc, 1)[:, None]
      score = jnp.where(real[None, :], score, -jnp.inf)
      top, arg = jax.lax.top_k(score, take)  # [chunk, take]
      # Every shard's candidates, in shard (= centre id) order, then the best n of them.
      top = jax.lax.all_gather(top, axes, axis=1, tiled=True, to='invarying')
      cand = jax.lax.all_gather(ids[arg], axes, axis=1, tiled=True, to='invarying')
      best, pick = jax.lax.top_k(top, n)
      best_ids = jnp.take_along_axis(cand, pick, axis=1)
      own = lambda a: jax.lax.dynamic_slice_in_dim(a, d * rows, rows)
      return None, (own(best_ids), own(best))

    _, (ids_out, scores) = jax.lax.scan(body, None, x.reshape(lay.chunks, rows, -1))
    return ids_out.reshape(-1, n), scores.reshape(-1, n)

  spec = P(axes)
  return jax.shard_map(
    local, mesh=sharding.current_mesh(), in_specs=(spec, spec, spec), out_specs=(spec, spec)
  )(x_NxD, valid_N, centres_KxD)


_jit_nearest = jax.jit(_nearest_pass, static_argnums=(3, 4, 5))


def nearest(
  x_NxD, centres_KxD, n: int = 10, *, spherical: bool = True, chunk: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """The n nearest centres of every point: (ids int32 [N, n], scores float32 [N, n]), nearest first.

  spherical: by cosine (points and centres normalised here; scores are cosines, decreasing).
  Otherwise by Euclidean distance; scores are then the squared distances, increasing.
  Sharded like `fit`: each device ranks the chunk against its own centres, keeps its top n, and
  the devices' candidates are merged into the global top n.
  """
  centres = np.asarray(centres_KxD, np.float32)
  if centres.ndim != 2:
    raise ValueError(f'centres of shape {centres.shape}; expected [k, D]')
  x = np.asarray(x_NxD, np.float32)
  if x.ndim != 2 or x.shape[1] != centres.shape[1] or len(x) == 0:
    raise ValueError(f'points of shape {x.shape}; expected [N > 0, {centres.shape[1]}]')
  if not 1 <= n <= len(centres):
    raise ValueError(f'n={n} nearest of {len(centres)} centres; need 1 <= n <= k')
  if spherical:
    x, centres = l2_normalise(x), l2_normalise(centres)
  with _mesh_scope():
    lay = layout(len(x), len(centres), chunk)
    xs, valid, order = put_points(x, lay)
    ids, scores = _jit_nearest(xs, valid, put_centres(centres, lay), lay, n, spherical)
    unpermute = np.empty_like(order)
    unpermute[order] = np.arange(len(order))
    ids = np.asarray(ids)[unpermute][: lay.n].astype(np.int32)
    scores = np.asarray(scores)[unpermute][: lay.n]
  return ids, (scores if spherical else -scores)
