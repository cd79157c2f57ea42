"""Where a source frame lands on the model's square canvas, and the matrices that take a map there.

Two geometries (docs/spec.md §2.3 leaves the resize open; the release uses both):

  'crop'       short side resized to `resolution`, centre crop (the release's pretraining and
               attentive-probe inputs; `video.crop_box`).
  'letterbox'  long side resized to `resolution`, the picture centred on a zero canvas (the
               release's LLaVA path, `llava_next/Compressed_Video_Reader/tool/stage1.py`):
               scale = R / max(H, W), picture round(H * scale) x round(W * scale) at
               ((R - h) // 2, (R - w) // 2). Only patches wholly inside the picture are
               candidates (`valid_patches`); positions stay on the square canvas grid.

A map at the analysis resolution (one value per step x step source pixels) reaches the canvas
through one matrix per axis, `canvas_matrices`: row c of Ry holds the weights of the map rows
for canvas row c (zero rows on padding). 'area' weights are exact pixel-area overlaps (the
patch sums of `patch_integrators`), 'linear' and 'cubic' are OpenCV's INTER_LINEAR
and INTER_CUBIC resampling (half-pixel centres, replicated edges, no antialiasing), which is how
the release resizes its fused maps before summing patches. Both matrices are banded (a few
weights a row), so the products run through `Band` (`to_patches_banded`): a fixed order of
additions, the same bits on every CPU and BLAS build, and no BLAS threads.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from data_pipeline import video as video_lib
from data_pipeline.video import VideoError, VideoSource, crop_box, describe, open_video

GEOMETRIES = ('crop', 'letterbox')
RESAMPLES = ('area', 'linear', 'cubic')
CUBIC_A = -0.75  # OpenCV's bicubic coefficient


@dataclasses.dataclass(frozen=True)
class Canvas:
  """The picture resized to new_h x new_w, its top-left corner at (top, left) of the canvas
  (negative for a crop: the canvas starts inside the picture)."""

  resolution: int
  new_h: int
  new_w: int
  top: int
  left: int


def check_geometry(geometry: str) -> str:
  """`geometry` if it is one of GEOMETRIES, else a ValueError listing them."""
  if geometry not in GEOMETRIES:
    raise ValueError(f'geometry={geometry!r}: allowed values are {", ".join(GEOMETRIES)}')
  return geometry


def canvas(height: int, width: int, resolution: int, geometry: str = 'crop') -> Canvas:
  if check_geometry(geometry) == 'crop':
    _, new_h, new_w, top, left = crop_box(height, width, resolution)
    return Canvas(resolution, new_h, new_w, -top, -left)
  scale = resolution / max(height, width)  # 'letterbox'
  new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
  return Canvas(resolution, new_h, new_w, (resolution - new_h) // 2, (resolution - new_w) // 2)


def valid_patches(
  height: int, width: int, resolution: int, patch_size: int, geometry: str = 'crop'
) -> np.ndarray:
  """bool [Hp, Wp]: patches wholly inside the picture (all of them for a crop)."""
  box = canvas(height, width, resolution, geometry)
  edges = np.arange(resolution // patch_size + 1) * patch_size

  def axis(start: int, size: int) -> np.ndarray:
    return (edges[:-1] >= start) & (edges[1:] <= start + size)

  return axis(box.top, box.new_h)[:, None] & axis(box.left, box.new_w)[None, :]


def _cubic(x: np.ndarray) -> np.ndarray:
  x = np.abs(x)
  a = CUBIC_A
  return np.where(
    x <= 1,
    ((a + 2) * x - (a + 3)) * x * x + 1,
    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0),
  )


def resize_matrix(size: int, new_size: int, kind: str, step: int = 1) -> np.ndarray:
  """float64 [new_size, size // step]: resized row r as weights of the map rows.

  The map has one row per `step` source rows (map row y covers source [y*step, (y+1)*step)).
  'area' averages the source interval of each resized row exactly; 'linear' / 'cubic' sample at
  OpenCV's source coordinate (r + 0.5) * size / new_size - 0.5, in map rows.
  """
  rows = size // step
  out = np.zeros((new_size, rows))
  if kind == 'area':
    lo = np.arange(new_size)[:, None] * size / new_size
    hi = lo + size / new_size
    pixel = np.arange(rows)[None, :] * step
    overlap = np.clip(np.minimum(pixel + step, hi) - np.maximum(pixel, lo), 0, None)
    return overlap / np.maximum(overlap.sum(axis=1, keepdims=True), 1e-12)
  src = ((np.arange(new_size) + 0.5) * size / new_size - 0.5 - (step - 1) / 2) / step
  base = np.floor(src).astype(np.int64)
  frac = src - base
  r = np.arange(new_size)
  if kind == 'linear':
    # OpenCV clamps the coordinate into the image before interpolating.
    below, above = src < 0, base >= rows - 1
    base = np.where(below, 0, np.where(above, rows - 1, base))
    frac = np.where(below | above, 0.0, frac)
    np.add.at(out, (r, base), 1 - frac)
    np.add.at(out, (r, np.minimum(base + 1, rows - 1)), frac)
    return out
  if kind == 'cubic':
    for k in (-1, 0, 1, 2):
      np.add.at(out, (r, np.clip(base + k, 0, rows - 1)), _cubic(frac - k))
    return out
  raise ValueError(f'resample={kind!r}: allowed values are {", ".join(RESAMPLES)}')


def canvas_matrices(
  height: int, width: int, resolution: int, geometry: str, kind: str, step: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """(Ry [R, H//step], Rx [R, W//step]) float32: canvas = Ry @ map @ Rx.T (zeros on padding)."""
  box = canvas(height, width, resolution, geometry)

  def axis(size: int, new_size: int, start: int) -> np.ndarray:
    resized = resize_matrix(size, new_size, kind, step)
    out = np.zeros((resolution, resized.shape[1]))
    lo, hi = max(start, 0), min(start + new_size, resolution)
    out[lo:hi] = resized[lo - start : hi - start]
    return out.astype(np.float32)

  return axis(height, box.new_h, box.top), axis(width, box.new_w, box.left)


def patch_integrators(
  height: int, width: int, resolution: int, patch_size: int, geometry: str = 'crop', step: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """(Ay [Hp, H//step], Ax [Wp, W//step]): `Ay @ map @ Ax.T` is the map's exact area integral
  over each model patch in canvas-pixel units (a map of ones gives patch_size**2 on patches
  inside the picture, 0 on padding).

  Patch row p covers canvas rows [p*ps, (p+1)*ps), that is source rows
  [(p*ps - top) / sy, ((p+1)*ps - top) / sy) clipped to the picture; Ay[p, y] is the overlap of
  map row y (source rows [y*step, (y+1)*step)) with it, times sy.
  """
  box = canvas(height, width, resolution, geometry)

  def axis(size: int, new_size: int, start: int) -> np.ndarray:
    scale = new_size / size
    edges = (np.arange(resolution // patch_size + 1) * patch_size - start) / scale
    lo, hi = edges[:-1, None], edges[1:, None]
    pixel = np.arange(size // step)[None, :] * step
    overlap = np.clip(np.minimum(pixel + step, hi) - np.maximum(pixel, lo), 0, None)
    return (overlap * scale).astype(np.float32)

  return axis(height, box.new_h, box.top), axis(width, box.new_w, box.left)


@functools.lru_cache(maxsize=64)
def canvas_bands(
  height: int, width: int, resolution: int, geometry: str, kind: str, step: int = 1
) -> tuple[Band, Band]:
  """`canvas_matrices` as `Band`s, made once per frame size and options (read-only)."""
  return tuple(Band.of(m) for m in canvas_matrices(height, width, resolution, geometry, kind, step))


@functools.lru_cache(maxsize=64)
def patch_bands(
  height: int, width: int, resolution: int, patch_size: int, geometry: str = 'crop', step: int = 1
) -> tuple[Band, Band]:
  """`patch_integrators` as `Band`s, made once per frame size and options (read-only)."""
  matrices = patch_integrators(height, width, resolution, patch_size, geometry, step)
  return tuple(Band.of(m) for m in matrices)


def letterbox_frame(frame, resolution: int) -> np.ndarray:
  """RGB uint8 [R, R, 3] of a decoded av frame: long side to R (bicubic, as the crop path
  resizes), centred on black."""
  box = canvas(frame.height, frame.width, resolution, 'letterbox')
  rgb = frame.reformat(
    width=box.new_w, height=box.new_h, format='rgb24', interpolation='BICUBIC'
  ).to_ndarray()
  out = np.zeros((resolution, resolution, 3), np.uint8)
  out[box.top : box.top + box.new_h, box.left : box.left + box.new_w] = rgb
  return out


def picture_valid_patches(
  video: VideoSource, resolution: int, patch_size: int, geometry: str = 'crop'
) -> np.ndarray:
  """`valid_patches` of a video's first stream (opened only when `geometry` is not the crop,
  where every patch is valid)."""
  if geometry == 'crop':
    side = resolution // patch_size
    return np.ones((side, side), bool)
  check_geometry(geometry)
  container = open_video(video)  # has a video stream, or raises VideoError naming the file
  try:
    ctx = container.streams.video[0].codec_context
    height, width = ctx.height, ctx.width
  finally:
    container.close()
  if not height or not width:
    raise VideoError(f'{describe(video)}: the video stream gives no picture size')
  return valid_patches(height, width, resolution, patch_size, geometry)


def decode_canvas(
  video: VideoSource, frame_ids: Sequence[int], resolution: int = 224, geometry: str = 'crop'
) -> np.ndarray:
  """RGB uint8 [len(frame_ids), R, R, 3] of the given frames in `geometry`; ids past the end of
  the stream get its last frame (as `video.decode_frames`, which serves 'crop')."""
  if geometry == 'crop':
    return video_lib.decode_frames(video, frame_ids, resolution)
  check_geometry(geometry)
  ids = [int(i) for i in np.asarray(frame_ids, np.int64).reshape(-1)]
  wanted, last_wanted = set(ids), max(ids)
  got: dict[int, np.ndarray] = {}
  frame, index = None, -1
  container = open_video(video)
  try:
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    for index, frame in enumerate(container.decode(stream)):
      if index in wanted:
        got[index] = letterbox_frame(frame, resolution)
      if index >= last_wanted:
        break
  finally:
    container.close()
  if frame is None:
    raise VideoError(f'{describe(video)}: the video stream has no decodable frames')
  tail = got[index] if index in got else letterbox_frame(frame, resolution)
  return np.stack([got.get(i, tail) for i in ids])


@dataclasses.dataclass(frozen=True)
class Band:
  """A matrix whose rows are zero outside one run of columns: row p is `weights_PxB[p]` at
  columns start_P[p] ... start_P[p] + B - 1 (zero weights past the end)."""

  start_P: np.ndarray
  weights_PxB: np.ndarray

  @classmethod
  def of(cls, matrix_PxN: np.ndarray) -> Band:
    nonzero = matrix_PxN != 0
    any_P = nonzero.any(axis=1)
    first = np.where(any_P, nonzero.argmax(axis=1), 0)
    last = np.where(any_P, matrix_PxN.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1), 0)
    width = int((last - first).max()) + 1
    start = np.minimum(first, max(matrix_PxN.shape[1] - width, 0))
    cols = np.minimum(start[:, None] + np.arange(width), matrix_PxN.shape[1] - 1)
    weights = np.take_along_axis(matrix_PxN, cols, axis=1)
    weights[start[:, None] + np.arange(width) >= matrix_PxN.shape[1]] = 0
    band = cls(start.astype(np.int64), weights.astype(np.float32))
    for array in (band.start_P, band.weights_PxB):
      array.setflags(write=False)  # bands are shared (`canvas_bands`, `patch_bands`)
    return band

  def rows(self, map_HxW: np.ndarray) -> np.ndarray:
    """self @ map without a BLAS call: [P, W] float32, each output's terms added in band order
    to a zero start, one multiply and one add per term (the order numpy's einsum takes here;
    `kernels.band_patches` repeats it, so the two agree bit for bit on every platform)."""
    last = map_HxW.shape[0] - 1
    out = np.zeros((self.start_P.size, map_HxW.shape[1]), np.float32)
    for b in range(self.weights_PxB.shape[1]):
      out += self.weights_PxB[:, b, None] * map_HxW[np.minimum(self.start_P + b, last)]
    return out


def read_part(bands: tuple[Band, Band], height: int, width: int) -> tuple[tuple, tuple]:
  """((rows, columns) slices, bands): the part of a [height, width] map that the banded product
  `to_patches_banded` reads (from the first band's start to the last band's end, within the
  map), and the bands as they read that part: the same sums from map[rows, columns] as from the
  whole map. (Where a band runs past the map's end its weights are zero: those terms add 0 to
  sums of non-negative terms either way.) A centre crop of a wide frame reads its middle."""
  part, moved = [], []
  for band, size in zip(bands, (height, width)):
    first = int(band.start_P.min())
    last = min(size, int(band.start_P.max()) + band.weights_PxB.shape[1])
    part.append(slice(first, last))
    moved.append(Band(band.start_P - first, band.weights_PxB))
  return tuple(part), tuple(moved)


def to_patches_banded(map_HxW: np.ndarray, bands: tuple[Band, Band]) -> np.ndarray:
  """`to_patches` with banded integrators: the same sums, with no BLAS call. (BLAS threads
  spinning on these small products cost as much CPU again as the whole selection.)"""
  ay, ax = bands
  return ax.rows(ay.rows(map_HxW.astype(np.float32, copy=False)).T).T
