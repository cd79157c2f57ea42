"""The numpy reference of the motion-compensated prediction, and the cell grid it works on.

`maps.predict` runs `kernels.predict` when the compiled kernels are on and `predict` here when
they are off; both give the same bits (tests/test_codec_kernels.py). The prediction is bilinear
(quarter-pel and finer), edges replicated, with one vector per 4x4-pixel cell of the coded
frame; the analysis frame may be the coded one block-averaged by `step`.
"""

from __future__ import annotations

import numpy as np

CELL = 4  # pixels per side of a vector-grid cell (H.264's smallest partition)
SPARSE_SHARE = 0.25  # below this share of moving cells `predict` interpolates only them


def pixel_cells(
  height: int, width: int, hc: int, wc: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
  """The cell row under each analysis row, and the cell column under each analysis column."""
  rows = np.minimum((step * np.arange(height) + step // 2) // CELL, hc - 1)
  cols = np.minimum((step * np.arange(width) + step // 2) // CELL, wc - 1)
  return rows, cols


def expand(cells_HcxWc: np.ndarray, height: int, width: int, step: int) -> np.ndarray:
  """The cell value under the centre of each analysis pixel (numpy; `maps.cells_to_pixels`)."""
  rows, cols = pixel_cells(height, width, *cells_HcxWc.shape, step)
  # Columns first (on the small cell grid), then whole rows: 8x faster than rows first, and
  # C-contiguous (indexing the columns of the tall array instead gives a transposed layout
  # that every later pass pays for).
  return cells_HcxWc.take(cols, axis=1).take(rows, axis=0)


def predict(
  flat: np.ndarray, h: int, w: int, dx_HcxWc: np.ndarray, dy_HcxWc: np.ndarray, step: int
) -> np.ndarray:
  """`maps.predict` in numpy: the float32 reference image `flat` [h * w] displaced by the cell
  vectors (dx, dy in coded pixels), [h, w].

  A vector is constant over its cell, so its integer part and bilinear weights are worked out
  per cell and only expanded to pixels for the gathers. A zero vector predicts the reference
  pixel itself (the same float32 arithmetic returns it unchanged), so when few cells move only
  their pixels are interpolated (`SPARSE_SHARE`): the same result, a fraction of the work on
  still scenes."""
  moving_HcxWc = (dx_HcxWc != 0) | (dy_HcxWc != 0)
  if not moving_HcxWc.any():
    return flat.reshape(h, w).copy()
  fx_HcxWc, fy_HcxWc = dx_HcxWc / step, dy_HcxWc / step
  ix_HcxWc, iy_HcxWc = np.floor(fx_HcxWc), np.floor(fy_HcxWc)
  if moving_HcxWc.mean() < SPARSE_SHARE:
    return _predict_moving(
      flat, h, w, moving_HcxWc, fx_HcxWc - ix_HcxWc, fy_HcxWc - iy_HcxWc, ix_HcxWc, iy_HcxWc, step
    )
  ax = expand((fx_HcxWc - ix_HcxWc).astype(np.float32), h, w, step).reshape(-1)
  ay = expand((fy_HcxWc - iy_HcxWc).astype(np.float32), h, w, step).reshape(-1)
  # The padded index of each sample is the cell's offset iy * (W + 2) + ix plus the pixel's
  # own; only samples that fall more than a pixel off the image need clipping, fixed after.
  # intp: take() would convert narrower indices on every call.
  ix_HcxWc, iy_HcxWc = ix_HcxWc.astype(np.intp), iy_HcxWc.astype(np.intp)
  index = expand(iy_HcxWc * (w + 2) + ix_HcxWc, h, w, step)
  index += (np.arange(1, h + 1) * (w + 2))[:, None] + np.arange(1, w + 1)
  index = index.reshape(-1)
  rows, cols = pixel_cells(h, w, *ix_HcxWc.shape, step)
  cells_y, cells_x = np.arange(ix_HcxWc.shape[0]), np.arange(ix_HcxWc.shape[1])
  first_y, last_y = np.searchsorted(rows, cells_y), np.searchsorted(rows, cells_y, 'right') - 1
  first_x, last_x = np.searchsorted(cols, cells_x), np.searchsorted(cols, cells_x, 'right') - 1
  off_HcxWc = (
    (iy_HcxWc + first_y[:, None] < -1)
    | (iy_HcxWc + last_y[:, None] > h - 1)
    | (ix_HcxWc + first_x < -1)
    | (ix_HcxWc + last_x > w - 1)
  )
  if off_HcxWc.any():
    pixels = np.flatnonzero(off_HcxWc.take(cols, axis=1).take(rows, axis=0))
    py, px = np.divmod(pixels, w)
    cell = rows.take(py) * ix_HcxWc.shape[1] + cols.take(px)
    index[pixels] = _padded_index(
      ix_HcxWc.reshape(-1).take(cell) + px, iy_HcxWc.reshape(-1).take(cell) + py, h, w
    )
  return _sample(_padded(flat, h, w), index, ax, ay, w).reshape(h, w)


def _padded(flat: np.ndarray, h: int, w: int) -> np.ndarray:
  """The h x w image with one replicated pixel around it, flat [(h + 2) * (w + 2)]."""
  padded = np.empty((h + 2, w + 2), np.float32)
  padded[1:-1, 1:-1] = flat.reshape(h, w)
  padded[0, 1:-1] = padded[1, 1:-1]
  padded[-1, 1:-1] = padded[-2, 1:-1]
  padded[:, 0] = padded[:, 1]
  padded[:, -1] = padded[:, -2]
  return padded.reshape(-1)


def _padded_index(x0: np.ndarray, y0: np.ndarray, h: int, w: int) -> np.ndarray:
  """Index into `_padded` of the sample at integer (x0, y0), clipped to one pixel off the image:
  with it, offsets 0, 1, W + 2, W + 3 reach the same pixels as clipping x0, x0 + 1, y0, y0 + 1
  to the image one by one."""
  index = np.clip(y0, -1, h - 1)
  index += 1
  index *= w + 2
  index += np.clip(x0, -1, w - 1)
  index += 1
  return index


def _sample(
  padded: np.ndarray, index: np.ndarray, ax: np.ndarray, ay: np.ndarray, w: int
) -> np.ndarray:
  """Bilinear samples at `index` of `_padded` + (ax, ay), the arithmetic of four clipped
  gathers operation for operation."""
  # take() gathers faster than fancy indexing; slices of the padded image shift the index.
  top = padded.take(index)
  top += (padded[1:].take(index) - top) * ax
  bottom = padded[w + 2 :].take(index)
  bottom += (padded[w + 3 :].take(index) - bottom) * ax
  bottom -= top
  bottom *= ay
  top += bottom
  return top


def _predict_moving(
  flat: np.ndarray,
  h: int,
  w: int,
  moving_HcxWc: np.ndarray,
  fracx_HcxWc: np.ndarray,
  fracy_HcxWc: np.ndarray,
  ix_HcxWc: np.ndarray,
  iy_HcxWc: np.ndarray,
  step: int,
) -> np.ndarray:
  """`predict`'s arithmetic on the pixels of moving cells only; the others keep `flat`."""
  hc, wc = moving_HcxWc.shape
  rows, cols = pixel_cells(h, w, hc, wc, step)
  pixels = np.flatnonzero(moving_HcxWc.take(cols, axis=1).take(rows, axis=0))
  py, px = np.divmod(pixels, w)
  cell = rows.take(py) * wc + cols.take(px)
  ax = fracx_HcxWc.astype(np.float32).reshape(-1).take(cell)
  ay = fracy_HcxWc.astype(np.float32).reshape(-1).take(cell)
  x0 = ix_HcxWc.astype(np.intp).reshape(-1).take(cell) + px
  y0 = iy_HcxWc.astype(np.intp).reshape(-1).take(cell) + py
  out = flat.copy()
  out[pixels] = _sample(_padded(flat, h, w), _padded_index(x0, y0, h, w), ax, ay, w)
  return out.reshape(h, w)
