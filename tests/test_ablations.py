"""The ablation knobs really change what is trained: RoPE variants, the random selection mode,
the built-in data's frame policy, and experiments/ablations.py's sweeps (experiments/ablations.py,
data_pipeline.transforms, data_pipeline.builtin, ove_jax.models.encoder)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipeline import builtin, pipeline, precompute, synthetic, transforms
from data_pipeline import video as video_lib
from ove_jax import checkpoint, convert, sweeps, train, train_inputs
from ove_jax import config as config_lib
from ove_jax.models import EncoderConfig, create_encoder, rope

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = os.path.join(REPO, 'experiments', 'ablations.py')

call = nnx.jit(lambda m, *a: m(*a)['last_hidden_state'])


def _model(rope, sharpen):
  # Sharpened q/k: at the from-scratch init attention is ~uniform and positions barely matter.
  return sharpen(create_encoder(EncoderConfig.preset('tiny', rope=rope), seed=0))


def _inputs(n=12, seed=0):
  rng = np.random.RandomState(seed)
  patches = jnp.asarray(rng.randn(1, n, 588), jnp.float32)
  positions = np.stack([rng.randint(0, 8, n), rng.randint(0, 16, n), rng.randint(0, 16, n)], -1)
  return patches, positions[None].astype(np.int32)


# ------------------------------------------------------------------------------------------------
# RoPE variants
# ------------------------------------------------------------------------------------------------


def test_rope_default_is_the_release_3d():
  cfg = EncoderConfig.preset('tiny')
  assert cfg.rope == '3d' and config_lib.defaults().model.rope == '3d'
  _, pos = _inputs()
  cos, sin = rope.rope_tables(jnp.asarray(pos), cfg)
  angles = rope.rope_angles(jnp.asarray(pos), 64, 10000.0)
  np.testing.assert_array_equal(cos, jnp.cos(angles))
  np.testing.assert_array_equal(sin, jnp.sin(angles))


def test_rope_1d_is_one_flat_index_over_the_whole_head_dim(sharpen):
  pos = np.array([[[2, 3, 5]]], np.int32)
  angles = np.asarray(rope.rope_angles_1d(jnp.asarray(pos), 64, 10000.0))[0, 0]
  index = (2 * rope.ROPE_1D_GRID + 3) * rope.ROPE_1D_GRID + 5
  half = index / 10000.0 ** (np.arange(32) / 32)
  np.testing.assert_allclose(angles, np.concatenate([half, half]), rtol=1e-6)

  # (0, 1, 0) and (0, 0, G) flatten to the same index: the same output under '1d', not '3d'.
  patches, positions = _inputs()
  other = positions.copy()
  positions[0, 0], other[0, 0] = (0, 1, 0), (0, 0, rope.ROPE_1D_GRID)
  one_d, three_d = _model('1d', sharpen), _model('3d', sharpen)
  np.testing.assert_array_equal(call(one_d, patches, positions), call(one_d, patches, other))
  assert not np.allclose(
    call(three_d, patches, positions), call(three_d, patches, other), atol=1e-3
  )
  assert not np.allclose(
    call(one_d, patches, positions), call(three_d, patches, positions), atol=1e-3
  )


def test_rope_none_ignores_positions(sharpen):
  patches, positions = _inputs()
  _, shuffled = _inputs(seed=1)
  none, three_d = _model('none', sharpen), _model('3d', sharpen)
  out = call(none, patches, positions)
  np.testing.assert_array_equal(out, call(none, patches, shuffled))
  # No rotation is the 3D rotation at position 0 (cos 1, sin 0); same weights (same seed).
  np.testing.assert_allclose(out, call(three_d, patches, np.zeros_like(positions)), atol=1e-6)
  assert not np.allclose(
    call(three_d, patches, positions), call(three_d, patches, shuffled), atol=1e-3
  )


def test_rope_variant_is_checked_and_named():
  with pytest.raises(ValueError, match=r"rope='2d'.*'3d', '1d', 'none'"):
    EncoderConfig.preset('tiny', rope='2d')
  c = config_lib.load(ABLATIONS + ':smoke')
  config_lib.apply_override(c, 'model.rope=2d')
  with pytest.raises(config_lib.ConfigError, match=r"model.rope='2d'; allowed values: 3d, 1d"):
    config_lib.validate(c)


def test_export_refuses_a_non_release_rope_and_checkpoints_record_it(tmp_path):
  model = create_encoder(EncoderConfig.preset('tiny', rope='1d'), seed=0)
  out = tmp_path / 'hf'
  with pytest.raises(convert.CheckpointError, match=r"rope='1d'.*only the 3D RoPE"):
    convert.save_pytorch(model, str(out))
  assert not out.exists()  # refused before writing anything
  saved = checkpoint.save_params(str(tmp_path / 'ours'), model.cfg, convert.model_params(model))
  assert json.load(open(os.path.join(saved, checkpoint.CONFIG_FILE)))['rope'] == '1d'
  assert checkpoint.load_params(saved)[0].rope == '1d'


def test_trainer_builds_the_configured_rope():
  c = config_lib.load(ABLATIONS + ':smoke', ['model.rope=none'])
  assert train.encoder_config(c).rope == 'none'


# ------------------------------------------------------------------------------------------------
# The random selection mode
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def clip_record():
  clip = synthetic.make_clip(3, num_frames=16, height=64, width=64)
  hh, ww = np.meshgrid(np.arange(3), np.arange(16), indexing='ij')  # "codec": rows 0-2 of t=0
  positions = np.stack([np.zeros(48), hh.reshape(-1), ww.reshape(-1)], -1).astype(np.int16)
  return {
    'video': clip.data,
    'frame_ids': np.arange(16, dtype=np.int32),
    'positions': positions,
    'labels': np.arange(3, dtype=np.int32),
  }


def test_random_mode_draws_the_budget_from_random_positions(clip_record):
  vt = transforms.VideoTransform(mode_probs=(0, 0, 0, 1), num_labels=3)
  sample = vt(clip_record, np.random.default_rng(0))
  assert sample['mode'] == transforms.MODE_RANDOM
  pos = sample['positions']
  assert pos.shape == (48, 3) and sample['patches'].shape == (48, transforms.PATCH_DIM)
  flat = (pos[:, 0] * 16 + pos[:, 1]) * 16 + pos[:, 2]
  assert np.all(np.diff(flat) > 0)  # distinct and sorted by (t, h, w)
  assert len(np.unique(pos[:, 0])) > 4  # spread over the clip, unlike the codec rows of t = 0
  # The 16-frame timeline sits on the 64-frame grid: t = floor(linspace(0, 63, 16)).
  assert set(pos[:, 0]) <= set(transforms.timeline_to_grid(16).tolist())
  # The pixels are those of the drawn positions.
  frames = video_lib.decode_frames(clip_record['video'], clip_record['frame_ids'], 224)
  timeline_t = np.searchsorted(transforms.timeline_to_grid(16), pos[:, 0])
  expected = np.stack(
    [
      frames[t, 14 * h : 14 * h + 14, 14 * w : 14 * w + 14].reshape(-1)
      for t, h, w in zip(timeline_t, pos[:, 1], pos[:, 2])
    ]
  )
  np.testing.assert_array_equal(sample['patches'], expected)

  again = vt(clip_record, np.random.default_rng(0))
  np.testing.assert_array_equal(again['positions'], pos)  # a function of the seeded rng
  other = vt(clip_record, np.random.default_rng(1))
  assert not np.array_equal(other['positions'], pos)
  bigger = dict(clip_record, positions=np.concatenate([clip_record['positions']] * 2)[:80])
  bigger['positions'][48:, 0] = 1
  assert len(vt(bigger, np.random.default_rng(0))['positions']) == 80


def test_video_modes_take_three_or_four_weights():
  head = dict(kind='video', source='unused', rows=2, tokens_per_row=512, num_frames=8)
  pipeline.HeadConfig(**head, video_modes=(0, 0, 0, 1))  # random tokens are the record's K
  pipeline.HeadConfig(**head, video_modes=(1, 0, 0))
  with pytest.raises(ValueError, match='2048 tokens > tokens_per_row=512'):
    pipeline.HeadConfig(**head, video_modes=(0, 1, 0, 0))
  with pytest.raises(ValueError, match='three or four non-negative weights'):
    transforms.VideoTransform(mode_probs=(1, 0, 0, 0, 1))


# ------------------------------------------------------------------------------------------------
# The frame policy of the built-in data
# ------------------------------------------------------------------------------------------------


def _records(result):
  return [r for path in result['video_source'].split(',') for r in precompute.read_shard(path)]


def test_frame_policy_reaches_the_records(tmp_path):
  small = dict(clips=2, images=1, budget=512, workers=0, progress=False)
  per_frame = 256
  for policy in ('zero', 'first_frame', 'paper'):
    result = builtin.ensure(str(tmp_path / policy), policy=policy, **small)
    for record in _records(result):
      t = record['positions'][:, 0]
      intra = np.flatnonzero(record['picture_types'] == 1)  # records.PICTURE_TYPES 'I'
      assert len(t) == 512 and len(intra) == 2
      if policy == 'zero':  # I-frame and first-frame scores zeroed
        assert not np.isin(t, intra).any()
      elif policy == 'first_frame':
        assert np.sum(t == 0) == per_frame
      else:  # both I-frames whole: the whole budget
        assert sorted(set(t.tolist())) == intra.tolist()
  with pytest.raises(ValueError, match=r"policy='first_frame' there, 'zero' asked"):
    builtin.ensure(str(tmp_path / 'first_frame'), **small)
  with pytest.raises(ValueError, match='policy=.bogus.: allowed values are paper, first_frame'):
    builtin.ensure(str(tmp_path / 'bogus'), policy='bogus', **small)


def test_trainer_passes_the_frame_policy(tmp_path, monkeypatch):
  seen = {}

  def ensure(root, **kwargs):
    seen.update(kwargs, root=root)
    return {'video_source': 'v', 'image_source': 'i'}

  monkeypatch.setattr(builtin, 'ensure', ensure)
  c = config_lib.load(ABLATIONS + ':smoke', ['builtin.policy=paper'])
  train_inputs.data_sources(c, str(tmp_path))
  assert seen['policy'] == 'paper' and seen['budget'] == 512


# ------------------------------------------------------------------------------------------------
# experiments/ablations.py
# ------------------------------------------------------------------------------------------------


def test_selection_points_differ_only_in_the_selection_at_one_budget():
  spec = ABLATIONS + ':smoke,study=selection'
  points = sweeps.expand(spec)
  assert [p.name for p in points] == ['selection=codec', 'selection=uniform', 'selection=random']
  flats = [config_lib.flatten(sweeps.point_config(spec, p)) for p in points]
  differ = {k for k in flats[0] if len({repr(f[k]) for f in flats}) > 1}
  assert differ == {'data.heads.video.video_modes'}
  modes = [f['data.heads.video.video_modes'] for f in flats]
  assert modes == [(1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0)]
  f = flats[1]
  assert (
    f['data.heads.video.num_frames'] * 256
    == f['data.heads.video.tokens_per_row']
    == f['builtin.budget']
    == 512
  )


def test_every_study_sweeps_a_real_key_in_both_sizes():
  expected = {
    'budget': 'builtin.budget',
    'policy': 'builtin.policy',
    'rope': 'model.rope',
    'margin': 'loss.margin',
    'scale': 'loss.scale',
    'sample_rate': 'loss.sample_rate',
  }
  for study, key in expected.items():
    for size, key_full in (('smoke,', key), ('', key)):
      if size == '' and study in ('budget', 'policy'):
        key_full = 'data.heads.video.source'  # full size: other precomputed records
      spec = f'{ABLATIONS}:{size}study={study}'
      values = {
        repr(config_lib.flatten(sweeps.point_config(spec, p))[key_full])
        for p in sweeps.expand(spec)
      }
      assert len(values) >= 3, (spec, values)
  with pytest.raises(config_lib.ConfigError, match='argument study=.lr.; allowed: selection'):
    sweeps.expand(ABLATIONS + ':study=lr')
  with pytest.raises(config_lib.ConfigError, match='multiple of 256'):
    sweeps.expand(ABLATIONS + ':smoke,budget=600')
