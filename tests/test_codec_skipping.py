"""Disposable B-frames left undecoded (data_pipeline/codec/skipping.py): the slice-header reading
against FFmpeg's own decisions, the frames that are decoded against a full decode, and whole
selections with and without skipping, bit for bit, the fallback included."""

import hashlib
import io

import av
import numpy as np
import pytest

from data_pipeline import codec, synthetic
from data_pipeline.codec import bitstream, skipping


@pytest.fixture(scope='module')
def clips():
  """H.264 MP4s with B-frames: 3 consecutive ones (x264's B-pyramid makes the middle one a
  reference), 1 (all disposable), and one with none."""
  return {
    'b3': synthetic.make_clip(5, num_frames=160, bframes=3, background='pan').data,
    'b1': synthetic.make_clip(6, num_frames=120, bframes=1, num_objects=2).data,
    'b0': synthetic.make_clip(7, num_frames=120, bframes=0).data,
  }


def to_mpegts(data: bytes) -> bytes:
  """The same packets in MPEG-TS: Annex B start codes instead of MP4's length prefixes."""
  return remux(data, 'mpegts')


def decode(data: bytes, skip_everywhere: bool = False) -> dict:
  """pts -> (picture type, luma digest, vectors digest) of every decoded frame."""
  container, stream = bitstream.open_with_vectors(data)
  if skip_everywhere:
    stream.codec_context.skip_frame = 'NONREF'
  out = {}
  for packet in container.demux(stream):
    for frame in packet.decode():
      out[frame.pts] = describe_frame(frame)
  container.close()
  return out


def describe_frame(frame) -> tuple:
  luma = hashlib.sha256(bitstream.luma_of(frame).tobytes()).hexdigest()
  side = frame.side_data.get('MOTION_VECTORS')
  vectors = None
  if side is not None:
    # The named fields only: the records' padding bytes differ from run to run.
    records = side.to_ndarray()
    fields = ('source', 'w', 'h', 'src_x', 'src_y', 'dst_x', 'dst_y', 'motion_x', 'motion_y')
    vectors = hashlib.sha256(b''.join(records[f].tobytes() for f in fields)).hexdigest()
  return frame.pict_type, luma, vectors


@pytest.mark.parametrize('name', ['b3', 'b1'])
@pytest.mark.parametrize('wrap', ['mp4', 'mpegts'])
def test_access_units_read_as_ffmpeg_decides(clips, name, wrap):
  """The packets read as disposable are exactly those FFmpeg's NONREF skips, and those read as
  all-B are exactly its B-frames, in MP4 (length prefixes) and MPEG-TS (start codes)."""
  data = clips[name] if wrap == 'mp4' else to_mpegts(clips[name])
  container = av.open(io.BytesIO(data))
  stream = container.streams.video[0]
  length_size = skipping.nal_length_size(stream.codec_context.extradata)
  assert length_size == (4 if wrap == 'mp4' else 0)
  read = {
    p.pts: skipping.access_unit(bytes(p), length_size) for p in container.demux(stream) if p.size
  }
  container.close()
  full, kept = decode(data), decode(data, skip_everywhere=True)
  disposable = {pts for pts, (_, d) in read.items() if d}
  assert disposable == set(full) - set(kept) and disposable
  b_frames = {
    pts for pts, (kind, *_) in full.items() if av.video.frame.PictureType(kind).name == 'B'
  }
  assert {pts for pts, (all_b, _) in read.items() if all_b} == b_frames
  # What is kept decodes to the same pixels and vectors as in the full decode.
  assert all(full[pts] == value for pts, value in kept.items())


def bits(*values: int) -> bytes:
  """first_mb_in_slice, slice_type, ... as unsigned Exp-Golomb codes, padded with ones."""
  code = ''.join('0' * ((v + 1).bit_length() - 1) + format(v + 1, 'b') for v in values)
  code += '1' * (-len(code) % 8)
  return int(code, 2).to_bytes(len(code) // 8, 'big')


@pytest.mark.parametrize('first_mb', [0, 1, 5, 3599, 8159])
@pytest.mark.parametrize('slice_type', range(10))
def test_slice_type(first_mb, slice_type):
  assert skipping._slice_type(bits(first_mb, slice_type, 0)) == slice_type % 5


def test_slice_type_after_emulation_prevention():
  """A stream writes 0x00 0x00 0x03 where two zero bytes meet a byte <= 3; the 3 is not part of
  the header. first_mb_in_slice 2**23 - 1 codes as 23 zeros, a one and 23 zeros: two such
  places before slice_type."""
  raw = bits(2**23 - 1, 6, 0)
  assert raw.startswith(b'\x00\x00\x01\x00\x00\x00')
  escaped, zeros = bytearray(), 0
  for byte in raw:
    if zeros >= 2 and byte <= 3:
      escaped.append(3)
      zeros = 0
    escaped.append(byte)
    zeros = zeros + 1 if byte == 0 else 0
  assert escaped.count(3) >= 2 + raw.count(3)
  assert skipping._slice_type(bytes(escaped)) == 1


@pytest.mark.parametrize(
  'data,length_size',
  [
    (b'', 4),
    (b'\x00\x00\x00\x09\x01', 4),  # a length past the packet
    (b'\x00\x00', 4),  # a cut length
    (b'\x00\x00\x00\x02\x01\x00', 4),  # a B-looking slice whose header is all zeros
    (b'\x00\x00\x00\x03\x14\xff\xff', 4),  # an extension slice (type 20)
    (b'\x00\x00\x01\x09\xf0', 0),  # an access unit delimiter only: no slice
  ],
)
def test_what_is_not_understood_is_decoded(data, length_size):
  assert skipping.access_unit(data, length_size) == (False, False)


def selection_digest(selection) -> str:
  digest = hashlib.sha256()
  for array in (
    selection.scores,
    selection.positions,
    selection.frame_ids,
    selection.picture_types,
    selection.whole_frames,
  ):
    digest.update(np.ascontiguousarray(array).tobytes())
  digest.update(repr((selection.vectors_past, selection.vectors_future)).encode())
  return digest.hexdigest()


def both_ways(monkeypatch, data, **options):
  with monkeypatch.context() as patch:
    patch.setattr(skipping, 'ENABLED', False)
    full = codec.select(data, **options)
  assert full.skipped_frames == 0
  return full, codec.select(data, **options)


@pytest.mark.parametrize(
  'name,options',
  [
    ('b3', {}),
    ('b3', {'num_frames': 16, 'decode_thread': True}),
    ('b3', {'num_frames': 24, 'camera_compensation': 'median', 'policy': 'zero'}),
    ('b1', {'num_frames': 32}),
    (
      'b1',
      {
        'preset': 'release_llava',
        'num_frames': 24,
        'resolution': 576,
        'patch_size': 16,
        'budget': 3888,
      },
    ),
  ],
)
def test_selections_are_the_same_with_frames_skipped(monkeypatch, clips, name, options):
  full, skipped = both_ways(monkeypatch, clips[name], **options)
  assert skipped.skipped_frames > 0
  assert selection_digest(skipped) == selection_digest(full)


def test_real_footage_with_b_pyramid(monkeypatch, clips):
  """MPEG-TS (start codes, 90 kHz pts) of the B-pyramid clip, sampled sparsely."""
  full, skipped = both_ways(monkeypatch, to_mpegts(clips['b3']), num_frames=20)
  assert skipped.skipped_frames > 0
  assert selection_digest(skipped) == selection_digest(full)


def test_no_plan_without_b_frames_or_for_dense_sampling(monkeypatch, clips):
  assert codec.select(clips['b0'], num_frames=16).skipped_frames == 0
  # 64 samples of 120 frames: every frame is wanted or a candidate's neighbour; no pass made.
  container, stream = bitstream.open_with_vectors(clips['b1'])
  assert skipping.plan(container, stream, bitstream.timeline(120, 64)) is None
  assert skipping.plan(container, stream, bitstream.timeline(120, 16)) is not None
  container.close()


@pytest.mark.parametrize('decode_thread', [False, True])
def test_a_decode_that_goes_otherwise_is_done_again_in_full(monkeypatch, clips, decode_thread):
  """A plan that does not fit what the decoder gives (here: a frame late in the clip said to be
  elsewhere) makes the selection decode everything again: the same result as a full decode."""
  made = skipping.plan

  def wrong(container, stream, wanted):
    found = made(container, stream, wanted)
    last = max(found.index_of_pts, key=found.index_of_pts.get)
    found.index_of_pts[last] += 1
    return found

  full, _ = both_ways(monkeypatch, clips['b3'], num_frames=16, decode_thread=decode_thread)
  monkeypatch.setattr(skipping, 'plan', wrong)
  again = codec.select(clips['b3'], num_frames=16, decode_thread=decode_thread)
  assert again.skipped_frames == 0
  assert selection_digest(again) == selection_digest(full)


def test_skipped_frames_hold_their_place(clips):
  """`skipping.frames` hands over every decoded frame as a full decode does, at its index and
  decode index, and None exactly where the plan skips."""
  data = clips['b3']
  container, stream = bitstream.open_with_vectors(data)
  reference = [
    (frame.pts, describe_frame(frame), order)
    for frame, order in bitstream.container_frames(container, stream)
  ]
  container.close()
  container, stream = bitstream.open_with_vectors(data)
  plan = skipping.plan(container, stream, bitstream.timeline(len(reference), 12))
  got = list(skipping.frames(container, stream, plan))
  container.close()
  assert len(got) == len(reference)
  for (frame, order), (pts, described, full_order) in zip(got, reference):
    assert order == full_order
    if frame is None:
      assert pts in plan.skip
    else:
      assert pts not in plan.skip and describe_frame(frame) == described
  assert sum(frame is None for frame, _ in got) == len(plan.skip) > 0


def remux(data: bytes, format_name: str, options: dict | None = None, path=None) -> bytes:
  """The same packets in another container (into `path` where the muxer rewrites its output:
  MP4's faststart)."""
  source = av.open(io.BytesIO(data))
  stream = source.streams.video[0]
  out_buffer = io.BytesIO() if path is None else str(path)
  out = av.open(out_buffer, 'w', format=format_name, options=options or {})
  target = out.add_stream_from_template(stream)
  for packet in source.demux(stream):
    if packet.size:
      packet.stream = target
      out.mux(packet)
  out.close()
  source.close()
  return out_buffer.getvalue() if path is None else path.read_bytes()


def outcomes_both_ways(monkeypatch, data, **options):
  """([the outcome of select(data) without skipping, with it], every plan `skipping.plan` made):
  an outcome is the selection's digest, truncation and frame count, or its VideoError."""
  made, plans = skipping.plan, []
  monkeypatch.setattr(skipping, 'plan', lambda *args: plans.append(made(*args)) or plans[-1])
  outcomes = []
  for enabled in (False, True):
    monkeypatch.setattr(skipping, 'ENABLED', enabled)
    try:
      selection = codec.select(data, **options)
      outcomes.append(
        (selection_digest(selection), selection.truncated, selection.num_source_frames)
      )
    except codec.VideoError as e:
      outcomes.append((type(e), str(e)))
  return outcomes, plans


@pytest.mark.parametrize('keep', [0.55, 0.8])
def test_a_clip_cut_short_gets_what_a_full_decode_gives(monkeypatch, tmp_path, clips, keep):
  """An MP4 with its index first, cut short: it promises frames that are not there. With
  skipping the plan's pass ends where the data does; the selection (allow_truncated) or the
  error is the full decode's."""
  whole = remux(clips['b3'], 'mp4', {'movflags': 'faststart'}, tmp_path / 'whole.mp4')
  data = whole[: int(len(whole) * keep)]
  outcomes, plans = outcomes_both_ways(monkeypatch, data, num_frames=16, allow_truncated=True)
  assert outcomes[0] == outcomes[1]
  assert any(plan is not None for plan in plans)  # a skipping decode was tried


def test_the_speed_bench_says_how_many_frames_were_skipped(capsys):
  from ove_jax_tools import bench_selection

  argv = ['--speed', '--clips', '1', '--frames', '16', '--source-frames', '64', '--bframes', '2']
  assert bench_selection.main(argv + ['--repeat', '1']) == 0
  row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('| synth'))
  assert int(row.strip('|').split('|')[-2]) > 0  # of 64 frames with B-frames, 16 sampled


def trim_edit_list(data: bytes, drop: int, frames: int) -> bytes:
  """The MP4 with its one edit (version 0) ending `drop` frames before the media does: the
  demuxer marks those packets discard and a decoder outputs nothing for them."""
  at = data.index(b'elst')
  assert data[at + 4] == 0 and int.from_bytes(data[at + 8 : at + 12], 'big') == 1
  duration = int.from_bytes(data[at + 12 : at + 16], 'big')
  shorter = (duration * (frames - drop) // frames).to_bytes(4, 'big')
  return data[: at + 12] + shorter + data[at + 16 :]


@pytest.mark.parametrize('allow_truncated', [False, True])
def test_an_edit_list_that_trims_frames_is_decoded_in_full(monkeypatch, allow_truncated):
  """Packets the demuxer marks discard (an edit list ending before the media) give no frame in a
  full decode; a skipped one among them would still have been counted: no plan is made, and the
  outcome is the full decode's."""
  data = trim_edit_list(synthetic.make_clip(11, num_frames=61, bframes=2).data, 3, 61)
  container = av.open(io.BytesIO(data))
  assert any(p.is_discard for p in container.demux(container.streams.video[0]) if p.size)
  container.close()
  outcomes, plans = outcomes_both_ways(
    monkeypatch, data, num_frames=16, allow_truncated=allow_truncated
  )
  assert outcomes[0] == outcomes[1]
  assert plans[-1] is None


def test_a_frame_flagged_corrupt_ends_the_skipping_decode(monkeypatch, clips):
  """A cut-short MPEG-TS whose last frame decodes concealed (flagged corrupt, no error): parts
  of it come from the decoder's reused buffers, which skipping changes, so the skipping decode
  stops there (Mismatch) and the selection decodes in full, which ends before that frame."""
  ts = to_mpegts(clips['b3'])
  for keep in np.arange(0.99, 0.5, -0.01):
    data = ts[: int(len(ts) * keep) // 188 * 188]
    container, stream = bitstream.open_with_vectors(data)
    corrupt = [f.is_corrupt for _, f in zip(range(10**6), container.decode(stream))]
    container.close()
    if corrupt and corrupt[-1] and not any(corrupt[:-1]):
      break
  else:
    pytest.fail('no cut leaves a concealed last frame')
  container, stream = bitstream.open_with_vectors(data)
  plan = skipping.plan(container, stream, bitstream.timeline(len(corrupt), 12))
  assert plan is not None
  with pytest.raises(skipping.Mismatch, match='flagged corrupt'):
    list(skipping.frames(container, stream, plan))
  container.close()
  # Either way the stream ends before the concealed frame (bitstream.frames_with_references):
  # the selection is of the frames before it, the same with and without skipping.
  full, skipped = both_ways(monkeypatch, data, num_frames=12, allow_truncated=True)
  assert full.truncated and full.num_source_frames == len(corrupt) - 1
  assert selection_digest(skipped) == selection_digest(full)
