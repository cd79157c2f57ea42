"""Baselines of codec selection with its return type (`Selection`): whole frames evenly spaced,
and patches drawn at random, at the same budget on the same grid."""

from __future__ import annotations

import time

import numpy as np

from data_pipeline.codec import bitstream
from data_pipeline.codec.selection import Selection, check_grid
from data_pipeline.video import VideoSource


def _baseline(video, grid_TxHpxWp: tuple[int, int, int], method: str, flat) -> Selection:
  """The Selection of the patches `flat` (indices into the checked T x Hp x Wp grid)."""
  num_frames, hp, wp = grid_TxHpxWp
  start = time.perf_counter()
  info = bitstream.probe(video)
  chosen = np.zeros(num_frames * hp * wp, bool)
  chosen[flat] = True
  chosen_TxHpxWp = chosen.reshape(num_frames, hp, wp)
  whole = np.flatnonzero(chosen_TxHpxWp.all(axis=(1, 2))).astype(np.int32)
  return Selection(
    frame_ids=bitstream.timeline(info.num_frames, num_frames).astype(np.int32),
    positions=np.argwhere(chosen_TxHpxWp).astype(np.int32),
    picture_types=np.zeros(num_frames, np.uint8),  # not decoded: unknown
    scores=np.zeros((num_frames, hp, wp), np.float32),
    whole_frames=whole,
    method=method,
    source=info.name,
    codec=info.codec,
    num_source_frames=info.num_frames,
    timings={'total': time.perf_counter() - start},
  )


def select_uniform_frames(
  video: VideoSource,
  num_frames: int = 64,
  budget: int = 2048,
  resolution: int = 224,
  patch_size: int = 14,
) -> Selection:
  """Whole frames evenly spaced at their true t on the T-frame timeline, K = budget.

  ceil(K / (Hp*Wp)) frames at floor(linspace(0, T-1, n)); when K is not a multiple of a frame,
  the last of them contributes the remainder, spread evenly in raster order.
  """
  hp, wp = check_grid(num_frames, budget, resolution, patch_size)
  per_frame = hp * wp
  count = -(-budget // per_frame)
  frames = np.floor(np.linspace(0, num_frames - 1, count)).astype(np.int64)
  flat = (frames[:-1, None] * per_frame + np.arange(per_frame)[None, :]).reshape(-1)
  remainder = budget - (count - 1) * per_frame
  last = frames[-1] * per_frame + np.floor(np.linspace(0, per_frame - 1, remainder)).astype(
    np.int64
  )
  return _baseline(video, (num_frames, hp, wp), 'uniform_frames', np.concatenate([flat, last]))


def select_random(
  video: VideoSource,
  num_frames: int = 64,
  budget: int = 2048,
  resolution: int = 224,
  patch_size: int = 14,
  seed: int = 0,
) -> Selection:
  """K = budget patches drawn uniformly without replacement from all T x Hp x Wp (seeded)."""
  hp, wp = check_grid(num_frames, budget, resolution, patch_size)
  flat = np.random.default_rng(seed).choice(num_frames * hp * wp, size=budget, replace=False)
  return _baseline(video, (num_frames, hp, wp), 'random', flat)
