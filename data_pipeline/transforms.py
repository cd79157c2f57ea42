"""Per-sample transforms: a decoded record and a seeded RNG in, a variable-length token sample out.

A sample is a dict of numpy arrays, ready for `data_pipeline.packing`:

  patches    uint8 [N, 588]   14x14x3 pixels per token, flattened (row, column, channel), channel
                              fastest: the order of `data_pipeline.tokens.patchify` (the contract)
  positions  int32 [N, 3]     (t, h, w) of every token, the encoder's RoPE positions
                              (docs/spec.md §1.3)
  labels     int32 [n]        cluster ids, cyclically padded / truncated to the head's n
  mode       int              what made the tokens: MODE_IMAGE / _CODEC / _UNIFORM / _COLLAGE

Pixels stay uint8 here; CLIP normalisation (`normalise`) runs once per packed batch, which is
cheaper than per sample and lets a trainer ship uint8 to the device and normalise there instead.

Images (docs/spec.md §3): random-resized crop (area 0.7-1.0 of the image, aspect 0.8-1.25),
horizontal flip with probability 0.5, bicubic resize to 224 or 448; OCR images at 448 with the
release's short-side resize and centre crop, no flip. Optionally `native_aspect`: the crop is
resized to the largest patch grid of (about) its own aspect that fits a token budget.

Videos (records of `data_pipeline.records`: `frame_ids` [T] on the clip's timeline, `positions`
[K, 3] of the codec-selected patches with t indexing `frame_ids`), one of four modes per sample,
drawn with the head's ratios (the release's large run: 0.5 / 0.375 / 0.125 / 0):
  codec    the K selected patches, gathered from only the frames they use;
  uniform  `num_frames` bins over the timeline, one random frame per bin, all 256 patches each;
  collage  the same frames stacked top to bottom into one (num_frames*224) x 224 image at t = 0;
  random   K patches (the record's budget) drawn uniformly from all T x 256 at their true
           (t, h, w): the codec selection's baseline at an equal budget, as codec.select_random
           draws it (not a release mode; for ablations). Needs the video, like uniform.
Every mode works on the canvas the record's positions are on: its `geometry` field
('letterbox' for a `codec.select(geometry='letterbox')` or an imported LLaVA selection), else
the transform's `geometry` (default the centre crop). On a letterbox canvas the uniform and
collage frames are letterboxed (black padding included, as the LLaVA pipeline's whole first
frame) and the random mode draws only patches wholly inside the picture.
Timeline index j sits on the encoder's virtual 64-frame grid at floor(linspace(0, 63, T))[j]
(the release's placement of uniformly sampled frames); with the usual T = 64 that is t = j.

Every random choice comes from the `rng` argument, which the pipeline seeds from the pipeline seed
and the element's index, so a restored iterator makes the same choices.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from data_pipeline import video as video_lib
from data_pipeline.codec.geometry import check_geometry, decode_canvas, picture_valid_patches
from data_pipeline.tokens import (  # noqa: F401
  CHANNELS,
  CLIP_MEAN,
  CLIP_STD,
  PATCH,
  PATCH_DIM,
  TEMPORAL_SIZE,
  VIDEO_GRID,
  VIDEO_RESOLUTION,
  clip_positions,
  grid_positions,
  normalise,
  timeline_to_grid,
  to_patches,
)

MODE_IMAGE, MODE_CODEC, MODE_UNIFORM, MODE_COLLAGE, MODE_RANDOM = 0, 1, 2, 3, 4
# mode_probs / video_modes give one weight per mode in this order; the fourth may be left out
# (the release's three modes, random weight 0).
VIDEO_MODES = ('codec', 'uniform', 'collage', 'random')
_VIDEO_MODE_IDS = (MODE_CODEC, MODE_UNIFORM, MODE_COLLAGE, MODE_RANDOM)
CROPS = ('random_resized', 'centre', 'resize')


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------


def cyclic_labels(labels: Any, num_labels: int) -> np.ndarray:
  """Labels padded by repeating them cyclically (or truncated) to exactly `num_labels` ids.

  Padding repeats real ids rather than inventing a filler id: the loss needs valid ids
  (docs/spec.md §4).
  """
  ids = np.asarray(labels, dtype=np.int64).reshape(-1)
  if ids.size == 0:
    raise ValueError('the record has no labels')
  if ids.min() < 0 or ids.max() > np.iinfo(np.int32).max:
    raise ValueError(f'label ids out of range [{ids.min()}, {ids.max()}]')
  return np.resize(ids, num_labels).astype(np.int32)  # np.resize repeats the array cyclically


def _record_labels(record: Mapping[str, Any], num_labels: int) -> np.ndarray:
  if 'labels' not in record:
    raise ValueError('the record has no `labels` field (make labels before training on it)')
  return cyclic_labels(record['labels'], num_labels)


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


def decode_image(data: bytes) -> Image.Image:
  """RGB PIL image from encoded bytes (any format pillow reads); raises on corrupt data."""
  image = Image.open(io.BytesIO(data))
  image.load()  # force the full decode here, so a truncated file fails now, not at resize
  return image.convert('RGB')


def random_resized_crop_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  area_range: Sequence[float] = (0.7, 1.0),
  aspect_range: Sequence[float] = (0.8, 1.25),
  *,
  relative_aspect: bool = False,
) -> tuple[int, int, int, int]:
  """(top, left, crop_h, crop_w) of a random crop with area fraction and aspect (w/h) in range.

  The aspect is drawn log-uniformly, and up to 10 draws are tried, as in the usual Inception-style
  crop; if none fits, the largest centred crop with the aspect clamped into the range is used.
  `relative_aspect` multiplies the image's own aspect instead (native-aspect mode, where a square
  target would undo the point of keeping the aspect).
  """
  area = height * width
  base = width / height if relative_aspect else 1.0
  log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
  for _ in range(10):
    target = area * rng.uniform(area_range[0], area_range[1])
    aspect = base * math.exp(rng.uniform(log_lo, log_hi))
    crop_w = int(round(math.sqrt(target * aspect)))
    crop_h = int(round(math.sqrt(target / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return top, left, crop_h, crop_w
  aspect = width / height
  lo, hi = base * aspect_range[0], base * aspect_range[1]
  if aspect < lo:
    crop_w, crop_h = width, int(round(width / lo))
  elif aspect > hi:
    crop_h, crop_w = height, int(round(height * hi))
  else:
    crop_h, crop_w = height, width
  crop_h, crop_w = max(1, min(crop_h, height)), max(1, min(crop_w, width))
  return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def native_grid(height: int, width: int, max_tokens: int) -> tuple[int, int]:
  """The largest patch grid (hp, wp) of about the aspect height:width with hp * wp <= max_tokens."""
  if max_tokens < 1:
    raise ValueError(f'max_tokens={max_tokens}; need at least 1')
  scale = math.sqrt(max_tokens * PATCH * PATCH / (height * width))
  hp = max(1, min(max_tokens, int(height * scale / PATCH)))
  wp = max(1, min(max_tokens, int(width * scale / PATCH)))
  while hp * wp > max_tokens:  # only reachable after the clamps to 1 above
    if hp >= wp:
      hp -= 1
    else:
      wp -= 1
  return hp, wp


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """An image record (`image` bytes, `labels`) -> a sample on an Hp x Wp grid at t = 0."""

  resolution: int = 224
  crop: str = 'random_resized'  # 'random_resized', 'centre' (short side + centre), 'resize'
  area_range: tuple[float, float] = (0.7, 1.0)
  aspect_range: tuple[float, float] = (0.8, 1.25)
  flip_prob: float = 0.5
  native_aspect: bool = False  # keep the crop's aspect: the largest grid within max_tokens
  max_tokens: int = 1024  # token budget of a native-aspect image
  num_labels: int = 10

  def __post_init__(self):
    if self.crop not in CROPS:
      raise ValueError(f'crop={self.crop!r}; choose one of {CROPS}')
    if self.resolution % PATCH:
      raise ValueError(f'resolution {self.resolution} is not a multiple of the patch size {PATCH}')

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if 'image' not in record:
      raise ValueError(f'an image record needs an `image` field; it has {sorted(record)}')
    labels = _record_labels(record, self.num_labels)
    image = decode_image(record['image'])
    width, height = image.size
    if self.crop == 'random_resized':
      top, left, crop_h, crop_w = random_resized_crop_box(
        height, width, rng, self.area_range, self.aspect_range, relative_aspect=self.native_aspect
      )
    elif self.crop == 'centre' and not self.native_aspect:
      side = min(height, width)
      top, left, crop_h, crop_w = (height - side) // 2, (width - side) // 2, side, side
    else:  # 'resize', or 'centre' in native mode, where the whole image already keeps its aspect
      top, left, crop_h, crop_w = 0, 0, height, width
    if self.native_aspect:
      hp, wp = native_grid(crop_h, crop_w, self.max_tokens)
    else:
      hp = wp = self.resolution // PATCH
    pixels = np.asarray(
      image.resize(
        (wp * PATCH, hp * PATCH),
        Image.Resampling.BICUBIC,
        box=(left, top, left + crop_w, top + crop_h),
      )
    )
    if self.flip_prob > 0 and rng.random() < self.flip_prob:
      pixels = pixels[:, ::-1]
    return {
      'patches': to_patches(pixels),
      'positions': grid_positions(0, hp, wp),
      'labels': labels,
      'mode': MODE_IMAGE,
    }


# ------------------------------------------------------------------------------------------------
# Videos
# ------------------------------------------------------------------------------------------------


def pick_uniform_frames(num_timeline: int, num_frames: int, rng: np.random.Generator) -> np.ndarray:
  """One random timeline index per bin, `num_frames` contiguous bins over the T-frame timeline.

  With T = 64 and 8 frames: bins of 8, as in docs/spec.md §3. Bins are
  [floor(b*T/n), floor((b+1)*T/n)); a timeline shorter than the frame count repeats frames
  instead of leaving a bin empty.
  """
  edges = (np.arange(num_frames + 1) * num_timeline) // num_frames
  picks = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    picks.append(int(rng.integers(lo, hi)) if hi > lo else min(int(lo), num_timeline - 1))
  return np.asarray(picks, np.int64)


def frame_patches(frames_TxHxWx3: np.ndarray) -> np.ndarray:
  """[T, 224, 224, 3] -> [T*256, 588], frame-major, then row, then column."""
  t = frames_TxHxWx3.shape[0]
  return to_patches(frames_TxHxWx3.reshape(t * frames_TxHxWx3.shape[1], *frames_TxHxWx3.shape[2:]))


def check_positions(positions, num_frames: int) -> np.ndarray:
  """Codec positions [K, 3] (t on the clip's timeline, h, w on the 16 x 16 grid), validated."""
  pos_Kx3 = np.asarray(positions, np.int64)
  if pos_Kx3.ndim != 2 or pos_Kx3.shape[1] != 3 or len(pos_Kx3) == 0:
    raise ValueError(f'`positions` of shape {pos_Kx3.shape}; expected [K > 0, 3]')
  t_K, h_K, w_K = pos_Kx3.T
  if (
    t_K.min() < 0
    or t_K.max() >= num_frames
    or min(h_K.min(), w_K.min()) < 0
    or max(h_K.max(), w_K.max()) >= VIDEO_GRID
  ):
    raise ValueError(
      f'`positions` outside the {num_frames} x {VIDEO_GRID} x {VIDEO_GRID} grid of the clip'
    )
  return pos_Kx3


def codec_patches(video, frame_ids: np.ndarray, positions, geometry: str = 'crop') -> np.ndarray:
  """uint8 [K, 588] pixels of the selected patches, decoding only the frames they use; on the
  canvas of `geometry` ('crop', or 'letterbox' for a codec.select(geometry='letterbox'))."""
  frame_ids = np.asarray(frame_ids, np.int64).reshape(-1)
  t_K, h_K, w_K = check_positions(positions, len(frame_ids)).T
  used_t = np.unique(t_K)  # a sparse selection touches few frames: decode only those
  frames = decode_canvas(video, frame_ids[used_t], VIDEO_RESOLUTION, geometry)
  return gather_patches(frames, np.searchsorted(used_t, t_K), h_K, w_K)


def gather_patches(
  frames_UxHxWx3: np.ndarray, frame_U_of_K: np.ndarray, h_K: np.ndarray, w_K: np.ndarray
) -> np.ndarray:
  """Patch (h, w) of frame u for every selected token: uint8 [K, 588]."""
  u, res = frames_UxHxWx3.shape[0], frames_UxHxWx3.shape[1]
  grid = frames_UxHxWx3.reshape(u, res // PATCH, PATCH, res // PATCH, PATCH, CHANNELS)
  # Advanced indices split by a slice put the K axis first: [K, 14, 14, 3] = (row, column, channel).
  return grid[frame_U_of_K, h_K, :, w_K].reshape(len(h_K), PATCH_DIM)


@dataclasses.dataclass(frozen=True)
class VideoTransform:
  """A video clip record -> a sample in one of the modes codec / uniform / collage / random."""

  mode_probs: tuple[float, ...] = (0.5, 0.375, 0.125)  # codec, uniform, collage[, random]
  num_frames: int = 8  # frames of the uniform and collage modes
  temporal_size: int = TEMPORAL_SIZE
  num_labels: int = 10
  video_root: str = ''  # joined to a record's `source` when it carries no bytes
  geometry: str = 'crop'  # canvas of records that do not name theirs: 'crop', 'letterbox'

  def __post_init__(self):
    check_geometry(self.geometry)
    probs = np.asarray(self.mode_probs, np.float64)
    if probs.shape not in ((3,), (4,)) or probs.min() < 0 or probs.sum() <= 0:
      raise ValueError(
        f'mode_probs={self.mode_probs}: three or four non-negative weights for '
        f'{VIDEO_MODES} (a missing fourth is 0), not all 0'
      )

  def choose_mode(self, rng: np.random.Generator) -> str:
    probs = np.asarray(self.mode_probs, np.float64)
    # Three weights draw exactly as before the random mode existed (same generator calls).
    return VIDEO_MODES[int(rng.choice(len(probs), p=probs / probs.sum()))]

  def geometry_of(self, record: Mapping[str, Any]) -> str:
    """The canvas of the record's positions: its own `geometry` field, else the transform's."""
    try:
      return check_geometry(record.get('geometry') or self.geometry)
    except ValueError as e:
      raise ValueError(f'record {record.get("source", "")!r}: {e}') from None

  def video_of(self, record: Mapping[str, Any]) -> video_lib.VideoSource:
    if record.get('video') is not None:
      return record['video']
    if not record.get('source'):
      raise ValueError('a video record needs `video` bytes or a `source` path')
    return os.path.join(self.video_root, record['source']) if self.video_root else record['source']

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    labels = _record_labels(record, self.num_labels)
    mode = self.choose_mode(rng)
    if mode == 'codec':
      patches, positions = self.codec(record)
    elif mode == 'random':
      patches, positions = self.random(record, rng)
    else:
      patches, positions = self.frames(record, rng, collage=mode == 'collage')
    return {
      'patches': patches,
      'positions': positions,
      'labels': labels,
      'mode': _VIDEO_MODE_IDS[VIDEO_MODES.index(mode)],
    }

  def _timeline(self, record: Mapping[str, Any]) -> np.ndarray:
    frame_ids = np.asarray(record.get('frame_ids', ()), np.int64).reshape(-1)
    if frame_ids.size == 0:
      raise ValueError('the video record has no `frame_ids` timeline')
    return frame_ids

  def codec(self, record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The record's selected patches: stored in the record (precompute's store_patches), or
    gathered from only the frames they use."""
    frame_ids = self._timeline(record)
    if record.get('positions') is None:
      raise ValueError("codec mode needs the record's selected `positions` [K, 3]")
    pos_Kx3 = check_positions(record['positions'], len(frame_ids))
    if record.get('patches') is not None:
      patches = np.asarray(record['patches'])
      if patches.dtype != np.uint8 or patches.shape != (len(pos_Kx3), PATCH_DIM):
        raise ValueError(
          f'stored `patches` {patches.dtype} {patches.shape}; expected uint8 '
          f'[{len(pos_Kx3)}, {PATCH_DIM}] (one per position)'
        )
    else:
      patches = codec_patches(self.video_of(record), frame_ids, pos_Kx3, self.geometry_of(record))
    t_K, h_K, w_K = pos_Kx3.T
    grid_t = timeline_to_grid(len(frame_ids), self.temporal_size)[t_K]
    return patches, np.stack([grid_t, h_K, w_K], axis=-1).astype(np.int32)

  def random(
    self, record: Mapping[str, Any], rng: np.random.Generator
  ) -> tuple[np.ndarray, np.ndarray]:
    """As many patches as the record's codec selection (its budget K), drawn uniformly without
    replacement from all T x 16 x 16 of the timeline, sorted by (t, h, w), at their true t on
    the grid: the ablation's baseline of equal budget and no codec signal."""
    frame_ids = self._timeline(record)
    if record.get('positions') is None:
      raise ValueError("random mode takes its budget from the record's `positions` [K, 3]")
    budget = len(check_positions(record['positions'], len(frame_ids)))
    geometry, video = self.geometry_of(record), self.video_of(record)
    candidates_Nx3 = clip_positions(len(frame_ids), VIDEO_GRID, VIDEO_GRID)  # token order
    if geometry != 'crop':  # only patches wholly inside the picture (all of them for a crop)
      valid_HxW = picture_valid_patches(video, VIDEO_RESOLUTION, PATCH, geometry)
      candidates_Nx3 = candidates_Nx3[valid_HxW[candidates_Nx3[:, 1], candidates_Nx3[:, 2]]]
      if len(candidates_Nx3) < budget:
        raise ValueError(
          f'{video_lib.describe(video)}: random mode needs {budget} patches, the letterboxed '
          f'picture has {len(candidates_Nx3)} on its {len(frame_ids)} frames'
        )
    flat = np.sort(rng.choice(len(candidates_Nx3), size=budget, replace=False))
    pos_Kx3 = candidates_Nx3[flat].astype(np.int64)
    patches = codec_patches(video, frame_ids, pos_Kx3, geometry)
    grid_t = timeline_to_grid(len(frame_ids), self.temporal_size)[pos_Kx3[:, 0]]
    return patches, np.stack([grid_t, pos_Kx3[:, 1], pos_Kx3[:, 2]], axis=-1).astype(np.int32)

  def frames(
    self, record: Mapping[str, Any], rng: np.random.Generator, *, collage: bool
  ) -> tuple[np.ndarray, np.ndarray]:
    """Uniform frames at their true t, or the same frames as one tall collage image at t = 0."""
    frame_ids = self._timeline(record)
    picks = pick_uniform_frames(len(frame_ids), self.num_frames, rng)
    frames = decode_canvas(
      self.video_of(record), frame_ids[picks], VIDEO_RESOLUTION, self.geometry_of(record)
    )
    # Frame k's rows are rows 16k..16k+15 of the collage, so both modes share one patch order.
    patches = frame_patches(frames)
    if collage:
      positions = grid_positions(0, self.num_frames * VIDEO_GRID, VIDEO_GRID)
    else:
      grid_t = timeline_to_grid(len(frame_ids), self.temporal_size)[picks]
      positions = np.concatenate([grid_positions(int(t), VIDEO_GRID, VIDEO_GRID) for t in grid_t])
    return patches, positions
