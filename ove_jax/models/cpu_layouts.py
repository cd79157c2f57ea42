"""XLA:CPU layouts: the dense weight gradient, the xla attention's backward pass and row max.

XLA:CPU runs a matmul whose operands are contracted over their leading dimension (`A^T @ B`) at
a fraction of the speed of a row-major one of the same size. Measured on the 2-core development
CPU, float32, CPU time:

  - dense weight gradient dW = x^T @ dy, 2048 tokens x 1024 by 2048 x 4096: 39 GFLOP per
    CPU-second as autodiff writes it, 83 with x^T copied first (PyTorch's sgemm: 74);
  - attention's dV = P^T @ dO and dK = dS^T @ Q, 16 heads of [2048, 2048] by [2048, 64]: 21 as
    autodiff writes them, 44 computed as (dO^T @ P)^T with dO^T ([64, 2048], cheap) copied first.

A training step spends a third of its dense FLOPs and half of its attention-backward FLOPs in
those forms. On the CPU backend the encoder's dense layers (`dot_general`) and the xla attention
(`attention`) therefore carry their own backward pass, which copies the small operand's
transpose (an optimization barrier keeps XLA from folding it back) and multiplies row-major.
Elsewhere (GPU, TPU) and for any contraction other than a dense layer's, they are plain
`jax.lax.dot_general` and plain autodiff.

Which operand is copied matters as much: XLA fuses the copy's producers into it and computes them
in the copy's strided order. A LayerNorm's output is cheap to copy that way; an MLP's second
layer is not: its x^T recomputes the GELU (51 ms a block in a traced 1.6 s step at width 512)
and its dy^T the next LayerNorm's backward pass. A layer that narrows (input wider than
output) therefore contracts over the tokens as autodiff writes it: XLA:CPU gives that dot to its
own (Eigen) kernel, not YNNPACK's, which packs the transposed operand itself. On materialised
operands, 2048 tokens, GFLOP per CPU-second as written (with x^T copied first): 4096 -> 1024 70
(70), 2048 -> 512 61 (67); for a widening layer the copy wins: 1024 -> 4096 39 (80).

The softmax's row max (`row_max`) is a fold of halves on the CPU backend: XLA:CPU lowers a max
over a long last axis to a reduce-window loop that does not vectorise (58 ms for 12 heads'
[2048, 2048] logits on the development Xeon, a third of the attention's forward pass), while
elementwise maxima of the two halves, repeated, fuse into vectorised loops (12 ms). Sums are not
affected (15 ms for the same array).

Low-precision products (bfloat16) accumulate in float32 and are rounded once to their dtype
(`_product`). XLA:CPU hands a bfloat16 x bfloat16 -> bfloat16 product to a YNNPACK kernel that
runs at about float32's speed, while the same product with a float32 result reaches the CPU's
bfloat16 units (AMX on a Xeon): 2048 x 768 by 768 x 3072 took 74 ms against 17 ms on the 2-core
development Xeon. Rounding the float32 result once is also what PyTorch's autocast matmul returns,
bit for bit on that product; XLA's bfloat16-output kernel differed from it in 0.015% of the
entries by one unit in the last place.

On a one-device CPU backend with an MKL at hand (the PyTorch wheel's), the dense layers' float32
products (forward, dx and dW) go to MKL's sgemm instead (`cpu_blas`, 1.1-1.3x faster than
XLA:CPU's kernels on the development Xeon); dW = x^T @ dy is then one sgemm reading x^T in place,
no copy. Everything else here stays as described.

Same maths: the products are the same sums in another memory order, and the attention backward is
the usual softmax one (dS = P * (dO @ V^T - rowsum(dO * O)), written with the unnormalised
exponentials of the forward pass). Gradients agree with autodiff to float rounding; tests compare
both paths (`autodiff_layouts()` switches these off while a function is traced).
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from ove_jax.models import cpu_blas

# row_max folds the last axis down to this many columns before its final reduce.
FOLD_TO = 16

_DISABLED = [os.environ.get('OVE_CPU_LAYOUTS', '1') == '0']


def enabled() -> bool:
  """Whether functions traced now use these backward passes (CPU backend, not switched off)."""
  return not _DISABLED[0] and jax.default_backend() == 'cpu'


@contextlib.contextmanager
def autodiff_layouts():
  """Functions traced inside use plain autodiff (for comparisons; jit caches by function, so
  trace a fresh function here). `OVE_CPU_LAYOUTS=0` does the same for a whole process."""
  saved, _DISABLED[0] = _DISABLED[0], True
  try:
    yield
  finally:
    _DISABLED[0] = saved


def _transposed(x):
  """x with its last two axes swapped and copied (the barrier keeps XLA from folding the swap
  into the next dot, which would bring back the slow form)."""
  return lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


# ------------------------------------------------------------------------------------------------
# Dense layers: y = x @ W
# ------------------------------------------------------------------------------------------------


def _is_dense(lhs, rhs, dimension_numbers) -> bool:
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  return (
    rhs.ndim == 2
    and tuple(lhs_contract) == (lhs.ndim - 1,)
    and tuple(rhs_contract) == (0,)
    and not lhs_batch
    and not rhs_batch
  )


def dot_general(
  lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None
):
  """`jax.lax.dot_general` (the `dot_general` of `nnx.Linear`), with the CPU-friendly weight
  gradient for `x @ W` when `enabled()`."""
  if out_sharding is None and enabled() and _is_dense(lhs, rhs, dimension_numbers):
    return _dense(lhs, rhs, precision, preferred_element_type)
  return lax.dot_general(
    lhs,
    rhs,
    dimension_numbers,
    precision=precision,
    preferred_element_type=preferred_element_type,
    out_sharding=out_sharding,
  )


def _narrow_float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def _blas_product(lhs, rhs, dims, dtype):
  """The product by `cpu_blas` when it takes it (float32, one device, a BLAS found), else None.
  `dims` is one of the dense layer's three forms: x @ W, dy @ W^T, x^T @ dy (2-D)."""
  (lhs_contract, rhs_contract), _ = dims
  if not cpu_blas.use_for(lhs, rhs, dtype, lhs.shape[lhs_contract[0]]):
    return None
  transpose_a = tuple(lhs_contract) == (0,) and lhs.ndim == 2
  transpose_b = tuple(rhs_contract) == (1,)
  a = lhs if transpose_a else lhs.reshape(-1, lhs.shape[-1])
  out = cpu_blas.matmul(a, rhs, transpose_a=transpose_a, transpose_b=transpose_b)
  # Named so that remat='dots' keeps it as it keeps a dot_general's output (cpu_blas.SAVE_NAME).
  out = checkpoint_name(out, cpu_blas.SAVE_NAME)
  return out if transpose_a else out.reshape(*lhs.shape[:-1], out.shape[-1])


def _product(lhs, rhs, dims, precision, dtype):
  """lax.dot_general with a `dtype` result; low-precision operands accumulate and return float32
  from the dot and are rounded to `dtype` once after it (see the module docstring)."""
  out = _blas_product(lhs, rhs, dims, dtype)
  if out is not None:
    return out
  low = any(_narrow_float(a.dtype) for a in (lhs, rhs)) and _narrow_float(dtype)
  accumulate = jnp.float32 if low else dtype
  out = lax.dot_general(lhs, rhs, dims, precision=precision, preferred_element_type=accumulate)
  return out.astype(dtype)


def _matmul(x, w, precision, preferred_element_type):
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  return _product(x, w, dims, precision, preferred_element_type or jnp.result_type(x, w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x, w, precision, preferred_element_type):
  return _matmul(x, w, precision, preferred_element_type)


def _dense_fwd(x, w, precision, preferred_element_type):
  return _matmul(x, w, precision, preferred_element_type), (x, w)


def _dense_bwd(precision, preferred_element_type, residuals, dy):
  del preferred_element_type
  x, w = residuals
  # dx = dy @ W^T: XLA:CPU's kernel handles a transposed right operand at full speed.
  dx = _product(dy, w, (((dy.ndim - 1,), (1,)), ((), ())), precision, x.dtype)
  x_TxD, dy_TxF = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  # Where the BLAS takes it, dW = x^T @ dy is one sgemm reading x^T in place, no copy.
  dw = _blas_product(x_TxD, dy_TxF, (((0,), (0,)), ((), ())), w.dtype)
  if dw is not None:
    return dx, dw
  if x_TxD.shape[1] <= dy_TxF.shape[1]:
    # dW = x^T @ dy over every token, with x^T copied once.
    dims = ((1,), (0,)), ((), ())
    x_TxD = _transposed(x_TxD)
  else:
    # A narrowing layer (an MLP's second one: x [T, 4C], dy [T, C]) contracts over the tokens as
    # autodiff writes it (see the module docstring).
    dims = ((0,), (0,)), ((), ())
  return dx, _product(x_TxD, dy_TxF, dims, precision, w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def row_max(x):
  """`x.max(-1, keepdims=True)`; with `enabled()`, as a fold of overlapping halves.

  XLA:CPU turns a max over a long last axis into a reduce-window that does not vectorise: 58 ms
  for the [12, 2048, 2048] attention logits on the 2-core development Xeon, against 12 ms for
  `maximum(x[..., :h], x[..., n - h:])` repeated down to 16 columns (elementwise maxima, which
  XLA fuses into one vectorised loop) and a max over those. A max is exact and idempotent, so
  the overlap of the halves when the width is odd changes nothing: the result is the same, NaNs
  included.
  """
  if not enabled():
    return x.max(-1, keepdims=True)
  while x.shape[-1] > FOLD_TO:
    half = -(-x.shape[-1] // 2)
    x = jnp.maximum(x[..., :half], x[..., x.shape[-1] - half :])
  return x.max(-1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# Attention core: heads-major, q already scaled, unnormalised softmax (see attention.py)
# ------------------------------------------------------------------------------------------------


def _attention_forward(q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_Bx1xLxL):
  logits_BxHxLxL = jnp.einsum(
    'bhqd,bhkd->bhqk', q_BxHxLxD, k_BxHxLxD, preferred_element_type=jnp.float32
  )
  logits_BxHxLxL = jnp.where(mask_Bx1xLxL, logits_BxHxLxL, jnp.finfo(jnp.float32).min)
  max_BxHxLx1 = lax.stop_gradient(row_max(logits_BxHxLxL))
  e_BxHxLxL = jnp.exp(logits_BxHxLxL - max_BxHxLx1)
  sum_BxHxLx1 = e_BxHxLxL.sum(-1, keepdims=True)
  o_BxHxLxD = (
    jnp.einsum(
      'bhqk,bhkd->bhqd',
      e_BxHxLxL.astype(v_BxHxLxD.dtype),
      v_BxHxLxD,
      preferred_element_type=jnp.float32,
    )
    / sum_BxHxLx1
  )
  return o_BxHxLxD, e_BxHxLxL, sum_BxHxLx1


def attention_core(q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_Bx1xLxL):
  """softmax(q k^T, masked) v in float32, heads-major; q carries the softmax scale. With
  `enabled()`, its backward pass is the CPU-laid-out one."""
  if enabled():
    return _attention(q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_Bx1xLxL)
  return _attention_forward(q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_Bx1xLxL)[0]


@jax.custom_vjp
def _attention(q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_Bx1xLxL):
  return _attention_forward(q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_Bx1xLxL)[0]


def _attention_fwd(q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_Bx1xLxL):
  o, e, total = _attention_forward(q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_Bx1xLxL)
  return o, (q_BxHxLxD, k_BxHxLxD, v_BxHxLxD, mask_Bx1xLxL, o, e, total)


def _attention_bwd(residuals, do_BxHxLxD):
  q, k, v, mask, o_BxHxLxD, e_BxHxLxL, sum_BxHxLx1 = residuals
  do_BxHxLxD = do_BxHxLxD.astype(jnp.float32)
  du_BxHxLxD = do_BxHxLxD / sum_BxHxLx1  # the gradient of the unnormalised output e @ v
  # dV = e^T @ du, as (du^T @ e)^T.
  dvt_BxHxDxL = jnp.einsum(
    'bhdq,bhqk->bhdk',
    _transposed(du_BxHxLxD),
    e_BxHxLxL.astype(v.dtype),
    preferred_element_type=jnp.float32,
  )
  # The softmax backward on the unnormalised exponentials (masked entries have e = 0):
  # dS = e * (du @ v^T - rowsum(dO * O) / sum).
  de_BxHxLxL = jnp.einsum('bhqd,bhkd->bhqk', du_BxHxLxD, v, preferred_element_type=jnp.float32)
  row_BxHxLx1 = (do_BxHxLxD * o_BxHxLxD).sum(-1, keepdims=True) / sum_BxHxLx1
  ds_BxHxLxL = e_BxHxLxL * (de_BxHxLxL - row_BxHxLx1)
  dq = jnp.einsum('bhqk,bhkd->bhqd', ds_BxHxLxL, k, preferred_element_type=jnp.float32)
  # dK = dS^T @ q, as (q^T @ dS)^T.
  dkt_BxHxDxL = jnp.einsum(
    'bhdq,bhqk->bhdk', _transposed(q), ds_BxHxLxL, preferred_element_type=jnp.float32
  )
  return (
    dq.astype(q.dtype),
    jnp.swapaxes(dkt_BxHxDxL, -1, -2).astype(k.dtype),
    jnp.swapaxes(dvt_BxHxDxL, -1, -2).astype(v.dtype),
    None,
  )


_attention.defvjp(_attention_fwd, _attention_bwd)
