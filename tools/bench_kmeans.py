"""K-means assignment throughput: the sharded JAX pass (ove_jax.kmeans) vs scikit-learn, one run.

Both score the same N points against the same k centres; the figure is points x centres per
second, best of `--repeats` timed runs after one warm-up (the JAX pass is compiled there):

  sklearn  `KMeans.predict`: assignment only (its Cython / BLAS Lloyd E-step, threaded)
  jax      one Lloyd pass of ove_jax.kmeans: assignment *and* the per-cluster sums and counts
           (the M-step), chunked and sharded over the mesh; so it does a little more work

  ove-bench-kmeans                            # N 20000, D 64, k 1000, 1 device
  ove-bench-kmeans --devices 8 --mesh 2,4,1   # 8 virtual CPU devices
  ove-bench-kmeans --n 1000000 --k 100000 --d 768 --skip-sklearn   # on a GPU/TPU

The measurement is `ove_jax.kmeans_backends.kmeans_throughput`.
"""

from __future__ import annotations

import argparse
import sys

from ove_jax import cli


def build_parser() -> argparse.ArgumentParser:
  p = cli.doc_parser('ove-bench-kmeans', __doc__)
  p.add_argument('--n', type=cli.positive, default=20_000, help='points')
  p.add_argument('--d', type=cli.positive, default=64, help='feature dimension')
  p.add_argument('--k', type=cli.positive, default=1000, help='centres (at most --n)')
  p.add_argument('--chunk', type=cli.positive, help='points per chunk of the JAX pass')
  p.add_argument('--repeats', type=cli.positive, default=3, help='timed runs; the best is reported')
  p.add_argument('--devices', type=cli.positive, help='virtual CPU devices (set before JAX starts)')
  p.add_argument('--mesh', help='data,fsdp,tensor (default: all devices on data)')
  p.add_argument('--skip-sklearn', action='store_true', help='JAX only (sizes sklearn cannot do)')
  cli.add_output_flag(p)
  return p


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.k > args.n:
    parser.error(f'--k {args.k}: more centres than the {args.n} points (--n); lower --k')
  from ove_jax import distributed

  if args.devices:
    distributed.use_cpu_devices(args.devices)
  import jax

  from ove_jax import kmeans_backends, sharding

  try:
    mesh = sharding.make_mesh(sharding.parse_mesh(args.mesh) if args.mesh else {'data': -1})
  except ValueError as e:
    print(f'ove-bench-kmeans: error: --mesh {args.mesh}: {e}', file=sys.stderr)
    return 2
  with jax.set_mesh(mesh):
    figures = kmeans_backends.kmeans_throughput(
      args.n, args.d, args.k, chunk=args.chunk, repeats=args.repeats, sklearn=not args.skip_sklearn
    )
  if args.json:
    cli.write_output_json(args.json, figures)
  return 0


if __name__ == '__main__':
  sys.exit(main())
