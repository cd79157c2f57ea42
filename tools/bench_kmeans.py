"""K-means assignment throughput: the sharded JAX pass (ove_jax.kmeans) vs scikit-learn, one run.

Both score the same N points against the same k centres; the figure is points x centres per
second, best of `--repeats` timed runs after one warm-up (the JAX pass is compiled there):

  sklearn  `KMeans.predict`: assignment only (its Cython / BLAS Lloyd E-step, threaded)
  jax      one Lloyd pass of ove_jax.kmeans: assignment *and* the per-cluster sums and counts
           (the M-step), chunked and sharded over the mesh; so it does a little more work

  python tools/bench_kmeans.py                            # N 20000, D 64, k 1000, 1 device
  python tools/bench_kmeans.py --devices 8 --mesh 2,4,1   # 8 virtual CPU devices
  python tools/bench_kmeans.py --n 1000000 --k 100000 --d 768 --skip-sklearn   # on a GPU/TPU

Installed as the console script `ove-bench-kmeans`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='ove-bench-kmeans', description=__doc__.split('\n\n')[0])
  p.add_argument('--n', type=int, default=20_000, help='points')
  p.add_argument('--d', type=int, default=64, help='feature dimension')
  p.add_argument('--k', type=int, default=1000, help='centres')
  p.add_argument('--chunk', type=int, help='points per chunk of the JAX pass')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--devices', type=int, help='virtual CPU devices (set before JAX starts)')
  p.add_argument('--mesh', help='data,fsdp,tensor (default: all devices on data)')
  p.add_argument('--skip-sklearn', action='store_true', help='JAX only (sizes sklearn cannot do)')
  p.add_argument('--json', help='also write the figures here')
  return p


def best_time(fn, repeats: int) -> float:
  fn()  # warm-up: compilation, caches
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  import jax
  if args.devices:
    jax.config.update('jax_num_cpu_devices', args.devices)
  from ove_jax import kmeans

  n_dev = jax.device_count()
  shape = tuple(int(v) for v in args.mesh.split(',')) if args.mesh else (n_dev, 1, 1)
  if len(shape) != 3 or int(np.prod(shape)) != n_dev:
    print(f'ove-bench-kmeans: error: --mesh {args.mesh}: need three sizes whose product is the '
          f'{n_dev} devices', file=sys.stderr)
    return 2
  mesh = jax.make_mesh(shape, ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(args.n, args.d)).astype(np.float32)
  centres = x[rng.choice(args.n, args.k, replace=False)]
  pairs = args.n * args.k
  figures = {'n': args.n, 'd': args.d, 'k': args.k, 'devices': n_dev, 'mesh': list(shape),
             'platform': jax.devices()[0].platform}

  with jax.set_mesh(mesh):
    # The internals of kmeans.fit, so the timing is of one pass on data already on the devices.
    lay = kmeans._layout(args.n, args.k, args.chunk)  # pylint: disable=protected-access
    xs, valid, _ = kmeans._put_points(x, lay)  # pylint: disable=protected-access
    cs = kmeans._put_centres(centres, lay)  # pylint: disable=protected-access
    run = lambda: jax.block_until_ready(
        kmeans._jit_pass(xs, valid, cs, lay, False))  # pylint: disable=protected-access
    t_jax = best_time(run, args.repeats)
  figures['jax_seconds'] = t_jax
  figures['jax_pairs_per_second'] = pairs / t_jax
  figures['jax_chunk'] = lay.rows * lay.devices
  print(f'N={args.n} D={args.d} k={args.k} on {n_dev} {figures["platform"]} device(s), mesh '
        f'{shape}, chunk {figures["jax_chunk"]}')
  print(f'  jax Lloyd pass (assign + sums)  {t_jax * 1e3:9.1f} ms   '
        f'{pairs / t_jax:.3e} points x centres / s')

  if not args.skip_sklearn:
    from sklearn.cluster import KMeans
    with warnings.catch_warnings():  # fitted on the centres themselves, only to make predict()
      warnings.simplefilter('ignore')
      km = KMeans(args.k, init=centres, n_init=1, max_iter=1).fit(centres)
    km.cluster_centers_ = centres.copy()  # the same centres as the JAX pass
    t_sk = best_time(lambda: km.predict(x), args.repeats)
    figures['sklearn_seconds'] = t_sk
    figures['sklearn_pairs_per_second'] = pairs / t_sk
    figures['jax_over_sklearn'] = t_sk / t_jax
    print(f'  sklearn predict (assign)        {t_sk * 1e3:9.1f} ms   '
          f'{pairs / t_sk:.3e} points x centres / s')
    print(f'  jax / sklearn throughput: {t_sk / t_jax:.2f}x')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(figures, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
