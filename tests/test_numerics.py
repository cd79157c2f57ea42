"""bf16 numerics as the release trains them (autocast): matmuls in bf16, the residual stream, the
norms and the MAP head's pooling logits in float32. Bounds of bf16 against fp32, same weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ove_jax import convert, losses
from ove_jax.models import EncoderConfig, cpu_layouts, create_encoder

CFG32 = dataclasses.replace(EncoderConfig.preset('tiny'), depth=4)


def _rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _pair(scan_layers=False, sharpen=4.0):
  """fp32 and bf16-compute encoders with the same (float32) weights, attention sharpened."""
  m32 = create_encoder(CFG32, seed=5)
  for module in [*m32.blocks, m32.head]:
    attn = getattr(module, 'self_attn', module)
    for proj in (attn.q_proj, attn.k_proj):
      proj.kernel[...] = proj.kernel[...] * sharpen
  params = convert.model_params(m32)
  cfg32 = dataclasses.replace(CFG32, scan_layers=scan_layers)
  return (
    convert.model_from_params(cfg32, params),
    convert.model_from_params(dataclasses.replace(cfg32, dtype='bfloat16'), params),
  )


def _tokens(b=2, l=64, seed=0):
  rng = np.random.RandomState(seed)
  return (rng.randn(b, l, CFG32.patch_dim).astype(np.float32), rng.randint(0, 16, (b, l, 3)))


@pytest.mark.parametrize('scan_layers', [False, True])
def test_bf16_encoder_keeps_a_float32_residual_stream_within_bounds(scan_layers):
  m32, m16 = _pair(scan_layers)
  patches, pos = _tokens()
  run = nnx.jit(lambda m, a, b: m(a, b, return_hidden_states=True))
  o32, o16 = run(m32, patches, pos), run(m16, patches, pos)
  # Between blocks the stream is float32 (LayerNorm returns float32, the branch's bf16 output is
  # added to it), and so are the post-norm states and the pooled embedding.
  assert all(h.dtype == jnp.float32 for h in o16['hidden_states'])
  assert o16['last_hidden_state'].dtype == o16['pooled'].dtype == jnp.float32
  errors = [_rel_l2(a, b) for a, b in zip(o16['hidden_states'], o32['hidden_states'])]
  print('bf16 vs fp32 relative L2 per hidden state', errors)
  assert max(errors) < 1e-2
  # Only the branches round: the error does not build up over the blocks.
  assert errors[-1] < 2 * errors[1]
  assert _rel_l2(o16['last_hidden_state'], o32['last_hidden_state']) < 1e-2
  assert _rel_l2(o16['pooled'], o32['pooled']) < 5e-2


def _dots(jaxpr):
  """Every dot_general of a jaxpr, nested ones (jit, remat, scan) included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      out.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, 'jaxpr', sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, 'eqns'):
          out += _dots(sub)
  return out


def test_map_head_logits_are_float32_in_bf16():
  _, m16 = _pair()
  b, l = 2, 16
  x = jnp.asarray(np.random.RandomState(1).randn(b, l, CFG32.width), jnp.float32)
  seg = jnp.ones((b, l), jnp.int32)
  # The products as the model declares them (the GPU/TPU form): on the CPU backend every bf16
  # product returns float32 and the layer rounds it after (tests/test_cpu_layouts.py).
  with cpu_layouts.autodiff_layouts():
    jaxpr = jax.make_jaxpr(lambda x: m16.head(x, seg, 1))(x).jaxpr
  dots = _dots(jaxpr)
  f32 = [e for e in dots if all(v.aval.dtype == jnp.float32 for v in e.invars)]
  # Exactly one product of the head runs on float32 operands: probe . keys, the pooling logits
  # ([B, H, L]); its q and k come from bf16 matmuls that accumulate and return float32.
  assert len(f32) == 1 and f32[0].outvars[0].aval.size == b * CFG32.num_heads * l
  projections = [
    e
    for e in dots
    if e.outvars[0].aval.dtype == jnp.float32
    and all(v.aval.dtype == jnp.bfloat16 for v in e.invars)
  ]
  assert len(projections) == 2
  others = [e for e in dots if e not in f32 and e not in projections]
  assert others and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in others)


def test_bf16_train_step_of_encoder_and_partial_fc_within_bounds():
  m32, m16 = _pair(sharpen=1.0)
  b = 8
  patches, pos = _tokens(b=b, seed=2)
  rng = np.random.RandomState(3)
  cfg = losses.PartialFCConfig(num_classes=400, sample_rate=0.25, num_slots=4, sampling_blocks=4)
  centres = losses.init_centres(jax.random.key(0), cfg, CFG32.width)
  labels = rng.randint(0, 400, (b, 6)).astype(np.int32)
  valid, ids = np.ones(b, bool), np.arange(b, dtype=np.int32)

  def step(model, centres):
    def loss(model, centres):
      e = model(patches, pos)['pooled'][:, 0]
      return losses.reference_loss(e, valid, labels, ids, centres, 1, cfg)['loss']

    return nnx.value_and_grad(loss, argnums=(0, 1))(model, centres)

  run = nnx.jit(step)
  (l32, (g32, gc32)), (l16, (g16, gc16)) = run(m32, centres), run(m16, centres)
  flat32 = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(g32)}
  flat16 = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(g16)}
  assert flat16.keys() == flat32.keys()
  assert all(v.dtype == np.float32 for v in flat16.values())
  order = sorted(flat32, key=str)
  whole = _rel_l2(
    np.concatenate([flat16[p].ravel() for p in order]),
    np.concatenate([flat32[p].ravel() for p in order]),
  )
  loss_err = abs(float(l16) - float(l32)) / abs(float(l32))
  print(
    f'bf16 vs fp32: loss {loss_err:.2e}, encoder grads {whole:.2e}, centre grads '
    f'{_rel_l2(gc16, gc32):.2e}'
  )
  assert loss_err < 2e-3
  assert whole < 5e-2
  assert _rel_l2(gc16, gc32) < 5e-2
  # Every block's weights get a gradient of the right direction.
  for p in order:
    if p[-1] == 'kernel':
      cos = float(
        np.sum(flat16[p] * flat32[p]) / (np.linalg.norm(flat16[p]) * np.linalg.norm(flat32[p]))
      )
      assert cos > 0.99, p
