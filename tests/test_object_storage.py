"""Workdirs, exports and precomputed shards in object storage, against a real GCS API server
(fake-gcs-server, the `gcs` fixture) and a real S3 API server (moto, the `s3` fixture): paths
reach orbax as URLs, no local folder is named after a URL, a run killed with SIGKILL resumes from
the bucket to the losses of a local run, and s3:// workdirs, where orbax cannot keep checkpoints,
are refused before anything runs."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

# The trainer runs' harness (command line, kill and resume; data_root: tests/conftest.py).
from test_train import ROOT, assert_same_losses_after, command, env, kill_then_resume

from data_pipeline import fileio, paths
from ove_jax import metrics as metrics_lib


def no_url_folders(*folders):
  """Names under `folders` (recursively) that look like a URL's scheme made into a folder."""
  return [
    os.path.join(top, d)
    for folder in folders
    for top, dirs, _ in os.walk(folder)
    for d in dirs
    if d.endswith(':')
  ]


@pytest.fixture(params=['gcs', 's3'])
def bucket(request):
  """A new, empty bucket: gs://... on the GCS server, then s3://... on the S3 server."""
  return request.getfixturevalue(request.param)


def upload_mark(url):
  """What the server says about the object at `url` that changes with every upload of new
  content, None when there is none: its generation (GCS), its ETag, the MD5 of its bytes (S3)."""
  scheme, rest = url.split('://', 1)
  name, key = rest.split('/', 1)
  if scheme == 'gs':
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project='test', credentials=AnonymousCredentials())
    blob = client.bucket(name).get_blob(key)
    return None if blob is None else blob.generation
  import boto3
  import botocore.exceptions

  try:
    return boto3.client('s3').head_object(Bucket=name, Key=key)['ETag']
  except botocore.exceptions.ClientError:
    return None


def test_paths_and_atomic_writes_on_a_bucket(bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  run = paths.join(bucket, 'run')
  assert paths.absolute(run + '/') == run and paths.dirname(run) == bucket
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
  # A second stage of the same version copies nothing (the same file, not a new one); an upload
  # of the same size is fetched again, and so is a copy cut short.
  before = os.stat(staged)
  assert paths.stage(paths.join(run, 'c.bin')) == staged
  assert (os.stat(staged).st_ino, os.stat(staged).st_mtime_ns) == (
    before.st_ino,
    before.st_mtime_ns,
  )
  fileio.write_atomic(paths.join(run, 'c.bin'), b'\1' * 10)
  assert open(paths.stage(paths.join(run, 'c.bin')), 'rb').read() == b'\1' * 10
  os.truncate(staged, 4)
  assert open(paths.stage(paths.join(run, 'c.bin')), 'rb').read() == b'\1' * 10
  paths.rmtree(paths.join(run, 'a'))
  assert paths.listdir(run) == ['b.txt', 'c.bin']
  assert os.listdir(tmp_path) == ['cache'] and not no_url_folders(tmp_path)


def test_metrics_in_a_bucket_are_uploaded_in_batches(bucket, tmp_path, monkeypatch):
  """metrics.jsonl in a bucket holds, after close, the very bytes a local run writes line by
  line, but was uploaded at flushes, after the interval and at close only: counted at
  fileio.write_atomic (the one upload call) and by the server (`upload_mark`)."""
  import json
  import types

  uploads, write_atomic = [], fileio.write_atomic

  def counted(path, data):
    uploads.append(path)
    write_atomic(path, data)

  monkeypatch.setattr(fileio, 'write_atomic', counted)
  clock = [1000.0]  # the writer's time.monotonic, moved by hand
  monkeypatch.setattr(metrics_lib, 'time', types.SimpleNamespace(monotonic=lambda: clock[0]))
  local, run = str(tmp_path / 'local'), paths.join(bucket, 'run')
  local_file, url = os.path.join(local, metrics_lib.METRICS_FILE), paths.join(run, 'metrics.jsonl')
  steps = {
    s: {'loss': 5 - s / 8, 'lr': s * 1e-4, 'grad_norm': float('nan') if s == 3 else 1.0}
    for s in range(1, 21)
  }
  jsonl = {'writers': ('jsonl',)}
  with (
    metrics_lib.MetricWriter(local, **jsonl) as here,
    metrics_lib.MetricWriter(run, **jsonl, object_flush_seconds=30) as there,
  ):
    for s in range(1, 11):
      here.write(s, steps[s])
      there.write(s, steps[s])
      clock[0] += 2.9  # 29 s for the ten lines: under the interval
      assert len(open(local_file).readlines()) == s  # locally, line by line
    assert uploads == [] and upload_mark(url) is None  # ten lines, nothing sent
    there.flush()  # as the trainer does after a checkpoint save
    assert uploads == [url] and paths.read_bytes(url) == open(local_file, 'rb').read()
    first = upload_mark(url)
    there.flush()  # nothing new: nothing sent
    for s in range(11, 21):
      here.write(s, steps[s])
      there.write(s, steps[s])
    assert len(uploads) == 1 and upload_mark(url) == first
    assert len(paths.read_bytes(url).decode().splitlines()) == 10
  assert len(uploads) == 2 and upload_mark(url) != first  # the close sent the rest
  assert paths.read_bytes(url) == open(local_file, 'rb').read()
  assert len(open(local_file).readlines()) == 20

  # A resumed run starts from the object's lines; a line written 30 s or more after the last
  # upload is sent with it (the bound on what a kill without warning loses); a close with
  # nothing new sends nothing.
  with metrics_lib.MetricWriter(run, **jsonl, object_flush_seconds=30) as again:
    again.write(21, {'loss': 1.0})
    assert len(uploads) == 2
    clock[0] += 30
    again.write(22, {'loss': 0.5})
    assert len(uploads) == 3
  assert len(uploads) == 3
  rows = metrics_lib.read_metrics(run)
  assert [r['step'] for r in rows] == list(range(1, 23)) and rows[-1]['loss'] == 0.5
  assert [json.dumps(r, sort_keys=True) for r in rows[:20]] == [
    json.dumps(r, sort_keys=True) for r in metrics_lib.read_metrics(local)
  ]


def test_tensorboard_events_in_s3(s3, tmp_path, monkeypatch):
  """The TensorBoard writer in an s3:// workdir (tensorboardX, through boto3) leaves one events
  object holding the logged scalars (gs://: the SIGKILL test below, in a subprocess, because
  tensorboardX's gs:// writer uploads once more when it is garbage-collected, which at the end of
  this process would wait 120 s on the stopped server)."""
  import gc

  monkeypatch.chdir(tmp_path)
  run = paths.join(s3, 'run')
  with metrics_lib.MetricWriter(run, writers=('jsonl', 'tensorboard')) as writer:
    for step in (1, 2):
      writer.write(step, {'loss': 3.0 / step})
  (events,) = paths.glob(paths.join(run, metrics_lib.TENSORBOARD_DIR, 'events.out.tfevents.*'))
  data = paths.read_bytes(events)
  assert data.count(b'loss') == 2, data
  assert [r['loss'] for r in metrics_lib.read_metrics(run)] == [3.0, 1.5]
  assert not no_url_folders(tmp_path)
  del writer
  gc.collect()  # tensorboardX's record writer uploads again in __del__: while the server is up


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
  # The killed run's lines up to its checkpoint were uploaded before the checkpoint committed
  # (metrics.jsonl in a bucket is uploaded in batches, flushed at each checkpoint save).
  assert_same_losses_after(0, local, run, 10)
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


def test_precompute_into_a_bucket_and_the_pipeline_reads_it(bucket, tmp_path, monkeypatch):
  from test_precompute import FLAGS, write_clip

  from data_pipeline import pipeline, precompute, sources
  from ove_jax_tools import precompute_codec

  monkeypatch.chdir(tmp_path)
  videos = []
  for i in range(3):
    write_clip(tmp_path / f'clip{i}.mp4', seed=i)
    videos.append(f'clip{i}.mp4\t{i},{i + 1}')
  (tmp_path / 'videos.tsv').write_text('\n'.join(videos) + '\n')
  out = paths.join(bucket, 'codec')
  argv = ['videos.tsv', out, *FLAGS, '--clips-per-shard', '2', '--workers', '0']
  assert precompute_codec.main(argv) == 0
  summary = fileio.read_json(paths.join(out, 'summary.json'))
  assert summary['out_dir'] == out and summary['records'] == 3 and summary['shards'] == 2
  assert precompute_codec.main(['--check', out]) == 0
  assert precompute_codec.main(argv) == 0  # a re-run finds both shards finished in the bucket
  assert fileio.read_json(paths.join(out, 'summary.json'))['shards_skipped'] == 2
  pattern = paths.join(out, 'ove_codec-train.*')
  shards = paths.glob(pattern)
  assert len(shards) == 2 and all(s.startswith(bucket) for s in shards)
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
  copies = [os.path.join(*bucket.split('://'), 'codec', paths.basename(s)) for s in shards]
  assert staged == sorted(copies + [c + paths.STAGED_VERSION_SUFFIX for c in copies])
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
  # docs/storage.md's recipe: cluster labels from the bucket's precompute folder, into the bucket.
  from ove_jax_tools import cluster_labels

  labelled = paths.join(bucket, 'labels')
  argv = ['--teacher', 'random:tiny', '--records', out, '--k', '2', '--num-labels', '2']
  assert cluster_labels.main([*argv, '--out', labelled]) == 0
  relabelled = sources.open_source(paths.join(labelled, 'records', '*.array_record*'), cache)
  assert len(relabelled) == 3 and all(p.startswith(labelled) for p in relabelled.paths)
  new_labels = [sources.to_record(relabelled[i]['raw'])['labels'] for i in range(3)]
  assert [list(x) for x in new_labels] == fileio.read_arrays(
    paths.join(labelled, 'labels.npy')
  ).tolist()
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


def test_an_s3_workdir_is_refused_before_anything_runs(s3, tmp_path, monkeypatch):
  """orbax-checkpoint cannot keep checkpoints at s3:// (it makes s3://b/k s3:/b/k): the trainer
  refuses such a workdir with a config error before any process starts or writes, and the
  checkpoint layer (save, listing, restore, parameter directories) refuses the URL by name."""
  import orbax.checkpoint as ocp

  from ove_jax import checkpoint, train
  from ove_jax import config as config_lib
  from ove_jax.models import EncoderConfig

  monkeypatch.chdir(tmp_path)
  run = paths.join(s3, 'run')
  config = config_lib.load(os.path.join(ROOT, 'experiments', 'demo_cpu.py') + ':smoke', [])
  with pytest.raises(config_lib.ConfigError) as e:
    train.train(config, run)
  assert str(e.value).startswith(f'--workdir {run}: orbax-checkpoint {ocp.__version__} cannot')
  assert 'put the workdir on gs:// or a local path' in str(e.value)
  assert paths.listdir(s3) == []  # nothing written
  message = f'orbax-checkpoint {ocp.__version__} cannot keep checkpoints at a s3:// URL'
  for call in (
    lambda: checkpoint.open_manager(checkpoint.root_of(run), create=True),
    lambda: checkpoint.save_params(run, EncoderConfig.preset('tiny'), {}),
    lambda: checkpoint.load_params(run),
  ):
    with pytest.raises(ValueError, match=message):
      call()
  # Files that are not checkpoints stay welcome at s3:// (the test above), and gs:// and local
  # checkpoint paths pass the check.
  checkpoint.check_checkpoint_path('gs://bucket/run/checkpoints')
  checkpoint.check_checkpoint_path(str(tmp_path / 'run'))
  assert paths.listdir(s3) == [] and not no_url_folders(tmp_path)


def test_an_export_to_s3_is_uploaded_and_loads_back(s3, smoke_run, tmp_path, monkeypatch, capsys):
  """`ove-convert from-train --out s3://...` of a local run: written and checked locally, then
  uploaded; the objects, staged back, load as the checkpoint's encoder parameters."""
  import jax
  import numpy as np
  from flax import nnx

  from ove_jax import checkpoint
  from ove_jax_tools import convert_checkpoint

  monkeypatch.chdir(tmp_path)
  workdir, _, _ = smoke_run
  out = paths.join(s3, 'hf')
  assert convert_checkpoint.main(['from-train', '--workdir', workdir, '--out', out]) == 0
  printed = capsys.readouterr().out
  assert f'uploaded to {out}' in printed and 'max |difference| over' in printed
  assert f'wrote the export for {out} (checked locally)' in printed  # not the deleted folder
  assert 'ove_export_' not in printed
  assert {'config.json', 'model.safetensors'} <= set(paths.listdir(out)), paths.listdir(out)
  staged = {paths.stage(paths.join(out, name)) for name in ('config.json', 'model.safetensors')}
  (folder,) = {os.path.dirname(p) for p in staged}
  assert folder == os.path.join(str(tmp_path / 'cache'), 'ove_jax', 'objects', *out.split('://'))
  here, there = checkpoint.load_encoder(workdir), checkpoint.load_encoder(folder)
  want = jax.tree.leaves(nnx.state(here.model, nnx.Param))
  got = jax.tree.leaves(nnx.state(there.model, nnx.Param))
  assert len(got) == len(want) > 0
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not no_url_folders(tmp_path, ROOT)


# ------------------------------------------------------------------------------------------------
# Release-format (Hugging Face) directories in a bucket
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def release_export(tmp_path_factory):
  """A tiny encoder exported locally in the release format: as one model.safetensors
  ('single') and as shards with model.safetensors.index.json ('sharded')."""
  from ove_jax import convert
  from ove_jax.models import EncoderConfig, create_encoder

  model = create_encoder(EncoderConfig.preset('tiny'), seed=5)
  root = tmp_path_factory.mktemp('release')
  exports = {'single': str(root / 'single'), 'sharded': str(root / 'sharded')}
  convert.save_pytorch(model, exports['single'])
  convert.save_pytorch(model, exports['sharded'], max_shard_size='1MB')  # 3 shards
  return exports


def params_of(model):
  from flax import nnx

  return {
    path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def assert_same_params(got, want):
  assert set(got) == set(want) and want
  for path, value in want.items():
    np.testing.assert_array_equal(got[path], value, err_msg=str(path))


@pytest.mark.parametrize('layout', ['single', 'sharded'])
def test_a_release_directory_in_a_bucket_loads_like_the_local_one(
  bucket, layout, release_export, tmp_path, monkeypatch, capsys
):
  """load_encoder, convert.load_pytorch, `ove-convert from-hf` and the PyTorch port read a
  release-format directory at a gs:// / s3:// URL in place, to the local load's parameters bit
  for bit, with no local folder named after the URL."""
  from ove_jax import checkpoint, convert
  from ove_jax.convert import torch_model
  from ove_jax_tools import convert_checkpoint

  monkeypatch.chdir(tmp_path)
  local = release_export[layout]
  url = paths.join(bucket, 'exports', layout)
  paths.upload_folder(local, url)
  names = paths.listdir(url)
  assert ('model.safetensors' in names) == (layout == 'single'), names
  assert ('model.safetensors.index.json' in names) == (layout == 'sharded'), names
  assert (len([n for n in names if n.startswith('model-')]) >= 2) == (layout == 'sharded'), names
  want = params_of(checkpoint.load_encoder(local).model)

  loaded = checkpoint.load_encoder(url)
  assert loaded.source == f'release-format directory {url}' and loaded.step is None
  assert_same_params(params_of(loaded.model), want)
  assert_same_params(params_of(convert.load_pytorch(url)), want)
  if layout == 'sharded':  # the command line, once (its reading is load_pytorch's)
    out = str(tmp_path / 'params')
    assert convert_checkpoint.main(['from-hf', f'--hf={url}', '--out', out]) == 0
    assert 'bit-exact' in capsys.readouterr().out
    assert_same_params(params_of(checkpoint.load_encoder(out).model), want)

  port, reference = torch_model.load_pretrained(url), torch_model.load_pretrained(local)
  theirs = reference.state_dict()
  assert set(port.state_dict()) == set(theirs)
  for key, value in port.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), theirs[key].numpy(), err_msg=key)
  with open('/proc/self/maps') as f:  # the port's temporary copies are gone, not mapped
    assert 'ove_weights_' not in f.read()
  assert not no_url_folders(tmp_path, ROOT)


def assert_every_loader_refuses(url, message, encoder_error):
  """load_encoder (raising `encoder_error`), convert.load_pytorch (CheckpointError) and the
  PyTorch port (FileNotFoundError) refuse `url` with `message` (literal)."""
  from ove_jax import checkpoint, convert
  from ove_jax.convert import torch_model

  for load, error in (
    (checkpoint.load_encoder, encoder_error),
    (convert.load_pytorch, convert.CheckpointError),
    (torch_model.load_pretrained, FileNotFoundError),
  ):
    with pytest.raises(error, match=re.escape(message)):
      load(url)


def test_bad_release_urls_are_named_with_what_is_expected(bucket, release_export):
  """A URL with nothing under it, a release directory without its weights file, and an index
  whose shard is gone: each loader's error names the URL and the file it expected (the words of
  the local errors)."""
  from ove_jax.convert import CheckpointError, hub

  nothing = paths.join(bucket, 'nothing')
  assert_every_loader_refuses(nothing, f'{nothing}: no such directory', FileNotFoundError)

  bare = paths.join(bucket, 'bare')  # a release config.json without its weights
  config = os.path.join(release_export['single'], 'config.json')
  paths.upload(config, paths.join(bare, 'config.json'))
  assert_every_loader_refuses(bare, f'{bare}: model.safetensors is missing', CheckpointError)

  sharded = paths.join(bucket, 'sharded')
  paths.upload_folder(release_export['sharded'], sharded)
  shards = [n for n in os.listdir(release_export['sharded']) if n.startswith('model-')]
  paths.remove(paths.join(sharded, hub.shard_name(1, len(shards))))
  gone = f"{sharded}/model.safetensors.index.json names shard(s) ['model-00002-of"
  assert_every_loader_refuses(sharded, gone, CheckpointError)


def test_a_missing_bucket_and_a_cache_that_is_a_file_are_refused_first(gcs, tmp_path, monkeypatch):
  """A bucket that does not exist, as --workdir or in a data source, is named as such, and an
  XDG_CACHE_HOME that is a file by that variable, before built-in data is made or anything
  compiles: nothing is written, locally or in the bucket."""
  from ove_jax import config as config_lib
  from ove_jax import train

  monkeypatch.chdir(tmp_path)
  demo = os.path.join(ROOT, 'experiments', 'demo_cpu.py') + ':smoke'
  nobucket = 'gs://nobucket-' + gcs.rsplit('-', 1)[-1]
  source = f'{nobucket}/codec/ove_codec-train.*'
  cases = [
    (
      f'{nobucket}/run',
      [],
      rf'--workdir={nobucket}/run: {nobucket}: no such bucket \(or no access\)',
    ),
    (
      paths.join(gcs, 'run'),
      [f'data.heads.video.source={source}'],
      rf'data.heads.video.source={re.escape(source)}: {nobucket}: no such bucket \(or no',
    ),
  ]
  for workdir, overrides, message in cases:
    with pytest.raises(config_lib.ConfigError, match=f'^{message}'):
      train.train(config_lib.load(demo, overrides), workdir)
  afile = tmp_path / 'afile'
  afile.write_text('')
  monkeypatch.setenv('XDG_CACHE_HOME', str(afile))
  with pytest.raises(config_lib.ConfigError, match=r'^XDG_CACHE_HOME=.*afile: the local cache'):
    train.train(config_lib.load(demo), paths.join(gcs, 'run'))
  assert paths.listdir(gcs) == [] and os.listdir(tmp_path) == ['afile']


def test_batch_tools_name_a_missing_bucket_before_any_work(gcs, tmp_path, capsys, monkeypatch):
  """ove-precompute-codec, ove-sweep and ove-cluster-labels check an output bucket before any
  clip, trainer or teacher runs (they wrote a traceback after the work); so does the trainer for
  a JAX_COMPILATION_CACHE_DIR in one (JAX would only warn at every compile)."""
  from ove_jax import distributed, labels
  from ove_jax_tools import precompute_codec, sweep

  nobucket = 'gs://nobucket-' + gcs.rsplit('-', 1)[-1]
  listing = tmp_path / 'videos.txt'
  listing.write_text('never-read.mp4\n')
  missing = f'{nobucket}: no such bucket (or no access)'
  assert precompute_codec.main([str(listing), f'{nobucket}/codec']) == 2
  assert f'OUT_DIR {nobucket}/codec: {missing}' in capsys.readouterr().err
  ablations = os.path.join(ROOT, 'experiments', 'ablations.py') + ':smoke,study=selection'
  for flags, named in (
    (['--root', f'{nobucket}/sweep', '--run'], f'--root {nobucket}/sweep: {missing}'),
    (
      ['--root', str(tmp_path / 'sw'), '--job-array', f'{nobucket}/jobs'],
      f'--job-array {nobucket}/jobs: {missing}',
    ),
  ):
    assert sweep.main(['--config', ablations, *flags]) == 2
    assert named in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'sw')
  with pytest.raises(labels.LabelsError, match=re.escape(f'--out {nobucket}/labels: {missing}')):
    labels.check_out(f'{nobucket}/labels')
  monkeypatch.setenv(distributed.CACHE_ENV, f'{nobucket}/cache')
  with pytest.raises(ValueError, match=re.escape(f'{distributed.CACHE_ENV}={nobucket}/cache: ')):
    distributed.check_compilation_cache('')
