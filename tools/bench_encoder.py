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
of this machine's matmul peak (measured here with one large jitted matmul), the dense/sparse
speedup against the analytic FLOP ratio (aim: >= 90% of it), and the JAX/PyTorch time ratio
(aim: <= 1). A markdown summary at the end is what README records.

Commands:

  # CPU (the default): the 'micro' model, 64 frames, K = 2048 vs 16,384 tokens, PyTorch too.
  python tools/bench_encoder.py
  ove-bench-encoder --json /tmp/bench_encoder.json          # the same, as the console script

  # GPU / TPU: the real sizes, in bfloat16, with a flash-attention kernel for the dense case.
  python tools/bench_encoder.py --preset base --dtype bfloat16 --attention cudnn
  python tools/bench_encoder.py --preset large --dtype bfloat16 --attention splash --skip-torch

  # one part only
  python tools/bench_encoder.py --skip-dense        # sparse JAX vs PyTorch
  python tools/bench_encoder.py --skip-torch        # sparse vs dense

  # CPU with the two environment settings that take XLA:CPU's overheads out of the figures
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 \
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce python tools/bench_encoder.py

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
import platform
import shlex
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ove_jax.models import encoder as enc
from ove_jax.models.encoder import encoder_flops
from ove_jax.models.attention import IMPLEMENTATIONS

IMAGE_SIZE = 224
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE          # 16 patches a side
PATCHES_PER_FRAME = GRID * GRID          # 256

# Benchmark-only sizes (width, depth, heads, mlp_dim); see the module docstring for why.
BENCH_PRESETS = {'micro': (64, 2, 1, 256)}

# XLA:CPU's memory_analysis under-reports the peak: measured peak RSS was 1.1x the planned
# temporaries with one head and up to 2.4x with two (jax 0.10.2, L = 8192), so on CPU the dense
# case is run only when twice the plan fits in the available RAM.
CPU_MEMORY_MARGIN = 2.0

# Settings that change these timings; recorded with the figures when set.
ENV_VARS = ('XLA_FLAGS', 'GLIBC_TUNABLES', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'JAX_PLATFORMS')

# The aims of the issue: sparse speedup at least 90% of the FLOP ratio; JAX no slower than torch.
SPEEDUP_AIM = 0.90
TORCH_AIM = 1.0


# ------------------------------------------------------------------------------------------------
# Analytic FLOPs
# ------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def clip_inputs(cfg, batch: int, frames: int, budget: int, seed: int):
  """Dense patches [B, N, P] and (t, h, w) [B, N, 3] of a random clip, and the sparse choice of
  `budget` of them per row (sorted, as the codec selection hands them over)."""
  rng = np.random.default_rng(seed)
  n = frames * PATCHES_PER_FRAME
  # CLIP-normalised pixels are roughly unit Gaussian; values do not change the timing.
  dense_patches = rng.standard_normal((batch, n, cfg.patch_dim), dtype=np.float32)
  flat = np.arange(n)
  grid = np.stack([flat // PATCHES_PER_FRAME, (flat // GRID) % GRID, flat % GRID], axis=-1)
  dense_positions = np.broadcast_to(grid, (batch, n, 3)).astype(np.int32)
  idx_BxK = np.stack([np.sort(rng.choice(n, budget, replace=False)) for _ in range(batch)])
  sparse_patches = np.take_along_axis(dense_patches, idx_BxK[..., None], axis=1)
  sparse_positions = np.take_along_axis(dense_positions, idx_BxK[..., None], axis=1)
  return (dense_patches, dense_positions), (sparse_patches, sparse_positions)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def time_runs(fn, *, warmup: int, repeats: int) -> dict:
  """Wall times of `repeats` calls after `warmup`, their median, and the process's CPU time per
  call split into user and system (on CPU a large system share is page faults, not compute)."""
  for _ in range(warmup):
    fn()
  times = []
  cpu_start = os.times()
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  cpu_end = os.times()
  return {'times_s': times, 'median_s': statistics.median(times),
          'user_s': (cpu_end.user - cpu_start.user) / repeats,
          'sys_s': (cpu_end.system - cpu_start.system) / repeats}


def matmul_peak_flops(dtype: str, *, repeats: int = 5) -> float:
  """FLOP/s of one large jitted square matmul: this machine's practical peak for the dtype."""
  n = 2048 if jax.default_backend() == 'cpu' else 8192
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  y = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  timing = time_runs(lambda: jax.block_until_ready(f(x, y)), warmup=2, repeats=repeats)
  return 2 * n ** 3 / timing['median_s']


def _peak_rss_gb() -> float | None:
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
  return kb / 1e6 if sys.platform.startswith('linux') else None


def _available_memory_bytes() -> tuple[float | None, float]:
  """(bytes the compiled step may use, margin to apply to XLA's plan)."""
  if jax.default_backend() == 'cpu':
    try:
      with open('/proc/meminfo') as f:
        for line in f:
          if line.startswith('MemAvailable:'):
            return int(line.split()[1]) * 1024, CPU_MEMORY_MARGIN
    except OSError:
      pass
    return None, CPU_MEMORY_MARGIN
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get('bytes_limit')
  return (limit - stats.get('bytes_in_use', 0) if limit else None), 1.0


# ------------------------------------------------------------------------------------------------
# JAX
# ------------------------------------------------------------------------------------------------

def make_jax_step(model):
  """Jitted (loss, grads) of sum(pooled^2) w.r.t. all parameters, and the forward alone."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def pooled(params, patches, positions):
    return nnx.merge(graphdef, params, rest)(patches, positions)['pooled']

  def loss_fn(params, patches, positions):
    return jnp.sum(jnp.square(pooled(params, patches, positions).astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss_fn)), jax.jit(pooled), params


def bench_jax(step, params, patches, positions, *, warmup, repeats, check_memory=False):
  """Compiles and times `step`; returns a result dict (with 'skipped' if it would not fit)."""
  start = time.perf_counter()
  compiled = step.lower(params, patches, positions).compile()
  compile_s = time.perf_counter() - start
  result = {'compile_s': compile_s}
  try:
    mem = compiled.memory_analysis()
    result['planned_temp_gb'] = mem.temp_size_in_bytes / 1e9
    planned = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
  except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
    planned = None
  if check_memory and planned is not None:
    available, margin = _available_memory_bytes()
    if available is not None and planned * margin > available:
      result['skipped'] = (f'needs about {planned * margin / 1e9:.1f} GB ({planned / 1e9:.1f} GB '
                           f'planned by XLA x {margin:g}), {available / 1e9:.1f} GB available')
      return result, None
  run = lambda: jax.block_until_ready(compiled(params, patches, positions))
  result.update(time_runs(run, warmup=warmup, repeats=repeats))
  outputs = compiled(params, patches, positions)
  return result, outputs


# ------------------------------------------------------------------------------------------------
# PyTorch
# ------------------------------------------------------------------------------------------------

def bench_torch(model, cfg, patches_np, positions_np, *, dtype, warmup, repeats):
  """Exports `model`, loads it in our PyTorch port and times the same step on the same input.

  Returns (result, pooled [B, C] numpy, loss, grads keyed like the release state dict)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from ove_jax.convert import hf, torch_model  # pylint: disable=g-import-not-at-top

  # Torch on the same kind of device as JAX, so the ratio compares like with like.
  on_gpu = jax.default_backend() == 'gpu' and torch.cuda.is_available()
  device = torch.device('cuda' if on_gpu else 'cpu')
  with tempfile.TemporaryDirectory() as directory:
    hf.save_pytorch(model, directory)
    tmodel = torch_model.load_pretrained(directory).to(device).train()
  for p in tmodel.parameters():
    p.requires_grad_(True)
  x = torch.from_numpy(patches_np).to(device)
  pos = torch.from_numpy(positions_np.astype(np.float32)).to(device)
  # Our bfloat16 is mixed precision (float32 parameters, bfloat16 compute): autocast is that.
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == 'bfloat16'
              else contextlib.nullcontext())
  sync = torch.cuda.synchronize if on_gpu else (lambda: None)

  def step():
    for p in tmodel.parameters():
      p.grad = None
    with autocast:
      pooled = tmodel.forward_tokens(x, pos)['pooler_output']
    loss = pooled.float().square().sum()
    loss.backward()
    sync()
    return loss

  timing = time_runs(step, warmup=warmup, repeats=repeats)
  loss = float(step().detach())
  grads = {k: p.grad.float().cpu().numpy() for k, p in tmodel.named_parameters()}
  with torch.no_grad(), autocast:
    pooled = tmodel.forward_tokens(x, pos)['pooler_output'].float().cpu().numpy()
  result = {**timing, 'device': str(device),
            'threads': torch.get_num_threads(), 'version': torch.__version__}
  return result, pooled, loss, grads


def max_rel_diff(a, b) -> float:
  """max |a - b| / max |b|: relative to the tensor's scale, so near-zero entries do not blow up."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------

def device_info() -> dict:
  dev = jax.devices()[0]
  info = {'backend': jax.default_backend(), 'device_kind': dev.device_kind,
          'num_devices': jax.device_count(), 'cpu_count': os.cpu_count(),
          'jax': jax.__version__, 'python': platform.python_version()}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          info['cpu_model'] = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  env = {k: os.environ[k] for k in ENV_VARS if os.environ.get(k)}
  if env:
    info['env'] = env
  return info


def build_config(args) -> enc.EncoderConfig:
  if args.preset in BENCH_PRESETS:
    width, depth, heads, mlp = BENCH_PRESETS[args.preset]
  else:
    width, depth, heads, mlp = enc.PRESETS[args.preset]
  sizes = {'width': args.width or width, 'depth': args.depth or depth,
           'num_heads': args.heads or heads, 'mlp_dim': args.mlp_dim or mlp}
  return enc.EncoderConfig(**sizes, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                           dtype=args.dtype, attention=args.attention)


def _check_attention(parser, attention: str):
  backend = jax.default_backend()
  needs = {'cudnn': ('gpu',), 'pallas_gpu': ('gpu',), 'splash': ('tpu',)}.get(attention)
  if needs and backend not in needs:
    parser.error(f'--attention {attention} needs a {needs[0].upper()}; this backend is '
                 f'{backend!r} (use xla or jax)')


def _fmt_s(seconds) -> str:
  return '-' if seconds is None else (f'{seconds * 1e3:.1f} ms' if seconds < 1 else
                                      f'{seconds:.2f} s')


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='ove-bench-encoder', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  presets = list(BENCH_PRESETS) + list(enc.PRESETS)
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
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--skip-dense', action='store_true', help='no dense (all patches) case')
  parser.add_argument('--skip-torch', action='store_true', help='no PyTorch comparison')
  parser.add_argument('--json', metavar='PATH', help='also write the results here')
  args = parser.parse_args(argv)
  argv = sys.argv[1:] if argv is None else list(argv)

  _check_attention(parser, args.attention)
  try:
    cfg = build_config(args)
  except ValueError as e:
    parser.error(str(e))
  n_all = args.frames * PATCHES_PER_FRAME
  if not 0 < args.budget <= n_all:
    parser.error(f'--budget {args.budget} must be in [1, {n_all}] ({args.frames} frames x '
                 f'{PATCHES_PER_FRAME} patches)')
  if min(args.repeats, args.batch, args.frames) < 1 or args.warmup < 0:
    parser.error('--repeats, --batch and --frames must be positive, --warmup not negative')

  prog = ('python tools/bench_encoder.py' if sys.argv[0].endswith('.py')
          else os.path.basename(sys.argv[0]) or 'ove-bench-encoder')
  command = ' '.join([prog, shlex.join(argv)]).strip()
  info = device_info()
  env_text = ' '.join(f'{k}={shlex.quote(v)}' for k, v in info.get('env', {}).items())
  b, k = args.batch, args.budget
  print(f'command: {command}')
  print(f"device: {info['device_kind']} ({info['backend']}, {info['num_devices']} device(s)), "
        f"{info['cpu_count']} CPUs{', ' + info['cpu_model'] if 'cpu_model' in info else ''}; "
        f"jax {info['jax']}{'; env ' + env_text if env_text else ''}")
  print(f'model: {args.preset} width={cfg.width} depth={cfg.depth} heads={cfg.num_heads} '
        f'mlp={cfg.mlp_dim} ({enc.num_params(cfg) / 1e6:.2f}M parameters), dtype={cfg.dtype}, '
        f'attention={cfg.attention}')
  print(f'input: batch {b}, {args.frames} frames of {IMAGE_SIZE}x{IMAGE_SIZE} '
        f'({n_all} patches); sparse K={k}; median of {args.repeats} after {args.warmup} warm-up')
  sys.stdout.flush()

  peak = matmul_peak_flops(cfg.dtype)
  print(f'matmul peak (measured, {cfg.dtype}): {peak / 1e9:.1f} GFLOP/s', flush=True)

  (dense_x, dense_pos), (sparse_x, sparse_pos) = clip_inputs(cfg, b, args.frames, k, args.seed)
  model = enc.create_encoder(cfg, seed=args.seed)
  step, forward, params = make_jax_step(model)

  rows = {}

  def record(name, tokens, result):
    flops = b * encoder_flops(cfg, tokens, backward=True)
    result.update(tokens=tokens, flops=flops)
    if 'median_s' in result:
      result['flops_per_s'] = flops / result['median_s']
      result['peak_fraction'] = result['flops_per_s'] / peak
    rows[name] = result
    rss = _peak_rss_gb()
    if rss is not None and info['backend'] == 'cpu':
      result['peak_rss_gb'] = rss
    if 'skipped' in result:
      print(f'{name}: SKIPPED, {result["skipped"]}', flush=True)
      return
    extra = ''
    if info['backend'] == 'cpu':
      extra += f', CPU per step: user {result["user_s"]:.2f} s + sys {result["sys_s"]:.2f} s'
    if 'compile_s' in result:
      extra += f', compile {result["compile_s"]:.1f} s'
    if 'planned_temp_gb' in result:
      extra += f', XLA temporaries {result["planned_temp_gb"]:.2f} GB'
    if 'peak_rss_gb' in result:
      extra += f', peak RSS so far {result["peak_rss_gb"]:.2f} GB'
    print(f'{name}: L={tokens}, fwd+bwd {_fmt_s(result["median_s"])} (median; runs '
          f'{", ".join(_fmt_s(t) for t in result["times_s"])}), {flops / 1e9:.1f} GFLOP, '
          f'{result["flops_per_s"] / 1e9:.1f} GFLOP/s = {100 * result["peak_fraction"]:.0f}% '
          f'of peak{extra}', flush=True)

  # -- sparse ------------------------------------------------------------------------------------
  sx, spos = jnp.asarray(sparse_x), jnp.asarray(sparse_pos)
  result, (jax_loss, jax_grads) = bench_jax(step, params, sx, spos, warmup=args.warmup,
                                            repeats=args.repeats)
  record('JAX sparse', k, result)
  jax_loss = float(jax_loss)
  jax_pooled = np.asarray(forward(params, sx, spos)[:, 0], np.float32)

  # -- PyTorch -----------------------------------------------------------------------------------
  torch_note = None
  check = {}
  if args.skip_torch:
    torch_note = 'skipped (--skip-torch)'
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      torch_note = 'skipped: torch is not installed (pip install -e .[torch])'
    if torch_note is None and jax.default_backend() != 'cpu' and not torch.cuda.is_available():
      torch_note = (f'skipped: JAX runs on {jax.default_backend()} but this torch has no CUDA; '
                    'a GPU/TPU against a CPU says nothing about the code')
    if torch_note is None:
      tresult, t_pooled, t_loss, t_grads = bench_torch(
          model, cfg, sparse_x, sparse_pos, dtype=cfg.dtype, warmup=args.warmup,
          repeats=args.repeats)
      record('PyTorch sparse', k, tresult)
      from ove_jax.convert import hf  # pylint: disable=g-import-not-at-top
      flat = {tuple(path): np.asarray(v[...]) for path, v in nnx.to_flat_state(jax_grads)}
      jax_grads_hf = hf.params_to_hf(flat, cfg)
      grad_diffs = {key: max_rel_diff(jax_grads_hf[key], t_grads[key]) for key in t_grads}
      worst = max(grad_diffs, key=grad_diffs.get)
      check = {'pooled_max_rel_diff': max_rel_diff(jax_pooled, t_pooled),
               'loss_jax': jax_loss, 'loss_torch': t_loss,
               'grad_max_rel_diff': grad_diffs[worst], 'grad_worst_key': worst}
      if cfg.dtype == 'float32':
        tol = 1e-4
        check['agree'] = max(check['pooled_max_rel_diff'], check['grad_max_rel_diff']) < tol
      else:
        # Our bfloat16 rounds every layer's output; autocast keeps norms and softmax in float32.
        # Small gradients (norm biases) then differ by tens of percent, so judge the output only;
        # the float32 run is the exact check.
        tol = 5e-2
        check['agree'] = check['pooled_max_rel_diff'] < tol
      check['tolerance'] = tol
      print(f"agreement JAX vs PyTorch ({tresult['device']}, {tresult['threads']} threads, torch "
            f"{tresult['version']}): pooled max rel diff {check['pooled_max_rel_diff']:.2e}, "
            f"loss {jax_loss:.6g} vs {t_loss:.6g}, gradients max rel diff "
            f"{check['grad_max_rel_diff']:.2e} ({worst}) -> "
            f"{'agree' if check['agree'] else 'MISMATCH'} (tolerance {tol:g}"
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
    result, outputs = bench_jax(step, params, dx, dpos, warmup=args.warmup, repeats=args.repeats,
                                check_memory=True)
    del outputs, dx, dpos
    gc.collect()
    record('JAX dense', n_all, result)
    if 'skipped' in result:
      dense_note = f'skipped: {result["skipped"]}'

  # -- ratios and summary ------------------------------------------------------------------------
  summary = {}
  sparse, dense, torch_row = rows['JAX sparse'], rows.get('JAX dense'), rows.get('PyTorch sparse')
  if dense is not None and 'median_s' in dense:
    measured = dense['median_s'] / sparse['median_s']
    analytic = dense['flops'] / sparse['flops']
    summary.update(speedup_measured=measured, speedup_analytic=analytic,
                   speedup_fraction=measured / analytic)
  if torch_row is not None:
    summary['jax_over_torch'] = sparse['median_s'] / torch_row['median_s']

  on_cpu = info['backend'] == 'cpu'
  torch_text = (f"; torch {torch_row['version']} ({torch_row['device']}, "
                f"{torch_row['threads']} threads)" if torch_row else '')
  lines = ['', '## Encoder benchmark', '',
           f'`{command}`', '',
           f"Device: {info['device_kind']} ({info['backend']}), {info['cpu_count']} CPUs"
           f"{' (' + info['cpu_model'] + ')' if 'cpu_model' in info else ''}; jax {info['jax']}"
           f"{'; env `' + env_text + '`' if env_text else ''}"
           f"{torch_text}",
           f'Model: {args.preset} (width {cfg.width}, depth {cfg.depth}, heads {cfg.num_heads}, '
           f'MLP {cfg.mlp_dim}, {enc.num_params(cfg) / 1e6:.2f}M parameters), {cfg.dtype}, '
           f'attention {cfg.attention}; batch {b}, {args.frames} frames; forward+backward, '
           f'median of {args.repeats}. Matmul peak measured: {peak / 1e9:.1f} GFLOP/s.', '',
           '| case | tokens | GFLOP (fwd+bwd) | time | GFLOP/s | % of matmul peak | compile |'
           + (' CPU s/step (user + sys) |' if on_cpu else ''),
           '|---|---:|---:|---:|---:|---:|---:|' + ('---:|' if on_cpu else '')]
  for name, row in rows.items():
    if 'median_s' not in row:
      lines.append(f"| {name} | {row['tokens']} | {row['flops'] / 1e9:.1f} | skipped | | | |"
                   + (' |' if on_cpu else ''))
      continue
    compile_s = f"{row['compile_s']:.1f} s" if 'compile_s' in row else '-'
    lines.append(f"| {name} | {row['tokens']} | {row['flops'] / 1e9:.1f} | "
                 f"{_fmt_s(row['median_s'])} | {row['flops_per_s'] / 1e9:.1f} | "
                 f"{100 * row['peak_fraction']:.0f}% | {compile_s} |"
                 + (f" {row['user_s']:.2f} + {row['sys_s']:.2f} |" if on_cpu else ''))
  lines.append('')
  if 'speedup_measured' in summary:
    met = summary['speedup_fraction'] >= SPEEDUP_AIM
    lines.append(f"Sparse speedup (dense / sparse time): {summary['speedup_measured']:.1f}x "
                 f"measured vs {summary['speedup_analytic']:.1f}x analytic FLOP ratio = "
                 f"{100 * summary['speedup_fraction']:.0f}% (aim >= {100 * SPEEDUP_AIM:.0f}%: "
                 f"{'met' if met else 'NOT met'}).")
  else:
    lines.append(f'Sparse speedup: dense case {dense_note}.')
  if 'jax_over_torch' in summary:
    met = summary['jax_over_torch'] <= TORCH_AIM
    lines.append(f"JAX / PyTorch time on the sparse input: {summary['jax_over_torch']:.2f} "
                 f"(aim <= {TORCH_AIM:g}: {'met' if met else 'NOT met'}); outputs "
                 f"{'agree' if check.get('agree') else 'DO NOT agree'} (pooled max rel diff "
                 f"{check['pooled_max_rel_diff']:.1e}, gradients "
                 f"{check['grad_max_rel_diff']:.1e}).")
  else:
    lines.append(f'JAX vs PyTorch: {torch_note}.')
  print('\n'.join(lines), flush=True)

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
