"""Precompute at corpus scale: clips that crash or hang their worker, one writer per folder, a
corpus split over tasks, the CPUs a process may use, and TFDS output read by name.

Faults are injected through precompute's real hooks (`reader`, see tests/precompute_faults.py),
not through test branches in the library. The clips are small synthetic ones (8 frames at 56 px)
so the selection costs little; the time limit of the hang is what most of the module waits for.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from data_pipeline import locks, precompute, sources, synthetic, workers
from ove_jax_tools import precompute_codec

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OPTIONS = {'num_frames': 4, 'budget': 16, 'resolution': 56}
FLAGS = ['--num-frames', '4', '--budget', '16', '--resolution', '56', '--no-progress']
READER = 'precompute_faults:open_clip'
# Far above what one of these clips takes (a fraction of a second) even on a loaded machine.
TIMEOUT = 6.0


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
  root = tmp_path_factory.mktemp('clips')
  return [
    synthetic.make_clip(seed=i, num_frames=8, height=64, width=64).write(root / f'clip{i}.mp4')
    for i in range(6)
  ]


def failures(out_dir):
  with open(os.path.join(out_dir, 'failures.jsonl')) as f:
    return [json.loads(line) for line in f]


def shard_bytes(out_dir):
  return {
    name: open(os.path.join(out_dir, name), 'rb').read()
    for name in sorted(os.listdir(out_dir))
    if '.array_record-' in name
  }


def test_a_segfault_and_a_hang_cost_their_clip_not_the_run(clips, tmp_path):
  inputs = [
    clips[0],
    str(tmp_path / 'segfault-decoder.mp4'),
    clips[1],
    str(tmp_path / 'hang-forever.mp4'),
    clips[2],
  ]
  out = tmp_path / 'out'
  summary = precompute.precompute(
    inputs,
    str(out),
    options=OPTIONS,
    num_shards=2,
    workers=2,
    clip_timeout=TIMEOUT,
    reader=READER,
    progress=False,
    shuffle_seed=None,
  )
  assert summary['complete'] and summary['records'] == 3 and summary['failures'] == 2
  reasons = {os.path.basename(e['file']): e['reason'] for e in failures(out)}
  assert sorted(reasons) == ['hang-forever.mp4', 'segfault-decoder.mp4']
  assert 'SIGSEGV' in reasons['segfault-decoder.mp4']
  assert f'timed out after {TIMEOUT:g} s' in reasons['hang-forever.mp4']
  assert all(name in reason for name, reason in reasons.items())  # each names its file
  got = sorted(
    r['source'] for p in precompute.shard_files(str(out)) for r in precompute.read_shard(p)
  )
  assert got == sorted(clips[:3])

  # A run killed in the middle of shard 0 (its marker and file lost, its failures journalled):
  # the re-run redoes the shard but keeps the known failure instead of crashing on it again.
  # (The manifest is the journal a single-task run appends to; it lists the segfault already.)
  plan = precompute.read_plan(str(out))
  os.remove(precompute.marker_path(str(out), 0))
  os.remove(precompute.shard_path(str(out), plan, 0))
  before = failures(out)
  assert [e['shard'] for e in before] == [0, 1]
  summary = precompute.precompute(
    inputs,
    str(out),
    options=OPTIONS,
    num_shards=2,
    workers=1,
    clip_timeout=TIMEOUT,
    reader=READER,
    progress=False,
    shuffle_seed=None,
  )
  assert summary['complete'] and summary['shards_written'] == 1
  assert summary['failures_known'] == 1 and summary['clips_processed'] == 1  # clip0 only
  assert summary['records'] == 3 and failures(out) == before
  # Asked to, it tries the failed clips again (and they fail again, the same way).
  summary = precompute.precompute(
    inputs,
    str(out),
    options=OPTIONS,
    num_shards=2,
    workers=1,
    clip_timeout=TIMEOUT,
    reader=READER,
    progress=False,
    shuffle_seed=None,
    retry_failures=True,
  )
  assert summary['shards_written'] == 2 and summary['failures_this_run'] == 2
  assert summary['failures_known'] == 0 and failures(out) == before


def test_the_pool_survives_crashes_hangs_and_errors_in_order():
  items = [1, 'segfault', 2, 'hang', 3, 'raise', 4, 'oom', None, 5]
  got = list(workers.ordered_map(_import_faults().work, items, 2, timeout=3.0))
  assert len(got) == len(items)
  assert got[0::2] == [2, 4, 6, 8, None] and got[9] == 10
  assert 'SIGKILL' in got[7].reason and 'out-of-memory' in got[7].reason
  assert 'SIGSEGV' in got[1].reason and 'timed out after 3 s' in got[3].reason
  assert got[5].reason == 'ValueError: asked to raise'
  # In this process (workers=0): the same results where nothing crashes.
  assert list(workers.ordered_map(_import_faults().work, [1, 2, 3], 0)) == [2, 4, 6]


def test_workers_start_with_one_blas_thread_unless_the_user_set_it(monkeypatch):
  # The same for codec selection: one thread per worker (no decoding thread).
  monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
  monkeypatch.delenv('OVE_SELECT_THREADS', raising=False)
  monkeypatch.setenv('OPENBLAS_NUM_THREADS', '3')
  names = ['OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'OVE_SELECT_THREADS']
  assert list(workers.ordered_map(_import_faults().env, names, 1)) == ['1', '3', '1']
  assert 'OMP_NUM_THREADS' not in os.environ  # the parent's own libraries keep their pools
  assert 'OVE_SELECT_THREADS' not in os.environ


def test_workers_keep_freed_memory_unless_the_user_chose(monkeypatch):
  # Each worker keeps freed memory in the process (no page faults for every clip's maps), but
  # leaves malloc to a user who configured it, or to OVE_HOST_TUNING=0.
  state = _import_faults().malloc_state
  malloc_variables = [n for n in os.environ if n.startswith('MALLOC_')]
  for name in ['OVE_HOST_TUNING', 'GLIBC_TUNABLES', *malloc_variables]:
    monkeypatch.delenv(name, raising=False)
  tuned = 'one arena, no mmap, no trim' if sys.platform.startswith('linux') else 'not tuned'
  assert list(workers.ordered_map(state, [0], 1))[0].startswith(tuned)
  monkeypatch.setenv('MALLOC_ARENA_MAX', '2')
  assert list(workers.ordered_map(state, [0], 1)) == ['left to the user (MALLOC_ARENA_MAX)']
  monkeypatch.delenv('MALLOC_ARENA_MAX')
  monkeypatch.setenv('OVE_HOST_TUNING', '0')
  assert list(workers.ordered_map(state, [0], 1)) == ['left alone (OVE_HOST_TUNING=0)']


def _import_faults():
  import precompute_faults  # tests/ is on sys.path under pytest, and so in spawned workers

  return precompute_faults


def test_a_second_run_on_the_same_folder_refuses(clips, tmp_path, capsys):
  listing = tmp_path / 'videos.txt'
  listing.write_text('\n'.join([clips[0], str(tmp_path / 'hang.mp4')]) + '\n')
  out = tmp_path / 'out'
  argv = [str(listing), str(out), *FLAGS, '--reader', READER, '--workers', '1']
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([HERE, os.environ.get('PYTHONPATH', '')])}
  # Its own session, so the test can stop it and its worker together.
  first = subprocess.Popen(
    [sys.executable, '-m', 'ove_jax_tools.precompute_codec', *argv, '--clip-timeout', '600'],
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    start_new_session=True,
  )
  lock = out / '.lock-task-00000-of-00001'
  try:
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text() and locks.is_held(str(lock))):
      assert first.poll() is None, first.stderr.read().decode()
      assert time.monotonic() < deadline, 'the first run never took its lock'
      time.sleep(0.2)
    assert precompute_codec.main(argv) == 2
    err = capsys.readouterr().err
    assert str(out) in err and f'pid {first.pid}' in err and socket.gethostname() in err
    with pytest.raises(locks.Locked, match='in use by another precompute run'):
      precompute.precompute([clips[0]], str(out), options=OPTIONS, workers=0, progress=False)
    # A task of a split run would write the same shards: refused too.
    with pytest.raises(locks.Locked, match=f'pid {first.pid}'):
      precompute.precompute(
        [clips[0]], str(out), options=OPTIONS, workers=0, progress=False, task_index=1, num_tasks=2
      )
  finally:
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
  # Killed, its lock is gone with it: the folder is usable again. The kernel drops the flock when
  # the last process holding it ends: the run's worker, killed with it, may end a moment later.
  deadline = time.monotonic() + 60
  while locks.is_held(str(lock)):
    assert time.monotonic() < deadline, 'the lock outlived the killed run'
    time.sleep(0.1)


def test_tasks_write_disjoint_shards_that_equal_one_machine_byte_for_byte(clips, tmp_path, capsys):
  listing = tmp_path / 'videos.txt'
  listing.write_text('\n'.join([*clips, str(tmp_path / 'missing.mp4')]) + '\n')
  one = tmp_path / 'one'
  assert (
    precompute_codec.main([str(listing), str(one), *FLAGS, '--num-shards', '4', '--workers', '2'])
    == 0
  )
  split = tmp_path / 'split'
  args = [str(listing), str(split), *FLAGS, '--num-shards', '4', '--num-tasks', '2']
  assert precompute_codec.main([*args, '--task-index', '1', '--workers', '0']) == 0
  names = sorted(shard_bytes(one))
  assert sorted(shard_bytes(split)) == [names[1], names[3]]
  assert precompute_codec.main(['--check', str(split)]) == 1
  assert '2 of 4 shards missing (0, 2)' in capsys.readouterr().err
  assert not os.path.exists(split / 'failures.jsonl')  # not until the corpus is complete

  assert precompute_codec.main([*args, '--task-index=0', '--workers=1']) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary['complete'] and summary['shards_written'] == 2
  # 7 clips in shards of 1, 2, 2 and 2: this task's shards 0 and 2 hold 3 of them.
  assert summary['records'] + summary['failures'] == 3
  with open(split / 'summary.json') as f:
    corpus = json.load(f)
  assert corpus['complete'] and corpus['records'] == len(clips) and corpus['failures'] == 1
  assert shard_bytes(split) == shard_bytes(one)  # disjoint halves, the same bytes
  assert failures(split) == failures(one) and len(failures(one)) == 1
  assert precompute_codec.main(['--check', str(split)]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report['complete'] and report['records'] == len(clips) and report['missing'] == []

  # A shard damaged after the fact fails the check.
  damaged = split / names[2]
  damaged.write_bytes(damaged.read_bytes()[:-10])
  assert precompute.check(str(split))['missing'] == [2]


def test_workers_default_to_the_cpus_this_process_may_use(tmp_path):
  proc, cgroup = tmp_path / 'proc', tmp_path / 'cgroup'
  (proc / 'self').mkdir(parents=True)
  (proc / 'self' / 'cgroup').write_text('0::/job/step\n')
  (cgroup / 'job' / 'step').mkdir(parents=True)
  (cgroup / 'cpu.max').write_text('max 100000\n')
  (cgroup / 'job' / 'cpu.max').write_text('250000 100000\n')  # 2.5 CPUs for the job
  (cgroup / 'job' / 'step' / 'cpu.max').write_text('max 100000\n')
  assert workers.cgroup_cpu_limit(str(proc), str(cgroup)) == 2.5
  (proc / 'self' / 'cgroup').write_text('4:cpu,cpuacct:/slurm/job1\n1:memory:/slurm/job1\n')
  v1 = cgroup / 'cpu,cpuacct' / 'slurm' / 'job1'
  v1.mkdir(parents=True)
  (v1 / 'cpu.cfs_quota_us').write_text('400000\n')
  (v1 / 'cpu.cfs_period_us').write_text('100000\n')
  assert workers.cgroup_cpu_limit(str(proc), str(cgroup)) == 4.0
  (v1 / 'cpu.cfs_quota_us').write_text('-1\n')  # no quota
  assert workers.cgroup_cpu_limit(str(proc), str(cgroup)) is None
  assert 1 <= workers.usable_cpus() <= len(os.sched_getaffinity(0))


def test_tfds_output_reads_by_name_in_the_readme_layout(clips, tmp_path):
  # README: `precompute_codec.py /data/videos /data/ove_codec_tfds --format tfds`, then
  # `tfds:ove_codec?data_dir=/data/ove_codec_tfds`.
  out = tmp_path / 'ove_codec_tfds'
  summary = precompute.precompute(
    clips[:3], str(out), options=OPTIONS, workers=0, progress=False, record_format='tfds'
  )
  assert summary['complete'] and summary['records'] == 3
  source = sources.open_source(f'tfds:ove_codec?split=train&data_dir={out}')
  assert sorted(
    sources.to_record(source[i]['raw'])['source'] for i in range(len(source))
  ) == sorted(clips[:3])
  # A wrong name or folder is named as such, not answered with TFDS's list of every dataset.
  with pytest.raises(FileNotFoundError, match="the dataset 'ove_codec'"):
    sources.open_source(f'tfds:other?data_dir={out}')
  with pytest.raises(FileNotFoundError, match='no dataset there'):
    sources.open_source(f'tfds:ove_codec?data_dir={tmp_path}')
  # A split it does not have names the ones it has and the fix.
  with pytest.raises(ValueError, match="no split 'val'; it has train: add &split=train"):
    sources.open_source(f'tfds:ove_codec?split=val&data_dir={out}')
  # TFDS's slices of a split it has still work.
  assert len(sources.open_source(f'tfds:ove_codec?split=train[:2]&data_dir={out}')) == 2


def test_wrong_hooks_are_refused_before_any_worker_starts(clips, tmp_path, capsys):
  listing = tmp_path / 'videos.txt'
  listing.write_text(clips[0] + '\n')
  for flag, spec in (
    ('--selector', 'data_pipeline.codec:no_such_selector'),
    ('--reader', 'no_such_module:read'),
  ):
    argv = [str(listing), str(tmp_path / 'out'), *FLAGS, flag, spec]
    assert precompute_codec.main(argv) == 2
    err = capsys.readouterr().err
    assert spec in err and flag[2:] in err
  # So is a bad OVE_SELECT_THREADS, which every worker would inherit.
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('OVE_SELECT_THREADS', '0')
    assert precompute_codec.main([str(listing), str(tmp_path / 'out'), *FLAGS]) == 2
    assert "OVE_SELECT_THREADS='0'" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'out' / 'failures.jsonl')
  # A video given where the list goes is named, not answered with a decoding error.
  assert precompute_codec.main([clips[0], str(tmp_path / 'out'), *FLAGS]) == 2
  assert f'{clips[0]}: not a text list of videos' in capsys.readouterr().err
  # A worker that cannot start stops the map with the reason, instead of retrying forever.
  with pytest.raises(workers.WorkerStartError, match='could not start'):
    list(
      workers.ordered_map(
        _import_faults().work, [1, 2], 1, initializer=_import_faults().work, initargs=('raise',)
      )
    )


def test_a_corpus_whose_first_clips_all_crash_stops_with_the_cause(tmp_path):
  # Sixteen clips in a row that lose their worker (an out-of-memory kill each) stop the run with
  # what to look at, not the advice about options that fits a wrong setting.
  inputs = [str(tmp_path / f'oom-{i}.mp4') for i in range(16)]
  with pytest.raises(precompute.Aborted, match='ran past the time limit or lost their worker') as e:
    precompute.precompute(
      inputs, str(tmp_path / 'out'), options=OPTIONS, workers=2, reader=READER, progress=False
    )
  assert '--clip-timeout' in str(e.value) and 'SIGKILL' in str(e.value)
  # Rolled back (no failures listed, no plan): a re-run tries these clips again.
  assert not os.path.exists(tmp_path / 'out' / 'failures.jsonl')
  assert not os.path.exists(tmp_path / 'out' / 'plan.json')


def test_a_stopped_task_keeps_the_finished_work_of_its_plan_and_says_where_a_new_run_goes(
  clips, tmp_path
):
  # Two tasks; task 0's first shard (good clips) is finished, then its next 16 clips all fail
  # in the reader (a bug, not the videos): the stop rolls back only those, keeps the plan the
  # finished shard belongs to, and says a run with other settings needs a new folder.
  errors = [str(tmp_path / f'error-{i}.mp4') for i in range(32)]  # 16 in task 0's shards
  run = functools.partial(
    precompute.precompute,
    clips[:4] + clips[:4] + errors,
    str(tmp_path / 'out'),
    options=OPTIONS,
    workers=0,
    reader=READER,
    progress=False,
    shuffle_seed=None,
    clips_per_shard=4,
    num_tasks=2,
    task_index=0,
  )
  summary = run(max_shards=1)
  assert summary['shards_written'] == 1 and summary['records'] == 4
  with pytest.raises(precompute.Aborted, match='all failed with errors that are not') as e:
    run()
  assert 'finished work of these settings stays' in str(e.value)
  assert 'give it a new folder' in str(e.value) and '--overwrite' not in str(e.value)
  assert os.path.exists(tmp_path / 'out' / 'plan.json')
  journal = tmp_path / 'out' / 'progress' / 'failures-task-00000-of-00002.jsonl'
  assert journal.read_text() == ''
  assert precompute.check(str(tmp_path / 'out'))['missing'] == list(range(1, 10))
