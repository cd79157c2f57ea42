"""The libx264 transcode of codec selection: sources without exported vectors (anything but
H.264), or an H.264 source when a fixed GOP is asked for, are re-encoded in memory to a plain
H.264 stream (fixed GOP, no scene-cut I-frames, no B-frames, one reference frame) whose vectors
`bitstream` then reads. `encode_h264` re-encodes the sampled frames only (motion between
samples, as the release's training data measures it); `transcode_segment` every source frame
from the first sample to the last (motion between source frames, as the release's probe data
re-encodes whole clips); `paired_sequence` each sample after
the source frame before it (motion between source frames at the samples, at twice the sampled
cost); option `transcode`.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Iterator, Sequence

import av
import numpy as np

from data_pipeline.codec.bitstream import Decoded, decoded_frames
from data_pipeline.video import VideoSource, open_video

TRANSCODE_FPS = 25


def analysis_size(height: int, width: int, short_side: int) -> tuple[int, int]:
  """Transcode size: short side down to `short_side` (never up), both even and at least 16."""
  scale = min(1.0, short_side / min(height, width))

  def even(x: float) -> int:
    return max(16, 2 * int(round(x * scale / 2)))

  return even(height), even(width)


def scaled_frames(
  video: VideoSource, frame_ids: Sequence[int], height: int, width: int, decoded: Decoded
) -> Iterator[tuple]:
  """(index, yuv420p VideoFrame at height x width) of the wanted frames, in order, decoded with
  frame threads up to the last one; `decoded` says how far decoding got (frames past the end of
  a short or truncated stream are simply not yielded)."""
  wanted = set(int(i) for i in frame_ids)
  last = max(wanted)
  container = open_video(video)
  try:
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'  # no vectors are read here, so frame threads are fine
    for index, frame in enumerate(container.decode(stream)):
      decoded.count = index + 1
      if index in wanted:
        yield (
          index,
          frame.reformat(width=width, height=height, format='yuv420p', interpolation='AREA'),
        )
      if index >= last:
        break
  except av.FFmpegError as e:
    decoded.error = e
  finally:
    container.close()


def read_frames(
  video: VideoSource, frame_ids: Sequence[int], height: int, width: int
) -> tuple[dict, int, Exception | None]:
  """The wanted frames as yuv420p VideoFrames at height x width, decoded with frame threads.

  Returns ({index: frame}, frames decoded, decoder error or None); frames past the end of a
  short or truncated stream are missing from the dict.
  """
  decoded = Decoded()
  got = dict(scaled_frames(video, frame_ids, height, width, decoded))
  return got, decoded.count, decoded.error


def x264_params(gop: int) -> str:
  # Fixed GOP, no scene-cut I-frames, no B-frames, one reference: every P-frame's vectors point
  # at the previous sampled frame. No weighted prediction, so MC(Y_ref) needs no weights.
  # One thread: x264's output depends on its thread count, so on the machine. mbtree=0: the
  # macroblock-tree is the part of x264 seen to vary from run to run (with B-frames).
  return (
    f'keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:ref=1:weightp=0:'
    f'partitions=p8x8,p4x4,i8x8,i4x4:mbtree=0:threads=1:lookahead-threads=1:'
    f'sliced-threads=0'
  )


def h264_encoder(width: int, height: int, gop: int, crf: int):
  """A single-threaded libx264 context with the transcode's settings (`x264_params`)."""
  encoder = av.CodecContext.create('libx264', 'w')
  encoder.width, encoder.height, encoder.pix_fmt = width, height, 'yuv420p'
  encoder.time_base = Fraction(1, TRANSCODE_FPS)
  encoder.framerate = Fraction(TRANSCODE_FPS)
  encoder.thread_count = 1
  encoder.options = {'preset': 'veryfast', 'crf': str(crf), 'x264-params': x264_params(gop)}
  return encoder


def encode_frame(encoder, frame, index: int, intra: bool = False) -> list:
  """Packets of one yuv420p frame at transcode position `index` (forced intra with `intra`)."""
  # A decoded frame keeps its source picture type, which libx264 would obey as a forced type.
  frame.pict_type = av.video.frame.PictureType.I if intra else av.video.frame.PictureType.NONE
  frame.pts = index
  frame.time_base = encoder.time_base
  return list(encoder.encode(frame))


def encode_h264(frames: Sequence, gop: int, crf: int, intra: Sequence[int] | None = None) -> list:
  """libx264 packets of yuv420p VideoFrames (all the same size), in memory: an I-frame every
  `gop` frames, or exactly at the positions `intra` when given."""
  keyint = gop if intra is None else len(frames) + 2
  forced = set() if intra is None else set(int(i) for i in intra)
  encoder = h264_encoder(frames[0].width, frames[0].height, keyint, crf)
  packets = []
  for i, frame in enumerate(frames):
    packets.extend(encode_frame(encoder, frame, i, i in forced))
  packets.extend(encoder.encode(None))
  return packets


def paired_sequence(frame_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """The 'paired' transcode's source frames: each sampled frame (sorted, distinct) preceded by
  the source frame just before it (when that is not itself a sample). Returns (source ids of
  the sequence, the samples' positions in it): each sample's P-frame then measures one source
  frame's step, at twice the frames of the sampled transcode whatever the clip's length."""
  ids = np.asarray(frame_ids, np.int64)
  sequence, positions = [], []
  for k, i in enumerate(ids):
    if k and i - 1 > ids[k - 1]:
      sequence.append(int(i) - 1)
    positions.append(len(sequence))
    sequence.append(int(i))
  return np.array(sequence, np.int64), np.array(positions, np.int64)


def intra_positions(
  distinct: np.ndarray, wanted: np.ndarray, gop: int, mode: str, keyframes: str = 'samples'
) -> np.ndarray | None:
  """Where the 'paired' / 'sampled' transcode codes I-frames (positions in its sequence; None:
  x264's own GOP, every gop-th frame): on every gop-th sample, or (`keyframes='source'`) on the
  samples that are source frames 0, gop, 2 gop, ...: where a re-encode of the whole source
  with that GOP has its keyframes, as the release's probe reads its GOP-16 HEVC files."""
  if keyframes == 'source':
    return wanted[np.asarray(distinct) % gop == 0]
  return wanted[::gop] if mode == 'paired' else None


def transcode_segment(
  video: VideoSource,
  frame_ids: Sequence[int],
  height: int,
  width: int,
  gop: int,
  crf: int,
  keyframes: str = 'samples',
) -> tuple[list, int, Exception | None]:
  """The source-faithful transcode: every source frame from the first to the last of
  `frame_ids` (sorted, distinct) re-encoded at height x width, streamed (decode, scale,
  encode, one frame in memory at a time).

  So that the picture types of the sampled frames are those of the sampled transcode, the
  sampled frames k * gop (k = 0, 1, ...) are forced intra and x264 places no other I-frame:
  the two transcodes differ only in what a P-frame's vectors measure (the step from the source
  frame before, not from the sample before). `keyframes='source'`: the source frames 0, gop,
  2 gop, ... are intra instead (a whole-source re-encode's keyframes, `intra_positions`).
  Transcode position i is source frame frame_ids[0] + i. Returns (packets, source frames
  decoded, decoder error or None).
  """
  ids = np.asarray(frame_ids, np.int64)
  first, last = int(ids[0]), int(ids[-1])
  intra = set(int(i) for i in ids[::gop])
  if keyframes == 'source':
    intra = set(range(-(-first // gop) * gop, last + 1, gop))
  encoder = h264_encoder(width, height, last - first + 2, crf)
  packets, decoded = [], Decoded()
  for index, frame in scaled_frames(video, range(first, last + 1), height, width, decoded):
    packets.extend(encode_frame(encoder, frame, index - first, index in intra))
  packets.extend(encoder.encode(None))
  return packets, decoded.count, decoded.error


def h264_packet_frames(packets: Sequence) -> Iterator[tuple]:
  """(frame, decode_index) of an in-memory H.264 packet list, with vector export."""
  decoder = av.CodecContext.create('h264', 'r')
  decoder.thread_type = 'SLICE'
  decoder.options = {'flags2': '+export_mvs'}
  return decoded_frames(list(packets) + [None], decoder.decode)
