"""The bitstream side of codec selection: frame counts, H.264 motion vectors, decoding.

Stock FFmpeg exports the coded motion vectors of H.264 through `flags2=+export_mvs` (side data
`MOTION_VECTORS` on each P/B frame) but exports nothing for HEVC or VP9, and no coded residual at
all. So an H.264 source is read as it is, and anything else (or an H.264 source when a fixed GOP
is asked for) is first re-encoded, in memory, to a plain H.264 stream (`transcode`).

What FFmpeg exports does not say *which* frame a vector points to, only the direction (`source`
-1 past, +1 future). `frames_with_references` therefore hands each wanted frame over with a short
list of candidate reference frames per direction, found from presentation and decode order (a
frame can only be predicted from frames decoded before it); `maps.py` keeps the candidate that
predicts the frame best. For the transcoded streams (one reference, no B-frames) the candidate is
always the previous frame, so there is nothing to guess.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import threading
from typing import Callable, Iterable, Iterator, Sequence

import av
import numpy as np

from data_pipeline.codec import maps, release_motion
from data_pipeline.video import VideoError, VideoSource, describe, open_video

# FFmpeg picture types folded onto records.PICTURE_TYPES ('?', 'I', 'P', 'B').
_KIND_OF_PICTURE = {'I': 'I', 'SI': 'I', 'P': 'P', 'SP': 'P', 'S': 'P', 'B': 'B', 'BI': 'B'}
# Pixel formats whose first plane is 8-bit luma we can read without a conversion.
_Y8_FORMATS = frozenset(
  'yuv420p yuvj420p yuv422p yuvj422p yuv444p yuvj444p yuv440p yuvj440p yuv411p yuv410p nv12 nv21'
  ' gray'.split()
)
# x264 allows up to 16 consecutive B-frames, so no reference lies further away than this.
REFERENCE_REACH = 18
# Decoded pictures `frames_with_references` holds before taking their luma (`CodedFrame.picture`).
MAX_PICTURES = 8
# Decoded frames the decoding thread of `prefetched` may run ahead of the analysis.
PREFETCH_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class Probe:
  """What the container says about its first video stream."""

  name: str  # describe(video), for messages
  codec: str  # decoder name: 'h264', 'hevc', 'vp9', ...
  width: int
  height: int
  num_frames: int  # frames in the stream (header count, else counted packets)
  counted: bool  # True when num_frames came from counting packets


def probe(video: VideoSource, keep_open: bool = False):
  """Codec, size and frame count of the first video stream; VideoError if there is none.

  With `keep_open`: (Probe, the open container, nothing read from it yet, or None when the
  count had to be found by demuxing it): opening a file costs a few decoded frames' time
  (FFmpeg probes the stream), so `select` decodes from the container it probed."""
  name = describe(video)
  container = open_video(video)
  keep = False
  try:
    stream = container.streams.video[0]
    ctx = stream.codec_context
    codec, width, height = ctx.name, ctx.width, ctx.height
    num_frames, counted = int(stream.frames or 0), False
    if num_frames <= 0:
      # Matroska/WebM and raw streams carry no count; demuxing (no decoding) is cheap and exact.
      num_frames, counted = _count_packets(container, stream, name), True
    if num_frames <= 0:
      raise VideoError(
        f'{name}: the video stream has no frames (empty, or truncated before the first one)'
      )
    if width <= 0 or height <= 0:
      raise VideoError(f'{name}: the video stream has no frame size ({width}x{height})')
    keep = keep_open and not counted
  finally:
    if not keep:
      container.close()
  info = Probe(name, codec, width, height, num_frames, counted)
  return (info, container if keep else None) if keep_open else info


def _count_packets(container, stream, name: str) -> int:
  count = 0
  try:
    for packet in container.demux(stream):
      if packet.size:
        count += 1
  except av.FFmpegError as e:
    if count == 0:
      raise VideoError(f'{name}: corrupt, no packet could be read ({e})') from e
  return count


def timeline(num_source_frames: int, num_frames: int) -> np.ndarray:
  """floor(linspace(0, N-1, T)) in presentation order; with N < T frames repeat."""
  return np.floor(np.linspace(0, num_source_frames - 1, num_frames)).astype(np.int64)


@dataclasses.dataclass
class CodedFrame:
  """One decoded picture, as much of it as the analysis needs."""

  index: int  # presentation index, counting decoded frames from 0
  decode_index: int  # position in decode order; -1 when the packets carry no pts
  kind: str  # 'I', 'P', 'B' or '?'
  luma: np.ndarray | None  # [H/step, W/step] luma at the analysis resolution (float32), once
  # taken (`analysis_luma`); None for frames far from every wanted one
  vectors: np.ndarray | None  # the MOTION_VECTORS structured array (or None, see `grids`)
  height: int = 0  # the coded frame's size
  width: int = 0
  picture: object = None  # the decoded av frame while its luma is not taken yet
  step: int = 1  # the block average `analysis_luma` applies
  # Wanted decoded frames: their vectors painted on the cell grid when decoded, (past, future)
  # `maps.VectorGrid`s over the analysed area, read from the side data where it lies (no copy
  # of the records is kept), and whether any record points to the future.
  grids: tuple | None = None
  future_vectors: bool = False
  llava_l0: object = None  # the list-0 vectors on the LLaVA reader's grid, when asked for

  @property
  def has_vectors(self) -> bool:
    return self.vectors is not None or self.grids is not None

  def vector_grid(self, direction: int, height: int, width: int) -> maps.VectorGrid:
    """The blocks of one direction (-1 past, +1 future) on the cell grid of a height x width
    area (`maps.paint_vectors`), painted at decode time where they were."""
    if self.grids is not None:
      return self.grids[direction > 0]
    return maps.paint_vectors(self.vectors, height, width, direction)

  @property
  def is_anchor(self) -> bool:
    return self.kind in ('I', 'P')

  @property
  def has_luma(self) -> bool:
    return self.luma is not None or self.picture is not None

  def analysis_luma(self) -> np.ndarray | None:
    """The luma at the analysis resolution, taken from the decoded picture on first use (then
    the picture is let go): most frames near a wanted one are never a reference of one."""
    if self.luma is None and self.picture is not None:
      self.luma = maps.downscale(luma_of(self.picture), self.step)
      self.picture = None
    return self.luma


def motion_vectors(frame):
  """The frame's MOTION_VECTORS side data (PyAV's MotionVectors), or None.

  Read through a side-data container of our own, not `frame.side_data`: that one is cached on
  the frame and refers back to it, a reference cycle that keeps every frame read so (and its
  decoded picture) alive until the garbage collector's next pass. Meanwhile the decoder
  allocates fresh pictures: on a 720p clip 15-30 thousand page faults more per decode, and
  about a tenth more decoding time (measured with PyAV 18.1)."""
  container = _SIDE_DATA_CONTAINER(frame) if _SIDE_DATA_CONTAINER else frame.side_data
  return container.get('MOTION_VECTORS')


def _side_data_container():
  try:
    from av.sidedata.sidedata import SideDataContainer
  except ImportError:  # another PyAV layout: the frame's own (cached) container
    return None
  return SideDataContainer


_SIDE_DATA_CONTAINER = _side_data_container()


def luma_of(frame) -> np.ndarray:
  """The 8-bit luma plane of a decoded frame, uint8 [H, W]: for 8-bit YUV frames a view of the
  frame's own buffer (no copy; valid while `frame` is, so callers keep what they derive from
  it, as `maps.downscale` does), else a gray conversion."""
  h, w = frame.height, frame.width
  if frame.format.name in _Y8_FORMATS:
    plane = frame.planes[0]
    return np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:h, :w]
  return frame.reformat(format='gray').to_ndarray()


def _kind(frame) -> str:
  code = frame.pict_type
  kind = _KIND_OF_CODE.get(code)
  if kind is None:  # first sight of this code: look its name up once (an enum per frame costs)
    try:
      name = av.video.frame.PictureType(code).name
    except ValueError:
      name = ''
    kind = _KIND_OF_CODE[code] = _KIND_OF_PICTURE.get(name, '?')
  return kind


_KIND_OF_CODE: dict = {}  # PyAV's pict_type -> 'I', 'P', 'B' or '?'


def decoded_frames(packets: Iterable, decode: Callable) -> Iterator[tuple]:
  """(frame, decode_index) in presentation order, `decode(packet)` giving frames per packet.

  The decode index of a frame is the position of its packet in the stream, found by pts (the
  decoder hands frames back reordered, tagged with the pts of the packet they came from).
  """
  order: dict[int, int] = {}
  count = 0
  for packet in packets:
    if packet is not None and packet.size and packet.pts is not None:
      order[packet.pts] = count
      count += 1
    for frame in decode(packet):
      pts = frame.pts
      yield frame, (order.pop(pts, -1) if pts is not None else -1)


class Decoded:
  """How far a `frames_with_references` run got (read after the generator is exhausted)."""

  def __init__(self):
    self.count = 0  # frames decoded
    self.error: Exception | None = None  # a decoder error that ended the stream early
    self.skipped = 0  # of `count`, frames left undecoded (`skipping`)


def frames_with_references(
  frames: Iterable[tuple],
  wanted: Sequence[int],
  decoded: Decoded,
  step: int = 1,
  reach: int = REFERENCE_REACH,
  max_pictures: int = MAX_PICTURES,
  llava: bool = False,
) -> Iterator[tuple]:
  """For each wanted presentation index: (frame, past candidates, future candidates).

  `frames` yields (av frame, decode_index) as `decoded_frames` does, from a decoder with vector
  export on, or (None, decode_index) for a frame left undecoded (`skipping.frames`). Wanted
  frames come out in increasing index order. Candidates per direction, nearest first, are
  frames decoded before this one: the nearest such frame and the nearest I/P frame (for
  P-frames only the latter; with B-pyramids a B-frame may reference another B). An I-frame
  gets its predecessor as the 'past' candidate, used with zero vectors (a frame difference).
  Decoding stops once the last wanted frame is out, so only the needed prefix is decoded.
  Luma is taken block-averaged by `step` (maps.downscale) when first used, from the decoded
  picture the frame holds until then (at most `max_pictures` of them are held). `llava`: wanted
  frames also get their list-0 vectors on the LLaVA reader's grid (`CodedFrame.llava_l0`).
  """
  wanted_sorted = np.unique(np.asarray(wanted, dtype=np.int64))
  if wanted_sorted.size == 0:
    return
  wanted_set = set(int(i) for i in wanted_sorted)
  last_wanted = int(wanted_sorted[-1])
  window: dict[int, CodedFrame] = {}
  pending: list[CodedFrame] = []
  deferred: list[CodedFrame] = []  # frames holding their decoded picture, oldest first

  # Frames within `reach` of a wanted one (their luma may be a candidate reference's).
  near = np.zeros(last_wanted + reach + 1, bool)
  for i in wanted_sorted:
    near[max(int(i) - reach, 0) : int(i) + reach + 1] = True
  near = near.tolist()

  def near_wanted(i: int) -> bool:
    return i < len(near) and near[i]

  def release(frame: CodedFrame):
    return frame, _candidates(frame, window, -1), _candidates(frame, window, +1)

  def needs_future(frame: CodedFrame) -> bool:
    return frame.kind == 'B' or frame.future_vectors

  try:
    for index, (frame, decode_index) in enumerate(frames):
      if frame is not None and frame.is_corrupt:  # concealed: parts come from reused buffers,
        decoded.error = VideoError(f'frame {index} decodes with errors (concealed)')
        break  # which differ run to run; the stream ends here, as at a decoder error
      decoded.count = index + 1
      is_wanted = index in wanted_set
      if frame is None:  # a disposable B-frame left undecoded (`skipping`): never wanted
        coded = CodedFrame(index, decode_index, 'B', None, None)
        decoded.skipped += 1
      else:
        picture = frame if near_wanted(index) else None
        kind, height, width = _kind(frame), frame.height, frame.width
        coded = CodedFrame(index, decode_index, kind, None, None, height, width, picture, step)
      if is_wanted:
        side = motion_vectors(frame)
        if side is not None:
          # A view of the frame's side data, painted now (the analysed area: whole blocks of
          # `step`, as `maps.downscale` keeps) and let go: no copy of the records.
          records = side.to_ndarray()
          height, width = frame.height // step * step, frame.width // step * step
          grids = maps.paint_directions(records, height, width)
          coded.grids, coded.future_vectors = grids[:2], grids[2]
          if llava:  # the reader's grid of the whole decoded frame (`release_motion`)
            coded.llava_l0 = release_motion.llava_paint(records, frame.height, frame.width)
      window[index] = coded
      if coded.picture is not None:
        # At most `max_pictures` decoded pictures are held (the decoder's buffer pool grows
        # with them); past that the oldest one's luma is taken now.
        deferred.append(coded)
        while len(deferred) > max_pictures:
          deferred.pop(0).analysis_luma()
      if coded.is_anchor:
        # Every pending B-frame before this anchor now has all its future candidates in view.
        while pending:
          yield release(pending.pop(0))
      # Without picture types (no anchors) nothing further than `reach` can be a reference.
      while pending and pending[0].index < index - reach:
        yield release(pending.pop(0))
      if is_wanted:
        if needs_future(coded):
          pending.append(coded)
        else:
          yield release(coded)
      if index >= last_wanted and not pending:
        return
      _prune(window, min([p.index for p in pending] + [index]))
      deferred[:] = [f for f in deferred if f.picture is not None and window.get(f.index) is f]
  except av.FFmpegError as e:
    decoded.error = e
  # End of stream (or a decoder error): pending frames get the candidates that exist.
  while pending:
    yield release(pending.pop(0))


def _candidates(frame: CodedFrame, window: dict, direction: int) -> list[CodedFrame]:
  if frame.kind == 'I' or (not frame.has_vectors and frame.kind != 'B'):
    if direction > 0:
      return []
    previous = window.get(frame.index - 1)
    return [previous] if previous is not None and previous.has_luma else []
  nearest = anchor = None
  i = frame.index + direction
  while i in window:
    other = window[i]
    if frame.decode_index < 0 or other.decode_index < 0 or other.decode_index < frame.decode_index:
      nearest = nearest or other
      if other.is_anchor:
        anchor = other
        break
    i += direction
  if frame.kind == 'B':
    found = [nearest, anchor]
  elif direction < 0:
    found = [anchor or nearest]
  else:
    found = [nearest]
  out = []
  for other in found:
    if other is not None and other.has_luma and all(other is not o for o in out):
      out.append(other)
  return out


def _prune(window: dict, lowest_needed: int, cap: int = 64):
  # Keep the latest I/P frame before the oldest frame still to be analysed, and all after it.
  keep_from = lowest_needed - cap
  for i in range(lowest_needed - 1, lowest_needed - cap, -1):
    other = window.get(i)
    if other is None:
      break
    if other.is_anchor:
      keep_from = i
      break
  for i in [i for i in window if i < keep_from]:
    del window[i]


def open_with_vectors(video: VideoSource, container=None):
  """(container, stream) of the first video stream: vector export on, no frame threads.
  `container`: one already open on `video` and not read from (`probe(keep_open=True)`)."""
  container = container or open_video(video)
  stream = container.streams.video[0]
  # Frame threads make the exported vectors differ from run to run; slice threads do not.
  stream.thread_type = 'SLICE'
  if select_threads() == 1:
    # One thread allowed (precompute's workers): no pool of slice threads, whose start and
    # hand-offs cost CPU time even where a frame is one slice (2-3% of a 720p clip's decode).
    stream.thread_count = 1
  stream.codec_context.options = {'flags2': '+export_mvs'}
  return container, stream


def container_frames(container, stream) -> Iterator[tuple]:
  return decoded_frames(container.demux(stream), lambda packet: packet.decode())


# The decoding thread is started when the decoder has this many pixels to decode per pixel the
# analysis reads (frames up to the last sample x their size, against the analysed frames at the
# analysis size): a clip of 1.5x its timeline's frames, or twice the analysis size. Below it (a
# 64-frame clip at 224 pixels) the overlap measured no faster, at 15-30% more CPU time.
DECODE_THREAD_SHARE = 1.5
SELECT_THREADS_VARIABLE = 'OVE_SELECT_THREADS'


def select_threads() -> int:
  """The threads one selection may use: $OVE_SELECT_THREADS when set (precompute's workers
  run with 1: the processes are the parallelism), else the CPUs this process may use."""
  value = os.environ.get(SELECT_THREADS_VARIABLE, '').strip()
  if not value:
    return _usable_cpus()
  if not value.isdigit() or int(value) < 1:
    raise ValueError(
      f'{SELECT_THREADS_VARIABLE}={value!r}: allowed values are integers >= 1 (1: decode and '
      'analyse on one thread), or unset'
    )
  return int(value)


@functools.cache
def _usable_cpus() -> int:
  from data_pipeline import workers

  return workers.usable_cpus()


def prefetched(frames: Iterable, depth: int = PREFETCH_DEPTH) -> Iterator:
  """The items of `frames`, produced on a thread of their own up to `depth` ahead.

  FFmpeg decodes with the GIL released and the analysis kernels run without it, so decoding the
  next frames overlaps the analysis of this one: the same items in the same order, from one
  decoder, so the same selection. An exception `frames` raises is raised here, after the items
  before it. Closing this generator (its end, an error downstream, or `.close()`) stops and
  joins the thread, which closes `frames` (when it has a `close`) in it: close this before the
  container it reads. By then the thread has taken at most `depth` + 1 items past the last one
  handed over. A generator closed before its first item starts no thread and leaves `frames`
  as it is."""
  items = iter(frames)
  slots: queue.Queue = queue.Queue(depth)
  stop = threading.Event()
  end = object()

  def hand_over(item) -> bool:
    while not stop.is_set():
      try:
        slots.put(item, timeout=0.5)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      while not stop.is_set():  # checked before each item: nothing is decoded once stopped
        try:
          item = next(items)
        except StopIteration:
          hand_over((end, None))
          return
        if not hand_over((item, None)):
          return
    except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which raises it
      hand_over((end, e))
    finally:
      close = getattr(items, 'close', None)
      if close is not None:
        close()

  thread = threading.Thread(target=produce, name='ove-decode', daemon=True)
  thread.start()
  try:
    while True:
      item, error = slots.get()
      if item is end:
        if error is not None:
          raise error
        return
      yield item
  finally:
    stop.set()
    while True:  # free a slot the thread may be waiting on
      try:
        slots.get_nowait()
      except queue.Empty:
        break
    thread.join()
