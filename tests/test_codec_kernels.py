"""The compiled map kernels (data_pipeline/codec/kernels.py) against the numpy reference in
`maps`, bit for bit: each pass on random inputs (borders, overlaps, ties, odd sizes), then whole
selections on encoded clips with the kernels on and off."""

import functools
import os

import numpy as np
import pytest

from data_pipeline import codec, synthetic
from data_pipeline.codec import geometry as geometry_lib
from data_pipeline.codec import kernels, maps, rank_kernels, release_motion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# FFmpeg's MOTION_VECTORS side data as PyAV hands it over.
VECTOR_DTYPE = np.dtype(
  dict(
    names=[
      'source', 'w', 'h', 'src_x', 'src_y', 'dst_x', 'dst_y', 'flags', 'motion_x', 'motion_y',
      'motion_scale',
    ],
    formats=['<i4', 'u1', 'u1', '<i2', '<i2', '<i2', '<i2', '<u8', '<i4', '<i4', '<u2'],
    offsets=[0, 4, 5, 6, 8, 10, 12, 16, 24, 28, 32],
    itemsize=40,
    aligned=True,
  )
)  # fmt: skip


def both(monkeypatch, function, *args):
  """function(*args) with the kernels, then with the numpy reference."""
  assert maps.KERNELS is kernels
  fast = function(*args)
  with monkeypatch.context() as patch:
    patch.setattr(maps, 'KERNELS', None)
    reference = function(*args)
  return fast, reference


def assert_identical(fast, reference):
  assert fast.dtype == reference.dtype and fast.shape == reference.shape
  np.testing.assert_array_equal(fast, reference, strict=True)
  # array_equal calls -0.0 and 0.0 equal; the bits must match as well.
  assert fast.tobytes() == reference.tobytes()


def random_vectors(rng, count, height, width):
  """Blocks of H.264 sizes anywhere around the frame (some past its edges, many overlapping),
  both directions, quarter-pel motion, and a few with motion_scale 0 (a broken stream)."""
  vectors = np.zeros(count, VECTOR_DTYPE)
  vectors['source'] = rng.choice([-1, 1, -2, 2], count)
  vectors['w'] = rng.choice([4, 8, 16], count)
  vectors['h'] = rng.choice([4, 8, 16], count)
  vectors['dst_x'] = rng.integers(-12, width + 12, count)
  vectors['dst_y'] = rng.integers(-12, height + 12, count)
  vectors['motion_x'] = rng.integers(-300, 300, count)
  vectors['motion_y'] = rng.integers(-300, 300, count)
  vectors['motion_scale'] = np.where(rng.random(count) < 0.05, 0, 4)
  vectors['src_x'] = vectors['dst_x'] + rng.integers(-20, 20, count)
  vectors['src_y'] = vectors['dst_y'] + rng.integers(-20, 20, count)
  return vectors


@pytest.mark.parametrize('height,width', [(64, 96), (61, 83), (17, 250)])
@pytest.mark.parametrize('direction', [-1, 1])
def test_paint_vectors(monkeypatch, height, width, direction):
  rng = np.random.default_rng(height * width)
  vectors = random_vectors(rng, 400, height, width)
  fast, reference = both(monkeypatch, maps.paint_vectors, vectors, height, width, direction)
  for name in ('dx_HcxWc', 'dy_HcxWc', 'has_HcxWc'):
    assert_identical(getattr(fast, name), getattr(reference, name))
  assert reference.has_HcxWc.any() and not reference.has_HcxWc.all()
  # The kernel's lengths (one hypot a block) are numpy's hypot of the painted cells.
  assert reference.length_HcxWc is None
  lengths = np.where(reference.has_HcxWc, np.hypot(reference.dx_HcxWc, reference.dy_HcxWc), 0)
  assert_identical(fast.length_HcxWc, lengths.astype(np.float32))


def test_paint_directions_flags_future_blocks(monkeypatch):
  """Both grids in one pass, and whether any block refers to the future (a block past the
  frame's edge counts too: it is coded, just not painted), compiled as numpy."""
  rng = np.random.default_rng(5)
  vectors = random_vectors(rng, 300, 64, 96)
  for source, future in ((vectors['source'], True), (-np.abs(vectors['source']), False)):
    vectors['source'] = source
    vectors['dst_x'][-1], vectors['source'][-1] = 400, 1 if future else -1  # off the frame
    fast, reference = both(monkeypatch, maps.paint_directions, vectors, 64, 96)
    assert fast[2] is reference[2] is future
    for got, want in zip(fast[:2], reference[:2]):
      for name in ('dx_HcxWc', 'dy_HcxWc', 'has_HcxWc'):
        assert_identical(getattr(got, name), getattr(want, name))
  vectors['source'][:-1], vectors['source'][-1] = -1, 1  # only the off-frame block is future
  fast, reference = both(monkeypatch, maps.paint_directions, vectors, 64, 96)
  assert fast[2] is reference[2] is True and not fast[1].has_HcxWc.any()


def random_grid(rng, hc, wc, moving_share, reach):
  """Quarter-pel vectors up to `reach` coded pixels (far past the borders for large reach) on a
  share of the cells, zero elsewhere; -0.0 in some still cells."""
  dx = (rng.integers(-4 * reach, 4 * reach + 1, (hc, wc)) / 4).astype(np.float32)
  dy = (rng.integers(-4 * reach, 4 * reach + 1, (hc, wc)) / 4).astype(np.float32)
  still = rng.random((hc, wc)) >= moving_share
  dx[still], dy[still] = 0, 0
  dx[still & (rng.random((hc, wc)) < 0.5)] = -0.0
  return maps.VectorGrid(dx, dy, rng.random((hc, wc)) < 0.8)


@pytest.mark.parametrize('step', [1, 2, 3, 4])
@pytest.mark.parametrize('moving_share', [0.0, 0.1, 0.6, 1.0])
@pytest.mark.parametrize('reach', [3, 40])
def test_predict(monkeypatch, step, moving_share, reach):
  rng = np.random.default_rng([step, int(moving_share * 10), reach])
  h, w = 61, 83  # analysis size; the coded frame is step times larger, cells don't align
  ref = rng.uniform(0, 255, (h, w)).astype(np.float32)
  grid = random_grid(rng, -(-h * step // maps.CELL), -(-w * step // maps.CELL), moving_share, reach)
  fast, reference = both(monkeypatch, maps.predict, ref, grid, step)
  assert_identical(fast, reference)
  assert_residual_in_the_same_pass(monkeypatch, rng, ref, grid, step, reference)


def assert_residual_in_the_same_pass(monkeypatch, rng, ref, grid, step, prediction):
  """`predict` with `minus` (a frame's luma) gives |luma - prediction|, compiled and numpy."""
  luma = rng.uniform(0, 255, ref.shape).astype(np.float32)
  fast, reference = both(monkeypatch, maps.predict, ref, grid, step, luma)
  assert_identical(fast, reference)
  assert_identical(fast, np.abs(luma - prediction))


def blocky(cells, size=4):
  """Each size x size group of cells takes its first cell's value: runs of equal cells along a
  row, as H.264's 16x16 blocks and still backgrounds paint them (cropped to the grid)."""
  hc, wc = cells.shape
  return np.repeat(np.repeat(cells[::size, ::size], size, 0), size, 1)[:hc, :wc].copy()


@pytest.mark.parametrize('step', [1, 2, 3])
@pytest.mark.parametrize('moving_share', [0.3, 1.0])
@pytest.mark.parametrize('reach', [3, 40])
def test_predict_on_runs_of_cells(monkeypatch, step, moving_share, reach):
  """Runs of cells with one vector are predicted as one stretch: still identical, near the
  borders too (a run that starts inside and ends past an edge)."""
  rng = np.random.default_rng([7, step, reach])
  h, w = 61, 83
  ref = rng.uniform(0, 255, (h, w)).astype(np.float32)
  grid = random_grid(rng, -(-h * step // maps.CELL), -(-w * step // maps.CELL), moving_share, reach)
  grid = maps.VectorGrid(blocky(grid.dx_HcxWc), blocky(grid.dy_HcxWc), grid.has_HcxWc)
  fast, reference = both(monkeypatch, maps.predict, ref, grid, step)
  assert_identical(fast, reference)
  assert_residual_in_the_same_pass(monkeypatch, rng, ref, grid, step, reference)


@pytest.mark.parametrize('camera', ['none', 'median', 'mean', 'similarity', 'affine'])
@pytest.mark.parametrize('distances', [(1, 2), (3, 0), (0, 2), (0, 0)])
def test_motion_magnitude(monkeypatch, camera, distances):
  """Motion per cell from 0, 1 or 2 directions, each camera compensation (the affine fit's
  float64 flow takes the numpy path; the kernel serves float32 vectors)."""
  rng = np.random.default_rng([len(camera), *distances])
  grids = [random_grid(rng, 23, 37, 0.7, 12) for _ in range(2)]
  fast, reference = both(monkeypatch, maps.motion_magnitude, grids, distances, camera)
  assert_identical(fast, reference)
  if distances == (0, 0):
    assert not reference.any()
  # Blocks: one vector over runs of 1-4 cells of a row (the kernel reuses a run's hypot), with
  # coded and uncoded cells inside a run and -0.0 beside 0.0.
  blocky = []
  for grid in grids:
    runs = np.repeat(np.arange(37), rng.integers(1, 5, 37))[:37]
    blocky.append(maps.VectorGrid(grid.dx_HcxWc[:, runs], grid.dy_HcxWc[:, runs], grid.has_HcxWc))
  fast, reference = both(monkeypatch, maps.motion_magnitude, blocky, distances, camera)
  assert_identical(fast, reference)
  # Lengths given with the grids (as `paint` gives them): read, not worked out, for 'none'.
  for grid in blocky:
    hypot = np.hypot(grid.dx_HcxWc, grid.dy_HcxWc)
    grid.length_HcxWc = np.where(grid.has_HcxWc, hypot, 0).astype(np.float32)
  fast, reference = both(monkeypatch, maps.motion_magnitude, blocky, distances, camera)
  assert_identical(fast, reference)


# Every step compiled as a constant (2 to SMALL_STEPS), and two of the general path.
@pytest.mark.parametrize('step', [*range(2, kernels.SMALL_STEPS + 1), 9, 16])
@pytest.mark.parametrize('height,width', [(64, 96), (61, 83), (722, 1283)])
def test_downscale(monkeypatch, step, height, width):
  luma = np.random.default_rng(step).integers(0, 256, (height, width)).astype(np.uint8)
  luma[:16] = 255  # full blocks of the largest level: the integer sums must not wrap
  assert_identical(*both(monkeypatch, maps.downscale, luma, step))
  # A decoder's plane: rows padded to a line size, read in place (`bitstream.luma_of`).
  padded = np.zeros((height, width + 29), np.uint8)
  padded[:, :width] = luma
  for got in both(monkeypatch, maps.downscale, padded[:, :width], step):
    assert_identical(got, maps.downscale(luma, step))


@pytest.mark.parametrize('step', [kernels.MAX_STEP, kernels.MAX_STEP + 1])
def test_downscale_largest_steps(monkeypatch, step):
  # All 255: the kernel's uint16 column sums reach step * 255 = 65535 at MAX_STEP, and a larger
  # step takes the numpy path (uint32 sums).
  luma = np.full((2 * step + 3, 3 * step + 1), 255, np.uint8)
  luma[step:, : step + 1] = np.arange(step + 1, dtype=np.uint8)[::-1]
  fast, reference = both(monkeypatch, maps.downscale, luma, step)
  assert_identical(fast, reference)
  area = np.float32(step * step)
  assert fast.shape == (2, 3) and fast[0, 0] == np.float32(255 * step * step) / area


@pytest.mark.parametrize('step', [1, 3])
def test_bipredicted_residual(monkeypatch, step):
  rng = np.random.default_rng(step)
  h, w = 61, 83
  luma, p0, p1 = (rng.uniform(0, 255, (h, w)).astype(np.float32) for _ in range(3))
  coded = rng.integers(0, 4, (-(-h * step // maps.CELL), -(-w * step // maps.CELL)), np.uint8)
  for codes in (coded, blocky(coded, 3)):
    fast, reference = both(monkeypatch, maps.bipredicted_residual, luma, p0, p1, codes, step)
    assert_identical(fast, reference)


@pytest.mark.parametrize('dtype', [np.float32, np.uint8, bool])
@pytest.mark.parametrize('step', [1, 2, 3])
def test_cells_to_pixels(monkeypatch, dtype, step):
  rng = np.random.default_rng(step)
  h, w = 47, 59
  cells = (rng.random((-(-h * step // maps.CELL), -(-w * step // maps.CELL))) * 200).astype(dtype)
  assert_identical(*both(monkeypatch, maps.cells_to_pixels, cells, h, w, step))
  assert_identical(*both(monkeypatch, maps.cells_to_pixels, blocky(cells, 5), h, w, step))


@pytest.mark.parametrize('step', [1, 2, 3])
@pytest.mark.parametrize('coded_share', [0.0, 0.05, 0.7, 1.0])
def test_masked_error(monkeypatch, step, coded_share):
  """The reference choice's error: the same float32 mean as numpy's, over the coded cells'
  pixels (all pixels when no cell is coded)."""
  rng = np.random.default_rng([step, int(coded_share * 100)])
  h, w = 67, 91
  luma, prediction = (rng.uniform(0, 255, (h, w)).astype(np.float32) for _ in range(2))
  has = rng.random((-(-h * step // maps.CELL), -(-w * step // maps.CELL))) < coded_share
  fast, reference = both(monkeypatch, maps.masked_error, luma, prediction, has, step)
  assert type(fast) is float and fast == reference
  mask = maps.cells_to_pixels(has, h, w, step)
  terms = np.abs(luma - prediction)[mask] if mask.any() else np.abs(luma - prediction)
  assert reference == float(np.mean(terms))


def random_maps(rng, kind, shape=(120, 170)):
  if kind == 'exponential':
    return rng.exponential(2.0, shape).astype(np.float32)
  if kind == 'sparse':  # mostly zero: the 95th percentile sits among ties
    out = np.zeros(shape, np.float32)
    out[rng.random(shape) < 0.03] = 5.0
    return out
  if kind == 'signed':  # both signs, and -0.0 among the zeros
    out = rng.normal(0, 3, shape).astype(np.float32)
    out[rng.random(shape) < 0.2] = -0.0
    return out
  if kind == 'constant':
    return np.full(shape, 2.5, np.float32)
  return rng.integers(0, 4, shape).astype(np.float32)  # 'levels': a few values, many ties


@pytest.mark.parametrize('kind', ['exponential', 'sparse', 'levels', 'signed', 'constant'])
def test_percentile(monkeypatch, kind):
  rng = np.random.default_rng(len(kind))
  values = random_maps(rng, kind)
  for q in (maps.PERCENTILE, 0.0, 50.0, 99.99, 100.0):
    fast, reference = both(monkeypatch, maps.percentile, values, q)
    assert fast == reference == float(np.percentile(values, q)), q


@pytest.mark.parametrize('kind', ['exponential', 'sparse', 'levels', 'signed'])
@pytest.mark.parametrize('step', [1, 2, 3])
def test_percentile_of_cells(monkeypatch, kind, step):
  """A map constant over cells has the percentile of its cells weighted by their pixels."""
  rng = np.random.default_rng([len(kind), step])
  h, w = 120, 170
  cells = random_maps(rng, kind, (-(-h * step // maps.CELL), -(-w * step // maps.CELL)))
  pixels = maps.cells_to_pixels(cells, h, w, step)
  weights = maps.cell_weights(h, w, *cells.shape, step)
  fast, reference = both(monkeypatch, maps.percentile, cells, maps.PERCENTILE, weights)
  assert fast == reference == float(np.percentile(pixels, maps.PERCENTILE))


def test_order_statistics():
  """Ranks of float32 values by their bits: negatives, -0.0 beside 0.0, subnormals, huge values,
  weights, and both ranks in one radix bin or in two."""
  rng = np.random.default_rng(5)
  special = np.array([-0.0, 0.0, 1e-45, -1e-45, 3e38, -3e38, 1.0, 1.0000001], np.float32)
  values = np.concatenate([special, rng.normal(0, 10, 5000).astype(np.float32)])
  ordered = np.sort(values)
  for lo in [0, 1, 2, 3, 7, 2500, 5006, 5007]:
    for hi in {lo, min(lo + 1, values.size - 1)}:
      a, b = rank_kernels.order_statistics(values, np.zeros(0, np.int64), lo, hi)
      assert (a, b) == (ordered[lo], ordered[hi])
  weights = rng.integers(0, 5, values.size)
  repeated = np.sort(np.repeat(values, weights))
  for lo in [0, 100, repeated.size // 2, repeated.size - 2]:
    a, b = rank_kernels.order_statistics(values, weights, lo, lo + 1)
    assert (a, b) == (repeated[lo], repeated[lo + 1])


def test_order_statistics_every_rank():
  """Every rank of small multisets drawn from values at the bins' edges: both zeros beside the
  subnormals that share their bins (0 and 2048), ranks either side of 0, and two ranks in bins
  with empty bins between them, of one sign or of both; unweighted and weighted."""
  pool = np.array(
    [-3e38, -2.0, -1.0000001, -1.0, -1e-40, -1e-45, -0.0, 0.0, 1e-45, 1e-40, 1.0, 1.0000001,
     1.125, 7.0, 3e38],
    np.float32,
  )  # fmt: skip
  rng = np.random.default_rng(11)
  for draw in range(300):
    values = rng.choice(pool, size=int(rng.integers(1, 40)))
    if draw % 3 == 0:  # mostly zeros, as a still scene's maps
      values[rng.random(values.size) < 0.8] = 0.0
    ordered = np.sort(values)
    for lo in range(values.size):
      for hi in {lo, min(lo + 1, values.size - 1)}:
        a, b = rank_kernels.order_statistics(values, np.zeros(0, np.int64), lo, hi)
        assert (a, b) == (ordered[lo], ordered[hi]), (values, lo, hi)
    weights = rng.integers(0, 4, values.size)
    repeated = np.sort(np.repeat(values, weights))
    for lo in range(repeated.size - 1):
      a, b = rank_kernels.order_statistics(values, weights, lo, lo + 1)
      assert (a, b) == (repeated[lo], repeated[lo + 1]), (values, weights, lo)


def test_order_statistics_stay_in_bounds_under_numba_boundscheck(tmp_path):
  """The order-statistics tests above again with numba's bounds checks on
  (NUMBA_BOUNDSCHECK=1, compiled afresh into an empty cache): an index past an array, such as a
  `room` allocation bound too small for what `_gather` writes, raises there instead of writing
  past the buffer unseen. First, that the variable does turn the checks on with this numba."""
  import subprocess
  import sys

  env = dict(os.environ, NUMBA_BOUNDSCHECK='1', NUMBA_CACHE_DIR=str(tmp_path / 'numba'))
  probe = (
    'import numba, numpy as np\n'
    '@numba.njit\n'
    'def past(a):\n'
    '  a[a.shape[0]] = 1.0\n'
    'try:\n'
    '  past(np.zeros(3))\n'
    'except IndexError as e:\n'
    '  print("checked:", e)\n'
  )
  out = subprocess.run(
    [sys.executable, '-c', probe], env=env, capture_output=True, text=True, timeout=120
  )
  assert out.stdout.startswith('checked: index is out of bounds'), out.stdout + out.stderr
  # The two order-statistics tests above, called in a fresh interpreter (no pytest start-up).
  run = (
    'import test_codec_kernels as t\n'
    't.test_order_statistics()\n'
    't.test_order_statistics_every_rank()\n'
    'print("in bounds")\n'
  )
  tests = subprocess.run(
    [sys.executable, '-c', run],
    env=dict(env, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), REPO])),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert tests.returncode == 0 and tests.stdout == 'in bounds\n', tests.stdout + tests.stderr


@pytest.mark.parametrize('kind', ['exponential', 'sparse', 'levels'])
@pytest.mark.parametrize(
  'fusion,weights', [('mean', (1.0, 1.0)), ('mean', (2.0, 1.0)), ('geomean', (1.0, 1.0))]
)
def test_normalise_fuse(monkeypatch, kind, fusion, weights):
  rng = np.random.default_rng(len(kind))
  motion, residual = random_maps(rng, kind), 40 * random_maps(rng, 'exponential')
  raw = maps.FrameMaps(motion, residual)
  fast, reference = both(monkeypatch, maps.normalise_fuse, raw, fusion, *weights)
  assert_identical(fast, reference)
  # The reference is the two steps it replaces.
  steps = maps.fuse(
    maps.normalise(motion, maps.MOTION_FLOOR),
    maps.normalise(residual, maps.RESIDUAL_FLOOR),
    fusion,
    *weights,
  )
  assert_identical(reference, steps)


@pytest.mark.parametrize('step', [1, 2, 3])
@pytest.mark.parametrize('fusion,weights', [('mean', (1.0, 1.0)), ('max', (1.0, 2.0))])
def test_normalise_fuse_of_motion_cells(monkeypatch, step, fusion, weights):
  # The motion as cells (runs of equal cells, zeros, -0.0, values past the p95) against the
  # same motion expanded to pixels: one result, with the kernels and without.
  rng = np.random.default_rng(step)
  h, w = 61, 83
  hc, wc = -(-h * step // maps.CELL), -(-w * step // maps.CELL)
  cells = np.repeat(rng.exponential(2.0, (hc, wc // 3 + 1)).astype(np.float32), 3, axis=1)
  cells = cells[:, :wc].copy()
  cells[rng.random((hc, wc)) < 0.3] = 0.0
  cells[0, :5] = -0.0
  residual = 40 * random_maps(rng, 'exponential')[:h, :w].copy()
  weights_cells = maps.cell_weights(h, w, hc, wc, step)
  expanded = maps.FrameMaps(maps.cells_to_pixels(cells, h, w, step), residual)
  as_cells = maps.FrameMaps(None, residual, motion_cells=(cells, weights_cells), step=step)
  assert as_cells.motion_map().shape == (h, w)
  as_cells.motion_HxW = None
  part = (slice(7, 50), slice(20, 61))
  for raw in (expanded, as_cells):
    fast, reference = both(monkeypatch, maps.normalise_fuse, raw, fusion, *weights)
    assert_identical(fast, reference)
    assert_identical(fast, maps.normalise_fuse(expanded, fusion, *weights))
    # A part alone (the scales still the whole frame's): the whole map's values there.
    of_part = functools.partial(maps.normalise_fuse, part=part)
    for got in both(monkeypatch, of_part, raw, fusion, *weights):
      assert_identical(got, np.ascontiguousarray(fast[part]))


SELECTIONS = [
  # B-frames (two candidate references, bi-prediction), analysed at step 2 with a pan.
  (dict(seed=21, height=464, width=496, bframes=2, background='pan', num_objects=2), {}),
  (dict(seed=22, bframes=3, num_objects=3), dict(camera_compensation='similarity')),
  (dict(seed=23, bframes=2, background='pan'), dict(preset='release_probe')),
]


@pytest.mark.parametrize('clip_kwargs,select_kwargs', SELECTIONS)
def test_selection_with_and_without_kernels(monkeypatch, clip_kwargs, select_kwargs):
  clip = synthetic.make_clip(num_frames=40, **clip_kwargs)

  def run():
    return codec.select(clip.data, num_frames=32, budget=1024, **select_kwargs)

  fast, reference = both(monkeypatch, run)
  assert_identical(fast.scores, reference.scores)
  for name in ('frame_ids', 'positions', 'picture_types', 'whole_frames'):
    assert_identical(getattr(fast, name), getattr(reference, name))
  assert fast.static_fallback == reference.static_fallback
  assert reference.vectors_past > 0


def test_jit_compiles_without_a_cache_folder(monkeypatch):
  """Where numba finds no writable cache folder it refuses cache=True at decoration; `jit`
  then compiles in memory."""
  real_njit = kernels.numba.njit

  def njit(**options):
    if options.get('cache'):
      raise RuntimeError('cannot cache function: no locator available for file')
    return real_njit(**options)

  monkeypatch.setattr(kernels.numba, 'njit', njit)

  def twice(x):
    return 2 * x

  assert kernels.jit(twice)(21) == 42


@pytest.mark.parametrize('geometry', ['crop', 'letterbox'])
@pytest.mark.parametrize(
  'height,width,step', [(61, 83, 1), (272, 640, 1), (240, 426, 3), (480, 270, 2)]
)
def test_patch_sums(monkeypatch, geometry, height, width, step):
  # The banded patch integrators (edge bands clamped to the last row / column, zero weights
  # past the end) on maps of every scale, zeros and -0.0 included.
  rng = np.random.default_rng([height, width, step])
  matrices = geometry_lib.patch_integrators(height, width, 224, 14, geometry, step)
  bands = tuple(geometry_lib.Band.of(m) for m in matrices)
  h, w = height // step, width // step
  for scale in (1.0, 1e-30, 3e30):
    map_HxW = (rng.exponential(1.0, (h, w)) * scale).astype(np.float32)
    map_HxW[rng.random((h, w)) < 0.2] = -0.0
    fast, reference = both(monkeypatch, maps.to_patches_banded, map_HxW, bands)
    assert_identical(fast, reference)
    assert fast.shape == (16, 16)
    # The part of the map the bands read gives the same sums (the scorer fuses only that part).
    part, moved = geometry_lib.read_part(bands, h, w)
    read = np.ascontiguousarray(map_HxW[part])
    assert_identical(maps.to_patches_banded(read, moved), fast)
  if geometry == 'crop' and width > 2 * height:  # a wide frame's centre crop: its middle only
    assert part[0] == slice(0, h) and part[1].stop - part[1].start < 0.5 * w


@pytest.mark.parametrize('resample', ['area', 'linear', 'cubic'])
@pytest.mark.parametrize('geometry', ['crop', 'letterbox'])
@pytest.mark.parametrize(
  'height,width,step,resolution', [(272, 640, 1, 224), (240, 426, 3, 224), (144, 176, 1, 576)]
)
def test_canvas_resize(monkeypatch, resample, geometry, height, width, step, resolution):
  # The presets' resize onto the canvas (Ry @ map @ Rx.T) runs through the banded matrices: the
  # bands hold every weight of the dense matrices, the kernel and numpy add them in the same
  # order (the same bits on any CPU, no BLAS call), and the result is the dense product's.
  from data_pipeline.codec import geometry as geometry_lib

  rng = np.random.default_rng([height, width, step, resolution])
  dense = geometry_lib.canvas_matrices(height, width, resolution, geometry, resample, step)
  bands = tuple(geometry_lib.Band.of(m) for m in dense)
  for band, matrix in zip(bands, dense):
    rebuilt = np.zeros_like(matrix)
    rows = np.arange(matrix.shape[0])[:, None]
    cols = band.start_P[:, None] + np.arange(band.weights_PxB.shape[1])
    np.add.at(rebuilt, (rows, np.minimum(cols, matrix.shape[1] - 1)), band.weights_PxB)
    assert_identical(rebuilt, matrix)
    assert band.weights_PxB.shape[1] <= 6  # a band, not the whole row
  map_HxW = rng.random((height // step, width // step)).astype(np.float32)
  fast, reference = both(monkeypatch, maps.to_patches_banded, map_HxW, bands)
  assert_identical(fast, reference)
  ry, rx = (m.astype(np.float64) for m in dense)
  np.testing.assert_allclose(fast, ry @ map_HxW.astype(np.float64) @ rx.T, rtol=1e-5, atol=1e-6)
  # The scorer's canvas sums are these banded sums, bit for bit (unquantised, as release_llava).
  from data_pipeline.codec import options as options_lib
  from data_pipeline.codec import selection

  opts = options_lib.Options.from_kwargs(
    dict(geometry=geometry, resample=resample, quantise=False, maths='release')
  )
  ps = 14 if resolution == 224 else 16
  sums = selection.Scorer(opts, resolution, ps, step).canvas_sums(map_HxW, height, width)
  side = resolution // ps
  expected = fast.reshape(side, ps, side, ps).sum(axis=(1, 3), dtype=np.float64)
  assert_identical(sums, expected.astype(np.float32))


@pytest.mark.parametrize('height,width', [(224, 528), (61, 83), (2, 9), (17, 1)])
@pytest.mark.parametrize('k', [1, 2, 3, 5])
def test_local_variance(monkeypatch, height, width, k):
  # The release's MV inconsistency (release_probe's k = 3), float32 integral images and all:
  # flat fields (where float32 cancellation leaves its noise), zeros, large values.
  rng = np.random.default_rng([height, width, k])
  for scale in (1.0, 37.3, 3e4):
    x = (rng.random((height, width)) * scale).astype(np.float32)
    x[rng.random((height, width)) < 0.3] = 0.0
    x[: height // 2, : width // 2] = np.float32(2.7)
    if min(height, width) + 2 * (k // 2) - k < 1:
      with pytest.raises(IndexError):
        maps.local_variance(x, k)
      continue
    fast, reference = both(monkeypatch, maps.local_variance, x, k)
    assert_identical(fast, reference)


@pytest.mark.parametrize('camera', ['none', 'median'])
@pytest.mark.parametrize(
  'height,width,step', [(61, 83, 1), (272, 640, 1), (240, 426, 3), (8, 8, 2)]
)
def test_release_motion_on_cells(monkeypatch, camera, height, width, step):
  # release_train's and release_llava's motion map is constant over cells: computed there (the
  # median over pixels as the cells' median weighted by pixel counts) and expanded, it is the
  # pixel map bit for bit, kernels on or off; even and odd pixel counts, ties, half the cells
  # uncoded (zeros), a majority of one value.
  rng = np.random.default_rng([height, width, step])
  h, w = height // step, width // step
  hc, wc = -(-height // maps.CELL), -(-width // maps.CELL)
  for share in (0.5, 0.02, 1.0):
    dx = (rng.integers(-40, 40, (hc, wc)) / 4).astype(np.float32)
    dy = (rng.integers(-3, 3, (hc, wc)) / 4).astype(np.float32)
    grid = maps.VectorGrid(dx, dy, rng.random((hc, wc)) < share)
    pixels = release_motion.pixels(grid, h, w, camera, step)
    fast, reference = both(monkeypatch, release_motion.cells, grid, h, w, camera, step)
    assert_identical(fast, reference)
    assert_identical(maps.cells_to_pixels(fast, h, w, step), pixels)
  values = np.array([3.0, 1.0, 2.0, 1.0], np.float32)
  for weights in ([1, 1, 1, 1], [2, 1, 0, 1], [1, 0, 5, 0], [3, 3, 3, 4]):
    weights = np.array(weights, np.int64)
    expected = np.median(np.repeat(values, weights))
    fast, reference = both(monkeypatch, maps.median, values, weights)
    assert fast == reference == expected and type(fast) is type(expected) is np.float32
