"""What the transcode of a non-H.264 source measures: the step between samples ('sampled') or
between source frames ('faithful', 'paired'), on a clip of known constant motion."""

import numpy as np
import pytest

from data_pipeline import codec, synthetic
from data_pipeline.codec import bitstream, transcode

SPEED = 2.0  # pixels per source frame, to the east
SOURCE_FRAMES, T = 65, 9
STRIDE = 8  # floor(linspace(0, 64, 9)) = 0, 8, ..., 64


@pytest.fixture(scope='module', params=['mpeg4', 'hevc'])
def clip(request):
  return synthetic.make_clip(
    1,
    num_frames=SOURCE_FRAMES,
    height=224,
    width=224,
    codec=request.param,
    direction='E',
    speed=SPEED,
    size=40,
  )


def transcoded(clip, mode: str):
  """(packets, the samples' transcode positions) of one transcode mode, as `select` makes it."""
  ids = bitstream.timeline(SOURCE_FRAMES, T)
  if mode == 'faithful':
    packets, count, error = transcode.transcode_segment(clip.data, ids, 224, 224, 32, 18)
    assert count == SOURCE_FRAMES and error is None
    return packets, ids - ids[0]
  sequence, positions = (ids, np.arange(T)) if mode == 'sampled' else transcode.paired_sequence(ids)
  got, _, _ = transcode.read_frames(clip.data, sequence, 224, 224)
  intra = positions[::32] if mode == 'paired' else None
  return transcode.encode_h264([got[int(i)] for i in sequence], 32, 18, intra), positions


def object_dx(clip, mode: str) -> float:
  """Median horizontal vector (pixels, the reference minus the block) over the moving object's
  blocks of the sampled P-frames."""
  packets, positions = transcoded(clip, mode)
  ids = bitstream.timeline(SOURCE_FRAMES, T)
  sample_at = {int(p): int(i) for p, i in zip(positions, ids)}
  dx, kinds = [], []
  for index, (frame, _) in enumerate(transcode.h264_packet_frames(packets)):
    if index not in sample_at:
      continue
    side = frame.side_data.get('MOTION_VECTORS')
    kinds.append('I' if side is None else 'P')
    if side is None:
      continue
    v = side.to_ndarray()
    mask = clip.masks[sample_at[index]]
    inside = mask[np.clip(v['dst_y'], 0, 223), np.clip(v['dst_x'], 0, 223)] & (v['source'] < 0)
    dx.extend((v['motion_x'][inside] / v['motion_scale'][inside]).tolist())
  assert kinds == ['I'] + ['P'] * (T - 1)  # I-frames on the same samples in every mode
  assert len(dx) > 5 * (T - 1)
  return float(np.median(dx))


def test_faithful_and_paired_measure_source_frames_sampled_measures_samples(clip):
  # The reference lies SPEED (faithful, paired) or STRIDE * SPEED (sampled) pixels to the west.
  assert abs(object_dx(clip, 'faithful') + SPEED) <= 0.5
  assert abs(object_dx(clip, 'paired') + SPEED) <= 0.5
  assert abs(object_dx(clip, 'sampled') + STRIDE * SPEED) <= 3.0


def test_paired_sequence():
  sequence, positions = transcode.paired_sequence([0, 1, 5, 9, 10])
  assert sequence.tolist() == [0, 1, 4, 5, 8, 9, 10]
  assert sequence[positions].tolist() == [0, 1, 5, 9, 10]


@pytest.mark.parametrize('mode', ['sampled', 'faithful', 'paired'])
def test_select_in_every_mode(clip, mode):
  sel = codec.select(clip.data, num_frames=T, budget=300, transcode=mode)
  assert sel.transcoded and sel.frame_ids.tolist() == list(range(0, 65, 8))
  assert ''.join(sel.picture_type_letters) == 'I' + 'P' * (T - 1)
  assert sel.whole_frames.tolist() == [0]
  # The moving object is what is selected after the first frame.
  later = sel.positions[sel.positions[:, 0] > 0]
  rows, cols = np.nonzero(clip.masks[sel.frame_ids[later[:, 0]]].any(axis=0))
  box = (rows.min() // 14 - 1, rows.max() // 14 + 1, cols.min() // 14 - 1, cols.max() // 14 + 1)
  on_path = (
    (later[:, 1] >= box[0])
    & (later[:, 1] <= box[1])
    & (later[:, 2] >= box[2])
    & (later[:, 2] <= box[3])
  )
  assert on_path.mean() > 0.5


def test_transcode_option_is_checked():
  with pytest.raises(ValueError, match="transcode='all'.*'sampled', 'faithful', 'paired'"):
    codec.Options.from_kwargs({'transcode': 'all'})
