"""Files written so that a reader never sees half of one: the one home for atomic writes.

Every writer of the project (JSON markers and manifests, shards, exports, sweep tables) goes
through here. A file is written under a temporary name unique to this process and call, flushed
and fsynced, then renamed over its final name, so two runs never collide on a temporary name and
a crash leaves either the old file or the new one. Temporary names end in `.tmp-<pid>-<hex>` and
never keep the final extension, so no glob for shards or images lists them.

On an object store (`gs://`, `s3://`: see data_pipeline/paths.py) there is no rename, and none is
needed: an object upload is all-or-nothing, so a reader sees the old object or the new one, never
part of one. There `write_atomic` uploads the object directly, and `atomic_path` hands its caller
a local temporary file that is uploaded to the final name in one piece when the caller is done.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import uuid
from typing import Any, Collection, Iterator

from data_pipeline import paths

TMP_MARK = '.tmp-'


def temp_name(path: str) -> str:
  """A temporary name beside `path`, unique to this process and this call (for a URL, a local
  file in the system's temporary folder: see atomic_path)."""
  if paths.is_url(path):
    import tempfile  # pylint: disable=g-import-not-at-top

    path = os.path.join(tempfile.gettempdir(), paths.basename(path))
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
  fsync of the folder, so a file written after this one never outlives it in a crash). For a
  URL `path`: one upload of `tmp` (all-or-nothing, so no rename is needed), then `tmp` goes."""
  if paths.is_url(path):
    paths.upload(tmp, path)
    os.remove(tmp)
    return
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
  """Writes `data` (bytes, or text as UTF-8) to `path` atomically (to a URL: in one upload)."""
  if paths.is_url(path):
    with paths.open_file(path, 'wb') as f:
      f.write(data.encode('utf-8') if isinstance(data, str) else data)
    return
  with atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(data.encode('utf-8') if isinstance(data, str) else data)


def write_json(path: str, obj: Any, *, sort_keys: bool = True, default=None) -> None:
  """`obj` as indented JSON with a final newline, written atomically."""
  write_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=default) + '\n')


def write_npy(path: str, array) -> None:
  """`array` as a .npy file (numpy.save's format), written atomically (to a URL: one upload)."""
  import io  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top

  buffer = io.BytesIO()
  np.save(buffer, array)
  write_atomic(path, buffer.getvalue())


class ArrayFileError(ValueError):
  """A .npy / .npz file that cannot be read; the message names the file, what it was given as,
  and what is wrong with it."""


def read_arrays(path: str, what: str = 'the file') -> Any:
  """The array of a .npy file, or a dict of every array of a .npz file (read whole), on a local
  path or a URL, without pickles. `what` names the file's role in messages (`--features`, say):
  a missing, empty, truncated or garbled file, or one of Python objects, is an ArrayFileError
  that says which and how to mend it, not numpy's EOFError or BadZipFile."""
  import io  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top

  where = f'{what} {path}'
  if paths.isdir(path):
    raise ArrayFileError(f'{where}: a directory; give a .npy or .npz file')
  try:
    data = paths.read_bytes(path)
  except FileNotFoundError:
    raise ArrayFileError(f'{where}: no such file') from None
  except OSError as e:
    raise ArrayFileError(f'{where}: cannot be read ({e})') from None
  if not data:
    raise ArrayFileError(f'{where}: empty (0 bytes); write it again (numpy.save / numpy.savez)')
  try:
    loaded = np.load(io.BytesIO(data), allow_pickle=False)
    if isinstance(loaded, np.lib.npyio.NpzFile):
      with loaded:
        return {name: loaded[name] for name in loaded.files}
    return loaded
  except ValueError as e:
    if 'Object arrays' in str(e):
      raise ArrayFileError(
        f'{where}: holds Python objects (pickled), which are not loaded; save numeric or string '
        'arrays instead (numpy.save of an array of numbers, not of objects)'
      ) from None
    raise ArrayFileError(
      f'{where}: truncated or not a .npy / .npz file ({e}); write it again'
    ) from None
  except (EOFError, OSError, zipfile.BadZipFile, zlib.error, KeyError) as e:
    raise ArrayFileError(
      f'{where}: truncated or not a .npy / .npz file ({type(e).__name__}: {e}); write it again'
    ) from None


def read_json(path: str) -> Any | None:
  """The JSON value in `path`, or None when there is no such file."""
  try:
    with paths.open_file(path, 'r', encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def remove_stale_temporaries(
  folder: str, pid: int | None = None, targets: Collection[str] | None = None
) -> list[str]:
  """Removes temporary files a killed writer left in `folder` (only process `pid`'s, and only
  those of files in `targets`, when given); returns their paths. (An object store holds none:
  its temporary files are local.)"""
  if paths.is_url(folder):
    return []
  mark = TMP_MARK if pid is None else f'{TMP_MARK}{pid}-'
  stale = glob.glob(os.path.join(glob.escape(folder), f'*{mark}*'))
  if targets is not None:
    stale = [path for path in stale if path.split(mark, 1)[0] in targets]
  for path in stale:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
  return stale
