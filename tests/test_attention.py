"""Attention implementations against the xla reference, on CPU (Pallas kernels interpreted)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from ove_jax.models import attention

B, L, D = 2, 200, 64  # L=200 is not a block multiple: both kernels pad it (to 256).


def _segment_ids():
  s = np.zeros((B, L), np.int32)
  # Row 0: three samples, then 30 padding tokens.
  s[0, :50], s[0, 50:120], s[0, 120:170] = 1, 2, 3
  # Row 1: five samples (one of a single token), then 5 padding tokens.
  s[1, :90], s[1, 90:91], s[1, 91:150], s[1, 150:180], s[1, 180:195] = 1, 2, 3, 4, 5
  return jnp.asarray(s)


def _inputs(num_heads, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(kk, (B, L, num_heads, D), jnp.float32) for kk in keys[:3])
  cotangent = jax.random.normal(keys[3], (B, L, num_heads, D), jnp.float32)
  return q, k, v, _segment_ids(), cotangent


def _loss(implementation, cotangent, **kw):
  def loss(q, k, v, segment_ids):
    out = attention.dot_product_attention(q, k, v, segment_ids, implementation=implementation, **kw)
    real = (segment_ids > 0)[:, :, None, None]
    return jnp.sum(jnp.where(real, out * cotangent, 0.0))

  return loss


def _assert_real_close(got, want, segment_ids, atol=1e-5):
  real = np.asarray(segment_ids) > 0
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=atol, rtol=1e-5)


@pytest.mark.parametrize(
  'implementation,kw',
  [
    ('jax', {}),
    ('splash', {'interpret': True}),
    ('pallas_gpu', {'interpret': True}),
  ],
)
def test_forward_and_grads_match_xla(implementation, kw):
  q, k, v, segment_ids, cotangent = _inputs(num_heads=2)
  want = attention.dot_product_attention(q, k, v, segment_ids)
  got = jax.jit(
    lambda *a: attention.dot_product_attention(*a, implementation=implementation, **kw)
  )(q, k, v, segment_ids)
  _assert_real_close(got, want, segment_ids)
  # The row's own padding (id 0) never mixes with the kernels' extra positions (id -1), so even
  # the padding outputs equal the reference's.
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

  # All three kernels have a backward pass (splash: dq + dkv kernels; pallas_gpu: fused Triton
  # backward kernel), so the gradients are compared for each.
  grads = jax.jit(jax.grad(_loss(implementation, cotangent, **kw), argnums=(0, 1, 2)))(
    q, k, v, segment_ids
  )
  want_grads = jax.grad(_loss('xla', cotangent), argnums=(0, 1, 2))(q, k, v, segment_ids)
  for name, g, w in zip('qkv', grads, want_grads):
    assert float(jnp.abs(w).max()) > 1e-2, name  # the comparison is not vacuous
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=f'd{name}')


def test_reference_keeps_segments_apart():
  """Changing one sample's tokens changes no other sample's outputs (nor the padding's)."""
  q, k, v, segment_ids, _ = _inputs(num_heads=2)
  out = attention.dot_product_attention(q, k, v, segment_ids)
  in_seg2 = (segment_ids == 2)[:, :, None, None]
  k2, v2 = jnp.where(in_seg2, -k, k), jnp.where(in_seg2, v + 3.0, v)
  for implementation, kw in [('xla', {}), ('splash', {'interpret': True})]:
    out2 = attention.dot_product_attention(
      q, k2, v2, segment_ids, implementation=implementation, **kw
    )
    other = np.asarray(segment_ids != 2)
    np.testing.assert_allclose(np.asarray(out2)[other], np.asarray(out)[other], atol=1e-5)
    assert np.abs(np.asarray(out2)[~other] - np.asarray(out)[~other]).min() > 1.0


def test_padded_lengths():
  assert [attention.padded_length(n, 'splash') for n in (1, 128, 200, 256, 2048, 16384)] == [
    128,
    128,
    256,
    256,
    2048,
    16384,
  ]
  assert [attention.padded_length(n, 'pallas_gpu') for n in (1, 5, 20, 128, 130, 200, 16384)] == [
    16,
    16,
    32,
    128,
    256,
    256,
    16384,
  ]
  assert attention._splash_block(16384) == 512 and attention._splash_block(384) == 128


def test_small_odd_length():
  q, k, v, _, _ = _inputs(num_heads=2)
  q, k, v = q[:, :7], k[:, :7], v[:, :7]
  segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 2, 2, 2]], jnp.int32)
  want = attention.dot_product_attention(q, k, v, segment_ids)
  for implementation in ('splash', 'pallas_gpu'):
    got = attention.dot_product_attention(
      q, k, v, segment_ids, implementation=implementation, interpret=True
    )
    _assert_real_close(got, want, segment_ids)


def test_cudnn_on_cpu_raises_clear_error():
  q, k, v, segment_ids, _ = _inputs(num_heads=2)
  with pytest.raises(ValueError, match=r"'cudnn' needs a GPU.*'xla'"):
    attention.dot_product_attention(q, k, v, segment_ids, implementation='cudnn')


@pytest.mark.parametrize('implementation', ['splash', 'pallas_gpu'])
def test_kernels_without_interpret_on_cpu_raise(implementation):
  q, k, v, segment_ids, _ = _inputs(num_heads=2)
  with pytest.raises(ValueError, match=r'needs a (TPU|GPU).*interpret=True'):
    attention.dot_product_attention(q, k, v, segment_ids, implementation=implementation)


def test_unknown_implementation_lists_choices():
  q, k, v, segment_ids, _ = _inputs(num_heads=2)
  with pytest.raises(ValueError) as info:
    attention.dot_product_attention(q, k, v, segment_ids, implementation='flash')
  message = str(info.value)
  assert "'flash'" in message
  for name in ('xla', 'jax', 'cudnn', 'splash', 'pallas_gpu'):
    assert name in message


def _mesh():
  return jax.make_mesh((1, 2, 4), ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3)


@pytest.mark.parametrize(
  'num_heads',
  [
    4,  # batch over fsdp=2, heads over tensor=4: every device holds one (row, head)
    2,  # heads not divisible by tensor=4: heads stay whole, the tensor axis computes redundantly
  ],
)
def test_splash_under_mesh_matches_unsharded_xla(num_heads):
  q, k, v, segment_ids, cotangent = _inputs(num_heads=num_heads, seed=1)
  want = attention.dot_product_attention(q, k, v, segment_ids)
  want_grads = jax.grad(_loss('xla', cotangent), argnums=(0, 1, 2))(q, k, v, segment_ids)
  with jax.set_mesh(_mesh()):
    fn = lambda *a: attention.dot_product_attention(*a, implementation='splash', interpret=True)
    jaxpr = jax.make_jaxpr(fn)(q, k, v, segment_ids)
    assert 'shard_map' in str(jaxpr)
    got = jax.jit(fn)(q, k, v, segment_ids)
    grads = jax.jit(jax.grad(_loss('splash', cotangent, interpret=True), argnums=(0, 1, 2)))(
      q, k, v, segment_ids
    )
  _assert_real_close(got, want, segment_ids)
  for name, g, w in zip('qkv', grads, want_grads):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=f'd{name}')


def test_xla_path_has_no_shard_map_under_mesh():
  q, k, v, segment_ids, _ = _inputs(num_heads=4)
  with jax.set_mesh(_mesh()):
    jaxpr = jax.make_jaxpr(attention.dot_product_attention)(q, k, v, segment_ids)
  assert 'shard_map' not in str(jaxpr)
