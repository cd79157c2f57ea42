"""The built-in synthetic training data (data_pipeline.builtin): made once, reused, resumable.

One small set (4 clips, 6 images, budget 512) is made once for the module; the resume, lock and
failure tests make their own, smaller ones (2 clips at budget 256, selection in-process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipeline import builtin, codec, pipeline, precompute, sources, synthetic
from data_pipeline.video import VideoError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(clips=4, images=6, budget=512)
TINY = dict(clips=2, images=2, budget=256)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('builtin'))
  return root, builtin.ensure(root, **SMALL, progress=False)


def mtimes(root: str) -> dict[str, int]:
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      out[os.path.relpath(path, root)] = os.stat(path).st_mtime_ns
  return out


def test_result_sources_and_labels(built):
  root, result = built
  images = os.path.join(root, 'images')
  assert result == {
    'video_source': result['video_source'],
    'image_source': f'folder:{images}?labels={images}/labels.npy',
    'video_classes': 57,
    'image_classes': 29,
    'video_labels': 4,
    'image_labels': 3,
    'clips': 4,
    'images': 6,
  }
  assert len(sources.open_source(result['video_source'])) == 4
  assert len(sources.open_source(result['image_source'])) == 6

  # Videos: fine class, then its shape, direction and texture, as the clip's ground truth says.
  clip_labels = {}
  for path in result['video_source'].split(','):
    for record in precompute.read_shard(path):
      fine, shape, direction, texture = record['labels'].tolist()
      assert (shape, direction) == (40 + fine // 8, 45 + fine % 8) and 53 <= texture < 57
      assert len(record['positions']) == SMALL['budget']
      clip_labels[os.path.basename(record['source'])] = (fine, shape, direction, texture)
  assert sorted(clip_labels) == [f'clip-{i:05d}.mp4' for i in range(4)]
  clip = synthetic.make_clip(
    builtin.item_seed(0, 0, 1), num_frames=64, bframes=2, num_objects=1, background='pan'
  )
  truth = clip.labels
  assert clip_labels['clip-00001.mp4'] == (
    truth['shape_id'] * 8 + truth['direction_id'],
    40 + truth['shape_id'],
    45 + truth['direction_id'],
    53 + truth['texture_id'],
  )
  with open(os.path.join(root, 'videos', 'clip-00001.mp4'), 'rb') as f:
    assert f.read() == clip.data

  # Images: [N, 3] int32 in sorted file order: fine class, then its shape and texture.
  labels = np.load(os.path.join(images, 'labels.npy'))
  assert labels.dtype == np.int32 and labels.shape == (6, 3)
  np.testing.assert_array_equal(labels[:, 1], 20 + labels[:, 0] // 4)
  np.testing.assert_array_equal(labels[:, 2], 25 + labels[:, 0] % 4)
  folder = sources.open_source(result['image_source'])
  assert folder.files == [f'img-{i:05d}.png' for i in range(6)]
  still = synthetic.make_clip(builtin.item_seed(0, 1, 3), num_frames=1, keep_frames=True)
  assert tuple(labels[3]) == builtin.image_labels(still.labels)


def test_pipeline_reads_both_sources(built):
  _, result = built
  budget = SMALL['budget']
  cfg = {
    'seed': 0,
    'worker_count': 0,
    'heads': {
      'video': {
        'kind': 'video',
        'source': result['video_source'],
        'rows': 4,
        'video_modes': (1.0, 0.0, 0.0),
        'tokens_per_row': budget,
        'max_segments': 1,
        'num_labels': 3,
      },  # the first three of the clips' four
      'image': {
        'kind': 'image',
        'source': result['image_source'],
        'rows': 4,
        'resolution': 224,
        'tokens_per_row': 256,
        'max_segments': 1,
        'num_labels': result['image_labels'],
      },
    },
  }
  iterator = pipeline.make_iterator(cfg)
  for _ in range(2):
    batch = next(iterator)
    for head, tokens, classes in (
      ('video', budget, result['video_classes']),
      ('image', 256, result['image_classes']),
    ):
      b = batch[head]
      assert b['patches'].shape == (4, tokens, 588)
      assert b['segment_valid'].all() and b['num_skipped'] == 0
      assert (b['segment_ids'] == 1).all()  # every row is one whole sample
      assert b['labels'].shape == (4, 1, 3)
      assert 0 <= b['labels'].min() and b['labels'].max() < classes


def test_second_call_is_fast_and_changes_nothing(built):
  root, result = built
  before = mtimes(root)
  start = time.perf_counter()
  again = builtin.ensure(root, **SMALL, progress=False)
  assert time.perf_counter() - start < 0.5
  assert again == result
  assert mtimes(root) == before


@pytest.mark.parametrize('change', [{'clips': 5}, {'images': 7}, {'budget': 1024}, {'seed': 1}])
def test_other_parameters_are_refused(built, change):
  root, _ = built
  name = next(iter(change))
  with pytest.raises(ValueError, match=rf'{name}=.*another root.*delete'):
    builtin.ensure(root, **{**SMALL, **change}, progress=False)


def test_killed_run_resumes(tmp_path):
  root = str(tmp_path)
  result = builtin.ensure(root, **TINY, workers=0, progress=False)
  clip = os.path.join(root, 'videos', 'clip-00001.mp4')
  with open(clip, 'rb') as f:
    clip_bytes = f.read()
  # As if killed midway: no marker, a clip lost, a half-written image, a shard not marked done.
  for path in ('builtin.json', 'videos/clip-00001.mp4', 'records/progress/shard-00000.json'):
    os.remove(os.path.join(root, path))
  with open(os.path.join(root, 'images', 'img-00001.png'), 'r+b') as f:
    f.truncate(100)
  before = mtimes(root)
  assert builtin.ensure(root, **TINY, workers=0, progress=False) == result
  after = mtimes(root)
  remade = {p for p in after if before.get(p) != after[p]}
  assert {'videos/clip-00001.mp4', 'images/img-00001.png', 'builtin.json'} <= remade
  assert not remade & {
    'videos/clip-00000.mp4',
    'images/img-00000.png',
    'videos/clips.tsv',
    'images/labels.npy',
  }
  with open(clip, 'rb') as f:
    assert f.read() == clip_bytes  # the same seed makes the same file


def test_concurrent_calls_make_it_once(tmp_path):
  code = (
    'import json, sys; from data_pipeline import builtin; '
    'print(json.dumps(builtin.ensure(sys.argv[1], clips=2, images=2, budget=256, '
    'workers=0)))'
  )
  env = {**os.environ, 'PYTHONPATH': REPO + os.pathsep + os.environ.get('PYTHONPATH', '')}
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', code, str(tmp_path)],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      text=True,
    )
    for _ in range(2)
  ]
  outputs = [p.communicate(timeout=120)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
  assert results[0] == results[1] and results[0]['clips'] == 2
  # One process made the data; the other found it ready (or waited on the lock for it).
  assert sum('clip selections in' in out for out in outputs) == 1, outputs


def test_too_few_selected_clips_fail_clearly(tmp_path, monkeypatch):
  def no_selection(path, **_):
    raise VideoError(f'{path}: no selection (test)')

  monkeypatch.setattr(codec, 'select', no_selection)  # precompute calls codec.select
  with pytest.raises(RuntimeError, match='failures.jsonl'):
    builtin.ensure(str(tmp_path), **TINY, workers=0, progress=False)
  assert not os.path.exists(tmp_path / 'builtin.json')
