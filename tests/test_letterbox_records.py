"""Records say which canvas their positions are on (`geometry`): precompute stores letterbox
pixels for a letterbox selection, and the training pipeline's video transform follows the record
in every mode without being configured; records of a centre crop are unchanged."""

import numpy as np
import pytest

from data_pipeline import clip_work, codec, pipeline, records, synthetic, transforms
from data_pipeline.codec import geometry
from data_pipeline.tokens import PATCH, VIDEO_GRID, VIDEO_RESOLUTION

T = 16


@pytest.fixture(scope='module')
def portrait():
  return synthetic.make_clip(3, num_frames=T, height=256, width=144, gop=8)


def _record(clip, tmp_path, **options):
  """One clip through precompute's per-clip work (selection, record, stored patches)."""
  path = tmp_path / 'clip.mp4'
  path.write_bytes(clip.data)
  settings = clip_work.Settings(
    options=dict(num_frames=T, budget=700, **options),
    inline_max_bytes=0,
    store_scores=False,
    record_format='records',
    store_patches=True,
  )
  clip_work.init_worker(settings)
  done = clip_work.process_clip(clip_work.Clip(str(path), (4,)))
  assert isinstance(done, clip_work.Done), done
  return records.decode(done.data)


def test_precompute_stores_the_pixels_of_the_selections_canvas(portrait, tmp_path):
  box = _record(portrait, tmp_path, geometry='letterbox', policy='first_frame')
  assert box['geometry'] == 'letterbox'
  want = transforms.codec_patches(portrait.data, box['frame_ids'], box['positions'], 'letterbox')
  np.testing.assert_array_equal(box['patches'], want)
  crop_pixels = transforms.codec_patches(portrait.data, box['frame_ids'], box['positions'])
  assert not np.array_equal(box['patches'], crop_pixels)
  # A crop record names no geometry: its bytes are what they were before the field existed.
  crop = _record(portrait, tmp_path)
  assert 'geometry' not in crop
  sel = codec.select(portrait.data, num_frames=T, budget=700)
  assert sel.geometry == 'crop' and 'geometry' not in sel.record_fields()
  np.testing.assert_array_equal(
    crop['patches'], transforms.codec_patches(portrait.data, crop['frame_ids'], crop['positions'])
  )


def test_the_video_transform_follows_the_record_in_every_mode(portrait, tmp_path):
  box = _record(portrait, tmp_path, geometry='letterbox', policy='first_frame')
  del box['patches']  # gathered from the video now
  box['video'] = portrait.data
  valid = geometry.valid_patches(
    portrait.height, portrait.width, VIDEO_RESOLUTION, PATCH, 'letterbox'
  )
  # The head's default geometry is the crop; the record's own field decides.
  head = pipeline.HeadConfig(kind='video', source='unused', video_modes=(1.0, 0.0, 0.0, 0.0))
  codec_sample = head.transform()(box, np.random.default_rng(0))
  want = transforms.codec_patches(portrait.data, box['frame_ids'], box['positions'], 'letterbox')
  np.testing.assert_array_equal(codec_sample['patches'], want)

  uniform = transforms.VideoTransform(mode_probs=(0.0, 1.0, 0.0), num_frames=2)
  sample = uniform(box, np.random.default_rng(1))
  frames = sample['patches'].reshape(2, VIDEO_GRID, VIDEO_GRID, PATCH * PATCH * 3)
  box_ = geometry.canvas(portrait.height, portrait.width, VIDEO_RESOLUTION, 'letterbox')
  columns = np.arange(VIDEO_GRID) * PATCH
  outside = (columns + PATCH <= box_.left) | (columns >= box_.left + box_.new_w)  # portrait
  assert outside.any() and frames[:, :, np.flatnonzero(outside)].max() == 0  # black padding
  assert frames[:, valid].max() > 0  # and the picture

  random = transforms.VideoTransform(mode_probs=(0.0, 0.0, 0.0, 1.0))
  for seed in range(3):
    sample = random(box, np.random.default_rng(seed))
    _, h, w = sample['positions'].T
    assert len(h) == len(box['positions']) and valid[h, w].all()
  # Without the field, the transform's own geometry applies (records made before it existed).
  del box['geometry']
  assert transforms.VideoTransform(geometry='letterbox').geometry_of(box) == 'letterbox'
  assert transforms.VideoTransform().geometry_of(box) == 'crop'


def test_geometry_names_are_checked():
  with pytest.raises(ValueError, match="geometry='square'.*crop, letterbox"):
    pipeline.HeadConfig(kind='video', source='unused', geometry='square')
  with pytest.raises(ValueError, match="record 'a.mp4': geometry='pad'"):
    transforms.VideoTransform().geometry_of({'source': 'a.mp4', 'geometry': 'pad'})


def test_visualising_a_letterbox_record_draws_its_canvas(portrait, tmp_path):
  # A record outside any precompute run (no plan.json to read the options from): its own
  # `geometry` field decides the canvas the picture is drawn on.
  from PIL import Image

  from data_pipeline import shards
  from ove_jax_tools import visualize_selection

  record = _record(portrait, tmp_path, geometry='letterbox', policy='first_frame')
  del record['patches']
  record['video'] = portrait.data
  path = str(tmp_path / 'one.array_record')
  writer = shards.ShardWriter(path)
  writer.write(records.encode(record))
  writer.commit()
  out = tmp_path / 'picture'
  assert visualize_selection.main([path, '--index', '0', '--out', str(out), '--cols', '1']) == 0
  gif = Image.open(out / 'selection.gif')
  gif.seek(1)  # a later frame: its kept patches (outlined) are inside the picture
  frame = np.asarray(gif.convert('RGB'), np.float32)[-VIDEO_RESOLUTION:]  # below any caption
  box = geometry.canvas(portrait.height, portrait.width, VIDEO_RESOLUTION, 'letterbox')
  assert box.left > 4
  assert frame[:, : box.left - 2].mean() < 5  # the black bars of the letterbox
  assert frame[:, box.left + 2 : box.left + box.new_w - 2].mean() > 20  # the picture
