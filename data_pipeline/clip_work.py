"""One clip -> one record: the per-clip work of `data_pipeline.precompute`, run in its workers.

`process_clip` opens a clip (a local path, or through a custom reader), runs the selection
(`data_pipeline.codec.select`, or a 'module:function' selector for ablations) and encodes the
record. Every error a clip can raise becomes a `Failed` naming the file, so one bad clip never
reaches the run as an exception; crashes and hangs that take the whole worker down are the
worker pool's to catch (`data_pipeline.workers`).

A record is a pure function of the clip and the settings: per-clip timings stay out of it (they
go to the run's summary), so the same plan gives the same shard bytes on any machine.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from data_pipeline import paths, records, shards, transforms
from data_pipeline.video import VideoError


@dataclasses.dataclass(frozen=True)
class Clip:
  """One input video: where it is and, optionally, its label ids."""

  path: str
  labels: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every clip of a run shares (sent once to each worker)."""

  options: dict
  inline_max_bytes: int
  store_scores: bool
  record_format: str
  store_patches: bool = False
  selector: str | None = None  # 'module:function' instead of codec.select (ablations)
  reader: str | None = None  # 'module:function': clip name -> path or bytes to select on


@dataclasses.dataclass
class Done:
  data: bytes
  kept: int
  candidates: int
  seconds: float


@dataclasses.dataclass
class Failed:
  reason: str
  video_error: bool  # a bad input (expected), as opposed to a bug, wrong options or a crash


def resolve(spec: str, what: str = 'selector') -> Callable:
  """'package.module:function' -> the function."""
  module, _, attr = spec.partition(':')
  if not module or not attr:
    raise ValueError(f'{what} {spec!r} must look like "package.module:function"')
  try:
    return getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f'{what} {spec!r}: {e}') from None


def picture_type_codes(picture_types) -> np.ndarray:
  """uint8 codes of records.PICTURE_TYPES from ints or from 'I'/'P'/'B' strings."""
  values = list(picture_types)
  if values and isinstance(values[0], (str, bytes, np.str_, np.bytes_)):
    codes = []
    for v in values:
      v = v.decode() if isinstance(v, (bytes, np.bytes_)) else str(v)
      v = v.rsplit('.', 1)[-1][:1].upper()  # 'I', 'PictureType.I' -> 'I'
      codes.append(records.PICTURE_TYPES.index(v) if v in records.PICTURE_TYPES else 0)
    return np.asarray(codes, np.uint8)
  return np.asarray(values, np.uint8).reshape(-1)


def generic_fields(selection) -> dict[str, Any]:
  """Record fields of a selector without `record_fields()`: the contract's arrays, plus the
  numbers of a `stats` mapping as `stats_*`."""
  fields = {
    'frame_ids': np.asarray(selection.frame_ids, np.int32).reshape(-1),
    'positions': np.asarray(selection.positions),
    'picture_types': picture_type_codes(selection.picture_types),
  }
  stats = getattr(selection, 'stats', None)
  for key, value in stats.items() if isinstance(stats, Mapping) else ():
    if isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)):
      fields[f'stats_{key}'] = value.item() if isinstance(value, np.generic) else value
  return fields


def selection_record(
  selection, source: str, labels: Sequence[int] | None = None, store_scores: bool = False
) -> dict[str, Any]:
  """The video clip record (records.py fields) of one selection."""
  # The codec's Selection says itself which fields and statistics a record holds.
  if hasattr(selection, 'record_fields'):
    record = dict(selection.record_fields())
  else:
    record = generic_fields(selection)
  # Timings differ from run to run and machine to machine; a record must not (shards of one
  # plan are byte-identical wherever they are made). The run's summary reports the time.
  record = {k: v for k, v in record.items() if not k.endswith('seconds')}
  positions = np.asarray(record['positions'])
  if positions.ndim != 2 or positions.shape[1] != 3:
    raise ValueError(f'{source}: selection positions have shape {positions.shape}, not [K, 3]')
  if positions.size and (positions.min() < 0 or positions.max() > np.iinfo(np.int16).max):
    raise ValueError(f'{source}: selection positions out of the int16 range')
  record['positions'] = positions.astype(np.int16)
  record['source'] = source
  if labels is not None:
    record['labels'] = np.asarray(labels, np.int32).reshape(-1)
  scores = np.asarray(selection.scores)
  if 'stats_kept_fraction' not in record and scores.size:
    record['stats_kept_fraction'] = float(len(positions) / scores.size)
  if store_scores:
    # float16 halves the size; the map is for inspection, not for training.
    record['scores'] = scores.astype(np.float16)
  return record


# The worker's state: set once per process by `init_worker`.
_settings: Settings | None = None
_select: Callable | None = None
_read: Callable | None = None
_blas_limits = None  # the worker's BLAS thread limit, kept alive for the process's life


def init_worker(settings: Settings, blas_threads: int = 0) -> None:
  """Makes this process ready to run `process_clip` (imports the selector and the reader now, so
  a clip's time limit does not count the imports)."""
  global _settings, _select, _read, _blas_limits
  _settings = settings
  if settings.selector:
    _select = resolve(settings.selector)
  else:
    from data_pipeline import codec

    _select = codec.select
  _read = resolve(settings.reader, 'reader') if settings.reader else None
  if blas_threads:
    # Each worker's BLAS would start a thread per core: N workers x cores threads on `cores`
    # cores made 2 workers slower than 1 on a 2-core machine.
    import threadpoolctl

    _blas_limits = threadpoolctl.threadpool_limits(blas_threads)


def failure_reason(path: str, error: BaseException) -> str:
  text = f'{type(error).__name__}: {error}'
  return text if path in text else f'{path}: {text}'


def process_clip(clip: Clip):
  """Select one clip and encode its record; every error becomes a Failed naming the file."""
  settings = _settings
  start = time.perf_counter()
  try:
    # A path, not bytes, unless a reader says otherwise (or the clip is an object in a bucket:
    # its bytes): the selector's errors then name it.
    if _read is not None:
      video = _read(clip.path)
    else:
      video = paths.read_bytes(clip.path) if paths.is_url(clip.path) else clip.path
    selection = _select(video, **settings.options)
    record = selection_record(selection, clip.path, clip.labels, settings.store_scores)
    if settings.store_patches:
      record['patches'] = transforms.codec_patches(
        video, record['frame_ids'], record['positions'], record.get('geometry', 'crop')
      )
    if settings.inline_max_bytes > 0:
      if isinstance(video, (bytes, bytearray, memoryview)):
        if len(video) <= settings.inline_max_bytes:
          record['video'] = bytes(video)
      elif os.path.getsize(video) <= settings.inline_max_bytes:
        with open(video, 'rb') as f:
          record['video'] = f.read()
    data = shards.encode_entry(record, settings.record_format)
  except Exception as e:  # pylint: disable=broad-except  -- one bad clip must not stop the run
    return Failed(failure_reason(clip.path, e), isinstance(e, VideoError))
  return Done(
    data,
    kept=len(record['positions']),
    candidates=int(np.asarray(selection.scores).size),
    seconds=time.perf_counter() - start,
  )
