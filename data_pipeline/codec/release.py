"""The release's selection maths, and the presets that reproduce its three pipelines.

EvolvingLMMs-Lab/OneVision-Encoder computes its scores in three places, each a little different:

  release_train  tools/tools_for_hevc/step3_generate_video_mv_residual_index.py (pretraining
                 data; clips re-encoded by step2_convert_videos2hevc.py: GOP 16, no B-frames,
                 one reference, CRF 23)
  release_probe  dataloader/ap_dataloader_dali_codec.py as eval_encoder/attentive_probe_codec.py
                 calls it (attentive-probe evaluation)
  release_llava  llava_next/Compressed_Video_Reader/tool/stage1.py (LLaVA data, 576 px letterbox)

What they share, and what `maths='release'` switches on (docs/spec.md §2.4-§2.6):

- Motion: list-0 vectors only (the release reads L0; L1 is ignored), in pixels (quarter-pel / 4;
  the LLaVA reader's are whole pixels, truncated: `l0_cells`), not divided by the reference
  distance; a cell with no L0 vector (intra, I-frame, L1-only)
  counts as a zero vector, in the statistics too. The grid is sampled at every analysis pixel
  (the release upsamples its 4x4-cell grid to the frame by nearest neighbour before the
  statistics in the train and probe paths; LLaVA takes them on its reader's grid of cells and
  stretches the normalised grid: `vector_grid='llava'`, `release_motion.llava_cells`).
- Camera compensation (`compensate`): 'median' / 'mean' subtract the per-frame median / mean
  vector over all pixels; 'similarity' / 'affine' fit dx = tx + a*x - b*y, dy = ty + b*x + a*y
  (affine: six free coefficients) by least squares on coordinates in [-1, 1]
  (linspace over rows and columns), on the moving pixels only (|vx| + |vy| > 1e-3), at most
  5000 of them (every ceil(n / 5000)-th), then once more on the 70% (at least 64) that fit best
  when at least 128 took part; fewer than 64 moving pixels fall back to 'median'.
- Inconsistency (`local_variance`): optionally the motion score is the k x k local variance of
  the compensated magnitude (edge-replicated box filter), which lights up a moving object's
  outline against a coherent background.
- Normalisation: motion / max(p95, 1e-6), residual / max(p95, 1) (0-255 levels), each clipped to
  [0, 1]; weighted-mean fusion, clipped to [0, 1].
- Centre prior (`centre_prior_map`): fused * (1 + s * g), g a Gaussian of sigma
  `centre_sigma * min(H, W)` at ((H-1)/2, (W-1)/2) scaled to peak 1, the product clipped to
  [0, 1].
- The train and probe paths store the fused map as uint8 (floor(255 * x)) and resize that
  (option `quantise`); the static test looks at all patch means on that 0-255 scale
  (`is_static`; when its frames cannot be kept whole, `static_spread`).
"""

from __future__ import annotations

import functools
import math

import numpy as np

FIT_MAX_POINTS = 5000
FIT_KEEP = 0.7
FIT_MIN_POINTS = 64
MOVING = 1e-3

# Every preset sets the values below; explicit options given to `select` win over them. The
# model grid (num_frames, budget, resolution, patch_size) is the caller's: the release's values
# are in docs/codec.md's preset table. One column per pipeline (the module docstring names its
# source); '-' leaves an option to `select`'s default.
PRESET_NAMES = ('release_train', 'release_probe', 'release_llava')
# fmt: off
PRESET_TABLE = (
  # option                 release_train   release_probe   release_llava
  ('maths',                'release',      'release',      'release'),
  ('policy',               'zero_first',   'zero',         'first_frame'),
  ('camera_compensation',  'none',         'similarity',   'median'),
  ('whole_pixel_vectors',  False,          False,          True),
  ('vector_grid',          'cover',        'cover',        'llava'),
  ('motion_inconsistency', 0,              3,              0),
  ('centre_prior',         0.0,            0.3,            0.0),
  ('centre_sigma',         '-',            0.35,           '-'),
  ('fusion',               'mean',         'mean',         'mean'),
  ('motion_weight',        1.0,            1.0,            1.0),
  ('residual_weight',      1.0,            1.0,            1.0),
  ('quantise',             True,           True,           False),
  ('resample',             'area',         'cubic',        'linear'),
  ('geometry',             'crop',         'crop',         'letterbox'),
  ('padding_fill',         '-',            '-',            True),
  ('static_fallback',      False,          True,           False),
  ('static_test',          '-',            'release',      '-'),
  ('static_threshold',     '-',            126.0,          '-'),
  ('static_rel_threshold', '-',            0.38,           '-'),
  ('static_frames',        '-',            4,              '-'),
  ('gop',                  16,             16,             None),
  ('crf',                  23,             23,             '-'),
  ('transcode',            'sampled',      '-',            '-'),
  ('repeated_frames',      '-',            'last',         'all'),
  ('keyframes',            '-',            'source',       '-'),
  ('max_zeroed',           '-',            8,              '-'),
)
# fmt: on
PRESETS = {
  name: {option: values[i] for option, *values in PRESET_TABLE if values[i] != '-'}
  for i, name in enumerate(PRESET_NAMES)
}


def preset_record(preset: str | None) -> dict:
  """What a run keeps of the preset it selects with (precompute's plan, ove-llava-data's
  settings): {'preset_values': its values now}, so a run begun under an earlier meaning of the
  preset is refused as a different run, not resumed; {} without a preset."""
  return {'preset_values': PRESETS[preset]} if preset in PRESETS else {}


def l0_cells(has_HcxWc: np.ndarray, d_HcxWc: np.ndarray, whole: bool = False) -> np.ndarray:
  """One component of the list-0 vectors on the cell grid as the release reads it, float32
  [Hc, Wc]: in pixels, 0 where no L0 vector was coded; `whole`: truncated toward zero to whole
  pixels, what FFmpeg's exported source position holds (src_x = dst_x + motion_x / motion_scale,
  C's integer division) and the LLaVA reader takes (`h264_api.cpp`: src_x - dst_x). Quarter-pel
  values are exact in float32, so np.trunc gives the integer division's result."""
  d_HcxWc = np.where(has_HcxWc, d_HcxWc, 0).astype(np.float32, copy=False)
  return np.trunc(d_HcxWc) if whole else d_HcxWc


@functools.lru_cache(maxsize=4)  # a 1080p pair is 16 MB; a clip has one frame size
def fit_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel coordinates in [-1, 1], float32 [H*W] each (x along columns, y along rows);
  read-only, one pair per frame size."""
  ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)
  xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)
  grid = np.tile(xs, height), np.repeat(ys, width)
  for axis in grid:
    axis.setflags(write=False)
  return grid


def _design(x: np.ndarray, y: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
  """Rows for dx and for dy of the camera model at points (x, y), float32."""
  one, zero = np.ones_like(x), np.zeros_like(x)
  if mode == 'similarity':  # parameters (tx, ty, a, b)
    return np.stack([one, zero, x, -y], 1), np.stack([zero, one, y, x], 1)
  if mode == 'affine':  # parameters (a0, a1, a2, b0, b1, b2)
    return (np.stack([one, x, y, zero, zero, zero], 1), np.stack([zero, zero, zero, one, x, y], 1))
  raise ValueError(f'camera model {mode!r}: allowed values are similarity, affine')


def _flow(
  params: np.ndarray, x: np.ndarray, y: np.ndarray, mode: str
) -> tuple[np.ndarray, np.ndarray]:
  # Evaluated term by term in float32 as the release does, so that ties in the trimming
  # (many: a block's pixels share one vector) fall the same way.
  p = [float(v) for v in params]
  if mode == 'similarity':
    tx, ty, a, b = p
    return tx + a * x - b * y, ty + b * x + a * y
  a0, a1, a2, b0, b1, b2 = p
  return a0 + a1 * x + a2 * y, b0 + b1 * x + b2 * y


def camera_flow(vx_HxW: np.ndarray, vy_HxW: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
  """The release's robust camera-motion field (see the module docstring), float32 [H, W] each."""
  h, w = vx_HxW.shape
  vx = vx_HxW.reshape(-1).astype(np.float32)
  vy = vy_HxW.reshape(-1).astype(np.float32)
  chosen = np.flatnonzero(np.abs(vx) + np.abs(vy) > MOVING)
  if chosen.size < FIT_MIN_POINTS:
    return (
      np.full((h, w), np.median(vx_HxW), np.float32),
      np.full((h, w), np.median(vy_HxW), np.float32),
    )
  if chosen.size > FIT_MAX_POINTS:
    chosen = chosen[:: math.ceil(chosen.size / FIT_MAX_POINTS)]
  x, y = fit_grid(h, w)
  params = None
  for _ in range(2):
    rows_x, rows_y = _design(x[chosen], y[chosen], mode)
    params = np.linalg.lstsq(
      np.concatenate([rows_x, rows_y]), np.concatenate([vx[chosen], vy[chosen]]), rcond=None
    )[0]
    if chosen.size < 2 * FIT_MIN_POINTS:
      break
    keep = int(max(FIT_MIN_POINTS, round(chosen.size * FIT_KEEP)))
    if keep >= chosen.size:
      break
    fit_x, fit_y = _flow(params, x[chosen], y[chosen], mode)
    error_x, error_y = vx[chosen] - fit_x, vy[chosen] - fit_y
    # The release's (unstable) default sort: deterministic for one input and numpy version.
    chosen = chosen[np.argsort(np.sqrt(error_x * error_x + error_y * error_y))[:keep]]
  flow_x, flow_y = _flow(params, x, y, mode)
  return (flow_x.reshape(h, w).astype(np.float32), flow_y.reshape(h, w).astype(np.float32))


def compensate(vx_HxW: np.ndarray, vy_HxW: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
  """Vectors minus the camera's motion, as the release removes it ('none', 'median', 'mean',
  'similarity', 'affine'); statistics over every pixel, zero vectors included."""
  if mode == 'none':
    return vx_HxW, vy_HxW
  if mode == 'median':
    return vx_HxW - np.median(vx_HxW), vy_HxW - np.median(vy_HxW)
  if mode == 'mean':
    return vx_HxW - float(np.mean(vx_HxW)), vy_HxW - float(np.mean(vy_HxW))
  flow_x, flow_y = camera_flow(vx_HxW, vy_HxW, mode)
  return vx_HxW - flow_x, vy_HxW - flow_y


def window_variance(x_HxW: np.ndarray, k: int) -> np.ndarray:
  """The release's k x k local variance, float32 [H-1, W-1].

  As the release computes it: edge padding of k // 2, a float32 integral image without a leading
  zero row and column, so the window sums come out one row and one column short and entry
  (i, j) is the window centred on pixel (i + 1, j + 1); float32 like the release, whose
  cancellation noise (~1e-4 on flat fields) is part of what it ranks.
  """
  pad = k // 2

  def box(a: np.ndarray) -> np.ndarray:
    integral = np.pad(a, pad, mode='edge').cumsum(0).cumsum(1)
    return (
      integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]
    ) / np.float32(k * k)

  x = x_HxW.astype(np.float32)
  mean = box(x)
  return np.maximum(box(x * x) - mean * mean, np.float32(0.0))


def nearest_resize(map_hxw: np.ndarray, height: int, width: int) -> np.ndarray:
  """OpenCV's INTER_NEAREST resize: source index floor(dst * src / dst_size)."""
  rows = np.minimum((np.arange(height) * map_hxw.shape[0]) // height, map_hxw.shape[0] - 1)
  cols = np.minimum((np.arange(width) * map_hxw.shape[1]) // width, map_hxw.shape[1] - 1)
  return map_hxw[rows][:, cols]


def local_variance(x_HxW: np.ndarray, k: int) -> np.ndarray:
  """The release's MV inconsistency at every pixel, float32 [H, W]: `window_variance` stretched
  back to H x W by nearest neighbour, as the release's resize to the frame does (so the map is
  shifted by up to one pixel against the magnitude; the p95 normalisation then runs on this
  stretched map, where the release takes it just before the stretch)."""
  h, w = x_HxW.shape
  return nearest_resize(window_variance(x_HxW, k), h, w).astype(np.float32)


def centre_prior_map(height: int, width: int, sigma_share: float) -> np.ndarray:
  """g of the release's centre prior: a Gaussian scaled to peak 1, float32 [H, W] (zeros, no
  prior, where the release skips it: a side of one pixel)."""
  if height <= 1 or width <= 1:
    return np.zeros((height, width), np.float32)
  sigma = max(sigma_share * min(height, width), 1.0)
  gy = np.exp(-0.5 * ((np.arange(height) - (height - 1) / 2) / sigma) ** 2)
  gx = np.exp(-0.5 * ((np.arange(width) - (width - 1) / 2) / sigma) ** 2)
  g = np.outer(gy, gx)
  return (g / g.max()).astype(np.float32)


def quantise(map_HxW: np.ndarray) -> np.ndarray:
  """The release's uint8 storage of a [0, 1] map, back in [0, 1]: floor(255 x) / 255."""
  return np.floor(np.clip(map_HxW, 0.0, 1.0) * 255.0).astype(np.float32) / 255.0


def is_static(patch_means: np.ndarray, threshold: float, rel_threshold: float) -> bool:
  """The probe's static test on patch means m (0-255 scale): p95 < threshold, or
  p95 < 2 * threshold and (p95 - p50) / max(p95, 1e-6) < rel_threshold."""
  p95 = float(np.percentile(patch_means, 95.0))
  p50 = float(np.percentile(patch_means, 50.0))
  rel = (p95 - p50) / max(p95, 1e-6)
  return p95 < threshold or (p95 < 2.0 * threshold and rel < rel_threshold)


def static_spread(
  frames: list, budget: int, candidates: np.ndarray, num_frames: int, per_frame: int
) -> np.ndarray:
  """The probe's static fallback when its evenly spaced frames cannot all be kept whole
  (budget < frames x candidates): bool [T, per_frame], `budget` patches and no others. Frame j
  of `frames` gets budget // F patches, one more for the first budget % F of them, at evenly
  spaced places among its `candidates` (flat patch indices in raster order: all of a frame's, or
  a letterbox's picture): the n / k-th ones, rounded half to even (Python's round, as the
  release's), for k of n. With k <= n the places are distinct and below n, so the release's
  de-duplication and clamp never act."""
  chosen = np.zeros((num_frames, per_frame), bool)
  share, extra = divmod(budget, len(frames))
  n = candidates.size
  for j, t in enumerate(frames):
    k = min(share + (j < extra), n)
    if k > 0:
      chosen[t, candidates[np.rint(np.arange(k) * (n / k)).astype(np.int64)]] = True
  return chosen
