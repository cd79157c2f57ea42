"""Per-frame motion and residual maps, their normalisation and fusion, and the model-grid scores.

All maps live at the analysis resolution: the coded frame, block-averaged by an integer `step`
for large frames (a 1080p frame with step 4 is analysed at 480x270; the scores only need the
14x14-patch level of a 224 crop). Motion vectors are painted onto a grid of 4x4-pixel cells of
the coded frame (the smallest H.264 partition), one grid per reference direction, vectorised
over blocks, and sampled from there at each analysis pixel's centre. The residual is
|Y_t - MC(Y_ref)|, with MC a bilinear (quarter-pel) motion-compensated prediction from those
grids, averaged over the two directions where a block has both (bi-prediction), with the zero
vector where no vector was coded.

Vectors are expressed per frame of temporal distance (a P-frame four frames after its reference
moves four times as far as its neighbouring B-frames); the per-frame normalisation makes this
matter little, but it keeps the two directions of one B-frame on the same scale.

The per-pixel passes (painting, prediction, the reference choice's error, residual, motion per
cell, block means, the percentile's order statistics, normalise + fuse, cell expansion) run as
compiled kernels (numba: `kernels`; the order statistics in `rank_kernels`) when `KERNELS` is
set; the numpy code here is their reference, and both give the same bits (tests compare them).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import numpy as np

from data_pipeline.codec import camera as camera_lib
from data_pipeline.codec import geometry as geometry_lib
from data_pipeline.codec import prediction, release


def _load_kernels():
  """The compiled kernels (`kernels`), or None: no numba, or OVE_CODEC_KERNELS=0 asked."""
  if os.environ.get('OVE_CODEC_KERNELS', '1') == '0':
    return None
  try:
    from data_pipeline.codec import kernels
  except ImportError:
    return None
  return kernels


# The one dispatch point: the per-pixel passes below run as these compiled kernels when set, as
# their numpy code (the reference, identical results) when None. Tests switch it to compare.
KERNELS = _load_kernels()

CELL = prediction.CELL  # pixels per side of a vector-grid cell
PERCENTILE = 95.0
MOTION_FLOOR = 1e-6  # in pixels per frame
RESIDUAL_FLOOR = 1.0  # in 0-255 luma levels
PRIOR_SIGMA = 0.35  # centre-prior Gaussian sigma, as a share of min(H, W)


@dataclasses.dataclass
class VectorGrid:
  """Block vectors of one direction painted on the cell grid: float32 [Hc, Wc] each."""

  dx_HcxWc: np.ndarray  # displacement src - dst in pixels (sub-pixel)
  dy_HcxWc: np.ndarray
  has_HcxWc: np.ndarray  # bool: a vector was coded for this cell
  # np.hypot(dx, dy) where a vector was coded, 0 elsewhere, when painted by the kernels (one
  # hypot a block); None: worked out from dx, dy when needed.
  length_HcxWc: np.ndarray | None = None

  @property
  def shape(self) -> tuple[int, int]:
    return self.has_HcxWc.shape

  @property
  def count(self) -> int:
    return int(np.count_nonzero(self.has_HcxWc))  # a tenth of sum()'s time over bools


def paint_vectors(
  vectors: np.ndarray | None, height: int, width: int, direction: int, min_side: int = 0
) -> VectorGrid:
  """Paint the blocks of one direction (-1 past, +1 future) onto the 4x4-pixel grid.

  FFmpeg reports each block by its centre (dst_x, dst_y) and size (w, h); the displacement in
  pixels is motion / motion_scale (= src - dst, sub-pixel). Blocks reaching past the frame
  (coded sizes are padded to macroblocks) are clipped; blocks narrower or shorter than
  `min_side` pixels are left out.
  """
  hc, wc = -(-height // CELL), -(-width // CELL)
  if KERNELS is not None and vectors is not None and len(vectors):
    return paint_directions(vectors, height, width, min_side)[0 if direction < 0 else 1]
  dx = np.zeros((hc, wc), np.float32)
  dy = np.zeros((hc, wc), np.float32)
  has = np.zeros((hc, wc), bool)
  if vectors is None or len(vectors) == 0:
    return VectorGrid(dx, dy, has)
  mv = vectors[(vectors['source'] < 0) if direction < 0 else (vectors['source'] > 0)]
  mv = mv[(mv['w'] >= min_side) & (mv['h'] >= min_side)]
  if len(mv) == 0:
    return VectorGrid(dx, dy, has)
  bw = np.maximum(mv['w'].astype(np.int64) // CELL, 1)
  bh = np.maximum(mv['h'].astype(np.int64) // CELL, 1)
  x0 = (mv['dst_x'].astype(np.int64) - mv['w'].astype(np.int64) // 2) // CELL
  y0 = (mv['dst_y'].astype(np.int64) - mv['h'].astype(np.int64) // 2) // CELL
  scale = mv['motion_scale'].astype(np.float32)
  safe = np.maximum(scale, 1)
  # A zero motion_scale would be a broken stream; fall back on the integer src - dst then.
  vx = np.where(scale > 0, mv['motion_x'] / safe, mv['src_x'] - mv['dst_x']).astype(np.float32)
  vy = np.where(scale > 0, mv['motion_y'] / safe, mv['src_y'] - mv['dst_y']).astype(np.float32)
  # One row per (block, cell) pair: block id repeated by its cell count, offset within it.
  cells = bw * bh
  block = np.repeat(np.arange(len(mv)), cells)
  offset = np.arange(int(cells.sum())) - np.repeat(np.cumsum(cells) - cells, cells)
  cx = x0[block] + offset % bw[block]
  cy = y0[block] + offset // bw[block]
  inside = (cx >= 0) & (cx < wc) & (cy >= 0) & (cy < hc)
  cx, cy, block = cx[inside], cy[inside], block[inside]
  dx[cy, cx] = vx[block]
  dy[cy, cx] = vy[block]
  has[cy, cx] = True
  return VectorGrid(dx, dy, has)


def paint_directions(
  vectors: np.ndarray | None, height: int, width: int, min_side: int = 0
) -> tuple[VectorGrid, VectorGrid, bool]:
  """(past grid, future grid, whether any painted block refers to the future): `paint_vectors`
  of both directions, in one pass over the records when compiled."""
  if KERNELS is None or vectors is None or len(vectors) == 0:
    kept = (
      vectors
      if vectors is None
      else vectors[(vectors['w'] >= min_side) & (vectors['h'] >= min_side)]
    )
    future = kept is not None and bool(np.any(kept['source'] > 0))
    return (*(paint_vectors(vectors, height, width, d, min_side) for d in (-1, 1)), future)
  hc, wc = -(-height // CELL), -(-width // CELL)
  *painted, future = KERNELS.paint(vectors, hc, wc, CELL, min_side)
  grids = [VectorGrid(*(a[d] for a in painted)) for d in range(painted[0].shape[0])]
  # No future block (P-frames): the kernel painted the past only; the future grid is zeros.
  return grids[0], grids[1] if future else paint_vectors(None, height, width, 1), future > 0


@functools.lru_cache(maxsize=64)
def cell_weights(height: int, width: int, hc: int, wc: int, step: int) -> np.ndarray:
  """The analysis pixels under each cell, int64 [Hc * Wc] (row-major, as the cells; read-only,
  one per frame size)."""
  y_runs, x_runs = cell_runs(height, width, hc, wc, step)
  weights = np.outer(np.diff(y_runs), np.diff(x_runs)).reshape(-1)
  weights.setflags(write=False)
  return weights


@functools.lru_cache(maxsize=64)
def cell_runs(height: int, width: int, hc: int, wc: int, step: int) -> tuple[np.ndarray, ...]:
  """Where each cell's analysis rows and columns start (and the last ends): [hc + 1], [wc + 1]
  (read-only: one pair per frame size, shared by every call)."""
  rows, cols = prediction.pixel_cells(height, width, hc, wc, step)
  runs = np.searchsorted(rows, np.arange(hc + 1)), np.searchsorted(cols, np.arange(wc + 1))
  for run in runs:
    run.setflags(write=False)
  return runs


def cells_to_pixels(
  cells_HcxWc: np.ndarray, height: int, width: int, step: int = 1, runs: tuple | None = None
) -> np.ndarray:
  """The cell value under the centre of each analysis pixel (each covers step x step coded), or
  over the `runs` given (`release_motion.stretch_runs`)."""
  if KERNELS is not None:
    runs = runs or cell_runs(height, width, *cells_HcxWc.shape, step)
    return KERNELS.expand(cells_HcxWc, *runs)
  if runs is not None:
    rows, cols = (np.diff(r) for r in runs)
    return np.repeat(np.repeat(cells_HcxWc, rows, axis=0), cols, axis=1)
  return prediction.expand(cells_HcxWc, height, width, step)


def downscale(luma_HxW: np.ndarray, step: int) -> np.ndarray:
  """Block mean over step x step pixels (the ragged bottom/right edge is dropped), float32: a
  new array, never a view of `luma` (which may be a decoder's buffer, `bitstream.luma_of`)."""
  if step == 1:
    return luma_HxW.astype(np.float32)
  if KERNELS is not None and step <= KERNELS.MAX_STEP:
    at_step = KERNELS.DOWNSCALE_AT_STEP.get(step)
    return KERNELS.downscale(luma_HxW, step) if at_step is None else at_step(luma_HxW)
  h, w = luma_HxW.shape[0] // step, luma_HxW.shape[1] // step
  # Rows, then columns: two reductions over neighbouring memory, ~3x faster than one over
  # axes (1, 3), and the same integer sums.
  rows = luma_HxW[: h * step, : w * step].reshape(h, step, w * step).sum(axis=1, dtype=np.uint32)
  return rows.reshape(h, w, step).sum(axis=2, dtype=np.uint32).astype(np.float32) / (step * step)


def predict(
  ref_HxW: np.ndarray, grid: VectorGrid, step: int = 1, minus: np.ndarray | None = None
) -> np.ndarray:
  """Bilinear motion-compensated prediction of a frame from `ref` (edges replicated), float32;
  with `minus` (the frame's luma, float32 [H, W]) |minus - prediction| instead: the residual,
  in the same pass when compiled.

  `ref` is at the analysis resolution (coded / step); vectors are in coded pixels. Compiled
  (`kernels.predict`: one pass over runs of equal cells) or numpy (`prediction.predict`, the
  reference), the same bits.
  """
  h, w = ref_HxW.shape
  flat = ref_HxW.reshape(-1).astype(np.float32, copy=False)
  if KERNELS is not None:
    luma = _NO_LUMA if minus is None else minus.astype(np.float32, copy=False)
    runs = cell_runs(h, w, *grid.shape, step)
    return KERNELS.predict(flat.reshape(h, w), grid.dx_HcxWc, grid.dy_HcxWc, step, *runs, luma)
  predicted = prediction.predict(flat, h, w, grid.dx_HcxWc, grid.dy_HcxWc, step)
  return predicted if minus is None else np.abs(minus - predicted)


_NO_LUMA = np.zeros((0, 0), np.float32)  # `KERNELS.predict`'s "no minus"


def masked_error(
  luma_HxW: np.ndarray, prediction_HxW: np.ndarray, has_HcxWc: np.ndarray, step: int
) -> float:
  """Mean |luma - prediction| (float32, numpy's sum) over the pixels of the cells that have a
  vector, over all pixels when none has: how well a candidate reference explains the blocks."""
  h, w = luma_HxW.shape
  if KERNELS is not None:
    terms, count = KERNELS.masked_terms(
      luma_HxW, prediction_HxW, has_HcxWc, *cell_runs(h, w, *has_HcxWc.shape, step)
    )
    return float(np.mean(terms[:count]))
  mask_HxW = cells_to_pixels(has_HcxWc, h, w, step)
  if not mask_HxW.any():
    return float(np.mean(np.abs(luma_HxW - prediction_HxW)))
  return float(np.mean(np.abs(luma_HxW - prediction_HxW)[mask_HxW]))


def bipredicted_residual(
  luma_HxW: np.ndarray, p0_HxW: np.ndarray, p1_HxW: np.ndarray, coded_HcxWc: np.ndarray, step: int
) -> np.ndarray:
  """|luma - prediction|, the prediction per cell code (`coded_HcxWc`): 3 the mean of p0 and p1,
  2 p1, else p0."""
  h, w = luma_HxW.shape
  if KERNELS is not None:
    return KERNELS.residual(
      luma_HxW, p0_HxW, p1_HxW, coded_HcxWc, *cell_runs(h, w, *coded_HcxWc.shape, step)
    )
  coded_HxW = cells_to_pixels(coded_HcxWc, h, w, step)
  prediction_HxW = np.where(
    coded_HxW == 3, 0.5 * (p0_HxW + p1_HxW), np.where(coded_HxW == 2, p1_HxW, p0_HxW)
  )
  return np.abs(luma_HxW - prediction_HxW)


@dataclasses.dataclass
class FrameMaps:
  """Raw maps of one frame at the analysis resolution (before normalisation)."""

  # Coded pixels per frame of reference distance; None when `motion_cells` holds it (then
  # `motion_map()` expands it to pixels, which the default scoring never needs).
  motion_HxW: np.ndarray | None
  residual_HxW: np.ndarray  # |Y_t - MC(Y_ref)| in luma levels
  vectors_past: int = 0  # cells with a past / future vector (both are used when present)
  vectors_future: int = 0
  reference_distance: tuple = ()  # chosen (past, future) reference distances, 0 for none
  # The motion map as the cells it is expanded from, (cells [Hc, Wc], `cell_weights`), when it
  # is constant over them (the default maths); None otherwise.
  motion_cells: tuple | None = None
  step: int = 1  # coded pixels per analysis pixel (how the cells cover the map)
  runs: tuple | None = None  # the cells' runs of pixels, when not `cell_runs`' (vector_grid)

  def motion_map(self) -> np.ndarray:
    """The motion at each analysis pixel, float32 [H, W]."""
    if self.motion_HxW is None:
      h, w = self.residual_HxW.shape
      self.motion_HxW = cells_to_pixels(self.motion_cells[0], h, w, self.step, self.runs)
    return self.motion_HxW


def frame_maps(
  frame,
  past: Sequence,
  future: Sequence,
  camera: str = 'none',
  step: int = 1,
  maths: str = 'ove',
  inconsistency: int = 0,
  whole_pixels: bool = False,
  vector_grid: str = 'cover',
) -> FrameMaps:
  """Motion and residual maps of a decoded frame given its candidate references.

  `frame`, `past`, `future` are `bitstream.CodedFrame`s (index, vectors, and luma at the
  analysis resolution: the coded frame block-averaged by `step`). Among several candidates of
  one direction, the one whose motion-compensated prediction fits the blocks coded in that
  direction best is taken as the reference the encoder used. `maths='release'` measures motion
  as the release does (`release_motion`); `inconsistency` > 0 replaces the motion magnitude by
  its local variance in that window (`release.local_variance`); `whole_pixels` truncates its
  vectors to whole pixels first (`Options.whole_pixel_vectors`); `vector_grid='llava'` takes
  that motion on the LLaVA reader's grid (`release_motion.llava_cells`).
  """
  luma = frame.analysis_luma().astype(np.float32, copy=False)
  h, w = luma.shape
  grids, predictions, distances = [], [], []
  # One past candidate and no future one (P- and I-frames): the prediction is read only as the
  # residual |luma - p0| (below), which the compiled `predict` gives in its own pass.
  residual_in_predict = KERNELS is not None and len(past) == 1 and not future
  for direction, candidates in ((-1, past), (+1, future)):
    grid = frame.vector_grid(direction, h * step, w * step)
    best, best_error = None, np.inf
    for candidate in candidates:
      reference = candidate.analysis_luma()
      if reference is None or reference.shape != luma.shape:
        continue
      prediction = predict(reference, grid, step, luma if residual_in_predict else None)
      error = masked_error(luma, prediction, grid.has_HcxWc, step) if len(candidates) > 1 else 0.0
      if error < best_error:
        best, best_error = (candidate, prediction), error
    if best is None:
      if grid.has_HcxWc.any():  # vectors without a reference to read them from: not counted
        grid = VectorGrid(grid.dx_HcxWc, grid.dy_HcxWc, np.zeros_like(grid.has_HcxWc))
      grids.append(grid)
      predictions.append(None)
      distances.append(0)
    else:
      grids.append(grid)
      predictions.append(best[1])
      distances.append(abs(best[0].index - frame.index))
  past_grid, future_grid = grids
  past_prediction, future_prediction = predictions

  # Residual: bi-predicted cells average both predictions; cells without vectors (intra blocks,
  # I-frames) use the zero vector from the past reference (the future one if there is no past).
  if past_prediction is None and future_prediction is None:
    residual_HxW = np.zeros((h, w), np.float32)
  elif residual_in_predict:
    residual_HxW = past_prediction  # |luma - p0|: what the general case gives with p0 alone
  else:
    p0 = past_prediction if past_prediction is not None else future_prediction
    p1 = future_prediction if future_prediction is not None else past_prediction
    if KERNELS is None and not future_grid.has_HcxWc.any():
      # No future vectors (P- and I-frames): what the general case gives, in numpy's fewest
      # passes (the compiled residual is one pass either way).
      residual_HxW = np.abs(luma - p0)
    else:
      # 1: past vector only (or none), 2: future only, 3: both; one expansion for the two grids.
      coded_HcxWc = past_grid.has_HcxWc.view(np.uint8) + 2 * future_grid.has_HcxWc.view(np.uint8)
      residual_HxW = bipredicted_residual(luma, p0, p1, coded_HcxWc, step)

  motion_cells = motion_HxW = runs = None
  if maths != 'release':
    motion_HcxWc = motion_magnitude(grids, distances, camera).astype(np.float32, copy=False)
  else:
    from data_pipeline.codec import release_motion  # it builds on this module

    if vector_grid == 'llava':
      motion_HcxWc, weights, runs = release_motion.llava_cells(
        frame.llava_l0, h, w, camera, step, whole_pixels, frame.height, frame.width
      )
    elif camera in release_motion.CELL_CAMERAS:
      motion_HcxWc = release_motion.cells(past_grid, h, w, camera, step, whole_pixels)
    else:
      motion_HxW = release_motion.pixels(past_grid, h, w, camera, step, whole_pixels)
  if motion_HxW is None:
    if inconsistency:
      motion_HxW = cells_to_pixels(motion_HcxWc, h, w, step, runs)
    else:
      weights = weights if runs else cell_weights(h, w, *motion_HcxWc.shape, step)
      motion_cells = (motion_HcxWc, weights)
  if inconsistency:
    motion_HxW = local_variance(motion_HxW, inconsistency)
  return FrameMaps(
    None if motion_HxW is None else motion_HxW.astype(np.float32, copy=False),
    residual_HxW.astype(np.float32, copy=False),
    past_grid.count,
    future_grid.count,
    tuple(distances),
    motion_cells,
    step,
    runs,
  )


def local_variance(motion_HxW: np.ndarray, k: int) -> np.ndarray:
  """`release.local_variance` (the MV inconsistency), as one compiled pass when the kernels are
  on (`release_kernels.local_variance`, the same bits)."""
  motion_HxW = motion_HxW.astype(np.float32, copy=False)
  h, w = motion_HxW.shape
  if KERNELS is None or min(h, w) + 2 * (k // 2) - k < 1:
    return release.local_variance(motion_HxW, k)
  from data_pipeline.codec import release_kernels

  return release_kernels.local_variance(motion_HxW, k)


def motion_magnitude(grids: Sequence[VectorGrid], distances: Sequence[int], camera: str):
  """Motion per cell, float32 [Hc, Wc]: the vector's length per frame of reference distance,
  after removing the camera's motion (`camera.compensate`), averaged over the directions coded
  for the cell (0 where none is). A direction without a reference (distance 0) or without
  vectors does not count."""
  counted = [(g, d) for g, d in zip(grids, distances) if d != 0 and g.has_HcxWc.any()]
  painted = all(g.length_HcxWc is not None for g, _ in counted)
  if KERNELS is not None and camera == 'none' and painted:
    return _motion_from_lengths([(g.length_HcxWc, g.has_HcxWc, d) for g, d in counted], grids)
  used = [(*camera_lib.compensate(g, camera), g.has_HcxWc, d) for g, d in counted]
  if KERNELS is not None and all(u[0].dtype == u[1].dtype == np.float32 for u in used):
    return _motion_from_lengths([(KERNELS.lengths(*u[:3]), *u[2:]) for u in used], grids)
  magnitude_sum = np.zeros(grids[0].dx_HcxWc.shape, np.float32)
  directions = np.zeros(grids[0].dx_HcxWc.shape, np.float32)
  for dx, dy, has, distance in used:
    magnitude_sum += np.where(has, np.hypot(dx, dy) / distance, 0)
    directions += has
  return (magnitude_sum / np.maximum(directions, 1)).astype(np.float32, copy=False)


def _motion_from_lengths(used: list, grids: Sequence[VectorGrid]) -> np.ndarray:
  """`KERNELS.motion_magnitude` of the (length, has, distance) of the directions `used`; fixed
  arity: absent ones repeat the first (or zeros) and are not counted."""
  filler = used[0] if used else (np.zeros(grids[0].shape, np.float32), grids[0].has_HcxWc, 0)
  padded = (used + [filler, filler])[:2]
  return KERNELS.motion_magnitude(*padded[0], *padded[1], len(used))


def median(values: np.ndarray, weights: np.ndarray) -> np.float32:
  """np.median of float32 `values` counted weights[i] times (finite values): the middle value,
  or the float32 mean of the two middle ones, as np.median gives them."""
  flat = values.reshape(-1)
  n = int(weights.sum())
  if KERNELS is None or n == 0:
    return np.median(np.repeat(flat, weights.reshape(-1)))
  hi = n // 2
  lo = hi if n % 2 else hi - 1
  from data_pipeline.codec.rank_kernels import order_statistics

  a, b = (np.float32(v) for v in order_statistics(flat, weights.reshape(-1), lo, hi))
  return a if lo == hi else np.float32(np.float32(a + b) / 2)


def percentile(values: np.ndarray, q: float, weights: np.ndarray | None = None) -> float:
  """float(np.percentile(values, q)) (linear interpolation) of finite values, bit for bit, with
  values[i] counted weights[i] times when `weights` is given (a map that is constant over cells
  is its cells weighted by their pixel counts: the same multiset, so the same percentile).

  Float32 maps find the two order statistics the interpolation needs (ranks lo and lo + 1 of n)
  without sorting all of them: the compiled bit-histogram select (`rank_kernels.order_statistics`),
  or in the numpy reference a partial sort of the values above a threshold drawn from a 1-in-16
  sample (`_at_ranks`). The interpolation is numpy's (a + (b - a) g, or b - (b - a)(1 - g) for
  g >= 0.5, in the values' precision).
  """
  flat = np.asarray(values).reshape(-1)
  if weights is not None and (KERNELS is None or flat.dtype != np.float32):
    flat, weights = np.repeat(flat, np.asarray(weights).reshape(-1)), None
  n = flat.size if weights is None else int(weights.sum())
  if n < 4096 or flat.dtype != np.float32:
    return float(np.percentile(flat if weights is None else np.repeat(flat, weights), q))
  share = q / 100
  virtual = n * share + (1 + share * (1 - 1 - 1)) - 1  # numpy's rank, float op for float op
  lo = int(np.floor(virtual))
  hi = min(lo + 1, n - 1)
  if KERNELS is not None:
    from data_pipeline.codec.rank_kernels import order_statistics

    found = order_statistics(
      flat, np.zeros(0, np.int64) if weights is None else weights.reshape(-1), lo, hi
    )
    a, b = np.float32(found[0]), np.float32(found[1])
  else:
    sample = flat[::16]
    rank = int((sample.size - 1) * max(share - 0.02, 0.0))
    found = _at_ranks(flat, np.partition(sample, rank)[rank], lo, hi)
    if found is None:
      return float(np.percentile(flat, q))  # the sample misled us: rare, still exact
    a, b = found
  gamma = virtual - lo
  diff = b - a
  return float(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma)


def _at_ranks(flat: np.ndarray, threshold, lo: int, hi: int) -> list | None:
  """The values of ranks lo <= hi in `flat`, found among the values at least `threshold`; None
  when fewer than n - lo values are."""
  above = flat[flat >= threshold]
  below = flat.size - above.size
  if below > lo:
    return None
  return list(np.partition(above, [lo - below, hi - below])[[lo - below, hi - below]])


def normalise(map_HxW: np.ndarray, floor: float, scale: float | None = None) -> np.ndarray:
  """map / max(p95(map), floor), clipped to [0, 1] (`scale`: that divisor, when known)."""
  scale = max(percentile(map_HxW, PERCENTILE), floor) if scale is None else scale
  out = map_HxW / scale
  return np.clip(out, 0.0, 1.0, out=out)


def normalise_fuse(raw: FrameMaps, *fusion, part: tuple | None = None) -> np.ndarray:
  """`fuse(normalise(motion), normalise(residual), *fusion)` of one frame's maps with the floors
  MOTION_FLOOR and RESIDUAL_FLOOR; the default equal-weight mean in one compiled pass when the
  kernels are on. When `raw.motion_cells` holds the motion (cells [Hc, Wc] and their pixel
  counts `cell_weights`), its p95 is taken over the cells weighted by their pixels (the same
  value, a sixteenth of the values to go through), and the compiled pass reads each cell's
  value once for its run of pixels instead of an expanded map.

  `part`: (rows, columns) slices; the fused map of that part only (the scales are still the
  whole frame's), which the compiled pass computes alone."""
  if raw.motion_cells is not None:
    cells, weights = raw.motion_cells
    motion_p95 = percentile(cells, PERCENTILE, weights)
  else:
    motion_p95 = percentile(raw.motion_HxW, PERCENTILE)
  motion_scale = max(motion_p95, MOTION_FLOOR)
  residual_HxW = raw.residual_HxW
  residual_scale = max(percentile(residual_HxW, PERCENTILE), RESIDUAL_FLOOR)
  h, w = residual_HxW.shape
  rows, cols = part or (slice(0, h), slice(0, w))
  if KERNELS is not None and _plain_mean(*fusion):
    if raw.motion_HxW is None:
      runs = raw.runs or cell_runs(h, w, *cells.shape, raw.step)
      bounds = (rows.start, rows.stop, cols.start, cols.stop)
      return KERNELS.normalise_fuse_cells(
        cells, motion_scale, residual_HxW, residual_scale, *runs, *bounds
      )
    fused = KERNELS.normalise_fuse(raw.motion_HxW, motion_scale, residual_HxW, residual_scale)
  else:
    fused = fuse(
      normalise(raw.motion_map(), MOTION_FLOOR, motion_scale),
      normalise(residual_HxW, RESIDUAL_FLOOR, residual_scale),
      *fusion,
    )
  return fused if part is None else np.ascontiguousarray(fused[rows, cols])


def _plain_mean(fusion: str = 'mean', motion_weight: float = 1.0, residual_weight: float = 1.0):
  return fusion == 'mean' and motion_weight == 1 and residual_weight == 1


def fuse(
  motion_HxW: np.ndarray,
  residual_HxW: np.ndarray,
  fusion: str = 'mean',
  motion_weight: float = 1.0,
  residual_weight: float = 1.0,
) -> np.ndarray:
  """Fuse two normalised maps: weighted 'mean' (default), 'max', weighted 'sum', 'geomean'."""
  total = motion_weight + residual_weight
  if _plain_mean(fusion, motion_weight, residual_weight):
    return (motion_HxW + residual_HxW) / total  # x * 1.0 is x: the same sums, two passes less
  if fusion == 'mean':
    return (motion_weight * motion_HxW + residual_weight * residual_HxW) / total
  if fusion == 'max':
    return np.maximum(motion_weight * motion_HxW, residual_weight * residual_HxW)
  if fusion == 'sum':
    return motion_weight * motion_HxW + residual_weight * residual_HxW
  if fusion == 'geomean':
    # Weighted geometric mean; maps are in [0, 1], so zero anywhere gives zero.
    return np.power(motion_HxW, motion_weight / total) * np.power(
      residual_HxW, residual_weight / total
    )
  raise ValueError(f'fusion={fusion!r}: allowed values are mean, max, sum, geomean')


def centre_prior(
  height: int, width: int, strength: float, sigma_share: float = PRIOR_SIGMA, maths: str = 'ove'
) -> np.ndarray:
  """1 + strength * g, g a Gaussian of sigma `sigma_share` * min(H, W) at the centre,
  float32 [H, W]; with maths 'release' g is scaled to peak 1 (`release.centre_prior_map`)."""
  if maths == 'release':
    return 1.0 + strength * release.centre_prior_map(height, width, sigma_share)
  sigma = sigma_share * min(height, width)
  gy = np.exp(-0.5 * ((np.arange(height) - (height - 1) / 2) / sigma) ** 2)
  gx = np.exp(-0.5 * ((np.arange(width) - (width - 1) / 2) / sigma) ** 2)
  return (1.0 + strength * np.outer(gy, gx)).astype(np.float32)


def to_patches_banded(map_HxW: np.ndarray, bands: tuple) -> np.ndarray:
  """`geometry.to_patches_banded`: Ay @ map @ Ax.T through banded matrices (patch integrators,
  or a preset's resize onto the canvas), one compiled pass when the kernels are on (same bits)."""
  if KERNELS is None:
    return geometry_lib.to_patches_banded(map_HxW, bands)
  ay, ax = bands
  return KERNELS.band_patches(
    ay.start_P, ay.weights_PxB, ax.start_P, ax.weights_PxB, map_HxW.astype(np.float32, copy=False)
  )
