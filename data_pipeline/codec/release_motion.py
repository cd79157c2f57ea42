"""The release's motion magnitude (`maths='release'`, docs/spec.md §2.4) on the vector grids.

`pixels` and `cells` take it on our covering grid (`maps.paint_vectors`: every coded block,
the ragged edge included, pixels mapped by their centre); `llava_cells` on the LLaVA reader's
grid (option `vector_grid='llava'`, set by `release_llava`). The release's LLaVA data
(`llava_next/Compressed_Video_Reader`: `src/cv_reader/h264_api.cpp` reads the vectors,
`tool/stage1.py` scores them) lays the list-0 vectors on a grid of its own, which differs from
ours in three ways:

- The grid is floor(H / 4) x floor(W / 4) cells of the decoded frame; the ragged right and
  bottom edge of a frame whose size is not a multiple of 4 has no cells.
- A block of w x h pixels centred at (dst_x, dst_y) sets the cells from dst / 4 - w / 8 (C's
  integer division) for 2 (w / 8) cells across and 2 (h / 8) down: the w / 4 x h / 4 cells it
  covers, except that a block with a side of 4 pixels (H.264's 8x4, 4x8 and 4x4 partitions)
  sets none. A cell no block sets holds the zero vector.
- The camera's median and the 95th percentile are taken over the cells, each counted once, and
  the normalised grid is stretched over the frame by OpenCV's INTER_NEAREST resize: pixel x
  reads cell floor(x * Wc / W). Where W is a multiple of 4 that is x // 4; at 854 pixels (a
  16:9 480p frame) the columns drift by up to half a cell towards the right edge.

`llava_paint` and `llava_cells` reproduce the three; the residual's prediction keeps the
covering grid (the reader's residual is not made from vectors).
"""

from __future__ import annotations

import functools

import numpy as np

from data_pipeline.codec import maps, release

MIN_SIDE = 8  # pixels: a block narrower or shorter than this sets no cell


def llava_paint(records: np.ndarray | None, height: int, width: int) -> maps.VectorGrid:
  """The list-0 vectors of a decoded height x width frame's MOTION_VECTORS records on the
  reader's grid (module docstring), [height // 4, width // 4]."""
  cell = maps.CELL
  return maps.paint_vectors(records, height // cell * cell, width // cell * cell, -1, MIN_SIDE)


@functools.lru_cache(maxsize=16)  # one frame size a clip: the same runs every frame
def stretch_runs(
  height: int, width: int, hc: int, wc: int, step: int, coded_height: int, coded_width: int
) -> tuple[np.ndarray, np.ndarray]:
  """`maps.cell_runs` for the reader's stretch of hc x wc cells over the coded frame: coded
  row y reads cell floor(y * hc / coded_height) (OpenCV's INTER_NEAREST: exact in integers);
  an analysis row (step coded rows) reads the cell of its middle coded row. Columns alike."""

  def runs(count: int, cells: int, coded: int) -> np.ndarray:
    middle = step * np.arange(count, dtype=np.int64) + step // 2
    under = np.minimum(middle * cells // coded, cells - 1)
    found = np.searchsorted(under, np.arange(cells + 1))
    found.setflags(write=False)
    return found

  return runs(height, hc, coded_height), runs(width, wc, coded_width)


def llava_cells(
  grid: maps.VectorGrid | None,
  height: int,
  width: int,
  camera: str,
  step: int,
  whole: bool,
  coded_height: int,
  coded_width: int,
) -> tuple[np.ndarray, np.ndarray, tuple]:
  """stage1's motion magnitude on the reader's grid: (cells float32 [Hc, Wc], their weights in
  the statistics (ones: each cell once), the runs that stretch them over the analysis pixels).
  `grid` None (a frame without vectors: an I-frame) is the zero grid."""
  hc, wc = coded_height // maps.CELL, coded_width // maps.CELL
  if grid is None:
    grid = maps.paint_vectors(None, hc * maps.CELL, wc * maps.CELL, -1)
  dx, dy = (release.l0_cells(grid.has_HcxWc, d, whole) for d in (grid.dx_HcxWc, grid.dy_HcxWc))
  ones = _ones(hc * wc)
  if camera == 'median':  # np.median's value, by the compiled order statistics
    dx, dy = dx - maps.median(dx, ones), dy - maps.median(dy, ones)
  else:
    dx, dy = release.compensate(dx, dy, camera)
  magnitude = np.sqrt(dx * dx + dy * dy).astype(np.float32, copy=False)
  return magnitude, ones, stretch_runs(height, width, hc, wc, step, coded_height, coded_width)


@functools.lru_cache(maxsize=4)
def _ones(count: int) -> np.ndarray:
  """int64 ones [count], read-only: each cell counted once in the statistics."""
  ones = np.ones(count, np.int64)
  ones.setflags(write=False)
  return ones


def pixels(
  l0: maps.VectorGrid, height: int, width: int, camera: str, step: int = 1, whole: bool = False
) -> np.ndarray:
  """The release's motion magnitude at each analysis pixel: list-0 vectors in pixels (zero where
  none was coded; `whole`: truncated to whole pixels), compensated over all pixels by
  `release.compensate`."""
  dx, dy = (release.l0_cells(l0.has_HcxWc, d, whole) for d in (l0.dx_HcxWc, l0.dy_HcxWc))
  dx, dy = (maps.cells_to_pixels(d, height, width, step) for d in (dx, dy))
  dx, dy = release.compensate(dx.astype(np.float32), dy.astype(np.float32), camera)
  return np.sqrt(dx * dx + dy * dy)


# The release's compensations whose statistic over the pixels a cell grid weighted by its pixel
# counts gives exactly (none; the median is an order statistic of the same multiset).
CELL_CAMERAS = ('none', 'median')


def cells(
  l0: maps.VectorGrid, height: int, width: int, camera: str, step: int = 1, whole: bool = False
) -> np.ndarray:
  """`pixels` on the cell grid, float32 [Hc, Wc], for the `CELL_CAMERAS`: the
  map is constant over each cell, so the median over the pixels is the cells' median weighted
  by their pixel counts (`maps.median`), and the rest is the same float32 arithmetic per cell;
  expanded, it is `pixels`' map bit for bit."""
  dx, dy = (release.l0_cells(l0.has_HcxWc, d, whole) for d in (l0.dx_HcxWc, l0.dy_HcxWc))
  if camera == 'median':
    weights = maps.cell_weights(height, width, *dx.shape, step)
    dx, dy = dx - maps.median(dx, weights), dy - maps.median(dy, weights)
  elif camera != 'none':
    raise ValueError(f'camera {camera!r}: the cell path serves {CELL_CAMERAS}')
  return np.sqrt(dx * dx + dy * dy)
