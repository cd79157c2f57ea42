"""Worker processes that survive their tasks: a per-task time limit, and crashes contained.

`ordered_map(fn, items, workers, timeout=...)` runs `fn` over `items` in spawned processes and
yields the results in input order. A task that runs past its time limit has its worker killed;
a task whose worker dies (a segfault inside a decoder, the kernel's out-of-memory killer) is
reported; either way the item's result is a `Lost` saying why, a fresh worker takes the slot,
and the map goes on. That is what a web-scale corpus needs: one clip in a million that hangs
or crashes FFmpeg must cost that clip, not the run.

Each worker runs one task at a time over its own pipe, so the parent always knows which item a
dead worker held (a shared task queue, as in concurrent.futures, loses that: a dead worker
breaks the whole pool). `usable_cpus()` is the default worker count: the CPUs this process may
use (its affinity mask and its cgroup's CPU quota), not the machine's.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from multiprocessing import connection
from typing import Any, Callable, Iterable, Iterator, Sequence

from data_pipeline import host_memory

# Spawned, not forked: the parent may hold threads (tqdm, grain, JAX in a notebook) that fork
# would copy in whatever state they are in.
_CONTEXT = multiprocessing.get_context('spawn')
# A worker that dies before it is ready (import error, a calling script without a __main__
# guard) is a broken set-up, not a bad clip: the map stops instead of retrying forever.
STARTUP_SECONDS = 300.0
# Each worker is one of `workers` processes already: BLAS/OpenMP pools of one thread per core in
# every worker oversubscribe the CPUs (2 workers on 2 cores measured 15x slower, most of it system
# time). Workers start with these at 1 unless the user set them.
# The same goes for codec selection's decoding thread (`codec.select_threads`).
WORKER_THREAD_VARIABLES = (
  'OMP_NUM_THREADS',
  'OPENBLAS_NUM_THREADS',
  'MKL_NUM_THREADS',
  'OVE_SELECT_THREADS',
)


@dataclasses.dataclass
class Lost:
  """The result of an item whose worker timed out or died; `pid`: that worker's process id (it
  is gone by the time this is handed over), to find what it left half-written."""

  reason: str
  pid: int | None = None


class WorkerStartError(RuntimeError):
  """A worker process could not start (the set-up is wrong, not an item)."""


def cgroup_cpu_limit(proc_root: str = '/proc', cgroup_root: str = '/sys/fs/cgroup') -> float | None:
  """The CPU quota of this process's cgroup in CPUs (cgroup v2 `cpu.max`, v1 `cpu.cfs_*`, the
  smallest along the path to the root), or None when there is none."""
  try:
    with open(os.path.join(proc_root, 'self', 'cgroup'), encoding='utf-8') as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  limits = []
  for line in lines:
    _, controllers, path = line.split(':', 2)
    if controllers == '':  # v2: one unified hierarchy
      candidates = [
        (os.path.join(cgroup_root, p.lstrip('/'), 'cpu.max'), None) for p in _ancestors(path)
      ]
    elif 'cpu' in controllers.split(','):  # v1: the cpu controller's own hierarchy
      mount = next(
        (
          os.path.join(cgroup_root, m)
          for m in (controllers, 'cpu,cpuacct', 'cpu')
          if os.path.isdir(os.path.join(cgroup_root, m))
        ),
        None,
      )
      if mount is None:
        continue
      candidates = [
        (
          os.path.join(mount, p.lstrip('/'), 'cpu.cfs_quota_us'),
          os.path.join(mount, p.lstrip('/'), 'cpu.cfs_period_us'),
        )
        for p in _ancestors(path)
      ]
    else:
      continue
    for quota_path, period_path in candidates:
      limit = _read_quota(quota_path, period_path)
      if limit is not None:
        limits.append(limit)
  return min(limits) if limits else None


def _ancestors(path: str) -> list[str]:
  parts = [p for p in path.split('/') if p]
  return ['/' + '/'.join(parts[:i]) for i in range(len(parts), -1, -1)]


def _read_quota(quota_path: str, period_path: str | None) -> float | None:
  try:
    with open(quota_path, encoding='utf-8') as f:
      fields = f.read().split()
    if period_path is not None:
      with open(period_path, encoding='utf-8') as f:
        fields.append(f.read().strip())
  except OSError:
    return None
  if len(fields) < 2 or fields[0] == 'max' or int(fields[0]) <= 0:  # 'max' (v2), -1 (v1)
    return None
  return int(fields[0]) / int(fields[1])


def usable_cpus() -> int:
  """The CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota (rounded
  up: a quota of 1.5 CPUs keeps two workers busy between them)."""
  try:
    count = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    count = os.cpu_count() or 1
  quota = cgroup_cpu_limit()
  if quota is not None:
    count = min(count, max(1, math.ceil(quota)))
  return max(1, count)


def death_reason(exitcode: int | None) -> str:
  """Why a worker process ended, in words."""
  if exitcode is not None and exitcode < 0:
    try:
      name = signal.Signals(-exitcode).name
    except ValueError:
      name = f'signal {-exitcode}'
    if -exitcode == signal.SIGKILL:
      return (
        f"the worker process was killed by {name} (the kernel's out-of-memory killer, "
        'or another process)'
      )
    if -exitcode == signal.SIGSEGV:
      return f'the worker process crashed with {name} (segmentation fault, e.g. in the decoder)'
    return f'the worker process died of {name}'
  return f'the worker process exited with code {exitcode}'


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _prctl():
  """libc's prctl, or None (not Linux)."""
  try:
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None


def _signal_on_parent_death(prctl, parent_pid: int, signum: int) -> None:
  prctl(_PR_SET_PDEATHSIG, signum)
  if os.getppid() != parent_pid:  # the parent died before the line above: no signal would come
    os._exit(128 + signum)  # (a signal here could meet the parent's Python handler, copied)


def _die_with_parent(parent_pid: int) -> None:
  """Linux: this process gets SIGKILL when its parent dies, so a worker stuck in a hung decoder
  never outlives a run that was killed (the parent's own time limits die with it). Elsewhere
  workers still exit when their pipe closes."""
  prctl = _prctl()
  if prctl is not None:
    _signal_on_parent_death(prctl, parent_pid, signal.SIGKILL)


def ends_with_parent(command: Sequence[str], signum: int, env=None) -> list[str]:
  """`command` as an argv for subprocess.Popen whose process gets `signum` when the thread that
  starts it ends (its process dying, SIGKILL included: Linux's PR_SET_PDEATHSIG); `command`
  unchanged where there is no such guard. A child in a session of its own (start_new_session)
  otherwise outlives its launcher's kill -9.

  The signal is asked for by a small stdlib-only Python (`_PARENT_DEATH_EXEC`) that then execs
  `command` in its place (the same pid): nothing of the launcher's runs between its fork and the
  exec, as a preexec_fn would, which is unsafe in a threaded process such as one with JAX (JAX
  warns of deadlocks at every such fork). A command that is not found raises FileNotFoundError
  here, as Popen would (`env`: the child's environment, whose PATH is searched)."""
  if _prctl() is None:
    return list(command)
  search = (env if env is not None else os.environ).get('PATH', os.defpath)
  if shutil.which(command[0], path=search) is None:
    raise FileNotFoundError(errno.ENOENT, 'No such file or directory', command[0])
  return [
    sys.executable,
    '-S',
    '-E',
    '-c',
    _PARENT_DEATH_EXEC,
    str(os.getpid()),
    str(int(signum)),
    *command,
  ]


# argv: parent pid, signal number, the command. Exits 128 + signal where the parent died before
# the guard was in place (no signal would come), 127 where the command cannot be executed.
_PARENT_DEATH_EXEC = f"""import ctypes, os, sys
parent, signum = int(sys.argv[1]), int(sys.argv[2])
ctypes.CDLL(None, use_errno=True).prctl({_PR_SET_PDEATHSIG}, signum)
if os.getppid() != parent:
  os._exit(128 + signum)
try:
  os.execvp(sys.argv[3], sys.argv[3:])
except OSError as e:
  sys.stderr.write(f'{{sys.argv[3]}}: {{e}}\\n')
  os._exit(127)
"""


def _worker_main(
  conn, fn: Callable, initializer: Callable | None, initargs: tuple, parent_pid: int
) -> None:
  _die_with_parent(parent_pid)
  # Ctrl-C reaches the whole process group: the parent stops the workers, they do not stop
  # themselves mid-task with a traceback each.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  # One item after another on one thread, each allocating and freeing large arrays (a clip's
  # maps): freed memory stays in the process instead of being faulted in again (`host_memory`).
  host_memory.configure_malloc()
  if initializer is not None:
    initializer(*initargs)
  conn.send('ready')
  while True:
    try:
      message = conn.recv()
    except EOFError:  # the parent is gone
      return
    if message is None:
      return
    index, item = message
    try:
      result = fn(item)
    except Exception as e:  # pylint: disable=broad-except  -- reported as the item's result
      result = Lost(f'{type(e).__name__}: {e}')
    try:
      conn.send((index, result))
    except (TypeError, AttributeError, ValueError) as e:  # a result that does not pickle
      conn.send((index, Lost(f'the result cannot be sent back ({type(e).__name__}: {e})')))


class _Slot:
  """One worker process and the task it holds."""

  def __init__(self, fn, initializer, initargs):
    self.conn, child = _CONTEXT.Pipe()
    self.process = _CONTEXT.Process(
      target=_worker_main, daemon=True, args=(child, fn, initializer, initargs, os.getpid())
    )
    # A spawned child takes the parent's environment when it starts; set the thread limits for
    # that moment only, so the parent's own libraries keep theirs.
    unset = [name for name in WORKER_THREAD_VARIABLES if name not in os.environ]
    os.environ.update({name: '1' for name in unset})
    try:
      self.process.start()
    finally:
      for name in unset:
        os.environ.pop(name, None)
    child.close()
    self.ready = False
    self.started = time.monotonic()
    self.task: int | None = None  # index of the item it runs

  def send(self, index: int, item: Any) -> None:
    self.conn.send((index, item))
    self.task, self.started = index, time.monotonic()

  def stop(self, kill: bool = False) -> None:
    if not kill and self.process.is_alive():
      try:
        self.conn.send(None)
      except OSError:
        pass
      self.process.join(5)
    if self.process.is_alive():
      self.process.kill()
    self.process.join()
    self.conn.close()


def check_timeout(clip_timeout: float | None) -> None:
  """A batch tool's per-item time limit: seconds > 0, or None for none (checked before a run)."""
  if clip_timeout is not None and not clip_timeout > 0:
    raise ValueError(f'clip_timeout={clip_timeout}: a number of seconds > 0, or None')


def ordered_map(
  fn: Callable,
  items: Iterable,
  workers: int,
  *,
  timeout: float | None = None,
  initializer: Callable | None = None,
  initargs: tuple = (),
  window: int | None = None,
) -> Iterator:
  """fn over items, results in input order, in `workers` spawned processes (0: in this process,
  where there is no time limit and a crash is the caller's).

  An item whose task runs past `timeout` seconds, or whose worker dies, yields `Lost(reason)`
  and a new worker replaces the old one. At most `window` items (default 4 per worker) are
  in flight or waiting for their turn, so memory stays flat on huge lists. `fn`, `initializer`
  and the items must be picklable (module-level functions).
  """
  if workers <= 0:
    if initializer is not None:
      initializer(*initargs)
    for item in items:
      yield fn(item)
    return
  window = window or 4 * workers
  slots = [_Slot(fn, initializer, initargs) for _ in range(workers)]
  todo = iter(enumerate(items))
  waiting: collections.deque = collections.deque()  # (index, item) read but not yet sent
  done: dict[int, Any] = {}
  next_out = submitted = 0
  exhausted = False
  try:
    while True:
      while next_out in done:
        yield done.pop(next_out)
        next_out += 1
      while not exhausted and submitted - next_out < window:
        entry = next(todo, None)
        if entry is None:
          exhausted = True
        else:
          waiting.append(entry)
          submitted += 1
      if exhausted and next_out == submitted:
        return
      for i, slot in enumerate(slots):
        if slot.ready and slot.task is None and waiting:
          if slot.process.is_alive():
            slot.send(*waiting.popleft())
          else:  # died while idle: nothing was lost, start another
            slot.stop(kill=True)
            slots[i] = _Slot(fn, initializer, initargs)
      busy = [s for s in slots if s.task is not None or not s.ready]
      now = time.monotonic()
      deadlines = [
        s.started + (timeout if s.ready else STARTUP_SECONDS)
        for s in busy
        if timeout or not s.ready
      ]
      wait_for = max(0.0, min(deadlines) - now) if deadlines else None
      ready = connection.wait([s.conn for s in busy] + [s.process.sentinel for s in busy], wait_for)
      for i, slot in enumerate(slots):
        if slot not in busy:
          continue
        was_ready = slot.ready
        said = _collect(slot, ready, timeout)
        if said is None:
          continue
        index, value = said
        if not was_ready:
          raise WorkerStartError(
            f'a worker process could not start ({value.reason}; its error is printed '
            'above); if this runs from a script, the script needs an `if __name__ == '
            "'__main__':` guard (workers are spawned and import the main module)"
          )
        done[index] = value
        if slot.task is not None:  # timed out or died holding its task: a fresh worker
          slot.stop(kill=True)
          slots[i] = _Slot(fn, initializer, initargs)
  finally:
    for slot in slots:
      slot.stop(kill=slot.task is not None)


def _collect(slot: _Slot, ready: list, timeout: float | None) -> tuple[int | None, Any] | None:
  """What a busy slot has to say: None while it works (or when it just became ready); else
  (index, result) of its task, with `Lost` as the result when the task timed out or the
  process died (the slot's task then stays set, so the caller replaces the worker)."""
  if slot.conn in ready or slot.conn.poll():
    try:
      message = slot.conn.recv()
    except (EOFError, OSError):  # the pipe closed: the process is dying, or gone
      message = None
      slot.process.join(10)
      if slot.process.is_alive():
        slot.process.kill()
        slot.process.join()
    if message == 'ready':
      slot.ready, slot.started = True, time.monotonic()
      return None
    if message is not None:
      slot.task = None
      return message
  if slot.process.sentinel in ready or not slot.process.is_alive():
    slot.process.join()
    return slot.task, Lost(death_reason(slot.process.exitcode), slot.process.pid)
  elapsed = time.monotonic() - slot.started
  if not slot.ready and elapsed > STARTUP_SECONDS:
    return None, Lost(f'no answer after {STARTUP_SECONDS:g} s')
  if slot.ready and timeout and elapsed > timeout:
    return slot.task, Lost(
      f'timed out after {timeout:g} s (the worker was killed)', slot.process.pid
    )
  return None
