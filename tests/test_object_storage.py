"""Workdirs, exports and precomputed shards in object storage, against a real GCS API server
(fake-gcs-server, the `gcs` fixture): paths reach orbax as URLs, no local folder is named after
a URL, and a run killed with SIGKILL resumes from the bucket to the losses of a local run."""
import os

import pytest

from data_pipeline import fileio, paths


def test_paths_and_atomic_writes_on_a_bucket(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  run = paths.join(gcs, 'run')
  assert paths.absolute(run + '/') == run and paths.dirname(run) == gcs
  assert not paths.exists(run) and paths.listdir(run) == []
  fileio.write_json(paths.join(run, 'a', 'x.json'), {'k': 1})
  fileio.write_atomic(paths.join(run, 'b.txt'), 'text')
  with fileio.atomic_path(paths.join(run, 'c.bin')) as tmp:
    assert not paths.is_url(tmp)
    with open(tmp, 'wb') as f:
      f.write(b'\0' * 10)
  assert fileio.read_json(paths.join(run, 'a', 'x.json')) == {'k': 1}
  assert fileio.read_json(paths.join(run, 'missing.json')) is None
  assert paths.listdir(run) == ['a', 'b.txt', 'c.bin']
  assert paths.isdir(paths.join(run, 'a')) and paths.isfile(paths.join(run, 'b.txt'))
  assert paths.getsize(paths.join(run, 'c.bin')) == 10
  assert paths.glob(paths.join(run, '*.txt')) == [paths.join(run, 'b.txt')]
  staged = paths.stage(paths.join(run, 'c.bin'))
  assert staged.startswith(str(tmp_path / 'cache')) and open(staged, 'rb').read() == b'\0' * 10
  paths.rmtree(paths.join(run, 'a'))
  assert paths.listdir(run) == ['b.txt', 'c.bin']
  assert os.listdir(tmp_path) == ['cache']  # no 'gs:' folder in the working directory
