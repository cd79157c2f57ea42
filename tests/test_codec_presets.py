"""The release presets of codec selection: each formula against a small numpy transcription of the
release's maths (EvolvingLMMs-Lab/OneVision-Encoder: dataloader/ap_dataloader_dali_codec.py,
tools/tools_for_hevc/step3_generate_video_mv_residual_index.py,
llava_next/Compressed_Video_Reader/tool/stage1.py), then end to end on encoded clips."""

import math

import av
import numpy as np
import pytest

from data_pipeline import codec, synthetic
from data_pipeline.codec import geometry, maps, release, release_motion, selection, transcode
from data_pipeline.codec.options import Options
from data_pipeline.records import PICTURE_TYPES

# ----------------------------------------------------------------------------- transcriptions
# Written from the release's code as it reads, interleaved design rows and all, so that a change
# of ours that departs from it shows.


def ref_fit(vx, vy, mode, max_points=5000, trim=0.7, iters=2):
  hm, wm = vx.shape
  xx, yy = np.meshgrid(
    np.linspace(-1.0, 1.0, wm, dtype=np.float32), np.linspace(-1.0, 1.0, hm, dtype=np.float32)
  )
  x, y = xx.reshape(-1), yy.reshape(-1)
  n = x.shape[0]
  if mode == 'similarity':
    a_full = np.zeros((2 * n, 4), np.float32)
    a_full[0::2, 0] = 1.0
    a_full[0::2, 2] = x
    a_full[0::2, 3] = -y
    a_full[1::2, 1] = 1.0
    a_full[1::2, 2] = y
    a_full[1::2, 3] = x
  else:
    a_full = np.zeros((2 * n, 6), np.float32)
    a_full[0::2, 0] = 1.0
    a_full[0::2, 1] = x
    a_full[0::2, 2] = y
    a_full[1::2, 3] = 1.0
    a_full[1::2, 4] = x
    a_full[1::2, 5] = y

  def predict(params):
    p = [float(v) for v in params.reshape(-1)]
    if mode == 'similarity':
      return p[0] + p[2] * x - p[3] * y, p[1] + p[3] * x + p[2] * y
    return p[0] + p[1] * x + p[2] * y, p[3] + p[4] * x + p[5] * y

  vxf, vyf = vx.reshape(-1).astype(np.float32), vy.reshape(-1).astype(np.float32)
  idx = np.nonzero(np.abs(vxf) + np.abs(vyf) > 1e-3)[0]
  if idx.size < 64:
    return np.full_like(vx, float(np.median(vx))), np.full_like(vy, float(np.median(vy)))
  if idx.size > max_points:
    idx = idx[:: int(math.ceil(idx.size / float(max_points)))]
  sel, params = idx, None
  for _ in range(iters):
    rows = np.concatenate([2 * sel, 2 * sel + 1])
    params = np.linalg.lstsq(a_full[rows], np.concatenate([vxf[sel], vyf[sel]]), rcond=None)[
      0
    ].astype(np.float32)
    dx, dy = predict(params)
    r = np.sqrt((vxf[sel] - dx[sel]) ** 2 + (vyf[sel] - dy[sel]) ** 2)
    if sel.size < 128:
      break
    keep = int(max(64, round(sel.size * trim)))
    if keep >= sel.size:
      break
    sel = sel[np.argsort(r)[:keep]]
  dx, dy = predict(params)
  return dx.reshape(hm, wm), dy.reshape(hm, wm)


def ref_local_var(x, k=3):
  def box(a):
    pad = k // 2
    ap = np.pad(a.astype(np.float32), ((pad, pad), (pad, pad)), mode='edge')
    ii = np.cumsum(np.cumsum(ap, axis=0), axis=1)
    s = ii[k:, k:] - ii[:-k, k:] - ii[k:, :-k] + ii[:-k, :-k]
    return s / float(k * k)

  m1 = box(x)
  return np.maximum(box(x * x) - m1 * m1, 0.0)


def ref_centre_prior(fused, cp, sigma_share=0.35):
  h, w = fused.shape
  sigma = max(sigma_share * min(h, w), 1.0)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  wgt = np.exp(-0.5 * ((xx - (w - 1) * 0.5) ** 2 + (yy - (h - 1) * 0.5) ** 2) / sigma**2)
  return np.clip(fused * (1.0 + cp * wgt / wgt.max()), 0.0, 1.0)


def ref_is_static(patch_mean, abs_thresh, rel_thresh):
  p95 = float(np.percentile(patch_mean, 95.0))
  p50 = float(np.percentile(patch_mean, 50.0))
  rel = float((p95 - p50) / max(p95, 1e-6))
  return (p95 < abs_thresh) or ((p95 < abs_thresh * 2.0) and (rel < rel_thresh))


def ref_static_fallback(patch_sums, budget, per_frame, frames=4):
  """The probe's static branch once the clip is judged static: sorted flat indices of the
  frames' patches (spread over them when the budget cannot hold them), then the top of the rest
  by score (ties in index order, as ours break them)."""
  num_frames = patch_sums.size // per_frame
  count = max(1, min(num_frames, frames))
  if count >= num_frames:
    t_list = list(range(num_frames))
  else:
    t_list = list(dict.fromkeys(np.linspace(0, num_frames - 1, count, dtype=int).tolist()))
  uniform = []
  if budget >= len(t_list) * per_frame:
    for t in t_list:
      uniform += range(t * per_frame, (t + 1) * per_frame)
  else:
    base, rem = divmod(budget, len(t_list))
    for j, t in enumerate(t_list):
      k = base + (1 if j < rem else 0)
      if k <= 0:
        continue
      places = range(per_frame) if k >= per_frame else []
      if k < per_frame:
        step = float(per_frame) / float(k)
        places = list(dict.fromkeys(min(per_frame - 1, int(round(i * step))) for i in range(k)))
      uniform += [t * per_frame + p for p in places]
  uniform = uniform[:budget]
  rest = budget - len(uniform)
  if rest <= 0:
    return sorted(uniform)
  scores = patch_sums.astype(np.float64).copy()
  scores[uniform] = -np.inf
  top = np.argsort(-scores, kind='stable')[:rest]
  return sorted(set(uniform) | set(int(i) for i in top))


def ref_letterbox(h0, w0, out=576, p=16):
  scale = out / max(h0, w0)
  hn, wn = max(1, int(round(h0 * scale))), max(1, int(round(w0 * scale)))
  top, left = (out - hn) // 2, (out - wn) // 2
  mask = np.zeros((out // p, out // p), bool)
  for h in range(out // p):
    for w in range(out // p):
      mask[h, w] = (
        h * p >= top and (h + 1) * p <= top + hn and w * p >= left and (w + 1) * p <= left + wn
      )
  return (hn, wn, top, left), mask


def ref_llava_topk(scores_TxS, valid, keep_frames=8):
  """stage1 global_topk_thw_square576 with keep_first_full_frame on: (t, h, w) as a set."""
  t, s_total = scores_TxS.shape
  wb = valid.shape[1]
  scores = scores_TxS.copy()
  scores[:, ~valid.reshape(-1)] = -1e-4
  mandatory = {(0, i // wb, i % wb) for i in range(s_total)}
  rest = scores.copy()
  rest[0, :] = -1e6
  top = np.argsort(-rest.reshape(-1), kind='stable')[: keep_frames * s_total - s_total]
  return mandatory | {(int(i // s_total), int(i % s_total // wb), int(i % wb)) for i in top}


def vector_field(seed=0, h=72, w=96, zoom=0.04, angle=0.03, shift=(1.5, -0.75)):
  """A camera zoom/rotation/pan on a 4x4-cell grid, an object moving on its own, and holes
  (intra cells, zero vectors), nearest-upsampled to pixels as the release does."""
  rng = np.random.default_rng(seed)
  hc, wc = h // 4, w // 4
  yy, xx = np.meshgrid(np.linspace(-1, 1, hc), np.linspace(-1, 1, wc), indexing='ij')
  vx = shift[0] + zoom * xx - angle * yy
  vy = shift[1] + angle * xx + zoom * yy
  vx[4:9, 6:12] = 6.0
  vy[4:9, 6:12] = -3.0
  holes = rng.random((hc, wc)) < 0.1
  vx[holes], vy[holes] = 0.0, 0.0
  vx, vy = np.round(vx * 4) / 4, np.round(vy * 4) / 4  # quarter-pel
  up = np.ones((4, 4), np.float32)
  return np.kron(vx, up).astype(np.float32), np.kron(vy, up).astype(np.float32)


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize('mode', ['similarity', 'affine'])
def test_camera_fit_matches_release(mode):
  vx, vy = vector_field()
  ours = release.camera_flow(vx, vy, mode)
  ref = ref_fit(vx, vy, mode)
  np.testing.assert_allclose(ours[0], ref[0], atol=1e-4)
  np.testing.assert_allclose(ours[1], ref[1], atol=1e-4)
  # Fitted on moving vectors only: the holes (zero vectors) do not pull the pan towards 0, and
  # the trimmed refit ignores the object.
  assert abs(float(np.median(ours[0])) - 1.5) < 0.1 and abs(float(np.median(ours[1])) + 0.75) < 0.1


def test_camera_fit_caps_points_and_falls_back_to_median():
  vx, vy = vector_field(h=400, w=400)  # 160000 moving pixels: subsampled
  ours, ref = release.camera_flow(vx, vy, 'similarity'), ref_fit(vx, vy, 'similarity')
  np.testing.assert_allclose(ours[0], ref[0], atol=1e-4)
  few_x = np.zeros((40, 40), np.float32)
  few_y = np.zeros((40, 40), np.float32)
  few_x[:3, :20] = 2.0  # 60 moving pixels < 64: the median
  flow_x, flow_y = release.camera_flow(few_x, few_y, 'similarity')
  assert np.all(flow_x == np.median(few_x)) and np.all(flow_y == 0)


def test_median_and_mean_compensation_count_zero_vectors():
  vx, vy = vector_field(seed=2)
  for mode, stat in (('median', np.median), ('mean', np.mean)):
    cx, cy = release.compensate(vx, vy, mode)
    np.testing.assert_allclose(cx, vx - stat(vx), atol=1e-6)
    np.testing.assert_allclose(cy, vy - stat(vy), atol=1e-6)


def test_release_motion_uses_l0_in_pixels():
  h, w = 32, 48
  grid = maps.VectorGrid(
    np.zeros((8, 12), np.float32), np.zeros((8, 12), np.float32), np.zeros((8, 12), bool)
  )
  grid.dx_HcxWc[2:4, 3:6], grid.dy_HcxWc[2:4, 3:6] = 3.0, 4.0
  grid.has_HcxWc[2:6, 3:6] = True  # coded cells with zero vectors too
  grid.dx_HcxWc[6:, :] = 9.0  # not coded: must count as zero
  motion = release_motion.pixels(grid, h, w, 'none')
  expected = np.zeros((8, 12), np.float32)
  expected[2:4, 3:6] = 5.0
  np.testing.assert_allclose(motion, np.kron(expected, np.ones((4, 4))), atol=1e-6)
  median = release_motion.pixels(grid, h, w, 'median')  # median over all pixels: 0 here
  np.testing.assert_allclose(median, motion, atol=1e-6)


def test_llava_motion_reads_whole_pixel_vectors():
  """FFmpeg exports a vector's source position with C's integer division (src_x = dst_x +
  motion_x / motion_scale) and the LLaVA reader (`h264_api.cpp`) takes src - dst: whole pixels,
  truncated toward zero, 0 where no L0 vector; stage1's `_mv_energy_norm` then divides by 4
  again, subtracts the median over all cells and normalises by the p95 (where the /4 cancels)."""
  rng = np.random.default_rng(3)
  hc, wc = 9, 16
  motion_x, motion_y = rng.integers(-23, 24, (2, hc, wc))  # quarter-pel, as H.264 codes them
  has = rng.random((hc, wc)) < 0.8
  grid = maps.VectorGrid(
    (motion_x / 4).astype(np.float32), (motion_y / 4).astype(np.float32), has
  )  # what `maps.paint_vectors` holds: motion / motion_scale

  def c_division(a, b):
    return np.array([int(v / b) for v in a.ravel()]).reshape(a.shape)

  def normalised(mag):
    return np.clip(mag / max(float(np.percentile(mag, 95)), 1e-6), 0.0, 1.0)

  mvx, mvy = (np.where(has, c_division(m, 4), 0).astype(np.int32) for m in (motion_x, motion_y))
  vx, vy = mvx.astype(np.float32) / 4.0, mvy.astype(np.float32) / 4.0
  vx, vy = vx - np.median(vx), vy - np.median(vy)
  want = normalised(np.sqrt(vx * vx + vy * vy))
  got = release_motion.cells(grid, 4 * hc, 4 * wc, 'median', whole=True)
  np.testing.assert_allclose(normalised(got), want, atol=1e-6)
  pixels = release_motion.pixels(grid, 4 * hc, 4 * wc, 'median', whole=True)
  np.testing.assert_array_equal(pixels, np.kron(got, np.ones((4, 4), np.float32)))
  quarter = release_motion.cells(grid, 4 * hc, 4 * wc, 'median')
  assert np.abs(normalised(quarter) - want).max() > 0.1  # sub-pixel vectors read otherwise


def test_inconsistency_is_release_local_variance():
  vx, vy = vector_field(seed=1)
  magnitude = np.hypot(*release.compensate(vx, vy, 'similarity'))
  h, w = magnitude.shape
  for k in (3, 5):
    ref = ref_local_var(magnitude, k)  # (H-1) x (W-1), as the release computes it
    np.testing.assert_allclose(release.window_variance(magnitude, k), ref, rtol=1e-4, atol=1e-4)
    # ... then cv2.resize(INTER_NEAREST) back to the frame: source index floor(i * (H-1) / H).
    rows, cols = (np.arange(h) * (h - 1)) // h, (np.arange(w) * (w - 1)) // w
    np.testing.assert_allclose(
      release.local_variance(magnitude, k), ref[rows][:, cols], rtol=1e-4, atol=1e-4
    )
  # A uniform field has no inconsistency; an object's outline has.
  assert release.local_variance(np.full((20, 20), 3.0), 3).max() == 0
  assert release.local_variance(magnitude, 3)[16:20, 24:48].max() > 1


def test_centre_prior_and_clipping_match_release():
  rng = np.random.default_rng(0)
  fused = rng.random((45, 80)).astype(np.float32)
  opts = Options.from_kwargs({'centre_prior': 0.3}, 'release_probe')
  scorer = selection.Scorer(opts, 224, 14, 1)
  ours = np.clip(fused * maps.centre_prior(45, 80, 0.3, 0.35, 'release'), 0, 1)
  np.testing.assert_allclose(ours, ref_centre_prior(fused, 0.3), atol=1e-6)
  # Through the scorer: normalise, fuse (clipped), prior (clipped), uint8 storage.
  raw = maps.FrameMaps(
    rng.random((45, 80)).astype(np.float32) * 7, rng.random((45, 80)).astype(np.float32) * 40
  )
  got = scorer.fused(raw)
  norm_m = np.clip(raw.motion_HxW / max(np.percentile(raw.motion_HxW, 95), 1e-6), 0, 1)
  norm_r = np.clip(raw.residual_HxW / max(np.percentile(raw.residual_HxW, 95), 1.0), 0, 1)
  ref = ref_centre_prior(np.clip((norm_m + norm_r) / 2, 0, 1), 0.3)
  np.testing.assert_allclose(got, (ref * 255.0).astype(np.uint8) / 255.0, atol=1e-6)
  assert got.max() <= 1.0


@pytest.mark.parametrize(
  'p95,p50,static',
  [
    (125.0, 10.0, True),
    (127.0, 10.0, False),
    (200.0, 140.0, True),
    (200.0, 110.0, False),
    (251.0, 200.0, True),
    (253.0, 250.0, False),
  ],
)
def test_static_test_thresholds(p95, p50, static):
  # 100 patch means: 50 below p50's value, the rest placed so that the percentiles are exact.
  means = np.concatenate([np.full(50, p50), np.full(45, (p50 + p95) / 2), np.full(5, p95)])
  means = np.sort(means)
  got = release.is_static(means, 126.0, 0.38)
  assert got == ref_is_static(means, 126.0, 0.38)
  p95_now = np.percentile(means, 95)
  rel = (p95_now - np.percentile(means, 50)) / p95_now
  assert got == (p95_now < 126 or (p95_now < 252 and rel < 0.38))
  assert got == static or abs(p95_now - p95) > 1  # the constructed case is the one meant


@pytest.mark.parametrize('budget', [1, 3, 5, 99, 195, 196, 197, 595, 783, 784, 785, 1000])
def test_static_fallback_spreads_a_small_budget_as_the_release(budget):
  # A faint clip (patch means under 51 of 255: static by the release's test) on a 16 x 14 x 14
  # grid; t = 0 is the I-frame the probe zeroes. Four frames hold 784 patches.
  rng = np.random.default_rng(budget)
  scores = (rng.random((16, 14, 14)) * 0.2 * 16**2).astype(np.float32)
  kinds = ['I'] + ['P'] * 15
  probe = Options.from_kwargs({}, 'release_probe')
  repeats = np.zeros(16, bool)
  positions, whole, fallback = selection.choose(scores, kinds, repeats, budget, probe, 16)
  assert fallback and len(positions) == budget
  ranked = scores.astype(np.float64).reshape(-1) * 255.0
  ranked[: 14 * 14] = 0  # the zeroed I-frame
  flat = positions[:, 0] * 196 + positions[:, 1] * 14 + positions[:, 2]
  assert flat.tolist() == ref_static_fallback(ranked, budget, 196)
  assert list(whole) == ([0, 5, 10, 15] if budget >= 784 else [])


def test_static_spread_keeps_to_the_picture():
  # A letterbox's picture (rows 3-10 of 14): the spread places stay on it.
  valid = np.zeros((14, 14), bool)
  valid[3:11] = True
  flat = np.full((16, 14, 14), 0.1 * 16**2, np.float32)
  probe = Options.from_kwargs({}, 'release_probe')
  repeats = np.zeros(16, bool)
  positions, whole, fallback = selection.choose(flat, ['P'] * 16, repeats, 301, probe, 16, valid)
  assert fallback and not whole.size and len(positions) == 301
  assert valid[positions[:, 1], positions[:, 2]].all()
  assert sorted(set(positions[:, 0].tolist())) == [0, 5, 10, 15]
  assert np.bincount(positions[:, 0], minlength=16)[[0, 5, 10, 15]].tolist() == [76, 75, 75, 75]


def test_resize_matrices_follow_opencv():
  # INTER_LINEAR: x = (r + 0.5) * in / out - 0.5, clamped into the image; weights 1 - f, f.
  for size, new in ((10, 4), (7, 13), (272, 224)):
    linear = geometry.resize_matrix(size, new, 'linear')
    for r in range(new):
      x = (r + 0.5) * size / new - 0.5
      x0 = min(max(int(math.floor(x)), 0), size - 1)
      f = 0.0 if x < 0 or x0 >= size - 1 else x - math.floor(x)
      expected = np.zeros(size)
      expected[x0] += 1 - f
      expected[min(x0 + 1, size - 1)] += f
      np.testing.assert_allclose(linear[r], expected, atol=1e-12)
    cubic = geometry.resize_matrix(size, new, 'cubic')
    np.testing.assert_allclose(cubic.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(geometry.resize_matrix(size, new, 'area').sum(axis=1), 1.0)
  # Same size: every kernel is the identity.
  for kind in geometry.RESAMPLES:
    np.testing.assert_allclose(geometry.resize_matrix(9, 9, kind), np.eye(9), atol=1e-12)
  # Area patch sums equal today's exact integrators.
  ry, rx = geometry.canvas_matrices(180, 320, 224, 'crop', 'area')
  ay, ax = geometry.patch_integrators(180, 320, 224, 14)
  np.testing.assert_allclose(ry.reshape(16, 14, -1).sum(1), ay, atol=1e-4)
  np.testing.assert_allclose(rx.reshape(16, 14, -1).sum(1), ax, atol=1e-4)


@pytest.mark.parametrize('hw', [(1080, 1920), (1920, 1080), (272, 640), (480, 480), (144, 176)])
def test_letterbox_geometry_matches_stage1(hw):
  (hn, wn, top, left), mask = ref_letterbox(*hw)
  box = geometry.canvas(*hw, 576, 'letterbox')
  assert (box.new_h, box.new_w, box.top, box.left) == (hn, wn, top, left)
  np.testing.assert_array_equal(geometry.valid_patches(*hw, 576, 16, 'letterbox'), mask)
  # A map of ones integrates to a full patch inside the picture and to nothing on the padding.
  ay, ax = geometry.patch_integrators(*hw, 576, 16, 'letterbox')
  sums = ay @ np.ones(hw, np.float32) @ ax.T
  np.testing.assert_allclose(sums[mask], 256, rtol=1e-4)
  edges = np.arange(37) * 16
  outside = (
    (edges[1:, None] <= top)
    | (edges[:-1, None] >= top + hn)
    | (edges[None, 1:] <= left)
    | (edges[None, :-1] >= left + wn)
  )
  assert np.all(sums[outside] == 0)


def test_llava_topk_matches_stage1():
  rng = np.random.default_rng(3)
  _, valid = ref_letterbox(272, 640)
  scores = rng.random((64, 36, 36)).astype(np.float32)
  scores[:, ~valid] = 0  # fused padding is 0 in stage1
  opts = Options.from_kwargs({}, 'release_llava')
  positions, whole, _ = selection.choose(
    scores, ['P'] * 64, np.zeros(64, bool), 10368, opts, 16, valid
  )
  assert list(whole) == [0]
  assert {tuple(int(v) for v in p) for p in positions} == ref_llava_topk(
    scores.reshape(64, -1), valid
  )


def test_train_and_probe_policies():
  rng = np.random.default_rng(4)
  scores = rng.random((16, 14, 14)).astype(np.float32) + 1
  kinds = ['I'] + ['P'] * 7 + ['I'] + ['P'] * 7
  train = Options.from_kwargs({}, 'release_train')
  positions, whole, fallback = selection.choose(scores, kinds, np.zeros(16, bool), 1000, train, 16)
  # Only t = 0 is zeroed (the release assumes frame 0 is the clip's only I-frame).
  assert not whole.size and not fallback
  assert 0 not in positions[:, 0] and 8 in positions[:, 0]
  probe = Options.from_kwargs({'static_fallback': False}, 'release_probe')
  positions, _, _ = selection.choose(scores, kinds, np.zeros(16, bool), 1000, probe, 16)
  assert 0 not in positions[:, 0] and 8 not in positions[:, 0]  # every sampled I-frame zeroed
  # The static test over all patch means: a flat clip keeps 4 evenly spaced frames whole.
  flat = np.full((16, 14, 14), 0.2 * 256, np.float32)  # patch mean 51 of 255
  probe = Options.from_kwargs({}, 'release_probe')
  _, whole, fallback = selection.choose(flat, kinds, np.zeros(16, bool), 1000, probe, 16)
  assert fallback and list(whole) == [0, 5, 10, 15]


def test_presets_and_overrides():
  opts = Options.from_kwargs({'centre_prior': 0.0, 'gop': None}, 'release_probe')
  assert opts.centre_prior == 0.0 and opts.gop is None and opts.camera_compensation == 'similarity'
  assert opts.static_threshold == 126.0 and opts.static_rel_threshold == 0.38
  assert Options.from_kwargs({}, 'release_train').policy == 'zero_first'
  llava = Options.from_kwargs({}, 'release_llava')
  assert (llava.geometry, llava.policy, llava.camera_compensation) == (
    'letterbox',
    'first_frame',
    'median',
  )
  assert (
    llava.whole_pixel_vectors and not Options.from_kwargs({}, 'release_probe').whole_pixel_vectors
  )
  with pytest.raises(ValueError, match="whole_pixel_vectors=True needs maths='release'"):
    Options.from_kwargs({'whole_pixel_vectors': True})
  with pytest.raises(ValueError, match="preset='release'.*release_train"):
    Options.from_kwargs({}, 'release')
  with pytest.raises(ValueError, match='motion_inconsistency.*odd'):
    Options.from_kwargs({'motion_inconsistency': 4})


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope='module')
def moving_clip():
  return synthetic.make_clip(5, num_frames=48, height=144, width=256, bframes=2, gop=24)


@pytest.mark.parametrize(
  'preset,grid',
  [
    ('release_train', dict(patch_size=16, budget=1500)),
    ('release_probe', dict(budget=1500)),
    ('release_llava', dict(resolution=576, patch_size=16, budget=8 * 1296)),
  ],
)
def test_presets_end_to_end(moving_clip, preset, grid):
  sel = codec.select(moving_clip.data, num_frames=48, preset=preset, **grid)
  resolution, ps = grid.get('resolution', 224), grid['patch_size'] if 'patch_size' in grid else 14
  assert len(sel.positions) == grid['budget']
  assert np.all(np.diff(sel.positions[:, 0]) >= 0)
  opts = Options.from_kwargs({}, preset)
  valid = geometry.valid_patches(144, 256, resolution, ps, opts.geometry)
  if preset == 'release_llava':
    assert not sel.transcoded and list(sel.whole_frames) == [0]
    assert (sel.positions[:, 0] == 0).sum() == 36 * 36
    later = sel.positions[sel.positions[:, 0] > 0]
    assert valid[later[:, 1], later[:, 2]].all()  # never on padding after frame 0
    coverage = _letterbox_coverage(moving_clip, sel.frame_ids, resolution, ps)
  else:
    assert sel.transcoded and 0 not in sel.positions[:, 0]  # GOP-16 re-encode, t = 0 zeroed
    coverage = moving_clip.coverage(sel.frame_ids, resolution, ps)
  moving = coverage >= 0.1
  later = sel.positions[sel.positions[:, 0] > 0]
  share = moving[tuple(later.T)].mean()
  chance = moving[1:][np.broadcast_to(valid, moving[1:].shape)].mean()
  assert share > 2 * chance, (share, chance)


def test_repeated_frames_score_as_each_release_path():
  """A clip shorter than T repeats frames on the timeline. The probe loader maps each frame to
  its last position (idx2pos = {fid: i}, the later i wins) and leaves the other copies zero;
  stage1 builds a map for every position; ours scores the first copy by default."""
  clip = synthetic.make_clip(2, num_frames=24, height=96, width=128, num_objects=2)
  grid = dict(num_frames=64, budget=512, resolution=224, patch_size=14)
  sels = {
    how: codec.select(clip.data, **grid, repeated_frames=how) for how in ('first', 'last', 'all')
  }
  ids = sels['first'].frame_ids
  assert len(set(ids.tolist())) == 24 and ids.size == 64
  first = {int(f): i for i, f in reversed(list(enumerate(ids)))}
  last = {int(f): i for i, f in enumerate(ids)}  # the release's idx2pos
  per_frame = {f: sels['first'].scores[i] for f, i in first.items()}
  for how, kept in (('first', first), ('last', last), ('all', None)):
    scores = sels[how].scores
    for t, f in enumerate(ids.tolist()):
      want = per_frame[f] if kept is None or kept[f] == t else np.zeros_like(per_frame[f])
      np.testing.assert_array_equal(scores[t], want, err_msg=f'{how} t={t}')
  # A policy keeps whole (or zeroes) one copy of a frame only: the first, with 'all' too.
  paper = dict(num_frames=64, budget=2048, policy='paper', gop=8)
  wholes = [codec.select(clip.data, **paper, repeated_frames=how) for how in ('first', 'all')]
  assert list(wholes[1].whole_frames) == list(wholes[0].whole_frames)
  kept = wholes[1].frame_ids[wholes[1].whole_frames]
  assert len(set(kept.tolist())) == len(kept) > 1
  assert Options.from_kwargs({}, 'release_probe').repeated_frames == 'last'
  assert Options.from_kwargs({}, 'release_llava').repeated_frames == 'all'
  with pytest.raises(ValueError, match="repeated_frames='every'.*'first', 'last', 'all'"):
    Options.from_kwargs({'repeated_frames': 'every'})


def test_probe_keyframes_are_the_source_reencodes_and_at_most_8_are_zeroed():
  """The probe loader zeroes the sampled frames that are keyframes of its GOP-16 re-encode of
  the whole source (decord's key indices: source frames 0, 16, 32, ...), at most 8 of them
  (`I_list[:tokeq_target_frames]`). 253 frames at T = 64 sample 16 such frames."""
  clip = synthetic.make_clip(4, num_frames=253, height=96, width=128)
  opts = dict(preset='release_probe', static_fallback=False, budget=2048)
  sel = codec.select(clip.data, num_frames=64, **opts)
  on_keyframes = [t for t, f in enumerate(sel.frame_ids) if f % 16 == 0]
  assert len(on_keyframes) == 16
  kinds = [PICTURE_TYPES[k] for k in sel.picture_types]
  assert [t for t, k in enumerate(kinds) if k == 'I'] == on_keyframes
  zeroed = on_keyframes[:8]  # what the release zeroes
  assert not set(sel.positions[:, 0].tolist()) & set(zeroed)
  # ... and only those: with every score equal the top-K takes every other frame whole.
  probe = Options.from_kwargs({'static_fallback': False}, 'release_probe')
  ones = np.ones((64, 16, 16), np.float32)
  positions, _, _ = selection.choose(ones, kinds, np.zeros(64, bool), 56 * 256, probe, 14)
  assert sorted(set(positions[:, 0].tolist())) == sorted(set(range(64)) - set(zeroed))
  # The faithful transcode puts its I-frames on the same source frames.
  ids = np.unique(sel.frame_ids)
  packets, _, _ = transcode.transcode_segment(clip.data, ids, 96, 128, 16, 23, 'source')
  coded = [f.pict_type for f, _ in transcode.h264_packet_frames(packets)]
  intra = [i for i, kind in enumerate(coded) if int(kind) == int(av.video.frame.PictureType.I)]
  assert intra == list(range(0, ids[-1] + 1, 16))


def _letterbox_coverage(clip, frame_ids, resolution, ps):
  ay, ax = geometry.patch_integrators(clip.height, clip.width, resolution, ps, 'letterbox')
  masks = clip.masks[np.minimum(frame_ids, clip.num_frames - 1)].astype(np.float32)
  return (ay @ masks @ ax.T) / ps**2


@pytest.mark.parametrize('kernels', [True, False])
@pytest.mark.parametrize('kind', ['levels', 'zeros', 'normal'])
def test_top_indices_is_the_stable_sort_prefix(kind, kernels, monkeypatch):
  # The top-K of `choose`: the same set as a stable argsort of -scores, ties (many, and -0.0
  # against 0.0) taken in index order, at every count from 0 to all; through the compiled order
  # statistics and through np.partition.
  if not kernels:
    monkeypatch.setattr(maps, 'KERNELS', None)
  rng = np.random.default_rng(len(kind))
  values = {
    'levels': rng.integers(0, 5, 700).astype(np.float32),
    'zeros': np.where(rng.random(700) < 0.5, np.float32(0.0), rng.random(700).astype(np.float32)),
    'normal': rng.normal(0, 1, 700).astype(np.float32),
  }[kind]
  values[::7] = -0.0 if kind == 'zeros' else values[::7]
  order = np.argsort(-values, kind='stable')
  for count in [0, 1, 2, 13, 140, 350, 699, 700]:
    got = selection.top_indices(values, count)
    assert got.tolist() == sorted(order[:count].tolist()), count
