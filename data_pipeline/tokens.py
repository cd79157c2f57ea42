"""The token contract: what a token is, shared by the input pipeline, the encoder and the trainer.

One home for the facts both sides of the data path must agree on (docs/spec.md §1.2-1.3):
  - a token is a 14x14x3 patch, flattened (row, column, channel), channel fastest: 588 values;
  - pixels are CLIP-normalised, (pixel / 255 - mean) / std with the CLIP mean and std;
  - patches are listed frame-major, then row, then column, and each carries its (t, h, w);
  - T uniformly sampled frames sit on the encoder's virtual 64-frame grid at
    floor(linspace(0, 63, T)).

numpy only, and array-API neutral where it computes: `normalise` and `patchify` take numpy or
JAX arrays alike (the trainer normalises uint8 patches on the device with the same function the
pipeline uses on the host). The models import this module (it is the contract, not the data
machinery); it imports nothing of the project.
"""

from __future__ import annotations

import numpy as np

PATCH = 14
CHANNELS = 3
PATCH_DIM = PATCH * PATCH * CHANNELS  # 588
VIDEO_RESOLUTION = 224  # the codec grid: 16 x 16 patches per frame
VIDEO_GRID = VIDEO_RESOLUTION // PATCH
TEMPORAL_SIZE = 64  # the encoder's virtual frame grid (rope_temporal_size)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Per value, normalised = pixel * _SCALE + _OFFSET == (pixel / 255 - mean) / std, the channel
# pattern repeated over the 196 pixels of a patch (channel fastest).
_SCALE_P = np.tile(1.0 / (255.0 * np.asarray(CLIP_STD, np.float64)), PATCH * PATCH).astype(
  np.float32
)
_OFFSET_P = np.tile(
  -np.asarray(CLIP_MEAN, np.float64) / np.asarray(CLIP_STD, np.float64), PATCH * PATCH
).astype(np.float32)


def normalise(patches_NxP):
  """CLIP normalisation of uint8 patches [..., 588] -> float32; numpy in, numpy out, and JAX in,
  JAX out (the same affine map, so host and device agree to the last bit of float32)."""
  if patches_NxP.shape[-1] != PATCH_DIM:
    raise ValueError(f'patches have {patches_NxP.shape[-1]} values per token; expected {PATCH_DIM}')
  return patches_NxP.astype(np.float32) * _SCALE_P + _OFFSET_P


def patchify(pixels_BxTxHxWxC, patch_size: int = PATCH):
  """[B, T, H, W, C] -> [B, T*Hp*Wp, ps*ps*C], tokens frame-major then row then column, pixels
  (row, column, channel) within a token. numpy or JAX arrays."""
  b, t, h, w, c = pixels_BxTxHxWxC.shape
  if h % patch_size or w % patch_size:
    raise ValueError(
      f'pixels of shape {tuple(pixels_BxTxHxWxC.shape)}: H and W must be multiples '
      f'of the patch size {patch_size}'
    )
  hp, wp = h // patch_size, w // patch_size
  x = pixels_BxTxHxWxC.reshape(b, t, hp, patch_size, wp, patch_size, c)
  x = x.transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, t * hp * wp, patch_size * patch_size * c)


def to_patches(pixels_HxWx3: np.ndarray) -> np.ndarray:
  """One picture [H, W, 3] -> [Hp*Wp, 588] (`patchify` of a single frame), contiguous."""
  h, w, c = pixels_HxWx3.shape
  if c != CHANNELS:
    raise ValueError(f'pixels of shape {pixels_HxWx3.shape}: need 3 channels')
  return np.ascontiguousarray(patchify(pixels_HxWx3[None, None], PATCH)[0])


def grid_positions(t: int, hp: int, wp: int) -> np.ndarray:
  """(t, h, w) of an hp x wp patch grid at time t, row-major: int32 [hp*wp, 3]."""
  hh, ww = np.meshgrid(np.arange(hp), np.arange(wp), indexing='ij')
  return np.stack([np.full(hp * wp, t), hh.reshape(-1), ww.reshape(-1)], axis=-1).astype(np.int32)


def clip_positions(num_frames: int, hp: int, wp: int) -> np.ndarray:
  """(t, h, w) of every patch of `num_frames` whole frames, t = 0..T-1: int32 [T*hp*wp, 3]."""
  return (
    np.concatenate([grid_positions(t, hp, wp) for t in range(num_frames)])
    if num_frames
    else np.zeros((0, 3), np.int32)
  )


def timeline_to_grid(num_frames: int, temporal_size: int = TEMPORAL_SIZE) -> np.ndarray:
  """Grid time of each of T uniformly sampled frames: floor(linspace(0, size - 1, T)).

  A clip's timeline is uniform over the clip, so its frames are uniform over the 64-frame grid;
  with T = 64 this is the identity.
  """
  return np.floor(np.linspace(0, temporal_size - 1, num_frames)).astype(np.int32)
