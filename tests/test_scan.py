"""Scanned layers: the stacked layout runs, converts and shards exactly as the unrolled one."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from ove_jax import convert
from ove_jax.models import (
  EncoderConfig,
  create_encoder,
  is_stacked,
  is_stacked_path,
  stack_blocks,
  to_layout,
  unstack_blocks,
)

TINY = EncoderConfig.preset('tiny')
TOL = 1e-5


def _inputs(seed=0, b=2, l=24):
  rng = np.random.RandomState(seed)
  patches = rng.randn(b, l, TINY.patch_dim).astype(np.float32)
  pos = rng.randint(0, 16, size=(b, l, 3))
  seg = np.repeat(np.r_[np.ones(l - 9), 2 * np.ones(6), np.zeros(3)][None], b, 0)
  return patches, pos, seg.astype(np.int32)


@pytest.fixture(scope='module')
def pair():
  """A sharpened unrolled tiny encoder and the same weights scanned."""
  unrolled = create_encoder(dataclasses.replace(TINY, depth=3), seed=3)
  for block in unrolled.blocks:  # attention far from uniform, so that positions matter
    for proj in (block.self_attn.q_proj, block.self_attn.k_proj):
      proj.kernel[...] = proj.kernel[...] * 8.0
  return unrolled, convert.with_layout(unrolled, scan_layers=True)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def assert_grads_close(got, want):
  """Every gradient within TOL of its own largest entry, or of the tree's largest for tensors
  whose gradient is analytically zero (the head's k bias: softmax ignores a constant shift)."""
  assert got.keys() == want.keys()
  scale = max(float(np.abs(v).max()) for v in want.values())
  for path, v in want.items():
    np.testing.assert_allclose(got[path], v, rtol=TOL, atol=TOL * scale, err_msg=str(path))
    assert _rel(got[path], v) <= TOL or np.abs(v).max() < TOL * scale, path


def test_presets_scan_by_default_and_tiny_does_not():
  for name in ('base', 'large', 'huge'):
    assert EncoderConfig.preset(name).scan_layers
    assert not EncoderConfig.preset(name, scan_layers=False).scan_layers
  assert not TINY.scan_layers and EncoderConfig.preset('tiny', scan_layers=True).scan_layers
  assert EncoderConfig.preset('large', scan_layers=None).scan_layers


def test_stacked_parameters_have_a_leading_layers_axis(pair):
  unrolled, scanned = pair
  kernel = scanned.blocks.mlp.fc1.kernel
  assert kernel[...].shape == (3, TINY.width, TINY.mlp_dim)
  assert kernel.get_metadata()['out_sharding'] == ('layers', 'embed', 'mlp')
  np.testing.assert_array_equal(kernel[...][1], unrolled.blocks[1].mlp.fc1.kernel[...])
  fresh = create_encoder(dataclasses.replace(TINY, scan_layers=True), seed=0)
  k = np.asarray(fresh.blocks.mlp.fc1.kernel[...])
  assert not np.array_equal(k[0], k[1])  # each layer gets its own draw
  assert abs(float(k.std()) - 0.02) < 2e-3


def test_scanned_equals_unrolled_outputs_and_hidden_states(pair):
  unrolled, scanned = pair
  patches, pos, seg = _inputs()
  run = nnx.jit(lambda m, a, b, c: m(a, b, c, num_segments=2, return_hidden_states=True))
  ref, out = run(unrolled, patches, pos, seg), run(scanned, patches, pos, seg)
  for key in ('last_hidden_state', 'pooled'):
    assert _rel(out[key], ref[key]) <= TOL, key
  assert len(out['hidden_states']) == len(ref['hidden_states']) == 4
  for a, b in zip(out['hidden_states'], ref['hidden_states']):
    assert _rel(a, b) <= TOL
  # forward_pixels: element 0 is the input of block 0, element i the output of block i.
  pixels = np.random.RandomState(1).randn(1, 56, 84, 3).astype(np.float32)
  fp = nnx.jit(lambda m, x: m.forward_pixels(x, output_hidden_states=True))
  a, b = fp(scanned, pixels), fp(unrolled, pixels)
  assert len(a['hidden_states']) == 4
  for x, y in zip(a['hidden_states'], b['hidden_states']):
    assert _rel(x, y) <= TOL


@pytest.mark.parametrize('remat', ['none', 'full', 'dots'])
def test_scanned_equals_unrolled_gradients(pair, remat):
  unrolled, scanned = pair
  patches, pos, seg = _inputs(2)

  def grads(model):
    model = convert.model_from_params(
      dataclasses.replace(model.cfg, remat=remat), convert.model_params(model)
    )

    def loss(m):
      out = m(patches, pos, seg, num_segments=2)
      return jnp.sum(out['pooled'] ** 2) + jnp.mean(out['last_hidden_state'] ** 2)

    g = nnx.grad(loss)(model)
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(g)}

  g_unrolled = grads(unrolled)
  assert_grads_close(unstack_blocks(grads(scanned)), g_unrolled)


def test_layout_conversion_is_exact_both_ways(pair):
  unrolled, scanned = pair
  flat_u, flat_s = convert.model_params(unrolled), convert.model_params(scanned)
  assert not is_stacked(flat_u) and is_stacked(flat_s)
  stacked = stack_blocks(flat_u, 3)
  assert stacked.keys() == flat_s.keys()
  for k in flat_s:
    assert stacked[k].dtype == flat_s[k].dtype and np.array_equal(stacked[k], flat_s[k]), k
  back = unstack_blocks(flat_s)
  assert back.keys() == flat_u.keys()
  for k in flat_u:
    assert np.array_equal(back[k], flat_u[k]), k
  assert to_layout(flat_u, scan_layers=False, depth=3).keys() == flat_u.keys()
  # A training state: the blocks under a prefix (the model's, the optimiser moments').
  state = {('opt', 'mu', 'encoder') + k: v for k, v in flat_u.items()}
  state[('opt', 'count')] = np.int32(7)
  stacked_state = stack_blocks(state, 3)
  assert np.array_equal(
    stacked_state[('opt', 'mu', 'encoder', 'blocks', 'mlp', 'fc1', 'kernel')],
    flat_s[('blocks', 'mlp', 'fc1', 'kernel')],
  )
  back_state = unstack_blocks(stacked_state)
  assert back_state.keys() == state.keys()
  assert all(np.array_equal(back_state[k], state[k]) for k in state)
  # Rank rules (weight decay on matrices) can discount the layers axis, also on JAX key paths.
  assert is_stacked_path(('encoder', 'blocks', 'mlp', 'fc1', 'bias'))
  assert not is_stacked_path(('encoder', 'blocks', 0, 'mlp', 'fc1', 'bias'))
  assert not is_stacked_path(('head', 'mlp', 'fc1', 'bias'))
  tree = {'encoder': {'blocks': {'mlp': {'bias': np.zeros((3, 4))}}}, 'probe': np.zeros((1, 4))}
  marks = jax.tree_util.tree_map_with_path(lambda p, v: is_stacked_path(p), tree)
  assert marks == {'encoder': {'blocks': {'mlp': {'bias': True}}}, 'probe': False}
  # Model level, and back again.
  again = convert.model_params(convert.with_layout(scanned, scan_layers=False))
  for k in flat_u:
    assert np.array_equal(again[k], flat_u[k]), k


def test_layout_errors_name_the_problem(pair):
  unrolled, _ = pair
  flat = convert.model_params(unrolled)
  with pytest.raises(ValueError, match='do not cover 0..3'):
    stack_blocks(flat, 4)
  mixed = dict(flat)
  mixed[('blocks', 'extra', 'kernel')] = np.zeros((3, 2))
  with pytest.raises(ValueError, match='mix the unrolled'):
    is_stacked(mixed)
  with pytest.raises(ValueError, match='already unrolled'):
    unstack_blocks(flat)


def test_release_format_round_trip_in_both_layouts(pair, tmp_path):
  # Both layouts export the very same release file; each loads back bit-exactly in either one.
  unrolled, scanned = pair
  du, ds = str(tmp_path / 'unrolled'), str(tmp_path / 'scanned')
  convert.save_pytorch(unrolled, du)
  convert.save_pytorch(scanned, ds)
  with (
    open(os.path.join(du, 'model.safetensors'), 'rb') as f1,
    open(os.path.join(ds, 'model.safetensors'), 'rb') as f2,
  ):
    assert f1.read() == f2.read()
  ref = convert.model_params(scanned)
  back = convert.load_pytorch(ds, scan_layers=True)
  assert back.cfg.scan_layers
  got = convert.model_params(back)
  assert got.keys() == ref.keys()
  for k in ref:
    assert np.array_equal(got[k], ref[k]), k
  # A checkpoint saved unrolled loads into a scanned encoder (and the reverse).
  cross = convert.model_from_params(scanned.cfg, convert.model_params(unrolled))
  for k, v in convert.model_params(cross).items():
    assert np.array_equal(v, ref[k]), k


def test_sharded_scanned_forward_and_grad_equal_single_device(pair):
  _, scanned = pair
  patches, pos, seg = _inputs(4, b=4, l=32)
  params = convert.model_params(scanned)

  def loss(m):
    out = m(patches, pos, seg, num_segments=2)
    return jnp.sum(out['pooled'] ** 2), out

  def run(model):
    (_, out), g = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return out, {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(g)}

  ref_out, ref_g = run(scanned)
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    sharded = convert.model_from_params(scanned.cfg, params)
    kernel = sharded.blocks.mlp.fc1.kernel[...]
    # The layers axis is unsharded; the rest as in the unrolled layout.
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')
    assert len({s.device for s in kernel.addressable_shards}) == 8
    out, g = run(sharded)
  for key in ('pooled', 'last_hidden_state'):
    assert _rel(out[key], ref_out[key]) <= TOL, key
  assert_grads_close(g, ref_g)


def test_port_save_loads_into_a_scanned_encoder(pair, tmp_path):
  # The PyTorch port reads the scanned export and its own save loads back stacked, bit-exactly.
  from ove_jax.convert import torch_model

  _, scanned = pair
  directory = str(tmp_path / 'scanned')
  convert.save_pytorch(scanned, directory)
  port = torch_model.load_pretrained(directory)
  assert len(port.encoder.layers) == 3
  torch_dir = str(tmp_path / 'from_torch')
  torch_model.save_pretrained(port, torch_dir)
  back = convert.model_params(convert.load_pytorch(torch_dir, scan_layers=True))
  for k, v in convert.model_params(scanned).items():
    assert np.array_equal(v, back[k]), k


def test_compile_time_tool_compiles_both_layouts(capsys):
  import json

  from ove_jax_tools import compile_time

  assert compile_time.main(['--preset', 'tiny', '--tokens', '16', '--dtype', 'float32']) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for layout in ('scanned', 'unrolled'):
    assert result[layout]['compile_s'] > 0 and result[layout]['temp_bytes'] > 0
  with pytest.raises(SystemExit):
    compile_time.main(['--layouts', 'diagonal'])
  assert 'choose from scanned,unrolled' in capsys.readouterr().err


def test_scanned_encoder_created_on_a_mesh_equals_the_unsharded_one():
  # The trainer's path: parameters created sharded (eager sharding under jax.set_mesh).
  cfg = EncoderConfig.preset('tiny', scan_layers=True)
  ref = convert.model_params(create_encoder(cfg, seed=3))
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    model = create_encoder(cfg, seed=3)
    assert model.blocks.mlp.fc1.kernel[...].sharding.spec == jax.sharding.PartitionSpec(
      None, 'fsdp', 'tensor'
    )
  got = convert.model_params(model)
  assert got.keys() == ref.keys()
  for k in ref:
    assert np.array_equal(got[k], ref[k]), k


def _scan_bodies_have(jaxpr, name: str) -> list[bool]:
  """For every scan in `jaxpr` (nested too): whether its body holds a `name` primitive."""
  found = []

  def has(j) -> bool:
    return any(e.primitive.name == name or any(has(s) for s in _subjaxprs(e)) for e in j.eqns)

  def walk(j):
    for e in j.eqns:
      if e.primitive.name == 'scan':
        found.append(has(e.params['jaxpr'].jaxpr))
      for s in _subjaxprs(e):
        walk(s)

  walk(jaxpr)
  return found


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for sub in value if isinstance(value, (list, tuple)) else [value]:
      sub = getattr(sub, 'jaxpr', sub)
      if hasattr(sub, 'eqns'):
        yield sub


@pytest.mark.parametrize('remat', ['none', 'full', 'dots'])
def test_remat_runs_inside_the_scan_body(pair, remat):
  # The checkpoint wraps one block inside the scan (XLA then plans one block's temporaries),
  # not the whole scan and not nothing: gradient equality alone would not tell.
  _, scanned = pair
  model = convert.model_from_params(
    dataclasses.replace(scanned.cfg, remat=remat), convert.model_params(scanned)
  )
  patches, pos, seg = _inputs(2)
  graphdef, params = nnx.split(model)

  def loss(params):
    out = nnx.merge(graphdef, params)(patches, pos, seg, num_segments=2)
    return jnp.sum(out['pooled'] ** 2)

  # The traced forward (what jax.grad differentiates): after differentiation the checkpoint is
  # resolved into the backward scan's recomputation and no longer a primitive.
  jaxpr = jax.make_jaxpr(loss)(params).jaxpr
  bodies = _scan_bodies_have(jaxpr, 'remat2')  # jax.checkpoint's primitive
  assert bodies, 'no scan over the blocks'
  outside = [e.primitive.name for e in jaxpr.eqns if e.primitive.name == 'remat2']
  assert not outside  # never around the whole scan
  assert any(bodies) == (remat != 'none'), bodies
