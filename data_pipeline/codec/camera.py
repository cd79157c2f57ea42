"""Our camera compensation: the camera's motion removed from one direction's block vectors.

`maps.motion_magnitude` measures motion after it (option `camera_compensation`, default
'none'); statistics run over the coded cells only. The release's own compensation, over every
pixel with zero vectors included, is `release.compensate` (docs/codec.md).
"""

from __future__ import annotations

import numpy as np

from data_pipeline.codec import release
from data_pipeline.codec.prediction import CELL

TRIM_KEEP = 0.7  # share of points kept by each trimming pass of the similarity fit
TRIM_PASSES = 2


def compensate(grid, camera: str) -> tuple[np.ndarray, np.ndarray]:
  """The vectors of `grid` (a `maps.VectorGrid`) minus the camera's motion, statistics over the
  coded cells: 'none', 'median', 'mean', 'similarity' (`similarity_flow`) or 'affine' (the
  release's fit)."""
  dx, dy, has = grid.dx_HcxWc, grid.dy_HcxWc, grid.has_HcxWc
  if camera == 'none' or has.sum() < 3:
    return dx, dy
  if camera == 'median':
    return dx - np.median(dx[has]), dy - np.median(dy[has])
  if camera == 'mean':
    return dx - np.mean(dx[has]), dy - np.mean(dy[has])
  if camera == 'similarity':
    flow_x, flow_y = similarity_flow(grid)
    return dx - flow_x, dy - flow_y
  if camera == 'affine':
    flow_x, flow_y = release.camera_flow(np.where(has, dx, 0), np.where(has, dy, 0), 'affine')
    return dx - flow_x, dy - flow_y
  raise ValueError(
    f'camera_compensation={camera!r}: allowed values are none, median, mean, similarity, affine'
  )


def similarity_flow(
  grid, passes: int = TRIM_PASSES, keep: float = TRIM_KEEP
) -> tuple[np.ndarray, np.ndarray]:
  """Least-squares similarity motion (zoom, rotation, shift) of the cells, robust to objects.

  The displacement d = src - dst of a camera that zooms, rotates and pans is
  dx = a*x - b*y + tx, dy = b*x + a*y + ty (a, b linear in scale and angle). Fit on all cells,
  then `passes` times: rank all cells by their residual to the current fit, refit on the best
  `keep` share. Returns the fitted flow on the whole grid.
  """
  hc, wc = grid.has_HcxWc.shape
  ys, xs = np.mgrid[0:hc, 0:wc].astype(np.float64) * CELL + CELL / 2
  cy, cx = ys.mean(), xs.mean()
  xs, ys = xs - cx, ys - cy  # centred coordinates keep the normal equations well conditioned
  has = grid.has_HcxWc.reshape(-1)
  x, y = xs.reshape(-1)[has], ys.reshape(-1)[has]
  dx = grid.dx_HcxWc.reshape(-1)[has].astype(np.float64)
  dy = grid.dy_HcxWc.reshape(-1)[has].astype(np.float64)
  n = x.size
  design = np.concatenate(
    [np.stack([x, -y, np.ones(n), np.zeros(n)], 1), np.stack([y, x, np.zeros(n), np.ones(n)], 1)]
  )
  target = np.concatenate([dx, dy])
  chosen = np.arange(n)
  for step in range(passes + 1):
    rows = np.concatenate([chosen, chosen + n])
    # Normal equations: 4 unknowns, so a 4x4 solve is far cheaper than an SVD of the rows.
    fit_rows = design[rows]
    params = np.linalg.lstsq(fit_rows.T @ fit_rows, fit_rows.T @ target[rows], rcond=None)[0]
    if step == passes:
      break
    fit = design @ params
    error = np.hypot(dx - fit[:n], dy - fit[n:])
    chosen = np.sort(np.argsort(error, kind='stable')[: max(3, int(np.ceil(keep * n)))])
  a, b, tx, ty = params
  flow_x = (a * xs - b * ys + tx).astype(np.float32)
  flow_y = (b * xs + a * ys + ty).astype(np.float32)
  return flow_x, flow_y
