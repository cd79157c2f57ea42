"""Letterbox geometry: selection on the square canvas, the pipeline's gather, visualisation."""

import io

import av
import numpy as np
import pytest
from PIL import Image

from data_pipeline import codec, synthetic, transforms
from data_pipeline.codec import geometry
from data_pipeline.tokens import PATCH, VIDEO_RESOLUTION
from data_pipeline.video import VideoError

T = 16


@pytest.fixture(scope='module', params=[(256, 144), (144, 256)], ids=['portrait', 'landscape'])
def clip(request):
  height, width = request.param
  return synthetic.make_clip(7, num_frames=T, height=height, width=width, gop=8)


def direct_canvas(data: bytes, index: int, resolution: int, resampler: str) -> np.ndarray:
  """Frame `index` decoded here, its long side resized to `resolution` with swscale's bicubic
  ('swscale', what the pipeline uses) or PIL's ('pil', an independent check), pasted centred
  on black: the letterbox written out from stage1's formulas."""
  with av.open(io.BytesIO(data)) as container:
    for i, frame in enumerate(container.decode(video=0)):  # noqa: B007 (frame is used below)
      if i == index:
        break
    h, w = frame.height, frame.width
    scale = resolution / max(h, w)
    new_h, new_w = int(round(h * scale)), int(round(w * scale))
    if resampler == 'swscale':
      resized = frame.reformat(
        width=new_w, height=new_h, format='rgb24', interpolation='BICUBIC'
      ).to_ndarray()
    else:
      resized = np.asarray(
        Image.fromarray(frame.to_ndarray(format='rgb24')).resize((new_w, new_h), Image.BICUBIC)
      )
  out = np.zeros((resolution, resolution, 3), np.uint8)
  top, left = (resolution - new_h) // 2, (resolution - new_w) // 2
  out[top : top + new_h, left : left + new_w] = resized
  return out


@pytest.mark.parametrize('policy', ['paper', 'first_frame', 'zero'])
def test_positions_never_on_padding_after_first_frame(clip, policy):
  sel = codec.select(clip.data, num_frames=T, budget=700, geometry='letterbox', policy=policy)
  valid = geometry.valid_patches(clip.height, clip.width, VIDEO_RESOLUTION, PATCH, 'letterbox')
  assert 0 < valid.sum() < valid.size and len(sel.positions) == 700
  later = sel.positions[sel.positions[:, 0] > 0]
  assert valid[later[:, 1], later[:, 2]].all()
  first = sel.positions[sel.positions[:, 0] == 0]
  if 0 in sel.whole_frames:
    assert len(first) == valid.size  # the first frame whole, padding too
  else:
    assert valid[first[:, 1], first[:, 2]].all()
  # The picture's moving patches are what is found (coverage on the letterbox canvas).
  ay, ax = geometry.patch_integrators(clip.height, clip.width, VIDEO_RESOLUTION, PATCH, 'letterbox')
  moving = (ay @ clip.masks[sel.frame_ids].astype(np.float32) @ ax.T) / PATCH**2 >= 0.1
  share = moving[tuple(later.T)].mean()
  assert share > 2 * moving[1:][np.broadcast_to(valid, moving[1:].shape)].mean()


def test_crop_and_letterbox_differ_only_in_geometry(clip):
  crop = codec.select(clip.data, num_frames=T, budget=700)
  box = codec.select(clip.data, num_frames=T, budget=700, geometry='letterbox')
  np.testing.assert_array_equal(crop.frame_ids, box.frame_ids)
  np.testing.assert_array_equal(crop.picture_types, box.picture_types)
  # The same motion, seen whole: the letterbox's scores integrate the full frame.
  assert box.scores.sum() > 0 and not np.array_equal(crop.positions, box.positions)


def test_gather_matches_direct_crop(clip):
  sel = codec.select(
    clip.data, num_frames=T, budget=700, geometry='letterbox', policy='first_frame'
  )
  patches = transforms.codec_patches(clip.data, sel.frame_ids, sel.positions, 'letterbox')
  assert patches.shape == (700, PATCH * PATCH * 3)

  def crops(canvas, shift=0):
    out, canvas = [], np.roll(canvas, -shift, axis=0)
    for k in rows:
      _, h, w = sel.positions[k]
      out.append(canvas[h * PATCH : (h + 1) * PATCH, w * PATCH : (w + 1) * PATCH].reshape(-1))
    return np.stack(out).astype(np.int16)

  for t in np.unique(sel.positions[:, 0])[:4]:
    rows = np.flatnonzero(sel.positions[:, 0] == t)
    got = patches[rows].astype(np.int16)
    exact = direct_canvas(clip.data, int(sel.frame_ids[t]), VIDEO_RESOLUTION, 'swscale')
    np.testing.assert_array_equal(got, crops(exact))
    pil = direct_canvas(clip.data, int(sel.frame_ids[t]), VIDEO_RESOLUTION, 'pil')
    error = np.abs(got - crops(pil)).mean()
    assert error < 5, error  # another resampler: close, on the same pixels
    assert np.abs(got - crops(pil, shift=2)).mean() > 1.5 * error  # two pixels off is worse
  # Through the pipeline's transform (codec mode) as well.
  transform = transforms.VideoTransform(mode_probs=(1.0, 0.0, 0.0), geometry='letterbox')
  record = dict(video=clip.data, frame_ids=sel.frame_ids, positions=sel.positions, labels=[3])
  sample = transform(record, np.random.default_rng(0))
  np.testing.assert_array_equal(sample['patches'], patches)


def test_letterbox_canvas_decode_and_visualisation(clip, tmp_path):
  frames = geometry.decode_canvas(clip.data, [0, T + 5], VIDEO_RESOLUTION, 'letterbox')
  valid = geometry.valid_patches(clip.height, clip.width, VIDEO_RESOLUTION, PATCH, 'letterbox')
  box = geometry.canvas(clip.height, clip.width, VIDEO_RESOLUTION, 'letterbox')
  pad = np.ones((VIDEO_RESOLUTION, VIDEO_RESOLUTION), bool)
  pad[box.top : box.top + box.new_h, box.left : box.left + box.new_w] = False
  assert frames.shape == (2, 224, 224, 3) and not frames[:, pad].any()
  assert frames[0][~pad].mean() > 20
  from ove_jax_tools import visualize_selection

  path = clip.write(tmp_path / 'clip.mp4')
  out = tmp_path / 'vis'
  assert (
    visualize_selection.main(
      [
        path,
        '--out',
        str(out),
        '--num-frames',
        str(T),
        '--budget',
        '700',
        '--geometry',
        'letterbox',
      ]
    )
    == 0
  )
  shown = np.asarray(Image.open(out / 'selection.png'))
  assert shown.shape[0] > 224 and valid.sum() < valid.size


def test_budget_beyond_the_picture_is_refused(clip):
  valid = geometry.valid_patches(clip.height, clip.width, VIDEO_RESOLUTION, PATCH, 'letterbox')
  with pytest.raises(VideoError, match='budget=.*exceeds.*picture covers'):
    codec.select(
      clip.data, num_frames=T, budget=T * int(valid.sum()) + 1, geometry='letterbox', policy='zero'
    )


@pytest.mark.parametrize('static_test,threshold', [('ove', 0.03), ('release', 126.0)])
def test_static_test_judges_the_picture_not_the_padding(static_test, threshold):
  # A flat field of scores (a camera pan) on a 2.35:1 letterbox, mostly padding: judged as
  # the same field on a crop is; the padding's zeros once made the relative test unable to fire.
  from data_pipeline.codec import selection
  from data_pipeline.codec.options import Options

  valid = geometry.valid_patches(544, 1280, VIDEO_RESOLUTION, PATCH, 'letterbox')  # 2.35:1
  assert 0.3 < valid.mean() < 0.5  # more padding than picture: the median cell is padding
  kinds, repeats = ['I'] + ['P'] * 15, np.zeros(16, bool)
  for level in (0.01, 0.7):  # faint, and flat (relative test)
    flat = np.full((16, 16, 16), level * PATCH**2, np.float32)
    verdicts = []
    for geo, scores, mask in (('crop', flat, None), ('letterbox', flat * valid, valid)):
      opts = Options.from_kwargs(
        dict(
          static_fallback=True,
          static_test=static_test,
          static_threshold=threshold,
          policy='first_frame',
          geometry=geo,
        )
      )
      verdicts.append(selection.choose(scores, kinds, repeats, 700, opts, PATCH, mask)[2])
    assert verdicts == [True, True], (level, verdicts)


def test_release_llava_fills_a_short_picture_with_padding_as_stage1_does():
  # A 400x32 clip letterboxed to 576 has two rows of picture patches (72 of 1296 a frame): with
  # the budget past the picture, stage1 (padding scored -1e-4) takes every picture patch, then
  # padding; without the preset's padding_fill the clip is refused, naming the way out.
  wide = synthetic.make_clip(5, num_frames=16, height=32, width=400, gop=8)
  side = 576 // 16
  valid = geometry.valid_patches(32, 400, 576, 16, 'letterbox')
  assert valid.sum() == 72
  options = dict(num_frames=16, budget=3000, resolution=576, patch_size=16)
  sel = codec.select(wide.data, preset='release_llava', **options)
  assert len(sel.positions) == 3000 and list(sel.whole_frames) == [0]
  t, h, w = sel.positions.T
  assert (t == 0).sum() == side * side  # the first frame whole
  later = sel.positions[t > 0]
  inside = valid[later[:, 1], later[:, 2]]
  assert inside.sum() == 15 * 72  # every picture patch of the later frames
  padding = later[~inside]
  flat = (padding[:, 0] * side + padding[:, 1]) * side + padding[:, 2]
  all_padding = np.flatnonzero(np.broadcast_to(~valid, (16, side, side))[1:].reshape(-1)) + side**2
  np.testing.assert_array_equal(flat, all_padding[: len(flat)])  # the first ones, in order
  with pytest.raises(VideoError, match='padding_fill=True'):
    codec.select(wide.data, preset='release_llava', padding_fill=False, **options)


def test_a_picture_with_no_whole_patch_is_judged_static_not_a_crash():
  # A 1000x10 sliver letterboxed to 224 covers no whole 14-pixel patch: nothing to judge.
  from data_pipeline.codec import selection
  from data_pipeline.codec.options import Options

  valid = geometry.valid_patches(10, 1000, VIDEO_RESOLUTION, PATCH, 'letterbox')
  assert not valid.any()
  for static_test in ('ove', 'release'):
    opts = Options.from_kwargs(
      dict(
        static_fallback=True, static_test=static_test, geometry='letterbox', policy='first_frame'
      )
    )
    scores = np.zeros((16, 16, 16), np.float32)
    _, whole, fallback = selection.choose(
      scores, ['I'] + ['P'] * 15, np.zeros(16, bool), 256, opts, PATCH, valid
    )
    assert fallback and 0 in whole
