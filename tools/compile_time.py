"""Compile time of an encoder training step, blocks scanned against unrolled.

Lowers and compiles (nothing runs, nothing is allocated: abstract parameters and inputs) the
forward and backward pass of a preset's encoder on one row of `--tokens` tokens, a loss on the
pooled embedding, once per block layout, and prints the seconds spent tracing + lowering and
compiling (wall and process CPU seconds: the machine may be shared), and XLA's temporary memory
of the step, for each:

  python tools/compile_time.py --preset large
  ove-compile-time --preset huge --tokens 2048 --remat dots --layouts scanned

With `scan_layers` the blocks are one `nnx.scan` over stacked parameters, so XLA sees one block
whatever the depth; unrolled, it sees `depth` copies. The last line is one JSON object with
every figure.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Sequence

from ove_jax import cli

LAYOUTS = ('scanned', 'unrolled')


def compile_step(cfg, tokens: int, batch: int) -> dict:
  """Seconds to lower and to compile one forward + backward step of `cfg`, and XLA's plan."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from ove_jax.models import Encoder, cpu_layouts

  # A persistent compilation cache (JAX_COMPILATION_CACHE_DIR) would be timed as a compile.
  jax.config.update('jax_enable_compilation_cache', False)
  abstract = nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  patches = jax.ShapeDtypeStruct((batch, tokens, cfg.patch_dim), jnp.float32)
  positions = jax.ShapeDtypeStruct((batch, tokens, 3), jnp.int32)

  def step(state, patches, positions):
    def loss(state):
      out = nnx.merge(graphdef, state)(patches, positions)
      return jnp.mean(out['pooled'].astype(jnp.float32) ** 2)

    return jax.value_and_grad(loss)(state)

  start, start_cpu = time.perf_counter(), time.process_time()
  # The accelerators' program (plain autodiff), as ove-aot-memory plans it, not the CPU
  # backend's own backward layouts (models/cpu_layouts.py).
  with cpu_layouts.autodiff_layouts():
    lowered = jax.jit(step).lower(state, patches, positions)
  lowered_at, lowered_cpu = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  done, done_cpu = time.perf_counter(), time.process_time()
  memory = compiled.memory_analysis()
  return {
    'lower_s': round(lowered_at - start, 2),
    'compile_s': round(done - lowered_at, 2),
    'lower_cpu_s': round(lowered_cpu - start_cpu, 2),
    'compile_cpu_s': round(done_cpu - lowered_cpu, 2),
    'temp_bytes': int(getattr(memory, 'temp_size_in_bytes', 0) or 0),
  }


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(
    prog='ove-compile-time', description=__doc__.split('\n\n')[0], allow_abbrev=False
  )
  parser.add_argument(
    '--preset',
    default='large',
    help='encoder preset: tiny, small, base, large or huge (default large)',
  )
  parser.add_argument('--tokens', type=int, default=1024, help='tokens per row (default 1024)')
  parser.add_argument('--batch', type=int, default=1, help='rows per step (default 1)')
  cli.add_dtype_flag(parser, 'bfloat16', 'compute dtype (default bfloat16)')
  parser.add_argument(
    '--remat',
    default='full',
    choices=('none', 'full', 'dots'),
    help='per-block rematerialisation (default full)',
  )
  parser.add_argument(
    '--layouts',
    default=','.join(LAYOUTS),
    help='comma-separated block layouts to compile: scanned, unrolled (default both)',
  )
  args = parser.parse_args(argv)
  layouts = [s.strip() for s in args.layouts.split(',') if s.strip()]
  bad = [s for s in layouts if s not in LAYOUTS]
  if bad or not layouts:
    parser.error(f'--layouts={args.layouts}: choose from {",".join(LAYOUTS)}')
  if args.tokens < 1 or args.batch < 1:
    parser.error(f'--tokens={args.tokens} --batch={args.batch}: both must be 1 or more')

  from ove_jax.models import PRESETS, EncoderConfig

  if args.preset not in PRESETS:
    parser.error(f'--preset={args.preset}: choose one of {", ".join(PRESETS)}')
  base = EncoderConfig.preset(args.preset, dtype=args.dtype, remat=args.remat)
  print(
    f'{args.preset}: width {base.width}, depth {base.depth}; {args.batch} x {args.tokens} '
    f'tokens, {args.dtype}, remat {args.remat}; forward + backward'
  )
  result = {
    'preset': args.preset,
    'depth': base.depth,
    'tokens': args.tokens,
    'batch': args.batch,
    'dtype': args.dtype,
    'remat': args.remat,
  }
  for layout in layouts:
    cfg = dataclasses.replace(base, scan_layers=layout == 'scanned')
    r = compile_step(cfg, args.tokens, args.batch)
    result[layout] = r
    print(
      f'  {layout:9s} lower {r["lower_s"]:7.2f} s ({r["lower_cpu_s"]:.2f} s CPU)  compile '
      f'{r["compile_s"]:7.2f} s ({r["compile_cpu_s"]:.2f} s CPU)  temporaries '
      f'{r["temp_bytes"] / 2**30:.2f} GiB',
      flush=True,
    )
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
