"""Checks for a GPU machine (NVIDIA H100/H200): attention paths against xla, and train steps.

Two parts, each a list of results that say pass, fail, skipped (with the reason) or error:

  attention  every implementation of ove_jax.models.attention against the 'xla' reference on the
             same device, on packed rows (several segments and padding per row), outputs and
             gradients (of q, k, v) in float32 and bfloat16; pass when the largest error is
             within the tolerance of docs/spec.md §1.4 (1e-4 fp32, 1e-2 bf16) times the
             reference's scale (max(1, max |reference|)).
  steps      a stage-2-like train step (experiments/stage2_video.py's heads, per-device batches
             and settings, synthetic inputs of the right shapes) for the presets asked for, with
             their scanned layers: step time after warm-up (block_until_ready), MFU against the
             device's peak (ove_jax.metrics), and the device's peak memory
             (`memory_stats()['peak_bytes_in_use']`, a process-wide high-water mark: the peak
             before the step is reported too) next to the compiler's ahead-of-time plan
             for the very executable that is timed (`memory_analysis()`: arguments + outputs -
             aliased + temporaries).

On a machine without a GPU (`tiny=True`, CPU) it runs what it can: xla, jax and the Pallas
kernels in interpret mode, a tiny-preset step; what needs a GPU is reported as skipped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ove_jax import config as config_lib
from ove_jax import memory, metrics, train
from ove_jax.gpu_report import ERROR, FAIL, GPU_PLATFORMS, PASS, SKIPPED, is_gpu, summary
from ove_jax.models import attention

# docs/spec.md §1.4: the tolerance seen between the release's own attention kernels.
TOLERANCES = {'float32': 1e-4, 'bfloat16': 1e-2}
# Where each implementation runs natively; elsewhere the Pallas kernels run interpreted.
NATIVE = {
  'xla': None,
  'jax': None,
  'cudnn': GPU_PLATFORMS,
  'splash': ('tpu',),
  'pallas_gpu': GPU_PLATFORMS,
}


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------


def packed_inputs(batch: int, length: int, heads: int, head_dim: int, seed: int = 0):
  """(q, k, v [B, L, H, D] float32, segment_ids [B, L], cotangent [B, L, H, D]): each row packs
  segments of uneven lengths (1, 2, 3, ...) and ends in padding (id 0); the cotangent is zero on
  padding, whose outputs are never read, so every path's padding gradients are zero too."""
  rng = np.random.default_rng(seed)
  q, k, v, cot = (
    rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32) for _ in range(4)
  )
  segment_ids = np.zeros((batch, length), np.int32)
  for b in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length - length // 8), size=2 + b % 2, replace=False))
    bounds = [0, *cuts, length - length // 8]  # the last eighth (at least) is padding
    for s, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
      segment_ids[b, lo:hi] = s + 1
  cot *= (segment_ids > 0)[:, :, None, None]
  return q, k, v, segment_ids, cot


def errors(got, want) -> dict[str, float]:
  """Largest absolute error, the reference's scale (max(1, max |want|)) and their ratio."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if got.shape != want.shape:
    raise ValueError(f'shape {got.shape} against the reference {want.shape}')
  max_abs = float(np.max(np.abs(got - want))) if got.size else 0.0
  if not math.isfinite(max_abs):
    max_abs = math.inf
  scale = max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
  return {'max_abs': max_abs, 'scale': scale, 'max_rel': max_abs / scale}


def compare(
  outputs: Mapping[str, Any], reference: Mapping[str, Any], tolerance: float
) -> dict[str, Any]:
  """Every named array of `outputs` ('out', 'dq', 'dk', 'dv') against `reference`: pass when
  each one's largest error is within `tolerance` x the reference's scale (NaN fails)."""
  per = {name: errors(outputs[name], reference[name]) for name in reference}
  worst = max(per.values(), key=lambda e: e['max_rel'])
  ok = all(e['max_rel'] <= tolerance for e in per.values())
  return {
    'status': PASS if ok else FAIL,
    'tolerance': tolerance,
    'max_abs': worst['max_abs'],
    'max_rel': worst['max_rel'],
    'errors': per,
  }


def attention_outputs(
  implementation: str, inputs, dtype: str, *, interpret: bool = False
) -> dict[str, np.ndarray]:
  """Output (real tokens only; padding is zeroed) and gradients of q, k, v of one path."""
  q, k, v, segment_ids, cot = inputs
  real = jnp.asarray(segment_ids > 0)[:, :, None, None]

  def loss(q, k, v):
    out = attention.dot_product_attention(
      q, k, v, segment_ids, implementation=implementation, interpret=interpret
    )
    return jnp.sum(out.astype(jnp.float32) * cot), out

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  cast = [jnp.asarray(x, jnp.dtype(dtype)) for x in (q, k, v)]
  (_, out), (dq, dk, dv) = fn(*cast)
  out = jnp.where(real, out, 0)
  return {
    name: np.asarray(jax.device_get(x).astype(np.float32))
    for name, x in (('out', out), ('dq', dq), ('dk', dk), ('dv', dv))
  }


def attention_plan(platform: str, implementations: Sequence[str]) -> list[tuple[str, bool, str]]:
  """(implementation, interpret, reason to skip or '') for each path on `platform`: native where
  it runs natively, the Pallas kernels interpreted off their hardware except on a GPU (there
  the interpreter would only test the interpreter), cudnn only on a GPU."""
  plan = []
  for name in implementations:
    native = NATIVE[name]
    if native is None or platform in native:
      plan.append((name, False, ''))
    elif name in attention.KERNEL_IMPLEMENTATIONS and not is_gpu(platform):
      plan.append((name, True, ''))
    else:
      plan.append(
        (
          name,
          False,
          f'needs a {"GPU" if native == GPU_PLATFORMS else "TPU"}; the backend is {platform}',
        )
      )
  return plan


def check_attention(
  platform: str,
  *,
  implementations: Sequence[str] | None = None,
  dtypes: Sequence[str] = ('float32', 'bfloat16'),
  batch: int = 2,
  length: int = 512,
  heads: int = 4,
  head_dim: int = 64,
  fp32_precision: str = 'highest',
  on_result: Callable[[str, dict], None] | None = None,
) -> list[dict[str, Any]]:
  """One result per (implementation, dtype) against 'xla' in the same dtype on this backend,
  each also handed to `on_result('attention', result)` as it is made.

  float32 runs under `jax.default_matmul_precision(fp32_precision)`: at 'highest' the reference
  is a float32 computation (GPUs otherwise use TF32 for float32 dots, which alone exceeds 1e-4).
  cudnn computes float32 inputs in bfloat16 (attention.py), so its float32 result is held to the
  bfloat16 tolerance and says so."""
  implementations = [i for i in (implementations or attention.IMPLEMENTATIONS) if i != 'xla']
  inputs = packed_inputs(batch, length, heads, head_dim)
  results = []

  def add(result: dict[str, Any]) -> None:
    results.append(result)
    if on_result is not None:
      on_result('attention', result)

  for dtype in dtypes:
    precision = fp32_precision if dtype == 'float32' else 'default'
    with jax.default_matmul_precision(precision):
      try:
        reference = attention_outputs('xla', inputs, dtype)
      except Exception as e:  # pylint: disable=broad-except  (every path of this dtype fails)
        reference, broken = None, f'the xla reference raised {type(e).__name__}: {e}'[:500]
      for name, interpret, skip in attention_plan(platform, implementations):
        r = {
          'implementation': name,
          'dtype': dtype,
          'interpret': interpret,
          'shape': [batch, length, heads, head_dim],
          'precision': precision,
        }
        if skip:
          add({**r, 'status': SKIPPED, 'reason': skip})
          continue
        if reference is None:
          add({**r, 'status': ERROR, 'reason': broken})
          continue
        compute = 'bfloat16' if name == 'cudnn' else dtype
        note = {'note': 'cudnn computes float32 inputs in bfloat16'} if compute != dtype else {}
        try:
          got = attention_outputs(name, inputs, dtype, interpret=interpret)
          result = {**r, **note, **compare(got, reference, TOLERANCES[compute])}
        except Exception as e:  # pylint: disable=broad-except  (a broken path is a result)
          result = {**r, 'status': ERROR, 'reason': f'{type(e).__name__}: {e}'[:500]}
        add(result)
  return results


# Attention paths a GPU train step may use, best first: the first whose bfloat16 check passed.
STEP_ATTENTION_ORDER = ('cudnn', 'pallas_gpu')


def step_attention_for(platform: str, attention_results: Sequence[Mapping[str, Any]]) -> str:
  """The train steps' attention path: on a GPU the first of STEP_ATTENTION_ORDER whose bfloat16
  check passed here (the steps run in bfloat16), else 'xla'."""
  if is_gpu(platform):
    passed = {
      r['implementation']
      for r in attention_results
      if r.get('dtype') == 'bfloat16' and r.get('status') == PASS
    }
    for name in STEP_ATTENTION_ORDER:
      if name in passed:
        return name
  return 'xla'


# ------------------------------------------------------------------------------------------------
# Train steps
# ------------------------------------------------------------------------------------------------


def step_config(
  preset: str,
  num_devices: int,
  *,
  tiny: bool = False,
  classes: int = 0,
  attention_impl: str = 'xla',
):
  """experiments/stage2_video.py sized for `num_devices` (its per-GPU batches 16 / 8 / 16, its
  heads, bf16, remat, optimiser), one micro-batch a step, on `preset` with scanned layers.
  `classes` > 0 replaces every head's class count (to fit a smaller device); `tiny` shrinks it
  to seconds on a CPU: the given preset, 2 rows a head and device, 112-pixel images (64 tokens),
  2-frame clips of 512 tokens, 1024 classes, float32 without remat (XLA:CPU compiles bf16 and
  remat slowly, and the tiny step is there to check the tool, not the numerics)."""
  c = config_lib.load(
    f'stage2_video:gpus={num_devices},fsdp={num_devices}',
    [f'model.preset={preset}', f'model.attention={attention_impl}'],
  )
  c.model.scan_layers = True
  c.accumulate = 1
  c.data.mixing = 'all'
  if tiny:
    classes = classes or 1024
    c.model.dtype, c.model.remat = 'float32', 'none'
    c.loss.sampling_blocks = 8 * num_devices
    for name in ('image', 'ocr'):
      c.data.heads[name].update(dict(rows=2 * num_devices, tokens_per_row=64, resolution=112))
    c.data.heads.video.update(dict(rows=2 * num_devices, tokens_per_row=512, num_frames=2))
  if classes:
    for name in c.heads:
      c.heads[name].num_classes = classes
  config_lib.validate(c)
  return c


def synthetic_batch(program, config, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """One host micro-batch ({head: fields}) of the config's shapes: random uint8/float patches,
  (t, h, w) positions on a 32-wide grid (images) or 16-wide frames (video), one segment a row,
  random labels below the head's class count."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, h in sorted(config.data.heads.items()):
    rows, length, segments = h.rows, h.tokens_per_row, h.max_segments
    grid = 16 if h.kind == 'video' else 32
    idx = np.arange(length)
    positions = np.stack([idx // (grid * grid), (idx // grid) % grid, idx % grid], -1)
    if config.data.patch_dtype == 'uint8':
      patches = rng.integers(0, 256, (rows, length, program.encoder_cfg.patch_dim), np.uint8)
    else:
      patches = rng.standard_normal((rows, length, program.encoder_cfg.patch_dim), np.float32)
    out[name] = {
      'patches': patches,
      'positions': np.broadcast_to(positions, (rows, length, 3)).astype(np.int32),
      'segment_ids': np.ones((rows, length), np.int32),
      'labels': rng.integers(
        0, config.heads[name].num_classes, (rows, segments, h.num_labels)
      ).astype(np.int32),
      'segment_valid': np.ones((rows, segments), bool),
      'sample_index': np.arange(rows * segments, dtype=np.int32).reshape(rows, segments),
      'num_skipped': 0,
    }
  return out


def memory_stat(device, name: str) -> int | None:
  """One of the device's memory_stats() (None where the backend keeps none)."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return int(stats[name]) if stats and name in stats else None


def peak_bytes(device) -> int | None:
  """The device's peak allocation so far in this process (None where the backend keeps none)."""
  return memory_stat(device, 'peak_bytes_in_use')


@dataclasses.dataclass(frozen=True)
class StepTiming:
  """How a train step is timed: `warmup` untimed steps after compiling, then `steps` timed ones
  (their median is the step time), and the peak FLOP/s of one device that MFU is taken against
  (0: `metrics.peak_flops_per_device`'s device table). One value from ove-gpu-check's --warmup,
  --steps and --peak-flops down to `check_step`."""

  warmup: int = 2
  steps: int = 5
  peak_flops: float = 0.0

  def __post_init__(self):
    if self.warmup < 0 or self.steps < 1:
      raise ValueError(
        f'StepTiming(warmup={self.warmup}, steps={self.steps}): warmup must be >= 0 and '
        'steps >= 1 (the step time is the median of the timed steps)'
      )
    if not 0 <= self.peak_flops < float('inf'):
      raise ValueError(
        f'StepTiming(peak_flops={self.peak_flops}): a finite FLOP/s >= 0 (0: the device table)'
      )


def check_step(config, devices: Sequence, timing: StepTiming = StepTiming()) -> dict[str, Any]:
  """Compiles, plans, warms up and times one config's train step on `devices`."""
  mesh = train.make_mesh(config, devices)
  before = peak_bytes(devices[0])  # the process's peak so far (earlier checks, steps)
  with jax.set_mesh(mesh):
    program = train.Program(config, mesh)
    state = program.init()
    host = synthetic_batch(program, config)
    batch = program.device_batch([host] * config.accumulate)
    t0 = time.perf_counter()
    compiled = program.step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - t0
    after_compile = peak_bytes(devices[0])  # the compiler's autotuning allocates too
    plan = memory.plan_bytes(compiled.memory_analysis())
    times, aux = [], None
    for i in range(timing.warmup + timing.steps):
      tick = time.perf_counter()
      state, aux = compiled(state, batch)
      jax.block_until_ready((state, aux))
      if i >= timing.warmup:
        times.append(time.perf_counter() - tick)
    flops = int(program.flops_per_step(batch))
  peak, source = metrics.peak_flops_per_device(devices[0], override=timing.peak_flops)
  seconds = statistics.median(times)
  measured = peak_bytes(devices[0])
  planned = plan['total_bytes']
  loss = float(aux['loss'])
  return {
    'status': PASS if math.isfinite(loss) else FAIL,
    'preset': config.model.preset,
    'scan_layers': bool(program.encoder_cfg.scan_layers),
    'dtype': config.model.dtype,
    'remat': config.model.remat,
    'attention': config.model.attention,
    'devices': len(devices),
    'mesh': {k: int(v) for k, v in mesh.shape.items()},
    'rows': {n: int(h.rows) for n, h in sorted(config.data.heads.items())},
    'tokens_per_row': {n: int(h.tokens_per_row) for n, h in sorted(config.data.heads.items())},
    'classes': {n: int(h.num_classes) for n, h in sorted(config.heads.items())},
    'loss': loss,
    'compile_seconds': round(compile_seconds, 2),
    'step_seconds': seconds,
    'step_seconds_min': min(times),
    'timed_steps': len(times),
    'flops_per_step': flops,
    'peak_flops_per_device': peak,
    'peak_source': source,
    'mfu': flops / seconds / (peak * len(devices)) if peak > 0 else None,
    'peak_bytes_in_use': measured,
    'peak_bytes_before': before,
    'peak_bytes_after_compile': after_compile,
    'bytes_limit': memory_stat(devices[0], 'bytes_limit'),
    'plan': plan,
    'peak_over_plan': measured / planned if measured and planned else None,
  }


def check_steps(
  platform: str,
  devices: Sequence,
  presets: Sequence[str],
  *,
  tiny: bool,
  classes: int = 0,
  attention_impl: str | None = None,
  timing: StepTiming = StepTiming(),
  on_result: Callable[[str, dict], None] | None = None,
  fallback: bool = True,
) -> list[dict[str, Any]]:
  """One result per preset (each also handed to `on_result('steps', result)`); a step that
  raises (out of memory, say) is an 'error' result. With `fallback`, a step on another attention
  path than xla that raises (not for lack of memory) is run once more on xla: its figures are
  xla's, its status 'fail' (the path asked for did not run), its `attention_fallback` the path
  and its error. Without a GPU only `tiny` steps run (base/large would take hours on a CPU)."""
  impl = attention_impl or ('cudnn' if is_gpu(platform) else 'xla')
  results = []
  for preset in presets:
    if not tiny and not is_gpu(platform):
      result = {
        'preset': preset,
        'status': SKIPPED,
        'reason': f'a {preset} step needs a GPU; the backend is {platform} '
        '(use --tiny for a tiny step)',
      }
    else:
      result = _step_result(preset, devices, tiny, classes, impl, timing)
      if fallback and result['status'] == ERROR and impl != 'xla' and not _out_of_memory(result):
        retry = _step_result(preset, devices, tiny, classes, 'xla', timing)
        result = {**retry, 'attention_fallback': {'from': impl, 'reason': result['reason']}}
        if result['status'] == PASS:
          result['status'] = FAIL
    results.append(result)
    if on_result is not None:
      on_result('steps', result)
  return results


def _out_of_memory(result: Mapping[str, Any]) -> bool:
  reason = result.get('reason', '')
  return 'RESOURCE_EXHAUSTED' in reason or 'out of memory' in reason.lower()


def _step_result(preset, devices, tiny, classes, impl, timing) -> dict[str, Any]:
  try:
    config = step_config(preset, len(devices), tiny=tiny, classes=classes, attention_impl=impl)
    return check_step(config, devices, timing)
  except Exception as e:  # pylint: disable=broad-except  (an OOM is a result, not a crash)
    return {
      'preset': preset,
      'attention': impl,
      'status': ERROR,
      'reason': f'{type(e).__name__}: {e}'[:1000],
    }


def environment(devices: Sequence) -> dict[str, Any]:
  """What a GPU result cannot be read without: jax and jaxlib versions, the CUDA and cuDNN
  versions jaxlib reports, the device's compute capability and memory limit, and the XLA
  settings of the environment."""
  import jaxlib

  env = {
    'jaxlib': getattr(jaxlib, '__version__', None),
    'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
    **{k: v for k, v in sorted(os.environ.items()) if k.startswith('XLA_PYTHON_CLIENT_')},
    'bytes_limit': memory_stat(devices[0], 'bytes_limit') if devices else None,
    'compute_capability': getattr(devices[0], 'compute_capability', None) if devices else None,
  }
  try:  # jaxlib's own record of the CUDA libraries it runs with (GPU builds)
    from jax._src.lib import cuda_versions

    if cuda_versions is not None:
      env['cuda_runtime'] = cuda_versions.cuda_runtime_get_version()
      env['cudnn'] = cuda_versions.cudnn_get_version()
  except Exception:  # pylint: disable=broad-except  (a CPU build has none)
    pass
  return env


def header(platform: str, devices: Sequence, tiny: bool) -> dict[str, Any]:
  return {
    'platform': platform,
    'device_kind': devices[0].device_kind if devices else None,
    'jax': jax.__version__,
    'tiny': tiny,
    'environment': environment(devices),
  }


PARTS = ('attention', 'steps')


def run(
  *,
  platform: str,
  tiny: bool,
  presets: Sequence[str] = ('base', 'large'),
  implementations: Sequence[str] | None = None,
  num_devices: int = 1,
  classes: int = 0,
  step_attention: str | None = None,
  timing: StepTiming = StepTiming(),
  fp32_precision: str = 'highest',
  parts: Sequence[str] = PARTS,
  on_result: Callable[[str, dict], None] | None = None,
  step_fallback: bool = True,
) -> dict[str, Any]:
  """The checks of `parts` on the first `num_devices` devices of the running backend; the report
  dict. `on_result(part, result)` sees each result as it is made. The steps' attention path is
  `step_attention`, else the best GPU path whose bfloat16 check passed (`step_attention_for`)."""
  devices = jax.devices()[:num_devices]
  if len(devices) < num_devices:
    raise ValueError(f'--devices={num_devices}: the {platform} backend has {len(devices)}')
  size = dict(batch=2, length=64, heads=2) if tiny else {}
  report = {**header(platform, devices, tiny), 'attention': [], 'steps': []}
  if 'attention' in parts:
    report['attention'] = check_attention(
      platform,
      implementations=implementations,
      fp32_precision=fp32_precision,
      on_result=on_result,
      **size,
    )
  if 'steps' in parts:
    report['steps'] = check_steps(
      platform,
      devices,
      presets,
      tiny=tiny,
      classes=classes,
      attention_impl=step_attention or step_attention_for(platform, report['attention']),
      timing=timing,
      on_result=on_result,
      fallback=step_fallback,
    )
  report['summary'] = summary(report)
  return report
