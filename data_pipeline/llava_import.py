"""The release's LLaVA selection files (stage1's `*.visidx_thw.npy`, `*.frame_ids.npy`,
`*.meta.json`; `data_pipeline.llava` writes the same) read back into clip records of
`data_pipeline.records`, so data selected by the release trains here."""

from __future__ import annotations

import glob
import os
from typing import Any, Iterator

import numpy as np

from data_pipeline import fileio


def regrid(
  positions_Kx3: np.ndarray, num_frames: int, grid: int, model_grid: int, min_cover: float = 0.5
) -> np.ndarray:
  """(t, h, w) on a `grid` x `grid` square canvas -> the cells of a `model_grid` x `model_grid`
  grid over the same canvas that the selected cells cover for at least `min_cover` of their
  area, int64 [K', 3] sorted. Both grids split one square canvas (the release's 576 / 16 = 36
  and our 224 / 14 = 16 tile the same letterboxed picture), so the overlap is exact."""

  def overlap(fine: int, coarse: int) -> np.ndarray:
    lo_f, hi_f = np.arange(fine) / fine, np.arange(1, fine + 1) / fine
    lo_c, hi_c = np.arange(coarse)[:, None] / coarse, np.arange(1, coarse + 1)[:, None] / coarse
    return np.clip(np.minimum(hi_f, hi_c) - np.maximum(lo_f, lo_c), 0, None) * coarse

  m = overlap(grid, model_grid)  # [model_grid, grid]
  chosen_TxGxG = np.zeros((num_frames, grid, grid))
  chosen_TxGxG[tuple(np.asarray(positions_Kx3, np.int64).T)] = 1.0
  cover_TxMxM = np.einsum('ag,tgh,bh->tab', m, chosen_TxGxG, m)
  return np.argwhere(cover_TxMxM >= min_cover - 1e-9).astype(np.int64)


def check_model_grid(model_grid: int | None) -> None:
  if model_grid is not None and model_grid < 1:
    raise ValueError(
      f'model_grid={model_grid}: patches a side of the model grid, >= 1 (16 for our 224 / 14 '
      "model); leave it out to keep the release's grid"
    )


def release_record(
  visidx_path: str,
  frame_ids_path: str | None = None,
  source: str | None = None,
  grid: int | None = None,
  model_grid: int | None = None,
) -> dict[str, Any]:
  """A clip record (`data_pipeline.records`) of stage1's `*.visidx_thw.npy` and its
  `*.frame_ids.npy` (default: the same prefix). `source` defaults to the video named in the
  `*.meta.json` beside them; `grid` (patches a side) defaults to the meta's hb.

  positions become int16, sorted by (t, h, w) as our records keep them; with `model_grid`
  (e.g. 16 for our 224 / 14 model) they are moved onto that grid (`regrid`); picture types are
  unknown (the release does not store them)."""
  check_model_grid(model_grid)
  if not visidx_path.endswith('.visidx_thw.npy'):
    raise ValueError(f'{visidx_path}: not a stage1 selection file (*.visidx_thw.npy)')
  prefix = visidx_path[: -len('.visidx_thw.npy')]
  frame_ids_path = frame_ids_path or prefix + '.frame_ids.npy'
  meta = fileio.read_json(prefix + '.meta.json') or {}
  if not os.path.exists(frame_ids_path):
    raise ValueError(
      f'{visidx_path}: its frame ids {frame_ids_path} are missing (stage1 writes them beside '
      'the .visidx_thw.npy: copy them there; from Python, frame_ids_path= names another file)'
    )
  thw = np.load(visidx_path, allow_pickle=False)
  frame_ids = np.load(frame_ids_path, allow_pickle=False)
  if thw.ndim != 2 or thw.shape[1] != 3 or thw.dtype.kind not in 'iu':
    raise ValueError(
      f'{visidx_path}: expected integer [K, 3] (t, h, w), got {thw.dtype} {thw.shape}'
    )
  if frame_ids.ndim != 1 or frame_ids.dtype.kind not in 'iu':
    raise ValueError(
      f'{frame_ids_path}: expected integer [T] frame ids, got {frame_ids.dtype} {frame_ids.shape}'
    )
  grid = int(grid or meta.get('hb') or 0)
  if not grid:
    raise ValueError(
      f'{visidx_path}: no {prefix}.meta.json gives the grid (its hb: patches a side); stage1 '
      'writes it beside the .visidx_thw.npy: copy it there (from Python, grid= gives it)'
    )
  if len(thw) and (thw.min() < 0 or thw[:, 0].max() >= len(frame_ids) or thw[:, 1:].max() >= grid):
    raise ValueError(f'{visidx_path}: positions outside T={len(frame_ids)} x {grid} x {grid}')
  thw = np.unique(thw.astype(np.int64), axis=0)  # sorted by (t, h, w), no repeats
  if model_grid and model_grid != grid:
    thw, grid = regrid(thw, len(frame_ids), grid, model_grid), model_grid
  source = source or meta.get('video')
  if not source:
    raise ValueError(f'{visidx_path}: no meta.json names the video; pass source')
  return {
    'source': str(source),
    'frame_ids': frame_ids.astype(np.int32),
    'positions': thw.astype(np.int16),
    'picture_types': np.zeros(len(frame_ids), np.uint8),
    'geometry': 'letterbox',  # stage1's canvas, on whichever grid
    'stats_kept_fraction': float(len(thw) / (len(frame_ids) * grid * grid)),
  }


def release_files(visidx_root: str) -> Iterator[str]:
  """Every `*.visidx_thw.npy` under a stage1 folder, sorted."""
  yield from sorted(glob.glob(os.path.join(visidx_root, '**', '*.visidx_thw.npy'), recursive=True))


def import_files(
  visidx_root: str,
  out: str,
  model_grid: int | None = None,
  video_root: str = '',
  failures: str | None = None,
) -> dict:
  """Every stage1 file set under `visidx_root` as a record in one ArrayRecord shard `out`
  (written atomically); `video_root`: sources stored relative to it. A file set that cannot be
  read (a corrupt or truncated .npy, a missing frame_ids, bad positions, no video named) is
  recorded in `failures` (default `out + '.failures.jsonl'`: file, reason) and left out; the
  import goes on. A record whose video is not found from here (`video_root` joined to its
  source, as the training pipeline reads it; a relative path in meta.json is from the folder
  stage1 ran in) is written all the same, and counted in 'videos_missing' with the first in
  'video_missing' (the videos may be on the training machines only). Returns the counts;
  ValueError when `visidx_root` is not a folder or holds no file set at all."""
  from data_pipeline import paths, records, shards

  check_model_grid(model_grid)
  if not os.path.isdir(visidx_root):
    what = 'a file, not a folder' if os.path.exists(visidx_root) else 'no such folder'
    raise ValueError(f'{visidx_root}: {what}; give the folder of the stage1 *.visidx_thw.npy files')
  found = list(release_files(visidx_root))
  if not found:
    raise ValueError(f'{visidx_root}: no *.visidx_thw.npy files found')
  failures = failures or out + '.failures.jsonl'
  failed, missing = [], {'videos_missing': 0, 'video_missing': None}
  if not paths.is_url(out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  writer = shards.ShardWriter(out)
  try:
    for path in found:
      try:
        record = release_record(path, model_grid=model_grid)
      except Exception as e:  # one unreadable file set must not stop the import
        reason = f'{type(e).__name__}: {e}'
        failed.append({'file': path, 'reason': reason if path in reason else f'{path}: {reason}'})
        continue
      if video_root:
        record['source'] = os.path.relpath(record['source'], video_root)
      video = os.path.join(video_root, record['source'])
      if not paths.is_url(video) and not os.path.exists(video):
        missing['videos_missing'] += 1
        missing['video_missing'] = missing['video_missing'] or video
      writer.write(records.encode(record))
    if len(failed) == len(found):
      writer.abandon()  # nothing read: an earlier `out` stays as it was
    else:
      writer.commit()
  except BaseException:
    writer.abandon()
    raise
  shards.write_failures(failures, failed)
  return {
    'records': len(found) - len(failed),
    'failed': len(failed),
    **missing,
    'out': out,
    'failures': failures,
  }
