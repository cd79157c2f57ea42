"""The matrix products of the encoder's training step in JAX (XLA) and in PyTorch, side by side.

`ove-bench-encoder` compares whole steps; this says how much of a difference between them is the
two sides' matrix-multiply libraries alone (XLA:CPU's own GEMM against PyTorch's BLAS on a CPU;
cuBLAS through each on a GPU). For each of `--widths`, every product of one block's step on
`--tokens` tokens (`benchmarks.step_matmul_shapes`: each dense layer's forward, input gradient
and weight gradient, one head's attention logits and values, each timed as a plain row-major
product of those sizes: the step's transposed operands are not modelled), after the square
product of the encoder bench's matmul peak: GFLOP/s of the fastest of `--repeats` runs after a
warm-up on each side, and PyTorch / JAX (above 1: PyTorch's library is faster on that shape).
The square product is 2048 on a CPU, 8192 on an accelerator (`metrics.peak_matmul_size`).
On a CPU with an MKL at hand (`ove_jax.models.cpu_blas`, float32) each product is also timed
through `cpu_blas.matmul`, the route a one-device run's dense layers take, beside PyTorch's.

  python tools/bench_matmul.py                        # widths 256,512,768,1024; float32
  python tools/bench_matmul.py --widths 768 --repeats 20 --json /tmp/matmul.json

It applies `ove_jax.host_runtime.configure()` before JAX starts, as `ove-bench-encoder` does,
so both see the same XLA flags. Installed as the console script `ove-bench-matmul`.
"""

from __future__ import annotations

import argparse
import sys

from ove_jax import cli


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog='ove-bench-matmul', description=__doc__.split('\n\n')[0])
  from ove_jax import benchmarks  # pylint: disable=g-import-not-at-top

  p.add_argument(
    '--widths',
    type=benchmarks.width_list,
    default='256,512,768,1024',
    help=f'model widths, comma-separated, each a multiple of the head size '
    f'{benchmarks.HEAD_DIM} (the attention rows are one head of that size)',
  )
  p.add_argument('--tokens', type=cli.positive, default=2048, help='tokens of the step (K)')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument(
    '--repeats', type=cli.positive, default=10, help='timed runs per product; the best is kept'
  )
  cli.add_output_flag(p)
  return p


def main(argv=None) -> int:
  from ove_jax import host_runtime  # pylint: disable=g-import-not-at-top

  tuning = host_runtime.describe(host_runtime.configure())
  parser = build_parser()
  args = parser.parse_args(argv)
  if not args.widths:
    parser.error('--widths: give at least one width, e.g. 256,768')

  import jax  # pylint: disable=g-import-not-at-top

  from ove_jax import benchmarks, metrics, torch_comparison  # pylint: disable=g-import-not-at-top
  from ove_jax.models import cpu_blas  # pylint: disable=g-import-not-at-top

  unavailable = torch_comparison.torch_unavailable(False)
  if unavailable:
    print(f'ove-bench-matmul: PyTorch {unavailable}', file=sys.stderr)
    return 2
  square = metrics.peak_matmul_size()  # the encoder bench's matmul peak product
  shapes = [(f'square {square}', square, square, square)]
  for width in args.widths:
    shapes += [
      (f'width {width}: {name}', *mkn)
      for name, *mkn in benchmarks.step_matmul_shapes(width, args.tokens)
    ]
  try:
    products = cpu_blas.describe()
  except cpu_blas.BlasError as e:
    print(f'ove-bench-matmul: {e}', file=sys.stderr)
    return 2
  print(f'{tuning}; {products}')
  # The MKL route the encoder's dense layers take on a one-device CPU (float32 only).
  blas = args.dtype == 'float32' and jax.default_backend() == 'cpu' and cpu_blas.available()
  rows = []
  blas_head = (
    (' | JAX via cpu_blas GFLOP/s | PyTorch / cpu_blas', '|---:|---:') if blas else ('', '')
  )
  print(f'| product | m x k x n | JAX GFLOP/s | PyTorch GFLOP/s | PyTorch / JAX{blas_head[0]} |')
  print(f'|---|---|---:|---:|---:{blas_head[1]}|')
  for name, m, k, n in shapes:
    jax_flops = metrics.matmul_flops(m, k, n, args.dtype, args.repeats)
    torch_flops = torch_comparison.torch_matmul_flops(m, k, n, args.dtype, args.repeats)
    row = dict(product=name, m=m, k=k, n=n, jax=jax_flops, torch=torch_flops)
    cells = f'| {name} | {m} x {k} x {n} | {jax_flops / 1e9:.1f} | {torch_flops / 1e9:.1f} | '
    cells += f'{torch_flops / jax_flops:.2f} |'
    if blas:
      row['cpu_blas'] = metrics.matmul_flops(
        m, k, n, args.dtype, args.repeats, product=cpu_blas.matmul
      )
      cells += f' {row["cpu_blas"] / 1e9:.1f} | {torch_flops / row["cpu_blas"]:.2f} |'
    rows.append(row)
    print(cells, flush=True)
  if args.json:
    cli.write_output_json(
      args.json, {'command': ' '.join(sys.argv), 'tuning': f'{tuning}; {products}', 'rows': rows}
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
