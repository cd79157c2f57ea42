"""Opening videos and decoding chosen frames with PyAV, with errors that name the file.

Shared by the codec analysis, the precompute tool and the input pipeline. `video` is everywhere a
path or the bytes of a file.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import av
import numpy as np

VideoSource = str | os.PathLike | bytes | bytearray | memoryview

# FFmpeg renders any text file as a 'video' of ANSI art; that is never what a caller means.
TEXT_FORMATS = frozenset({'tty'})
TEXT_CODECS = frozenset({'ansi', 'text', 'bintext', 'xbin', 'idf'})


class VideoError(ValueError):
  """A video that cannot be used; the message names the file and the reason."""


def describe(video: VideoSource) -> str:
  if isinstance(video, (bytes, bytearray, memoryview)):
    return f'<{len(video)} bytes in memory>'
  return os.fspath(video)


def mp4_without_index(video: VideoSource) -> bool:
  """Whether `video` is an MP4 / MOV (an 'ftyp' box first) whose top-level boxes, walked from
  the start, end before a complete 'moov' box (the index)."""
  if isinstance(video, (bytes, bytearray, memoryview)):
    stream = io.BytesIO(bytes(video))
  else:
    stream = open(os.fspath(video), 'rb')  # noqa: SIM115 (closed below)
  with stream:
    size = stream.seek(0, io.SEEK_END)
    offset, first = 0, True
    while offset + 8 <= size:
      stream.seek(offset)
      header = stream.read(16)
      length, kind = int.from_bytes(header[:4], 'big'), header[4:8]
      if first and kind != b'ftyp':
        return False
      first = False
      if length == 1 and len(header) == 16:
        length = int.from_bytes(header[8:16], 'big')
      elif length == 0:
        length = size - offset
      if length < 8:
        return True  # a broken box: no index can follow
      if kind == b'moov':
        return offset + length > size
      offset += length
    return not first


def open_video(video: VideoSource):
  """An open PyAV container with at least one video stream, or a VideoError saying why not."""
  name = describe(video)
  if isinstance(video, (bytes, bytearray, memoryview)):
    if len(video) == 0:
      raise VideoError(f'{name}: empty (0 bytes)')
    source = io.BytesIO(bytes(video))
  else:
    path = os.fspath(video)
    if not os.path.exists(path):
      raise VideoError(f'{name}: no such file')
    if os.path.isdir(path):
      raise VideoError(f'{name}: is a directory, not a video file')
    if os.path.getsize(path) == 0:
      raise VideoError(f'{name}: empty (0 bytes)')
    source = path
  try:
    container = av.open(source, mode='r')
  except av.FFmpegError as e:
    if mp4_without_index(video):
      raise VideoError(
        f"{name}: an MP4 cut short before its index (no complete 'moov' box: a download or copy "
        'that stopped early, where the index is written last); nothing in it can be decoded: '
        'fetch it again (an MP4 written with the index in front, ffmpeg -movflags +faststart, '
        'can be read cut short with allow_truncated=True)'
      ) from e
    raise VideoError(f'{name}: not a video PyAV can read ({e.__class__.__name__}: {e})') from e
  if not container.streams.video:
    kinds = sorted({s.type for s in container.streams}) or ['none']
    container.close()
    raise VideoError(f'{name}: no video stream (streams: {", ".join(kinds)})')
  if (
    container.format.name in TEXT_FORMATS
    or container.streams.video[0].codec_context.name in TEXT_CODECS
  ):
    fmt = container.format.name
    container.close()
    raise VideoError(f'{name}: not a video (FFmpeg reads it as text, format {fmt!r})')
  return container


def resize_short_side_centre_crop(rgb_HxWx3: np.ndarray, resolution: int) -> np.ndarray:
  """Shortest side to `resolution` (bicubic), then a centre crop to resolution x resolution."""
  frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb_HxWx3), format='rgb24')
  return _resize_crop_frame(frame, resolution)


def _resize_crop_frame(frame, resolution: int) -> np.ndarray:
  _, new_h, new_w, top, left = crop_box(frame.height, frame.width, resolution)
  rgb = frame.reformat(
    width=new_w, height=new_h, format='rgb24', interpolation='BICUBIC'
  ).to_ndarray()
  return np.ascontiguousarray(rgb[top : top + resolution, left : left + resolution])


def crop_box(height: int, width: int, resolution: int) -> tuple[float, int, int, int, int]:
  """The geometry of `resize_short_side_centre_crop` in source pixels.

  Returns (scale, new_h, new_w, top, left): the source is scaled by `scale` to new_h x new_w and
  the window [top, top + resolution) x [left, left + resolution) of that is kept.
  """
  scale = resolution / min(height, width)
  new_h, new_w = max(resolution, round(height * scale)), max(resolution, round(width * scale))
  return scale, new_h, new_w, (new_h - resolution) // 2, (new_w - resolution) // 2


def decode_frames(
  video: VideoSource, frame_ids: Sequence[int], resolution: int = 224
) -> np.ndarray:
  """RGB uint8 [len(frame_ids), resolution, resolution, 3] of the given frames.

  Frame ids count decoded frames in presentation order from 0. Only frames up to the largest id
  are decoded, and only the wanted ones are converted to RGB. Ids past the end of a short video
  get its last frame (the selection's timeline repeats the last frame the same way).
  """
  ids = np.asarray(frame_ids, dtype=np.int64)
  if ids.size == 0:
    return np.zeros((0, resolution, resolution, 3), np.uint8)
  if ids.min() < 0:
    raise ValueError(f'{describe(video)}: negative frame id {int(ids.min())}')
  wanted = set(int(i) for i in ids)
  last_wanted = int(ids.max())
  got: dict[int, np.ndarray] = {}
  container = open_video(video)
  last_index, last_frame = -1, None
  try:
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'  # plain decoding (no vector export) may use frame threads
    for index, frame in enumerate(container.decode(stream)):
      last_index, last_frame = index, frame
      if index in wanted:
        got[index] = _resize_crop_frame(frame, resolution)
      if index >= last_wanted:
        break
  except av.FFmpegError as e:
    if last_frame is None:
      raise VideoError(f'{describe(video)}: corrupt, no frame could be decoded ({e})') from e
    # A truncated tail: keep what decoded, the rest repeats the last good frame below.
  finally:
    container.close()
  if last_frame is None:
    raise VideoError(f'{describe(video)}: the video stream has no decodable frames')
  tail = got.get(last_index)
  if tail is None:
    tail = _resize_crop_frame(last_frame, resolution)
  return np.stack([got.get(int(i), tail) if i <= last_index else tail for i in ids])
