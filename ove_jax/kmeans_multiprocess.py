"""Multi-process k-means: each process holds only its own points, the centres are sharded over
every device of every process (docs/spec.md §3: millions of centres over more teacher features
than one host can hold).

`ove_jax.kmeans.fit` takes one host's array of all the points. Here each process passes its own
rows; they become one global array with `jax.make_array_from_process_local_data` (a 1-D mesh of
all devices, each device a contiguous block of its process's rows), and the centres [k, D] are
sharded by cluster over the same devices, so no device holds more than k / devices centres and
no process more than its own points.

One Lloyd pass is two rings over the devices (`ppermute` to the next device), per chunk of each
device's rows, so a device holds one visiting block [rows, D] and one [rows, k_local] score
buffer at a time:

1. assignment: the block visits every device, which compares it with its own centres and keeps
   the better (distance, centre id) of each point, lexicographically, so ties go to the lowest
   centre id as in `ove_jax.kmeans` and the result does not depend on the mesh; after `devices`
   hops the block is home with its global nearest centres;
2. update: the block, with its labels, visits every device again and each adds the points of
   its own clusters into its sums and counts.

The objective, stopping rule, empty-cluster re-seeding (farthest points), spherical variant and
the last assignment pass are those of `ove_jax.kmeans.fit`; from the same centres the two agree
(tests/test_kmeans_backends.py runs 2 processes x 4 CPU devices against one process).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ove_jax import kmeans, kmeans_backends

AXIS = 'kmeans'
_BIG = np.iinfo(np.int32).max


def _mesh() -> jax.sharding.Mesh:
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return jax.sharding.Mesh(np.array(devices), (AXIS,))


def _ring_pass(x, valid, centres, *, k: int, rows: int, spherical: bool, mesh):
  """(new centres, counts, labels, distances (-1 on padding), inertia, shift) of one pass."""
  n = mesh.size
  k_local = centres.shape[0] // n
  hop = [(i, (i + 1) % n) for i in range(n)]
  send = lambda *a: tuple(jax.lax.ppermute(v, AXIS, hop) for v in a)

  def local(x_RxD, valid_R, c_KxD):
    offset = jax.lax.axis_index(AXIS) * k_local
    ids = offset + jnp.arange(k_local, dtype=jnp.int32)
    c_sq = jnp.where(ids < k, jnp.sum(c_KxD * c_KxD, axis=1), jnp.inf)

    def nearest_here(xv, best, lab):
      neg = 2.0 * jnp.dot(xv, c_KxD.T, precision=jax.lax.Precision.HIGHEST) - c_sq[None, :]
      top, arg = jax.lax.top_k(neg, 1)
      d, i = -top[:, 0], ids[arg[:, 0]]
      better = (d < best) | ((d == best) & (i < lab))
      return send(xv, jnp.where(better, d, best), jnp.where(better, i, lab))

    def add_mine(state):
      sums, counts, xv, lv, vv = state
      mine = lv - offset
      mine = jnp.where(vv & (mine >= 0) & (mine < k_local), mine, k_local)
      sums = sums + jax.ops.segment_sum(xv, mine, num_segments=k_local + 1)[:k_local]
      counts = (
        counts
        + jax.ops.segment_sum(vv.astype(jnp.float32), mine, num_segments=k_local + 1)[:k_local]
      )
      return (sums, counts, *send(xv, lv, vv))

    def chunk(carry, block):
      sums, counts, inertia = carry
      xb, vb = block
      start = (xb, jnp.full(vb.shape, jnp.inf, jnp.float32), jnp.full(vb.shape, _BIG, jnp.int32))
      _, best, lab = jax.lax.fori_loop(0, n, lambda _, s: nearest_here(*s), start)
      dist = jnp.maximum(best + jnp.sum(xb * xb, axis=1), 0.0)
      inertia = inertia + jnp.sum(jnp.where(vb, dist, 0.0))
      sums, counts, *_ = jax.lax.fori_loop(
        0, n, lambda _, s: add_mine(s), (sums, counts, xb, lab, vb)
      )
      return (sums, counts, inertia), (lab, jnp.where(vb, dist, -1.0))

    blocks = (x_RxD.reshape(-1, rows, x_RxD.shape[1]), valid_R.reshape(-1, rows))
    zero = (jnp.zeros_like(c_KxD), jnp.zeros((k_local,), jnp.float32), jnp.zeros((), jnp.float32))
    (sums, counts, inertia), (labels, dists) = jax.lax.scan(chunk, zero, blocks)
    new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c_KxD)
    if spherical:
      new = new / jnp.maximum(jnp.linalg.norm(new, axis=1, keepdims=True), 1e-12)
      new = jnp.where(counts[:, None] > 0, new, c_KxD)
    shift = jax.lax.psum(jnp.sum(jnp.where((ids < k)[:, None], (new - c_KxD) ** 2, 0.0)), AXIS)
    return (new, counts, labels.reshape(-1), dists.reshape(-1), jax.lax.psum(inertia, AXIS), shift)

  s = P(AXIS)
  return jax.shard_map(
    local, mesh=mesh, in_specs=(s, s, s), out_specs=(s, s, s, s, P(), P()), check_vma=False
  )(x, valid, centres)


def fit(local_x_NxD, k: int, *, chunk_rows: int | None = None, **settings) -> kmeans.KMeans:
  """Lloyd k-means over the points of every process (call it on every process, each with its
  own rows; a single process works too).

  Args:
    local_x_NxD: this process's points [N_p, D] (N_p may differ between processes, D may not).
    k: number of centres.
    chunk_rows: rows of one device scored at once (the visiting block); default: all of them up
      to 2^21 / (k / devices) elements of score buffer.
    settings: as `ove_jax.kmeans.fit` (`kmeans.FitSettings`), but init: a [k, D] array (the
      same on every process), or 'k-means++' / 'random' drawn by process 0 from its own points
      and broadcast (`kmeans.initial_centres`: random points for k-means++ of more than
      kmeans.PLUSPLUS_MAX_K centres).
  Returns: a KMeans whose labels are those of this process's points, in its order; centres,
    sizes and inertia are global.
  """
  s = kmeans.FitSettings(**settings)
  init, iters, tol, seed, spherical = s.init, s.iters, s.tol, s.seed, s.spherical
  x = np.asarray(local_x_NxD, np.float32)
  if x.ndim != 2 or x.shape[1] == 0:
    raise ValueError(f'local points of shape {x.shape}; expected [N_p, D > 0]')
  if spherical:
    x = kmeans_backends.unit(x)
  mesh = _mesh()
  counts = multihost_utils.process_allgather(np.array([len(x), x.shape[1]], np.int64))
  counts = np.asarray(counts).reshape(-1, 2)
  if len(set(counts[:, 1])) != 1:
    raise ValueError(f'processes hold points of different widths {sorted(set(counts[:, 1]))}')
  total = int(counts[:, 0].sum())
  if not 1 <= k <= total:
    raise ValueError(f'k={k} centres for {total} points over all processes; need 1 <= k <= N')
  if isinstance(init, str):
    if jax.process_index() == 0:
      c0 = kmeans_backends.initial_centres(x, k, init, seed, spherical)
    else:
      c0 = np.zeros((k, x.shape[1]), np.float32)
    c0 = np.asarray(multihost_utils.broadcast_one_to_all(c0))
  else:
    c0 = np.asarray(init, np.float32)
    if c0.shape != (k, x.shape[1]):
      raise ValueError(f'init centres of shape {c0.shape}; expected {(k, x.shape[1])}')
    c0 = kmeans_backends.unit(c0) if spherical else c0

  local_devices = len(mesh.local_devices)
  k_local = -(-k // mesh.size)
  per_device = -(-int(counts[:, 0].max()) // local_devices)
  rows = max(1, min(per_device, chunk_rows or max(1, (1 << 21) // k_local)))
  per_device = -(-per_device // rows) * rows
  padded = np.zeros((per_device * local_devices, x.shape[1]), np.float32)
  padded[: len(x)] = x
  sharded = NamedSharding(mesh, P(AXIS))
  xs = jax.make_array_from_process_local_data(sharded, padded)
  valid = jax.make_array_from_process_local_data(sharded, np.arange(len(padded)) < len(x))
  c_pad = np.zeros((k_local * mesh.size, x.shape[1]), np.float32)
  c_pad[:k] = c0
  centres = jax.make_array_from_callback(c_pad.shape, sharded, lambda i: c_pad[i])

  replicated = NamedSharding(mesh, P())
  step = jax.jit(
    lambda x, v, c: _ring_pass(x, v, c, k=k, rows=rows, spherical=spherical, mesh=mesh)
  )
  gather = jax.jit(lambda a: a, out_shardings=replicated)
  same = jax.jit(lambda a, b: jnp.all(a == b), out_shardings=replicated)

  @jax.jit
  def variance(x, v):
    w = v.astype(jnp.float32)[:, None]
    mean = jnp.sum(x * w, axis=0) / total
    return jnp.mean(jnp.sum(w * (x - mean) ** 2, axis=0) / total)

  @jax.jit
  def reseed(c, x, dists, empty):
    _, far = jax.lax.top_k(dists, empty.shape[0])
    return c.at[empty].set(x[far])

  threshold = tol * float(gather(variance(xs, valid)))
  prev, reseeded, converged, it = None, 0, False, 0
  for it in range(1, iters + 1):  # noqa: B007 (the pass count is reported after the loop)
    new, count, labels, dists, _, shift = step(xs, valid, centres)
    empty = np.flatnonzero(np.asarray(gather(count))[:k] == 0)
    if len(empty):
      new = reseed(new, xs, dists, jnp.asarray(empty, jnp.int32))
      shift = jnp.sum((new[:k] - centres[:k]) ** 2)
      reseeded += len(empty)
    centres = new
    unchanged = prev is not None and not len(empty) and bool(same(labels, prev))
    if unchanged or float(gather(shift)) <= threshold:
      converged = True
      break
    prev = labels
  _, count, labels, _, inertia, _ = step(xs, valid, centres)
  mine = sorted(labels.addressable_shards, key=lambda s: s.index[0].start or 0)
  local_labels = np.concatenate([np.asarray(s.data) for s in mine])[: len(x)].astype(np.int32)
  host_centres = np.asarray(multihost_utils.process_allgather(centres, tiled=True))[:k]
  return kmeans.KMeans(
    centres=host_centres,
    inertia=float(gather(inertia)),
    n_iter=it,
    sizes=np.asarray(gather(count))[:k].astype(np.int64),
    labels=local_labels,
    empty_reseeded=reseeded,
    converged=converged,
    sharded_centres=centres,
  )
