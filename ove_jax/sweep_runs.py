"""Running a sweep's points here, one after another (`ove-sweep --run`; the points, their
commands and the results table are `ove_jax.sweeps`'s):

  failures = run_points(root, points, configs, commands)   # {name: failure text}

A finished run (its newest committed checkpoint is of step total_steps) is skipped, one whose
checkpoint is beyond total_steps is reported as a failure without starting it, an unfinished one
is resumed by the trainer, and a failed one is reported with the end of its log
(<root>/<name>/train.log) while the sweep goes on. Each trainer runs in a process group of its
own: SIGTERM or SIGINT to the sweep is forwarded to that group as SIGTERM, the trainer saves its
step and exits, and run_points raises `Interrupted` (its exit code: the trainer's preemption code
for SIGTERM, 130 for SIGINT). A rerun resumes the run.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from data_pipeline import paths, workers
from ove_jax import sweeps


class Interrupted(Exception):
  """The sweep got SIGTERM or SIGINT and stopped; a running trainer had saved and exited."""

  def __init__(self, signum: int, failures: Mapping[str, str], exit_code: int):
    super().__init__(f'interrupted ({signal.Signals(signum).name})')
    self.signum, self.failures, self.exit_code = signum, dict(failures), exit_code


class SignalForwarder:
  """While entered (in the main thread): SIGTERM and SIGINT are recorded, and a running trainer
  (`child`, started in a process group of its own) gets SIGTERM in its whole group, on which it
  saves its step and exits (docs/training.md#checkpoints)."""

  def __init__(self):
    self.signum: int | None = None
    self.child: subprocess.Popen | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)

  def _handle(self, signum, frame) -> None:
    self.signum = self.signum or signum
    self.forward()

  def forward(self) -> None:
    """Sends SIGTERM to the running trainer's group once a signal came."""
    if self.signum and self.child is not None and self.child.poll() is None:
      try:
        os.killpg(self.child.pid, signal.SIGTERM)
      except ProcessLookupError:  # it has just exited
        pass

  def exit_code(self) -> int:
    """SIGTERM: the trainer's preemption code (restart me); SIGINT: 130, as a shell's."""
    from ove_jax import preemption

    return preemption.PREEMPTED_EXIT_CODE if self.signum == signal.SIGTERM else 130


def run_points(
  root: str,
  points: Sequence[sweeps.Point],
  configs: Mapping[str, Any],
  commands: Mapping[str, Sequence[str]],
  *,
  compile_cache: str = '',
  say: Callable[[str], None] = print,
) -> dict[str, str]:
  """Runs the unfinished points in turn; returns {name: failure text} of those that failed.
  SIGTERM or SIGINT stops the sweep: the running trainer gets SIGTERM, saves and exits, and then
  Interrupted is raised (with the failures so far)."""
  env = dict(os.environ)
  if compile_cache:
    env.setdefault('JAX_COMPILATION_CACHE_DIR', compile_cache)
  failures: dict[str, str] = {}
  with SignalForwarder() as signals:
    for i, point in enumerate(points, start=1):
      if signals.signum:
        break
      run_dir = paths.join(root, point.name)
      where = f'[{i}/{len(points)}] {point.name}'
      state = sweeps.checkpoint_state(run_dir, configs[point.name].total_steps)
      if state == 'finished':
        say(f'{where}: finished already, skipped')
        continue
      if state:
        failures[point.name] = state
        say(f'{where}: {state}')
        continue
      command = commands[point.name]
      code, seconds, log_path = _run_trainer(run_dir, command, env, where, signals, say)
      if signals.signum:
        say(f'{where}: stopped ({signal.Signals(signals.signum).name}), exit {code}')
        break
      state = sweeps.checkpoint_state(run_dir, configs[point.name].total_steps)
      if code == 0 and state == 'finished':
        say(f'{where}: finished in {seconds:.1f} s')
        continue
      failures[point.name] = (
        f'failed (exit {code})' if code else state or 'failed (exited 0 before total_steps)'
      )
      say(f'{where}: {failures[point.name]} after {seconds:.1f} s; last lines of {log_path}:')
      say(_tail(log_path))
  if signals.signum:
    raise Interrupted(signals.signum, failures, signals.exit_code())
  return failures


def _run_trainer(run_dir, command, env, where, signals, say) -> tuple[int, float, str]:
  """(exit code, seconds, log path) of one trainer run, in a process group of its own."""
  # The trainer's output is appended as it runs: a local file (for a URL root, in its local
  # folder: objects cannot be appended to).
  log_dir = paths.local_folder(run_dir)
  os.makedirs(log_dir, exist_ok=True)
  log_path = os.path.join(log_dir, sweeps.TRAIN_LOG)
  say(f'{where}: running (output in {log_path})')
  start = time.perf_counter()
  with open(log_path, 'a', encoding='utf-8') as log:
    log.write(f'$ {shlex.join(command)}\n')
    log.flush()
    # Its own group: a terminal's Ctrl-C reaches the sweep alone, which forwards SIGTERM (a
    # trainer saves on SIGTERM; SIGINT would stop it without saving).
    # The sweep killed (kill -9): the trainer gets SIGTERM, saves and stops (its output is a
    # file), and the sweep's rerun resumes it, instead of finding it still running on the lock.
    signals.child = subprocess.Popen(
      workers.ends_with_parent(command, signal.SIGTERM, env),
      stdout=log,
      stderr=subprocess.STDOUT,
      env=env,
      start_new_session=True,
    )
    signals.forward()  # a signal that came while it was starting
    code = signals.child.wait()
    signals.child = None
  return code, time.perf_counter() - start, log_path


def _tail(path: str, lines: int = 12) -> str:
  with open(path, encoding='utf-8', errors='replace') as f:
    # The progress bar redraws with carriage returns: keep each line's last state.
    text = [line.rsplit('\r', 1)[-1] for line in f.read().splitlines()]
  return '\n'.join('    ' + line for line in text[-lines:])
