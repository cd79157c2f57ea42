"""The release's per-rank Partial FC centre shards become one [num_classes, C] matrix (fake shards
written in the release's naming and class split), and bad shard sets fail naming the file."""

import re

import numpy as np
import pytest

from ove_jax import losses
from ove_jax.convert import release_heads


def _write(folder, full, world, name='ov_encoder_si'):
  folder.mkdir(exist_ok=True)
  start = 0
  for r, rows in enumerate(release_heads.rank_rows(len(full), world)):
    np.save(folder / f'{name}_{r:03d}.npy', full[start : start + rows])
    start += rows
  return str(folder / f'{name}_%03d.npy')


@pytest.fixture
def full():
  return np.random.default_rng(0).normal(size=(1003, 16)).astype(np.float32)


def test_split_is_the_releases():
  # num_local = C // W + (r < C % W): the first C % W ranks hold one more class.
  assert release_heads.rank_rows(1003, 8) == [126, 126, 126, 125, 125, 125, 125, 125]
  assert sum(release_heads.rank_rows(2_000_000, 128)) == 2_000_000


@pytest.mark.parametrize('form', ['template', 'glob', 'folder'])
def test_shards_assemble_to_the_matrix(tmp_path, full, form):
  template = _write(tmp_path / 'si', full, 8)
  source = {
    'template': template,
    'glob': str(tmp_path / 'si' / 'ov_encoder_si_*.npy'),
    'folder': str(tmp_path / 'si'),
  }[form]
  np.testing.assert_array_equal(release_heads.assemble(source, 1003, 16), full)
  np.testing.assert_array_equal(release_heads.assemble(source), full)


def test_ranks_sort_numerically_past_ten(tmp_path, full):
  np.testing.assert_array_equal(release_heads.assemble(_write(tmp_path / 'w', full, 12)), full)


def test_load_release_centres_into_padded_heads(tmp_path, full):
  template = _write(tmp_path / 'si', full, 8)
  cfg = losses.PartialFCConfig(num_classes=1003, sampling_blocks=8)
  got = release_heads.load_release_centres({'image': template}, {'image': cfg, 'video': cfg}, 16)
  assert list(got) == ['image']
  head = release_heads.into_head(got['image'], cfg.padded_classes)
  assert head.shape == (cfg.padded_classes, 16) and head.dtype == np.float32
  np.testing.assert_array_equal(head[:1003], full)
  assert 0 < np.abs(head[1003:]).max() < 0.1
  with pytest.raises(ValueError, match=r"head\(s\) \['ocr'\]"):
    release_heads.load_release_centres({'ocr': template}, {'image': cfg}, 16)


def test_missing_rank_names_it(tmp_path, full):
  _write(tmp_path / 'si', full, 8)
  (tmp_path / 'si' / 'ov_encoder_si_005.npy').unlink()
  with pytest.raises(ValueError, match=r'rank\(s\) \[5\] are missing'):
    release_heads.assemble(str(tmp_path / 'si'))
  with pytest.raises(ValueError, match='a rank is missing in between'):
    release_heads.assemble(str(tmp_path / 'si' / 'ov_encoder_si_%03d.npy'))


def test_wrong_class_count_or_width_names_the_file(tmp_path, full):
  template = _write(tmp_path / 'si', full, 8)
  with pytest.raises(ValueError, match=r'ov_encoder_si_000.npy: 126 rows; the release splits 1000'):
    release_heads.assemble(template, 1000)
  with pytest.raises(ValueError, match='heads are 32 wide'):
    release_heads.assemble(template, 1003, 32)
  np.save(tmp_path / 'si' / 'ov_encoder_si_003.npy', full[:125, :8])
  with pytest.raises(ValueError, match='ov_encoder_si_003.npy: width 8'):
    release_heads.assemble(template)
  with pytest.raises(FileNotFoundError, match='no rank-0 shard'):
    release_heads.assemble(str(tmp_path / 'nothing_%03d.npy'))


def test_release_single_node_recipe():
  """stage2_video:release_single_node,si=DIR holds the values of the release's 8-GPU stage-2
  script (shells/ov_encoder_large_stage2_residual_8gpus.sh) and validates on 8 devices."""
  import os

  from ove_jax import config as config_lib
  from ove_jax import train

  path = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments', 'stage2_video.py'
  )
  module = config_lib.load_module(path)
  c = module.get_config('release_single_node,si=/ckpt/si')
  config_lib.validate(c)
  data, fsdp, _ = train.mesh_shape(c, 8)
  for name, h in c.data.heads.items():
    assert h.rows % (data * fsdp) == 0
    config_lib.head_loss_config(c, name).check_devices(8, name)
  assert (c.init.pytorch, c.init.checkpoint, c.init.heads) == ('/ckpt/si', '', 'fresh')
  assert (
    module.RELEASE_CENTRES % '/ckpt/si' % 3 == '/ckpt/si/ov_encoder_si_8gpus/ov_encoder_si_003.npy'
  )
  assert {n: h.num_classes for n, h in c.heads.items()} == {'image': 2_000_000, 'video': 400_000}
  assert {n: h.rows for n, h in c.data.heads.items()} == {'image': 64, 'video': 64}
  assert c.accumulate == 4 and c.total_steps == 2_500_000  # 1.28e9 samples / (16 x 8 x 4)
  assert (c.optim.lr, c.optim.warmup, c.model.preset) == (5e-5, 1e-3, 'large')
  assert tuple(c.data.heads.video.video_modes) == (0.375, 0.375, 0.25)
  assert (c.data.heads.image.resolution, c.data.heads.video.num_frames) == (448, 8)
  with pytest.raises(config_lib.ConfigError, match='needs si=DIR'):
    module.get_config('release_single_node')


def test_sources_from_a_config_string(tmp_path, full):
  template = _write(tmp_path / 'si', full, 8)
  assert release_heads.parse_sources(f'image={template}, video=/v/*.npy') == {
    'image': template,
    'video': '/v/*.npy',
  }
  assert release_heads.parse_sources('') == {}
  cfg = losses.PartialFCConfig(num_classes=1003)
  got = release_heads.load_release_centres(f'image={template}', {'image': cfg})
  np.testing.assert_array_equal(got['image'], full)
  with pytest.raises(ValueError, match="'image' is not head=SOURCE"):
    release_heads.parse_sources('image')
  with pytest.raises(ValueError, match="head 'image' is named twice"):
    release_heads.parse_sources('image=a,image=b')


@pytest.mark.parametrize('damage', ['empty', 'truncated', 'pickled'])
def test_a_damaged_rank_file_names_it_and_stops_warm_start(tmp_path, full, damage):
  """An emptied, truncated or pickled rank file is a ValueError naming it (not numpy's EOFError),
  so a run with init.release_centres stops at start with a config error naming the key."""
  from types import SimpleNamespace

  from ove_jax import config as config_lib
  from ove_jax import warm_start

  template = _write(tmp_path / 'si', full, 8)
  bad = tmp_path / 'si' / 'ov_encoder_si_002.npy'
  if damage == 'empty':
    bad.write_bytes(b'')
  elif damage == 'truncated':
    bad.write_bytes(bad.read_bytes()[:300])
  else:
    np.save(bad, np.array([{'weight': 1}], dtype=object), allow_pickle=True)
  why = {'empty': 'empty (0 bytes)', 'truncated': 'truncated', 'pickled': 'holds Python objects'}[
    damage
  ]
  with pytest.raises(ValueError, match=re.escape(f'release centre shard {bad}: {why}')):
    release_heads.assemble(template, 1003, 16)
  cfg = losses.PartialFCConfig(num_classes=1003)
  config = SimpleNamespace(
    init=SimpleNamespace(pytorch='', checkpoint='', release_centres=f'image={template}'), seed=0
  )
  program = SimpleNamespace(heads={'image': cfg}, encoder_cfg=SimpleNamespace(width=16))
  state = {'params': {'encoder': {}, 'heads': {'image': np.zeros((1024, 16), np.float32)}}}
  with pytest.raises(
    config_lib.ConfigError, match=f'init.release_centres=image=.*{re.escape(f"{bad}: {why}")}'
  ):
    warm_start.initialise_from(state, config, program)
