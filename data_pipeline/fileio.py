"""Files written so that a reader never sees half of one: the one home for atomic writes.

Every writer of the project (JSON markers and manifests, shards, exports, sweep tables) goes
through here. A file is written under a temporary name unique to this process and call, flushed
and fsynced, then renamed over its final name, so two runs never collide on a temporary name and
a crash leaves either the old file or the new one. Temporary names end in `.tmp-<pid>-<hex>` and
never keep the final extension, so no glob for shards or images lists them.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import uuid
from typing import Any, Iterator

TMP_MARK = '.tmp-'


def temp_name(path: str) -> str:
  """A temporary name beside `path`, unique to this process and this call."""
  return f'{path}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}'


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_folder(folder: str) -> None:
  """Makes a rename in `folder` durable; file systems that cannot fsync a folder (some network
  and FUSE mounts) are left as they are."""
  try:
    fd = os.open(folder or '.', os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def commit(tmp: str, path: str) -> None:
  """Makes a finished temporary file `tmp` the file `path` (fsync, an atomic rename, then an
  fsync of the folder, so a file written after this one never outlives it in a crash)."""
  _fsync(tmp)
  os.replace(tmp, path)
  _fsync_folder(os.path.dirname(path))


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path to write `path` through (for writers that take a file name, such as
  ArrayRecordWriter); renamed into place on success, removed on error."""
  tmp = temp_name(path)
  try:
    yield tmp
    commit(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes `data` (bytes, or text as UTF-8) to `path` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(data.encode('utf-8') if isinstance(data, str) else data)


def write_json(path: str, obj: Any, *, sort_keys: bool = True, default=None) -> None:
  """`obj` as indented JSON with a final newline, written atomically."""
  write_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=default) + '\n')


def read_json(path: str) -> Any | None:
  """The JSON value in `path`, or None when there is no such file."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def remove_stale_temporaries(folder: str) -> list[str]:
  """Removes temporary files a killed writer left in `folder`; returns their paths."""
  stale = glob.glob(os.path.join(glob.escape(folder), f'*{TMP_MARK}*'))
  for path in stale:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
  return stale
