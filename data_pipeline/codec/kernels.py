"""Compiled (numba) kernels for the per-pixel passes of `maps`, bit for bit its numpy arithmetic.

The numpy code in `maps` is the reference; `maps` dispatches here when `maps.use_kernels` is on
(the default when numba imports). Each kernel is one loop over the analysis pixels doing what
`maps` does with several full-frame temporaries (expanded cell grids, gather indices, four
gathers, masks): the same float32 operations in the same order, without fastmath (no operand
reordering, no fused multiply-add), so every result is identical to the reference and the
selections with it (tests/test_codec_kernels.py checks both on random inputs).

Compiled machine code is cached on disk (`cache=True`): numba writes it to `NUMBA_CACHE_DIR`
when set, else beside this file (`__pycache__`), else to the user's cache folder
(~/.cache/numba) when the package folder is read-only; where none of these is writable the
kernels are compiled in memory at each process's first call instead (`jit`).
"""

from __future__ import annotations

import numba
import numpy as np


def jit(function):
  """numba.njit(cache=True, nogil=True), or without the disk cache where no folder for it is
  writable (numba refuses cache=True then, at decoration)."""
  try:
    return numba.njit(cache=True, nogil=True)(function)
  except RuntimeError:  # 'cannot cache function ...: no locator available'
    return numba.njit(nogil=True)(function)


@jit
def paint(dst_x, dst_y, w, h, motion_x, motion_y, scale, src_x, src_y, hc, wc, cell):
  """`maps.paint_vectors` on the blocks of one direction: (dx, dy, has) on the cell grid.

  Blocks are painted in order, so where two overlap the later one wins, as numpy's fancy
  assignment does (its last write wins)."""
  dx = np.zeros((hc, wc), np.float32)
  dy = np.zeros((hc, wc), np.float32)
  has = np.zeros((hc, wc), np.bool_)
  for k in range(dst_x.shape[0]):
    bw = max(np.int64(w[k]) // cell, 1)
    bh = max(np.int64(h[k]) // cell, 1)
    x0 = (np.int64(dst_x[k]) - np.int64(w[k]) // 2) // cell
    y0 = (np.int64(dst_y[k]) - np.int64(h[k]) // 2) // cell
    s = np.float32(scale[k])
    if s > 0:
      # numpy: int32 / float32 is a float64 division, then float32.
      safe = np.float64(max(s, np.float32(1)))
      vx = np.float32(np.float64(motion_x[k]) / safe)
      vy = np.float32(np.float64(motion_y[k]) / safe)
    else:
      vx = np.float32(np.int64(src_x[k]) - np.int64(dst_x[k]))
      vy = np.float32(np.int64(src_y[k]) - np.int64(dst_y[k]))
    for cy in range(max(y0, 0), min(y0 + bh, hc)):
      for cx in range(max(x0, 0), min(x0 + bw, wc)):
        dx[cy, cx] = vx
        dy[cy, cx] = vy
        has[cy, cx] = True
  return dx, dy, has


@numba.njit(inline='always')
def _bilinear(ref, top_left, top_right, bottom_left, bottom_right, ax, ay):
  """`maps._sample`'s float32 arithmetic for one sample, operation for operation."""
  top = ref[top_left]
  top = top + (ref[top_right] - top) * ax
  bottom = ref[bottom_left]
  bottom = bottom + (ref[bottom_right] - bottom) * ax
  return top + (bottom - top) * ay


@jit
def predict(ref_HxW, dx_HcxWc, dy_HcxWc, step, y_runs, x_runs):
  """`maps.predict`: bilinear samples of `ref` (edges replicated) displaced by each pixel's cell
  vector (dx, dy in coded pixels, `step` coded pixels per analysis pixel); pixels of still
  cells keep `ref` (what the arithmetic gives them too). Cell (cy, cx) covers the analysis
  pixels y_runs[cy] <= y < y_runs[cy + 1], x_runs[cx] <= x < x_runs[cx + 1].

  The vector is constant over a cell, so its integer part and fractions are worked out once per
  cell, the border test once per cell, and cells whose samples stay inside the image read
  contiguous runs without clamping. The images are indexed flat with unsigned offsets: numba
  then drops its negative-index wraparound (a third of the time), and rows are not taken as
  views (each view costs a reference count, more than the pixels of a cell)."""
  h, w = ref_HxW.shape
  hc, wc = dx_HcxWc.shape
  ref = ref_HxW.ravel()
  out = np.empty(h * w, np.float32)
  one, width, scale = np.uint64(1), np.uint64(w), np.float32(step)
  for cy in range(hc):
    y_lo, y_hi = y_runs[cy], y_runs[cy + 1]
    for cx in range(wc):
      x_lo, x_hi = x_runs[cx], x_runs[cx + 1]
      if dx_HcxWc[cy, cx] == 0 and dy_HcxWc[cy, cx] == 0:
        for py in range(y_lo, y_hi):
          row = np.uint64(py) * width
          for px in range(np.uint64(x_lo), np.uint64(x_hi)):
            out[row + px] = ref[row + px]
        continue
      # numpy's float32 ops: fx = dx / step, ix = floor(fx), ax = fx - ix.
      fx, fy = dx_HcxWc[cy, cx] / scale, dy_HcxWc[cy, cx] / scale
      floor_x, floor_y = np.floor(fx), np.floor(fy)
      ax, ay = fx - floor_x, fy - floor_y
      ix, iy = np.int64(floor_x), np.int64(floor_y)
      # Rows are clipped to one pixel off the image, then clamped onto it: the replicated
      # border of `maps._padded` without building it.
      if ix + x_lo >= 0 and ix + x_hi <= w - 1:  # contiguous runs: the compiler vectorises
        for py in range(y_lo, y_hi):
          y0 = min(max(iy + py, -1), h - 1)
          row_a = np.uint64(max(y0, 0)) * width + np.uint64(ix + x_lo)
          row_b = np.uint64(min(y0 + 1, h - 1)) * width + np.uint64(ix + x_lo)
          row_out = np.uint64(py) * width + np.uint64(x_lo)
          for k in range(np.uint64(x_hi - x_lo)):
            out[row_out + k] = _bilinear(
              ref, row_a + k, row_a + k + one, row_b + k, row_b + k + one, ax, ay
            )
        continue
      for py in range(y_lo, y_hi):
        y0 = min(max(iy + py, -1), h - 1)
        row_a, row_b = np.uint64(max(y0, 0)) * width, np.uint64(min(y0 + 1, h - 1)) * width
        row_out = np.uint64(py) * width
        for px in range(x_lo, x_hi):
          x0 = min(max(ix + px, -1), w - 1)
          xa, xb = np.uint64(max(x0, 0)), np.uint64(min(x0 + 1, w - 1))
          out[row_out + np.uint64(px)] = _bilinear(
            ref, row_a + xa, row_a + xb, row_b + xa, row_b + xb, ax, ay
          )
  return out.reshape(h, w)


@jit
def residual(luma_HxW, p0_HxW, p1_HxW, coded_HcxWc, y_runs, x_runs):
  """`maps.bipredicted_residual`: |luma - prediction| with the prediction per cell code: 3 (both
  directions coded) the mean 0.5 * (p0 + p1), 2 (future only) p1, else p0. Cells cover the
  pixels of `y_runs` / `x_runs` as in `predict`."""
  h, w = luma_HxW.shape
  hc, wc = coded_HcxWc.shape
  out = np.empty((h, w), np.float32)
  half = np.float32(0.5)
  for cy in range(hc):
    for cx in range(wc):
      code = coded_HcxWc[cy, cx]
      for y in range(y_runs[cy], y_runs[cy + 1]):
        py = np.uint64(y)
        for x in range(x_runs[cx], x_runs[cx + 1]):
          px = np.uint64(x)
          if code == 3:
            prediction = half * (p0_HxW[py, px] + p1_HxW[py, px])
          elif code == 2:
            prediction = p1_HxW[py, px]
          else:
            prediction = p0_HxW[py, px]
          out[py, px] = abs(luma_HxW[py, px] - prediction)
  return out


@jit
def downscale(luma_HxW, step):
  """`maps.downscale` for step > 1: the integer sum of each step x step block over step**2.
  Per output row, the step source rows are first summed column by column (contiguous, so the
  compiler vectorises it), then each run of step columns (unsigned indices, as in `predict`)."""
  h, w = luma_HxW.shape[0] // step, luma_HxW.shape[1] // step
  width = w * step
  out = np.empty((h, w), np.float32)
  columns = np.empty(width, np.uint32)
  area, ustep = np.float32(step * step), np.uint64(step)
  for y in range(h):
    columns[:] = 0
    for r in range(y * step, (y + 1) * step):
      row = np.uint64(r)
      for x in range(width):
        columns[x] += np.uint32(luma_HxW[row, np.uint64(x)])
    for x in range(w):
      base = np.uint64(x) * ustep
      total = np.uint32(0)
      for k in range(step):
        total += columns[base + np.uint64(k)]
      out[y, x] = np.float32(total) / area
  return out


@jit
def normalise_fuse(motion_HxW, motion_scale, residual_HxW, residual_scale):
  """`maps.fuse(maps.normalise(motion), maps.normalise(residual))` with the default 'mean' of
  unit weights: (clip(m / sm, 0, 1) + clip(r / sr, 0, 1)) / 2, in float32."""
  h, w = motion_HxW.shape
  out = np.empty((h, w), np.float32)
  sm, sr, two = np.float32(motion_scale), np.float32(residual_scale), np.float32(2)
  zero, one = np.float32(0), np.float32(1)
  for y in range(h):
    for x in range(w):
      m = min(max(motion_HxW[y, x] / sm, zero), one)
      r = min(max(residual_HxW[y, x] / sr, zero), one)
      out[y, x] = (m + r) / two
  return out


@jit
def split(flat, threshold):
  """(flat[flat > threshold] in order, count below it, count equal to it), without a branch per
  value: each value is written, and the write position only moves on for the kept ones."""
  out = np.empty(flat.shape[0] + 1, flat.dtype)
  kept = below = 0
  for i in range(flat.shape[0]):
    value = flat[i]
    out[kept] = value
    kept += value > threshold
    below += value < threshold
  return out[:kept].copy(), below, flat.shape[0] - kept - below


@jit
def expand(cells_HcxWc, y_runs, x_runs):
  """`maps.cells_to_pixels`: each cell's value over its run of analysis pixels."""
  hc, wc = cells_HcxWc.shape
  out = np.empty((y_runs[hc], x_runs[wc]), cells_HcxWc.dtype)
  for cy in range(hc):
    for cx in range(wc):
      value = cells_HcxWc[cy, cx]
      for y in range(y_runs[cy], y_runs[cy + 1]):
        for x in range(x_runs[cx], x_runs[cx + 1]):
          out[np.uint64(y), np.uint64(x)] = value
  return out
