"""`ove-cluster-labels` on bad input: every flag, --init, --records and --out are checked before
any teacher runs; damaged files are one error naming them (exit status 2); large k runs."""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import pytest

from data_pipeline import precompute, records, shards
from ove_jax import kmeans
from ove_jax import labels as labels_lib
from ove_jax_tools import cluster_labels


def write_shard(path, n, start=0):
  """A shard of n image records (PNG bytes), labels -1."""
  from PIL import Image

  writer = precompute.ShardWriter(str(path))
  for i in range(start, start + n):
    buf = io.BytesIO()
    pixels = (np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(buf, format='PNG')
    record = {'image': buf.getvalue(), 'source': f'img{i}', 'labels': np.asarray([-1], np.int32)}
    writer.write(records.encode(record))
  writer.commit()
  return str(path)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """A precompute-style folder of 2 finished shards of 4 image records each (plan.json and
  progress markers as precompute writes them)."""
  folder = tmp_path_factory.mktemp('corpus')
  plan = {'name': 'img', 'split': 'train', 'num_shards': 2, 'format': 'records'}
  (folder / shards.PLAN).write_text(json.dumps(plan))
  (folder / shards.PROGRESS_DIR).mkdir()
  for i in range(2):
    write_shard(shards.shard_path(str(folder), plan, i), 4, 4 * i)
    (folder / shards.PROGRESS_DIR / f'shard-{i:05d}.json').write_text('{}')
  return folder


def run(argv, capsys):
  """(exit status, stderr) of the tool."""
  capsys.readouterr()
  code = cluster_labels.main([str(a) for a in argv])
  return code, capsys.readouterr().err


@pytest.fixture
def no_teacher(monkeypatch):
  """Fails the test if the teacher's forward pass starts."""

  def refuse(*args, **kwargs):
    raise AssertionError('the teacher ran before the flags were checked')

  monkeypatch.setattr(labels_lib, 'teacher_features', refuse)


def test_every_flag_and_out_are_checked_before_the_teacher(corpus, tmp_path, capsys, no_teacher):
  base = ['--teacher', 'random:tiny', '--records', corpus, '--k', '2']
  out = ['--out', tmp_path / 'out']
  afile = tmp_path / 'afile'
  afile.write_text('not a folder')
  init_3x3 = tmp_path / 'init_3x3.npy'
  np.save(init_3x3, np.ones((2, 3), np.float32))
  cases = [
    (['--k', '0', *out], '--k 0: must be >= 1'),
    (['--num-labels', '0', *out], '--num-labels 0: must be >= 1'),
    (['--iters', '0', *out], '--iters 0: must be >= 1'),
    (['--tol', '-1', *out], '--tol -1.0: must be >= 0'),
    (['--chunk', '0', *out], '--chunk 0: must be >= 1'),
    (['--batch', '0', *out], '--batch 0: must be >= 1'),
    (['--shard-records', '0', *out], '--shard-records 0: must be >= 1'),
    (['--mesh', '3,3,3', *out], '--mesh 3,3,3: '),
    (['--init', tmp_path / 'none.npy', *out], 'not "k-means++", "random" or an existing .npy'),
    (['--k', '9', *out], '--k 9 is more than the N = 8 samples'),
    # The width of the ove_jax teacher's features (the tiny preset: 128) is known in advance.
    (
      ['--init', init_3x3, *out],
      f'--init {init_3x3}: centres of shape (2, 3) (float32); expected numbers of shape (2, 128)',
    ),
    (['--out', afile], f'--out {afile}: a file, not a folder'),
  ]
  for extra, message in cases:
    argv = [*base, *extra]
    if '--k' in extra:  # a later --k wins
      argv = [*base[:-2], *extra]
    code, err = run(argv, capsys)
    assert code == 2 and message in err, (extra, err)
    assert 'Traceback' not in err
  assert afile.read_text() == 'not a folder'


def test_damaged_feature_and_init_files_name_the_file(tmp_path, capsys):
  x = np.random.default_rng(0).normal(size=(13, 8)).astype(np.float32)
  good = tmp_path / 'good.npy'
  np.save(good, x)
  empty = tmp_path / 'empty.npy'
  empty.write_bytes(b'')
  trunc = tmp_path / 'trunc.npz'
  np.savez(trunc, features=x)
  trunc.write_bytes(trunc.read_bytes()[:100])
  garbled = tmp_path / 'garbled.npz'
  garbled.write_bytes(b'PK\x03\x04' + os.urandom(64))
  objects = tmp_path / 'objects.npz'
  with zipfile.ZipFile(objects, 'w') as z:  # np.savez would refuse nothing: ids as objects
    buf = io.BytesIO()
    np.save(buf, x)
    z.writestr('features.npy', buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, np.array([object()] * 13, dtype=object), allow_pickle=True)
    z.writestr('ids.npy', buf.getvalue())
  nan = tmp_path / 'nan.npy'
  np.save(nan, np.full((2, 8), np.nan, np.float32))
  narrow = tmp_path / 'narrow.npy'  # centres 3 wide for features 8 wide
  np.save(narrow, x[:2, :3])
  npz_init = tmp_path / 'init.npz'
  np.savez(npz_init, centres=x[:2])
  out = ['--k', 2, '--out', tmp_path / 'out']
  cases = [
    (['--features', empty], f'--features {empty}: empty (0 bytes)'),
    (['--features', trunc], f'--features {trunc}: truncated or not a .npy / .npz file'),
    (['--features', garbled], f'--features {garbled}: truncated or not a .npy / .npz file'),
    (['--features', objects], f'--features {objects}: holds Python objects'),
    (['--features', good, '--init', empty], f'--init {empty}: empty (0 bytes)'),
    (['--features', good, '--init', nan], f'--init {nan}: holds NaN or infinite values'),
    (['--features', good, '--init', npz_init], f'--init {npz_init}: a .npz'),
    (['--features', good, '--init', narrow], f'--init {narrow}: centres of shape (2, 3)'),
  ]
  for extra, message in cases:
    code, err = run([*extra, *out], capsys)
    assert code == 2 and message in err, (extra, err)
  assert not (tmp_path / 'out' / 'labels.npy').exists()


def test_partial_corrupt_and_relabelled_record_folders(corpus, tmp_path, capsys):
  x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
  feats = tmp_path / 'f.npy'
  np.save(feats, x)
  out = tmp_path / 'out'
  assert run(['--features', feats, '--records', corpus, '--k', 2, '--out', out], capsys)[0] == 0
  # The relabelled copies: a folder without plan.json; the message gives the glob that works.
  copies = out / 'records'
  code, err = run(
    ['--features', feats, '--records', copies, '--k', 2, '--out', tmp_path / 'o2'], capsys
  )
  glob = os.path.join(copies, '*.array_record*')
  assert code == 2 and 'no plan.json, so not a precompute output folder' in err
  assert f"--records '{glob}'" in err
  assert (
    run(['--features', feats, '--records', glob, '--k', 2, '--out', tmp_path / 'o2'], capsys)[0]
    == 0
  )
  # Relabelling the copies into the folder they are in is refused before any work.
  before = os.stat(out / 'labels.npy').st_mtime_ns
  code, err = run(['--features', feats, '--records', glob, '--k', 2, '--out', out], capsys)
  assert code == 2 and 'would overwrite its input shard; give another --out' in err
  assert os.stat(out / 'labels.npy').st_mtime_ns == before
  # A folder with an unfinished shard (no progress marker) is refused, naming it.
  partial = tmp_path / 'partial'
  partial.mkdir()
  plan = {'name': 'img', 'split': 'train', 'num_shards': 3, 'format': 'records'}
  (partial / shards.PLAN).write_text(json.dumps(plan))
  (partial / shards.PROGRESS_DIR).mkdir()
  for i in range(3):
    write_shard(shards.shard_path(str(partial), plan, i), 2)
    if i != 1:
      (partial / shards.PROGRESS_DIR / f'shard-{i:05d}.json').write_text('{}')
  code, err = run(
    ['--features', feats, '--records', partial, '--k', 2, '--out', tmp_path / 'o3'], capsys
  )
  assert code == 2 and f'--records {partial}: 2 of its 3 shards are finished (not: 1)' in err
  # A damaged shard: one error naming it.
  bad = tmp_path / 'bad.array_record-00000-of-00001'
  bad.write_bytes(os.urandom(100))
  code, err = run(
    ['--features', feats, '--records', bad, '--k', 2, '--out', tmp_path / 'o4'], capsys
  )
  assert code == 2 and f'--records: cannot read {bad} (' in err and 'Traceback' not in err


@pytest.mark.parametrize('backend', ['sklearn', 'jax', 'faiss'])
def test_large_k_starts_from_random_points_with_a_note(tmp_path, capsys, monkeypatch, backend):
  """More centres than kmeans.PLUSPLUS_MAX_K (lowered here; the release's 400k / 2M at scale) with
  the default init: random points, a note, report.json's init says so; labels are written."""
  monkeypatch.setattr(kmeans, 'PLUSPLUS_MAX_K', 4)
  x = np.random.default_rng(1).normal(size=(40, 5)).astype(np.float32)
  feats = tmp_path / 'f.npy'
  np.save(feats, x)
  out = tmp_path / 'out'
  code, err = run(['--features', feats, '--k', 6, '--backend', backend, '--out', out], capsys)
  assert code == 0, err
  assert 'note: k = 6 centres: k-means++ is used up to k = 4' in err
  report = json.loads((out / 'report.json').read_text())
  assert report['init'] == 'random' and report['k'] == 6 and report['backend'] == backend
  assert np.load(out / 'labels.npy').shape == (40, 6)
  # At most PLUSPLUS_MAX_K centres: k-means++ as before, no note.
  code, err = run(['--features', feats, '--k', 4, '--backend', backend, '--out', out], capsys)
  assert code == 0 and 'note:' not in err
  assert json.loads((out / 'report.json').read_text())['init'] == 'k-means++'


def test_the_help_states_the_plusplus_limit():
  assert f'random points above {kmeans.PLUSPLUS_MAX_K} centres' in ' '.join(
    cluster_labels.build_parser().format_help().split()
  )
