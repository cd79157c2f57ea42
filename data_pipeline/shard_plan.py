"""The plan of a sharded precompute run: its inputs, their cut into shards, plan.json, and which
shards are finished.

`data_pipeline.precompute` (videos) and `data_pipeline.image_precompute` (images) both run a
plan: `read_inputs` reads the list file or folder, `plan_shards` cuts the shuffled items into
balanced contiguous shards, `task_shards` says which of them task I of N writes, and `make_plan`
records all of it with a digest per shard in plan.json. A later run compares its plan with the
folder's (`plan_changes` names what differs) and skips the shards whose progress marker carries
their digest (`finished_markers`). The files themselves are `data_pipeline.shards`'.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from data_pipeline import fileio, paths
from data_pipeline.clip_work import Clip, resolve
from data_pipeline.shards import (
  FAILURES,
  PLAN,
  PROGRESS_DIR,
  SUMMARY,
  TFDS_FILES,
  count_records,
  marker_path,
  shard_path,
)

VIDEO_EXTENSIONS = (
  '.mp4',
  '.m4v',
  '.mkv',
  '.webm',
  '.avi',
  '.mov',
  '.mpg',
  '.mpeg',
  '.ts',
  '.flv',
  '.3gp',
  '.wmv',
  '.h264',
  '.264',
  '.hevc',
)
PLAN_VERSION = 1


# A run whose first this-many clips all fail for reasons that are not the videos' (errors other
# than VideoError, time limits, crashed workers) is stopped (`Aborted`): the options, the
# selector or the time limit are wrong, and a million-line failure manifest helps nobody.
ABORT_WINDOW = 16


def abort_reason(processed: int, unexpected: int, lost: int, example: str) -> str | None:
  """Why a run stops (the head of its `Aborted` message) once the first ABORT_WINDOW clips it
  processed all failed for the run's reasons (`unexpected`: not the video's fault; `lost`: of
  those, timed out or crashed their worker), `example` the last reason; None otherwise."""
  if not processed == unexpected == ABORT_WINDOW:
    return None
  if lost == ABORT_WINDOW:
    return (
      f'the first {ABORT_WINDOW} clips all ran past the time limit or lost their worker '
      f'process, e.g. {example!r}; raise --clip-timeout if clips this long need more time, '
      'else check the reader and the decoder'
    )
  return (
    f'the first {ABORT_WINDOW} clips all failed with errors that are not VideoError (or lost '
    f'their worker), e.g. {example!r}; check the options and the selector'
  )


def rolled_back(cleared: bool, elsewhere: str) -> str:
  """What an `Aborted` run's message ends with: `cleared` when nothing of its settings is left
  (a mended command starts afresh), else where a run with other settings must go."""
  kept = 'nothing this run wrote is kept (its failures are not recorded as known)'
  if cleared:
    return f'{kept}, so the same command with that mended processes these clips again'
  return (
    f'{kept}; finished work of these settings stays, so a run with other options or another '
    f'selector is a different run: give it {elsewhere} (a time limit alone may change)'
  )


class Aborted(RuntimeError):
  """The run stopped because its first `ABORT_WINDOW` clips all failed for reasons
  that are the run's, not the clips' (a wrong option or selector, a time limit too short); what
  it wrote is rolled back (`precompute.Run.roll_back`), so a re-run with the settings mended
  processes them."""


class PlanMismatch(RuntimeError):
  """The output folder holds shards of a different run (other inputs, options or sharding)."""


def read_inputs(
  source: str, extensions: Sequence[str] = VIDEO_EXTENSIONS, what: str = 'videos'
) -> list[Clip]:
  """The clips named by a list file or found under a folder.

  List file: one path per line, optionally a tab then label ids separated by commas or spaces;
  blank lines and lines starting with '#' are skipped; relative paths are relative to the list
  file's folder. Labels are all or nothing and ids are >= 0: a line that breaks either is a
  ValueError naming file:line (a labelled corpus with an unlabelled record fails in training).
  Folder: every file below it (recursively) whose extension is in `extensions`, in sorted order.
  Paths are made absolute so a record names its source wherever it is read. `what` names the
  items in messages ('videos', 'images').

  Either may be in a bucket (gs://, s3://: a list object, or every object under a prefix), and a
  list may name URLs: they are kept as they are, and a relative name in a bucket's list is
  relative to the list's prefix. (Precompute's workers read URL clips through `paths`, or the
  `reader` hook when one is given.)
  """
  source = os.fspath(source)
  wanted = tuple(e.lower() for e in extensions)
  problem = paths.input_problem(source)
  if problem:
    raise FileNotFoundError(f'{source}: {problem}')
  if paths.is_url(source):
    if paths.isdir(source):
      return [Clip(p) for p in paths.walk_files(source) if p.lower().endswith(wanted)]
    if not paths.isfile(source):
      raise FileNotFoundError(
        f'{source}: no such object or prefix; give a list object of {what} (one name a line) or '
        f'a prefix with {what} under it'
      )
    base = paths.dirname(source)
    data = paths.read_bytes(source)
  elif os.path.isdir(source):
    found = []
    for root, dirs, files in os.walk(source):
      dirs.sort()  # os.walk's order is the file system's; sorting makes the list reproducible
      for name in sorted(files):
        if name.lower().endswith(wanted):
          found.append(Clip(os.path.abspath(os.path.join(root, name))))
    return found
  elif not os.path.isfile(source):
    raise FileNotFoundError(
      f'{source}: neither a list file of {what} nor a folder; give a list (one path a line) or a '
      f'folder of {what}'
    )
  else:
    base = os.path.dirname(os.path.abspath(source))
    with open(source, 'rb') as f:
      data = f.read()
  clips = []
  try:
    lines = data.decode('utf-8').replace('\r\n', '\n').replace('\r', '\n').split('\n')
  except UnicodeDecodeError:
    raise ValueError(
      f'{source}: not a text list of {what} (one path per line, optionally a tab and label '
      f'ids); give a list file or a folder of {what}'
    ) from None
  labelled = unlabelled = None  # the first line with label ids, the first without
  for number, line in enumerate(lines, 1):
    line = line.rstrip('\r\n')
    if not line.strip() or line.lstrip().startswith('#'):
      continue
    # Paths may hold spaces, so only a tab separates the labels.
    path, _, label_text = line.partition('\t')
    labels = None
    if label_text.strip():
      try:
        labels = tuple(int(x) for x in re.split(r'[,\s]+', label_text.strip()))
      except ValueError:
        raise ValueError(
          f'{source}:{number}: label ids must be integers, got {label_text.strip()!r}'
        ) from None
      if min(labels) < 0:
        raise ValueError(
          f'{source}:{number}: label ids {",".join(map(str, labels))}; ids are whole numbers >= 0'
        )
      labelled = labelled or number
    else:
      unlabelled = unlabelled or number
    if labelled and unlabelled:
      raise ValueError(
        f'{source}:{unlabelled}: no label ids, but line {labelled} has some; labels are all or '
        'nothing: give every line a tab and its ids, or none'
      )
    clips.append(Clip(_resolved(base, path.strip()), labels))
  return clips


def _resolved(base: str, name: str) -> str:
  """A list line's path: a URL as it is, else relative to the list's folder (`base`, a local
  folder or a bucket's prefix; a name starting with '/' in a bucket's list is a local path)."""
  if paths.is_url(name) or (paths.is_url(base) and name.startswith('/')):
    return name
  if paths.is_url(base):
    return paths.join(base, *name.split('/'))
  return os.path.normpath(os.path.join(base, name))


def num_shards_for(num_clips: int, clips_per_shard: int) -> int:
  return max(1, math.ceil(num_clips / max(1, clips_per_shard)))


def plan_shards(
  clips: Sequence[Clip], num_shards: int, shuffle_seed: int | None = 0
) -> list[list[Clip]]:
  """Balanced contiguous shards of the clips, after a seeded shuffle (None keeps the order).

  Shuffling at write time matters: grain gives each host a contiguous range of records, and a
  list sorted by class folder would otherwise hand a host a few classes only.
  """
  n = len(clips)
  if n == 0:
    raise ValueError('no input clips')
  num_shards = max(1, min(num_shards, n))  # never an empty shard by construction
  if shuffle_seed is None:
    order = np.arange(n)
  else:
    order = np.random.default_rng(shuffle_seed).permutation(n)
  bounds = [i * n // num_shards for i in range(num_shards + 1)]
  return [[clips[j] for j in order[bounds[i] : bounds[i + 1]]] for i in range(num_shards)]


def task_shards(num_shards: int, task_index: int = 0, num_tasks: int = 1) -> list[int]:
  """The shards task `task_index` of `num_tasks` writes: every num_tasks-th, from its index
  (interleaved, so tasks that start together share the work evenly even when stopped early)."""
  if num_tasks < 1 or not 0 <= task_index < num_tasks:
    raise ValueError(
      f'task_index={task_index}, num_tasks={num_tasks}: need num_tasks >= 1 and '
      '0 <= task_index < num_tasks'
    )
  return list(range(task_index, num_shards, num_tasks))


def input_clips(inputs) -> list[Clip]:
  """The clips of a list file or folder (`read_inputs`; none is a ValueError saying what was
  looked for), or of a sequence of `Clip`s / paths."""
  if not isinstance(inputs, (str, os.PathLike)):
    return [c if isinstance(c, Clip) else Clip(os.path.abspath(os.fspath(c))) for c in inputs]
  clips = read_inputs(inputs)
  if not clips:
    kind = 'folder' if paths.isdir(os.fspath(inputs)) else 'list'
    raise ValueError(
      f'{os.fspath(inputs)}: no input clips in this {kind} ('
      + (
        f'files ending in {", ".join(VIDEO_EXTENSIONS)}, searched recursively)'
        if kind == 'folder'
        else "one path a line; blank lines and lines starting with '#' are skipped)"
      )
    )
  return clips


def check_hooks(options: Mapping[str, Any], selector: str | None, reader: str | None) -> None:
  """A wrong selector or reader name ('module:function'; None: codec.select, names are paths),
  or options the selector refuses, fail here: before a pool starts, not in every worker."""
  for spec, what in ((selector, 'selector'), (reader, 'reader')):
    if spec:
      resolve(spec, what)
  check_options(options, selector)


def check_options(options: Mapping[str, Any], selector: str | None) -> None:
  """Unknown names and bad values of codec.select (and of $OVE_SELECT_THREADS) fail here, before
  a pool starts, not once per clip. (A custom selector checks its own options.)"""
  json.dumps(dict(options))  # options that cannot be recorded in the plan
  from data_pipeline import codec

  codec.select_threads()  # a bad $OVE_SELECT_THREADS would fail every clip
  if selector:
    return

  # What select checks before it opens the video: the preset's name, decode_thread, the grid and
  # every option with the preset applied.
  from data_pipeline.codec.selection import check_arguments

  check_arguments(**options)


def digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def make_plan(
  clips: Sequence[Clip],
  shards: Sequence[Sequence[Clip]],
  name: str,
  split: str,
  shuffle_seed: int | None,
  common: dict,
) -> dict:
  """plan.json: what was asked, with a digest per shard (its clips and the settings)."""
  shard_digests = [
    digest({'clips': [[c.path, c.labels] for c in shard], **common}) for shard in shards
  ]
  plan = {
    'version': PLAN_VERSION,
    'name': name,
    'split': split,
    'num_shards': len(shards),
    'num_clips': len(clips),
    'shuffle_seed': shuffle_seed,
    **common,
    'inputs_digest': digest([[c.path, c.labels] for c in clips]),
    'shard_digests': shard_digests,
  }
  # Compared with the plan.json of an earlier run, so in its JSON form (tuples become lists).
  return json.loads(json.dumps(plan))


def plan_changes(old: dict, new: dict) -> list[str]:
  """What differs between two plans, in words (the digests change with everything else, so the
  cause is named instead)."""
  changed = []
  for key in sorted(set(new) | set(old)):
    a, b = old.get(key), new.get(key)
    if key == 'shard_digests' or a == b:
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      changed += [
        f'{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}'
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
      ]
    elif key == 'inputs_digest':
      changed.append('the input list')
    else:
      changed.append(f'{key}: {a!r} -> {b!r}')
  return changed


def clear_outputs(out_dir: str, plan: dict) -> None:
  """Removes what a previous plan wrote (its shards, markers and metadata), nothing else."""
  for i in range(plan['num_shards']):
    for path in [
      shard_path(out_dir, plan, i),
      *paths.glob(glob.escape(shard_path(out_dir, plan, i)) + '.tmp*'),
    ]:
      paths.remove(path)
  paths.rmtree(paths.join(out_dir, PROGRESS_DIR))
  for name in (PLAN, FAILURES, SUMMARY, *TFDS_FILES):
    paths.remove(paths.join(out_dir, name))


def finished_markers(
  out_dir: str, plan: dict, verify: bool = False, count: bool = True, trusted=()
) -> dict[int, dict]:
  """The markers of the plan's finished shards: marker of this plan's shard, and its file there
  (with `verify`, also of the size and, with `count`, the record count the marker says, except
  for the shards in `trusted`: ones the caller has just read back or written)."""
  out = {}
  for i, shard_digest in enumerate(plan['shard_digests']):
    marker = fileio.read_json(marker_path(out_dir, i))
    path = shard_path(out_dir, plan, i)
    if marker is None or marker.get('digest') != shard_digest or not paths.exists(path):
      continue
    if verify and i not in trusted and not intact(path, marker, count):
      continue
    out[i] = marker
  return out


def intact(path: str, marker: dict, count: bool = True) -> bool:
  """Whether a shard file has the size and (with `count`) the record count its marker says
  (counting reads an object-store shard whole: runs check only the size there)."""
  if paths.getsize(path) != marker['num_bytes']:
    return False
  if not count:
    return True
  try:
    return count_records(path) == marker['num_records']
  except Exception:  # pylint: disable=broad-except  -- any reader error: not intact
    return False
