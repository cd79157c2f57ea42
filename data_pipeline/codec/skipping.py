"""Frames a selection never reads, left undecoded: the disposable B-frames far from every sample.

A selection reads the wanted (sampled) frames and the few frames each may be predicted from
(`bitstream._candidates`); decoding every other frame is needed only where later frames refer
to it. An H.264 picture whose slices are all B slices with nal_ref_idc 0 is a reference of no
picture (a "disposable" B-frame: x264's B-frames outside a B-pyramid, half or more of the
frames of common web video), so where it is neither wanted nor a possible candidate of a wanted
frame, FFmpeg is told to skip it (`skip_frame` NONREF for its packet only) and nothing else
changes: every frame that is decoded gets the same pixels and the same vectors (tests compare
the selections, and the decoded frames, with and without skipping).

The plan comes from one demux pass before decoding (the packet headers only: a few ms against
100 ms or more of decoding), which gives each packet's presentation index (its rank by pts),
its decode index (its place in the stream) and whether it is disposable. A frame that is
skipped still takes its place in the presentation order as an undecoded B-frame (`None` from
`frames`), so indices, decode order and the candidates' search are what a full decode gives.

The decode checks the plan as it goes: the packets must come in the planned order and every
decoded frame at its planned presentation index; if not (a container whose second read
differs, a decoder that drops or adds a frame, a stream that ends early, any decoder error or
frame the decoder flags corrupt: with fewer frames held back a damaged stream's frames come out
otherwise before an error, and a damaged frame's vectors hold whatever the decoder's reused
buffers held), `Mismatch` is raised and the caller decodes again without skipping. Streams
with edit-list trims (packets the demuxer marks discard) are not planned. One difference is
left: damage inside a skipped packet is not seen (a full decode would end the stream there), so
such a clip may get a selection where a full decode gets a shorter stream.
"""

from __future__ import annotations

import heapq
import os
from typing import Iterator, Sequence

import av
import numpy as np

# False decodes every frame (OVE_CODEC_SKIP=0; tests compare both ways).
ENABLED = os.environ.get('OVE_CODEC_SKIP', '1') != '0'
# A plan is made only where the clip has this many frames per wanted frame or more up to the last
# wanted one: each wanted frame needs itself and usually a neighbour, so denser sampling leaves
# next to nothing to skip (a 120-frame clip sampled 64 times skips none) for the pass's cost.
MIN_FRAMES_PER_WANTED = 2
# H.264 NAL unit types: coded slices (non-IDR, IDR), and the extension slices we do not parse.
_SLICE_TYPES = (1, 5)
_EXTENSION_TYPES = (14, 20, 21)
_B_SLICE = 1  # slice_type % 5
_HEADER_BYTES = 24  # enough for first_mb_in_slice and slice_type after emulation prevention


class Mismatch(Exception):
  """The decode went otherwise than the plan said; decode again without skipping."""


def nal_length_size(extradata: bytes | None) -> int:
  """Bytes of each NAL unit's length prefix (avcC extradata, MP4/MKV), 0 for Annex B start
  codes (raw .h264, MPEG-TS)."""
  if extradata and len(extradata) >= 7 and extradata[0] == 1:
    return (extradata[4] & 3) + 1
  return 0


def _nal_units(data: bytes, length_size: int) -> Iterator[tuple[int, bytes]]:
  """(header byte, the first bytes after it) of each NAL unit of an access unit; ValueError
  where the length prefixes do not add up."""
  if length_size:
    pos, end = 0, len(data)
    while pos < end:
      if pos + length_size > end:
        raise ValueError('truncated NAL length')
      size = int.from_bytes(data[pos : pos + length_size], 'big')
      pos += length_size
      if size <= 0 or pos + size > end:
        raise ValueError('NAL length past the packet')
      yield data[pos], data[pos + 1 : pos + 1 + min(size - 1, _HEADER_BYTES)]
      pos += size
    return
  pos = data.find(b'\x00\x00\x01')
  while pos >= 0 and pos + 3 < len(data):
    start = pos + 3
    pos = data.find(b'\x00\x00\x01', start)
    yield data[start], data[start + 1 : start + 1 + _HEADER_BYTES]


def _slice_type(payload: bytes) -> int:
  """slice_type % 5 from the start of a slice header: first_mb_in_slice, then slice_type, both
  unsigned Exp-Golomb codes, read after removing emulation-prevention bytes."""
  raw = payload.replace(b'\x00\x00\x03', b'\x00\x00')
  bits, value, pos = len(raw) * 8, int.from_bytes(raw, 'big'), 0
  code = 0
  for _ in range(2):
    rest = value & ((1 << (bits - pos)) - 1)
    if rest == 0:
      raise ValueError('slice header cut short')
    leading = bits - pos - rest.bit_length()
    width = 2 * leading + 1
    if pos + width > bits:
      raise ValueError('slice header cut short')
    code = ((value >> (bits - pos - width)) & ((1 << width) - 1)) - 1
    pos += width
  return code % 5


def access_unit(data: bytes, length_size: int) -> tuple[bool, bool]:
  """(all its slices are B slices, and it is disposable: also none is a reference) for one
  packet; (False, False) for anything not parsed (extension slices, malformed data)."""
  seen = reference = False
  try:
    for header, payload in _nal_units(data, length_size):
      kind = header & 31
      if kind in _EXTENSION_TYPES:
        return False, False
      if kind in _SLICE_TYPES:
        if _slice_type(payload) != _B_SLICE:
          return False, False
        seen = True
        reference = reference or (header >> 5) & 3 != 0
  except ValueError:
    return False, False
  return seen, seen and not reference


class Plan:
  """What to skip, and what the decode must look like, for one stream and its wanted frames.

  pts[d]: the pts of the packet at decode index d; presentation[d]: its presentation index;
  skip: the pts of the packets to skip."""

  def __init__(self, pts: Sequence[int], all_b: Sequence[bool], disposable, wanted) -> None:
    self.pts = [int(p) for p in pts]
    rank = np.argsort(np.asarray(self.pts), kind='stable')
    presentation = np.empty(len(rank), np.int64)
    presentation[rank] = np.arange(len(rank))
    self.presentation = presentation.tolist()
    decode_of = rank.tolist()  # decode index of each presentation index
    needed = set()
    for w in (int(i) for i in wanted if 0 <= int(i) < len(rank)):
      needed.add(w)
      # An I- or P-frame (or one without vectors) is given the frame before it.
      if not all_b[decode_of[w]]:
        needed.add(w - 1)
      # Per direction the nearest frame decoded earlier is a candidate (`_candidates`).
      for direction in (-1, 1):
        i = w + direction
        while 0 <= i < len(rank):
          if decode_of[i] < decode_of[w]:
            needed.add(i)
            break
          i += direction
    self.skip = {
      self.pts[d] for d in range(len(rank)) if disposable[d] and self.presentation[d] not in needed
    }
    self.index_of_pts = {p: self.presentation[d] for d, p in enumerate(self.pts)}


def plan(container, stream, wanted: Sequence[int]) -> Plan | None:
  """The skipping plan for decoding `stream` of `container` (vector export set, nothing read
  from it yet), or None (and the container untouched) where skipping is off, the stream has no
  reordered frames (no B-frames), sampling is dense, or packets lack distinct pts. Otherwise the
  container has been read once and sought back to its start (Mismatch where it cannot be: the
  caller opens it again)."""
  wanted = np.unique(np.asarray(wanted, np.int64))
  if not ENABLED or wanted.size == 0 or not stream.codec_context.has_b_frames:
    return None
  if int(wanted[-1]) + 1 < MIN_FRAMES_PER_WANTED * wanted.size:
    return None
  length_size = nal_length_size(stream.codec_context.extradata)
  pts, all_b, disposable = [], [], []
  try:
    for packet in container.demux(stream):
      if not packet.size:
        continue
      if packet.pts is None or packet.is_discard:
        # No order to plan by, or an edit list's trimmed frames (the decoder drops them; a
        # skipped one among them would still be counted): decoded in full.
        pts = []
        break
      b, skippable = access_unit(bytes(packet), length_size)
      pts.append(packet.pts)
      all_b.append(b)
      disposable.append(skippable)
  except av.FFmpegError:
    pts = []  # a damaged stream is decoded in full, its error found where a full decode does
  try:
    container.seek(0, stream=stream)
  except (av.FFmpegError, OSError, ValueError) as e:
    raise Mismatch(f'the container cannot go back to its start ({e}): open it again') from e
  if not pts or len(set(pts)) != len(pts) or not any(disposable):
    return None
  found = Plan(pts, all_b, disposable, wanted)
  return found if found.skip else None


def frames(container, stream, plan: Plan) -> Iterator[tuple]:
  """`bitstream.container_frames` with `plan`'s packets skipped: (frame, decode_index) in
  presentation order, (None, decode_index) in a skipped frame's place. Raises Mismatch where
  the stream or the decoder goes otherwise than planned, and at any demuxer or decoder error."""
  context = stream.codec_context
  skipping = False
  waiting: list[tuple[int, int]] = []  # (pts, decode index) of skipped frames not yet placed
  order: dict[int, int] = {}
  placed = 0  # frames handed out so far: the next one's presentation index

  def place_before(pts: float) -> Iterator[tuple]:
    nonlocal placed
    while waiting and waiting[0][0] < pts:
      skipped_pts, decode_index = heapq.heappop(waiting)
      if plan.index_of_pts[skipped_pts] != placed:
        raise Mismatch(f'skipped frame pts {skipped_pts} out of its place')
      placed += 1
      yield None, decode_index

  count = 0
  try:
    for packet in container.demux(stream):
      if packet.size:
        if count >= len(plan.pts) or packet.pts != plan.pts[count]:
          raise Mismatch(f'packet {count} has pts {packet.pts}, the plan says otherwise')
        order[packet.pts] = count
        skip = packet.pts in plan.skip
        if skip != skipping:
          context.skip_frame = 'NONREF' if skip else 'DEFAULT'
          skipping = skip
        if skip:
          heapq.heappush(waiting, (packet.pts, count))
        count += 1
      for frame in packet.decode():
        if frame.is_corrupt:
          # Concealed: its pixels and vectors hold what the decoder's reused buffers held,
          # which skipping changes; the full decode ends the stream before it
          # (`bitstream.frames_with_references`), whatever came out before it.
          raise Mismatch(f'frame pts {frame.pts} is flagged corrupt: decode in full')
        if frame.pts is None or frame.pts not in order:
          raise Mismatch(f'a frame with pts {frame.pts} that no packet of the plan has')
        yield from place_before(frame.pts)
        if plan.index_of_pts.get(frame.pts) != placed:
          raise Mismatch(f'frame pts {frame.pts} decoded at presentation index {placed}')
        placed += 1
        yield frame, order.pop(frame.pts)
  except av.FFmpegError as e:
    # Where a full decode meets an error depends on how many frames the decoder holds back,
    # which skipping changes: the full decode says which frames came out before it.
    raise Mismatch(f'a decoder error ({e}): decode in full') from e
  yield from place_before(float('inf'))
  if count != len(plan.pts) or placed != len(plan.pts):  # the stream ended otherwise
    raise Mismatch(f'{count} of {len(plan.pts)} packets read, {placed} frames placed')
