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

  python tools/bench_matmul.py                        # widths 256,512,768,1024; float32
  python tools/bench_matmul.py --widths 768 --repeats 20 --json /tmp/matmul.json

It applies `ove_jax.host_runtime.configure()` before JAX starts, as `ove-bench-encoder` does,
so both see the same XLA flags. Installed as the console script `ove-bench-matmul`.
"""

from __future__ import annotations

import argparse
import json
import sys

from ove_jax import cli


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog='ove-bench-matmul', description=__doc__.split('\n\n')[0])
  p.add_argument('--widths', default='256,512,768,1024', help='model widths, comma-separated')
  p.add_argument('--tokens', type=int, default=2048, help='tokens of the step (K)')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--repeats', type=int, default=10, help='timed runs per product; the best is kept')
  p.add_argument('--json', help='also write the figures here')
  return p


def main(argv=None) -> int:
  from ove_jax import host_runtime  # pylint: disable=g-import-not-at-top

  tuning = host_runtime.describe(host_runtime.configure())
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    widths = [int(w) for w in args.widths.split(',') if w.strip()]
  except ValueError:
    parser.error(f'--widths {args.widths!r}: give comma-separated integers, e.g. 256,768')
  if not widths or min(widths) < 1 or args.tokens < 1 or args.repeats < 1:
    parser.error('--widths, --tokens and --repeats must be positive')

  from ove_jax import benchmarks, metrics, torch_comparison  # pylint: disable=g-import-not-at-top

  unavailable = torch_comparison.torch_unavailable(False)
  if unavailable:
    print(f'ove-bench-matmul: PyTorch {unavailable}', file=sys.stderr)
    return 2
  print(tuning)
  square = metrics.peak_matmul_size()  # the encoder bench's matmul peak product
  shapes = [(f'square {square}', square, square, square)]
  for width in widths:
    shapes += [
      (f'width {width}: {name}', *mkn)
      for name, *mkn in benchmarks.step_matmul_shapes(width, args.tokens)
    ]
  rows = []
  print('| product | m x k x n | JAX GFLOP/s | PyTorch GFLOP/s | PyTorch / JAX |')
  print('|---|---|---:|---:|---:|')
  for name, m, k, n in shapes:
    jax_flops = metrics.matmul_flops(m, k, n, args.dtype, args.repeats)
    torch_flops = torch_comparison.torch_matmul_flops(m, k, n, args.dtype, args.repeats)
    rows.append(dict(product=name, m=m, k=k, n=n, jax=jax_flops, torch=torch_flops))
    print(
      f'| {name} | {m} x {k} x {n} | {jax_flops / 1e9:.1f} | {torch_flops / 1e9:.1f} | '
      f'{torch_flops / jax_flops:.2f} |',
      flush=True,
    )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'command': ' '.join(sys.argv), 'tuning': tuning, 'rows': rows}, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
