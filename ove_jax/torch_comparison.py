"""Our encoder step against our PyTorch port run the release's way, for `ove-bench-encoder`: the
sparse input packed into frames as the release's trainer feeds its model, the PyTorch step
(forward + backward of the same loss on the same weights), how far the two agree, and both
timed side by side. The JAX side, timing and rates are `ove_jax.benchmarks`'.
"""

from __future__ import annotations

import statistics
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ove_jax import benchmarks as bench
from ove_jax.benchmarks import GRID, PATCHES_PER_FRAME
from ove_jax.models import encoder as enc


def release_inputs(patches_BxKxP: np.ndarray, positions_BxKx3: np.ndarray, patch_size: int):
  """The sparse input as the release's trainer feeds its model: the K patches packed into
  K / 256 frames of pixels [B, 3, K/256, 224, 224] (channels first), in order, and their flat
  `visible_indices` [B, K] on the clip's frame grid (t * 256 + h * 16 + w), which only place
  them (docs/spec.md §1.3)."""
  b, k, _ = patches_BxKxP.shape
  if k % PATCHES_PER_FRAME:
    raise ValueError(
      f'K = {k} patches do not pack into whole frames of {PATCHES_PER_FRAME}; '
      f'choose --budget as a multiple of {PATCHES_PER_FRAME}'
    )
  frames = k // PATCHES_PER_FRAME
  ps = patch_size
  x = patches_BxKxP.reshape(b, frames, GRID, GRID, ps, ps, -1)  # (row, column, channel)
  x = x.transpose(0, 6, 1, 2, 4, 3, 5).reshape(b, -1, frames, GRID * ps, GRID * ps)
  t, h, w = (positions_BxKx3[..., i].astype(np.int64) for i in range(3))
  return np.ascontiguousarray(x), t * PATCHES_PER_FRAME + h * GRID + w


def make_torch_step(model, cfg, patches_np, positions_np, *, dtype, attention: str = 'eager'):
  """Exports `model` and loads it in our PyTorch port, with `attention` ('eager', as the release
  runs on CPU, or 'sdpa'); the step is the JAX step's (loss sum(pooled^2), all gradients) on the
  same input given the release's way (`release_inputs`: pixels packed into frames, and
  `visible_indices`).

  Returns (step, results): `step()` runs one forward + backward; `results()` returns (pooled
  [B, C] numpy, loss, grads keyed like the release state dict, info dict)."""
  import contextlib  # pylint: disable=g-import-not-at-top

  import torch  # pylint: disable=g-import-not-at-top

  from ove_jax.convert import hf, torch_model  # pylint: disable=g-import-not-at-top

  # Torch on the same kind of device as JAX, so the ratio compares like with like.
  on_gpu = jax.default_backend() == 'gpu' and torch.cuda.is_available()
  device = torch.device('cuda' if on_gpu else 'cpu')
  with tempfile.TemporaryDirectory() as directory:
    hf.save_pytorch(model, directory)
    tmodel = torch_model.load_pretrained(directory).to(device).train()
  torch_model.set_attention_implementation(tmodel, attention)
  for p in tmodel.parameters():
    p.requires_grad_(True)
  pixels_np, indices_np = release_inputs(patches_np, positions_np, cfg.patch_size)
  pixels = torch.from_numpy(pixels_np).to(device)
  indices = torch.from_numpy(indices_np).to(device)
  # Our bfloat16 is mixed precision (float32 parameters, bfloat16 compute): autocast is that.
  autocast = (
    torch.autocast(device.type, dtype=torch.bfloat16)
    if dtype == 'bfloat16'
    else contextlib.nullcontext()
  )
  sync = torch.cuda.synchronize if on_gpu else (lambda: None)

  def forward():
    with autocast:
      return tmodel(pixels, visible_indices=indices)['pooler_output']

  def step():
    for p in tmodel.parameters():
      p.grad = None
    loss = forward().float().square().sum()
    loss.backward()
    sync()
    return loss

  def results():
    loss = float(step().detach())
    grads = {k: p.grad.float().cpu().numpy() for k, p in tmodel.named_parameters()}
    with torch.no_grad():
      pooled = forward().float().cpu().numpy()
    info = {
      'device': str(device),
      'attention': attention,
      'threads': torch.get_num_threads(),
      'version': torch.__version__,
    }
    return pooled, loss, grads, info

  return step, results


def torch_matmul_peak_flops(
  dtype: str = 'float32', repeats: int = 5, size: int | None = None
) -> float:
  """PyTorch's FLOP/s on `metrics.matmul_peak_flops`'s product (a square matmul of `size`,
  default `metrics.peak_matmul_size()`): what the same machine's GEMM library gives the other
  side of the comparison."""
  from ove_jax import metrics

  size = size or metrics.peak_matmul_size()
  return torch_matmul_flops(size, size, size, dtype, repeats)


def torch_matmul_flops(m: int, k: int, n: int, dtype: str = 'float32', repeats: int = 5) -> float:
  """FLOP/s of the fastest of `repeats` runs (after a warm-up) of an [m, k] @ [k, n] matmul in
  PyTorch, on the device `make_torch_step` uses, with its threads (`metrics.matmul_flops`'s
  counterpart)."""
  import time  # pylint: disable=g-import-not-at-top

  import torch  # pylint: disable=g-import-not-at-top

  on_gpu = jax.default_backend() == 'gpu' and torch.cuda.is_available()
  device = torch.device('cuda' if on_gpu else 'cpu')
  sync = torch.cuda.synchronize if on_gpu else (lambda: None)
  rng = np.random.default_rng(0)
  a, b = (
    torch.from_numpy(rng.standard_normal(shape, np.float32)).to(device, getattr(torch, dtype))
    for shape in ((m, k), (k, n))
  )
  with torch.no_grad():
    a @ b  # warm-up
    sync()
    best = float('inf')
    for _ in range(max(1, repeats)):
      tick = time.perf_counter()
      a @ b
      sync()
      best = min(best, time.perf_counter() - tick)
  return 2 * m * k * n / best


def max_rel_diff(a, b) -> float:
  """max |a - b| / max |b|: relative to the tensor's scale, so near-zero entries do not blow up."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def torch_unavailable(skip: bool) -> str | None:
  """Why the PyTorch comparison does not run, or None when it does."""
  if skip:
    return 'skipped (--skip-torch)'
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return 'skipped: torch is not installed (pip install -e .[torch])'
  if jax.default_backend() != 'cpu' and not torch.cuda.is_available():
    return (
      f'skipped: JAX runs on {jax.default_backend()} but this torch has no CUDA; a '
      'GPU/TPU against a CPU says nothing about the code'
    )
  return None


def torch_agreement(
  cfg,
  jax_grads,
  jax_pooled,
  jax_loss: float,
  t_pooled,
  t_loss: float,
  t_grads: Mapping[str, np.ndarray],
) -> dict[str, Any]:
  """How far our PyTorch port's pooled output, loss and gradients are from JAX's, and whether
  they agree: float32 judges output and gradients at 1e-4; bfloat16 the output at 5e-2 (our
  bfloat16 rounds every layer's output, autocast keeps norms and softmax in float32, so small
  gradients such as norm biases differ by tens of percent)."""
  from ove_jax.convert import hf  # pylint: disable=g-import-not-at-top

  flat = {tuple(path): np.asarray(v[...]) for path, v in nnx.to_flat_state(jax_grads)}
  jax_grads_hf = hf.params_to_hf(flat, cfg)
  grad_diffs = {key: max_rel_diff(jax_grads_hf[key], t_grads[key]) for key in t_grads}
  worst = max(grad_diffs, key=grad_diffs.get)
  check = {
    'pooled_max_rel_diff': max_rel_diff(jax_pooled, t_pooled),
    'loss_jax': jax_loss,
    'loss_torch': t_loss,
    'grad_max_rel_diff': grad_diffs[worst],
    'grad_worst_key': worst,
  }
  if cfg.dtype == 'float32':
    tol = 1e-4
    check['agree'] = max(check['pooled_max_rel_diff'], check['grad_max_rel_diff']) < tol
  else:
    tol = 5e-2
    check['agree'] = check['pooled_max_rel_diff'] < tol
  check['tolerance'] = tol
  return check


def compare_with_torch(
  cfg, *, batch: int, frames: int, budget: int, seed: int, warmup: int, repeats: int, peak: float
) -> dict[str, Any]:
  """Our JAX step against our PyTorch port run the release's way (`make_torch_step`: eager
  attention, pixels packed into frames with visible indices), on the same weights and the same
  sparse input of `budget` patches, timed side by side (`benchmarks.paired_runs`); with their
  agreement.

  'speed' is PyTorch time / JAX time per pair of runs (above 1: ours is faster): its median,
  min and max, and the same ratio of CPU time (user + system) per step."""
  _, (sparse_x, sparse_pos) = bench.clip_inputs(cfg, batch, frames, budget, seed)
  model = enc.create_encoder(cfg, seed=seed)
  step, forward, params = bench.make_jax_step(model)
  x, pos = jnp.asarray(sparse_x), jnp.asarray(sparse_pos)
  compiled, run_jax = bench.compile_jax(step, params, x, pos)
  run_torch, torch_results = make_torch_step(model, cfg, sparse_x, sparse_pos, dtype=cfg.dtype)
  timing = bench.paired_runs({'jax': run_jax, 'torch': run_torch}, warmup=warmup, repeats=repeats)
  jax_loss, jax_grads = run_jax()
  jax_pooled = np.asarray(forward(params, x, pos)[:, 0], np.float32)
  t_pooled, t_loss, t_grads, info = torch_results()
  check = torch_agreement(cfg, jax_grads, jax_pooled, float(jax_loss), t_pooled, t_loss, t_grads)
  jax_row = bench.add_rates({**compiled, **timing['jax']}, cfg, batch, budget, peak)
  torch_row = bench.add_rates({**timing['torch'], **info}, cfg, batch, budget, peak)
  ratios = [t / j for j, t in zip(jax_row['times_s'], torch_row['times_s'])]
  cpu = lambda row: row['user_s'] + row['sys_s']
  return {
    'width': cfg.width,
    'depth': cfg.depth,
    'heads': cfg.num_heads,
    'mlp': cfg.mlp_dim,
    'params': enc.num_params(cfg),
    'jax': jax_row,
    'torch': torch_row,
    'check': check,
    'speed': statistics.median(ratios),
    'speed_min': min(ratios),
    'speed_max': max(ratios),
    'speed_cpu': cpu(torch_row) / cpu(jax_row),
  }
