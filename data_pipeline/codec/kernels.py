"""Compiled (numba) kernels for the per-pixel passes of `maps`, bit for bit its numpy arithmetic.

The numpy code in `maps` is the reference; `maps` dispatches here when `maps.KERNELS` is set
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
def paint(vectors, hc, wc, cell, min_side):
  """`maps.paint_vectors` of both directions in one pass over FFmpeg's MOTION_VECTORS records
  (source < 0 past, > 0 future): (dx, dy, has, length) each [D, hc, wc], index 0 the past and 1
  the future, and the count of future blocks; D is 1 when there are none (P-frames: no zeroed
  grids nobody paints). length is the vector's np.hypot(dx, dy) worked out once a block (0
  where no block is), which `motion_magnitude` reads instead of a hypot per cell. The records
  are read where they lie (no filtered copy, no per-field arrays). Blocks narrower or shorter
  than `min_side` pixels are not painted (0: all are).

  Blocks are painted in order, so where two overlap the later one wins, as numpy's fancy
  assignment does (its last write wins)."""
  future = 0
  for k in range(vectors.shape[0]):
    block = vectors[k]
    future += block.source > 0 and block.w >= min_side and block.h >= min_side
  directions = 2 if future else 1
  dx = np.zeros((directions, hc, wc), np.float32)
  dy = np.zeros((directions, hc, wc), np.float32)
  has = np.zeros((directions, hc, wc), np.bool_)
  length = np.zeros((directions, hc, wc), np.float32)
  for k in range(vectors.shape[0]):
    block = vectors[k]
    if block.source == 0 or block.w < min_side or block.h < min_side:
      continue
    d = 0 if block.source < 0 else 1
    w, h = np.int64(block.w), np.int64(block.h)
    bw = max(w // cell, 1)
    bh = max(h // cell, 1)
    x0 = (np.int64(block.dst_x) - w // 2) // cell
    y0 = (np.int64(block.dst_y) - h // 2) // cell
    s = np.float32(block.motion_scale)
    if s > 0:
      # numpy: int32 / float32 is a float64 division, then float32.
      safe = np.float64(max(s, np.float32(1)))
      vx = np.float32(np.float64(block.motion_x) / safe)
      vy = np.float32(np.float64(block.motion_y) / safe)
    else:
      vx = np.float32(np.int64(block.src_x) - np.int64(block.dst_x))
      vy = np.float32(np.int64(block.src_y) - np.int64(block.dst_y))
    size = np.hypot(vx, vy)
    for cy in range(max(y0, 0), min(y0 + bh, hc)):
      for cx in range(max(x0, 0), min(x0 + bw, wc)):
        dx[d, cy, cx] = vx
        dy[d, cy, cx] = vy
        has[d, cy, cx] = True
        length[d, cy, cx] = size
  return dx, dy, has, length, future


@numba.njit(inline='always')
def _bilinear(ref, top_left, top_right, bottom_left, bottom_right, ax, ay):
  """`prediction._sample`'s float32 arithmetic for one sample, operation for operation."""
  top = ref[top_left]
  top = top + (ref[top_right] - top) * ax
  bottom = ref[bottom_left]
  bottom = bottom + (ref[bottom_right] - bottom) * ax
  return top + (bottom - top) * ay


@numba.njit(inline='always')
def _run_end(a_HcxWc, b_HcxWc, cy, cx):
  """The first cell column after cx where row cy of (a, b) changes value (wc if none): one
  pass handles a whole block, or a still stretch, however many cells wide. Equal values give
  equal arithmetic (-0.0 and 0.0 included), so merging cells changes no result."""
  a, b = a_HcxWc[cy, cx], b_HcxWc[cy, cx]
  end = cx + 1
  while end < a_HcxWc.shape[1] and a_HcxWc[cy, end] == a and b_HcxWc[cy, end] == b:
    end += 1
  return end


@jit
def predict(ref_HxW, dx_HcxWc, dy_HcxWc, step, y_runs, x_runs, luma_HxW):
  """`maps.predict`: bilinear samples of `ref` (edges replicated) displaced by each pixel's cell
  vector (dx, dy in coded pixels, `step` coded pixels per analysis pixel); pixels of still
  cells keep `ref` (what the arithmetic gives them too). Cell (cy, cx) covers the analysis
  pixels y_runs[cy] <= y < y_runs[cy + 1], x_runs[cx] <= x < x_runs[cx + 1]. When `luma` has
  rows, each pixel is |luma - prediction| instead (`maps.predict`'s `minus`): a frame's
  residual from its one reference in the same pass.

  The vector is constant over a cell, and usually over a run of cells of one row (a block, a
  still background), so its integer part and fractions are worked out once per such run, the
  border test too, and runs whose samples stay inside the image read contiguous pixels without
  clamping. The images are indexed flat with unsigned offsets: numba
  then drops its negative-index wraparound (a third of the time), and rows are not taken as
  views (each view costs a reference count, more than the pixels of a cell)."""
  h, w = ref_HxW.shape
  hc, wc = dx_HcxWc.shape
  ref = ref_HxW.ravel()
  minus = luma_HxW.shape[0] > 0
  luma = luma_HxW.ravel()
  out = np.empty(h * w, np.float32)
  one, width, scale = np.uint64(1), np.uint64(w), np.float32(step)
  for cy in range(hc):
    y_lo, y_hi = y_runs[cy], y_runs[cy + 1]
    cx = 0
    while cx < wc:
      vx, vy = dx_HcxWc[cy, cx], dy_HcxWc[cy, cx]
      end = _run_end(dx_HcxWc, dy_HcxWc, cy, cx)
      x_lo, x_hi = x_runs[cx], x_runs[end]
      cx = end
      if vx == 0 and vy == 0:
        for py in range(y_lo, y_hi):
          row = np.uint64(py) * width
          for px in range(np.uint64(x_lo), np.uint64(x_hi)):
            _put(out, luma, row + px, ref[row + px], minus)
        continue
      # numpy's float32 ops: fx = dx / step, ix = floor(fx), ax = fx - ix.
      fx, fy = vx / scale, vy / scale
      floor_x, floor_y = np.floor(fx), np.floor(fy)
      ax, ay = fx - floor_x, fy - floor_y
      ix, iy = np.int64(floor_x), np.int64(floor_y)
      # Rows are clipped to one pixel off the image, then clamped onto it: the replicated
      # border of `prediction._padded` without building it.
      if ix + x_lo >= 0 and ix + x_hi <= w - 1:  # contiguous runs: the compiler vectorises
        for py in range(y_lo, y_hi):
          y0 = min(max(iy + py, -1), h - 1)
          row_a = np.uint64(max(y0, 0)) * width + np.uint64(ix + x_lo)
          row_b = np.uint64(min(y0 + 1, h - 1)) * width + np.uint64(ix + x_lo)
          row_out = np.uint64(py) * width + np.uint64(x_lo)
          for k in range(np.uint64(x_hi - x_lo)):
            value = _bilinear(ref, row_a + k, row_a + k + one, row_b + k, row_b + k + one, ax, ay)
            _put(out, luma, row_out + k, value, minus)
        continue
      for py in range(y_lo, y_hi):
        y0 = min(max(iy + py, -1), h - 1)
        row_a, row_b = np.uint64(max(y0, 0)) * width, np.uint64(min(y0 + 1, h - 1)) * width
        row_out = np.uint64(py) * width
        for px in range(x_lo, x_hi):
          x0 = min(max(ix + px, -1), w - 1)
          xa, xb = np.uint64(max(x0, 0)), np.uint64(min(x0 + 1, w - 1))
          value = _bilinear(ref, row_a + xa, row_a + xb, row_b + xa, row_b + xb, ax, ay)
          _put(out, luma, row_out + np.uint64(px), value, minus)
  return out.reshape(h, w)


@numba.njit(inline='always')
def _put(out, luma, i, value, minus):
  """out[i] = value, or |luma[i] - value| (`residual`'s arithmetic) when `minus`."""
  if minus:
    out[i] = abs(luma[i] - value)
  else:
    out[i] = value


@jit
def residual(luma_HxW, p0_HxW, p1_HxW, coded_HcxWc, y_runs, x_runs):
  """`maps.bipredicted_residual`: |luma - prediction| with the prediction per cell code: 3 (both
  directions coded) the mean 0.5 * (p0 + p1), 2 (future only) p1, else p0. Cells cover the
  pixels of `y_runs` / `x_runs` as in `predict`. Per cell row the codes are laid out once over
  the pixels of a row (run by run), then each pixel row is one pass over the whole width (long
  loops the compiler vectorises, where a cell's run is a few pixels)."""
  h, w = luma_HxW.shape
  hc, wc = coded_HcxWc.shape
  out = np.empty((h, w), np.float32)
  codes = np.empty(w, np.uint8)
  half = np.float32(0.5)
  for cy in range(hc):
    if y_runs[cy] == y_runs[cy + 1]:
      continue
    cx = 0
    while cx < wc:
      code = coded_HcxWc[cy, cx]
      end = _run_end(coded_HcxWc, coded_HcxWc, cy, cx)
      for px in range(np.uint64(x_runs[cx]), np.uint64(x_runs[end])):
        codes[px] = code
      cx = end
    for y in range(y_runs[cy], y_runs[cy + 1]):
      luma, p0, p1, row_out = luma_HxW[y], p0_HxW[y], p1_HxW[y], out[y]
      for px in range(w):
        a, b, code = p0[px], p1[px], codes[px]
        prediction = half * (a + b) if code == 3 else (b if code == 2 else a)
        row_out[px] = abs(luma[px] - prediction)
  return out


@jit
def lengths(dx_HcxWc, dy_HcxWc, has_HcxWc):
  """np.hypot(dx, dy) per cell where `has`, 0 elsewhere, float32: `paint`'s lengths for vectors
  it did not paint (camera-compensated ones). A block spans several cells of a row with one
  vector: its hypot is worked out once (the same inputs give the same bits; NaN never compares
  equal, so each row starts afresh)."""
  hc, wc = dx_HcxWc.shape
  out = np.zeros((hc, wc), np.float32)
  nan = np.float32(np.nan)
  for y in range(hc):
    last = (nan, nan, nan)  # (dx, dy, hypot) of the last coded cell
    for x in range(wc):
      if has_HcxWc[y, x]:
        last = _length(dx_HcxWc[y, x], dy_HcxWc[y, x], last)
        out[y, x] = last[2]
  return out


@numba.njit(inline='always')
def _length(dx, dy, last):
  """(dx, dy, hypot(dx, dy)), reusing `last`'s length when the vector is the same."""
  if dx == last[0] and dy == last[1]:
    return last
  return dx, dy, np.hypot(dx, dy)


@jit
def motion_magnitude(length0, has0, distance0, length1, has1, distance1, used):
  """`maps.motion_magnitude` from the vectors' lengths (`paint`, `lengths`) of `used` (0-2)
  directions: per cell, (0 + |v0| / d0 + |v1| / d1) / max(coded directions, 1), the terms of
  uncoded cells 0, in numpy's order and float32. Every cell does the same operations (a select
  where numpy's `where` picks), so each row is one vectorised pass."""
  hc, wc = length0.shape
  out = np.empty((hc, wc), np.float32)
  zero, one = np.float32(0), np.float32(1)
  d0, d1 = np.float32(distance0), np.float32(distance1)
  for y in range(hc):
    l0, h0, l1, h1, row = length0[y], has0[y], length1[y], has1[y], out[y]
    if used == 0:
      for x in range(wc):
        row[x] = zero / one
    elif used == 1:
      for x in range(wc):
        term = l0[x] / d0
        row[x] = (zero + (term if h0[x] else zero)) / max(zero + (one if h0[x] else zero), one)
    else:
      for x in range(wc):
        term0, term1 = l0[x] / d0, l1[x] / d1
        total = (zero + (term0 if h0[x] else zero)) + (term1 if h1[x] else zero)
        count = (zero + (one if h0[x] else zero)) + (one if h1[x] else zero)
        row[x] = total / max(count, one)
  return out


@jit
def downscale(luma_HxW, step):
  """`maps.downscale` for 1 < step <= MAX_STEP: the integer sum of each step x step block over
  step**2. Per output row, the step source rows are first summed column by column in uint16
  (step * 255 fits; contiguous, so the compiler vectorises it, twice the lanes of uint32), then
  the step columns of each output pixel are added in float32, which holds these integer sums
  (< 2**24) exactly: the same values as one integer sum. The common steps have kernels of their
  own (`DOWNSCALE_AT_STEP`)."""
  h, w = luma_HxW.shape[0] // step, luma_HxW.shape[1] // step
  out = np.empty((h, w), np.float32)
  area, ustep = np.float32(step * step), np.uint64(step)
  columns = np.empty(w * step, np.uint16)
  for y in range(h):
    _sum_rows(luma_HxW, columns, y, step)
    row_out = out[y]
    for x in range(w):
      row_out[x] = np.float32(columns[np.uint64(x) * ustep])
    for k in range(1, step):
      for x in range(w):
        row_out[x] += np.float32(columns[np.uint64(x) * ustep + np.uint64(k)])
    for x in range(w):
      row_out[x] = row_out[x] / area
  return out


def _downscale_at(step: int):
  """`downscale` compiled with `step` a constant (numba freezes a closure's variables; its disk
  cache keys on them): the compiler then reads each output pixel's columns with shuffles
  instead of one strided load at a time, about 3x faster, and the block sums (at most
  SMALL_STEPS**2 * 255) stay in uint16 before the one division. The same values."""

  @jit
  def downscale_at_step(luma_HxW):
    h, w = luma_HxW.shape[0] // step, luma_HxW.shape[1] // step
    out = np.empty((h, w), np.float32)
    area = np.float32(step * step)
    columns = np.empty(w * step, np.uint16)
    for y in range(h):
      _sum_rows(luma_HxW, columns, y, step)
      for x in range(w):
        total = columns[np.uint64(x * step)]
        for k in range(1, step):
          total += columns[np.uint64(x * step + k)]
        out[np.uint64(y), np.uint64(x)] = np.float32(total) / area
    return out

  return downscale_at_step


@numba.njit(inline='always')
def _sum_rows(luma_HxW, columns, y, step):
  """columns[x] = the sum of source rows y * step .. (y + 1) * step - 1 at column x (uint16)."""
  first = np.uint64(y * step)
  for x in range(columns.shape[0]):
    columns[x] = np.uint16(luma_HxW[first, np.uint64(x)])
  for r in range(y * step + 1, (y + 1) * step):
    row = np.uint64(r)
    for x in range(columns.shape[0]):
      columns[x] += np.uint16(luma_HxW[row, np.uint64(x)])


# The largest step `downscale` takes: step * 255 must fit its uint16 column sums.
MAX_STEP = 257

# Steps with a kernel of their own, compiled at first use (720p and 1080p at 224: 3 and 4).
SMALL_STEPS = 8
DOWNSCALE_AT_STEP = {step: _downscale_at(step) for step in range(2, SMALL_STEPS + 1)}


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
def normalise_fuse_cells(
  cells_HcxWc, motion_scale, residual_HxW, residual_scale, y_runs, x_runs, y0, y1, x0, x1
):
  """`normalise_fuse` with the motion given as cells (each constant over its run of pixels, as
  in `expand`), of the rows y0 <= y < y1 and columns x0 <= x < x1 only (what the patch sums
  read: `geometry.read_part`): per cell row the motion term clip(m / sm, 0, 1) is worked out
  once per run of equal cells and laid over the pixels of a row, then each pixel row is one
  pass over the part's width (vectorised): (that + clip(r / sr, 0, 1)) / 2, the same float32
  operations (x * 0.5 is x / 2 bit for bit: both are the exact half, rounded once)."""
  hc, wc = cells_HcxWc.shape
  out = np.empty((y1 - y0, x1 - x0), np.float32)
  terms = np.empty(x_runs[wc], np.float32)
  sm, sr, half = np.float32(motion_scale), np.float32(residual_scale), np.float32(0.5)
  zero, one = np.float32(0), np.float32(1)
  for cy in range(hc):
    rows_lo, rows_hi = max(y_runs[cy], y0), min(y_runs[cy + 1], y1)
    if rows_lo >= rows_hi:
      continue
    cx = 0
    while cx < wc:
      m = min(max(cells_HcxWc[cy, cx] / sm, zero), one)
      end = _run_end(cells_HcxWc, cells_HcxWc, cy, cx)
      for px in range(np.uint64(max(x_runs[cx], x0)), np.uint64(min(x_runs[end], x1))):
        terms[px] = m
      cx = end
    # Rows taken from x0 on, indexed from 0: the compiler vectorises this loop only so (four
    # times faster than indexing from x0).
    part = terms[x0:x1]
    for y in range(rows_lo, rows_hi):
      residual, row_out = residual_HxW[y, x0:x1], out[y - y0]
      for i in range(x1 - x0):
        r = min(max(residual[i] / sr, zero), one)
        row_out[i] = (part[i] + r) * half
  return out


@jit
def band_patches(start_y, weights_y, start_x, weights_x, map_HxW):
  """`geometry.to_patches_banded`: Ay @ map @ Ax.T with banded Ay [Py, H] and Ax [Px, W]
  (`geometry.Band`: row p is weights[p] from column start[p], indices past the end clamped to
  the last), as `Band.rows` adds it: rows first, then columns (as rows of the transpose), each
  output's terms in band order from zero, a multiply and an add per term, float32."""
  rows = _band_rows(start_y, weights_y, map_HxW)
  return _band_rows(start_x, weights_x, np.ascontiguousarray(rows.T)).T


@numba.njit(inline='always')
def _band_rows(start, weights, map_HxW):
  """`geometry.Band.rows`: [P, W], row p the sum over b of weights[p, b] * map[start[p] + b]."""
  h, w = map_HxW.shape
  out = np.zeros((weights.shape[0], w), np.float32)
  for p in range(weights.shape[0]):
    for b in range(weights.shape[1]):
      r = min(start[p] + b, h - 1)
      weight = weights[p, b]
      for x in range(w):
        out[p, x] += weight * map_HxW[r, x]
  return out


@jit
def expand(cells_HcxWc, y_runs, x_runs):
  """`maps.cells_to_pixels`: each cell's value over its run of analysis pixels; the first row
  of a cell row is filled run by run, the rest of its rows are copies of it."""
  hc, wc = cells_HcxWc.shape
  out = np.empty((y_runs[hc], x_runs[wc]), cells_HcxWc.dtype)
  for cy in range(hc):
    y_lo, y_hi = y_runs[cy], y_runs[cy + 1]
    if y_lo == y_hi:
      continue
    first = np.uint64(y_lo)
    cx = 0
    while cx < wc:
      value = cells_HcxWc[cy, cx]
      end = _run_end(cells_HcxWc, cells_HcxWc, cy, cx)
      for x in range(np.uint64(x_runs[cx]), np.uint64(x_runs[end])):
        out[first, x] = value
      cx = end
    for y in range(y_lo + 1, y_hi):
      out[np.uint64(y)] = out[first]
  return out


@jit
def masked_terms(luma_HxW, prediction_HxW, has_HcxWc, y_runs, x_runs):
  """`maps.masked_error`'s terms: (terms, count), |luma - prediction| at the pixels of cells
  with a vector (all pixels when there are none) in numpy's row-major order in terms[:count],
  so numpy's own float32 mean of them is the reference's value bit for bit (numpy's pairwise
  sum is SIMD-compiled: twice as fast as any transcription of it here)."""
  h, w = luma_HxW.shape
  hc, wc = has_HcxWc.shape
  terms = np.empty(h * w, np.float32)
  count = 0
  starts = np.empty(wc, np.uint64)  # the runs of coded cells of one cell row, in pixels
  ends = np.empty(wc, np.uint64)
  for cy in range(hc):
    runs, cx = 0, 0
    while cx < wc:
      end = _run_end(has_HcxWc, has_HcxWc, cy, cx)
      if has_HcxWc[cy, cx]:
        starts[runs], ends[runs] = x_runs[cx], x_runs[end]
        runs += 1
      cx = end
    for y in range(y_runs[cy], y_runs[cy + 1]):
      py = np.uint64(y)
      for k in range(runs):
        for px in range(starts[k], ends[k]):
          terms[count] = abs(luma_HxW[py, px] - prediction_HxW[py, px])
          count += 1
  if count == 0:
    for y in range(h):
      for x in range(w):
        terms[count] = abs(luma_HxW[y, x] - prediction_HxW[y, x])
        count += 1
  return terms, count
