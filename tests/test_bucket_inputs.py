"""A corpus in a bucket: precompute reads its list (or every video under a prefix) and its clips
from gs:// or s3:// on the local API servers (tests/conftest.py), with no reader hook; the records
name the objects and select what the local copies select; a missing object is a failure naming
it, and the run goes on."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_precompute import FLAGS, write_clip

from data_pipeline import codec, fileio, paths, precompute, shard_plan
from ove_jax_tools import precompute_codec


@pytest.fixture(params=['gcs', 's3'])
def bucket(request):
  return request.getfixturevalue(request.param)


def test_lists_and_prefixes_in_a_bucket_name_their_objects(bucket, tmp_path):
  for name in ('a/one.mp4', 'a/b/two.MKV', 'a/notes.txt', 'c/notes.txt'):
    local = tmp_path / 'x'
    local.write_bytes(b'not read here')
    paths.upload(str(local), paths.join(bucket, name))
  lines = ['one.mp4\t3', f'{bucket}/a/b/two.MKV\t4', 'b/two.MKV\t5', '/local/three.mp4\t6', '']
  paths.upload(str(_text(tmp_path / 'l', '\r\n'.join(lines))), paths.join(bucket, 'a/list.tsv'))
  clips = shard_plan.read_inputs(paths.join(bucket, 'a/list.tsv'))
  assert [(c.path, c.labels) for c in clips] == [
    (f'{bucket}/a/one.mp4', (3,)),
    (f'{bucket}/a/b/two.MKV', (4,)),
    (f'{bucket}/a/b/two.MKV', (5,)),
    ('/local/three.mp4', (6,)),
  ]
  found = shard_plan.read_inputs(paths.join(bucket, 'a'))
  assert [c.path for c in found] == [f'{bucket}/a/b/two.MKV', f'{bucket}/a/one.mp4']
  # A local list may name objects too: they are kept as URLs, not joined to its folder.
  local = _text(tmp_path / 'local.txt', f'{bucket}/a/one.mp4\nc.mp4\n')
  assert [c.path for c in shard_plan.read_inputs(str(local))] == [
    f'{bucket}/a/one.mp4',
    str(tmp_path / 'c.mp4'),
  ]
  with pytest.raises(FileNotFoundError, match='no such object or prefix; give a list object of'):
    shard_plan.read_inputs(paths.join(bucket, 'nothing/here.txt'))
  with pytest.raises(ValueError, match=r'/c: no input clips in this folder \(files ending'):
    shard_plan.input_clips(paths.join(bucket, 'c'))
  with pytest.raises(FileNotFoundError, match='write gs://'):
    shard_plan.read_inputs('gs:/bucket/list.txt')


def _text(path, text):
  path.write_text(text)
  return path


def test_precompute_reads_its_list_and_clips_from_a_bucket(gcs, tmp_path, capsys):
  for i in range(2):
    write_clip(tmp_path / f'clip{i}.mp4', seed=i)
    paths.upload(str(tmp_path / f'clip{i}.mp4'), paths.join(gcs, f'videos/clip{i}.mp4'))
  listing = 'clip0.mp4\t0\nmissing.mp4\t2\n' + f'{gcs}/videos/clip1.mp4\t1\n'
  paths.upload(str(_text(tmp_path / 'list.tsv', listing)), paths.join(gcs, 'videos/list.tsv'))
  out = str(tmp_path / 'out')
  # Two worker processes: each reads its clips from the server itself.
  argv = [f'{gcs}/videos/list.tsv', out, *FLAGS, '--workers', '2', '--no-progress']
  assert precompute_codec.main(argv) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary['records'] == 2 and summary['failures'] == 1
  failures = [json.loads(line) for line in open(os.path.join(out, 'failures.jsonl'))]
  assert [f['file'] for f in failures] == [f'{gcs}/videos/missing.mp4']
  assert f'{gcs}/videos/missing.mp4' in failures[0]['reason']
  records = {r['source']: r for p in precompute.shard_files(out) for r in precompute.read_shard(p)}
  assert sorted(records) == [f'{gcs}/videos/clip0.mp4', f'{gcs}/videos/clip1.mp4']
  options = precompute.read_plan(out)['options']
  for i in range(2):
    record = records[f'{gcs}/videos/clip{i}.mp4']
    assert list(record['labels']) == [i]
    local = codec.select(str(tmp_path / f'clip{i}.mp4'), **options)
    np.testing.assert_array_equal(record['positions'], local.positions)
  assert fileio.read_json(os.path.join(out, 'summary.json'))['complete']


def test_llava_data_reads_its_dataset_and_videos_from_a_bucket(gcs, tmp_path):
  from data_pipeline import llava, synthetic

  synthetic.make_clip(5, num_frames=16, height=96, width=160).write(tmp_path / 'walk.mp4')
  paths.upload(str(tmp_path / 'walk.mp4'), paths.join(gcs, 'llava/walk.mp4'))
  rows = [
    {'id': 7, 'video': f'{gcs}/llava/walk.mp4', 'conversations': []},
    {'id': 8, 'video': f'{gcs}/llava/gone.mp4', 'conversations': []},
  ]
  dataset = _text(tmp_path / 'data.jsonl', '\n'.join(json.dumps(r) for r in rows) + '\n')
  paths.upload(str(dataset), paths.join(gcs, 'llava/data.jsonl'))
  out = {k: str(tmp_path / k) for k in ('visidx_root', 'image_root')}
  counts = llava.run(
    paths.join(gcs, 'llava/data.jsonl'),
    settings=llava.Settings(image_format='png', num_frames=16, budget=16 * 36 * 36 // 2),
    workers=1,
    out_jsonl=str(tmp_path / 'train.jsonl'),
    **out,
  )
  assert counts == {'clips': 2, 'made': 1, 'skipped': 0, 'failed': 1}
  [visidx] = [n for n in os.listdir(out['visidx_root']) if n.endswith('.visidx_thw.npy')]
  with open(os.path.join(out['visidx_root'], visidx.replace('.visidx_thw.npy', '.meta.json'))) as f:
    assert json.load(f)['video'] == f'{gcs}/llava/walk.mp4'
  local = codec.select(
    str(tmp_path / 'walk.mp4'),
    num_frames=16,
    budget=16 * 36 * 36 // 2,
    resolution=576,
    patch_size=16,
    preset='release_llava',
  )
  np.testing.assert_array_equal(np.load(os.path.join(out['visidx_root'], visidx)), local.positions)
  [failure] = llava.read_failures(str(tmp_path / 'train.jsonl') + '.failures.jsonl')
  assert failure['video'] == f'{gcs}/llava/gone.mp4'
