"""Benchmark computations: timing, the encoder step (sparse vs dense; the comparison with our
PyTorch port is `ove_jax.torch_comparison`), the encoder bench's report, and the sharded k-means
pass against scikit-learn. The programs `ove-bench-encoder` and `ove-bench-kmeans` (tools/) print
what these measure; what each figure means is in their help.

Figures are ratios measured side by side in one run (sparse vs dense, our code vs a baseline,
achieved FLOP/s vs the machine's measured matmul peak); nothing here asserts a time.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ove_jax import host_runtime
from ove_jax.models import encoder as enc

IMAGE_SIZE = 224
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 16 patches a side
PATCHES_PER_FRAME = GRID * GRID  # 256

# Benchmark-only sizes (width, depth, heads, mlp_dim); ove-bench-encoder's help says why.
BENCH_PRESETS = {'micro': (64, 2, 1, 256)}

# XLA:CPU's memory_analysis under-reports the peak: measured peak RSS was 1.1x the planned
# temporaries with one head and up to 2.4x with two (jax 0.10.2, L = 8192), so on CPU the dense
# case is run only when twice the plan fits in the available RAM.
CPU_MEMORY_MARGIN = 2.0

# Settings that change these timings; recorded with the figures when set.
_CPU_SWITCHES = ('OVE_CPU_BLAS', 'OVE_CPU_LAYOUTS', 'OVE_HOST_TUNING')
ENV_VARS = ('XLA_FLAGS', 'GLIBC_TUNABLES', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'JAX_PLATFORMS')
ENV_VARS += _CPU_SWITCHES

# The aims: sparse speedup at least 90% of the FLOP ratio; our step at least as fast as the
# release-style PyTorch step (PyTorch time / JAX time >= 1), with 1.5 as the target.
SPEEDUP_AIM = 0.90
TORCH_AIM = 1.0
TORCH_TARGET = 1.5

# Widths compared with PyTorch by default (head_dim 64, MLP 4x width): base's and large's.
COMPARE_WIDTHS = (256, 512, 768, 1024)
# The head size of every preset, and of the benches' models at any width (heads = width / 64).
HEAD_DIM = 64


def width_list(text: str) -> tuple[int, ...]:
  """argparse type of a bench's --widths: '256,512' -> (256, 512); '' -> (); each a positive
  multiple of HEAD_DIM, as the models at those widths have width / HEAD_DIM heads."""
  import argparse  # pylint: disable=g-import-not-at-top

  try:
    widths = tuple(int(w) for w in text.split(',') if w.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
      f'{text!r}: give comma-separated integers, e.g. 256,512'
    ) from None
  if any(w <= 0 or w % HEAD_DIM for w in widths):
    raise argparse.ArgumentTypeError(
      f'{text!r}: each width must be a positive multiple of {HEAD_DIM} (head_dim {HEAD_DIM})'
    )
  return widths


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


# A warm-up round is clean when no step in it faulted in more pages than this (1 MiB), and the
# heap has stopped growing after STEADY_ROUNDS clean rounds in a row: one is not enough, as a
# step's outputs can land in the hole its temporaries left, so that every other run grows the heap
# (the dense micro step faulted in its 4.45 GB twice, then never).
STEADY_PAGE_FAULTS = 256
STEADY_ROUNDS = 2
# Extra warm-up rounds `paired_runs` may add while the heap still grows.
MAX_EXTRA_WARMUP = 4


def _timed(fn) -> tuple[float, host_runtime.Usage]:
  """(wall seconds, usage during) of one call of `fn`."""
  before, start = host_runtime.process_usage(), time.perf_counter()
  fn()
  wall, after = time.perf_counter() - start, host_runtime.process_usage()
  return wall, host_runtime.Usage(
    after.user_s - before.user_s,
    after.system_s - before.system_s,
    after.page_faults - before.page_faults,
  )


def _summary(times: list, usages: list) -> dict:
  return _pooled(
    times,
    [u.user_s for u in usages],
    [u.system_s for u in usages],
    [u.page_faults for u in usages],
  )


def _pooled(times: list, user: list, system: list, faults: list) -> dict:
  """Per-run figures and their summary: the medians of wall, user and system time (one run
  that faults its heap in afresh decides none of them), the mean of page faults (so faults that
  still happen show)."""
  return {
    'times_s': list(times),
    'median_s': statistics.median(times),
    'user_runs_s': list(user),
    'sys_runs_s': list(system),
    'page_fault_runs': list(faults),
    'user_s': statistics.median(user),
    'sys_s': statistics.median(system),
    'page_faults': sum(faults) / len(faults),
  }


def time_runs(fn, *, warmup: int, repeats: int) -> dict:
  """Wall times of `repeats` calls after the warm-up and per call the process's CPU time split
  into user and system and its page faults (on CPU a large system share is page faults, the
  allocator mapping memory in, not compute); the medians of the times, the mean of the faults
  (`_pooled`). The warm-up is `paired_runs`': at least `warmup` calls, more while the heap
  still grows."""
  return paired_runs({'fn': fn}, warmup=warmup, repeats=repeats)['fn']


def paired_runs(
  fns: Mapping[str, Callable[[], Any]],
  *,
  warmup: int,
  repeats: int,
  max_extra_warmup: int = MAX_EXTRA_WARMUP,
) -> dict:
  """Times several steps side by side: each round runs every fn once, in turn, so a change in
  the machine's load hits all of them alike. Per fn: wall times, median, and per call CPU time
  (user, system) and page faults as in time_runs, and 'warmup_rounds', how many rounds ran first
  (`warmup` = 0: none).

  The steps share one heap, so each can leave the free memory cut up where the other's big
  blocks (XLA:CPU's one temporary buffer per step) no longer fit, and the heap grows for a few
  rounds: steps that fault in hundreds of MB, on some virtual machines at 10+ us a page. After
  `warmup` rounds, up to `max_extra_warmup` more run until STEADY_ROUNDS rounds in a row had no
  step fault in more than STEADY_PAGE_FAULTS pages, so the timed rounds measure the steady state
  a training loop runs in; faults that still happen are counted and reported, not hidden."""
  rounds, clean, growing = 0, 0, warmup > 0
  while growing and rounds < warmup + max_extra_warmup:
    faults = [_timed(fn)[1].page_faults for fn in fns.values()]
    rounds += 1
    clean = clean + 1 if max(faults) <= STEADY_PAGE_FAULTS else 0
    growing = rounds < warmup or clean < STEADY_ROUNDS
  measured = {name: ([], []) for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      wall, used = _timed(fn)
      measured[name][0].append(wall)
      measured[name][1].append(used)
  return {
    name: {**_summary(times, usages), 'warmup_rounds': rounds}
    for name, (times, usages) in measured.items()
  }


def merge_runs(parts: list[dict]) -> dict:
  """One result of several `time_runs` blocks of the same step: all their runs pooled (medians
  of wall, user and system time, mean page faults, as `time_runs`), warm-up runs summed."""
  pooled = _pooled(
    *(
      [x for part in parts for x in part[key]]
      for key in ('times_s', 'user_runs_s', 'sys_runs_s', 'page_fault_runs')
    )
  )
  return {**pooled, 'warmup_rounds': sum(part['warmup_rounds'] for part in parts)}


def peak_rss_gb() -> float | None:
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
  return kb / 1e6 if sys.platform.startswith('linux') else None


def available_memory_bytes() -> tuple[float | None, float]:
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


def compile_jax(step, params, patches, positions, *, check_memory=False):
  """Compiles `step`; returns (result dict with compile time and plan, or 'skipped' if it would
  not fit; a no-argument function that runs one step and waits for it, or None)."""
  start = time.perf_counter()
  compiled = step.lower(params, patches, positions).compile()
  result = {'compile_s': time.perf_counter() - start}
  try:
    mem = compiled.memory_analysis()
    result['planned_temp_gb'] = mem.temp_size_in_bytes / 1e9
    planned = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
  except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
    planned = None
  if check_memory and planned is not None:
    available, margin = available_memory_bytes()
    if available is not None and planned * margin > available:
      result['skipped'] = (
        f'needs about {planned * margin / 1e9:.1f} GB ({planned / 1e9:.1f} GB '
        f'planned by XLA x {margin:g}), {available / 1e9:.1f} GB available'
      )
      return result, None
  return result, lambda: jax.block_until_ready(compiled(params, patches, positions))


def step_matmul_shapes(width: int, tokens: int = 2048, head_dim: int = HEAD_DIM) -> list[tuple]:
  """The (name, m, k, n) matrix products of one encoder block's training step on `tokens`
  tokens at `width` (MLP 4x): forward, the input gradient and the weight gradient of each
  dense layer, and one head's attention logits and values."""
  shapes = []
  for name, inner, outer in (('attention projection', width, width), ('MLP up', width, 4 * width)):
    shapes += [
      (f'{name}, forward', tokens, inner, outer),
      (f'{name}, input gradient', tokens, outer, inner),
      (f'{name}, weight gradient', inner, tokens, outer),
    ]
  shapes += [
    ('attention logits (one head)', tokens, head_dim, tokens),
    ('attention values (one head)', tokens, tokens, head_dim),
  ]
  return shapes


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def device_info() -> dict:
  dev = jax.devices()[0]
  info = {
    'backend': jax.default_backend(),
    'device_kind': dev.device_kind,
    'num_devices': jax.device_count(),
    'cpu_count': os.cpu_count(),
    'jax': jax.__version__,
    'python': platform.python_version(),
  }
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


def encoder_config(
  preset: str,
  *,
  width=None,
  depth=None,
  heads=None,
  mlp_dim=None,
  dtype: str = 'float32',
  attention: str = 'xla',
) -> enc.EncoderConfig:
  """The benchmarked encoder: a preset (BENCH_PRESETS or the model's) with sizes overridden."""
  if preset in BENCH_PRESETS:
    d_width, d_depth, d_heads, d_mlp = BENCH_PRESETS[preset]
  else:
    d_width, d_depth, d_heads, d_mlp = enc.PRESETS[preset]
  sizes = {
    'width': width or d_width,
    'depth': depth or d_depth,
    'num_heads': heads or d_heads,
    'mlp_dim': mlp_dim or d_mlp,
  }
  return enc.EncoderConfig(
    **sizes, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, dtype=dtype, attention=attention
  )


def attention_error(attention: str) -> str | None:
  """Why `attention` cannot run on this backend, or None."""
  backend = jax.default_backend()
  needs = {'cudnn': ('gpu',), 'pallas_gpu': ('gpu',), 'splash': ('tpu',)}.get(attention)
  if needs and backend not in needs:
    return (
      f'--attention {attention} needs a {needs[0].upper()}; this backend is {backend!r} '
      '(use xla or jax)'
    )
  return None


def env_settings(info: dict) -> str:
  """The timing-relevant environment settings of `device_info`, as shell assignments."""
  return ' '.join(f'{k}={shlex.quote(v)}' for k, v in info.get('env', {}).items())


def format_seconds(seconds) -> str:
  return (
    '-' if seconds is None else (f'{seconds * 1e3:.1f} ms' if seconds < 1 else f'{seconds:.2f} s')
  )


def format_cpu_seconds(seconds: float) -> str:
  """CPU seconds with three significant digits below 10 s ('0.172', '8.20', '12.3')."""
  return f'{seconds:.3f}' if seconds < 1 else f'{seconds:.2f}' if seconds < 10 else f'{seconds:.1f}'


# ------------------------------------------------------------------------------------------------
# The encoder benchmark's figures
# ------------------------------------------------------------------------------------------------


def add_rates(result: dict, cfg, batch: int, tokens: int, peak: float) -> dict:
  """Adds the step's analytic FLOPs (forward + backward), achieved FLOP/s and share of `peak`
  (and the peak RSS so far, on CPU) to a timed step's result."""
  flops = batch * enc.encoder_flops(cfg, tokens, backward=True)
  result.update(tokens=tokens, flops=flops)
  if 'median_s' in result:
    result['flops_per_s'] = flops / result['median_s']
    result['peak_fraction'] = result['flops_per_s'] / peak
  rss = peak_rss_gb()
  if rss is not None and jax.default_backend() == 'cpu':
    result['peak_rss_gb'] = rss
  return result


# The measures of the sparse speedup: wall time, and CPU time per step, user alone and user +
# system (system time on CPU is mostly page faults, i.e. the allocator, not arithmetic), each the
# median over the timed runs.
SPEEDUP_MEASURES = (('wall', 'wall time'), ('user', 'user CPU time'), ('cpu', 'user+sys CPU time'))


def _step_time(row: Mapping[str, Any], measure: str) -> float | None:
  if measure == 'wall':
    return row['median_s']
  if 'user_s' not in row:
    return None
  return row['user_s'] + (row['sys_s'] if measure == 'cpu' else 0.0)


def sparse_speedup(rows: Mapping[str, dict]) -> dict[str, float]:
  """Dense / sparse time against the analytic FLOP ratio, when both ran: by wall time
  ('speedup_measured', 'speedup_fraction') and, where CPU time was measured, by user time
  ('speedup_user', 'speedup_user_fraction') and user + system ('speedup_cpu', ...)."""
  sparse, dense = rows.get('JAX sparse'), rows.get('JAX dense')
  if not (sparse and dense and 'median_s' in sparse and 'median_s' in dense):
    return {}
  analytic = dense['flops'] / sparse['flops']
  out = {'speedup_analytic': analytic}
  for measure, _ in SPEEDUP_MEASURES:
    t_sparse, t_dense = _step_time(sparse, measure), _step_time(dense, measure)
    if not (t_sparse and t_dense):
      continue
    key, fraction_key = _speedup_keys(measure)
    out[key] = t_dense / t_sparse
    out[fraction_key] = out[key] / analytic
  return out


def _speedup_keys(measure: str) -> tuple[str, str]:
  """`sparse_speedup`'s keys of one measure: (speedup, its share of the analytic ratio)."""
  if measure == 'wall':
    return 'speedup_measured', 'speedup_fraction'
  return f'speedup_{measure}', f'speedup_{measure}_fraction'


def speedup_verdicts(summary: Mapping[str, float]) -> list[str]:
  """One Markdown line per measure of `sparse_speedup`: the ratio, its share of the analytic FLOP
  ratio and whether it meets SPEEDUP_AIM."""
  lines = []
  for measure, label in SPEEDUP_MEASURES:
    key, fraction_key = _speedup_keys(measure)
    if key not in summary:
      continue
    fraction = summary[fraction_key]
    lines.append(
      f'- by {label}: {summary[key]:.2f}x = {100 * fraction:.1f}% of the analytic '
      f'{summary["speedup_analytic"]:.2f}x (aim >= {100 * SPEEDUP_AIM:.0f}%: '
      f'{"met" if fraction >= SPEEDUP_AIM else "NOT met"})'
    )
  return lines


@dataclasses.dataclass(frozen=True)
class BenchSetting:
  """What one bench run measured under: its command line, the device and host (`device_info`),
  the host tuning applied, the sparse-vs-dense model (`preset`, `cfg`), the input (batch clips of
  `frames` frames), timed runs per case, and the measured matmul peak (FLOP/s)."""

  command: str
  info: dict
  tuning: str
  preset: str
  cfg: Any
  batch: int
  frames: int
  repeats: int
  peak: float
  torch_peak: float | None = None  # PyTorch's FLOP/s on the same product, when it ran


def markdown_summary(
  setting: BenchSetting,
  rows: Mapping[str, dict],
  summary: dict,
  comparisons: list,
  notes: Mapping[str, str | None],
) -> list[str]:
  """The Markdown section README records: sparse vs dense, then JAX vs PyTorch per width.
  `notes['dense']` / `notes['torch']`: why that part was skipped (None: it ran)."""
  command, info, tuning, preset, cfg = (
    setting.command,
    setting.info,
    setting.tuning,
    setting.preset,
    setting.cfg,
  )
  batch, frames, repeats, peak = setting.batch, setting.frames, setting.repeats, setting.peak
  dense_note, torch_note = notes['dense'], notes['torch']
  on_cpu = info['backend'] == 'cpu'
  env_text = env_settings(info)
  cpu_col = ' CPU s/step (user + sys) |' if on_cpu else ''
  lines = [
    '',
    '## Encoder benchmark',
    '',
    f'`{command}`',
    '',
    f'Device: {info["device_kind"]} ({info["backend"]}), {info["cpu_count"]} CPUs'
    f'{" (" + info["cpu_model"] + ")" if "cpu_model" in info else ""}; jax {info["jax"]}'
    f'{"; env `" + env_text + "`" if env_text else ""}; {tuning}.',
    '',
    f'Sparse vs dense: {preset} (width {cfg.width}, depth {cfg.depth}, heads '
    f'{cfg.num_heads}, MLP {cfg.mlp_dim}), {cfg.dtype}, attention {cfg.attention}; batch '
    f'{batch}, {frames} frames; forward+backward; '
    + (
      f'the sparse step timed {repeats} times before and {repeats} after the dense one, the '
      'median over both blocks'
      if len(rows) > 1 and all('median_s' in r for r in rows.values())
      else f'median of {repeats}'
    )
    + f' ({" / ".join(str(r.get("warmup_rounds", "-")) for r in rows.values())} warm-up runs)'
    + ('; CPU times are per-run medians too' if on_cpu else '')
    + f'. Matmul peak measured: {peak / 1e9:.1f} GFLOP/s.',
    '',
    '| case | tokens | GFLOP (fwd+bwd) | time | GFLOP/s | % of matmul peak | compile |' + cpu_col,
    '|---|---:|---:|---:|---:|---:|---:|' + ('---:|' if on_cpu else ''),
  ]
  for name, row in rows.items():
    if 'median_s' not in row:
      lines.append(
        f'| {name} | {row["tokens"]} | {row["flops"] / 1e9:.1f} | skipped | | | |'
        + (' |' if on_cpu else '')
      )
      continue
    lines.append(
      f'| {name} | {row["tokens"]} | {row["flops"] / 1e9:.1f} | '
      f'{format_seconds(row["median_s"])} | {row["flops_per_s"] / 1e9:.1f} | '
      f'{100 * row["peak_fraction"]:.0f}% | {row["compile_s"]:.1f} s |'
      + (
        f' {format_cpu_seconds(row["user_s"])} + {format_cpu_seconds(row["sys_s"])} |'
        if on_cpu
        else ''
      )
    )
  lines.append('')
  if summary:
    lines.append(
      'Sparse speedup (dense / sparse step time) against the analytic FLOP ratio, per measure; '
      'each verdict holds for the environment above:'
    )
    lines += speedup_verdicts(summary)
  else:
    lines.append(f'Sparse speedup: dense case {dense_note}.')
  lines.append('')
  if not comparisons:
    lines.append(f'JAX vs PyTorch: {torch_note}.')
    return lines
  t = comparisons[0]['torch']
  lines += [
    f"JAX vs our PyTorch port run the release's way (torch {t['version']} on "
    f'{t["device"]}, {t["threads"]} threads, {t["attention"]} attention, the K patches '
    f'packed into frames with visible indices), {cfg.dtype}, forward+backward, the two '
    f'steps alternated {repeats} times after '
    f'{" / ".join(str(c["jax"]["warmup_rounds"]) for c in comparisons)} warm-up rounds at '
    'the widths below (beyond those asked for while the heap still grew, '
    '`benchmarks.paired_runs`). Speed = PyTorch time / JAX time (above 1: ours is faster), '
    'median [min, max] over the pairs.'
    + (
      f' The same square matmul as the peak above runs at {setting.torch_peak / 1e9:.1f} '
      f"GFLOP/s in PyTorch ({setting.torch_peak / setting.peak:.2f}x JAX's "
      f'{setting.peak / 1e9:.1f}): the GEMM libraries of the two sides on this machine.'
      if setting.torch_peak
      else ''
    ),
    '',
    '| width | depth | heads | MLP | JAX | PyTorch | speed | speed by CPU time |'
    + (
      ' JAX CPU s (user + sys) | PyTorch CPU s | page faults a step (JAX, PyTorch) |'
      if on_cpu
      else ''
    )
    + ' agree |',
    '|---:|---:|---:|---:|---:|---:|---:|---:|' + ('---:|---:|---:|' if on_cpu else '') + '---|',
  ]
  for c in comparisons:
    j, t = c['jax'], c['torch']
    cpu_cells = (
      f' {format_cpu_seconds(j["user_s"])} + {format_cpu_seconds(j["sys_s"])} | '
      f'{format_cpu_seconds(t["user_s"])} + {format_cpu_seconds(t["sys_s"])} | '
      f'{j["page_faults"]:.0f}, {t["page_faults"]:.0f} |'
      if on_cpu
      else ''
    )
    agree = f'{"yes" if c["check"]["agree"] else "NO"} ({c["check"]["grad_max_rel_diff"]:.0e})'
    lines.append(
      f'| {c["width"]} | {c["depth"]} | {c["heads"]} | {c["mlp"]} | '
      f'{format_seconds(j["median_s"])} | {format_seconds(t["median_s"])} | '
      f'{c["speed"]:.2f}x [{c["speed_min"]:.2f}, {c["speed_max"]:.2f}] | '
      f'{c["speed_cpu"]:.2f}x |{cpu_cells} {agree} |'
    )
  worst = min(c['speed'] for c in comparisons)
  lines += [
    '',
    f'Slowest width: {worst:.2f}x the PyTorch speed (aim >= {TORCH_AIM:g}x: '
    f'{"met" if worst >= TORCH_AIM else "NOT met"}; target {TORCH_TARGET:g}x: '
    f'{"met" if worst >= TORCH_TARGET else "not met"}).',
  ]
  return lines
