"""Our JAX encoder against our PyTorch port (written from the release's maths), fp32.

The JAX model is exported with `save_pytorch` and loaded by the port with `load_pretrained`, so
these tests cover the converter's layouts too. Weights are sharpened (see conftest) so that
attention, and therefore RoPE, matters. Every test runs with the blocks unrolled and scanned
(stacked parameters, exported through the per-layer keys).
"""

import numpy as np
import pytest
import torch  # the test install includes the `torch` extra
from flax import nnx

from ove_jax import convert
from ove_jax.convert import torch_model
from ove_jax.models import EncoderConfig, create_encoder, uniform_frame_times

TOL = 1e-5  # relative to the largest magnitude, fp32

pixels = nnx.jit(
  lambda m, *a, **k: m.forward_pixels(*a, **k), static_argnames=('output_hidden_states',)
)


@pytest.fixture(scope='module', params=['unrolled', 'scanned'])
def models(request, tmp_path_factory, sharpen):
  model = sharpen(create_encoder(EncoderConfig.preset('tiny'), seed=4))
  if request.param == 'scanned':
    model = convert.with_layout(model, scan_layers=True)
    assert model.cfg.scan_layers
  directory = str(tmp_path_factory.mktemp('export'))
  convert.save_pytorch(model, directory)
  port = torch_model.load_pretrained(directory).eval()
  return model, port


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def _compare(models, pixel_values_nhwc, **kwargs):
  model, port = models
  out = pixels(model, pixel_values_nhwc, output_hidden_states=True, **kwargs)
  x = torch.from_numpy(np.asarray(pixel_values_nhwc))
  x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(0, 4, 1, 2, 3)  # to NCHW / NCTHW
  torch_kwargs = {k: torch.from_numpy(np.asarray(v)).long() for k, v in kwargs.items()}
  with torch.no_grad():
    ref = port(x, output_hidden_states=True, **torch_kwargs)
  assert out['last_hidden_state'].shape == tuple(ref['last_hidden_state'].shape)
  assert _rel(out['last_hidden_state'], ref['last_hidden_state'].numpy()) <= TOL
  assert _rel(out['pooler_output'], ref['pooler_output'].numpy()) <= TOL
  assert len(out['hidden_states']) == len(ref['hidden_states'])
  for a, b in zip(out['hidden_states'], ref['hidden_states']):
    assert _rel(a, b.numpy()) <= TOL
  return out


def _video(rng, b, t, h, w):
  return rng.randn(b, t, h, w, 3).astype(np.float32)


def test_image_224(models):
  rng = np.random.RandomState(0)
  _compare(models, rng.randn(2, 224, 224, 3).astype(np.float32))


def test_non_square_image(models):
  rng = np.random.RandomState(1)
  out = _compare(models, rng.randn(1, 126, 196, 3).astype(np.float32))
  assert out['last_hidden_state'].shape[1] == 9 * 14


def test_dense_8_frame_video(models):
  rng = np.random.RandomState(2)
  _compare(models, _video(rng, 1, 8, 112, 112))


def test_sparse_visible_indices_with_gather(models):
  # 64 frames at 112x112 = 4096 candidate patches; keep 300 (the codec path).
  rng = np.random.RandomState(3)
  idx = np.stack([np.sort(rng.choice(64 * 64, 300, replace=False)) for _ in range(2)])
  out = _compare(models, _video(rng, 2, 64, 112, 112), visible_indices=idx)
  assert out['last_hidden_state'].shape[1] == 300


def test_indices_on_64_frame_grid_without_gather(models):
  # 8 uniformly sampled frames placed at floor(linspace(0, 63, 8)) on the virtual grid.
  rng = np.random.RandomState(4)
  t = uniform_frame_times(8)
  idx = (t[:, None] * 64 + np.arange(64)[None]).reshape(1, -1)
  _compare(models, _video(rng, 1, 8, 112, 112), visible_indices=idx)


def test_explicit_positions(models):
  rng = np.random.RandomState(5)
  n = 4 * 8 * 8
  pos = np.stack([rng.randint(0, 200, n), rng.randint(0, 40, n), rng.randint(0, 40, n)], -1)[None]
  _compare(models, _video(rng, 1, 4, 112, 112), patch_positions=pos)


def test_packed_tokens_match_port_per_sample(models):
  # Our native packed interface against the port run one sample at a time.
  model, port = models
  rng = np.random.RandomState(6)
  lengths, L = [40, 25], 72
  patches = np.zeros((1, L, 588), np.float32)
  pos = np.zeros((1, L, 3), np.int64)
  seg = np.zeros((1, L), np.int32)
  start = 0
  for s, n in enumerate(lengths):
    patches[0, start : start + n] = rng.randn(n, 588)
    pos[0, start : start + n] = np.stack(
      [rng.randint(0, 64, n), rng.randint(0, 16, n), rng.randint(0, 16, n)], -1
    )
    seg[0, start : start + n] = s + 1
    start += n
  out = nnx.jit(lambda m, a, b, c: m(a, b, c, num_segments=2))(model, patches, pos, seg)
  start = 0
  for s, n in enumerate(lengths):
    with torch.no_grad():
      ref = port.forward_tokens(
        torch.from_numpy(patches[:, start : start + n]), torch.from_numpy(pos[:, start : start + n])
      )
    assert _rel(out['pooled'][0, s], ref['pooler_output'][0].numpy()) <= TOL
    assert (
      _rel(out['last_hidden_state'][0, start : start + n], ref['last_hidden_state'][0].numpy())
      <= TOL
    )
    start += n


def test_eager_attention_equals_sdpa(models):
  """The release's eager attention path (ove-bench-encoder's PyTorch baseline) computes what
  scaled_dot_product_attention does, on the codec path's input."""
  _, port = models
  rng = np.random.RandomState(6)
  idx = torch.from_numpy(np.sort(rng.choice(64 * 64, 256, replace=False))[None])
  x = torch.from_numpy(_video(rng, 1, 4, 112, 112)).permute(0, 4, 1, 2, 3)
  try:
    with torch.no_grad():
      sdpa = port(x, visible_indices=idx)['last_hidden_state'].numpy()
      torch_model.set_attention_implementation(port, 'eager')
      assert all(
        m.attn_implementation == 'eager'
        for m in port.modules()
        if isinstance(m, torch_model.OVAttention)
      )
      eager = port(x, visible_indices=idx)['last_hidden_state'].numpy()
  finally:
    torch_model.set_attention_implementation(port, 'sdpa')
  assert _rel(eager, sdpa) <= TOL
  with pytest.raises(ValueError, match='eager'):
    torch_model.set_attention_implementation(port, 'flash')
