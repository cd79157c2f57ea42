"""The CPU-laid-out backward passes (ove_jax/models/cpu_layouts.py) against plain autodiff: the
dense layers, the xla attention with segment masks, and a whole encoder's gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from ove_jax import convert
from ove_jax.models import EncoderConfig, attention, cpu_layouts, create_encoder


def _primitives(jaxpr) -> set[str]:
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          names |= _primitives(sub)
  return names


def _both(make_fn, *args):
  """(laid out, autodiff): the same function traced twice, once with the layouts switched off."""
  laid_out = jax.jit(make_fn())(*args)
  with cpu_layouts.autodiff_layouts():
    assert not cpu_layouts.enabled()
    plain = jax.jit(make_fn())(*args)
  return laid_out, plain


def _dense_grad():
  def loss(kernel, bias, x):
    y = cpu_layouts.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias
    return jnp.sum(jnp.sin(y) * y)

  return jax.grad(loss, argnums=(0, 1, 2))


def test_layouts_are_on_for_the_cpu_backend_and_really_traced():
  assert cpu_layouts.enabled()
  kernel, x = jnp.ones((16, 32)), jnp.ones((2, 7, 16))
  traced = _primitives(jax.make_jaxpr(_dense_grad())(kernel, jnp.zeros(32), x).jaxpr)
  assert 'optimization_barrier' in traced
  with cpu_layouts.autodiff_layouts():
    plain = _primitives(jax.make_jaxpr(_dense_grad())(kernel, jnp.zeros(32), x).jaxpr)
  assert 'optimization_barrier' not in plain


def _token_contractions(jaxpr) -> list:
  """Dimension numbers of the dot_generals that contract two matrices over their rows."""
  return [
    eqn.params['dimension_numbers']
    for eqn in jaxpr.eqns
    if eqn.primitive.name == 'dot_general'
    and all(v.aval.ndim == 2 for v in eqn.invars)
    and eqn.params['dimension_numbers'][0] == ((0,), (0,))
  ]


def test_narrowing_dense_contracts_over_tokens_without_a_copy():
  # x [T, 32] -> y [T, 16]: dW = x^T @ dy over the flattened tokens, no transposed copy.
  kernel, x = jnp.ones((32, 16)), jnp.ones((2, 7, 32))
  jaxpr = jax.make_jaxpr(_dense_grad())(kernel, jnp.zeros(16), x).jaxpr
  assert 'optimization_barrier' not in _primitives(jaxpr)
  assert _token_contractions(jaxpr)
  with cpu_layouts.autodiff_layouts():  # autodiff contracts [2, 7, 32] and [2, 7, 16]
    assert not _token_contractions(jax.make_jaxpr(_dense_grad())(kernel, jnp.zeros(16), x).jaxpr)


@pytest.mark.parametrize('d_in,d_out', [(48, 96), (96, 48)])
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_dense_gradients_equal_autodiff(dtype, tol, d_in, d_out):
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.standard_normal((d_in, d_out)) * 0.1, dtype)
  bias = jnp.asarray(rng.standard_normal(d_out) * 0.1, dtype)
  x = jnp.asarray(rng.standard_normal((3, 37, d_in)), dtype)
  got, want = _both(_dense_grad, kernel, bias, x)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype == dtype and g.shape == w.shape
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.abs(g - w).max() <= tol * np.abs(w).max()


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_attention_gradients_equal_autodiff_with_segments(dtype, tol):
  rng = np.random.default_rng(1)
  b, l, h, d = 2, 96, 3, 16
  q, k, v, cot = (jnp.asarray(rng.standard_normal((b, l, h, d)), dtype) for _ in range(4))
  # Three packed samples and padding in row 0, one sample filling row 1.
  segments = np.ones((b, l), np.int32)
  segments[0, 30:70], segments[0, 70:90], segments[0, 90:] = 2, 3, 0
  segments = jnp.asarray(segments)

  def make():
    def loss(q, k, v):
      out = attention.xla_attention(q, k, v, segments, scale=d**-0.5)
      return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1, 2))

  (value, grads), (value_ref, grads_ref) = _both(make, q, k, v)
  np.testing.assert_allclose(value, value_ref, rtol=tol)
  for g, w in zip(grads, grads_ref):
    assert g.dtype == w.dtype == dtype
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.abs(g - w).max() <= tol * np.abs(w).max()


@pytest.mark.parametrize('scan_layers', [False, True])
def test_encoder_gradients_equal_autodiff(scan_layers):
  cfg = dataclasses.replace(EncoderConfig.preset('tiny'), depth=2, scan_layers=scan_layers)
  params = convert.model_params(create_encoder(cfg, seed=4))
  rng = np.random.RandomState(0)
  patches = jnp.asarray(rng.randn(2, 40, cfg.patch_dim).astype(np.float32))
  positions = jnp.asarray(rng.randint(0, 8, (2, 40, 3)))

  def make():
    def loss(model):
      return jnp.sum(jnp.square(model(patches, positions)['pooled']))

    return lambda model: nnx.grad(loss)(model)

  def grads():
    model = convert.model_from_params(cfg, params)
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(jax.jit(make())(model))}

  laid_out = grads()
  with cpu_layouts.autodiff_layouts():
    plain = grads()
  assert laid_out.keys() == plain.keys()
  # Relative to each leaf, plus rounding noise of the whole gradient's scale (the k bias's
  # gradient is zero in exact arithmetic: softmax does not see a shift of every logit).
  noise = 1e-6 * max(np.abs(g).max() for g in plain.values())
  for path, want in plain.items():
    assert np.abs(laid_out[path] - want).max() <= 1e-5 * np.abs(want).max() + noise, path


def _dot_dtypes(jaxpr) -> list:
  """(operand dtypes, result dtype) of every dot_general in `jaxpr` and its sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      found.append((tuple(str(v.aval.dtype) for v in eqn.invars), str(eqn.outvars[0].aval.dtype)))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          found += _dot_dtypes(sub)
  return found


def test_bfloat16_products_accumulate_in_float32_and_round_once():
  # XLA:CPU's bf16 -> bf16 kernel is slow and rounds differently; the layer's forward, dx and
  # dW products return float32 and are rounded to bfloat16 once, as PyTorch's autocast matmul.
  rng = np.random.default_rng(3)
  bf16 = jnp.bfloat16
  x = jnp.asarray(rng.standard_normal((256, 768)), bf16)
  kernel = jnp.asarray(rng.standard_normal((768, 512)), bf16)
  dy = jnp.asarray(rng.standard_normal((256, 512)), bf16)
  dims = (((1,), (0,)), ((), ()))

  def layer(x, kernel):
    return cpu_layouts.dot_general(x, kernel, dims)

  y, vjp = jax.vjp(layer, x, kernel)
  dx, dw = vjp(dy)
  step = jax.make_jaxpr(lambda *a: jax.vjp(layer, *a[:2])[1](a[2]))(x, kernel, dy).jaxpr
  assert _dot_dtypes(step) == [(('bfloat16', 'bfloat16'), 'float32')] * 3

  def once(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(bf16)

  for got, want in (
    (y, once(x, kernel, dims)),
    (dx, once(dy, kernel, (((1,), (1,)), ((), ())))),
    (dw, once(x, dy, (((0,), (0,)), ((), ())))),
  ):
    assert got.dtype == bf16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize('width', [1, 16, 17, 33, 2048, 2049])
def test_row_max_folds_and_equals_max_with_nans_infs_and_odd_widths(width):
  rng = np.random.default_rng(width)
  x = rng.standard_normal((3, 5, width)).astype(np.float32)
  x[0, 0, -1] = np.inf
  x[0, 1, :] = -np.inf
  x[1, 2, width // 2] = np.nan
  x[2, 3, 0] = np.finfo(np.float32).min
  folded = jax.jit(cpu_layouts.row_max)(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(folded), x.max(-1, keepdims=True))
  traced = jax.make_jaxpr(lambda a: cpu_layouts.row_max(a))(jnp.asarray(x)).jaxpr
  steps = sum(eqn.primitive.name == 'max' for eqn in traced.eqns)
  assert steps == (0 if width <= cpu_layouts.FOLD_TO else int(np.ceil(np.log2(width / 16))))
  with cpu_layouts.autodiff_layouts():
    plain = jax.make_jaxpr(lambda a: cpu_layouts.row_max(a))(jnp.asarray(x)).jaxpr
  assert not any(eqn.primitive.name == 'max' for eqn in plain.eqns)
