"""Preemption and hangs: how a training process ends under a cluster scheduler.

A scheduler preempts a job with SIGTERM and a grace period before SIGKILL (about 30 s on Cloud
TPU and GKE). `Preemption.reached(step)` is checked after every step and says when to save and
stop:

- Several processes (after `jax.distributed.initialize`): JAX's preemption sync point
  (`multihost_utils.reached_preemption_sync_point`). Its notifier catches SIGTERM on whichever
  host gets it and tells the coordination service; every process then reports its step, and all
  of them return True at the same step (the largest reported + 1), so every host saves that same
  step, within a step or two of the notice. The check itself is local (no collective), so it
  costs nothing per step. Python's SIGTERM handler is left alone here: installing one would
  replace JAX's notifier.
- One process: a SIGTERM handler sets a flag; the step in flight finishes and is saved. Ctrl-C
  (SIGINT) does the same once a step has finished; before that (restoring, compiling), a second
  Ctrl-C, or one after SIGTERM, stops at once without saving (`Interrupted`); one during the
  stop's save waits for it. Several processes stop at once on Ctrl-C (an interrupted process
  ends, its peers time out), as a save one process alone decides would leave the others waiting
  in a collective. Launchers (`ove-launch-local`, `ove-sweep`) turn their Ctrl-C into SIGTERM for
  every process.

After the preemption save the trainer exits with `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL of
sysexits.h: "try again later"), not 0: a Kubernetes Job counts exit 0 as success and never
restarts it. docs/launch.md has the scheduler settings that restart on this code. After a Ctrl-C
it exits with `INTERRUPTED_EXIT_CODE` (130, 128 + SIGINT, as a shell's), saved or not: the user
stopped it.

A hang (a collective a peer never joins, a stuck input read) ends through the watchdog
(`metrics.Watchdog`, `on_timeout=exit_hung`): every thread's stack goes to stderr, then the
process exits with `HANG_EXIT_CODE` (70, EX_SOFTWARE), so the job fails instead of holding its
machines until its wall-clock limit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import jax

PREEMPTED_EXIT_CODE = 75  # saved after SIGTERM: restart me (sysexits EX_TEMPFAIL)
HANG_EXIT_CODE = 70  # the watchdog saw no finished step in time (sysexits EX_SOFTWARE)
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C (128 + SIGINT): the user stopped the run


def _sync_manager_running() -> bool:
  # jax.distributed.initialize starts the sync manager unless the service is turned off.
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class Preemption:
  """While entered, `reached(step)` (called after every step, on every process) is True at the
  step where every process should save and stop. See the module docstring for how."""

  def __init__(self):
    self.requested = False  # SIGTERM or Ctrl-C seen (one process), or the sync point reached
    self.interrupted = False  # the request was a Ctrl-C
    self.saving = False  # the stop's save under way: a further Ctrl-C waits for it
    self._stepped = False  # a step has finished: before that a Ctrl-C has nothing to save
    self._synced = False
    self._previous = {}  # signal -> the handler before ours

  def __enter__(self) -> Preemption:
    if _interrupted[0]:  # a Ctrl-C while starting whose Interrupted Python dropped
      raise Interrupted
    self._synced = jax.process_count() > 1 and _sync_manager_running()
    if not self._synced:
      ours = {'SIGTERM': self._handle, 'SIGINT': self._interrupt}
      for name, handler in ours.items():
        if hasattr(signal, name) and (name == 'SIGTERM' or jax.process_count() == 1):
          number = getattr(signal, name)
          with contextlib.suppress(ValueError):  # not the main thread: no handler, no clean stop
            self._previous[number] = signal.signal(number, handler)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def _interrupt(self, signum, frame):
    if self.saving:  # stopping already: the save finishes (kill the process to stop sooner)
      sys.stderr.write('\nCtrl-C: saving before the stop; it ends when the save is written\n')
    elif self.requested or not self._stepped:
      # A second Ctrl-C, one after SIGTERM, or one before any step finished (restoring,
      # compiling: nothing new to save): stop now, unsaved.
      raise_interrupted(signum, frame)
    else:
      self.requested = self.interrupted = True
      sys.stderr.write(
        '\nCtrl-C: the step in flight finishes and is saved, then the run stops (Ctrl-C again '
        'stops at once, without saving)\n'
      )
    sys.stderr.flush()

  def reached(self, step: int) -> bool:
    """True on every process at the same step once any of them got SIGTERM; raises Interrupted
    for a stop-now Ctrl-C whose exception Python dropped (`raise_interrupted`)."""
    self._stepped = True
    if _interrupted[0]:
      raise Interrupted
    if self._synced:
      from jax.experimental import multihost_utils

      self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
    self.saving = self.requested
    return self.requested

  def __exit__(self, *exc) -> bool:
    _interrupted[0] = False  # the run is over: nothing carries over to another in this process
    for number, previous in self._previous.items():
      if previous is not None:  # None: a handler from outside Python, which cannot be put back
        signal.signal(number, previous)
    return False


@contextlib.contextmanager
def exit_on_sigterm_while_starting():
  """While entered, in one process (built-in data being made, the compilation cache opened,
  before `Preemption`): SIGTERM exits at once with PREEMPTED_EXIT_CODE, as a restart loses
  nothing yet; without it Python's default would end the process with 143, which a scheduler
  counts as a failure. Several processes keep JAX's notifier (see the module docstring). The
  previous handler is restored on exit."""

  def handle(signum, frame):
    del signum, frame
    sys.stderr.write(
      f'SIGTERM while starting, nothing to save: exiting with code {PREEMPTED_EXIT_CODE} '
      '(the restart starts over)\n'
    )
    raise SystemExit(PREEMPTED_EXIT_CODE)

  previous = None
  if jax.process_count() == 1 and hasattr(signal, 'SIGTERM'):
    with contextlib.suppress(ValueError):  # not the main thread: no handler
      previous = signal.signal(signal.SIGTERM, handle)
  try:
    yield
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def exit_code(stopped: str | None) -> int:
  """A finished run's exit code: 0, or after a stop that saved ('stopped' of the trainer's
  result) INTERRUPTED_EXIT_CODE for a Ctrl-C (the user stopped it) and PREEMPTED_EXIT_CODE for
  SIGTERM (a scheduler should restart the job)."""
  if not stopped:
    return 0
  return INTERRUPTED_EXIT_CODE if stopped == 'Ctrl-C' else PREEMPTED_EXIT_CODE


class Interrupted(BaseException):
  """Ctrl-C: stop at once, without saving. A BaseException as KeyboardInterrupt is, and not
  one: a KeyboardInterrupt raised inside some C calls marks the interpreter, which then ends the
  process with SIGINT at exit (status -2) whatever exit code was asked for."""


_interrupted = [False]  # a Ctrl-C raised Interrupted since `ctrl_c_raises_interrupted` began


def raise_interrupted(signum, frame):
  """The SIGINT handler that stops at once. Python drops an exception raised inside a garbage
  collector callback or a __del__ (a signal may land there: JAX runs one at every collection), so
  the Ctrl-C is also remembered, and `Preemption` raises it on entering."""
  del signum, frame
  _interrupted[0] = True
  raise Interrupted


@contextlib.contextmanager
def ctrl_c_raises_interrupted():
  """While entered, in the main thread: Ctrl-C raises `Interrupted` (the trainer's main turns
  it into one line and INTERRUPTED_EXIT_CODE); `Preemption` replaces this while the steps run."""
  previous, _interrupted[0] = None, False
  if hasattr(signal, 'SIGINT'):
    with contextlib.suppress(ValueError):  # not the main thread: Python's own handling
      previous = signal.signal(signal.SIGINT, raise_interrupted)
  unraisable = sys.unraisablehook

  def hook(report):  # a dropped Interrupted is remembered (above), not printed as a traceback
    if not isinstance(report.exc_value, Interrupted):
      unraisable(report)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    _interrupted[0] = False
    if sys.unraisablehook is hook:  # else a later hook wraps this one: left as it is
      sys.unraisablehook = unraisable
    if previous is not None:
      signal.signal(signal.SIGINT, previous)


def exit_hung() -> None:
  """The watchdog's `on_timeout`: exits now with HANG_EXIT_CODE (os._exit: a thread blocked in a
  collective would keep a normal exit waiting forever)."""
  sys.stderr.write(f'Watchdog: exiting with code {HANG_EXIT_CODE} (hang)\n')
  sys.stderr.flush()
  sys.stdout.flush()
  os._exit(HANG_EXIT_CODE)
