"""Paths that may be URLs: the one layer every file the project reads or writes goes through.

A path is either a local path (relative ones are made absolute against the working directory,
`~` is expanded) or a URL of an object store, `gs://bucket/key` (through gcsfs) or
`s3://bucket/key` (where s3fs is installed), both reached through `etils.epath`. URLs are passed
on unchanged: never `os.path.abspath`ed (that made `<cwd>/gs:/bucket/...` folders and handed
orbax a path it refused) and never turned into local folders.

Object stores have no folders and no rename: `makedirs` on a URL does nothing that a later write
depends on, and `data_pipeline.fileio` writes an object in one upload instead of a temporary file
and a rename (an upload is all-or-nothing: a reader sees the old object or the new one). Listings
are read fresh (gcsfs caches them per process; another process, the trainer or a worker, may
have written since).

Readers that need a local file (ArrayRecord's C++ reader) get one from `stage`, which copies an
object into a local cache folder once (docs/storage.md says when to mount a bucket instead).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from typing import IO, Any, Iterator

_URL = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')


def is_url(path: Any) -> bool:
  """True for `gs://...`, `s3://...` and any other `scheme://` path."""
  return bool(_URL.match(os.fspath(path) if not isinstance(path, str) else path))


# 'gs:/bucket' or 's3:/bucket': a URL with one slash, which every path function would take for a
# local path (a folder named 'gs:' in the working directory).
_ONE_SLASH = re.compile(r'(?<![A-Za-z0-9+.-])(gs|s3):/(?!/)', re.IGNORECASE)
# 'gs://', 'gs:///run', 's3://?x': a URL without a bucket, which path joins would turn into a
# one-slash local path.
_NO_BUCKET = re.compile(r'(?<![A-Za-z0-9+.-])(gs|s3)://(?=$|[/,?&\s])', re.IGNORECASE)
# The object-store URLs in a text (a source string may hold several, comma-separated).
_BUCKET = re.compile(r'(?<![A-Za-z0-9+.-])((?:gs|s3)://[^/,?&\s]+)', re.IGNORECASE)


def one_slash_url(text: str) -> str | None:
  """The fix for a malformed object-store URL in `text`: one slash ('gs:/bucket/run' for
  'gs://bucket/run'), or no bucket ('gs://', 'gs:///run'); None where there is none."""
  match = _ONE_SLASH.search(text)
  if match is not None:
    scheme = match.group(1)
    return (
      f'{scheme}:/ is a URL with one slash (a local folder named "{scheme}:"); write {scheme}://'
    )
  match = _NO_BUCKET.search(text)
  if match is not None:
    scheme = match.group(1)
    return f'{scheme}:// names no bucket; write {scheme}://BUCKET/PATH'
  return None


def buckets_in(text: str) -> list[str]:
  """The buckets ('gs://name', 's3://name') of the object-store URLs in `text`, in order, once
  each."""
  return list(dict.fromkeys(m.rstrip('/') for m in _BUCKET.findall(text)))


def bucket_problem(bucket: str) -> str | None:
  """Why the bucket `gs://name` (or `s3://name`) cannot be used, "gs://name: no such bucket (or
  no access)", before anything is written there; None when its objects can be listed, and where
  epath reaches it through another backend than fsspec (not checked). Listing needs the same
  permission as reading the bucket's objects; asking for the bucket's metadata would need more."""
  fs = _fs(bucket)
  if fs is None:
    return None
  try:
    fs.ls(bucket.split('://', 1)[1], refresh=True)
  except (FileNotFoundError, PermissionError):
    return f'{bucket}: no such bucket (or no access)'
  except Exception as e:  # pylint: disable=broad-except  (a client's own error types)
    return f'{bucket}: cannot be listed ({type(e).__name__}: {str(e).strip()[:200]})'
  return None


def input_problem(source: str) -> str | None:
  """Why an input path cannot be read, before it is listed: a malformed URL (`one_slash_url`)
  or, for a URL, a bucket that does not exist (`buckets_problem`); None otherwise."""
  return one_slash_url(source) or (buckets_problem(source) if is_url(source) else None)


def buckets_problem(text: str) -> str | None:
  """The first `bucket_problem` of the buckets `text` names (`buckets_in`), None where every one
  can be used: a tool's check of an output URL before its work."""
  for bucket in buckets_in(text):
    problem = bucket_problem(bucket)
    if problem:
      return problem
  return None


def absolute(path: Any) -> str:
  """`path` as a string that means the same from any working directory: a URL unchanged (less a
  trailing slash), a local path expanded (`~`) and made absolute."""
  text = os.fspath(path) if not isinstance(path, str) else path
  if is_url(text):
    return text if text.endswith('://') else text.rstrip('/')
  return os.path.abspath(os.path.expanduser(text))


def join(base: Any, *names: str) -> str:
  """`base/name/...`; for URLs always with '/' and without touching the scheme."""
  base = os.fspath(base) if not isinstance(base, str) else base
  if is_url(base):
    parts = [base.rstrip('/'), *(n.strip('/') for n in names if n)]
    return '/'.join(parts)
  return os.path.join(base, *names)


def dirname(path: str) -> str:
  """The folder of `path`; for a URL, its prefix (`gs://b/run/x` -> `gs://b/run`; a bucket's
  own URL is its own folder)."""
  if is_url(path):
    scheme, rest = path.rstrip('/').split('://', 1)
    return f'{scheme}://{rest.rsplit("/", 1)[0]}'
  return os.path.dirname(path)


def basename(path: str) -> str:
  return path.rstrip('/').rsplit('/', 1)[-1] if is_url(path) else os.path.basename(path)


def epath(path: Any):
  """The `etils.epath.Path` of `path` (a URL stays a URL; a local path is made absolute)."""
  from etils import epath as epath_lib  # imported on use: local-only runs never load fsspec

  return epath_lib.Path(absolute(path))


def _fs(path: str):
  """The fsspec file system epath uses for a URL, with its listing cache dropped, or None where
  epath uses another backend (TensorFlow's gfile when TF is installed: it caches nothing)."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top

  p = epath(path)
  if p._backend is not backend.fsspec_backend:  # pylint: disable=protected-access
    return None
  fs = backend.fsspec_backend.fs(path)
  fs.invalidate_cache()
  return fs


def exists(path: Any) -> bool:
  if not is_url(path):
    return os.path.exists(absolute(path))
  _fs(path)
  return epath(path).exists()


def isdir(path: Any) -> bool:
  """A local folder, or a URL prefix under which at least one object lies."""
  if not is_url(path):
    return os.path.isdir(absolute(path))
  _fs(path)
  return epath(path).is_dir()


def isfile(path: Any) -> bool:
  if not is_url(path):
    return os.path.isfile(absolute(path))
  _fs(path)
  return epath(path).is_file()


def not_a_folder(path: Any) -> str | None:
  """Why `path` cannot be made a folder: "a file, not a folder" for an existing file, with
  " (inside X, a file)" when a part of the path above it is a file; None where it can (a folder,
  a path that mkdir would make, any URL: an object store has no file in the way of a prefix)."""
  if is_url(path):
    return None
  full = part = absolute(path)
  while not os.path.exists(part) and os.path.dirname(part) != part:
    part = os.path.dirname(part)  # the nearest part of the path that exists
  if os.path.isdir(part):
    return None
  return 'a file, not a folder' + ('' if part == full else f' (inside {part}, a file)')


def listdir(path: Any) -> list[str]:
  """The names (not paths) directly under `path`, sorted; [] where there is nothing."""
  if not is_url(path):
    return sorted(os.listdir(absolute(path)))
  _fs(path)
  p = epath(path)
  return sorted(child.name for child in p.iterdir()) if p.is_dir() else []


def glob(pattern: str) -> list[str]:
  """Sorted paths matching `pattern` (`*`, `?`, `[...]`, and `**` for any depth); a URL pattern
  gives URLs."""
  pattern = os.path.expanduser(pattern.strip())
  if not is_url(pattern):
    import glob as glob_lib  # pylint: disable=g-import-not-at-top

    return sorted(glob_lib.glob(pattern, recursive=True))
  scheme = pattern.split('://', 1)[0]
  fs = _fs(pattern)
  if fs is None:  # epath's own glob, from the folder above the first wildcard
    fixed = re.split(r'[*?[]', pattern, maxsplit=1)[0]
    folder = dirname(fixed + 'x')
    return sorted(str(p) for p in epath(folder).glob(pattern[len(folder) + 1 :]))
  return sorted(f'{scheme}://{p}' for p in fs.glob(pattern))


def makedirs(path: Any) -> None:
  """Makes a local folder and its parents; on an object store there are no folders to make."""
  if not is_url(path):
    os.makedirs(absolute(path), exist_ok=True)


def open_file(path: Any, mode: str = 'r', encoding: str | None = None) -> IO:
  """`open` for local paths and URLs ('r', 'rb', 'w', 'wb'; 'a' on local paths only: objects
  cannot be appended to)."""
  if not is_url(path):
    return open(absolute(path), mode, encoding=encoding)  # pylint: disable=unspecified-encoding
  if 'a' in mode or '+' in mode:
    raise ValueError(
      f'{path}: mode {mode!r} cannot be used on an object store (objects are '
      'written whole); write the object again instead'
    )
  handle = epath(path).open(mode.replace('t', '').replace('b', '') + 'b')
  if 'b' in mode:
    return handle
  import io  # pylint: disable=g-import-not-at-top

  return io.TextIOWrapper(handle, encoding=encoding or 'utf-8')


def read_bytes(path: Any) -> bytes:
  with open_file(path, 'rb') as f:
    return f.read()


def getsize(path: Any) -> int:
  if not is_url(path):
    return os.path.getsize(absolute(path))
  _fs(path)
  return epath(path).stat().length


def remove(path: Any) -> None:
  """Removes a file or object; one that is not there is not an error."""
  with contextlib.suppress(FileNotFoundError):
    if is_url(path):
      _fs(path)
      epath(path).unlink()
    else:
      os.remove(absolute(path))


def rmtree(path: Any) -> None:
  """Removes a folder (or every object under a URL prefix); a missing one is not an error."""
  if is_url(path):
    if isdir(path):
      epath(path).rmtree()
  else:
    shutil.rmtree(absolute(path), ignore_errors=True)


def walk_files(path: Any) -> Iterator[str]:
  """Every file under `path` (recursive), as paths, sorted."""
  if not is_url(path):
    for folder, dirs, files in os.walk(absolute(path)):
      dirs.sort()
      for name in sorted(files):
        yield os.path.join(folder, name)
    return
  fs = _fs(path)
  if fs is not None:  # one recursive listing, not a request per object
    scheme = path.split('://', 1)[0]
    yield from sorted(f'{scheme}://{p}' for p in fs.find(path))
    return
  yield from (p for p in glob(join(path, '**')) if isfile(p))


def upload(local: str, url: str) -> None:
  """Copies the local file `local` to `url` in one upload (the object appears whole or not at
  all) or, for a local `url`, copies the file."""
  if is_url(url):
    fs = _fs(url)
    if fs is not None:
      fs.put_file(local, url)
      return
    with open(local, 'rb') as src, open_file(url, 'wb') as dst:
      shutil.copyfileobj(src, dst)
  else:
    os.makedirs(os.path.dirname(absolute(url)), exist_ok=True)
    shutil.copyfile(local, absolute(url))


def upload_folder(local: str, url: str) -> list[str]:
  """Copies every file under the local folder `local` to the same relative place under `url`
  (each file one upload); returns the URLs written."""
  written = []
  for path in walk_files(local):
    target = join(url, *os.path.relpath(path, local).split(os.sep))
    upload(path, target)
    written.append(target)
  return written


def default_cache_dir() -> str:
  """Where `stage` keeps local copies of objects: $XDG_CACHE_HOME/ove_jax/objects (default
  ~/.cache/ove_jax/objects), kept across runs so that a restart on the same machine reads no
  object twice."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'ove_jax', 'objects')


def default_cache_problem() -> str | None:
  """Why `default_cache_dir()` cannot be made a folder, naming the variable that put it there
  (XDG_CACHE_HOME, else HOME) and the fix; None where it can."""
  folder = default_cache_dir()
  why = not_a_folder(folder)
  if why is None:
    return None
  name = 'XDG_CACHE_HOME' if os.environ.get('XDG_CACHE_HOME') else 'HOME'
  return (
    f'{name}={os.environ.get(name, "")}: the local cache folder {folder} (for objects of a '
    f'bucket) is {why}; point {name} at a folder'
  )


def cache_path(url: str, cache_dir: str | None = None) -> str:
  """The local place that stands for `url` under `cache_dir` (default `default_cache_dir()`):
  `<cache_dir>/<scheme>/<bucket>/<key>`; for things that must be local files next to a URL
  workdir (a staged shard, wandb's run folder, the built-in demo data)."""
  scheme, rest = absolute(url).split('://', 1)
  return os.path.join(
    os.path.abspath(cache_dir or default_cache_dir()),
    scheme,
    *[p for p in rest.split('/') if p not in ('', '.', '..')],
  )


def local_folder(path: str, cache_dir: str | None = None) -> str:
  """`path` itself when it is local; for a URL, its `cache_path`: where files that cannot live
  in an object store (wandb's run files, the generated demo data) go for a URL workdir."""
  return cache_path(path, cache_dir) if is_url(path) else absolute(path)


# What tells one version of an object from another, where the store reports it: GCS's generation
# (new at every write) and hashes, S3's ETag (the content's MD5 for a single-part upload) and
# VersionId (versioned buckets).
_VERSION_KEYS = ('generation', 'etag', 'ETag', 'VersionId', 'crc32c', 'md5Hash')
# Beside a staged copy: the version of the object it was copied from (`object_version`).
STAGED_VERSION_SUFFIX = '.version'


def object_version(url: str) -> str:
  """The size and version of the object at `url`, one line ('size=10 generation=17... etag=...'):
  another upload to the same name changes it, also one of the same size."""
  fs = _fs(url)
  if fs is None:  # another backend than fsspec: the size is what it reports
    return f'size={getsize(url)}'
  info = fs.info(url)
  return ' '.join(
    [f'size={info["size"]}'] + [f'{k}={info[k]}' for k in _VERSION_KEYS if info.get(k)]
  )


def stage(path: str, cache_dir: str | None = None) -> str:
  """A local file with the contents of `path`: `path` itself when it is local; for a URL, a copy
  under `cache_dir` (default `default_cache_dir()`) at `<cache_dir>/<scheme>/<bucket>/<key>`,
  downloaded unless the copy there was made from the object's current version (`object_version`,
  kept beside it in `<copy>.version`: a re-uploaded shard of the same size is fetched again) and
  has its size,
  through a temporary name (two processes staging one object at once each write their own and
  the last rename wins)."""
  if not is_url(path):
    return absolute(path)
  from data_pipeline import fileio  # pylint: disable=g-import-not-at-top  (fileio imports us)

  local = cache_path(path, cache_dir)
  marker = local + STAGED_VERSION_SUFFIX
  version = object_version(path)
  if os.path.isfile(local) and os.path.isfile(marker):
    with open(marker, encoding='utf-8') as f:
      if f.read() == version and f'size={os.path.getsize(local)} ' in f'{version} ':
        return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  with fileio.atomic_path(local) as tmp:
    fs = _fs(path)
    if fs is not None:
      fs.get_file(path, tmp)
    else:
      with open_file(path, 'rb') as src, open(tmp, 'wb') as dst:
        shutil.copyfileobj(src, dst)
  fileio.write_atomic(marker, version)
  return local
