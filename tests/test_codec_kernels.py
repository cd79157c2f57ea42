"""The compiled map kernels (data_pipeline/codec/kernels.py) against the numpy reference in
`maps`, bit for bit: each pass on random inputs (borders, overlaps, ties, odd sizes), then whole
selections on encoded clips with the kernels on and off."""

import numpy as np
import pytest

from data_pipeline import codec, synthetic
from data_pipeline.codec import kernels, maps

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


@pytest.mark.parametrize('step', [2, 3, 4])
@pytest.mark.parametrize('height,width', [(64, 96), (61, 83), (722, 1283)])
def test_downscale(monkeypatch, step, height, width):
  luma = np.random.default_rng(step).integers(0, 256, (height, width)).astype(np.uint8)
  luma[:5] = 255  # full blocks of the largest level: the integer sums must not wrap
  assert_identical(*both(monkeypatch, maps.downscale, luma, step))


@pytest.mark.parametrize('step', [1, 3])
def test_bipredicted_residual(monkeypatch, step):
  rng = np.random.default_rng(step)
  h, w = 61, 83
  luma, p0, p1 = (rng.uniform(0, 255, (h, w)).astype(np.float32) for _ in range(3))
  coded = rng.integers(0, 4, (-(-h * step // maps.CELL), -(-w * step // maps.CELL)), np.uint8)
  fast, reference = both(monkeypatch, maps.bipredicted_residual, luma, p0, p1, coded, step)
  assert_identical(fast, reference)


@pytest.mark.parametrize('dtype', [np.float32, np.uint8, bool])
@pytest.mark.parametrize('step', [1, 2, 3])
def test_cells_to_pixels(monkeypatch, dtype, step):
  rng = np.random.default_rng(step)
  h, w = 47, 59
  cells = (rng.random((-(-h * step // maps.CELL), -(-w * step // maps.CELL))) * 200).astype(dtype)
  assert_identical(*both(monkeypatch, maps.cells_to_pixels, cells, h, w, step))


def random_maps(rng, kind, shape=(120, 170)):
  if kind == 'exponential':
    return rng.exponential(2.0, shape).astype(np.float32)
  if kind == 'sparse':  # mostly zero: the 95th percentile sits among ties
    out = np.zeros(shape, np.float32)
    out[rng.random(shape) < 0.03] = 5.0
    return out
  return rng.integers(0, 4, shape).astype(np.float32)  # 'levels': a few values, many ties


@pytest.mark.parametrize('kind', ['exponential', 'sparse', 'levels'])
def test_percentile(monkeypatch, kind):
  values = random_maps(np.random.default_rng(len(kind)), kind)
  fast, reference = both(monkeypatch, maps.percentile, values, maps.PERCENTILE)
  assert fast == reference == float(np.percentile(values, maps.PERCENTILE))


@pytest.mark.parametrize('kind', ['exponential', 'sparse', 'levels'])
@pytest.mark.parametrize(
  'fusion,weights', [('mean', (1.0, 1.0)), ('mean', (2.0, 1.0)), ('geomean', (1.0, 1.0))]
)
def test_normalise_fuse(monkeypatch, kind, fusion, weights):
  rng = np.random.default_rng(len(kind))
  motion, residual = random_maps(rng, kind), 40 * random_maps(rng, 'exponential')
  fast, reference = both(monkeypatch, maps.normalise_fuse, motion, residual, fusion, *weights)
  assert_identical(fast, reference)
  # The reference is the two steps it replaces.
  steps = maps.fuse(
    maps.normalise(motion, maps.MOTION_FLOOR),
    maps.normalise(residual, maps.RESIDUAL_FLOOR),
    fusion,
    *weights,
  )
  assert_identical(reference, steps)


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
