"""The LLaVA reader's vector grid (`release_motion`, `vector_grid='llava'`, set by
`release_llava`), pinned against a numpy transcription of the release's code: the grid
`src/cv_reader/h264_api.cpp` fills from FFmpeg's MOTION_VECTORS records and the motion map
`tool/stage1.py`'s `_mv_energy_norm` makes of it (median compensation and p95 over the cells,
OpenCV's INTER_NEAREST stretch to the frame), at frame sizes that are and are not multiples of 4
and with blocks of every H.264 size; then end to end on an encoded clip."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_codec_kernels import VECTOR_DTYPE, both

from data_pipeline import codec, synthetic
from data_pipeline.codec import maps, release_motion
from data_pipeline.codec.options import Options


def h264_records(rng, count: int, height: int, width: int) -> np.ndarray:
  """Blocks as H.264 codes them: w x h of 16, 8 or 4 pixels at multiples of their size, reported
  by their centre; L0 (-1) and L1 (+1); quarter-pel motion and the source position FFmpeg
  derives from it (dst + motion / 4 in C's integer division); many overlap."""
  records = np.zeros(count, VECTOR_DTYPE)
  w = rng.choice([4, 8, 16], count)
  h = rng.choice([4, 8, 16], count)
  x0 = rng.integers(0, -(-width // 4), count) * 4 // w * w
  y0 = rng.integers(0, -(-height // 4), count) * 4 // h * h
  motion = rng.integers(-90, 90, (2, count))
  records['source'] = rng.choice([-1, 1], count, p=[0.8, 0.2])
  records['w'], records['h'] = w, h
  records['dst_x'], records['dst_y'] = x0 + w // 2, y0 + h // 2
  records['motion_x'], records['motion_y'] = motion
  records['motion_scale'] = 4
  records['src_x'] = records['dst_x'] + np.trunc(motion[0] / 4).astype(np.int64)
  records['src_y'] = records['dst_y'] + np.trunc(motion[1] / 4).astype(np.int64)
  return records


def reader_grid(records: np.ndarray, height: int, width: int) -> np.ndarray:
  """h264_api.cpp's H.264 branch: an int32 (H / 4, W / 4, 2) grid of L0 src - dst (C's integer
  division throughout), each block setting dst / 4 + s for s in [-(size / 8), size / 8)."""

  def c_div(a: int, b: int) -> int:
    return int(a / b)

  mv = np.zeros((c_div(height, 4), c_div(width, 4), 2), np.int32)
  for r in records:
    w, h, dx, dy = int(r['w']), int(r['h']), int(r['dst_x']), int(r['dst_y'])
    for xs in range(-c_div(w, 8), c_div(w, 8)):
      for ys in range(-c_div(h, 8), c_div(h, 8)):
        px, py = c_div(dx, 4) + xs, c_div(dy, 4) + ys
        if 0 <= py < c_div(height, 4) and 0 <= px < c_div(width, 4):
          if r['source'] == 0 or r['source'] < 0:  # L0
            mv[py, px] = (int(r['src_x']) - dx, int(r['src_y']) - dy)
  return mv


def stage1_motion(mv: np.ndarray, height: int, width: int) -> np.ndarray:
  """stage1's `_mv_energy_norm` (median compensation, mv_unit_div 4, p95 over the grid), its
  map stretched to height x width as OpenCV's INTER_NEAREST does: source index
  floor(x * (1 / (dst / src))) in doubles, clamped."""
  vx, vy = mv[..., 0].astype(np.float32) / 4.0, mv[..., 1].astype(np.float32) / 4.0
  vx, vy = vx - np.median(vx), vy - np.median(vy)
  mag = np.sqrt(vx * vx + vy * vy).astype(np.float32)
  a = max(float(np.percentile(mag, 95.0)), 1e-6)
  norm = np.clip(mag / a, 0.0, 1.0)

  return norm[opencv_nearest(height, norm.shape[0])][:, opencv_nearest(width, norm.shape[1])]


def opencv_nearest(dst: int, src: int) -> np.ndarray:
  """cv2.resize INTER_NEAREST's source index of each of `dst` outputs: floor(x * ifx) in
  doubles, ifx = 1 / (dst / src), clamped to the last."""
  scale = 1.0 / (dst / src)
  return np.array([min(math.floor(x * scale), src - 1) for x in range(dst)])


def ours(records: np.ndarray, height: int, width: int) -> np.ndarray:
  grid = release_motion.llava_paint(records, height, width)
  cells, weights, runs = release_motion.llava_cells(
    grid, height, width, 'median', 1, True, height, width
  )
  scale = max(maps.percentile(cells, maps.PERCENTILE, weights), maps.MOTION_FLOOR)
  return maps.cells_to_pixels(np.clip(cells / scale, 0.0, 1.0), height, width, 1, runs)


@pytest.mark.parametrize('height,width', [(48, 64), (30, 50), (120, 214), (480, 854)])
def test_grid_and_motion_are_the_readers(monkeypatch, height, width):
  rng = np.random.default_rng([height, width])
  records = h264_records(rng, max(40, height * width // 120), height, width)
  want_mv = reader_grid(records, height, width)
  grid = release_motion.llava_paint(records, height, width)
  assert grid.dx_HcxWc.shape == (height // 4, width // 4)
  for k, d in enumerate((grid.dx_HcxWc, grid.dy_HcxWc)):
    np.testing.assert_array_equal(np.where(grid.has_HcxWc, np.trunc(d), 0), want_mv[..., k])
  # Blocks with a 4-pixel side set no cell, and the numpy painting agrees with the kernel's.
  small = (records['w'] == 4) | (records['h'] == 4)
  assert small.any() and (~small).any()
  fast, reference = both(monkeypatch, release_motion.llava_paint, records, height, width)
  for field in ('dx_HcxWc', 'dy_HcxWc', 'has_HcxWc'):
    np.testing.assert_array_equal(getattr(fast, field), getattr(reference, field))
  want = stage1_motion(want_mv, height, width)
  got = ours(records, height, width)
  assert got.shape == want.shape == (height, width)
  np.testing.assert_array_equal(got, want.astype(np.float32))
  # The covering grid (every block, the ragged edge, pixels by their centre) reads otherwise.
  cover = release_motion.pixels(maps.paint_vectors(records, height, width, -1), height, width,
                                'median', 1, True)  # fmt: skip
  scale = max(float(np.percentile(cover, 95.0)), 1e-6)
  assert not np.array_equal(np.clip(cover / scale, 0.0, 1.0), want)


def test_stretch_runs_are_opencvs_nearest():
  for size, step in ((854, 1), (480, 1), (50, 1), (1708, 2), (1280, 3)):
    cells, analysed = size // 4, size // step
    runs = release_motion.stretch_runs(analysed, analysed, cells, cells, step, size, size)[1]
    under = np.repeat(np.arange(cells), np.diff(runs))
    # Each analysis pixel reads the cell OpenCV's stretch gives its middle coded pixel.
    middle = step * np.arange(analysed) + step // 2
    np.testing.assert_array_equal(under, opencv_nearest(size, cells)[middle])
    if step == 1:
      # Cell c starts at pixel 4c where the size is a multiple of 4; at 854 (213 cells) it
      # drifts right by up to half a cell, and the last cell takes the ragged edge.
      shift = runs[:-1] - 4 * np.arange(cells)
      assert shift.min() == 0 and shift.max() == (0 if size % 4 == 0 else 2), size


def test_release_llava_reads_the_readers_grid_end_to_end():
  # A 426-pixel-wide clip (not a multiple of 4) with 4-pixel partitions in its stream.
  clip = synthetic.make_clip(7, num_frames=24, height=240, width=426, gop=24, bframes=0)
  grid = dict(num_frames=24, resolution=576, patch_size=16, budget=4 * 1296)
  llava = codec.select(clip.data, preset='release_llava', **grid)
  cover = codec.select(clip.data, preset='release_llava', vector_grid='cover', **grid)
  assert Options.from_kwargs({}, 'release_llava').vector_grid == 'llava'
  assert len(llava.positions) == len(cover.positions) == grid['budget']
  later = llava.positions[llava.positions[:, 0] > 0]
  assert len(later) == grid['budget'] - 36 * 36
  assert not np.array_equal(llava.scores, cover.scores)
  with pytest.raises(ValueError, match="vector_grid='llava' needs maths='release'"):
    codec.select(clip.data, vector_grid='llava', **grid)
