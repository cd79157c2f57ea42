"""K-means backends on the same data in one run: faiss, scikit-learn and the sharded JAX k-means.

Every backend starts from the same k-means++ centres and runs the same number of Lloyd updates;
the figures are its assignment throughput (points assigned to their nearest of k centres per
second, best of `--repeats` after a warm-up that also compiles JAX), its fit time and its final
objective (sum of squared distances, on the sphere with --spherical), scored by one function
(ove_jax.kmeans_backends.objective) for all. The data: Gaussian blobs (`--n` points around
`--clusters` true centres in `--d` dimensions), or the rows of a .npy file (`--features`).

  python tools/bench_kmeans_backends.py                       # N 100000, D 64, k 1000
  python tools/bench_kmeans_backends.py --spherical --features feats.npy --k 20000
  python tools/bench_kmeans_backends.py --backends jax,faiss --n 2000000 --k 100000  # a GPU host

Installed as the console script `ove-bench-kmeans-backends`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

from ove_jax import cli


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog='ove-bench-kmeans-backends', description=__doc__.split('\n\n')[0])
  p.add_argument('--n', type=cli.positive, default=100_000, help='points (blobs)')
  p.add_argument('--d', type=cli.positive, default=64, help='feature dimension (blobs)')
  p.add_argument('--clusters', type=cli.positive, default=1000, help='true centres of the blobs')
  p.add_argument('--features', help='a .npy file of [N, D] points instead of blobs')
  p.add_argument('--k', type=cli.positive, default=1000, help='centres to fit (at most the points)')
  p.add_argument('--iters', type=cli.positive, default=10, help='Lloyd updates of every backend')
  p.add_argument('--spherical', action='store_true', help='cosine k-means on unit vectors')
  p.add_argument(
    '--backends', default='jax,sklearn,faiss', help='comma-separated, of jax, sklearn, faiss'
  )
  p.add_argument(
    '--repeats', type=cli.positive, default=3, help='timed assignment passes (best counts)'
  )
  p.add_argument('--seed', type=int, default=0, help='of the blobs and the k-means++ centres')
  cli.add_output_flag(p)
  return p


def _error(message: str) -> int:
  print(f'ove-bench-kmeans-backends: error: {message}', file=sys.stderr)
  return 2


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from ove_jax import kmeans_backends

  backends = [b.strip() for b in args.backends.split(',') if b.strip()]
  unknown = sorted(set(backends) - set(kmeans_backends.BACKENDS))
  if unknown or not backends:
    return _error(
      f'--backends {unknown or repr(args.backends)}: choose one or more of '
      f'{", ".join(kmeans_backends.BACKENDS)}'
    )
  if not args.features and args.k > args.n:
    return _error(f'--k {args.k}: more centres than the {args.n} points (--n); lower --k')
  if args.features:
    try:
      x = np.load(args.features, mmap_mode='r', allow_pickle=False)
      problem = None if x.ndim == 2 and x.size else f'shape {x.shape}; expected [N, D]'
    except (OSError, ValueError) as e:
      problem = f'not a .npy array of [N, D] points ({e})'
    if not problem and args.k > len(x):
      problem = f'{len(x)} points, fewer than --k {args.k} centres; lower --k'
    if problem:
      return _error(f'--features {args.features}: {problem}')
    x = np.asarray(x, np.float32)
  else:
    rng = np.random.default_rng(args.seed)
    true = rng.normal(size=(args.clusters, args.d)).astype(np.float32) * 2
    x = true[rng.integers(args.clusters, size=args.n)] + rng.normal(size=(args.n, args.d))
    x = x.astype(np.float32)
  rows = kmeans_backends.bench(
    x,
    args.k,
    backends=backends,
    iters=args.iters,
    spherical=args.spherical,
    seed=args.seed,
    repeats=args.repeats,
  )
  print(
    f'N={len(x)} D={x.shape[1]} k={args.k} iters={args.iters} '
    f'{"spherical" if args.spherical else "euclidean"}'
  )
  print(f'  {"backend":8s} {"assign points/s":>16s} {"fit s":>9s} {"objective":>16s}')
  for r in rows:
    print(f'  {r.backend:8s} {r.assign_points_per_s:16.4g} {r.fit_s:9.2f} {r.objective:16.8g}')
  best = min(r.objective for r in rows)
  spread = 100 * (max(r.objective for r in rows) / best - 1)
  print(f'  objectives within {spread:.3f}% of the best')
  if args.json:
    cli.write_output_json(
      args.json,
      {
        'n': len(x),
        'd': x.shape[1],
        'k': args.k,
        'iters': args.iters,
        'spherical': args.spherical,
        'rows': [dataclasses.asdict(r) for r in rows],
      },
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
