"""The sharded k-means (ove_jax.kmeans) against scikit-learn and numpy, and the labels tool."""

from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
import pytest
from sklearn.cluster import KMeans as SKLearnKMeans

from ove_jax import kmeans
from ove_jax_tools import cluster_labels


def make_mesh(shape=(2, 4, 1)):
  return jax.make_mesh(
    shape, ('data', 'fsdp', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )


def blobs(n=2000, d=16, centres=30, spread=3.0, seed=0):
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(centres, d)) * spread
  return (means[rng.integers(centres, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope='module')
def data():
  x = blobs()
  rng = np.random.default_rng(1)
  # k = 50 is not a multiple of 8: the last device holds 1 padding centre of its 7.
  init = x[rng.choice(len(x), 50, replace=False)]
  return x, init


@pytest.fixture(scope='module')
def sharded(data):
  x, init = data
  with jax.set_mesh(make_mesh()):
    # A chunk of 512 points: 4 chunks, so the scan and the padding of the last chunk are used.
    return kmeans.fit(x, 50, init=init, chunk=512)


def test_sharded_kmeans_reaches_sklearn_objective_from_the_same_init(data, sharded):
  x, init = data
  ref = SKLearnKMeans(50, init=init, n_init=1, algorithm='lloyd', max_iter=100).fit(x)
  assert abs(sharded.inertia - ref.inertia_) <= 0.01 * ref.inertia_
  # The reported inertia is that of the returned centres and labels.
  d = ((x[:, None, :] - sharded.centres[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(sharded.labels, d.argmin(1))
  np.testing.assert_allclose(sharded.inertia, d.min(1).sum(), rtol=1e-4)
  np.testing.assert_array_equal(sharded.sizes, np.bincount(sharded.labels, minlength=50))
  assert sharded.converged and sharded.n_iter < 100


def test_centres_are_sharded_by_cluster_over_every_device(sharded):
  c = sharded.sharded_centres
  assert c.shape == (56, 16)  # 50 padded to a multiple of 8
  assert len(c.sharding.device_set) == 8
  assert {s.data.shape for s in c.addressable_shards} == {(7, 16)}
  assert sharded.centres.shape == (50, 16)


def test_one_device_gives_the_mesh_result(data, sharded):
  x, init = data
  one = kmeans.fit(x, 50, init=init)  # no mesh set: one device
  assert len(one.sharded_centres.sharding.device_set) == 1
  np.testing.assert_allclose(one.centres, sharded.centres, atol=1e-4)
  np.testing.assert_allclose(one.inertia, sharded.inertia, rtol=1e-4)
  np.testing.assert_array_equal(one.labels, sharded.labels)
  assert one.n_iter == sharded.n_iter


def test_empty_clusters_from_duplicate_points_are_reseeded():
  # 5 distinct points, 40 copies each, and 8 clusters: 3 must end empty; every distinct point
  # becomes a centre through re-seeding, so the objective reaches 0.
  distinct = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32) * 5
  x = np.repeat(distinct, 40, axis=0)
  init = np.repeat(distinct[:2], 4, axis=0)  # duplicated centres: ties leave 6 clusters empty
  with jax.set_mesh(make_mesh()):
    r = kmeans.fit(x, 8, init=init, iters=20)
  assert r.empty_reseeded >= 3
  assert r.sizes.sum() == len(x) and np.sum(r.sizes == 0) == 3
  assert r.inertia == pytest.approx(0.0, abs=1e-3)
  assert np.isfinite(r.centres).all()


def test_a_far_away_initial_centre_is_reseeded_to_the_farthest_point():
  x = blobs(n=600, centres=4, spread=6.0)
  init = x[:4].copy()
  init[2] = 1e4  # wins no point in the first pass
  r = kmeans.fit(x, 4, init=init, iters=50)
  assert r.empty_reseeded >= 1
  assert (r.sizes > 0).all() and np.abs(r.centres).max() < np.abs(x).max()
  ref = SKLearnKMeans(4, init=init, n_init=1, algorithm='lloyd').fit(x)
  assert r.inertia <= 1.01 * ref.inertia_


def test_nearest_equals_numpy_brute_force():
  rng = np.random.default_rng(3)
  x, c = rng.normal(size=(500, 12)), rng.normal(size=(37, 12))
  cos = unit(x) @ unit(c).T
  want = np.argsort(-cos, axis=1)[:, :10]
  with jax.set_mesh(make_mesh()):
    # 37 centres on 8 devices: 5 per device, fewer than n = 10, so the merge does the ranking.
    ids, scores = kmeans.nearest(x, c, 10, chunk=96)
  assert ids.dtype == np.int32 and ids.shape == (500, 10)
  np.testing.assert_array_equal(ids, want)
  np.testing.assert_allclose(scores, np.take_along_axis(cos, want, 1), atol=1e-5)
  ids_one, _ = kmeans.nearest(x, c, 10)
  np.testing.assert_array_equal(ids_one, want)
  # Euclidean ranking when not spherical.
  sq = ((x[:, None] - c[None]) ** 2).sum(-1)
  ids_e, d_e = kmeans.nearest(x, c, 3, spherical=False)
  np.testing.assert_array_equal(ids_e, np.argsort(sq, axis=1)[:, :3])
  np.testing.assert_allclose(d_e, np.sort(sq, axis=1)[:, :3], rtol=1e-4)


def test_spherical_labels_are_the_cosine_argmax():
  x = blobs(n=1500, d=8, centres=10, seed=2)
  with jax.set_mesh(make_mesh((1, 2, 4))):
    r = kmeans.fit(x, 20, init='k-means++', spherical=True, seed=1)
  np.testing.assert_allclose(np.linalg.norm(r.centres, axis=1), 1.0, atol=1e-5)
  cos = unit(x) @ r.centres.T
  np.testing.assert_array_equal(r.labels, cos.argmax(1))
  np.testing.assert_allclose(r.inertia, np.sum(2 - 2 * cos.max(1)), rtol=1e-3)


def test_kmeans_plusplus_and_bad_arguments():
  x = blobs(n=300, centres=5)
  c = kmeans.kmeans_plusplus(x, 5, seed=0)
  assert c.shape == (5, 16) and len({tuple(r) for r in c}) == 5
  assert all((x == row).all(1).any() for row in c)  # centres are data points
  with pytest.raises(ValueError, match='k=400'):
    kmeans.fit(x, 400)
  with pytest.raises(ValueError, match='init centres of shape'):
    kmeans.fit(x, 5, init=np.zeros((4, 16)))
  with pytest.raises(ValueError, match='n=11'):
    kmeans.nearest(x, c, 11)


def test_kmeans_plusplus_gives_way_to_random_points_for_large_k(caplog):
  """k beyond the k-means++ sample (the release's 400k / 2M centres at scale: here k = 20050 of
  N = 20100 points, more than the 20000-point sample) starts from k distinct random points, with
  a logged note, instead of failing; up to PLUSPLUS_MAX_K centres k-means++ is unchanged."""
  x = np.random.default_rng(0).normal(size=(20_100, 4)).astype(np.float32)
  k = 20_050
  assert k > kmeans.PLUSPLUS_SAMPLE > kmeans.PLUSPLUS_MAX_K
  assert kmeans.init_method('k-means++', k) == 'random'
  with caplog.at_level('WARNING', logger='ove_jax.kmeans'):
    got = kmeans.initial_centres(x, k, 'k-means++', 3, False)
  np.testing.assert_array_equal(got, kmeans.initial_centres(x, k, 'random', 3, False))
  assert 'k-means++ is used up to k = 5000' in caplog.text and 'init="random"' in caplog.text
  small = kmeans.PLUSPLUS_MAX_K
  assert kmeans.init_method('k-means++', small) == 'k-means++'
  np.testing.assert_array_equal(
    kmeans.initial_centres(x[:300], 5, 'k-means++', 0, False), kmeans.kmeans_plusplus(x[:300], 5)
  )


# ------------------------------------------------------------------------------------------------
# tools/cluster_labels.py
# ------------------------------------------------------------------------------------------------


def direction_blobs(n_per, d, frames=None, seed=0):
  """Three blobs that differ in direction (labels are by cosine), with their blob ids."""
  rng = np.random.default_rng(seed)
  shape = (3, d) if frames is None else (3, frames, d)
  means = rng.normal(size=shape) * 4
  y = np.repeat(np.arange(3), n_per)
  x = means[y] + rng.normal(size=(len(y), *shape[1:]))
  order = rng.permutation(len(y))
  return x[order].astype(np.float32), y[order]


def assert_recovers(first_label, y):
  assert len(set(first_label)) == 3
  for blob in range(3):
    assert len(set(first_label[y == blob])) == 1


@pytest.mark.parametrize('frames,backend', [(None, 'sklearn'), (8, 'jax')])
def test_tool_recovers_blobs(tmp_path, capsys, frames, backend):
  x, y = direction_blobs(60, 12, frames)
  path = tmp_path / 'feats.npy'
  np.save(path, x)
  out = tmp_path / 'out'
  args = ['--features', str(path), '--k', '3', '--out', str(out), '--backend', backend]
  if backend == 'jax':
    args += ['--mesh', '2,2,2']
  assert cluster_labels.main(args) == 0
  labels = np.load(out / 'labels.npy')
  assert labels.dtype == np.int32 and labels.shape == (180, 3)  # min(10, k) labels
  assert_recovers(labels[:, 0], y)
  centres = np.load(out / 'centres.npy')
  assert centres.shape == (3, 12 * (frames or 1))
  report = json.loads((out / 'report.json').read_text())
  for key in ('k', 'N', 'inertia', 'iterations', 'empty_clusters', 'sizes', 'backend'):
    assert key in report
  assert report['N'] == 180 and report['k'] == 3 and report['backend'] == backend
  assert set(report['sizes']) >= {'min', 'median', 'max', 'histogram'}
  assert report['sizes']['min'] == report['sizes']['max'] == 60
  assert json.loads(capsys.readouterr().out)['N'] == 180


def test_tool_bad_input_names_the_flag_and_file(tmp_path, capsys):
  missing = tmp_path / 'nope.npy'
  assert (
    cluster_labels.main(['--features', str(missing), '--k', '2', '--out', str(tmp_path / 'o')]) == 2
  )
  assert f'--features {missing}: no such file' in capsys.readouterr().err
  bad = tmp_path / 'bad.npy'
  np.save(bad, np.zeros((4, 2, 3, 5), np.float32))
  assert cluster_labels.main(['--features', str(bad), '--k', '2', '--out', str(tmp_path)]) == 2
  assert 'shape (4, 2, 3, 5)' in capsys.readouterr().err
  small = tmp_path / 'small.npy'
  np.save(small, np.random.default_rng(0).normal(size=(5, 3)))
  assert cluster_labels.main(['--features', str(small), '--k', '9', '--out', str(tmp_path)]) == 2
  assert '--k 9 is more than the N = 5 samples' in capsys.readouterr().err
  npz = tmp_path / 'f.npz'
  np.savez(npz, feats=np.zeros((5, 3)))
  assert cluster_labels.main(['--features', str(npz), '--k', '2', '--out', str(tmp_path)]) == 2
  assert 'it needs `features`' in capsys.readouterr().err
  # More labels than centres: each sample gets its k nearest, and the run says so.
  out = tmp_path / 'few'
  argv = ['--features', str(small), '--k', '2', '--num-labels', '4', '--out', str(out)]
  assert cluster_labels.main(argv) == 0
  assert '--num-labels 4 > --k 2: each sample gets its 2 nearest' in capsys.readouterr().err
  assert np.load(out / 'labels.npy').shape == (5, 2)


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  """A release-format directory of a tiny random encoder."""
  from ove_jax import convert
  from ove_jax.models import EncoderConfig, create_encoder

  path = tmp_path_factory.mktemp('teacher')
  convert.save_pytorch(create_encoder(EncoderConfig.preset('tiny'), seed=0), str(path))
  return str(path)


def write_shard(path, recs):
  from data_pipeline import precompute, records

  writer = precompute.ShardWriter(str(path))
  for r in recs:
    writer.write(records.encode(r))
  writer.commit()
  return str(path)


def two_kinds(i, size):
  """Kind 0: dark noise; kind 1: bright vertical stripes."""
  rng = np.random.default_rng(i)
  if i % 2 == 0:
    return (rng.random((size, size, 3)) * 60).astype(np.uint8)
  pixels = np.zeros((size, size, 3), np.uint8)
  pixels[:, ::8] = 255
  return pixels


def test_tool_teacher_on_image_records_writes_relabelled_shards(tmp_path, teacher):
  import io

  from PIL import Image

  from data_pipeline import precompute

  def image(i):
    buf = io.BytesIO()
    Image.fromarray(two_kinds(i, 64)).save(buf, format='PNG')
    return {'image': buf.getvalue(), 'source': f'img{i}', 'labels': np.asarray([-1], np.int32)}

  shards = [
    write_shard(
      tmp_path / f'img-train.array_record-{s:05d}-of-00002', [image(6 * s + i) for i in range(6)]
    )
    for s in range(2)
  ]
  out = tmp_path / 'out'
  assert (
    cluster_labels.main(
      [
        '--teacher',
        teacher,
        '--records',
        str(tmp_path / 'img-train.array_record-*'),
        '--k',
        '2',
        '--batch',
        '4',
        '--out',
        str(out),
      ]
    )
    == 0
  )
  labels = np.load(out / 'labels.npy')
  assert labels.shape == (12, 2)
  copies = sorted(glob.glob(str(out / 'records' / '*')))
  assert [os.path.basename(p) for p in copies] == [os.path.basename(p) for p in shards]
  got = [r for p in copies for r in precompute.read_shard(p)]
  assert [r['source'] for r in got] == [f'img{i}' for i in range(12)]
  assert all(
    r['image'] == o['image']
    for r, o in zip(got, (r for p in shards for r in precompute.read_shard(p)))
  )
  np.testing.assert_array_equal(np.stack([r['labels'] for r in got]), labels)
  # The two kinds of image land in two clusters.
  kind = np.arange(12) % 2
  assert {int(labels[kind == k, 0][0]) for k in (0, 1)} == {0, 1}
  for k in (0, 1):
    assert len(set(labels[kind == k, 0])) == 1


def test_tool_teacher_on_video_records_uses_eight_frames(tmp_path, teacher):
  import av

  def clip(i):
    path = tmp_path / f'clip{i}.mp4'
    with av.open(str(path), 'w') as container:
      stream = container.add_stream('libx264', rate=25)
      stream.width = stream.height = 64
      stream.pix_fmt = 'yuv420p'
      stream.options = {'preset': 'ultrafast'}
      for _ in range(16):
        frame = av.VideoFrame.from_ndarray(two_kinds(i, 64), format='rgb24')
        for packet in stream.encode(frame):
          container.mux(packet)
      for packet in stream.encode():
        container.mux(packet)
    return {'video': path.read_bytes(), 'source': str(path), 'frame_ids': np.arange(16)}

  write_shard(tmp_path / 'vid-train.array_record-00000-of-00001', [clip(i) for i in range(4)])
  out = tmp_path / 'out'
  assert (
    cluster_labels.main(
      [
        '--teacher',
        teacher,
        '--records',
        str(tmp_path / 'vid-train.array_record-*'),
        '--k',
        '2',
        '--backend',
        'jax',
        '--out',
        str(out),
      ]
    )
    == 0
  )
  assert np.load(out / 'centres.npy').shape == (2, 8 * 128)  # 8 frames x tiny width
  first = np.load(out / 'labels.npy')[:, 0]
  assert first[0] == first[2] != first[1] == first[3]


def test_l2_normalise_is_one_function_for_numpy_and_jax():
  from ove_jax.vectors import l2_normalise

  x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
  x[2] = 0.0  # a zero row stays zero, not NaN
  host = l2_normalise(x)
  device = l2_normalise(jax.numpy.asarray(x))
  assert isinstance(host, np.ndarray) and host.dtype == np.float32
  assert isinstance(device, jax.Array)
  np.testing.assert_allclose(np.asarray(device), host, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(host[[0, 1, 3, 4]], axis=1), 1.0, rtol=1e-6)
  assert not host[2].any()
  traced = jax.jit(l2_normalise)(jax.numpy.asarray(x))  # traceable inside jit
  np.testing.assert_allclose(np.asarray(traced), host, rtol=1e-6, atol=1e-7)
