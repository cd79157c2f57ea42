"""The encoder: RoPE facts, packing, the release entry point, sharding, bf16 and remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from ove_jax.models import EncoderConfig, create_encoder, num_params, patchify, rope
from ove_jax.models import encoder as enc

TINY = EncoderConfig.preset('tiny')

# Jitted entry points: op-by-op eager execution is slow on CPU.
call = nnx.jit(
  lambda m, *a, **k: m(*a, **k), static_argnames=('num_segments', 'return_hidden_states')
)
pixels = nnx.jit(
  lambda m, *a, **k: m.forward_pixels(*a, **k), static_argnames=('output_hidden_states',)
)


@pytest.fixture
def model(sharpen):
  return sharpen(create_encoder(TINY, seed=0))


def _rng(seed=0):
  return np.random.RandomState(seed)


# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------


def test_rope_frequencies_follow_spec():
  inv_t, inv_h, inv_w = (np.asarray(f) for f in rope.rope_inv_freqs(64, 10000.0))
  assert (inv_t.size, inv_h.size, inv_w.size) == (8, 12, 12)
  np.testing.assert_allclose(inv_t, 10000.0 ** (-np.arange(8) / 8), rtol=1e-6)
  np.testing.assert_allclose(inv_h, 10000.0 ** (-np.arange(12) / 12), rtol=1e-6)
  np.testing.assert_array_equal(inv_h, inv_w)


def test_rope_angles_layout_concat_not_interleave():
  pos = jnp.array([[[3, 5, 7]]])
  a = np.asarray(rope.rope_angles(pos, 64, 10000.0))[0, 0]
  half = np.concatenate(
    [
      3 * 10000.0 ** (-np.arange(8) / 8),
      5 * 10000.0 ** (-np.arange(12) / 12),
      7 * 10000.0 ** (-np.arange(12) / 12),
    ]
  )
  np.testing.assert_allclose(a, np.concatenate([half, half]), rtol=1e-6)


def test_rope_rotates_adjacent_pairs_elementwise():
  rng = _rng(1)
  x = rng.randn(1, 1, 1, 64).astype(np.float32)
  angles = rng.uniform(-3, 3, size=(1, 1, 64)).astype(np.float32)
  out = np.asarray(rope.apply_rope(jnp.asarray(x), jnp.cos(angles), jnp.sin(angles)))[0, 0, 0]
  c, s, x = np.cos(angles[0, 0]), np.sin(angles[0, 0]), x[0, 0, 0]
  expect = np.empty(64, np.float32)
  expect[0::2] = x[0::2] * c[0::2] - x[1::2] * s[0::2]
  expect[1::2] = x[1::2] * c[1::2] + x[0::2] * s[1::2]
  np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)


def test_image_positions_leave_temporal_channels_unrotated():
  # t = 0 for images: channels 0-7 and 32-39 carry time and must pass through unchanged.
  rng = _rng(2)
  x = jnp.asarray(rng.randn(1, 6, 2, 64).astype(np.float32))
  pos = jnp.asarray(np.stack([np.zeros(6), rng.randint(0, 16, 6), rng.randint(0, 16, 6)], -1)[None])
  angles = rope.rope_angles(pos, 64, 10000.0)
  out = rope.apply_rope(x, jnp.cos(angles), jnp.sin(angles))
  temporal = np.r_[0:8, 32:40]
  np.testing.assert_array_equal(np.asarray(out)[..., temporal], np.asarray(x)[..., temporal])
  spatial = np.r_[8:32, 40:64]
  assert not np.allclose(np.asarray(out)[..., spatial], np.asarray(x)[..., spatial])


def test_positions_decide_output_token_order_does_not(model):
  rng = _rng(3)
  patches = rng.randn(1, 24, TINY.patch_dim).astype(np.float32)
  pos = np.stack([rng.randint(0, 64, 24), rng.randint(0, 16, 24), rng.randint(0, 16, 24)], -1)[None]
  out = call(model, patches, pos)
  perm = rng.permutation(24)
  out_p = call(model, patches[:, perm], pos[:, perm])
  np.testing.assert_allclose(
    out_p['last_hidden_state'], out['last_hidden_state'][:, perm], atol=1e-5
  )
  np.testing.assert_allclose(out_p['pooled'], out['pooled'], atol=1e-5)
  # Same tokens, other positions: the output changes.
  other = call(model, patches, pos[:, rng.permutation(24)])
  assert np.abs(np.asarray(other['pooled'] - out['pooled'])).max() > 1e-2


def test_rope_as_released_is_not_shift_invariant(model):
  # Pairs of adjacent channels carry two different frequencies (concatenated angles), so this is
  # not a pure rotation and a common shift of all positions changes the output. A "fixed",
  # shift-invariant RoPE would silently break the released weights; this guards against it.
  rng = _rng(4)
  patches = rng.randn(1, 20, TINY.patch_dim).astype(np.float32)
  pos = np.stack([rng.randint(0, 8, 20), rng.randint(0, 8, 20), rng.randint(0, 8, 20)], -1)[None]
  a = call(model, patches, pos)['pooled']
  b = call(model, patches, pos + np.array([5, 3, 2]))['pooled']
  assert np.abs(np.asarray(a - b)).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------


def test_packed_equals_alone(model):
  rng = _rng(5)
  lengths = [7, 12, 5]
  samples = [
    (
      rng.randn(n, TINY.patch_dim).astype(np.float32),
      np.stack([rng.randint(0, 64, n), rng.randint(0, 16, n), rng.randint(0, 16, n)], -1),
    )
    for n in lengths
  ]
  L = 30  # 24 real tokens and 6 of padding
  patches = np.zeros((1, L, TINY.patch_dim), np.float32)
  pos = np.zeros((1, L, 3), np.int32)
  seg = np.zeros((1, L), np.int32)
  start = 0
  for s, (p, q) in enumerate(samples):
    patches[0, start : start + len(p)] = p
    pos[0, start : start + len(p)] = q
    seg[0, start : start + len(p)] = s + 1
    start += len(p)
  patches[0, start:] = rng.randn(L - start, TINY.patch_dim)  # padding content must not matter
  packed = call(model, patches, pos, seg, num_segments=4)
  np.testing.assert_array_equal(np.asarray(packed['pooled_valid']), [[True, True, True, False]])
  start = 0
  for s, (p, q) in enumerate(samples):
    alone = call(model, p[None], q[None])
    n = len(p)
    np.testing.assert_allclose(
      packed['last_hidden_state'][0, start : start + n],
      alone['last_hidden_state'][0],
      atol=1e-5,
      rtol=1e-5,
    )
    np.testing.assert_allclose(packed['pooled'][0, s], alone['pooled'][0, 0], atol=1e-5, rtol=1e-5)
    start += n
  assert np.isfinite(np.asarray(packed['pooled'])).all()


def test_padding_does_not_change_real_tokens(model):
  rng = _rng(6)
  p = rng.randn(1, 10, TINY.patch_dim).astype(np.float32)
  q = np.stack([np.zeros(10), rng.randint(0, 16, 10), rng.randint(0, 16, 10)], -1)[None]
  base = call(model, p, q)
  padded = call(
    model,
    np.concatenate([p, rng.randn(1, 6, TINY.patch_dim)], 1),
    np.concatenate([q, np.zeros((1, 6, 3))], 1),
    np.r_[np.ones(10), np.zeros(6)][None].astype(np.int32),
  )
  np.testing.assert_allclose(padded['pooled'], base['pooled'], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The release's entry point
# ------------------------------------------------------------------------------------------------


def test_forward_pixels_dense_video_positions(model):
  rng = _rng(7)
  video = rng.randn(1, 3, 28, 42, 3).astype(np.float32)
  out = pixels(model, video, output_hidden_states=True)
  assert out['last_hidden_state'].shape == (1, 3 * 2 * 3, TINY.width)
  assert len(out['hidden_states']) == TINY.depth + 1
  tt, hh, ww = np.meshgrid(np.arange(3), np.arange(2), np.arange(3), indexing='ij')
  pos = np.stack([tt, hh, ww], -1).reshape(1, -1, 3)
  ref = call(model, patchify(jnp.asarray(video), 14), pos)
  np.testing.assert_allclose(out['pooler_output'], ref['pooled'][:, 0], atol=1e-6)


def test_forward_pixels_visible_indices_gather_and_grid(model):
  rng = _rng(8)
  video = rng.randn(2, 4, 28, 28, 3).astype(np.float32)  # 4 frames x 4 patches = 16 tokens
  idx = np.sort(rng.choice(16, size=(2, 6), replace=False), axis=1)
  out = pixels(model, video, visible_indices=idx)
  assert out['last_hidden_state'].shape == (2, 6, TINY.width)
  patches = np.take_along_axis(np.asarray(patchify(jnp.asarray(video), 14)), idx[..., None], 1)
  pos = np.stack([idx // 4, (idx // 2) % 2, idx % 2], -1)
  ref = call(model, patches, pos)
  np.testing.assert_allclose(out['last_hidden_state'], ref['last_hidden_state'], atol=1e-6)
  # Without gather: 16 indices for 16 tokens only place them (here on the 64-frame grid).
  times = enc.uniform_frame_times(4)
  np.testing.assert_array_equal(times, [0, 21, 42, 63])
  grid_idx = (times[:, None] * 4 + np.arange(4)[None]).reshape(1, 16).repeat(2, 0)
  out2 = pixels(model, video, visible_indices=grid_idx)
  pos2 = np.stack([grid_idx // 4, (grid_idx // 2) % 2, grid_idx % 2], -1)
  ref2 = call(model, patchify(jnp.asarray(video), 14), pos2)
  np.testing.assert_allclose(out2['pooler_output'], ref2['pooled'][:, 0], atol=1e-6)


def test_forward_pixels_rejects_bad_shapes(model):
  with pytest.raises(ValueError, match='multiples of the patch size 14'):
    pixels(model, np.zeros((1, 30, 28, 3), np.float32))
  with pytest.raises(ValueError, match='channels last'):
    pixels(model, np.zeros((1, 3, 28, 28), np.float32))
  with pytest.raises(ValueError, match='patch_positions shape'):
    pixels(model, np.zeros((1, 28, 28, 3), np.float32), patch_positions=np.zeros((1, 3, 3)))
  with pytest.raises(ValueError, match=r'must lie in \[0, 15\]; got \[0, 40\]'):
    model.forward_pixels(
      np.zeros((1, 4, 28, 28, 3), np.float32), visible_indices=np.array([[0, 5, 40]])
    )
  with pytest.raises(ValueError, match='patches have 10 values'):
    call(model, np.zeros((1, 4, 10)), np.zeros((1, 4, 3)))


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match='head_dim'):
    EncoderConfig(width=96, num_heads=2)
  with pytest.raises(ValueError, match="unknown encoder preset 'giant'"):
    EncoderConfig.preset('giant')
  with pytest.raises(ValueError, match='remat'):
    EncoderConfig(remat='sometimes')


def test_preset_sizes_match_release():
  assert round(num_params(EncoderConfig.preset('base')) / 1e6, 1) == 92.6
  assert round(num_params(EncoderConfig.preset('large')) / 1e6, 1) == 315.5
  assert round(num_params(EncoderConfig.preset('huge')) / 1e6, 1) == 650.1


def test_init_statistics():
  m = create_encoder(EncoderConfig.preset('tiny', mlp_dim=1024), seed=3)
  assert abs(float(m.blocks[0].mlp.fc1.kernel[...].std()) - 0.02) < 2e-3
  assert float(jnp.abs(m.blocks[0].mlp.fc1.bias[...]).max()) == 0.0
  assert abs(float(m.head.probe[...].std()) - 1.0) < 0.3
  bound = np.sqrt(6 / (4 * 128))
  k = np.asarray(m.head.q_proj.kernel[...])
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound


# ------------------------------------------------------------------------------------------------
# Sharding, bf16, remat
# ------------------------------------------------------------------------------------------------


def test_sharded_forward_equals_single_device():
  rng = _rng(9)
  patches = rng.randn(4, 32, TINY.patch_dim).astype(np.float32)
  pos = rng.randint(0, 16, size=(4, 32, 3))
  seg = np.repeat(np.r_[np.ones(20), 2 * np.ones(9), np.zeros(3)][None], 4, 0).astype(np.int32)
  single = create_encoder(TINY, seed=11)
  ref = single(patches, pos, seg, num_segments=2)

  mesh = jax.make_mesh((1, 2, 4), ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    sharded = create_encoder(TINY, seed=11)
    kernel = sharded.blocks[0].mlp.fc1.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
    assert len({s.device for s in kernel.addressable_shards}) == 8
    out = nnx.jit(lambda m, a, b, c: m(a, b, c, num_segments=2))(sharded, patches, pos, seg)
  np.testing.assert_allclose(out['pooled'], ref['pooled'], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(
    out['last_hidden_state'], ref['last_hidden_state'], atol=1e-5, rtol=1e-5
  )


def test_bf16_compute_keeps_fp32_params_and_stays_close(sharpen):
  cfg16 = EncoderConfig.preset('tiny', dtype='bfloat16')
  # Blocks sharpened, not the head: a sharpened probe's huge logits mostly measure bf16 rounding.
  m16 = sharpen(create_encoder(cfg16, seed=0), 4.0, head=False)
  m32 = sharpen(create_encoder(TINY, seed=0), 4.0, head=False)
  assert m16.blocks[0].mlp.fc1.kernel[...].dtype == jnp.float32
  rng = _rng(10)
  patches = rng.randn(2, 16, TINY.patch_dim).astype(np.float32)
  pos = rng.randint(0, 16, size=(2, 16, 3))
  out16 = call(m16, patches, pos)
  # As under the release's autocast: matmuls in bf16, LayerNorm outputs (and so the residual
  # stream and the post-norm states) float32 (tests/test_numerics.py bounds the errors).
  assert out16['last_hidden_state'].dtype == jnp.float32
  out32 = call(m32, patches, pos)
  a, b = np.asarray(out16['pooled'], np.float32), np.asarray(out32['pooled'])
  rel_l2 = np.linalg.norm(a - b) / np.linalg.norm(b)
  print('bf16 vs fp32 relative L2 error', rel_l2)
  assert rel_l2 < 2e-2


@pytest.mark.parametrize('policy', ['full', 'dots'])
def test_remat_gives_same_gradients(policy):
  rng = _rng(11)
  patches = rng.randn(2, 12, TINY.patch_dim).astype(np.float32)
  pos = rng.randint(0, 16, size=(2, 12, 3))

  def grads(cfg):
    m = create_encoder(cfg, seed=2)

    def loss(m):
      return jnp.sum(m(patches, pos)['pooled'] ** 2)

    return nnx.grad(loss)(m)

  g0 = jax.tree.leaves(grads(TINY))
  g1 = jax.tree.leaves(grads(EncoderConfig.preset('tiny', remat=policy)))
  for a, b in zip(g0, g1):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_encoder_flops_analytic_identities():
  cfg = EncoderConfig.preset('base')
  c, i, s, l = cfg.width, cfg.mlp_dim, 1, 1024
  f = enc.encoder_flops
  # Doubling the tokens doubles everything except attention's L^2 term and per-row/segment terms.
  assert f(cfg, 2 * l) - 2 * f(cfg, l) == cfg.depth * 8 * c * l**2 - (
    2 * c * c + 2 * s * (c * c + 2 * c * i)
  )
  assert f(cfg, l, backward=True) == 3 * f(cfg, l)
  # Against XLA's own count of the jitted forward (which also counts elementwise work).
  small = EncoderConfig.preset('tiny')
  model = create_encoder(small)
  x = jnp.zeros((1, 256, small.patch_dim))
  pos = jnp.zeros((1, 256, 3), jnp.int32)
  cost = nnx.jit(lambda m, a, b: m(a, b)['pooled']).lower(model, x, pos).compile().cost_analysis()
  xla = cost['flops'] if isinstance(cost, dict) else cost[0]['flops']
  assert 0.9 < f(small, 256) / xla < 1.05
