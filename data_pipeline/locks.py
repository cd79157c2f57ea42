"""Run locks: one writer per output folder (or per task of a split run), refused clearly.

A lock is an flock on a small file in the folder, holding who took it (pid, host, start time,
task). The kernel releases an flock when its holder dies, however it dies, so a killed run never
leaves a stale lock behind; the file stays (removing it would race with a run opening it) and
its contents only serve the message of a refused run. flock works on local file systems and on
NFS (Linux maps it to NFS byte-range locks); some cluster file systems need it enabled (Lustre's
`flock` mount option).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import glob
import json
import os
import socket
from typing import Callable, Iterator

LOCK_PREFIX = '.lock-'


class Locked(RuntimeError):
  """Another run holds the lock."""


def owner_text(path: str) -> str:
  """Who holds (or last held) the lock file `path`, in words."""
  try:
    with open(path, encoding='utf-8') as f:
      owner = json.load(f)
    return (
      f'pid {owner["pid"]} on host {owner["host"]}, {owner.get("what", "a run")}, '
      f'started {owner["started"]}'
    )
  except (OSError, ValueError, KeyError, TypeError):
    return 'a run that has not written its name yet'


def _try_flock(fd: int, path: str) -> bool:
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except OSError as e:
    if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      return False
    raise OSError(
      e.errno,
      f'{path}: cannot lock ({e.strerror}); the file system may not '
      'support flock (Lustre: mount with -o flock)',
    ) from e


def is_held(path: str) -> bool:
  """Whether some process holds the lock file `path` now."""
  try:
    fd = os.open(path, os.O_RDWR)
  except FileNotFoundError:
    return False
  try:
    if _try_flock(fd, path):
      fcntl.flock(fd, fcntl.LOCK_UN)
      return False
    return True
  finally:
    os.close(fd)


@contextlib.contextmanager
def hold(
  folder: str,
  name: str,
  what: str,
  conflicts: Callable[[str], bool] = lambda name: False,
  wait: Callable[[str], None] | None = None,
  kind: str = 'precompute',
) -> Iterator[str]:
  """Holds the lock `folder/.lock-{name}` for the block, or raises Locked naming its holder.

  `conflicts(other_name)`: whether another lock of the folder belongs to a run that would write
  the same files; such a lock must not be held either. Checked after taking ours, so of two
  conflicting runs starting together at least one refuses.
  `wait`: instead of refusing, tell this function who holds the lock and wait for it.
  `kind`: what sort of run takes the lock, for the messages ('precompute', 'ove-llava-data').
  """
  path = os.path.join(folder, LOCK_PREFIX + name)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    if not _try_flock(fd, path) and wait is not None:
      wait(f'{folder} is in use by {owner_text(path)}; waiting for it')
      fcntl.flock(fd, fcntl.LOCK_EX)
    elif not _try_flock(fd, path):
      raise Locked(
        f'{folder} is in use by another {kind} run ({owner_text(path)}); wait '
        'for it to finish or stop it (its lock is released when it exits)'
      )
    for other in sorted(glob.glob(os.path.join(glob.escape(folder), LOCK_PREFIX + '*'))):
      other_name = os.path.basename(other)[len(LOCK_PREFIX) :]
      if other_name != name and conflicts(other_name) and is_held(other):
        raise Locked(
          f'{folder} is in use by another {kind} run ({owner_text(other)}) that '
          f'writes the same shards as {what}; wait for it to finish or stop it'
        )
    owner = {
      'pid': os.getpid(),
      'host': socket.gethostname(),
      'what': what,
      'started': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    os.fsync(fd)
    yield path
  finally:
    os.close(fd)  # closing the descriptor releases the flock
