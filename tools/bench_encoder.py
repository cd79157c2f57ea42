"""Encoder speed: sparse vs dense tokens, and our JAX encoder vs our PyTorch port, in one run.

What it measures, on a 64-frame 224x224 clip (14-pixel patches, 16x16 = 256 per frame, 16,384 in
all), one jitted training step of the encoder alone: forward, loss = sum of squares of the pooled
output, and the gradient for every parameter, timed with `jax.block_until_ready` after compiling
(compile time is reported on its own), median of `--repeats` runs after `--warmup` runs.

  1. sparse: K = `--budget` patches drawn at random from the clip, with their (t, h, w) positions;
  2. dense: all frames x 256 patches;
  3. PyTorch: the same model exported with `save_pytorch`, loaded with `load_pretrained`, and the
     same step (same input, same loss) on the sparse input; the pooled outputs, losses and all
     gradients of both are compared, so we know the two compute the same thing.

Printed beside the times: the analytic FLOPs (`encoder_flops`), achieved GFLOP/s and their share
of this machine's matmul peak (`metrics.matmul_peak_flops`: one large jitted matmul, the fastest
of 5), the dense/sparse speedup against the analytic FLOP ratio (aim: >= 90% of it), and the
JAX/PyTorch time ratio (aim: <= 1). A markdown summary at the end is what README records.

Commands:

  # CPU (the default): the 'micro' model, 64 frames, K = 2048 vs 16,384 tokens, PyTorch too.
  ove-bench-encoder
  ove-bench-encoder --json /tmp/bench_encoder.json          # the same, as the console script

  # GPU / TPU: the real sizes, in bfloat16, with a flash-attention kernel for the dense case.
  ove-bench-encoder --preset base --dtype bfloat16 --attention cudnn
  ove-bench-encoder --preset large --dtype bfloat16 --attention splash --skip-torch

  # one part only
  ove-bench-encoder --skip-dense        # sparse JAX vs PyTorch
  ove-bench-encoder --skip-torch        # sparse vs dense

  # CPU with the two environment settings that take XLA:CPU's overheads out of the figures
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 \
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce ove-bench-encoder

On XLA:CPU (jax 0.10.2) the step's temporaries are allocated afresh on every run; the dense
step's multi-GB buffers then spend more CPU time in page faults than in arithmetic (the 'sys'
column of the table). `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` backs malloc with transparent huge
pages and cuts the faults about 30-fold. The YNNPACK reduce fusions that XLA:CPU makes of the
softmax backward run far slower than plain XLA code; the XLA flag above turns them off. Both are
recorded in the summary when set. PyTorch runs on the same kind of device as JAX: on a GPU
without a CUDA build of torch the comparison is skipped, not made against the CPU.

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
import json
import os
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ove_jax import benchmarks as bench
from ove_jax import metrics
from ove_jax.models import encoder as enc
from ove_jax.models.attention import IMPLEMENTATIONS


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='ove-bench-encoder', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 1)[1])
  presets = list(bench.BENCH_PRESETS) + list(enc.PRESETS)
  parser.add_argument('--preset', default='micro', choices=presets,
                      help="model size (default micro, sized for a CPU; base/large/huge are for "
                           "GPU/TPU)")
  parser.add_argument('--width', type=int, help='override the preset width')
  parser.add_argument('--depth', type=int, help='override the preset depth')
  parser.add_argument('--heads', type=int, help='override the preset number of heads')
  parser.add_argument('--mlp-dim', type=int, help='override the preset MLP width')
  parser.add_argument('--frames', type=int, default=64, help='frames in the clip (default 64)')
  parser.add_argument('--budget', type=int, default=2048,
                      help='K, patches kept in the sparse case (default 2048)')
  parser.add_argument('--batch', type=int, default=1, help='clips per step (default 1)')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='compute dtype; parameters stay float32')
  parser.add_argument('--attention', default='xla', choices=IMPLEMENTATIONS,
                      help='attention implementation (default xla)')
  parser.add_argument('--repeats', type=int, default=5, help='timed runs; the median is reported')
  parser.add_argument('--warmup', type=int, default=1, help='untimed runs after compiling')
  parser.add_argument('--seed', type=int, default=0, help='the model\'s init and the input clip')
  parser.add_argument('--skip-dense', action='store_true', help='no dense (all patches) case')
  parser.add_argument('--skip-torch', action='store_true', help='no PyTorch comparison')
  parser.add_argument('--json', metavar='PATH', help='also write the results here')
  return parser


def print_row(name: str, result: dict) -> None:
  fmt = bench.format_seconds
  if 'skipped' in result:
    print(f'{name}: SKIPPED, {result["skipped"]}', flush=True)
    return
  extra = ''
  if jax.default_backend() == 'cpu':
    extra += f', CPU per step: user {result["user_s"]:.2f} s + sys {result["sys_s"]:.2f} s'
  if 'compile_s' in result:
    extra += f', compile {result["compile_s"]:.1f} s'
  if 'planned_temp_gb' in result:
    extra += f', XLA temporaries {result["planned_temp_gb"]:.2f} GB'
  if 'peak_rss_gb' in result:
    extra += f', peak RSS so far {result["peak_rss_gb"]:.2f} GB'
  print(f'{name}: L={result["tokens"]}, fwd+bwd {fmt(result["median_s"])} (median; runs '
        f'{", ".join(fmt(t) for t in result["times_s"])}), {result["flops"] / 1e9:.1f} GFLOP, '
        f'{result["flops_per_s"] / 1e9:.1f} GFLOP/s = {100 * result["peak_fraction"]:.0f}% '
        f'of peak{extra}', flush=True)


def main(argv=None):
  parser = build_parser()
  args = parser.parse_args(argv)
  argv = sys.argv[1:] if argv is None else list(argv)

  error = bench.attention_error(args.attention)
  if error:
    parser.error(error)
  try:
    cfg = bench.encoder_config(args.preset, width=args.width, depth=args.depth, heads=args.heads,
                               mlp_dim=args.mlp_dim, dtype=args.dtype, attention=args.attention)
  except ValueError as e:
    parser.error(str(e))
  n_all = args.frames * bench.PATCHES_PER_FRAME
  if not 0 < args.budget <= n_all:
    parser.error(f'--budget {args.budget} must be in [1, {n_all}] ({args.frames} frames x '
                 f'{bench.PATCHES_PER_FRAME} patches)')
  if min(args.repeats, args.batch, args.frames) < 1 or args.warmup < 0:
    parser.error('--repeats, --batch and --frames must be positive, --warmup not negative')

  command = ' '.join(['ove-bench-encoder', shlex.join(argv)]).strip()
  info = bench.device_info()
  env_text = bench.env_settings(info)
  b, k = args.batch, args.budget
  print(f'command: {command}')
  print(f"device: {info['device_kind']} ({info['backend']}, {info['num_devices']} device(s)), "
        f"{info['cpu_count']} CPUs{', ' + info['cpu_model'] if 'cpu_model' in info else ''}; "
        f"jax {info['jax']}{'; env ' + env_text if env_text else ''}")
  print(f'model: {args.preset} width={cfg.width} depth={cfg.depth} heads={cfg.num_heads} '
        f'mlp={cfg.mlp_dim} ({enc.num_params(cfg) / 1e6:.2f}M parameters), dtype={cfg.dtype}, '
        f'attention={cfg.attention}')
  print(f'input: batch {b}, {args.frames} frames of {bench.IMAGE_SIZE}x{bench.IMAGE_SIZE} '
        f'({n_all} patches); sparse K={k}; median of {args.repeats} after {args.warmup} warm-up')
  sys.stdout.flush()

  peak = metrics.matmul_peak_flops(cfg.dtype)
  print(f'matmul peak (measured, {cfg.dtype}): {peak / 1e9:.1f} GFLOP/s', flush=True)

  (dense_x, dense_pos), (sparse_x, sparse_pos) = bench.clip_inputs(cfg, b, args.frames, k,
                                                                   args.seed)
  model = enc.create_encoder(cfg, seed=args.seed)
  step, forward, params = bench.make_jax_step(model)
  rows = {}

  def record(name, tokens, result):
    rows[name] = bench.add_rates(result, cfg, b, tokens, peak)
    print_row(name, result)

  # -- sparse ------------------------------------------------------------------------------------
  sx, spos = jnp.asarray(sparse_x), jnp.asarray(sparse_pos)
  result, (jax_loss, jax_grads) = bench.bench_jax(step, params, sx, spos, warmup=args.warmup,
                                                  repeats=args.repeats)
  record('JAX sparse', k, result)
  jax_loss = float(jax_loss)
  jax_pooled = np.asarray(forward(params, sx, spos)[:, 0], np.float32)

  # -- PyTorch -----------------------------------------------------------------------------------
  check = {}
  torch_note = bench.torch_unavailable(args.skip_torch)
  if torch_note is None:
    tresult, t_pooled, t_loss, t_grads = bench.bench_torch(
        model, cfg, sparse_x, sparse_pos, dtype=cfg.dtype, warmup=args.warmup,
        repeats=args.repeats)
    record('PyTorch sparse', k, tresult)
    check = bench.torch_agreement(cfg, jax_grads, jax_pooled, jax_loss, t_pooled, t_loss,
                                  t_grads)
    print(f"agreement JAX vs PyTorch ({tresult['device']}, {tresult['threads']} threads, torch "
          f"{tresult['version']}): pooled max rel diff {check['pooled_max_rel_diff']:.2e}, "
          f"loss {jax_loss:.6g} vs {t_loss:.6g}, gradients max rel diff "
          f"{check['grad_max_rel_diff']:.2e} ({check['grad_worst_key']}) -> "
          f"{'agree' if check['agree'] else 'MISMATCH'} (tolerance {check['tolerance']:g}"
          f"{'' if cfg.dtype == 'float32' else ', on the output only'})", flush=True)
  else:
    print(f'PyTorch: {torch_note}', flush=True)
  del jax_grads
  gc.collect()

  # -- dense (last: it is by far the biggest) ----------------------------------------------------
  if args.skip_dense:
    dense_note = 'skipped (--skip-dense)'
  else:
    dense_note = None
    dx, dpos = jnp.asarray(dense_x), jnp.asarray(dense_pos)
    result, outputs = bench.bench_jax(step, params, dx, dpos, warmup=args.warmup,
                                      repeats=args.repeats, check_memory=True)
    del outputs, dx, dpos
    gc.collect()
    record('JAX dense', n_all, result)
    if 'skipped' in result:
      dense_note = f'skipped: {result["skipped"]}'

  # -- ratios and summary ------------------------------------------------------------------------
  summary = bench.speedups(rows)
  print('\n'.join(bench.markdown_summary(
      command=command, info=info, preset=args.preset, cfg=cfg, batch=b, frames=args.frames,
      repeats=args.repeats, peak=peak, rows=rows, summary=summary, check=check,
      dense_note=dense_note, torch_note=torch_note)), flush=True)

  if args.json:
    report = {'command': command, 'device': info, 'args': vars(args),
              'config': {'preset': args.preset, 'width': cfg.width, 'depth': cfg.depth,
                         'num_heads': cfg.num_heads, 'mlp_dim': cfg.mlp_dim,
                         'num_params': enc.num_params(cfg), 'dtype': cfg.dtype,
                         'attention': cfg.attention},
              'matmul_peak_flops_per_s': peak, 'results': rows, 'agreement': check,
              'summary': summary}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=2)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
