"""Encoder speed: sparse vs dense tokens, and our JAX encoder vs our PyTorch port, in one run.

What it measures, on a 64-frame 224x224 clip (14-pixel patches, 16x16 = 256 per frame, 16,384 in
all), one jitted training step of the encoder alone: forward, loss = sum of squares of the pooled
output, and the gradient for every parameter, timed with `jax.block_until_ready` after compiling
(compile time is reported on its own), median of `--repeats` runs after `--warmup` runs (more,
up to 4, until two runs in a row fault in no fresh memory: `benchmarks.paired_runs`).

  1. sparse vs dense, on `--preset` (default 'micro'): K = `--budget` patches drawn at random
     from the clip with their (t, h, w) positions, against all frames x 256 patches (`--repeats`
     sparse steps, as many dense ones, then the sparse ones again, so a drift in the machine's
     speed shows in both); printed beside the analytic FLOP ratio (aim: measured speedup >= 90%
     of it);
  2. JAX vs PyTorch, at each of `--widths` (default 256, 512, 768, 1024; head_dim 64, MLP 4x,
     `--compare-depth` blocks): the same model exported with `save_pytorch` and loaded in our
     PyTorch port, run the release's way: eager attention (the release's only CPU path) and the
     K patches packed into K / 256 frames of pixels with their `visible_indices` on the clip's
     grid, as the release's trainer feeds it. The two steps alternate (`--repeats` pairs), so a
     change in the machine's load hits both; speed = PyTorch time / JAX time per pair (aim:
     >= 1 at every width, target 1.5), with the same ratio of CPU time. Pooled outputs, losses
     and every gradient are compared, so we know the two compute the same thing.

Printed beside the times: the analytic FLOPs (`encoder_flops`), achieved GFLOP/s and their share
of this machine's matmul peak (`metrics.matmul_peak_flops`: one large jitted matmul, the fastest
of 5; the same product in PyTorch beside it when the comparison runs), and CPU time per step,
user + system, each the median over the timed runs as the wall time is (on CPU a large system
share is page faults, not arithmetic), with the mean page faults per run. The sparse speedup
is given by wall time, by user CPU time and by user + system CPU time, each with its verdict:
wall time counts the other work on a shared machine, system time the allocator's page faults,
user time the arithmetic. A markdown summary at the end is what docs/benchmarks.md records.

Commands:

  # CPU (the default): micro sparse vs dense, and JAX vs PyTorch at widths 256-1024.
  ove-bench-encoder
  ove-bench-encoder --compare-depth 1 --repeats 3 --json /tmp/bench_encoder.json
  ove-bench-encoder --widths 256,512 --skip-dense         # only part of the comparison

  # GPU / TPU: the real sizes, in bfloat16, with a flash-attention kernel.
  ove-bench-encoder --preset base --widths= --dtype bfloat16 --attention cudnn
  ove-bench-encoder --preset large --dtype bfloat16 --attention splash --skip-torch

The command applies `ove_jax.host_runtime.configure()` before JAX starts, as `ove-train` does:
XLA:CPU allocates a step's temporaries afresh on every run, and glibc's default returns large
blocks to the kernel, so every step page-faulted its temporaries in again (the dense step spent
more system time than user time); the malloc settings keep freed memory in the process. It also
turns off XLA:CPU's YNNPACK reduce fusions (slower than XLA's own loops for the softmax). A flag
already named in XLA_FLAGS, or malloc settings in GLIBC_TUNABLES / MALLOC_*, are left as the
user set them; OVE_HOST_TUNING=0 turns it all off. What was applied is printed and recorded.

Why the CPU default is 'micro' (width 64, depth 2, one 64-wide head, MLP 256) and not 'tiny':
with the xla attention the dense step materialises B x heads x L x L float32 logits per layer,
and keeps several of them per layer for the backward pass. At L = 16,384 'tiny' (two heads)
plans 17.6 GB of temporaries and in fact needs more than 24 GB (XLA:CPU's plan undercounts with
several heads: 4.5 GB planned, 7.4 GB peak at L = 8192), so it is killed on a 24 GB machine;
'micro' plans 8.8 GB and peaks at about 10 GB. Its head_dim is 64 as in every preset, so
attention is shaped as in the real model. 'base' / 'large' / 'huge' are for GPU and TPU (a CPU
step at those sizes takes minutes). Any preset's sizes can be changed with --width, --depth,
--heads and --mlp-dim.

Before the dense step runs, its compiled memory plan is checked against the memory available
(host RAM on CPU, with a 2x margin for that undercount; device memory elsewhere); if it would
not fit, the dense case is skipped with a message rather than the process being killed.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys

import jax
import jax.numpy as jnp

from ove_jax import benchmarks as bench
from ove_jax import cli, host_runtime, metrics, torch_comparison
from ove_jax.models import cpu_blas
from ove_jax.models import encoder as enc
from ove_jax.models.attention import IMPLEMENTATIONS


def build_parser() -> argparse.ArgumentParser:
  parser = cli.doc_parser('ove-bench-encoder', __doc__)
  presets = list(bench.BENCH_PRESETS) + list(enc.PRESETS)
  parser.add_argument(
    '--preset',
    default='micro',
    choices=presets,
    help='model of the sparse vs dense case (default micro, sized for a CPU; '
    'base/large/huge are for GPU/TPU)',
  )
  parser.add_argument('--width', type=int, help='override the preset width')
  parser.add_argument('--depth', type=int, help='override the preset depth')
  parser.add_argument('--heads', type=int, help='override the preset number of heads')
  parser.add_argument('--mlp-dim', type=int, help='override the preset MLP width')
  parser.add_argument(
    '--widths',
    type=bench.width_list,
    default=','.join(map(str, bench.COMPARE_WIDTHS)),
    help='widths of the JAX vs PyTorch comparison, comma-separated (head_dim '
    "64, MLP 4x width; default %(default)s); empty: the preset's sizes",
  )
  parser.add_argument(
    '--compare-depth',
    type=int,
    default=2,
    help='blocks of the models in the JAX vs PyTorch comparison (default 2)',
  )
  parser.add_argument('--frames', type=int, default=64, help='frames in the clip (default 64)')
  parser.add_argument(
    '--budget',
    type=int,
    default=2048,
    help='K, patches kept in the sparse case (default 2048; a multiple of 256, '
    'the PyTorch step packs them into K / 256 frames)',
  )
  parser.add_argument('--batch', type=int, default=1, help='clips per step (default 1)')
  cli.add_dtype_flag(parser, 'float32', 'compute dtype; parameters stay float32')
  parser.add_argument(
    '--attention',
    default='xla',
    choices=IMPLEMENTATIONS,
    help='attention implementation (default xla)',
  )
  parser.add_argument('--repeats', type=int, default=5, help='timed runs; the median is reported')
  parser.add_argument('--warmup', type=int, default=1, help='untimed runs, at least (see above)')
  parser.add_argument('--seed', type=int, default=0, help="the model's init and the input clip")
  parser.add_argument('--skip-dense', action='store_true', help='no sparse vs dense case')
  parser.add_argument('--skip-torch', action='store_true', help='no PyTorch comparison')
  cli.add_output_flag(parser, what='the results')
  return parser


def print_row(name: str, result: dict) -> None:
  fmt = bench.format_seconds
  if 'skipped' in result:
    print(f'{name}: SKIPPED, {result["skipped"]}', flush=True)
    return
  extra = ''
  if jax.default_backend() == 'cpu':
    cpu = bench.format_cpu_seconds
    extra += (
      f', CPU per step (medians): user {cpu(result["user_s"])} s + sys '
      f'{cpu(result["sys_s"])} s, {result["page_faults"]:.0f} page faults (mean)'
    )
  if 'warmup_rounds' in result:
    extra += f', after {result["warmup_rounds"]} warm-up rounds'
  if 'compile_s' in result:
    extra += f', compile {result["compile_s"]:.1f} s'
  if 'planned_temp_gb' in result:
    extra += f', XLA temporaries {result["planned_temp_gb"]:.2f} GB'
  if 'peak_rss_gb' in result:
    extra += f', peak RSS so far {result["peak_rss_gb"]:.2f} GB'
  print(
    f'{name}: L={result["tokens"]}, fwd+bwd {fmt(result["median_s"])} (median; runs '
    f'{", ".join(fmt(t) for t in result["times_s"])}), {result["flops"] / 1e9:.1f} GFLOP, '
    f'{result["flops_per_s"] / 1e9:.1f} GFLOP/s = {100 * result["peak_fraction"]:.0f}% '
    f'of peak{extra}',
    flush=True,
  )


def main(argv=None):
  # Before JAX starts: the XLA flags and malloc settings that take XLA:CPU's overheads out.
  tuning = host_runtime.describe(host_runtime.configure())
  parser = build_parser()
  args = parser.parse_args(argv)
  argv = sys.argv[1:] if argv is None else list(argv)

  error = bench.attention_error(args.attention)
  if error:
    parser.error(error)
  try:
    cfg = bench.encoder_config(
      args.preset, **cli.keywords(args, 'width', 'depth', 'heads', 'mlp_dim', 'dtype', 'attention')
    )
    compare_cfgs = [
      bench.encoder_config(
        'tiny',
        width=w,
        depth=args.compare_depth,
        heads=w // bench.HEAD_DIM,
        mlp_dim=4 * w,
        **cli.keywords(args, 'dtype', 'attention'),
      )
      for w in args.widths
    ] or [cfg]
    # Where the dense layers' float32 products go on a one-device CPU (a bad OVE_CPU_BLAS: here).
    tuning = f'{tuning}; {cpu_blas.describe()}'
  except ValueError as e:
    parser.error(str(e))
  n_all = args.frames * bench.PATCHES_PER_FRAME
  if not 0 < args.budget <= n_all:
    parser.error(
      f'--budget {args.budget} must be in [1, {n_all}] ({args.frames} frames x '
      f'{bench.PATCHES_PER_FRAME} patches)'
    )
  if min(args.repeats, args.batch, args.frames, args.compare_depth) < 1 or args.warmup < 0:
    parser.error(
      '--repeats, --batch, --frames and --compare-depth must be positive, --warmup not negative'
    )
  torch_note = torch_comparison.torch_unavailable(args.skip_torch)
  if torch_note is None and args.budget % bench.PATCHES_PER_FRAME:
    parser.error(
      f'--budget {args.budget}: the PyTorch step packs the patches into whole frames, '
      f'so use a multiple of {bench.PATCHES_PER_FRAME} (or --skip-torch)'
    )

  command = ' '.join(['ove-bench-encoder', shlex.join(argv)]).strip()
  info = bench.device_info()
  env_text = bench.env_settings(info)
  b, k = args.batch, args.budget
  print(f'command: {command}')
  print(
    f'device: {info["device_kind"]} ({info["backend"]}, {info["num_devices"]} device(s)), '
    f'{info["cpu_count"]} CPUs{", " + info["cpu_model"] if "cpu_model" in info else ""}; '
    f'jax {info["jax"]}{"; env " + env_text if env_text else ""}'
  )
  print(tuning)
  print(
    f'input: batch {b}, {args.frames} frames of {bench.IMAGE_SIZE}x{bench.IMAGE_SIZE} '
    f'({n_all} patches); sparse K={k}; median of {args.repeats} after at least '
    f'{args.warmup} warm-up'
  )
  sys.stdout.flush()

  peak = metrics.matmul_peak_flops(cfg.dtype)
  print(f'matmul peak (measured, {cfg.dtype}): {peak / 1e9:.1f} GFLOP/s', flush=True)
  torch_peak = None
  if not torch_note and compare_cfgs:
    torch_peak = torch_comparison.torch_matmul_peak_flops(cfg.dtype)
    print(
      f'the same matmul in PyTorch: {torch_peak / 1e9:.1f} GFLOP/s ({torch_peak / peak:.2f}x JAX)',
      flush=True,
    )

  # -- sparse vs dense, on the preset ------------------------------------------------------------
  rows, dense_note = {}, 'skipped (--skip-dense)'
  if not args.skip_dense:
    print(
      f'sparse vs dense: {args.preset} width={cfg.width} depth={cfg.depth} '
      f'heads={cfg.num_heads} mlp={cfg.mlp_dim} ({enc.num_params(cfg) / 1e6:.2f}M '
      f'parameters), dtype={cfg.dtype}, attention={cfg.attention}',
      flush=True,
    )
    dense_note = None
    inputs = bench.clip_inputs(cfg, b, args.frames, k, args.seed)
    step, _, params = bench.make_jax_step(enc.create_encoder(cfg, seed=args.seed))
    runs = {}
    for name, (x, pos), tokens in (('JAX sparse', inputs[1], k), ('JAX dense', inputs[0], n_all)):
      result, run = bench.compile_jax(
        step, params, jnp.asarray(x), jnp.asarray(pos), check_memory=name == 'JAX dense'
      )
      rows[name] = {**result, 'tokens': tokens}
      if run is None:
        dense_note = f'skipped: {result["skipped"]}'
      else:
        runs[name] = run
    # The sparse step is timed before and after the dense one, so a drift in the machine's speed
    # over the dense block shows in both; each block runs back to back, as a training loop does
    # (alternated step by step, every sparse step would start right after a 4-GB dense one).
    order = ['JAX sparse', 'JAX dense', 'JAX sparse'] if 'JAX dense' in runs else ['JAX sparse']
    blocks = {name: [] for name in runs}
    for name in order:
      blocks[name].append(bench.time_runs(runs[name], warmup=args.warmup, repeats=args.repeats))
    timing = {name: bench.merge_runs(parts) for name, parts in blocks.items()}
    for name, row in rows.items():
      rows[name] = bench.add_rates({**row, **timing.get(name, {})}, cfg, b, row['tokens'], peak)
      print_row(name, rows[name])
    del runs, timing, inputs, step, params
    gc.collect()
  summary = bench.sparse_speedup(rows)
  if summary:
    print('sparse speedup (dense / sparse):\n' + '\n'.join(bench.speedup_verdicts(summary)))

  # -- JAX vs PyTorch, per width -----------------------------------------------------------------
  comparisons = []
  for ccfg in [] if torch_note else compare_cfgs:
    c = torch_comparison.compare_with_torch(
      ccfg,
      batch=b,
      budget=k,
      peak=peak,
      **cli.keywords(args, 'frames', 'seed', 'warmup', 'repeats'),
    )
    comparisons.append(c)
    for name, row in (('JAX', c['jax']), ('PyTorch', c['torch'])):
      print_row(f'width {c["width"]} depth {c["depth"]} {name}', row)
    print(
      f'width {c["width"]}: speed vs PyTorch {c["speed"]:.2f}x [{c["speed_min"]:.2f}, '
      f'{c["speed_max"]:.2f}], by CPU time {c["speed_cpu"]:.2f}x; agreement: pooled '
      f'{c["check"]["pooled_max_rel_diff"]:.1e}, gradients '
      f'{c["check"]["grad_max_rel_diff"]:.1e} ({c["check"]["grad_worst_key"]}) -> '
      f'{"agree" if c["check"]["agree"] else "MISMATCH"}',
      flush=True,
    )
    gc.collect()

  print(
    '\n'.join(
      bench.markdown_summary(
        bench.BenchSetting(
          command=command,
          info=info,
          tuning=tuning,
          preset=args.preset,
          cfg=cfg,
          batch=b,
          frames=args.frames,
          repeats=args.repeats,
          peak=peak,
          torch_peak=torch_peak,
        ),
        rows,
        summary,
        comparisons,
        {'dense': dense_note, 'torch': torch_note},
      )
    ),
    flush=True,
  )

  if args.json:
    report = {
      'command': command,
      'device': info,
      'args': vars(args),
      'host_tuning': tuning,
      'config': {
        'preset': args.preset,
        'width': cfg.width,
        'depth': cfg.depth,
        'num_heads': cfg.num_heads,
        'mlp_dim': cfg.mlp_dim,
        'num_params': enc.num_params(cfg),
        'dtype': cfg.dtype,
        'attention': cfg.attention,
      },
      'matmul_peak_flops_per_s': peak,
      'torch_matmul_peak_flops_per_s': torch_peak,
      'results': rows,
      'summary': summary,
      'comparisons': comparisons,
    }
    cli.write_output_json(args.json, report)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
