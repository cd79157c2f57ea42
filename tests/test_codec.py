"""Codec patch selection (data_pipeline.codec) and the synthetic clips it is measured on.

The headline check: on clips with known moving objects, at K = 12.5% of the patches, the codec
selection puts far more of its patches on the objects than uniform frames or random patches do.
With a moving share p of about 0.15 and K = 2048, a chance selection's share has a standard
deviation of sqrt(p(1-p)/K) ~ 0.008, so the 0.3 margin asserted below is over 30 sigma.
"""

import contextlib
import functools
import io
import os
import re
import threading
import time

import av
import numpy as np
import pytest

from data_pipeline import codec, records, synthetic, workers
from data_pipeline.codec import bitstream, camera, maps
from data_pipeline.codec import geometry as geometry_lib
from data_pipeline.codec.selection import is_static

T, K = 64, 2048  # K = 12.5% of 64 x 16 x 16


@functools.cache
def clip(seed=0, **kwargs):
  kwargs.setdefault('num_objects', 3)
  return synthetic.make_clip(seed, **kwargs)


def share(c, selection):
  """Share of the selected patches on moving objects, and the share of all patches."""
  moving_TxHpxWp = c.patch_mask(selection.frame_ids)
  return float(moving_TxHpxWp[tuple(selection.positions.T)].mean()), float(moving_TxHpxWp.mean())


def check_contract(selection, num_frames=T, budget=K, grid=16):
  assert selection.frame_ids.shape == (num_frames,)
  assert selection.picture_types.shape == (num_frames,)
  assert selection.scores.shape == (num_frames, grid, grid)
  assert selection.positions.shape == (budget, 3)
  assert selection.positions.min() >= 0
  assert (selection.positions.max(0) < [num_frames, grid, grid]).all()
  flat = np.ravel_multi_index(tuple(selection.positions.T), (num_frames, grid, grid))
  assert (np.diff(flat) > 0).all(), 'positions must be unique and sorted by (t, h, w)'


# ----------------------------------------------------------------------------- the headline


def test_codec_beats_uniform_frames_and_random():
  rows = []
  for seed in range(4):
    c = clip(seed, background='pan' if seed % 2 else 'static')
    sel = codec.select(c.data, camera_compensation='median')
    check_contract(sel)
    ours, base = share(c, sel)
    uniform, _ = share(c, codec.select_uniform_frames(c.data))
    rand, _ = share(c, codec.select_random(c.data, seed=seed))
    rows.append((ours, uniform, rand, base))
    assert ours > max(uniform, rand) + 0.3, (seed, ours, uniform, rand, base)
  ours, uniform, rand, base = np.mean(rows, axis=0)
  assert abs(rand - base) < 0.05 and abs(uniform - base) < 0.08  # the baselines are chance
  assert ours > 3 * base


# ----------------------------------------------------------------------------- frame policies


def test_policy_paper_keeps_i_frames_whole():
  sel = codec.select(clip(1).data, policy='paper')  # GOP 32 over 64 frames
  check_contract(sel)
  assert [i for i, k in enumerate(sel.picture_type_letters) if k == 'I'] == [0, 32]
  assert sel.whole_frames.tolist() == [0, 32]
  assert sel.mask[[0, 32]].all()
  assert not sel.mask[1:32].all(axis=(1, 2)).any()  # 1536 others are chosen by score


def test_policy_first_frame_and_zero():
  c = clip(1)
  first = codec.select(c.data, policy='first_frame')
  check_contract(first)
  assert first.whole_frames.tolist() == [0] and first.mask[0].all()
  assert not first.mask[32].all()  # the I-frame competes on its score
  zero = codec.select(c.data, policy='zero')
  check_contract(zero)
  assert zero.whole_frames.size == 0
  assert not zero.mask[[0, 32]].any()  # scores zeroed, pure top-K
  assert share(c, zero)[0] > share(c, first)[0] - 0.05
  np.testing.assert_array_equal(zero.scores, first.scores)  # the map itself is not changed


def test_whole_frames_over_budget_and_odd_budgets():
  c = clip(2, gop=8)  # 8 I-frames on the timeline
  sel = codec.select(c.data, budget=512, policy='paper')
  check_contract(sel, budget=512)
  assert sel.whole_frames.tolist() == [0, 56]  # 2 fit, spread over the 8
  for budget in (1, 100, 1000):
    check_contract(codec.select(c.data, budget=budget), budget=budget)


# ----------------------------------------------------------------------------- vectors


def _frame(index, luma, vectors=None, kind='P'):
  return bitstream.CodedFrame(index, -1, kind, luma, vectors)


def _vectors(source, dx, height=32, width=32, block=16):
  dtype = np.dtype(
    [
      ('source', 'int32'),
      ('w', 'uint8'),
      ('h', 'uint8'),
      ('src_x', 'int16'),
      ('src_y', 'int16'),
      ('dst_x', 'int16'),
      ('dst_y', 'int16'),
      ('flags', 'uint64'),
      ('motion_x', 'int32'),
      ('motion_y', 'int32'),
      ('motion_scale', 'uint16'),
    ],
    align=True,
  )
  ys, xs = np.mgrid[block // 2 : height : block, block // 2 : width : block]
  out = np.zeros(xs.size, dtype)
  out['source'], out['w'], out['h'] = source, block, block
  out['dst_x'], out['dst_y'] = xs.ravel(), ys.ravel()
  out['src_x'], out['src_y'] = xs.ravel() + int(dx), ys.ravel()
  out['motion_x'], out['motion_scale'] = int(dx * 4), 4
  return out


def test_both_reference_directions_are_used():
  rng = np.random.default_rng(0)
  ref = rng.integers(0, 256, (32, 40), dtype=np.uint8)
  luma = np.roll(ref, -3, axis=1)[:, :32]  # current[y, x] = ref[y, x + 3]
  ref = ref[:, :32]
  for source, past, future in ((-1, [_frame(0, ref)], []), (+1, [], [_frame(2, ref)])):
    coded = _frame(1, luma, _vectors(source, 3), kind='B')
    got = maps.frame_maps(coded, past, future)
    assert got.residual_HxW[:, :29].max() == 0  # the vectors explain the frame
    np.testing.assert_allclose(got.motion_map(), 3.0)  # 3 px over 1 frame of distance
    assert (got.vectors_past > 0) == (source < 0) and (got.vectors_future > 0) == (source > 0)
    # Without the vectors the same references predict badly.
    assert maps.frame_maps(_frame(1, luma, None, 'B'), past, future).residual_HxW.mean() > 40
  # Bi-prediction: the two predictions are averaged.
  both = np.concatenate([_vectors(-1, 3), _vectors(+1, 0)])
  got = maps.frame_maps(_frame(1, luma, both, 'B'), [_frame(0, ref)], [_frame(2, luma)])
  assert got.residual_HxW[:, :29].max() == 0


def test_paint_vectors_on_the_4x4_grid():
  v = _vectors(-1, 2, height=16, width=16, block=8)  # four 8x8 blocks
  v['motion_x'] = [4, 8, 12, 16]
  grid = maps.paint_vectors(v, 16, 16, -1)
  np.testing.assert_array_equal(grid.dx_HcxWc, np.kron([[1, 2], [3, 4]], np.ones((2, 2))))
  assert grid.has_HcxWc.all() and not maps.paint_vectors(v, 16, 16, +1).has_HcxWc.any()


def test_b_frames_native():
  c = clip(3, bframes=3)
  sel = codec.select(c.data)
  check_contract(sel)
  assert not sel.transcoded and 'B' in sel.picture_type_letters
  assert sel.vectors_past > 0 and sel.vectors_future > 0
  ours, base = share(c, sel)
  assert ours > base + 0.3


def test_reference_search_finds_b_pyramid_references():
  # With the right references the prediction error is a small part of the frame difference.
  c = clip(4, num_frames=16, bframes=3, background='pan')
  container, stream = bitstream.open_with_vectors(c.data)
  with container:
    for frame, past, future in bitstream.frames_with_references(
      bitstream.container_frames(container, stream), range(1, 16), bitstream.Decoded()
    ):
      got = maps.frame_maps(frame, past, future)
      diff = np.abs(frame.luma.astype(float) - past[0].luma).mean()
      assert got.residual_HxW.mean() < 0.25 * diff, (frame.index, frame.kind)


@pytest.mark.parametrize('max_pictures', [0, 2])
def test_luma_taken_on_first_use_gives_the_same_maps(monkeypatch, max_pictures):
  # The default holds decoded pictures and takes the luma of those a wanted frame uses;
  # max_pictures=0 takes every near frame's luma at once (as before): the same maps, bit for
  # bit, with fewer frames' luma taken by default. A small bound takes the oldest held luma early.
  c = clip(4, num_frames=40, bframes=3, background='pan')
  taken = []
  downscale = maps.downscale
  monkeypatch.setattr(
    maps, 'downscale', lambda luma, step: taken.append(1) or downscale(luma, step)
  )

  def run(**kwargs):
    taken.clear()
    container, stream = bitstream.open_with_vectors(c.data)
    seen, out = {}, []
    with container:
      frames = bitstream.container_frames(container, stream)
      for frame, past, future in bitstream.frames_with_references(
        frames, range(0, 40, 5), bitstream.Decoded(), step=2, **kwargs
      ):
        for f in (frame, *past, *future):
          seen[f.index] = f
        got = maps.frame_maps(frame, past, future, step=2)
        out.append((frame.index, got.motion_map().tobytes(), got.residual_HxW.tobytes()))
        held = [f for f in seen.values() if f.picture is not None]
        assert len(held) <= kwargs.get('max_pictures', bitstream.MAX_PICTURES)
    return out, seen, len(taken)

  eager, _, eager_taken = run(max_pictures=0)
  lazy, seen, lazy_taken = run() if max_pictures == 0 else run(max_pictures=max_pictures)
  assert lazy == eager and len(eager) == 8
  assert len(seen) <= lazy_taken < eager_taken
  assert all(f.luma is not None and f.luma.dtype == np.float32 for f in seen.values())


def _remux(data: bytes, fmt: str, options: dict | None = None, path=None) -> bytes:
  """The same H.264 packets in another container (muxer `options`; mp4's faststart rewrites
  the file by name, so it needs a `path`)."""
  out = io.BytesIO() if path is None else str(path)
  with (
    av.open(io.BytesIO(data)) as source,
    av.open(out, 'w', format=fmt, options=options or {}) as target,
  ):
    stream = target.add_stream_from_template(source.streams.video[0])
    for packet in source.demux(source.streams.video[0]):
      if packet.dts is not None:
        packet.stream = stream
        target.mux(packet)
  return out.getvalue() if path is None else path.read_bytes()


def test_selection_decodes_from_the_container_it_probed():
  # mp4 carries the frame count: the probed container is kept open for the decode. Matroska
  # does not: probe demuxes it to count, closes it, and the decode opens the file again. The
  # same packets give the same selection either way.
  mp4 = clip(4, num_frames=40, bframes=3).data
  mkv = _remux(mp4, 'matroska')
  info, container = bitstream.probe(mp4, keep_open=True)
  with container:
    assert not info.counted and next(container.demux(video=0)).pts is not None
  info_mkv, none = bitstream.probe(mkv, keep_open=True)
  assert info_mkv.counted and none is None and info_mkv.num_frames == info.num_frames == 40
  a, b = codec.select(mp4, num_frames=16, budget=256), codec.select(mkv, num_frames=16, budget=256)
  assert a.scores.tobytes() == b.scores.tobytes()
  assert a.positions.tolist() == b.positions.tolist()


# ----------------------------------------------------------------------------- decoding thread


def decoding_threads():
  return [t for t in threading.enumerate() if t.name == 'ove-decode']


def test_prefetched_hands_over_every_item_then_the_error_from_its_own_thread():
  where = []

  def source(n, error=None):
    for i in range(n):
      where.append(threading.current_thread().name)
      yield i
    if error:
      raise error

  assert list(bitstream.prefetched(source(50), depth=2)) == list(range(50))
  assert set(where) == {'ove-decode'}
  got = []
  with pytest.raises(av.InvalidDataError, match='cut short'):
    for item in bitstream.prefetched(source(5, av.InvalidDataError(1094995529, 'cut short'))):
      got.append(item)
  assert got == [0, 1, 2, 3, 4] and not decoding_threads()


def test_prefetched_stops_and_joins_its_thread_when_closed_early():
  closed = threading.Event()
  taken = []

  def endless():
    try:
      i = 0
      while True:
        taken.append(i)
        yield i
        i += 1
    finally:
      closed.set()  # the source is closed in its thread, before close() returns

  items = bitstream.prefetched(endless(), depth=3)
  assert [next(items) for _ in range(4)] == [0, 1, 2, 3]
  time.sleep(0.05)  # the thread has most likely filled its slots and waits
  # It reads ahead at most `depth` items waiting in their slots, and one it waits to hand over.
  assert len(taken) <= 4 + 3 + 1
  items.close()
  assert closed.is_set() and not decoding_threads() and len(taken) <= 4 + 3 + 1
  # An error downstream of the items closes it the same way.
  closed.clear()
  with pytest.raises(RuntimeError, match='downstream'):
    with contextlib.closing(bitstream.prefetched(endless())) as items:
      for i in items:
        if i == 10:
          raise RuntimeError('downstream')
  assert closed.is_set() and not decoding_threads()
  # A generator never started starts no thread.
  bitstream.prefetched(endless()).close()
  assert not decoding_threads()


def _same_selection(a, b):
  for name in ('scores', 'positions', 'whole_frames', 'frame_ids', 'picture_types'):
    assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
  assert (a.vectors_past, a.vectors_future) == (b.vectors_past, b.vectors_future)


@pytest.mark.parametrize(
  'name,kwargs',
  [
    ('B-frames', dict(num_frames=16, budget=256)),
    ('B-frames, release_probe', dict(num_frames=16, budget=256, preset='release_probe')),
    ('hevc, faithful', dict(num_frames=8, budget=128, transcode='faithful')),
  ],
)
def test_decode_thread_gives_the_same_selection(name, kwargs):
  data = (clip(5, codec='hevc') if 'hevc' in name else clip(3, bframes=3, background='pan')).data
  one = codec.select(data, decode_thread=False, **kwargs)
  two = codec.select(data, decode_thread=True, **kwargs)
  assert not one.decode_thread and two.decode_thread
  _same_selection(one, two)


def test_an_error_in_the_analysis_stops_the_decoding_thread(monkeypatch):
  data = clip(3, bframes=3, background='pan').data
  calls = []

  def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError('a bug in the maps')
    return frame_maps(*args, **kwargs)

  frame_maps = maps.frame_maps
  monkeypatch.setattr(maps, 'frame_maps', failing)
  with pytest.raises(RuntimeError, match='a bug in the maps'):
    codec.select(data, num_frames=16, budget=256, decode_thread=True)
  assert len(calls) == 3 and not decoding_threads()


def test_decode_thread_on_a_truncated_stream(bad_inputs):
  # The decoder's error ends the stream on the thread; the selection sees it as it would.
  path = str(bad_inputs['truncated_faststart.mp4'])
  for decode_thread in (False, True):
    with pytest.raises(codec.VideoError, match='only .* decode'):
      codec.select(path, num_frames=16, budget=512, decode_thread=decode_thread)
  a, b = (
    codec.select(path, num_frames=16, budget=512, allow_truncated=True, decode_thread=d)
    for d in (False, True)
  )
  assert a.truncated and b.truncated and b.decode_thread
  _same_selection(a, b)


def test_decode_thread_by_default_where_decoding_is_the_larger_share(monkeypatch):
  # 64 source frames for 16 analysed: 4x the pixels to decode, so a thread when 2 are allowed;
  # 64 for 64: no. OVE_SELECT_THREADS=1 (what precompute's workers run with) turns it off.
  data = clip(3, bframes=3, background='pan').data
  monkeypatch.setenv('OVE_SELECT_THREADS', '2')
  assert codec.select_threads() == 2
  assert codec.select(data, num_frames=16, budget=256).decode_thread
  assert not codec.select(data).decode_thread
  monkeypatch.setenv('OVE_SELECT_THREADS', '1')
  assert not codec.select(data, num_frames=16, budget=256).decode_thread
  assert codec.select(data, num_frames=16, budget=256, decode_thread=True).decode_thread
  monkeypatch.setenv('OVE_SELECT_THREADS', 'two')
  with pytest.raises(ValueError, match="OVE_SELECT_THREADS='two'.*integers >= 1"):
    codec.select(data)
  monkeypatch.delenv('OVE_SELECT_THREADS')
  assert codec.select_threads() == workers.usable_cpus()


# ----------------------------------------------------------------------------- codecs, sizes


@pytest.mark.parametrize('name', ['hevc', 'vp9'])
def test_other_codecs_are_transcoded(name):
  c = clip(5, codec=name)
  sel = codec.select(c.data)
  check_contract(sel)
  assert sel.transcoded and sel.codec == name and sel.vectors_past > 0
  assert sel.whole_frames.tolist() == [0, 32]  # the transcode's GOP 32
  ours, base = share(c, sel)
  assert ours > base + 0.3


def test_fixed_gop_forces_the_transcode():
  sel = codec.select(clip(1).data, gop=16)
  assert sel.transcoded and sel.whole_frames.tolist() == [0, 16, 32, 48]


@pytest.mark.parametrize('height,width', [(171, 225), (320, 180), (100, 130)])
def test_odd_portrait_and_small_sizes(height, width):
  c = clip(6, height=height, width=width, num_objects=2)
  sel = codec.select(c.data)
  check_contract(sel)
  ours, base = share(c, sel)
  assert ours > base + 0.25


@pytest.mark.parametrize('frames', [1, 2, 3])
def test_short_clips(frames):
  sel = codec.select(clip(7, num_frames=frames).data)
  check_contract(sel)
  expected = np.floor(np.linspace(0, frames - 1, T)).astype(int)
  np.testing.assert_array_equal(sel.frame_ids, expected)
  repeats = np.flatnonzero(expected[1:] == expected[:-1]) + 1
  assert not sel.scores[repeats].any()  # repeats bring nothing new
  assert sel.whole_frames.tolist() == [0]


def test_short_clip_transcoded():
  sel = codec.select(clip(7, num_frames=2, codec='hevc').data, num_frames=8, budget=300)
  check_contract(sel, num_frames=8, budget=300)
  assert sel.transcoded and sel.frame_ids.tolist() == [0] * 7 + [1]  # floor(linspace(0, 1, 8))
  assert sel.scores[7].any() and not sel.scores[1:7].any()


def test_static_fallback():
  still = clip(8, moving=False, num_objects=1)
  sel = codec.select(still.data, static_fallback=True)
  check_contract(sel)
  assert sel.static_fallback
  assert sel.whole_frames.tolist() == [0, 21, 32, 42, 63]  # 4 spread frames + the I-frames
  assert not codec.select(still.data).static_fallback  # off unless asked for
  moving = codec.select(clip(1).data, static_fallback=True)
  assert not moving.static_fallback
  assert is_static(np.zeros(10), 0.02, 0.38) and is_static(np.full(100, 0.5), 0.02, 0.38)
  assert not is_static(np.r_[np.zeros(90), np.ones(10)], 0.02, 0.38)


def test_camera_compensation():
  # A similarity fit recovers a zoom + shift despite 25% of the cells moving on their own.
  hc = wc = 20
  ys, xs = (np.mgrid[0:hc, 0:wc] * 4 + 2.0) - 39.0
  a, b, tx, ty = 0.02, -0.01, 1.5, -0.5
  flow_x, flow_y = a * xs - b * ys + tx, b * xs + a * ys + ty
  dx, dy = flow_x.copy(), flow_y.copy()
  dx[:10, :10] += 6
  grid = maps.VectorGrid(dx.astype(np.float32), dy.astype(np.float32), np.ones((hc, wc), bool))
  fit_x, fit_y = camera.similarity_flow(grid)
  np.testing.assert_allclose(fit_x, flow_x, atol=1e-3)
  np.testing.assert_allclose(fit_y, flow_y, atol=1e-3)
  left_x, _ = camera.compensate(grid, 'median')
  assert abs(np.median(left_x)) < 1e-6
  # On panning clips the compensated selection finds the objects better.
  gains = []
  for seed in (11, 12):
    c = clip(seed, background='pan')
    plain = share(c, codec.select(c.data))[0]
    gains.append(
      [
        share(c, codec.select(c.data, camera_compensation=m))[0] - plain
        for m in ('median', 'similarity')
      ]
    )
  assert np.mean(gains) > 0.1, gains


def test_fusion_and_centre_prior():
  m, r = np.array([0.0, 0.5, 1.0]), np.array([1.0, 0.5, 0.0])
  np.testing.assert_allclose(maps.fuse(m, r, 'mean'), 0.5)
  np.testing.assert_allclose(maps.fuse(m, r, 'max'), [1, 0.5, 1])
  np.testing.assert_allclose(maps.fuse(m, r, 'sum'), 1.0)
  np.testing.assert_allclose(maps.fuse(m, r, 'geomean'), [0, 0.5, 0])
  np.testing.assert_allclose(maps.fuse(m, r, 'mean', 3, 1), [0.25, 0.5, 0.75])
  prior = maps.centre_prior(41, 81, 0.3)
  assert prior[20, 40] == pytest.approx(1.3) and prior[0, 0] == pytest.approx(
    1 + 0.3 * np.exp(-0.5 * ((20**2 + 40**2) / (0.35 * 41) ** 2))
  )
  np.testing.assert_allclose(
    maps.normalise(np.arange(101.0), 1.0), np.minimum(np.arange(101) / 95.0, 1)
  )
  assert maps.normalise(np.zeros(10), maps.MOTION_FLOOR).max() == 0
  sel = codec.select(clip(1).data, fusion='geomean', centre_prior=0.3, policy='zero')
  check_contract(sel)


def test_patch_geometry_matches_the_crop():
  for height, width in ((224, 224), (171, 225), (320, 180), (50, 70)):
    ay, ax = geometry_lib.patch_integrators(height, width, 224, 14)
    np.testing.assert_allclose(ay @ np.ones((height, width)) @ ax.T, 196, rtol=1e-5)
  # A mark on the source lands in the patch the model sees it in.
  ay, ax = geometry_lib.patch_integrators(320, 180, 224, 14)  # portrait: rows cropped
  mark = np.zeros((320, 180))
  mark[160, 90] = 1.0  # the centre
  assert np.unravel_index(np.argmax(ay @ mark @ ax.T), (16, 16)) == (8, 8)
  assert (ay @ mark @ ax.T).sum() == pytest.approx((224 / 180) ** 2, rel=1e-3)


def test_banded_patch_sums_equal_the_matrix_products():
  rng = np.random.default_rng(0)
  for height, width, step, geometry in (
    (272, 640, 1, 'crop'),
    (720, 1280, 3, 'crop'),
    (144, 176, 1, 'letterbox'),
    (1920, 1080, 4, 'letterbox'),
    (50, 70, 1, 'crop'),
  ):
    dense = geometry_lib.patch_integrators(height, width, 224, 14, geometry, step)
    bands = tuple(geometry_lib.Band.of(m) for m in dense)
    for band, matrix in zip(bands, dense):  # the band holds every non-zero of the matrix
      rebuilt = np.zeros_like(matrix)
      cols = np.minimum(
        band.start_P[:, None] + np.arange(band.weights_PxB.shape[1]), matrix.shape[1] - 1
      )
      np.add.at(rebuilt, (np.arange(len(matrix))[:, None], cols), band.weights_PxB)
      np.testing.assert_array_equal(rebuilt, matrix)
    map_HxW = rng.random((height // step, width // step)).astype(np.float32)
    ay, ax = dense
    np.testing.assert_allclose(
      maps.to_patches_banded(map_HxW, bands), ay @ map_HxW @ ax.T, rtol=1e-5, atol=1e-4
    )


# ----------------------------------------------------------------------------- determinism


def test_deterministic():
  for c in (clip(3, bframes=3, background='pan'), clip(5, codec='hevc')):
    first = codec.select(c.data, camera_compensation='similarity')
    second = codec.select(c.data, camera_compensation='similarity')
    np.testing.assert_array_equal(first.positions, second.positions)
    np.testing.assert_array_equal(first.scores, second.scores)
  # The same seed gives the same file (x264 with B-frames, and WebM with its segment id).
  again = synthetic.make_clip(3, num_objects=3, bframes=3, background='pan')
  assert again.data == clip(3, bframes=3, background='pan').data
  assert synthetic.make_clip(5, num_objects=3, codec='vp9').data == clip(5, codec='vp9').data


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope='module')
def bad_inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp('bad')
  files = {
    name: root / name
    for name in (
      'zero.mp4',
      'random.mp4',
      'notes.txt',
      'audio.m4a',
      'missing.mp4',
      'truncated.mp4',
      'truncated_faststart.mp4',
    )
  }
  files['zero.mp4'].write_bytes(b'')
  files['random.mp4'].write_bytes(np.random.default_rng(0).bytes(5000))
  files['notes.txt'].write_text('not a video\n' * 50)
  synthetic.write_audio_only(files['audio.m4a'])
  data = clip(9, num_frames=32).data
  files['truncated.mp4'].write_bytes(data[: len(data) // 2])
  # With the index first (faststart) a cut file opens and promises frames that are not there.
  data = _remux(clip(9, num_frames=32).data, 'mp4', {'movflags': 'faststart'}, root / 'whole.mp4')
  files['truncated_faststart.mp4'].write_bytes(data[: len(data) // 2])
  return files


@pytest.mark.parametrize(
  'name',
  [
    'zero.mp4',
    'random.mp4',
    'notes.txt',
    'audio.m4a',
    'missing.mp4',
    'truncated.mp4',
    'truncated_faststart.mp4',
  ],
)
def test_bad_inputs_raise_video_error(bad_inputs, name):
  path = bad_inputs[name]
  with pytest.raises(codec.VideoError, match=re.escape(str(path))):
    codec.select(str(path))
  if path.exists():  # the same bytes in memory: the message says how many
    with pytest.raises(codec.VideoError, match=f'<{path.stat().st_size} bytes in memory>'):
      codec.select(path.read_bytes())


def test_an_mp4_cut_before_its_index_is_named_so(bad_inputs):
  """A download cut short loses an ordinary MP4's index (written last): the error says so and
  what to do, for a path and for bytes; other unreadable files keep the generic message."""
  path = bad_inputs['truncated.mp4']
  for video in (str(path), path.read_bytes()):
    with pytest.raises(codec.VideoError, match=r'cut short before its index .*fetch it again'):
      codec.select(video, allow_truncated=True)
  with pytest.raises(codec.VideoError, match='not a video PyAV can read'):
    codec.select(str(bad_inputs['random.mp4']))
  whole = bad_inputs['truncated.mp4'].parent / 'whole.mp4'  # faststart: index first
  from data_pipeline import video as video_lib

  assert not video_lib.mp4_without_index(str(whole))
  assert not video_lib.mp4_without_index(bad_inputs['truncated_faststart.mp4'].read_bytes())


def test_truncated_allowed(bad_inputs):
  sel = codec.select(
    str(bad_inputs['truncated_faststart.mp4']), num_frames=16, budget=512, allow_truncated=True
  )
  check_contract(sel, num_frames=16, budget=512)
  assert sel.truncated and 0 < sel.num_source_frames < 32
  assert sel.frame_ids.max() == sel.num_source_frames - 1


def test_bad_options():
  data = clip(1).data
  with pytest.raises(ValueError, match="unknown option 'polcy'.*policy"):
    codec.select(data, polcy='zero')
  for option, value, allowed in (
    ('policy', 'all', 'paper'),
    ('fusion', 'min', 'geomean'),
    ('camera_compensation', 'homography', 'affine'),
    ('gop', 0, 'integer >= 1'),
    ('static_fallback', 'yes', 'True'),
    ('centre_prior', -1, '>= 0'),
    # Non-finite numbers would make every score NaN and the selection shorter than its budget.
    ('centre_prior', float('inf'), '>= 0 .finite'),
    ('motion_weight', float('nan'), '>= 0 .finite'),
    ('static_rel_threshold', float('nan'), r'\[0, 1\] .finite'),
  ):
    with pytest.raises(ValueError, match=f'{option}.*allowed values.*{allowed}'):
      codec.select(data, **{option: value})
  with pytest.raises(ValueError, match='motion_weight=1e.308 and .*a finite sum'):
    codec.select(data, motion_weight=1e308, residual_weight=1e308)
  # Finite in float64 but past float32's range: the maps overflow, and that is said too.
  for big in ({'motion_weight': 1e39}, {'centre_prior': 1e39}):
    with pytest.raises(ValueError, match='scores overflowed float32'):
      with np.errstate(over='ignore', invalid='ignore'):
        codec.select(data, **big)
  with pytest.raises(ValueError, match='budget'):
    codec.select(data, budget=T * 256 + 1)
  with pytest.raises(ValueError, match='multiple of patch_size'):
    codec.select(data, resolution=220)


# ----------------------------------------------------------------------------- baselines, records


def test_baselines():
  data = clip(1).data
  uniform = codec.select_uniform_frames(data)
  check_contract(uniform)
  assert uniform.whole_frames.tolist() == [0, 9, 18, 27, 36, 45, 54, 63]
  partial = codec.select_uniform_frames(data, budget=600)
  check_contract(partial, budget=600)
  assert partial.whole_frames.tolist() == [0, 31]  # and 600 - 512 patches of frame 63
  assert partial.mask[63].sum() == 600 - 512
  first, again = codec.select_random(data, seed=1), codec.select_random(data, seed=1)
  check_contract(first)
  np.testing.assert_array_equal(first.positions, again.positions)
  assert not np.array_equal(first.positions, codec.select_random(data, seed=2).positions)


def test_record_fields_round_trip():
  sel = codec.select(clip(1).data)
  back = records.decode(records.encode(sel.record_fields()))
  np.testing.assert_array_equal(back['positions'], sel.positions)
  np.testing.assert_array_equal(back['frame_ids'], sel.frame_ids)
  assert [records.PICTURE_TYPES[c] for c in back['picture_types']][:2] == ['I', 'P']
  assert back['stats_kept_whole'] == 2


# ----------------------------------------------------------------------------- synthetic clips


def test_synthetic_labels_and_masks_follow_the_motion(tmp_path):
  for direction, axis, sign in (('E', 1, +1), ('N', 0, -1), ('SW', 0, +1)):
    c = synthetic.make_clip(0, num_frames=16, direction=direction, shape='disc', texture='checker')
    assert c.labels['direction'] == direction and c.labels['shape'] == 'disc'
    centroids = [np.argwhere(m).mean(0)[axis] for m in c.masks]
    assert sign * (centroids[-1] - centroids[0]) > 10
  c = synthetic.make_clip(1, num_frames=8, height=120, width=90, codec='mpeg4', bframes=2)
  path = c.write(tmp_path / 'x.mp4')
  assert os.path.getsize(path) == len(c.data)
  with av.open(path) as container:
    stream = container.streams.video[0]
    assert (stream.codec_context.name, stream.width, stream.height) == ('mpeg4', 90, 120)
  assert c.patch_mask([0, 7, 99]).shape == (3, 16, 16)
  assert not synthetic.make_clip(2, num_frames=4, moving=False).masks.any()
  with pytest.raises(ValueError, match='codec'):
    synthetic.make_clip(0, codec='av2')


def test_bench_selection_speed_mode(capsys, tmp_path):
  from ove_jax_tools import bench_selection

  path = clip(2).write(tmp_path / 'clip.mp4')
  assert (
    bench_selection.main(
      [
        '--speed',
        path,
        '--clips',
        '1',
        '--frames',
        '16',
        '--repeat',
        '1',
        '--variant',
        'preset=release_llava',
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  rows = [
    line
    for line in out.splitlines()
    if line.startswith('| clip.mp4') or line.startswith('| synthetic 0')
  ]
  assert len(rows) == 2 and 'preset=release_llava' in out
  for row in rows:  # wall and CPU for both, and the ratios > 0
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert len(cells) == 13 and all(float(c) > 0 for c in cells[6:8] + cells[10:11])
    assert all(float(v) > 0 for c in cells[8:10] + cells[12:] for v in c.split('/'))
    assert int(cells[11]) >= 0  # frames left undecoded
  # The vectors-only decode reads frames 0..last, as a one-thread selection opens them.
  assert bench_selection.vector_decode(path, 9) == 10
  # Selection with the default decoding thread where the clip has more to decode than to
  # analyse (64 source frames for 16 analysed) and 2 threads are allowed; never for the
  # synthetic 16-frame clip.
  assert rows[0].split('|')[6].strip() == ('yes' if codec.select_threads() >= 2 else 'no')
  assert rows[1].split('|')[6].strip() == 'no'


def test_bench_selection_runs(capsys):
  from ove_jax_tools import bench_selection

  assert bench_selection.main(['--clips', '2', '--frames', '16', '--variant', 'policy=zero']) == 0
  out = capsys.readouterr().out
  assert '| codec (policy=zero) |' in out and '| uniform frames |' in out
  with pytest.raises(SystemExit):
    bench_selection.main(['--variant', 'policy=everything'])
