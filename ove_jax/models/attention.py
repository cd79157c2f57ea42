"""Multi-head attention over packed rows, behind one switch.

All implementations take `q_BxLxHxD, k_BxLxHxD, v_BxLxHxD` and `segment_ids_BxL` (0 = padding,
1..S = the samples packed in the row) and let a token attend only to tokens of its own segment.
Padding tokens attend among themselves, so every row of the softmax is non-empty and finite;
their outputs are never read.

  xla         einsum + float32 softmax; runs everywhere and is the reference.
  jax         `jax.nn.dot_product_attention(implementation=None)` with the boolean segment mask
              (XLA's own attention lowering); runs everywhere.
  cudnn       `jax.nn.dot_product_attention(implementation='cudnn')` with the boolean segment
              mask (cuDNN flash attention). GPU only. cuDNN takes fp16/bf16 only: float32 inputs
              are cast to bfloat16 for the call and the output is cast back. jax 0.10.2's public
              API has no segment ids, so the mask reaches cuDNN as a dense [B, 1, L, L] bias.
  splash      Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`)
              with `SegmentIds`; TPU only, or anywhere with `interpret=True` (slow; for tests).
  pallas_gpu  Pallas GPU (Triton) flash attention (`jax.experimental.pallas.ops.gpu.attention
              .mha`) with segment ids; GPU only, or anywhere with `interpret=True`.

Both Pallas kernels need the length to be a multiple of their block size, so the rows are padded
on the right up to `padded_length(L, implementation)` with segment id `KERNEL_PAD_ID` (-1), an id
no real token has: real tokens never attend to the added positions, and the added positions
attend only among themselves (not even to the row's own id-0 padding, whose outputs therefore
equal the xla path's). The added positions are cut off again before returning; their gradients
are zero. Both kernels have a backward pass (splash: its dq and dkv kernels; pallas_gpu: its
fused Triton backward kernel).

Pallas kernels cannot be partitioned automatically: when a mesh is set (`jax.set_mesh`), the
kernel paths run under `jax.shard_map`, the batch split over the mesh axes of the logical name
`act_batch` (('data', 'fsdp')) and the heads over those of `act_heads` ('tensor'), each only
where the mesh has that axis and it divides the dimension (otherwise that axis computes
redundantly, replicated). The xla, jax and cudnn paths are left to XLA's partitioner.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ove_jax import sharding
from ove_jax.models import cpu_layouts

IMPLEMENTATIONS = ('xla', 'jax', 'cudnn', 'splash', 'pallas_gpu')
KERNEL_IMPLEMENTATIONS = ('splash', 'pallas_gpu')

# Segment id of the positions added to reach the kernels' block multiple; real ids are >= 0.
KERNEL_PAD_ID = -1

# Splash: block_q and block_kv must be multiples of 128 (TPU lanes) when segment ids are used.
SPLASH_LANE = 128
SPLASH_MAX_BLOCK = 512
# Pallas GPU: Triton tiles must be powers of two (and at least 16 for tensor-core dots).
GPU_BLOCK = 128
GPU_MIN_BLOCK = 16
GPU_BWD_BLOCK = 32


def segment_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """Boolean [B, 1, L, L] mask: query and key in the same segment."""
  s = segment_ids_BxL
  return (s[:, :, None] == s[:, None, :])[:, None]


def xla_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, *, scale: float):
  """Softmax attention written so that XLA (and its autodiff) touch the [B, H, L, L] logits as few
  times as possible; every pass over them is memory-bound on CPU:

  - heads-major einsums: with 'bqhd,bkhd->bhqk' XLA:CPU copied the [L, L] probabilities and
    their gradients into transposed layouts (about 40% of a 2048-token step in
    tools/bench_encoder.py); transposing q, k, v ([L, D] each) instead is cheap;
  - the scale multiplies q ([L, D]), not the logits (1/8 for head_dim 64: exact either way);
  - the softmax is left unnormalised: e = exp(s - max s) feeds the value matmul and the
    [L, D] output is divided by the row sums, instead of dividing the [L, L] probabilities.
    The max is a constant to autodiff (softmax does not depend on it), so the backward pass is
    the flash-attention one: dS = e * (dO / l @ V^T - rowsum(dO * O) / l), one pass over [L, L].
  Masked entries get exp(min - max) = 0; every row keeps its own token, so no row sum is 0.
  On the CPU backend the backward pass is laid out for XLA:CPU's matmul (cpu_layouts.py).
  """
  q_BxHxLxD, k_BxHxLxD, v_BxHxLxD = (
    x.transpose(0, 2, 1, 3) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
  )
  q_BxHxLxD = q_BxHxLxD * jnp.asarray(scale, q_BxHxLxD.dtype)
  o_BxHxLxD = cpu_layouts.attention_core(
    q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, segment_mask(segment_ids_BxL)
  )
  return o_BxHxLxD.astype(v_BxLxHxD.dtype).transpose(0, 2, 1, 3)


def jax_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, *, scale: float):
  return jax.nn.dot_product_attention(
    q_BxLxHxD,
    k_BxLxHxD,
    v_BxLxHxD,
    mask=segment_mask(segment_ids_BxL),
    scale=scale,
    implementation=None,
  )


def _platform() -> str:
  mesh = sharding.current_mesh()
  platform = getattr(mesh, 'platform', None) if mesh is not None else None
  return platform or jax.default_backend()


def cudnn_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, *, scale: float):
  platform = _platform()
  if platform not in ('gpu', 'cuda'):
    raise ValueError(
      f"attention implementation 'cudnn' needs a GPU (cuDNN flash attention), "
      f"but the backend is {platform!r}; use implementation='xla' (or 'jax') "
      f'on this machine'
    )
  dtype = q_BxLxHxD.dtype
  # cuDNN fused attention accepts only fp16/bf16 (and fp8) inputs.
  compute_dtype = dtype if dtype in (jnp.float16, jnp.bfloat16) else jnp.bfloat16
  q, k, v = (x.astype(compute_dtype) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
  out = jax.nn.dot_product_attention(
    q, k, v, mask=segment_mask(segment_ids_BxL), scale=scale, implementation='cudnn'
  )
  return out.astype(dtype)


def padded_length(length: int, implementation: str) -> int:
  """The length the Pallas kernel `implementation` runs at for rows of `length` tokens."""
  if implementation == 'splash':
    return -(-length // SPLASH_LANE) * SPLASH_LANE
  if implementation == 'pallas_gpu':
    if length <= GPU_BLOCK:
      return max(GPU_MIN_BLOCK, 1 << (length - 1).bit_length())
    return -(-length // GPU_BLOCK) * GPU_BLOCK
  raise ValueError(
    f'{implementation!r} is not a Pallas kernel; choose one of {KERNEL_IMPLEMENTATIONS}'
  )


def _splash_block(length_padded: int) -> int:
  """Largest of 512, 256, 128 that divides the (128-multiple) padded length."""
  block = SPLASH_MAX_BLOCK
  while length_padded % block:
    block //= 2
  return block


def _splash_kernel(
  q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, *, scale: float, interpret: bool
):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top

  _, length, num_heads, _ = q_BxLxHxD.shape
  block = _splash_block(length)
  # One block size for every pass (forward, dK/dV, dQ): each of the kernel's block_* fields.
  fields = dataclasses.fields(splash.BlockSizes)
  block_sizes = splash.BlockSizes(**{f.name: block for f in fields if f.name.startswith('block_')})
  # Every (query, key) pair is allowed by the static mask; segment ids do all the masking.
  mask = splash.MultiHeadMask([splash.FullMask((length, length))] * num_heads)
  kernel = splash.make_splash_mha(
    mask, head_shards=1, q_seq_shards=1, block_sizes=block_sizes, interpret=interpret
  )
  # Splash applies no softmax scale: fold it into q (in float32, then back to q's dtype).
  q_BxHxLxD = (q_BxLxHxD.astype(jnp.float32) * scale).astype(q_BxLxHxD.dtype)
  q_BxHxLxD = q_BxHxLxD.transpose(0, 2, 1, 3)
  k_BxHxLxD = k_BxLxHxD.transpose(0, 2, 1, 3)
  v_BxHxLxD = v_BxLxHxD.transpose(0, 2, 1, 3)

  def one_row(q_HxLxD, k_HxLxD, v_HxLxD, segment_ids_L):
    return kernel(
      q_HxLxD, k_HxLxD, v_HxLxD, segment_ids=splash.SegmentIds(q=segment_ids_L, kv=segment_ids_L)
    )

  out_BxHxLxD = jax.vmap(one_row)(q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, segment_ids_BxL)
  return out_BxHxLxD.transpose(0, 2, 1, 3)


def _pallas_gpu_kernel(
  q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, *, scale: float, interpret: bool
):
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # pylint: disable=g-import-not-at-top

  length = q_BxLxHxD.shape[1]
  block = min(GPU_BLOCK, length)
  bwd_block = min(GPU_BWD_BLOCK, length)
  backward = dict.fromkeys(('block_q_dkv', 'block_kv_dkv', 'block_q_dq', 'block_kv_dq'), bwd_block)
  block_sizes = gpu_attention.BlockSizes(block_q=block, block_k=block, **backward)
  return gpu_attention.mha(
    q_BxLxHxD,
    k_BxLxHxD,
    v_BxLxHxD,
    segment_ids_BxL,
    sm_scale=scale,
    block_sizes=block_sizes,
    interpret=interpret,
  )


def _fit_axes(entry, dim: int, mesh) -> tuple[str, ...]:
  """Mesh axes of a rules entry that this mesh has, is not already manual over, and that split
  `dim` evenly (taken in order, greedily)."""
  names = (entry,) if isinstance(entry, str) else tuple(entry or ())
  manual = set(getattr(mesh, 'manual_axes', ()) or ())
  kept, size = [], 1
  for name in names:
    if name not in mesh.axis_names or name in manual:
      continue
    n = mesh.shape[name]
    if dim % (size * n) == 0:
      kept.append(name)
      size *= n
  return tuple(kept)


def _spec_entry(axes: tuple[str, ...]):
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def _run_kernel(
  implementation, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, *, scale: float, interpret: bool
):
  platform = _platform()
  needs = {'splash': ('tpu',), 'pallas_gpu': ('gpu', 'cuda', 'rocm')}[implementation]
  if not interpret and platform not in needs:
    raise ValueError(
      f'attention implementation {implementation!r} needs a {needs[0].upper()}, '
      f"but the backend is {platform!r}; use implementation='xla', or "
      f'interpret=True (slow, for tests)'
    )
  kernel = {'splash': _splash_kernel, 'pallas_gpu': _pallas_gpu_kernel}[implementation]
  batch, length, num_heads, _ = q_BxLxHxD.shape
  length_padded = padded_length(length, implementation)
  segment_ids_BxL = segment_ids_BxL.astype(jnp.int32)
  if length_padded != length:
    pad = length_padded - length
    q_BxLxHxD, k_BxLxHxD, v_BxLxHxD = (
      jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
    )
    segment_ids_BxL = jnp.pad(segment_ids_BxL, ((0, 0), (0, pad)), constant_values=KERNEL_PAD_ID)
  fn = functools.partial(kernel, scale=scale, interpret=interpret)

  mesh = sharding.current_mesh()
  if mesh is not None:
    rules = dict(sharding.DEFAULT_RULES)
    batch_axes = _fit_axes(rules.get('act_batch'), batch, mesh)
    head_axes = _fit_axes(rules.get('act_heads'), num_heads, mesh)
    qkv_spec = P(_spec_entry(batch_axes), None, _spec_entry(head_axes), None)
    segment_spec = P(_spec_entry(batch_axes), None)
    # Mesh axes absent from the specs compute the same thing on every device along them.
    fn = jax.shard_map(
      fn,
      mesh=mesh,
      in_specs=(qkv_spec, qkv_spec, qkv_spec, segment_spec),
      out_specs=qkv_spec,
      check_vma=False,
    )

  out_BxLxHxD = fn(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL)
  return out_BxLxHxD[:, :length]


def dot_product_attention(
  q_BxLxHxD,
  k_BxLxHxD,
  v_BxLxHxD,
  segment_ids_BxL,
  *,
  implementation: str = 'xla',
  scale: float | None = None,
  interpret: bool = False,
):
  """Segment-masked attention. `scale` defaults to 1/sqrt(head_dim).

  `interpret=True` runs the Pallas kernels ('splash', 'pallas_gpu') in Pallas interpret mode, on
  any backend (for tests); the other implementations ignore it.
  """
  if scale is None:
    scale = q_BxLxHxD.shape[-1] ** -0.5
  if implementation == 'xla':
    return xla_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, scale=scale)
  if implementation == 'jax':
    return jax_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, scale=scale)
  if implementation == 'cudnn':
    return cudnn_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segment_ids_BxL, scale=scale)
  if implementation in KERNEL_IMPLEMENTATIONS:
    return _run_kernel(
      implementation,
      q_BxLxHxD,
      k_BxLxHxD,
      v_BxLxHxD,
      segment_ids_BxL,
      scale=scale,
      interpret=interpret,
    )
  raise ValueError(
    f'attention implementation {implementation!r} is unknown; choose one of {IMPLEMENTATIONS}'
  )
