"""tools/restart_time.py: reruns into one --root, the trainer's errors, SIGTERM / SIGINT.

A real measurement trains the demo three times (about a minute and a half on 2 cores); these
tests put a small script in the trainer's place that keeps its contract (a checkpoint folder per
saved step, the first-step log line, and at the last step nothing left to train), except the
config-error test, which runs the real trainer up to its config check (seconds).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from ove_jax_tools import restart_time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_TRAINER = f"""
import os, sys
workdir, total = sys.argv[1], sys.argv[2]
checkpoints = os.path.join(workdir, 'checkpoints')
if os.path.isdir(os.path.join(checkpoints, total)):  # resumed at the end: no step to train
  print(f'resumed from {{workdir}} step {{total}}', file=sys.stderr)
  sys.exit(0)
for step in ('1', total):
  os.makedirs(os.path.join(checkpoints, step), exist_ok=True)
print('{restart_time.FIRST_STEP} (1) done', file=sys.stderr)
"""


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch):
  script = tmp_path / 'fake_train.py'
  script.write_text(FAKE_TRAINER)

  def trainer(config, workdir, total, *overrides):
    return [sys.executable, str(script), workdir, str(total)]

  monkeypatch.setattr(restart_time, 'trainer', trainer)


def run_folders(root):
  return sorted(n for n in os.listdir(root) if n != restart_time.MARKER)


def test_a_rerun_into_the_same_root_starts_afresh(tmp_path, fake_trainer, capsys):
  root = tmp_path / 'root'
  assert restart_time.main(['--steps=1', '--repeats=2', f'--root={root}']) == 0
  assert run_folders(root) == [
    'first',
    'restart_0_with',
    'restart_0_without',
    'restart_1_with',
    'restart_1_without',
  ]
  (root / 'data').mkdir()  # the built-in data of the default config is kept
  (root / 'data' / 'kept').write_text('x')
  capsys.readouterr()
  # The old first run is at its last step: trained again in place, it would log no first step.
  assert restart_time.main(['--steps=1', f'--root={root}']) == 0
  out = capsys.readouterr().out
  assert json.loads(out.splitlines()[-1])['steps'] == 1
  assert run_folders(root) == ['data', 'first', 'restart_0_with', 'restart_0_without']
  assert (root / 'data' / 'kept').read_text() == 'x'


@pytest.mark.parametrize('name', ['first', 'restart_0_with'])
def test_run_folders_it_did_not_make_are_refused(name, tmp_path, fake_trainer, capsys):
  root = tmp_path / 'root'
  (root / name).mkdir(parents=True)
  (root / name / 'mine').write_text('x')
  assert restart_time.main(['--steps=1', f'--root={root}']) == 2
  out, err = capsys.readouterr()
  assert not out and err.count('\n') == 1, err
  assert err.startswith(f'error: --root={root}: run folders already there that ove-restart-time')
  assert f': {name}; give a new or empty folder as --root, or remove them' in err
  assert (root / name / 'mine').read_text() == 'x' and run_folders(root) == [name]


def test_a_file_as_root_is_refused(tmp_path, fake_trainer, capsys):
  (tmp_path / 'afile').write_text('x')
  assert restart_time.main([f'--root={tmp_path / "afile"}']) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: --root={tmp_path / "afile"}: a file, not a folder; give a folder')
  assert err.count('\n') == 1 and not os.path.isdir(tmp_path / 'afile')


def test_the_trainers_config_error_is_its_line_and_status_2(tmp_path, capsys):
  assert restart_time.main(['--config=nosuch', f'--root={tmp_path}']) == 2
  err = capsys.readouterr().err
  assert err.startswith("config error: --config=nosuch: no experiment file 'nosuch'"), err
  assert err.count('\n') == 1 and 'Traceback' not in err


def test_another_trainer_failure_is_one_error_line_and_status_1(tmp_path, monkeypatch, capsys):
  def trainer(config, workdir, total, *overrides):
    return [sys.executable, '-c', 'import sys; print("ValueError: broken", file=sys.stderr); 1/0']

  monkeypatch.setattr(restart_time, 'trainer', trainer)
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  assert restart_time.main(['--steps=1']) == 1
  lines = capsys.readouterr().err.splitlines()
  assert '  ValueError: broken' in lines and lines[-1].startswith('error: '), lines
  assert lines[-1].endswith('failed (exit 1) (its last lines are above)'), lines
  assert os.listdir(tmp_path) == []  # the temporary root is removed


def alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rpartition(')')[2].split()[0] not in 'ZX'
  except FileNotFoundError:
    return False


# A trainer with a child process of its own (as data workers are): both sleep until stopped.
SLEEPING_TRAINER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
with open(sys.argv[1] + '.tmp', 'w') as f:
  f.write(f'{os.getpid()} {child.pid}')
os.replace(sys.argv[1] + '.tmp', sys.argv[1])
time.sleep(60)
"""


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_trainer_and_removes_the_temporary_root(signum, tmp_path):
  """The trainer and its child get the signal (its whole process group); the tool waits for them,
  removes its temporary root and exits with 128 + the signal number."""
  pids, temp, script = tmp_path / 'pids', tmp_path / 'tmp', tmp_path / 'sleeping_train.py'
  temp.mkdir()
  script.write_text(SLEEPING_TRAINER)
  code = (
    'import sys\n'
    'from ove_jax_tools import restart_time\n'
    f'restart_time.trainer = lambda *a: [sys.executable, {str(script)!r}, {str(pids)!r}]\n'
    "sys.exit(restart_time.main(['--steps=1']))\n"
  )
  env = dict(os.environ, TMPDIR=str(temp), PYTHONPATH=ROOT)
  tool = subprocess.Popen(
    [sys.executable, '-c', code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  try:
    deadline = time.monotonic() + 60
    while not pids.exists():
      assert tool.poll() is None and time.monotonic() < deadline, tool.communicate()
      time.sleep(0.05)
    trainers = [int(p) for p in pids.read_text().split()]
    assert len(os.listdir(temp)) == 1 and all(alive(p) for p in trainers)
    tool.send_signal(signum)
    _, err = tool.communicate(timeout=30)
  finally:
    tool.kill()
  assert tool.returncode == 128 + signum, err
  assert err.strip().splitlines()[-1] == f'ove-restart-time: stopped by {signum.name}', err
  deadline = time.monotonic() + 5  # the trainer's child is stopped by the signal, not waited for
  while any(alive(p) for p in trainers) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not any(alive(p) for p in trainers)
  assert os.listdir(temp) == []
