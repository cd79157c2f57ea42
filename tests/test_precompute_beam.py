"""Apache Beam as precompute's runner (DirectRunner): the same shards, byte for byte, as one
local run, the failure manifest and the final check; a second Beam run resumes (nothing to
redo), --overwrite starts over once (not while a task writes there), and the flags that only a
local run takes are refused."""

from __future__ import annotations

import json
import os

import pytest

from data_pipeline import beam_runner, locks, synthetic
from ove_jax_tools import precompute_codec

FLAGS = ['--num-frames', '4', '--budget', '16', '--resolution', '56', '--no-progress']


def shard_bytes(out_dir) -> dict:
  return {
    name: open(os.path.join(out_dir, name), 'rb').read()
    for name in os.listdir(out_dir)
    if '.array_record-' in name
  }


def test_beam_writes_the_shards_of_one_local_run_and_resumes(tmp_path, capsys):
  clips = [
    synthetic.make_clip(seed=i, num_frames=8, height=64, width=64).write(tmp_path / f'c{i}.mp4')
    for i in range(5)
  ]
  (tmp_path / 'broken.mp4').write_bytes(b'not a video')
  listing = tmp_path / 'videos.txt'
  listing.write_text('\n'.join([*clips, str(tmp_path / 'broken.mp4')]) + '\n')
  local, beam = tmp_path / 'local', tmp_path / 'beam'
  common = [*FLAGS, '--num-shards', '3', '--workers', '1']
  assert precompute_codec.main([str(listing), str(local), *common]) == 0
  capsys.readouterr()

  args = [str(listing), str(beam), *common, '--runner', 'beam']
  assert precompute_codec.main([*args, '--beam-args=--runner=DirectRunner']) == 0
  report = json.loads(capsys.readouterr().out)
  assert report['complete'] and report['records'] == 5 and report['failures'] == 1
  assert shard_bytes(beam) == shard_bytes(local) and len(shard_bytes(local)) == 3
  with open(local / 'failures.jsonl') as a, open(beam / 'failures.jsonl') as b:
    assert a.read() == b.read()
  # Three tasks (one per shard), each with its own summary; run again: every shard is done.
  assert sorted(n for n in os.listdir(beam / 'progress') if n.startswith('summary-task')) == [
    f'summary-task-{i:05d}-of-00003.json' for i in range(3)
  ]
  report = beam_runner.run(
    str(listing),
    str(beam),
    num_tasks=2,
    options={'num_frames': 4, 'budget': 16, 'resolution': 56},
    num_shards=3,
    workers=1,
  )
  assert report['complete'] and shard_bytes(beam) == shard_bytes(local)
  # --overwrite clears the folder once, at the launch (not in each task), and starts over.
  assert precompute_codec.main([*args, '--beam-args=--runner=DirectRunner', '--overwrite']) == 0
  assert json.loads(capsys.readouterr().out)['complete']
  assert shard_bytes(beam) == shard_bytes(local)
  with open(beam / 'progress' / 'beam_inputs.json') as f:
    assert [path for path, _ in json.load(f)] == [*clips, str(tmp_path / 'broken.mp4')]
  # A launch while a precompute task writes into the folder (here: its lock held) is refused
  # before anything is cleared.
  with locks.hold(str(beam), 'task-00000-of-00001', 'task 0 of 1'):
    assert precompute_codec.main([*args, '--beam-args=--runner=DirectRunner', '--overwrite']) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'ove-precompute-codec: {beam} is in use by another precompute run (pid')
  assert 'that writes the same shards as a Beam launch' in err
  assert shard_bytes(beam) == shard_bytes(local)

  with pytest.raises(SystemExit):
    precompute_codec.main([*args, '--task-index', '1'])
  assert '--task-index and --max-shards are for --runner local' in capsys.readouterr().err
  # Wrong options fail at the launch, before any task (not once in every Beam worker).
  with pytest.raises(ValueError, match="unknown option 'polcy'"):
    beam_runner.run(str(listing), str(tmp_path / 'never'), options={'polcy': 'zero'})
  assert not (tmp_path / 'never').exists()
  with pytest.raises(ValueError, match='progress: the Beam runner sets it'):
    beam_runner.run(str(listing), str(beam), progress=False)
