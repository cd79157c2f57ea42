"""The trainer: sharded step == single-device step, accumulation == one large batch, exact resume
after SIGKILL, 2 processes x 4 devices == 1 process x 8, clean stop on SIGTERM (one process or
two: the same step saved, exit 75, exact resume), the hang watchdog, resume on another process
count with the optimizer state, later stages."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from data_pipeline import paths
from ove_jax import checkpoint, cli, preemption, resume, train, train_inputs, warm_start
from ove_jax import config as config_lib
from ove_jax import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, 'experiments', 'demo_cpu.py')


def small_config(**changes):
  c = config_lib.load(DEMO + ':smoke')
  c.optim.warmup = 0  # lr(0) > 0: the first step must move the parameters
  # Adam's first update is lr * g / (|g| + eps): for gradients at float-noise level (the MAP
  # head's key bias has an exactly zero gradient in exact arithmetic: softmax ignores a shift
  # shared by all keys) it is +-lr whatever the noise's sign, so summation order alone would
  # move such entries by 2 lr. A larger eps keeps the update linear in g there; the gradients
  # themselves are compared through their norms.
  c.optim.eps = 1e-3
  c.loss.num_slots = 2  # of 4 labels: the slot draw matters
  c.loss.sample_rate = 0.5
  for key, value in changes.items():
    config_lib.apply_override(c, f'{key}={value}')
  config_lib.validate(c)
  return c


def host_batch(
  seed, rows=8, length=64, segments=2, num_labels=4, classes=(('image', 29), ('video', 53))
):
  rng = np.random.default_rng(seed)
  out = {}
  for name, n_classes in classes:
    seg = np.zeros((rows, length), np.int32)
    seg[:, :30], seg[:, 30:60] = 1, 2
    out[name] = {
      'patches': rng.normal(size=(rows, length, 588)).astype(np.float32),
      'positions': rng.integers(0, 16, (rows, length, 3)).astype(np.int32),
      'segment_ids': seg,
      'labels': rng.integers(0, n_classes, (rows, segments, num_labels)).astype(np.int32),
      'segment_valid': np.ones((rows, segments), bool),
      'sample_index': (seed * 1000 + np.arange(rows * segments)).reshape(rows, segments),
      'num_skipped': np.int32(0),
    }
  return out


def run_step(config, devices, batches):
  mesh = train.make_mesh(config, devices)
  with jax.set_mesh(mesh):
    program = train.Program(config, mesh)
    state = program.init()
    state, metrics = program.step(state, program.device_batch(batches))
    params = jax.tree.map(np.asarray, state['params'])
    return params, {k: float(v) for k, v in metrics.items()}


def max_diff(a, b):
  return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize(
  'mesh, scan_layers', [((2, 4, 1), False), ((2, 2, 2), False), ((2, 2, 2), True)]
)
def test_sharded_step_equals_single_device_step(mesh, scan_layers):
  # The whole train step (encoder, Partial FC heads, AdamW), scanned blocks too (the layers axis
  # unsharded, the rest as unrolled).
  batches = [host_batch(0)]
  data, fsdp, tensor = mesh
  scan = {'model.scan_layers': scan_layers}
  sharded, m8 = run_step(
    small_config(**{'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.tensor': tensor}, **scan),
    jax.devices(),
    batches,
  )
  single, m1 = run_step(
    small_config(**{'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 1}, **scan),
    jax.devices()[:1],
    batches,
  )
  assert max_diff(sharded, single) <= 1e-5
  for key in m1:
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=key)
  # The step really moved the parameters (a no-op step would pass the equality trivially).
  init = small_config(**{'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 1}, **scan)
  mesh1 = train.make_mesh(init, jax.devices()[:1])
  with jax.set_mesh(mesh1):
    before = jax.tree.map(np.asarray, train.Program(init, mesh1).init()['params'])
  assert max_diff(before, single) > 1e-4
  stacked = 'layer_norm1' in sharded['encoder']['blocks']  # no per-layer keys when scanned
  assert stacked == scan_layers


def test_accumulation_equals_one_large_batch():
  micro = [host_batch(i) for i in range(4)]
  large = {
    name: {
      k: (np.concatenate([m[name][k] for m in micro]) if k != 'num_skipped' else np.int32(0))
      for k in micro[0][name]
    }
    for name in micro[0]
  }
  # Every class scored: a large batch and its micro-batches then see the same classes.
  accumulated, ma = run_step(
    small_config(accumulate=4, **{'loss.sample_rate': 1.0}), jax.devices(), micro
  )
  c = small_config(**{'loss.sample_rate': 1.0})
  for name in ('video', 'image'):
    c.data.heads[name].rows = 32
  one, mb = run_step(c, jax.devices(), [large])
  assert max_diff(accumulated, one) <= 1e-5
  np.testing.assert_allclose(ma['loss'], mb['loss'], rtol=1e-5)


def test_mesh_and_batch_errors_name_the_fix():
  c = small_config(**{'mesh.data': 4, 'mesh.fsdp': 4})
  with pytest.raises(config_lib.ConfigError, match='needs 16 devices but this run has 8'):
    train.make_mesh(c)
  c = small_config(**{'mesh.data': 3, 'mesh.fsdp': -1})
  with pytest.raises(config_lib.ConfigError, match='do not divide the 8 devices'):
    train.make_mesh(c)
  c = small_config()
  c.data.heads.video.rows = 4
  mesh = train.make_mesh(c)
  with pytest.raises(config_lib.ConfigError, match=r'data.heads.video.rows=4 .* 8 batch shards'):
    train.Program(c, mesh)
  c = small_config(**{'heads.video.sampling_blocks': 4})
  with pytest.raises(config_lib.ConfigError, match='sampling_blocks=8'):
    train.Program(c, train.make_mesh(c))
  # The fix named is the key that was set: a size of the mesh that is not -1, the rows as a
  # multiple, the loss default that every head inherits.
  c = small_config(**{'mesh.data': -1, 'mesh.fsdp': 3})
  with pytest.raises(config_lib.ConfigError, match=r'do not divide the 8 devices.*\(e.g. fsdp=1\)'):
    train.make_mesh(c)
  assert '--config.mesh.data=-1' not in str(
    pytest.raises(config_lib.ConfigError, train.make_mesh, c).value
  )
  c = small_config()
  c.data.heads.video.rows = 12
  with pytest.raises(config_lib.ConfigError, match=r'rows=12 .*--config.data.heads.video.rows=16'):
    train.Program(c, train.make_mesh(c))
  c = small_config(**{'loss.sampling_blocks': 4})
  with pytest.raises(config_lib.ConfigError, match=r'--config.loss.sampling_blocks=8 .*inherited'):
    train.Program(c, train.make_mesh(c))


def test_unreadable_sources_and_init_are_config_errors(tmp_path):
  """A source that matches nothing (a placeholder left in an experiment) and a missing release
  directory are the config's errors, named by their keys, before a step is built."""
  c = small_config(**{'data.heads.image.source': str(tmp_path / 'nothing-*.array_record')})
  with pytest.raises(
    config_lib.ConfigError,
    match=r"data.heads.image.source='.*nothing-\*.array_record': no files match",
  ):
    train_inputs.make_iterator(c, {'{builtin:video}': str(tmp_path / 'x')})
  # An evaluation source is checked by opening it, without a pipeline (no reader threads).
  c = small_config(**{'eval_sources.image': str(tmp_path / 'held-out-*.array_record')})
  threads = threading.active_count()
  with pytest.raises(
    config_lib.ConfigError, match=r"eval_sources.image='.*held-out-\*.array_record': no files"
  ):
    train_inputs.check_sources(c, {'{builtin:video}': str(tmp_path / 'x')}, evaluation=True)
  assert threading.active_count() == threads
  c = small_config(**{'init.pytorch': str(tmp_path / 'missing')})
  mesh = train.make_mesh(c)
  with jax.set_mesh(mesh):
    program = train.Program(c, mesh)
    with pytest.raises(config_lib.ConfigError, match=r'init.pytorch=.*missing: .*no such'):
      warm_start.initialise_from(jax.eval_shape(program.init), c, program)


# ------------------------------------------------------------------------------------------------
# Whole runs (subprocesses): resume, multi-process, SIGTERM
# ------------------------------------------------------------------------------------------------


def command(workdir, data_root, *extra, arg='smoke'):
  return [
    sys.executable,
    '-m',
    'ove_jax.train',
    f'--config={DEMO}:{arg},data_root={data_root}',
    f'--workdir={workdir}',
    *extra,
  ]


def env():
  e = dict(os.environ)
  e.pop('XLA_FLAGS', None)  # the experiment asks for its 8 CPU devices itself
  e['PYTHONPATH'] = ROOT
  return e


def losses_by_step(workdir):
  return {m['step']: m['loss'] for m in metrics_lib.read_metrics(workdir)}


def committed_steps(workdir):
  """The steps orbax has finished writing, in a local workdir or a bucket's (gs://...)."""
  root = paths.join(workdir, checkpoint.CHECKPOINT_DIR)
  if not paths.isdir(root):
    return []
  return sorted(
    int(d)
    for d in paths.listdir(root)
    if d.isdigit() and paths.exists(paths.join(root, d, 'commit_success.txt'))
  )


@pytest.fixture(scope='module')
def straight(data_root, tmp_path_factory):
  """The uninterrupted smoke run the interrupted ones are compared with."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  # Checkpoints at 5, 10, 15, 20: keep the last 2 and every 10th.
  # Evaluation every 10 steps (its own iterator: the training losses are untouched), and a
  # profiler trace of steps 3-4.
  subprocess.run(
    command(
      workdir,
      data_root,
      '--config.profile_start=3',
      '--config.profile_steps=2',
      '--config.keep_checkpoints=2',
      '--config.keep_every=10',
      '--config.eval_every=10',
      '--config.eval_steps=1',
      '--config.eval_sources.image='
      + f'folder:{data_root}/images?labels={data_root}/images/labels.npy',
    ),
    env=env(),
    check=True,
    capture_output=True,
    timeout=600,
  )
  return workdir


def test_keeps_the_last_n_and_every_mth_checkpoint_evaluates_and_profiles(straight):
  assert committed_steps(straight) == [10, 15, 20]
  traces = [f for _, _, files in os.walk(os.path.join(straight, 'profile')) for f in files]
  assert any(f.endswith('.xplane.pb') for f in traces), traces
  lines = {m['step']: m for m in metrics_lib.read_metrics(straight)}
  for step in (10, 20):
    assert np.isfinite(lines[step]['eval/video/loss']) and 'eval/image/accuracy' in lines[step]
  assert 'eval/video/loss' not in lines[8]
  with pytest.raises(config_lib.ConfigError, match=r"eval_sources names head\(s\) \['audio'\]"):
    config_lib.load(DEMO + ':smoke', ['eval_sources.audio=/data/x'])


def run_to_end(cmd):
  """Runs the trainer command `cmd` to its end and checks it succeeded; the CompletedProcess."""
  result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def resumes_as(straight, restart, workdir, step, **tolerance):
  """Runs `restart` (the command that restarts `workdir`, saved at `step`): it resumes there, and
  its later losses are the uninterrupted run's within `tolerance`."""
  result = run_to_end(restart)
  assert f'resumed from {workdir} step {step}' in result.stderr
  want, got = losses_by_step(straight), losses_by_step(workdir)
  later = [s for s in want if s > step]
  assert later and max(later) == 20
  for s in later:
    assert got[s] == pytest.approx(want[s], **tolerance), s


def kill_then_resume(workdir, data_root, after, *extra, arg='smoke'):
  """Starts a run in `workdir`, kills it (SIGKILL, the whole process group: the trainer and its
  input workers die at once, as in a preempted job) once a checkpoint of step `after` or later
  is committed, and runs it again; returns (the step it resumed from, the second run)."""
  proc = subprocess.Popen(
    command(workdir, data_root, *extra, arg=arg),
    env=env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  deadline = time.time() + 300
  while not committed_steps(workdir) or committed_steps(workdir)[-1] < after:
    assert proc.poll() is None, 'the run ended before it could be killed'
    assert time.time() < deadline
    time.sleep(0.2)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  resumed_from = committed_steps(workdir)[-1]
  result = run_to_end(command(workdir, data_root, *extra, arg=arg))
  assert f'resumed from {workdir} step {resumed_from}' in result.stderr
  return resumed_from, result


def assert_same_losses_after(resumed_from, want_workdir, got_workdir, last):
  """Every logged loss after `resumed_from` up to `last` is the same (1e-6) in both runs."""
  want, got = losses_by_step(want_workdir), losses_by_step(got_workdir)
  later = [s for s in want if s > resumed_from]
  assert later and max(later) == last
  for s in later:
    assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6), s


def test_sigkill_then_restart_resumes_exactly(tmp_path, data_root, straight):
  killed = str(tmp_path / 'killed')
  resumed_from, _ = kill_then_resume(killed, data_root, 10)
  assert resumed_from < 20
  assert_same_losses_after(resumed_from, straight, killed, 20)
  # Falling loss on the demo data, and every line has step and loss.
  lines = metrics_lib.read_metrics(straight)
  assert all('loss' in m and 'step' in m for m in lines)
  assert lines[-1]['loss'] < lines[0]['loss']


def launch(workdir, data_root, *extra, timeout=500):
  """The smoke run as 2 processes x 4 devices (tools/launch_local.py)."""
  return [
    sys.executable,
    os.path.join(ROOT, 'tools', 'launch_local.py'),
    '--processes=2',
    '--devices_per_process=4',
    f'--timeout={timeout}',
    '--',
    *command(workdir, data_root, *extra, arg='smoke,workers=0'),
  ]


def trainer_process(launcher_pid, index):
  """The pid of trainer process `index` started by the launcher `launcher_pid`."""
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/stat') as f:
        parent = int(f.read().rsplit(')', 1)[1].split()[1])
      with open(f'/proc/{pid}/environ', 'rb') as f:
        environ = f.read().split(b'\0')
    except (OSError, IndexError):
      continue
    if parent == launcher_pid and f'OVE_PROCESS_ID={index}'.encode() in environ:
      return int(pid)
  raise AssertionError(f'no trainer process {index} under {launcher_pid}')


def wait_for_metrics(workdir, proc):
  deadline = time.time() + 400
  while not os.path.exists(os.path.join(workdir, 'metrics.jsonl')) or not metrics_lib.read_metrics(
    workdir
  ):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.2)


def test_two_processes_sigterm_to_one_saves_the_same_step_and_resumes_exactly(
  tmp_path, data_root, straight
):
  workdir = str(tmp_path / 'run')
  proc = subprocess.Popen(
    launch(workdir, data_root, '--config.checkpoint_every=100'),
    env=env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  wait_for_metrics(workdir, proc)
  os.kill(trainer_process(proc.pid, 1), signal.SIGTERM)  # the notice reaches one host only
  out, err = proc.communicate(timeout=400)
  assert proc.returncode == preemption.PREEMPTED_EXIT_CODE, out[-2000:] + err[-3000:]
  saved = dict(re.findall(r'\[p(\d)\] .*preempted \(SIGTERM\): saved step (\d+)', err))
  assert set(saved) == {'0', '1'} and saved['0'] == saved['1'], err[-3000:]
  step = int(saved['0'])
  assert committed_steps(workdir) == [step] and 2 <= step < 20
  # 2 processes x 4 devices == 1 process x 8 from the start (initialisation, each process's
  # share of the input, the sharded step), up to summation order ...
  want, got = losses_by_step(straight), losses_by_step(workdir)
  common = sorted(set(got) & set(want))
  assert common and max(got) <= step, (sorted(got), sorted(want))
  for s in common:
    assert got[s] == pytest.approx(want[s], rel=1e-5), s
  # ... and after the resume (the uninterrupted run is the one-process one).
  resumes_as(straight, launch(workdir, data_root), workdir, step, rel=1e-5)
  # The input wait of both processes is gathered at log steps: the slowest one is named.
  lines = metrics_lib.read_metrics(workdir)
  assert lines[-1]['input_wait/slowest_process'] in (0, 1)
  assert 0 <= lines[-1]['input_wait/mean'] <= lines[-1]['input_wait/max'] <= 1
  # Each process saved its own input position in the same checkpoint step.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', '20', 'data'))) == [
    'commit_success.txt',
    'process_0-of-2.json',
    'process_1-of-2.json',
  ]
  # Resuming it on one process goes on from its state, with the input re-derived and a warning.
  again = run_to_end(command(workdir, data_root, '--config.total_steps=22', arg='smoke,workers=0'))
  assert 'resuming step 20, saved by 2 process(es), on 1' in again.stderr
  assert 'the losses will not repeat' in again.stderr
  assert committed_steps(workdir)[-1] == 22


def test_two_processes_resume_a_one_process_checkpoint_with_its_optimizer_state(
  tmp_path, data_root, straight
):
  workdir = str(tmp_path / 'run')
  folder = os.path.join(checkpoint.CHECKPOINT_DIR, '10')
  shutil.copytree(os.path.join(straight, folder), os.path.join(workdir, folder))
  result = run_to_end(launch(workdir, data_root, '--config.total_steps=11'))
  assert 'resuming step 10, saved by 1 process(es), on 2' in result.stderr
  assert committed_steps(workdir) == [10, 11]
  assert checkpoint.read_meta(workdir, 11)['process_count'] == 2

  def opt_state(path, step):
    tree, _, _ = checkpoint.restore_params(path, step, subtree=('opt_state',))
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}

  before, after = opt_state(straight, 10), opt_state(workdir, 11)
  counts = [k for k in after if k.endswith("['count']")]
  assert counts and all(int(before[k]) == 10 and int(after[k]) == 11 for k in counts)
  # Adam's second moments went on from the saved ones (nu' = b2 nu + (1 - b2) g^2 >= b2 nu): a
  # fresh optimizer state would hold (1 - b2) g^2 alone.
  b2 = config_lib.load(DEMO + ':smoke').optim.b2
  nus = [k for k in after if "['nu']" in k]
  assert nus and all(np.all(after[k] >= b2 * before[k] * (1 - 1e-6)) for k in nus)
  assert sum(float(before[k].sum()) for k in nus) > 0


def test_a_stalled_peer_trips_the_watchdog(tmp_path, data_root):
  """Process 1 stopped (SIGSTOP) mid-run: process 0 waits in the step's collectives, and its
  watchdog dumps every thread's stack and exits with HANG_EXIT_CODE."""
  workdir = str(tmp_path / 'run')
  # The first-step limit covers the compilation of two processes on a busy machine; the steady
  # limit only a step (no checkpoint is saved before the stall: a save's time is not waited for).
  proc = subprocess.Popen(
    launch(
      workdir,
      data_root,
      '--config.watchdog_first_step_seconds=300',
      '--config.watchdog_seconds=10',
      '--config.checkpoint_every=100',
      '--config.distributed.heartbeat_timeout=600',
    ),
    env=env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  wait_for_metrics(workdir, proc)
  stopped = trainer_process(proc.pid, 1)
  os.kill(stopped, signal.SIGSTOP)
  # Still running when the peer stopped: a watchdog exit below is the stall's, not a slow step's
  # before it (whose exit would have ended the launcher already).
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  try:
    out, err = proc.communicate(timeout=400)
  finally:
    try:
      os.kill(stopped, signal.SIGKILL)
    except ProcessLookupError:
      pass
  assert proc.returncode == preemption.HANG_EXIT_CODE, out[-2000:] + err[-3000:]
  # (after the progress bar's last '\r', which text mode turns into a line break: no prefix)
  assert re.search(r'Watchdog: no step finished in \d+\.\d s \(timeout 10 s\)', err), err[-3000:]
  assert '[p0] Thread 0x' in err and '(most recent call first)' in err
  assert f'[p0] Watchdog: exiting with code {preemption.HANG_EXIT_CODE}' in err


def _signal_while_making_the_builtin_data(workdir, signum):
  """The trainer sent `signum` while it makes its built-in data: (exit code, stderr)."""
  proc = subprocess.Popen(
    [sys.executable, '-m', 'ove_jax.train', f'--config={DEMO}:smoke', f'--workdir={workdir}'],
    env=env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 300
  while not (workdir / 'builtin_data').exists():  # made after the handlers are in place
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


def test_sigterm_while_making_the_builtin_data_exits_as_preempted(tmp_path):
  workdir = tmp_path / 'run'
  code, err = _signal_while_making_the_builtin_data(workdir, signal.SIGTERM)
  assert code == preemption.PREEMPTED_EXIT_CODE, err[-3000:]
  assert 'SIGTERM while starting, nothing to save' in err
  assert not (workdir / 'checkpoints').exists()


def test_ctrl_c_asks_for_a_save_and_a_second_stops_at_once(capsys):
  """One process: a Ctrl-C before any step finished (restoring, compiling) stops at once; after
  one, the first asks for the save after the step in flight (and says so), the next stops at
  once, one during the stop's save waits for it; the handlers before are back afterwards, and
  nothing is left over for the next run in this process."""
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with preemption.ctrl_c_raises_interrupted():
    with pytest.raises(preemption.Interrupted), preemption.Preemption():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
  with preemption.ctrl_c_raises_interrupted():  # (a stop-now Ctrl-C ends the trainer)
    with preemption.Preemption() as stop:
      assert not stop.reached(1)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
      assert stop.reached(2) and stop.interrupted and stop.saving
      assert 'Ctrl-C: the step in flight finishes and is saved' in capsys.readouterr().err
      os.kill(os.getpid(), signal.SIGINT)  # during the save: it goes on
      time.sleep(0.01)
      assert 'saving before the stop' in capsys.readouterr().err
    with preemption.Preemption() as stop:
      stop.reached(1)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
      with pytest.raises(preemption.Interrupted):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
  # Without main's handler (a notebook calling train.train): a stop-now Ctrl-C ends that run
  # only; later runs in this process start clean.
  with pytest.raises(preemption.Interrupted), preemption.Preemption():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
  with preemption.Preemption() as stop:
    os.kill(os.getpid(), signal.SIGTERM)  # a preemption is not an interruption
    assert stop.reached(1) and not stop.interrupted
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_ctrl_c_python_drops_while_starting_still_stops(capsys):
  """While starting, Ctrl-C raises Interrupted at once; where it lands in a __del__ or a
  collector callback (JAX runs one at every collection) Python drops the exception: it is
  remembered, not printed, and the run stops where the steps would begin."""
  before = sys.unraisablehook

  class Collected:
    def __del__(self):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)  # the handler runs here, inside __del__

  with preemption.ctrl_c_raises_interrupted():
    Collected()
    assert 'Interrupted' not in capsys.readouterr().err
    with pytest.raises(preemption.Interrupted):
      preemption.Preemption().__enter__()
    with pytest.raises(preemption.Interrupted):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
  assert sys.unraisablehook is before


def _stopped_after_a_step(workdir, data_root, signum, code):
  """The trainer sent `signum` once a step is logged (SIGINT to its whole process group, as a
  terminal's Ctrl-C: its Grain workers too; SIGTERM to the trainer alone, as a scheduler's
  notice) exits with `code` having saved one step: (that step, stderr)."""
  proc = subprocess.Popen(
    command(workdir, data_root, '--config.checkpoint_every=100'),
    env=env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  deadline = time.time() + 300
  while not os.path.exists(os.path.join(workdir, 'metrics.jsonl')) or not metrics_lib.read_metrics(
    workdir
  ):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.2)
  if signum == signal.SIGINT:
    os.killpg(proc.pid, signum)
  else:
    proc.send_signal(signum)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == code, err[-3000:]
  saved = committed_steps(workdir)
  assert len(saved) == 1 and 0 < saved[0] < 20, saved
  return saved[0], err


def test_ctrl_c_saves_stops_with_130_and_resumes(tmp_path, data_root):
  """A terminal's Ctrl-C: the step in flight is saved, exit 130, no traceback from the trainer
  or its data workers; the same command resumes there."""
  workdir = str(tmp_path / 'run')
  step, err = _stopped_after_a_step(
    workdir, data_root, signal.SIGINT, preemption.INTERRUPTED_EXIT_CODE
  )
  assert f'interrupted (Ctrl-C): saved step {step}' in err
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
  result = run_to_end(command(workdir, data_root, f'--config.total_steps={step + 1}'))
  assert f'resumed from {workdir} step {step}' in result.stderr


def test_ctrl_c_while_starting_stops_without_a_traceback(tmp_path):
  """Before the first step (here: the built-in data being made) there is nothing to save: one
  line saying so, exit 130."""
  workdir = tmp_path / 'run'
  code, err = _signal_while_making_the_builtin_data(workdir, signal.SIGINT)
  assert code == preemption.INTERRUPTED_EXIT_CODE, err[-3000:]
  assert err.strip().splitlines()[-1] == (
    f'interrupted (Ctrl-C): stopped without saving; run the same command to resume from the '
    f'last checkpoint in {workdir}'
  )
  assert 'Traceback' not in err
  assert not (workdir / 'checkpoints').exists()


def test_sigterm_saves_then_resumes_on_another_mesh(tmp_path, data_root, straight):
  workdir = str(tmp_path / 'run')
  step, err = _stopped_after_a_step(
    workdir, data_root, signal.SIGTERM, preemption.PREEMPTED_EXIT_CODE
  )
  saved = [step]
  assert f'preempted (SIGTERM): saved step {step}' in err
  with open(os.path.join(workdir, 'checkpoints', str(saved[0]), 'meta', 'metadata')) as f:
    assert json.load(f)['mesh'] == {'data': 4, 'fsdp': 2, 'tensor': 1}
  # Resume on data 2 x fsdp 2 x tensor 2: the state is resharded on restore, and the sampling
  # does not depend on the mesh, so the run goes on as the uninterrupted one (up to summation
  # order).
  result = subprocess.run(
    command(workdir, data_root, '--config.mesh.data=2', '--config.mesh.tensor=2'),
    env=env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'step {saved[0]}' in result.stderr and 'resumed from' in result.stderr
  want, got = losses_by_step(straight), losses_by_step(workdir)
  later = [s for s in want if s > saved[0]]
  assert later
  for s in later:
    assert got[s] == pytest.approx(want[s], rel=1e-4), s


def test_divergence_stops_with_the_step(tmp_path, data_root):
  result = subprocess.run(
    command(
      str(tmp_path / 'nan'),
      data_root,
      '--config.optim.lr=1e30',
      '--config.optim.warmup=0',
      '--config.optim.clip_norm=0.0',
    ),
    env=env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 1
  # The update at step 1 already overflows the weights: caught there, before anything is saved.
  assert re.search(
    r'training stopped: (loss|param_norm) is (nan|inf)\b.* at step 1;', result.stderr
  ), result.stderr[-2000:]
  assert not committed_steps(str(tmp_path / 'nan'))
  assert 'Traceback' not in result.stderr


def test_bf16_and_remat_steps(tmp_path):
  batches = [host_batch(0)]
  devices = jax.devices()
  ref, m32 = run_step(small_config(), devices, batches)
  remat, mr = run_step(small_config(**{'model.remat': 'full'}), devices, batches)
  assert max_diff(ref, remat) <= 1e-5  # rematerialisation recomputes, it does not change maths
  bf16, m16 = run_step(small_config(**{'model.dtype': 'bfloat16'}), devices, batches)
  assert all(np.isfinite(v) for v in m16.values())
  # bf16 activations, fp32 master weights and fp32 loss: the loss agrees to bf16 precision.
  np.testing.assert_allclose(m16['loss'], m32['loss'], rtol=2e-2)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16))


def test_later_stage_starts_from_an_earlier_one(two_step_run):
  first, _ = two_step_run  # the trainer's 2-step smoke run (tests/conftest.py)
  source, meta, step = checkpoint.restore_params(first, subtree=('params',))
  assert step == 2 and meta['step'] == 2
  c = small_config(
    **{
      'init.checkpoint': first,
      'init.heads': 'keep',
      'mesh.data': 2,
      'mesh.fsdp': 2,
      'mesh.tensor': 2,
    }
  )
  mesh = train.make_mesh(c)  # another mesh shape than the one that wrote it
  with jax.set_mesh(mesh):
    program = train.Program(c, mesh)
    state = warm_start.initialise_from(program.init(), c, program)
  got = jax.tree.map(np.asarray, state['params'])
  np.testing.assert_array_equal(got['heads']['video'], source['heads']['video'])
  np.testing.assert_array_equal(
    got['encoder']['blocks'][1]['mlp']['fc1']['kernel'],
    source['encoder']['blocks']['1']['mlp']['fc1']['kernel'],
  )
  c.init.heads = 'fresh'
  with jax.set_mesh(mesh):
    fresh = warm_start.initialise_from(program.init(), c, program)
  assert not np.array_equal(np.asarray(fresh['params']['heads']['video']), source['heads']['video'])
  # A scanned run starts from the unrolled checkpoint (its blocks stacked, exactly); resuming the
  # unrolled workdir with scanned layers is refused with the two ways on, before orbax runs.
  c = small_config(**{'init.checkpoint': first, 'model.scan_layers': True})
  mesh = train.make_mesh(c)
  with jax.set_mesh(mesh):
    program = train.Program(c, mesh)
    state = warm_start.initialise_from(program.init(), c, program)
    with pytest.raises(config_lib.ConfigError, match='blocks unrolled, this run stacked') as e:
      resume.check_layout(first, 2, program)
  assert '--config.model.scan_layers=False' in str(e.value)
  assert f'--config.init.checkpoint={first}' in str(e.value)
  stacked = np.asarray(state['params']['encoder']['blocks']['mlp']['fc1']['kernel'])
  depth = len(source['encoder']['blocks'])
  assert stacked.shape[0] == depth >= 2
  for n in range(depth):
    np.testing.assert_array_equal(
      stacked[n], source['encoder']['blocks'][str(n)]['mlp']['fc1']['kernel']
    )


def test_initialise_from_a_released_pytorch_checkpoint(tmp_path):
  from ove_jax.convert import hf
  from ove_jax.models import create_encoder

  c = small_config()
  released = create_encoder(train.encoder_config(c), seed=123)
  hf.save_pytorch(released, str(tmp_path / 'release'))
  c.init.pytorch = str(tmp_path / 'release')
  mesh = train.make_mesh(c)
  with jax.set_mesh(mesh):
    program = train.Program(c, mesh)
    fresh = program.init()
    state = warm_start.initialise_from(fresh, c, program)
    kernel = state['params']['encoder']['blocks'][0]['self_attn']['q_proj']['kernel']
    assert (
      kernel.sharding
      == program.param_shardings['encoder']['blocks'][0]['self_attn']['q_proj']['kernel']
    )
  want = hf.model_params(released)
  got = jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, state['params']['encoder']))
  assert len(got) == len(want)
  for path, value in got:
    np.testing.assert_array_equal(value, want[tuple(k.key for k in path)])
  c.model.preset = 'small'
  with pytest.raises(config_lib.ConfigError, match='its width is 128'):
    mesh = train.make_mesh(c)
    with jax.set_mesh(mesh):
      program = train.Program(c, mesh)
      warm_start.initialise_from(jax.eval_shape(program.init), c, program)


def test_resume_names_what_changed(caplog):
  saved = small_config().to_dict()
  resume.check_resume(saved, small_config(**{'mesh.data': 2, 'mesh.tensor': 2}))  # layout: free
  assert not caplog.records
  resume.check_resume(saved, small_config(**{'optim.lr': 0.5}))
  assert 'optim.lr: 0.002 -> 0.5' in caplog.text
  classes = saved['heads']['video']['num_classes']
  with pytest.raises(
    config_lib.ConfigError, match=rf'heads.video.num_classes \({classes} then, 60 now\)'
  ):
    resume.check_resume(saved, small_config(**{'heads.video.num_classes': 60}))


def test_command_line_spellings(capsys, monkeypatch, tmp_path):
  args, overrides = cli.parse_train_args(
    [
      '--config',
      DEMO + ':smoke',
      '--workdir=/tmp/w',
      '--config.optim.lr',
      '0.5',
      '--config.seed=3',
      '--mesh',
      'data=2,tensor=2',
    ]
  )
  assert (args.config, args.workdir) == (DEMO + ':smoke', '/tmp/w')
  assert overrides == ['optim.lr=0.5', 'seed=3', 'mesh.data=2', 'mesh.fsdp=1', 'mesh.tensor=2']
  assert cli.parse_train_args([f'--config={DEMO}', '--show-config'])[0].show_config
  # A size of -1 first, in the spelling with a space (argparse would take it for a flag).
  overrides = cli.parse_train_args([f'--config={DEMO}', '--workdir=w', '--mesh', '-1,2,1'])[1]
  assert overrides == ['mesh.data=-1', 'mesh.fsdp=2', 'mesh.tensor=1']
  for argv, message in (
    (['--config', DEMO], '--workdir is required'),
    (['--config', DEMO, '--workdir', 'w', '--mesh', '3x'], "mesh '3x'"),
    (['--workdir', 'w'], '--config'),
    (['--config', DEMO, '--workdir', 'w', '--bogus'], '--bogus'),
  ):
    with pytest.raises(SystemExit):
      cli.parse_train_args(argv)
    assert message in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.parse_train_args(['--help'])
  text = capsys.readouterr().out
  assert all(flag in text for flag in ('--config', '--workdir', '--mesh', '--show-config'))
  assert 'list them with their values' in text and text.startswith('usage: ove-train')
  assert train.main(['--config', DEMO + ':smoke', '--show-config', '--config.optim.lr=0.25']) == 0
  assert 'optim.lr = 0.25' in capsys.readouterr().out.splitlines()
  taken = tmp_path / 'a_file'
  taken.write_text('')
  assert train.main(['--config', DEMO + ':smoke', '--workdir', str(taken)]) == 2
  assert f'--workdir {taken}: a file, not a folder' in capsys.readouterr().err
  # A launch set up in part is the config's error (exit status 2), one line, before JAX starts.
  monkeypatch.setenv('OVE_NUM_PROCESSES', '2')
  assert train.main(['--config', DEMO + ':smoke', '--workdir', str(tmp_path / 'w')]) == 2
  err = capsys.readouterr().err
  assert 'config error: A multi-process run was asked for (OVE_NUM_PROCESSES)' in err
  assert 'Traceback' not in err


def test_config_sections_refuse_typos():
  c = config_lib.load(DEMO + ':smoke')
  with c.unlocked():
    c.optim.weight_decy = 0.1
  with pytest.raises(config_lib.ConfigError, match=r"optim: unknown key\(s\) \['weight_decy'\]"):
    config_lib.validate(c)
  with pytest.raises(config_lib.ConfigError, match='keep_every=7 must be a multiple'):
    config_lib.load(DEMO + ':smoke', ['keep_every=7'])


@pytest.mark.parametrize(
  'override, message',
  [
    ("model.scan_layers='yes'", r"model.scan_layers='yes'; allowed values: True, False, None"),
    ('loss.positive_headroom=-1.0', r'loss.positive_headroom \(inherited by heads.\w+\): '),
    ('heads.video.positive_headroom=-1.0', r'heads.video.positive_headroom: positive_headroom=-1'),
  ],
)
def test_config_errors_name_the_key_that_was_set(override, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load(DEMO + ':smoke', [override])


def test_encoder_sizes_must_be_positive():
  from ove_jax.models import EncoderConfig

  with pytest.raises(ValueError, match='depth=0; must be an integer >= 1'):
    EncoderConfig.preset('tiny', depth=0)


def test_heads_start_from_the_release_centre_shards(tmp_path):
  # The release saves each rank's rows of a head's centres as one .npy (its row split: the first
  # num_classes % ranks ranks hold one row more); init.release_centres reads them into the head.
  from ove_jax.convert import release_heads

  c = small_config()
  classes, width, ranks = c.heads.video.num_classes, train.encoder_config(c).width, 3
  centres = np.random.default_rng(0).standard_normal((classes, width)).astype(np.float32)
  start = 0
  for rank, rows in enumerate(release_heads.rank_rows(classes, ranks)):
    np.save(tmp_path / f'si_{rank:03d}.npy', centres[start : start + rows])
    start += rows
  c.init.release_centres = f'video={tmp_path}/si_%03d.npy'
  mesh = train.make_mesh(c)
  with jax.set_mesh(mesh):
    program = train.Program(c, mesh)
    fresh = program.init()
    state = warm_start.initialise_from(fresh, c, program)
    head = state['params']['heads']['video']
    assert head.sharding == program.param_shardings['heads']['video']
  got = np.asarray(head)
  np.testing.assert_array_equal(got[:classes], centres)
  assert got.shape[0] == program.heads['video'].padded_classes
  others = [n for n in c.heads if n != 'video']
  for name in others:  # heads not named keep their fresh init
    np.testing.assert_array_equal(
      np.asarray(state['params']['heads'][name]), np.asarray(fresh['params']['heads'][name])
    )
  (tmp_path / 'si_001.npy').unlink()
  c.init.release_centres = f'video={tmp_path}/si_%03d.npy'
  with pytest.raises(config_lib.ConfigError, match='init.release_centres'):
    with jax.set_mesh(mesh):
      warm_start.initialise_from(fresh, c, program)


def test_paths_are_checked_before_anything_is_made(tmp_path, monkeypatch):
  """A one-slash URL in --workdir or in any config path, a URL as builtin.root (data_root=) and
  a data.local_cache_dir that is a file are config errors naming the key and the fix, raised
  before a folder or built-in data is made (no local folder named 'gs:')."""
  monkeypatch.chdir(tmp_path)
  afile = tmp_path / 'afile'
  afile.write_text('')
  run = str(tmp_path / 'run')
  cases = [
    ('gs:/bkt/typo', {}, r'--workdir=gs:/bkt/typo: gs:/ is a URL with one slash .*write gs://'),
    (run, {'init.checkpoint': 's3:/b/x'}, r'init.checkpoint=s3:/b/x: s3:/ is a URL .*write s3://'),
    (run, {'builtin.root': 'gs://bkt/bd'}, r'builtin.root=gs://bkt/bd .*give a local folder'),
    (run, {'data.local_cache_dir': str(afile)}, r'data.local_cache_dir=.*afile: a file, not a'),
  ]
  for workdir, changes, message in cases:
    with pytest.raises(config_lib.ConfigError, match=message):
      train.train(
        config_lib.load(DEMO + ':smoke', [f'{k}={v}' for k, v in changes.items()]), workdir
      )
  assert sorted(os.listdir(tmp_path)) == ['afile']


def test_one_trainer_per_workdir_past_total_steps_and_a_damaged_step(tmp_path, data_root):
  """A second trainer on a workdir is refused (exit 2) naming the holder's pid and host; a killed
  holder leaves no lock behind; a checkpoint past total_steps says so in one line (exit 0); a
  damaged newest step is one config error naming it and the way on, not orbax's traceback."""
  import socket

  workdir = str(tmp_path / 'run')
  run_to_end(command(workdir, data_root, '--config.total_steps=2', '--config.checkpoint_every=1'))
  assert committed_steps(workdir) == [1, 2]
  holder = subprocess.Popen(
    [
      sys.executable,
      '-c',
      'import sys, time\nfrom data_pipeline import locks\n'
      f'with locks.hold({workdir!r}, "train", "ove-train", kind="ove-train"):\n'
      '  print("held", flush=True); time.sleep(600)',
    ],
    env=env(),
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline() == 'held\n'
    second = subprocess.run(command(workdir, data_root), env=env(), capture_output=True, text=True)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f'pid {holder.pid} on host {socket.gethostname()}' in second.stderr
    assert 'in use by another ove-train run' in second.stderr and 'Traceback' not in second.stderr
  finally:
    holder.kill()
    holder.wait()
  past = run_to_end(command(workdir, data_root, '--config.total_steps=1'))  # the lock is free
  assert 'checkpoint step 2 is past total_steps 1: nothing to train' in past.stdout
  assert 'finished step' not in past.stdout + past.stderr
  assert committed_steps(workdir) == [1, 2]
  data = os.path.join(workdir, checkpoint.CHECKPOINT_DIR, '2', 'state', 'ocdbt.process_0', 'd')
  for name in os.listdir(data):
    os.remove(os.path.join(data, name))
  damaged = subprocess.run(
    command(workdir, data_root, '--config.total_steps=3'), env=env(), capture_output=True, text=True
  )
  assert damaged.returncode == 2 and 'Traceback' not in damaged.stderr, damaged.stderr[-3000:]
  last = damaged.stderr.strip().splitlines()[-1]
  assert re.match(
    r'config error: .*checkpoints step 2: state/ cannot be read \(.*it has steps', last
  )
  assert f'delete {workdir}/checkpoints/2 to resume from step 1, or restore it' in last


def test_a_workdir_that_cannot_be_written_is_a_config_error(tmp_path):
  # A read-only file system or a file in the way: the run lock's folder cannot be made, which
  # is named with the reason (exit 2), not an OSError traceback (exit 1).
  (tmp_path / 'afile').write_text('')
  workdir = str(tmp_path / 'afile' / 'run')
  with pytest.raises(config_lib.ConfigError, match=r'cannot be made or written \(Not a direct'):
    with resume.workdir_lock(workdir, main_process=True):
      pass
