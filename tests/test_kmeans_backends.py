"""The k-means engines agree: faiss, scikit-learn and the JAX k-means reach the same objective
from the same centres; the multi-process JAX k-means (2 processes x 4 CPU devices, each with
only its own points) equals the single-process one."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ove_jax import kmeans, kmeans_multiprocess
from ove_jax import kmeans_backends as kb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, 'tools', 'launch_local.py')


def _blobs(n=3000, k=24, d=16, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(k, d)) * 2.5
  return (centres[rng.integers(k, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize('spherical', [False, True])
def test_backends_reach_the_same_objective(spherical):
  x = _blobs()
  c0 = kb.initial_centres(x, 24, 'k-means++', seed=3, spherical=spherical)
  start = kb.objective(x, c0, spherical=spherical)
  results = {
    b: kb.fit(x, 24, backend=b, init=c0, iters=25, tol=0.0, spherical=spherical)
    for b in kb.BACKENDS
  }
  ref = results['sklearn'].inertia
  for name, r in results.items():
    assert abs(r.inertia - ref) <= 0.01 * ref, (name, r.inertia, ref)
    assert r.inertia < 0.9 * start, (name, r.inertia, start)  # they did optimise
    # The result is scored consistently: inertia = objective of its centres, labels = nearest.
    assert r.inertia == pytest.approx(kb.objective(x, r.centres, spherical=spherical), rel=1e-5)
    assert r.sizes.sum() == len(x) and r.labels.shape == (len(x),)
    if spherical:
      np.testing.assert_allclose(np.linalg.norm(r.centres, axis=1), 1.0, atol=1e-5)


def test_assign_agrees_across_backends():
  x, c = _blobs(500), _blobs(40, seed=1)
  for spherical in (False, True):
    ref_ids, ref_d = kb.assign(x, c, spherical=spherical, backend='sklearn')
    for b in ('jax', 'faiss'):
      ids, d = kb.assign(x, c, spherical=spherical, backend=b)
      np.testing.assert_array_equal(ids, ref_ids)
      np.testing.assert_allclose(d, ref_d, rtol=1e-3, atol=1e-3)


def test_bad_arguments_name_the_fix():
  x = _blobs(100)
  with pytest.raises(ValueError, match='backend=.*use one of'):
    kb.fit(x, 4, backend='cuml')
  with pytest.raises(ValueError, match=r'init centres of shape \(3, 16\)'):
    kb.fit(x, 4, init=np.zeros((3, 16), np.float32))
  with pytest.raises(ValueError, match='1 <= k <= N'):
    kb.fit(x, 101)


def test_bench_reports_every_backend():
  rows = kb.bench(_blobs(800), 8, iters=3, repeats=1)
  assert [r.backend for r in rows] == list(kb.BACKENDS)
  objectives = [r.objective for r in rows]
  assert max(objectives) <= 1.01 * min(objectives)
  assert all(r.assign_points_per_s > 0 and r.n_iter >= 1 for r in rows)


@pytest.mark.parametrize('spherical', [False, True])
def test_multiprocess_driver_on_one_process_equals_fit(spherical):
  x = _blobs(1001, k=13)
  c0 = kb.initial_centres(x, 13, 'random', seed=1, spherical=spherical)
  ref = kmeans.fit(x, 13, init=c0, iters=30, spherical=spherical)
  got = kmeans_multiprocess.fit(x, 13, init=c0, iters=30, spherical=spherical, chunk_rows=32)
  np.testing.assert_array_equal(got.labels, ref.labels)
  np.testing.assert_allclose(got.centres, ref.centres, atol=1e-5)
  assert got.inertia == pytest.approx(ref.inertia, rel=1e-5)
  assert got.n_iter == ref.n_iter and got.converged == ref.converged
  np.testing.assert_array_equal(got.sizes, ref.sizes)


def test_two_processes_equal_one(tmp_path):
  """2 processes x 4 CPU devices, each given only its own (unequal) share of the points."""
  x = _blobs(1203, k=11, d=8, seed=5)
  np.save(tmp_path / 'x.npy', x)
  c0 = kb.initial_centres(x, 11, 'random', seed=2)
  np.save(tmp_path / 'c0.npy', c0)
  script = tmp_path / 'child.py'
  script.write_text(
    textwrap.dedent(f"""
      import jax
      import numpy as np
      from ove_jax import distributed, kmeans_multiprocess
      distributed.initialize()
      assert jax.process_count() == 2 and jax.device_count() == 8
      x = np.load({str(tmp_path / 'x.npy')!r})
      mine = x[:500] if jax.process_index() == 0 else x[500:]
      c0 = np.load({str(tmp_path / 'c0.npy')!r})
      r = kmeans_multiprocess.fit(mine, 11, init=c0, iters=40, chunk_rows=16)
      np.savez({str(tmp_path)!r} + f'/p{{jax.process_index()}}.npz', labels=r.labels,
               centres=r.centres, inertia=r.inertia, n_iter=r.n_iter, sizes=r.sizes)
      # k-means++ drawn by process 0 from its own points and broadcast; cosine.
      s = kmeans_multiprocess.fit(mine, 11, init='k-means++', seed=4, spherical=True, iters=40)
      np.savez({str(tmp_path)!r} + f'/s{{jax.process_index()}}.npz', labels=s.labels,
               centres=s.centres, inertia=s.inertia)
      """)
  )
  result = subprocess.run(
    [
      sys.executable,
      LAUNCHER,
      '--processes=2',
      '--devices_per_process=4',
      '--timeout=150',
      '--',
      sys.executable,
      str(script),
    ],
    capture_output=True,
    text=True,
    timeout=180,
    cwd=REPO,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  ref = kmeans.fit(x, 11, init=c0, iters=40)
  parts = [np.load(tmp_path / f'p{i}.npz') for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([p['labels'] for p in parts]), ref.labels)
  for p in parts:
    np.testing.assert_allclose(p['centres'], ref.centres, atol=1e-5)
    assert float(p['inertia']) == pytest.approx(ref.inertia, rel=1e-5)
    assert int(p['n_iter']) == ref.n_iter
    np.testing.assert_array_equal(p['sizes'], ref.sizes)
  c_pp = kb.initial_centres(x[:500], 11, 'k-means++', seed=4, spherical=True)
  ref = kmeans.fit(x, 11, init=c_pp, iters=40, spherical=True)
  parts = [np.load(tmp_path / f's{i}.npz') for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([p['labels'] for p in parts]), ref.labels)
  for p in parts:
    np.testing.assert_allclose(p['centres'], ref.centres, atol=1e-5)
    assert float(p['inertia']) == pytest.approx(ref.inertia, rel=1e-5)


def test_bench_tool_writes_every_backend(tmp_path, capsys):
  from ove_jax_tools import bench_kmeans_backends

  out = tmp_path / 'bench.json'
  assert (
    bench_kmeans_backends.main(
      ['--n=600', '--d=8', '--clusters=6', '--k', '6', '--iters=2', '--repeats=1', f'--json={out}']
    )
    == 0
  )
  import json

  figures = json.loads(out.read_text())
  assert [r['backend'] for r in figures['rows']] == list(kb.BACKENDS)
  assert 'objectives within' in capsys.readouterr().out
  assert bench_kmeans_backends.main(['--backends=jax,cuml']) == 2
  assert "['cuml']" in capsys.readouterr().err
  missing = str(out.parent / 'missing.npy')
  assert bench_kmeans_backends.main(['--features', missing]) == 2
  assert f'{missing}: not a .npy array of [N, D] points' in capsys.readouterr().err


@pytest.mark.parametrize('init', ['k-means++', 'random'])
def test_initial_centres_are_those_of_kmeans_fit(init):
  """The JAX backend from initial_centres(...) is kmeans.fit with the same init name and seed."""
  x = _blobs(400, k=5)
  ref = kmeans.fit(x, 5, init=init, seed=7, iters=3)
  got = kmeans.fit(x, 5, init=kb.initial_centres(x, 5, init, seed=7), iters=3)
  np.testing.assert_array_equal(got.centres, ref.centres)


def test_kmeans_throughput_times_both_sides():
  import jax

  from ove_jax import sharding

  said = []
  with jax.set_mesh(sharding.make_mesh({'data': -1})):
    figures = kb.kmeans_throughput(2000, 8, 16, repeats=1, say=said.append)
  assert figures['n'] == 2000 and figures['jax_pairs_per_second'] > 0
  assert figures['sklearn_pairs_per_second'] > 0 and figures['jax_over_sklearn'] > 0
  assert any('jax / sklearn throughput' in line for line in said)


def test_bench_kmeans_tool_writes_figures_and_refuses_a_bad_mesh(tmp_path, capsys):
  from ove_jax_tools import bench_kmeans

  out = tmp_path / 'kmeans.json'
  argv = ['--n', '2000', '--d', '8', '--k', '16', '--repeats', '1', '--json', str(out)]
  assert bench_kmeans.main(argv) == 0
  figures = json.loads(out.read_text())
  assert figures['k'] == 16 and figures['jax_pairs_per_second'] > 0
  assert 'jax / sklearn throughput' in capsys.readouterr().out
  assert bench_kmeans.main(['--n', '2000', '--mesh', 'three,by,two']) == 2
  assert '--mesh three,by,two' in capsys.readouterr().err


def test_kmeans_plusplus_above_its_limit_starts_every_engine_from_random_points(monkeypatch):
  """init='k-means++' for more than kmeans.PLUSPLUS_MAX_K centres (lowered here to reach the
  release-scale path on a small problem) starts every engine, and the multi-process k-means,
  from the random points of init='random'."""
  x = _blobs(600, k=12)
  monkeypatch.setattr(kmeans, 'PLUSPLUS_MAX_K', 8)
  random = kb.initial_centres(x, 12, 'random', seed=2, spherical=True)
  np.testing.assert_array_equal(kb.initial_centres(x, 12, 'k-means++', 2, True), random)
  for backend in kb.BACKENDS:
    got = kb.fit(x, 12, backend=backend, init='k-means++', seed=2, iters=3, tol=0.0, spherical=True)
    ref = kb.fit(x, 12, backend=backend, init=random, seed=2, iters=3, tol=0.0, spherical=True)
    np.testing.assert_array_equal(got.centres, ref.centres)
  got = kmeans_multiprocess.fit(x, 12, init='k-means++', seed=2, iters=3, spherical=True)
  ref = kmeans_multiprocess.fit(x, 12, init=random, seed=2, iters=3, spherical=True)
  np.testing.assert_array_equal(got.centres, ref.centres)
