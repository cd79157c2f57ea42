"""Selections pinned on encoded clips: speed work on the maps must not move a single patch.

Each case selects on a deterministic synthetic clip and compares a digest of what the selection
decides (frame ids, picture types, positions, whole frames, static fallback) with the digest the
code gave before the speed work of issue 14 (recorded with the commit that added this file). The
cases cover the paths the map code takes: H.264 read as it is with B-frames (several candidate
references, bi-prediction), a panning camera (dense motion), frames analysed block-averaged
(step 2 and 3, where 4x4 vector cells and analysis pixels do not align), a transcoded HEVC
source, and the three release presets. A change that moves one patch changes the digest; the
scores are compared to the pinned sums within float32 rounding.
"""

import hashlib

import numpy as np
import pytest

from data_pipeline import codec, synthetic
from data_pipeline.codec import maps

# (name, make_clip kwargs, select kwargs)
CASES = [
  ('h264_b2_static', dict(seed=3, bframes=2, num_objects=2), {}),
  (
    'h264_b3_pan',
    dict(seed=4, bframes=3, background='pan', num_frames=96),
    dict(camera_compensation='median'),
  ),
  ('h264_pan_step2', dict(seed=5, height=464, width=496, background='pan', num_objects=3), {}),
  ('h264_b2_step3', dict(seed=6, height=688, width=720, bframes=2, num_frames=40), {}),
  ('hevc_transcoded', dict(seed=7, codec='hevc', num_frames=80, background='pan'), {}),
  (  # the preset's transcode before it re-encoded the samples alone (its pinned digest)
    'release_train',
    dict(seed=8, bframes=2, background='pan'),
    dict(preset='release_train', transcode='paired'),
  ),
  (  # the preset as it is: the samples re-encoded (recorded when that came in)
    'release_train_sampled',
    dict(seed=8, bframes=2, background='pan'),
    dict(preset='release_train'),
  ),
  (  # the preset's I-frames before they fell on the source's keyframes (its pinned digest)
    'release_probe',
    dict(seed=9, bframes=2, num_objects=3),
    dict(preset='release_probe', keyframes='samples', max_zeroed=0),
  ),
  (  # the preset as it is: I-frames on source frames 0, 16, 32, ... (recorded when that came in)
    'release_probe_source_keyframes',
    dict(seed=9, bframes=2, num_objects=3),
    dict(preset='release_probe'),
  ),
  (  # the quarter-pel vectors of the preset before it read whole pixels (its pinned digest)
    'release_llava',
    dict(seed=10, height=224, width=320, bframes=2),
    dict(
      preset='release_llava',
      resolution=576,
      patch_size=16,
      budget=10368,
      whole_pixel_vectors=False,
    ),
  ),
  (  # the preset as it is: whole-pixel vectors (recorded when they came in)
    'release_llava_whole_pixels',
    dict(seed=10, height=224, width=320, bframes=2),
    dict(preset='release_llava', resolution=576, patch_size=16, budget=10368),
  ),
]

PINNED = {  # name: (digest, sum of the scores)
  'h264_b2_static': ('9b0ca8b5fa676445', 129512.45107676089),
  'h264_b3_pan': ('11720f222c896a26', 120629.34357087314),
  'h264_pan_step2': ('a24d57d4b8fb55e9', 692987.550140053),
  'h264_b2_step3': ('456596423d9e14ad', 92473.6823765747),
  'hevc_transcoded': ('5e96d99ece06377c', 764388.010676384),
  'release_train': ('fa7856ba5b680941', 726029.8170970082),
  'release_train_sampled': ('933007230a0e2b45', 748573.2210728526),
  'release_probe': ('959b8284887c9a5d', 214958.6798542738),
  'release_probe_source_keyframes': ('d1c026ec3929c0d5', 209524.7150053829),
  'release_llava': ('e685a727f9869c81', 249043.46356733888),
  'release_llava_whole_pixels': ('44c19157520d121f', 231971.84872283787),
}


def digest(sel) -> str:
  h = hashlib.sha256()
  for array in (sel.frame_ids, sel.picture_types, sel.positions, sel.whole_frames):
    h.update(np.ascontiguousarray(array).tobytes())
  h.update(bytes([int(sel.static_fallback)]))
  return h.hexdigest()[:16]


def run(clip_kwargs, select_kwargs):
  clip = synthetic.make_clip(**clip_kwargs)
  grid = dict(num_frames=32, budget=1024, resolution=224, patch_size=14)
  grid.update({k: select_kwargs.pop(k) for k in list(select_kwargs) if k in grid})
  return codec.select(clip.data, **grid, **select_kwargs)


@pytest.mark.parametrize('name,clip_kwargs,select_kwargs', CASES, ids=[c[0] for c in CASES])
def test_selection_is_pinned(name, clip_kwargs, select_kwargs):
  sel = run(dict(clip_kwargs), dict(select_kwargs))
  want_digest, want_sum = PINNED[name]
  assert digest(sel) == want_digest, f'{name}: the selection moved'
  assert float(sel.scores.sum(dtype=np.float64)) == pytest.approx(want_sum, rel=1e-5)


# ----------------------------------------------------------------------------- exact kernels


def test_percentile_is_numpys_bit_for_bit():
  rng = np.random.default_rng(0)
  for i in range(300):
    n = int(rng.integers(1, 60000))
    kind = i % 4
    if kind == 0:
      x = rng.random(n) ** 3 * 50
    elif kind == 1:
      x = np.round(rng.random(n) * 10)  # many ties
    elif kind == 2:
      x = np.where(rng.random(n) < 0.97, 0.0, rng.random(n))  # mostly zero (a still frame)
    else:
      x = np.sort(rng.random(n))[::-1]
    x = x.astype(np.float32)
    for q in (95.0, 50.0, 99.0):
      assert maps.percentile(x, q) == float(np.percentile(x, q)), (i, n, q)
  # A sample that misleads the threshold (every 16th value large) takes numpy's own path.
  x = rng.random(20000).astype(np.float32)
  x[::16] = 100.0
  assert maps.percentile(x, 90.0) == float(np.percentile(x, 90.0))
  assert maps.percentile(np.arange(101.0), 95.0) == 95.0  # float64 goes to numpy


def reference_bilinear(ref_HxW, grid, step):
  """The prediction as the code before the speed work computed it: per-pixel weights and four
  gathers with x0, x0 + 1, y0, y0 + 1 each clipped to the image."""
  h, w = ref_HxW.shape
  flat = ref_HxW.reshape(-1).astype(np.float32)
  hc, wc = grid.dx_HcxWc.shape
  rows = np.minimum((step * np.arange(h) + step // 2) // maps.CELL, hc - 1)
  cols = np.minimum((step * np.arange(w) + step // 2) // maps.CELL, wc - 1)
  fx, fy = grid.dx_HcxWc / step, grid.dy_HcxWc / step
  ix, iy = np.floor(fx), np.floor(fy)
  ax = (fx - ix).astype(np.float32)[rows][:, cols]
  ay = (fy - iy).astype(np.float32)[rows][:, cols]
  x0 = ix.astype(np.int32)[rows][:, cols] + np.arange(w, dtype=np.int32)
  y0 = iy.astype(np.int32)[rows][:, cols] + np.arange(h, dtype=np.int32)[:, None]
  x1, y1 = np.clip(x0 + 1, 0, w - 1), np.clip(y0 + 1, 0, h - 1) * w
  x0, y0 = np.clip(x0, 0, w - 1), np.clip(y0, 0, h - 1) * w
  top = flat[y0 + x0]
  top += (flat[y0 + x1] - top) * ax
  bottom = flat[y1 + x0]
  bottom += (flat[y1 + x1] - bottom) * ax
  bottom -= top
  bottom *= ay
  top += bottom
  return top


@pytest.mark.parametrize('step', [1, 2, 3])
@pytest.mark.parametrize('moving_share', [0.1, 0.9])
def test_prediction_matches_the_four_gather_formula(step, moving_share):
  rng = np.random.default_rng(step)
  h, w = 61, 83  # analysis size; the coded frame is step times larger
  hc, wc = -(-h * step // maps.CELL), -(-w * step // maps.CELL)
  ref = (rng.random((h, w)) * 255).astype(np.float32)
  moving = rng.random((hc, wc)) < moving_share
  # Quarter-pel vectors, some far past the edges.
  dx = np.where(moving, np.round(rng.normal(0, 20, (hc, wc)) * 4) / 4, 0).astype(np.float32)
  dy = np.where(moving, np.round(rng.normal(0, 20, (hc, wc)) * 4) / 4, 0).astype(np.float32)
  grid = maps.VectorGrid(dx, dy, moving)
  want = np.where(
    np.repeat(np.repeat(moving, maps.CELL, 0), maps.CELL, 1)[(step * np.arange(h) + step // 2)][
      :, (step * np.arange(w) + step // 2)
    ],
    reference_bilinear(ref, grid, step).reshape(h, w),
    ref,
  )
  np.testing.assert_array_equal(maps.predict(ref, grid, step), want)
