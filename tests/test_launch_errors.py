"""Launch mistakes end in one `config error:` line with exit status 2, before anything compiles:
dcn_* mesh sizes that do not fit, an Open MPI environment with variables missing, a compilation
cache folder that cannot be one. And ove-launch-local's stop: its default grace lets processes
finish a slow save, and it names the processes it has to kill."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import pytest
from jax._src.clusters import ompi_cluster

from data_pipeline import workers
from ove_jax import config as config_lib
from ove_jax import distributed, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, 'experiments', 'demo_cpu.py')
LAUNCHER = os.path.join(REPO, 'tools', 'launch_local.py')
OMPI_URI = '123.0;tcp://10.0.0.1:1234'


def run_main(monkeypatch, *overrides, workdir):
  """train.main in this process, which must stop before jax.distributed starts."""

  def never(*args, **kwargs):
    raise AssertionError(f'the run went on past its checks: {args} {kwargs}')

  monkeypatch.setattr(jax.distributed, 'initialize', never)
  monkeypatch.setattr(train, 'run_training', never)
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', ''))  # main adds its CPU flags
  return train.main(['--config', DEMO + ':smoke', '--workdir', str(workdir), *overrides])


@pytest.fixture
def no_scheduler(monkeypatch):
  """This machine's scheduler and launch variables removed (the test sets its own)."""
  for var in list(os.environ):
    if var.startswith(('OMPI_', 'SLURM_', 'OVE_', 'JAX_COORDINATOR', 'JAX_LOCAL_DEVICE_IDS')):
      monkeypatch.delenv(var)


# ------------------------------------------------------------------------------------------------
# Hybrid mesh sizes (mesh.dcn_*)
# ------------------------------------------------------------------------------------------------


class Remote:
  """A device of another process, as jax.devices() lists it in a multi-host run."""

  def __init__(self, device, process):
    self.id, self.process_index = device.id, process


def test_dcn_sizes_that_do_not_fit_are_config_errors():
  # demo_cpu has data=-1: the config check cannot see that dcn_data=3 does not divide it.
  c = config_lib.load(DEMO + ':smoke', ['mesh.dcn_data=3'])
  with pytest.raises(
    config_lib.ConfigError,
    match=r'mesh.dcn_data=3 must be >= 1 and divide mesh.data=4 \(mesh data=4 x fsdp=2 x '
    r'tensor=1 on 8 devices\): set mesh.dcn_data to a divisor of 4',
  ):
    train.make_mesh(c)
  # 2 processes x 4 devices, data=8 over 4 granules: each process would be cut in two.
  c = config_lib.load(DEMO + ':smoke', ['mesh.fsdp=1', 'mesh.dcn_data=4'])
  two_processes = [Remote(d, d.id // 4) for d in jax.devices()]
  with pytest.raises(
    config_lib.ConfigError,
    match=r'ask for 4 granules \(their product\) of 2 devices, which would split a process '
    r'between granules: make the product of mesh.dcn_data, .* divide the 2 processes',
  ):
    train.make_mesh(c, two_processes)
  assert dict(train.make_mesh(config_lib.load(DEMO + ':smoke', ['mesh.dcn_data=2'])).shape) == {
    'data': 4,
    'fsdp': 2,
    'tensor': 1,
  }


def test_dcn_error_from_the_command_line_is_one_line_exit_2(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'ove_jax.train',
      f'--config={DEMO}:smoke',
      f'--workdir={tmp_path / "run"}',
      '--config.mesh.dcn_data=3',
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if 'config error' in line]
  assert errors == [
    'config error: mesh.dcn_data=3 must be >= 1 and divide mesh.data=4 (mesh data=4 x fsdp=2 x '
    'tensor=1 on 8 devices): set mesh.dcn_data to a divisor of 4, or mesh.data to a multiple of '
    'it'
  ]


# ------------------------------------------------------------------------------------------------
# Open MPI variables
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'env, problem',
  [
    (
      {},
      'OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_LOCAL_RANK are not set',
    ),
    (
      {'OMPI_COMM_WORLD_SIZE': '2', 'OMPI_COMM_WORLD_RANK': '0'},
      'OMPI_COMM_WORLD_LOCAL_RANK is not set',
    ),
    (
      {'OMPI_COMM_WORLD_SIZE': 'two', 'OMPI_COMM_WORLD_LOCAL_RANK': '0'},
      "OMPI_COMM_WORLD_RANK is not set; OMPI_COMM_WORLD_SIZE='two' is not a whole number",
    ),
    # The count given as an override: the id and the local rank are still read from Open MPI.
    (
      {'OVE_NUM_PROCESSES': '2', 'OMPI_COMM_WORLD_LOCAL_RANK': '1'},
      'OMPI_COMM_WORLD_RANK is not set',
    ),
  ],
)
def test_open_mpi_variables_missing_are_named(env, problem):
  env = {'OMPI_MCA_orte_hnp_uri': OMPI_URI, **env}
  with pytest.raises(ValueError) as error:
    distributed.plan({}, env, ompi_cluster.OmpiCluster)
  assert str(error.value) == (
    f'JAX detected OmpiCluster here (OMPI_MCA_orte_hnp_uri is set) but {problem}: start the '
    'processes with mpirun or mpiexec, which sets all of them (see docs/launch.md), set them '
    'yourself, or unset OMPI_MCA_orte_hnp_uri (or set OVE_NUM_PROCESSES=1) for a '
    'single-process run.'
  )


def test_open_mpi_variables_that_are_not_read_are_not_needed():
  uri = {'OMPI_MCA_orte_hnp_uri': OMPI_URI}
  plan = distributed.plan
  # One process, by Open MPI's count or by the override: nothing else is read.
  assert plan({}, {**uri, 'OMPI_COMM_WORLD_SIZE': '1'}, ompi_cluster.OmpiCluster) is None
  assert plan({}, {**uri, 'OVE_NUM_PROCESSES': '1'}, ompi_cluster.OmpiCluster) is None
  # Device ids given another way: the local rank is not read.
  world = {**uri, 'OMPI_COMM_WORLD_SIZE': '2', 'OMPI_COMM_WORLD_RANK': '1'}
  assert 'local_device_ids' not in plan(
    {}, {**world, 'JAX_LOCAL_DEVICE_IDS': '1'}, ompi_cluster.OmpiCluster
  )
  assert (
    plan({}, {**world, 'OVE_LOCAL_DEVICE_IDS': 'all'}, ompi_cluster.OmpiCluster)['local_device_ids']
    == []
  )


def test_a_cluster_layout_jax_cannot_read_is_a_value_error():
  """Any other cluster JAX detects but whose process count it cannot read (its scheduler's API
  fails): a ValueError (a config error in the trainer) that names it, not a RuntimeError."""

  class GkeTpuCluster:  # JAX's class name, as detect_cluster returns it
    @staticmethod
    def get_process_count():
      raise KeyError('TPU_WORKER_HOSTNAMES')

  with pytest.raises(
    ValueError,
    match=r'JAX detected GkeTpuCluster here but could not read its process count '
    r"\(KeyError\('TPU_WORKER_HOSTNAMES'\)\).*OVE_NUM_PROCESSES=1",
  ):
    distributed.plan({}, {}, GkeTpuCluster)


@pytest.mark.parametrize(
  'env, missing',
  [
    ({}, 'OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_LOCAL_RANK are not set'),
    (
      {'OMPI_COMM_WORLD_SIZE': '2', 'OMPI_COMM_WORLD_RANK': '0'},
      'OMPI_COMM_WORLD_LOCAL_RANK is not set',
    ),
  ],
)
def test_open_mpi_variables_missing_exit_2(
  env, missing, no_scheduler, monkeypatch, tmp_path, capsys
):
  for var, value in {'OMPI_MCA_orte_hnp_uri': OMPI_URI, **env}.items():
    monkeypatch.setenv(var, value)
  assert run_main(monkeypatch, workdir=tmp_path / 'run') == 2
  err = capsys.readouterr().err
  assert (
    f'config error: JAX detected OmpiCluster here (OMPI_MCA_orte_hnp_uri is set) but {missing}: '
    'start the processes with mpirun or mpiexec'
  ) in err.splitlines()[-1]
  assert 'Traceback' not in err and not os.path.exists(tmp_path / 'run')


# ------------------------------------------------------------------------------------------------
# The compilation cache folder
# ------------------------------------------------------------------------------------------------


def test_a_compilation_cache_inside_a_file_is_a_config_error(
  no_scheduler, monkeypatch, tmp_path, capsys
):
  afile = tmp_path / 'afile'
  afile.write_text('')
  monkeypatch.delenv(distributed.CACHE_ENV, raising=False)
  workdir = tmp_path / 'run'
  cache = f'--config.compilation_cache_dir={afile}/cache'
  assert run_main(monkeypatch, cache, workdir=workdir) == 2
  assert capsys.readouterr().err.splitlines()[-1] == (
    f'config error: compilation_cache_dir={afile}/cache: a file, not a folder (inside {afile}, '
    'a file); give a folder for the compilation cache, or --config.compilation_cache_dir="" '
    'for none'
  )
  assert not workdir.exists()
  # The variable wins over the key, and is checked instead of it.
  monkeypatch.setenv(distributed.CACHE_ENV, str(afile))
  assert run_main(monkeypatch, workdir=workdir) == 2
  assert capsys.readouterr().err.splitlines()[-1] == (
    f'config error: {distributed.CACHE_ENV}={afile}: a file, not a folder; give a folder for '
    f'the compilation cache, or unset {distributed.CACHE_ENV}'
  )
  monkeypatch.setenv(distributed.CACHE_ENV, str(tmp_path / 'cache'))
  distributed.check_compilation_cache(f'{afile}/cache')  # not in use: the variable's is
  monkeypatch.delenv(distributed.CACHE_ENV)
  distributed.check_compilation_cache(str(tmp_path / 'new' / 'cache'))  # made when used
  distributed.check_compilation_cache('')  # off


# ------------------------------------------------------------------------------------------------
# ove-launch-local's stop
# ------------------------------------------------------------------------------------------------

# A process that saves for a while after SIGTERM (two steps and a save), then exits as preempted.
SLOW_SAVE = """
  import signal, sys, time

  def stop(signum, frame):
    time.sleep({seconds})
    print('saved', flush=True)
    sys.exit(75)

  signal.signal(signal.SIGTERM, stop)
  print('ready', flush=True)
  while True:
    time.sleep(0.1)
"""


def launched_and_ready(tmp_path, seconds, *flags):
  """The launcher running 2 SLOW_SAVE processes, once both are ready: (launcher, their pids)."""
  child = tmp_path / 'child.py'
  child.write_text(textwrap.dedent(SLOW_SAVE.format(seconds=seconds)))
  proc = subprocess.Popen(
    [sys.executable, LAUNCHER, '--processes=2', *flags, '--', sys.executable, str(child)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=REPO,
  )
  ready = []
  while len(ready) < 2:
    line = proc.stdout.readline()
    assert line, proc.communicate(timeout=30)[1]
    ready += [line] if line.endswith('] ready\n') else []
  children = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True)
  return proc, [int(pid) for pid in children.stdout.split()]


def sigterm_to_launcher(tmp_path, seconds, *flags):
  """Sends the launcher of 2 ready SLOW_SAVE processes SIGTERM: (its exit status, stdout,
  stderr)."""
  proc, _ = launched_and_ready(tmp_path, seconds, *flags)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  return proc.returncode, out, err


def test_a_launcher_killed_takes_its_processes_with_it(tmp_path):
  """kill -9 of the launcher: its processes (a session of their own, their output in its pipes)
  are killed too, instead of living on writing into pipes nobody reads."""
  proc, children = launched_and_ready(tmp_path, 0)
  assert len(children) == 2
  proc.kill()
  proc.communicate(timeout=30)
  deadline = time.monotonic() + 30
  while any(_running(pid) for pid in children):
    assert time.monotonic() < deadline, [pid for pid in children if _running(pid)]
    time.sleep(0.05)


def _running(pid: int) -> bool:
  """Alive and not a zombie (a killed child of a dead launcher waits for init to reap it)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def test_a_child_started_with_ends_with_parent_gets_the_signal_when_its_parent_dies(tmp_path):
  """`workers.ends_with_parent(SIGTERM)` (ove-sweep's trainer): the parent killed with
  SIGKILL, the child gets SIGTERM (a trainer then saves and stops)."""
  marker = tmp_path / 'got'
  child = (
    'import signal, sys, time\n'
    'def got(signum, frame):\n'
    f'  open({str(marker)!r}, "w").write(signal.Signals(signum).name); sys.exit(75)\n'
    'signal.signal(signal.SIGTERM, got)\n'
    'print("ready", flush=True)\n'
    'time.sleep(60)\n'
  )
  parent = (
    'import signal, subprocess, sys\n'
    'from data_pipeline import workers\n'
    f'command = workers.ends_with_parent([sys.executable, "-c", {child!r}], signal.SIGTERM)\n'
    'child = subprocess.Popen(command, start_new_session=True)\n'
    'print(child.pid, flush=True)\n'
    'child.wait()\n'
  )
  proc = subprocess.Popen(
    [sys.executable, '-c', parent],
    stdout=subprocess.PIPE,
    text=True,
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO),
  )
  pid = int(proc.stdout.readline())
  assert proc.stdout.readline() == 'ready\n'
  proc.kill()
  proc.wait(timeout=30)
  deadline = time.monotonic() + 30
  while not marker.exists() or _running(pid):
    assert time.monotonic() < deadline
    time.sleep(0.05)
  assert marker.read_text() == 'SIGTERM'


def test_ends_with_parent_runs_nothing_between_fork_and_exec(tmp_path):
  """The guard is set by the exec'd helper, not by a preexec_fn: starting the child from this
  process (JAX imported, threads running) forks without JAX's deadlock warning, the child keeps
  the pid Popen gave, and a command that does not exist is refused here as Popen would."""
  import warnings

  assert jax.devices()  # JAX's threads are up
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    child = subprocess.Popen(
      workers.ends_with_parent(
        [sys.executable, '-c', 'import os; print(os.getpid())'], signal.SIGTERM
      ),
      stdout=subprocess.PIPE,
      text=True,
      start_new_session=True,
    )
    out, _ = child.communicate(timeout=60)
  assert child.returncode == 0 and int(out) == child.pid
  assert not [w for w in caught if 'fork' in str(w.message)], [str(w.message) for w in caught]
  with pytest.raises(FileNotFoundError, match='no-such-command-ove'):
    workers.ends_with_parent(['no-such-command-ove', '--help'], signal.SIGTERM)


def test_launcher_default_grace_covers_a_slow_save(tmp_path):
  code, out, err = sigterm_to_launcher(tmp_path, 6)  # longer than the old 5 s default
  assert code == 75, out + err
  assert sorted(out.splitlines()) == ['[p0] saved', '[p1] saved']
  assert 'killed' not in err


def test_launcher_names_the_processes_it_kills(tmp_path):
  code, out, err = sigterm_to_launcher(tmp_path, 30, '--grace=1')
  assert code == 128 + signal.SIGTERM, out + err
  assert 'saved' not in out
  assert (
    '[launch_local] processes 0, 1 still running 1 s after SIGTERM: killed (SIGKILL); raise '
    '--grace if they were saving'
  ) in err.splitlines()
