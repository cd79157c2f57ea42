"""Workdirs, exports and precomputed shards in object storage, against a real GCS API server
(fake-gcs-server, the `gcs` fixture): paths reach orbax as URLs, no local folder is named after
a URL, and a run killed with SIGKILL resumes from the bucket to the losses of a local run."""

import os
import subprocess
import sys

# The trainer runs' harness (module-scoped data_root fixture, command line, kill and resume).
from test_train import ROOT, assert_same_losses_after, command, data_root, env, kill_then_resume

from data_pipeline import fileio, paths
from ove_jax import metrics as metrics_lib

assert data_root  # a fixture, used by the tests below by name


def no_url_folders(*folders):
  """Names under `folders` (recursively) that look like a URL's scheme made into a folder."""
  return [
    os.path.join(top, d)
    for folder in folders
    for top, dirs, _ in os.walk(folder)
    for d in dirs
    if d.endswith(':')
  ]


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
  assert os.listdir(tmp_path) == ['cache'] and not no_url_folders(tmp_path)


def test_sigkill_resume_in_a_bucket_matches_a_local_run_then_exports(
  gcs, tmp_path, data_root, monkeypatch
):
  # One compilation cache for the three runs: the later ones skip compiling (same programs).
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'jax_cache'))
  arg = 'smoke,steps=10,workers=0'
  local = str(tmp_path / 'local')
  subprocess.run(
    command(local, data_root, arg=arg),
    env=env(),
    check=True,
    capture_output=True,
    timeout=600,
    cwd=tmp_path,
  )
  run = paths.join(gcs, 'run')
  monkeypatch.chdir(tmp_path)  # the trainer runs in ROOT; this test's own paths in tmp_path
  resumed_from, result = kill_then_resume(run, data_root, 5, arg=arg)
  assert 5 <= resumed_from < 10
  assert f'checkpoints: {run}/checkpoints' in result.stdout
  assert_same_losses_after(resumed_from, local, run, 10)
  names = paths.listdir(run)
  assert {
    'checkpoints',
    'config.json',
    metrics_lib.METRICS_FILE,
    metrics_lib.TENSORBOARD_DIR,
  } <= set(names), names
  assert paths.glob(paths.join(run, metrics_lib.TENSORBOARD_DIR, 'events.out.tfevents.*'))

  out = paths.join(gcs, 'hf')  # written and checked locally, then uploaded
  export = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'tools', 'convert_checkpoint.py'),
      'from-train',
      f'--workdir={run}',
      f'--out={out}',
    ],
    env=env(),
    capture_output=True,
    text=True,
    timeout=600,
    cwd=tmp_path,
  )
  assert export.returncode == 0, export.stderr[-3000:]
  assert 'max |difference| over' in export.stdout and f'from {run} step 10' in export.stdout
  assert {'config.json', 'model.safetensors'} <= set(paths.listdir(out)), paths.listdir(out)
  assert not no_url_folders(tmp_path, ROOT)


def test_precompute_into_a_bucket_and_the_pipeline_reads_it(gcs, tmp_path, monkeypatch):
  from test_precompute import FLAGS, write_clip

  from data_pipeline import pipeline, precompute, sources
  from ove_jax_tools import precompute_codec

  monkeypatch.chdir(tmp_path)
  videos = []
  for i in range(3):
    write_clip(tmp_path / f'clip{i}.mp4', seed=i)
    videos.append(f'clip{i}.mp4\t{i},{i + 1}')
  (tmp_path / 'videos.tsv').write_text('\n'.join(videos) + '\n')
  out = paths.join(gcs, 'codec')
  argv = ['videos.tsv', out, *FLAGS, '--clips-per-shard', '2', '--workers', '0']
  assert precompute_codec.main(argv) == 0
  summary = fileio.read_json(paths.join(out, 'summary.json'))
  assert summary['out_dir'] == out and summary['records'] == 3 and summary['shards'] == 2
  assert precompute_codec.main(['--check', out]) == 0
  assert precompute_codec.main(argv) == 0  # a re-run finds both shards finished in the bucket
  assert fileio.read_json(paths.join(out, 'summary.json'))['shards_skipped'] == 2
  pattern = paths.join(out, 'ove_codec-train.*')
  shards = paths.glob(pattern)
  assert len(shards) == 2 and all(s.startswith(gcs) for s in shards)
  # ArrayRecord reads local files: the shards are staged into data.local_cache_dir once.
  cache = str(tmp_path / 'shard_cache')
  source = sources.open_source(pattern, cache_dir=cache)
  assert len(source) == 3 and source.paths == shards
  labels = sorted(tuple(sources.to_record(source[i]['raw'])['labels']) for i in range(3))
  assert labels == [(0, 1), (1, 2), (2, 3)]
  assert [r['labels'] for r in precompute.read_shard(shards[0])]  # staged by the reader too
  staged = sorted(
    os.path.relpath(os.path.join(d, f), cache) for d, _, fs in os.walk(cache) for f in fs
  )
  assert staged == [
    os.path.join('gs', gcs[len('gs://') :], 'codec', paths.basename(s)) for s in shards
  ]
  head = pipeline.HeadConfig(
    kind='video',
    source=pattern,
    rows=2,
    tokens_per_row=256,
    max_segments=2,
    num_labels=2,
    video_modes=(1.0, 0.0, 0.0),
  )
  cfg = pipeline.PipelineConfig(heads={'video': head}, worker_count=0, local_cache_dir=cache)
  batch = next(iter(pipeline.build(cfg)))['video']
  assert batch['segment_valid'].any()
  assert not no_url_folders(tmp_path)


def test_a_sweep_in_a_bucket_writes_its_job_array_and_collects_the_results(
  gcs, tmp_path, monkeypatch, capsys
):
  import json
  import shlex

  from ove_jax import sweeps
  from ove_jax_tools import sweep

  monkeypatch.chdir(tmp_path)
  spec = os.path.join(ROOT, 'experiments', 'ablations.py') + ':smoke,study=rope'
  root, jobs = paths.join(gcs, 'sweep'), str(tmp_path / 'rope.jobs')
  assert sweep.main([f'--config={spec}', f'--root={root}', f'--job-array={jobs}']) == 0
  saved = fileio.read_json(paths.join(root, sweeps.SWEEP_JSON))
  names = [p['name'] for p in saved['points']]
  commands = [
    shlex.split(line) for line in open(jobs).read().splitlines() if not line.startswith('#')
  ]
  assert [next(a for a in c if a.startswith('--workdir=')) for c in commands] == [
    f'--workdir={root}/{name}' for name in names
  ]
  # Generated data is local files: never a URL as builtin.root.
  assert not [
    a
    for c in commands
    for a in c
    if a.startswith('--config.builtin.root=') and paths.is_url(a.split('=', 1)[1])
  ]
  # One point has logged (in the bucket, as its trainer would), the others have not started.
  fileio.write_atomic(
    paths.join(root, names[0], 'metrics.jsonl'), json.dumps({'step': 1, 'loss': 4.5}) + '\n'
  )
  capsys.readouterr()
  assert sweep.main([f'--config={spec}', f'--root={root}', '--collect']) == 0
  printed = capsys.readouterr().out
  table = paths.read_bytes(paths.join(root, sweeps.RESULTS_MD)).decode()
  assert table in printed and f'results: {root}/{sweeps.RESULTS_MD}' in printed
  rows = table.splitlines()[2:]
  assert rows[0].startswith(f'| {names[0]} |') and '| unfinished | 1 | 4.5 |' in rows[0]
  assert all('| not started |' in row for row in rows[1:])
  assert not no_url_folders(tmp_path, ROOT)
