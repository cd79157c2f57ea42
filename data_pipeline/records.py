"""The bytes of one dataset record, and back.

A record is a flat dict of numpy arrays, strings, bytes and numbers, stored as an uncompressed
`.npz` (numpy's own format, read with `allow_pickle=False`: no code runs when reading). One
format for every head, so ArrayRecord shards, TFDS builders and tests share it.

Video clip records (written by tools/precompute_codec.py):
  source        str      where the clip came from (path or URL-like id)
  video         bytes    the file itself, for small clips (optional; else read `source`)
  frame_ids     int32 [T]        source frames on the clip's timeline (presentation order)
  positions     int16 [K, 3]     selected patches (t, h, w) on the model grid, sorted
  picture_types uint8 [T]        0 unknown, 1 I, 2 P, 3 B (PICTURE_TYPES)
  geometry      str      the canvas of `positions`: 'letterbox' (absent: the centre crop)
  labels        int32 [n]        cluster ids (optional until labels are made)
  stats_*       float / int      selection statistics (kept fraction, timings, ...)
Image records: `image` (encoded bytes), `labels` int32 [n], optional `source`.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

PICTURE_TYPES = ('?', 'I', 'P', 'B')
_BYTES_PREFIX = '__bytes__'


def encode(record: dict[str, Any]) -> bytes:
  arrays = {}
  for key, value in record.items():
    if value is None:
      continue
    if isinstance(value, (bytes, bytearray, memoryview)):
      arrays[_BYTES_PREFIX + key] = np.frombuffer(bytes(value), dtype=np.uint8)
    elif isinstance(value, str):
      arrays[key] = np.array(value)
    else:
      array = np.asarray(value)
      if array.dtype == object:
        raise TypeError(f'record field {key!r} has an object array; store numbers, str or bytes')
      arrays[key] = array
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def decode(data: bytes) -> dict[str, Any]:
  out: dict[str, Any] = {}
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    for key in npz.files:
      value = npz[key]
      if key.startswith(_BYTES_PREFIX):
        out[key[len(_BYTES_PREFIX) :]] = value.tobytes()
      elif value.ndim == 0 and value.dtype.kind == 'U':
        out[key] = str(value)
      elif value.ndim == 0:
        out[key] = value.item()
      else:
        out[key] = value
  return out
