"""Offline codec patch selection over a video corpus, written as sharded ArrayRecord files.

Selection reads every frame of a clip and exports motion vectors, so it is done once, offline,
and the training input reads only the kept patches' frames. `precompute` runs
`data_pipeline.codec.select` over a list of videos in a pool of processes and writes one record
(`data_pipeline.records`, video clip fields) per good clip. `tools/precompute_codec.py` is its
command line.

Layout of an output directory:
  {name}-{split}.array_record-{i:05d}-of-{n:05d}   shard i: one records.encode(...) per good clip
  progress/shard-{i:05d}.json                     shard i is finished (written after its rename)
  plan.json                                       what was asked: inputs digest, options, shards
  failures.jsonl                                  {"file", "reason", "shard"} per clip not kept
  summary.json                                    figures of the last run
  dataset_info.json, features.json               TFDS metadata (format 'tfds', once complete)

Guarantees:
- Deterministic: the same input list and settings give the same clips in the same shards in the
  same order (inputs are shuffled with a fixed seed, then cut into balanced contiguous shards).
- Resumable: a shard is finished when its file and its progress marker exist, and both are
  written by rename, so a killed run leaves no half shard behind; re-running the same command
  skips finished shards and does the rest. A different plan in the same folder is refused.
- Bad clips never stop a run: their reason goes to the failure manifest as they happen. The one
  exception is a run whose first clips all fail with errors that are not VideoError, which
  means the options or the selector are wrong, not the videos.

Two record formats, the same content:
- 'records' (default): each ArrayRecord entry is `records.encode` bytes, what
  `data_pipeline.sources` reads from shard globs ('OUT_DIR/ove_codec-train.array_record-*') and
  what grain's ArrayRecordDataSource returns.
- 'tfds': each entry is a tf.train.Example holding those bytes in one feature `record`, and the
  folder gets TFDS metadata, so it is a TFDS ArrayRecord dataset read without TensorFlow:
  `tfds.builder_from_directory(out_dir).as_data_source(split)`, `tfds.data_source(name,
  data_dir=D)` when out_dir is D/name/version, or the 'tfds:' spec of `data_pipeline.sources`.
  (A TFDS dataset of raw `records.encode` entries would need every reader to pass
  deserialize_method=RAW_BYTES; plain TFDS readers would fail on it, so 'records' folders carry
  no TFDS metadata.)
`read_record`, `read_shard` and `tfds_data_source` read either format back as record dicts.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import time
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from data_pipeline import fileio, records, transforms
from data_pipeline.video import VideoError

VIDEO_EXTENSIONS = ('.mp4', '.m4v', '.mkv', '.webm', '.avi', '.mov', '.mpg', '.mpeg', '.ts',
                    '.flv', '.3gp', '.wmv', '.h264', '.264', '.hevc')
DEFAULT_SELECTOR = 'data_pipeline.codec:select'
DEFAULT_NAME = 'ove_codec'
DEFAULT_SPLIT = 'train'
FORMATS = ('records', 'tfds')
# A run whose first this-many clips all fail with errors other than VideoError is stopped: the
# options or the selector are wrong, and a million-line failure manifest helps nobody.
ABORT_WINDOW = 16

_PROGRESS_DIR = 'progress'
_FAILURES = 'failures.jsonl'
_PLAN = 'plan.json'
_SUMMARY = 'summary.json'
_PLAN_VERSION = 1
# Arguments of codec.select that are not codec.Options fields.
_GRID_OPTIONS = ('num_frames', 'budget', 'resolution', 'patch_size')


class PlanMismatch(RuntimeError):
  """The output folder holds shards of a different run (other inputs, options or sharding)."""


@dataclasses.dataclass(frozen=True)
class Clip:
  """One input video: where it is and, optionally, its label ids."""
  path: str
  labels: Optional[tuple[int, ...]] = None


# ---------------------------------------------------------------------------------------------
# Inputs and shard plan
# ---------------------------------------------------------------------------------------------

def read_inputs(source: str, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[Clip]:
  """The clips named by a list file or found under a folder.

  List file: one path per line, optionally a tab then label ids separated by commas or spaces;
  blank lines and lines starting with '#' are skipped; relative paths are relative to the list
  file's folder. Folder: every file below it (recursively) whose extension is in `extensions`,
  in sorted order. Paths are made absolute so a record names its source wherever it is read.
  """
  source = os.fspath(source)
  if os.path.isdir(source):
    found = []
    wanted = tuple(e.lower() for e in extensions)
    for root, dirs, files in os.walk(source):
      dirs.sort()  # os.walk's order is the file system's; sorting makes the list reproducible
      for name in sorted(files):
        if name.lower().endswith(wanted):
          found.append(Clip(os.path.abspath(os.path.join(root, name))))
    return found
  if not os.path.isfile(source):
    raise FileNotFoundError(f'{source}: neither a video list file nor a folder')
  base = os.path.dirname(os.path.abspath(source))
  clips = []
  with open(source, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
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
          raise ValueError(f'{source}:{number}: label ids must be integers, got '
                           f'{label_text.strip()!r}') from None
      clips.append(Clip(os.path.normpath(os.path.join(base, path.strip())), labels))
  return clips


def num_shards_for(num_clips: int, clips_per_shard: int) -> int:
  return max(1, math.ceil(num_clips / max(1, clips_per_shard)))


def plan_shards(clips: Sequence[Clip], num_shards: int, shuffle_seed: Optional[int] = 0
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
  return [[clips[j] for j in order[bounds[i]:bounds[i + 1]]] for i in range(num_shards)]


def shard_name(name: str, split: str, index: int, num_shards: int) -> str:
  # TFDS's default file template, so the folder doubles as a TFDS dataset.
  return f'{name}-{split}.array_record-{index:05d}-of-{num_shards:05d}'


def shard_files(out_dir: str) -> list[str]:
  """The shard paths of a finished or partial output folder, in shard order (finished ones)."""
  plan = fileio.read_json(os.path.join(out_dir, _PLAN))
  if plan is None:
    raise FileNotFoundError(f'{out_dir}: no {_PLAN}; not a precompute output folder')
  paths = []
  for i in range(plan['num_shards']):
    path = os.path.join(out_dir, shard_name(plan['name'], plan['split'], i, plan['num_shards']))
    if os.path.exists(_marker_path(out_dir, i)) and os.path.exists(path):
      paths.append(path)
  return paths


def read_plan(out_dir: str) -> Optional[dict]:
  return fileio.read_json(os.path.join(out_dir, _PLAN))


# ---------------------------------------------------------------------------------------------
# One clip -> one record (runs in the worker processes)
# ---------------------------------------------------------------------------------------------

def picture_type_codes(picture_types) -> np.ndarray:
  """uint8 codes of records.PICTURE_TYPES from ints or from 'I'/'P'/'B' strings."""
  values = list(picture_types)
  if values and isinstance(values[0], (str, bytes, np.str_, np.bytes_)):
    codes = []
    for v in values:
      v = v.decode() if isinstance(v, (bytes, np.bytes_)) else str(v)
      v = v.rsplit('.', 1)[-1][:1].upper()  # 'I', 'PictureType.I' -> 'I'
      codes.append(records.PICTURE_TYPES.index(v) if v in records.PICTURE_TYPES else 0)
    return np.asarray(codes, np.uint8)
  return np.asarray(values, np.uint8).reshape(-1)


def _generic_fields(selection) -> dict[str, Any]:
  """Record fields of a selector without `record_fields()`: the contract's arrays, plus the
  numbers of a `stats` mapping as `stats_*`."""
  fields = {'frame_ids': np.asarray(selection.frame_ids, np.int32).reshape(-1),
            'positions': np.asarray(selection.positions),
            'picture_types': picture_type_codes(selection.picture_types)}
  stats = getattr(selection, 'stats', None)
  for key, value in (stats.items() if isinstance(stats, Mapping) else ()):
    if isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)):
      fields[f'stats_{key}'] = value.item() if isinstance(value, np.generic) else value
  return fields


def selection_record(selection, source: str, labels: Optional[Sequence[int]] = None,
                     store_scores: bool = False) -> dict[str, Any]:
  """The video clip record (records.py fields) of one selection."""
  # The codec's Selection says itself which fields and statistics a record holds.
  if hasattr(selection, 'record_fields'):
    record = dict(selection.record_fields())
  else:
    record = _generic_fields(selection)
  positions = np.asarray(record['positions'])
  if positions.ndim != 2 or positions.shape[1] != 3:
    raise ValueError(f'{source}: selection positions have shape {positions.shape}, not [K, 3]')
  if positions.size and (positions.min() < 0 or positions.max() > np.iinfo(np.int16).max):
    raise ValueError(f'{source}: selection positions out of the int16 range')
  record['positions'] = positions.astype(np.int16)
  record['source'] = source
  if labels is not None:
    record['labels'] = np.asarray(labels, np.int32).reshape(-1)
  scores = np.asarray(selection.scores)
  if 'stats_kept_fraction' not in record and scores.size:
    record['stats_kept_fraction'] = float(len(positions) / scores.size)
  if store_scores:
    # float16 halves the size; the map is for inspection, not for training.
    record['scores'] = scores.astype(np.float16)
  return record


@dataclasses.dataclass(frozen=True)
class _Settings:
  selector: str
  options: dict
  inline_max_bytes: int
  store_scores: bool
  record_format: str
  store_patches: bool = False


@dataclasses.dataclass
class _Done:
  data: bytes
  kept: int
  candidates: int
  seconds: float


@dataclasses.dataclass
class _Failed:
  reason: str
  video_error: bool  # a bad input (expected), as opposed to a bug or wrong options


_worker_settings: Optional[_Settings] = None
_selectors: dict[str, Callable] = {}


_blas_limits = None  # the worker's BLAS thread limit, kept alive for the process's life


def _init_worker(settings: _Settings, blas_threads: int = 0):
  global _worker_settings, _blas_limits
  _worker_settings = settings
  if blas_threads:
    # Each worker's BLAS would start a thread per core: N workers x cores threads on `cores`
    # cores made 2 workers slower than 1 on a 2-core machine.
    import threadpoolctl
    _blas_limits = threadpoolctl.threadpool_limits(blas_threads)


def resolve_selector(spec: str) -> Callable:
  """'package.module:function' -> the function (imported once per process)."""
  if spec not in _selectors:
    module, _, attr = spec.partition(':')
    if not attr:
      raise ValueError(f'selector {spec!r} must look like "package.module:function"')
    _selectors[spec] = getattr(importlib.import_module(module), attr)
  return _selectors[spec]


def _reason(path: str, error: BaseException) -> str:
  text = f'{type(error).__name__}: {error}'
  return text if path in text else f'{path}: {text}'


def _process(clip: Clip):
  """Select one clip and encode its record; every error becomes a _Failed naming the file."""
  settings = _worker_settings
  start = time.perf_counter()
  try:
    select = resolve_selector(settings.selector)
    # The path, not the bytes: the selector's errors then name the file.
    selection = select(clip.path, **settings.options)
    record = selection_record(selection, clip.path, clip.labels, settings.store_scores)
    if settings.store_patches:
      record['patches'] = transforms.codec_patches(clip.path, record['frame_ids'],
                                                   record['positions'])
    if settings.inline_max_bytes > 0 and os.path.getsize(clip.path) <= settings.inline_max_bytes:
      with open(clip.path, 'rb') as f:
        record['video'] = f.read()
    data = records.encode(record)
    if settings.record_format == 'tfds':
      data = _tfds_features().serialize_example({'record': data})
  except Exception as e:  # pylint: disable=broad-except  -- one bad clip must not stop the run
    return _Failed(_reason(clip.path, e), isinstance(e, VideoError))
  return _Done(data, kept=len(record['positions']),
               candidates=int(np.asarray(selection.scores).size),
               seconds=time.perf_counter() - start)


def _ordered_map(fn: Callable, items: Iterable, workers: int, settings: _Settings) -> Iterator:
  """fn over items in order, in `workers` spawned processes (0: in this process).

  A bounded window of submitted tasks keeps memory flat on huge lists while keeping every
  worker busy; results are consumed in input order so shards come out deterministic.
  """
  if workers <= 0:
    _init_worker(settings)
    for item in items:
      yield fn(item)
    return
  # spawn, not fork: the parent may hold threads (tqdm, JAX in a notebook) that fork would copy.
  pool = futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn'),
                                     initializer=_init_worker,
                                     initargs=(settings, max(1, (os.cpu_count() or 1) // workers)))
  try:
    iterator = iter(items)
    window = collections.deque(pool.submit(fn, item)
                               for item in itertools.islice(iterator, 4 * workers))
    while window:
      try:
        result = window.popleft().result()
      except BrokenProcessPool as e:
        raise RuntimeError(
            'a worker process died (a crash inside FFmpeg, out of memory, or a calling script '
            "without an `if __name__ == '__main__':` guard); finished shards are kept, run the "
            'same command again to resume') from e
      for item in itertools.islice(iterator, 1):
        window.append(pool.submit(fn, item))
      yield result
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]




def _marker_path(out_dir: str, index: int) -> str:
  return os.path.join(out_dir, _PROGRESS_DIR, f'shard-{index:05d}.json')


def _clear_outputs(out_dir: str, plan: dict) -> None:
  """Removes what a previous plan wrote (its shards, markers and metadata), nothing else."""
  for i in range(plan['num_shards']):
    path = os.path.join(out_dir, shard_name(plan['name'], plan['split'], i, plan['num_shards']))
    if os.path.exists(path):
      os.remove(path)
  fileio.remove_stale_temporaries(out_dir)
  shutil.rmtree(os.path.join(out_dir, _PROGRESS_DIR), ignore_errors=True)
  for name in (_PLAN, _FAILURES, _SUMMARY, 'dataset_info.json', 'features.json'):
    if os.path.exists(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))


class ShardWriter:
  """One shard written to a temporary file, renamed into place when complete."""

  def __init__(self, path: str):
    from array_record.python.array_record_module import ArrayRecordWriter
    self.path, self.tmp = path, fileio.temp_name(path)
    # group_size:1 is what grain and TFDS want for fast random access.
    self._writer = ArrayRecordWriter(self.tmp, 'group_size:1')
    self.count = 0

  def write(self, data: bytes):
    self._writer.write(data)
    self.count += 1

  def commit(self) -> int:
    self._writer.close()
    self._writer = None
    fileio.commit(self.tmp, self.path)
    return os.path.getsize(self.path)

  def abandon(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if os.path.exists(self.tmp):
      os.remove(self.tmp)


def precompute(inputs, out_dir: str, *, options: Optional[Mapping[str, Any]] = None,
               clips_per_shard: int = 1000, num_shards: Optional[int] = None,
               shuffle_seed: Optional[int] = 0, workers: Optional[int] = None,
               inline_max_bytes: int = 1 << 20, store_scores: bool = False,
               name: str = DEFAULT_NAME, split: str = DEFAULT_SPLIT,
               record_format: str = 'records', selector: str = DEFAULT_SELECTOR,
               overwrite: bool = False, progress: bool = True, max_shards: Optional[int] = None,
               store_patches: bool = False) -> dict:
  """Runs (or resumes) the selection over `inputs` into `out_dir`; returns the summary.

  Args:
    inputs: a list file or folder (see `read_inputs`), or a sequence of `Clip`s / paths.
    out_dir: output folder; created if needed.
    options: keyword arguments of the selector (`num_frames`, `budget`, `resolution`,
      `patch_size`, `policy`, ...), JSON-serialisable.
    clips_per_shard / num_shards: shard size, or the shard count directly.
    shuffle_seed: seed of the write-time shuffle; None keeps the input order.
    workers: processes (default: all CPUs); 0 runs in this process (debugging).
    inline_max_bytes: files up to this size are stored in the record (`video`); 0: never.
    store_scores: also store the [T, Hp, Wp] score map (float16) in each record.
    name, split: dataset name and split (they name the shard files, TFDS style).
    record_format: 'records' or 'tfds' (see the module docstring).
    selector: 'module:function' of the selection (an alternative selection for ablations).
    overwrite: delete an earlier run's outputs and start over (default: resume the same plan,
      refuse a different one).
    progress: show a tqdm progress bar.
    max_shards: stop after writing this many shards (a run in instalments; tests use it to
      simulate a killed run).
    store_patches: also store the selected patches' pixels (uint8 [K, 588], about 0.6 KB a
      patch) so that training reads them instead of decoding the video: the input pipeline then
      costs almost nothing per clip (codec mode only; the frame modes still decode).
  """
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise ValueError(f'dataset name {name!r}: use lower case letters, digits and _ (TFDS rule)')
  if not re.fullmatch(r'[a-z][a-z0-9_]*', split):
    raise ValueError(f'split {split!r}: use lower case letters, digits and _')
  if record_format not in FORMATS:
    raise ValueError(f'record format {record_format!r}: one of {FORMATS}')
  if isinstance(inputs, (str, os.PathLike)):
    clips = read_inputs(inputs)
  else:
    clips = [c if isinstance(c, Clip) else Clip(os.path.abspath(os.fspath(c))) for c in inputs]
  options = dict(options or {})
  json.dumps(options)  # fail now, not in a worker, on options that cannot be recorded
  if selector == DEFAULT_SELECTOR:
    # Unknown names and bad values fail here, before a pool starts, not once per clip.
    from data_pipeline.codec import Options
    Options.from_kwargs({k: v for k, v in options.items() if k not in _GRID_OPTIONS})
  if workers is None:
    workers = os.cpu_count() or 1
  shards = plan_shards(clips, num_shards or num_shards_for(len(clips), clips_per_shard),
                       shuffle_seed)
  settings = _Settings(selector, options, int(inline_max_bytes), bool(store_scores),
                       record_format, bool(store_patches))
  common = {'selector': selector, 'options': options, 'inline_max_bytes': int(inline_max_bytes),
            'store_scores': bool(store_scores), 'format': record_format}
  if store_patches:  # only when set, so earlier runs' plans still match
    common['store_patches'] = True
  shard_digests = [_digest({'clips': [[c.path, c.labels] for c in shard], **common})
                   for shard in shards]
  plan = {'version': _PLAN_VERSION, 'name': name, 'split': split, 'num_shards': len(shards),
          'num_clips': len(clips), 'shuffle_seed': shuffle_seed, **common,
          'inputs_digest': _digest([[c.path, c.labels] for c in clips]),
          'shard_digests': shard_digests}
  # Compared with the plan.json of an earlier run, so in its JSON form (tuples become lists).
  plan = json.loads(json.dumps(plan))

  os.makedirs(out_dir, exist_ok=True)
  old_plan = read_plan(out_dir)
  if old_plan is not None and overwrite:
    _clear_outputs(out_dir, old_plan)
  elif old_plan is not None and old_plan != plan:
    changed = []
    for key in sorted(set(plan) | set(old_plan)):
      a, b = old_plan.get(key), plan.get(key)
      if key == 'shard_digests' or a == b:
        continue  # the digests change with everything else; name the cause instead
      if isinstance(a, dict) and isinstance(b, dict):
        changed += [f'{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
      elif key == 'inputs_digest':
        changed.append('the input list')
      else:
        changed.append(f'{key}: {a!r} -> {b!r}')
    raise PlanMismatch(
        f'{out_dir} holds the output of a different run ({"; ".join(changed)}); '
        'use a new folder, or overwrite=True / --overwrite to replace it')
  os.makedirs(os.path.join(out_dir, _PROGRESS_DIR), exist_ok=True)
  fileio.write_json(os.path.join(out_dir, _PLAN), plan)

  paths = [os.path.join(out_dir, shard_name(name, split, i, len(shards)))
           for i in range(len(shards))]
  markers: dict[int, dict] = {}
  for i, digest in enumerate(shard_digests):
    marker = fileio.read_json(_marker_path(out_dir, i))
    if marker is not None and marker.get('digest') == digest and os.path.exists(paths[i]):
      markers[i] = marker
  skipped = len(markers)
  todo = [i for i in range(len(shards)) if i not in markers][:max_shards]

  # The manifest restarts from the finished shards' failures, so failures of a killed run's
  # unfinished shard are not listed twice; new ones are appended (and flushed) as they happen.
  failures_path = os.path.join(out_dir, _FAILURES)
  _write_failures(failures_path, markers)
  run = {'processed': 0, 'failed': 0, 'unexpected': 0, 'written': 0, 'select_seconds': 0.0}
  start = time.perf_counter()
  from tqdm import tqdm
  bar = tqdm(total=sum(len(shards[i]) for i in todo), unit='clip', desc='precompute',
             disable=not progress, dynamic_ncols=True)
  tasks = (clip for i in todo for clip in shards[i])
  results = _ordered_map(_process, tasks, workers, settings)
  writer = None
  try:
    with open(failures_path, 'a', encoding='utf-8') as failures_file:
      for i in todo:
        writer = ShardWriter(paths[i])
        shard_failures, kept, candidates = [], 0, 0
        for clip in shards[i]:
          result = next(results)
          run['processed'] += 1
          if isinstance(result, _Done):
            writer.write(result.data)
            kept += result.kept
            candidates += result.candidates
            run['select_seconds'] += result.seconds
          else:
            entry = {'file': clip.path, 'reason': result.reason, 'shard': i}
            shard_failures.append(entry)
            failures_file.write(json.dumps(entry) + '\n')
            failures_file.flush()
            run['failed'] += 1
            run['unexpected'] += not result.video_error
            if run['processed'] == run['unexpected'] == ABORT_WINDOW:
              raise RuntimeError(
                  f'the first {ABORT_WINDOW} clips all failed with errors that are not '
                  f'VideoError, e.g. {result.reason!r}; check the options and the selector '
                  f'(failures in {failures_path})')
          bar.update(1)
          bar.set_postfix(failed=run['failed'], refresh=False)
        num_bytes = writer.commit()
        writer = None
        markers[i] = {'shard': i, 'digest': shard_digests[i], 'file': os.path.basename(paths[i]),
                      'num_records': len(shards[i]) - len(shard_failures),
                      'num_bytes': num_bytes, 'kept_patches': kept,
                      'candidate_patches': candidates,
                      'failures': shard_failures}
        # The marker goes last: a shard file without its marker is redone on the next run.
        fileio.write_json(_marker_path(out_dir, i), markers[i])
        run['written'] += 1
  finally:
    bar.close()
    if writer is not None:
      writer.abandon()
    results.close()  # stops the worker pool

  seconds = time.perf_counter() - start
  complete = len(markers) == len(shards)
  if complete:
    _write_failures(failures_path, markers)  # shard order, whatever order the runs went in
    if record_format == 'tfds':
      write_tfds_metadata(out_dir, name, split, [markers[i] for i in range(len(shards))])
  summary = _summary(out_dir, plan, markers, run, skipped, seconds, complete, failures_path)
  fileio.write_json(os.path.join(out_dir, _SUMMARY), summary)
  return summary


def _write_failures(path: str, markers: Mapping[int, dict]) -> None:
  fileio.write_atomic(path, ''.join(json.dumps(entry) + '\n' for i in sorted(markers)
                                    for entry in markers[i]['failures']))


def _summary(out_dir, plan, markers, run, skipped, seconds, complete, failures_path) -> dict:
  records_total = sum(m['num_records'] for m in markers.values())
  clips_done = sum(m['num_records'] + len(m['failures']) for m in markers.values())
  kept = sum(m['kept_patches'] for m in markers.values())
  candidates = sum(m['candidate_patches'] for m in markers.values())
  return {
      'out_dir': os.path.abspath(out_dir),
      'complete': complete,
      'shards': plan['num_shards'],
      'shards_finished': len(markers),
      'shards_written': run['written'],
      'shards_skipped': skipped,
      'clips': plan['num_clips'],
      'clips_processed': run['processed'],
      'records': records_total,
      'failures': sum(len(m['failures']) for m in markers.values()),
      'failures_this_run': run['failed'],
      # Over the finished shards: the share of clips that became records, and the share of
      # candidate patches the selection kept.
      'clips_kept_fraction': records_total / clips_done if clips_done else 0.0,
      'patches_kept_fraction': kept / candidates if candidates else 0.0,
      'seconds': round(seconds, 3),
      'clips_per_second': run['processed'] / seconds if seconds > 0 else 0.0,
      'select_seconds_per_clip': (run['select_seconds'] / (run['processed'] - run['failed'])
                                  if run['processed'] > run['failed'] else 0.0),
      'failure_manifest': failures_path,
  }


# ---------------------------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------------------------

_features = None


def _tfds_features():
  """The one-feature TFDS schema of format 'tfds': the record's bytes."""
  global _features
  if _features is None:
    import tensorflow_datasets as tfds  # slow to import; only the 'tfds' format needs it
    _features = tfds.features.FeaturesDict(
        {'record': tfds.features.Tensor(shape=(), dtype=np.object_)})
  return _features


def write_tfds_metadata(out_dir: str, name: str, split: str, markers: Sequence[dict]) -> None:
  """dataset_info.json and features.json describing the shards, for TFDS's folder loader."""
  import tensorflow_datasets as tfds
  template = tfds.core.ShardedFileTemplate(data_dir=out_dir, dataset_name=name, split=split,
                                           filetype_suffix='array_record')
  split_info = tfds.core.SplitInfo(name=split, shard_lengths=[m['num_records'] for m in markers],
                                   num_bytes=sum(m['num_bytes'] for m in markers),
                                   filename_template=template)
  base = os.path.basename(os.path.normpath(out_dir))
  version = base if tfds.core.Version.is_valid(base) else '1.0.0'
  tfds.folder_dataset.write_metadata(
      data_dir=out_dir, features=_tfds_features(), split_infos=[split_info], version=version,
      check_data=False,
      description=('OneVision-Encoder codec patch selections (data_pipeline.precompute): one '
                   'video clip per example; the feature `record` holds '
                   'data_pipeline.records.encode bytes (frame ids, positions, picture types, '
                   'labels, source, stats_*), decoded by data_pipeline.records.decode.'))


class DecodedSource:
  """Random access to record dicts over a TFDS source of format 'tfds'."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> dict:
    return records.decode(self._source[index]['record'])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    return [records.decode(ex['record']) for ex in self._source.__getitems__(list(indices))]


def tfds_data_source(out_dir: str, split: str = DEFAULT_SPLIT) -> DecodedSource:
  """The records of a 'tfds'-format output folder through TFDS, decoded."""
  plan = read_plan(out_dir)
  if plan is not None and plan['format'] != 'tfds':
    raise ValueError(f'{out_dir} was written in format {plan["format"]!r}, not as a TFDS '
                     'dataset; read its shards with data_pipeline.sources or read_shard')
  import tensorflow_datasets as tfds
  return DecodedSource(tfds.builder_from_directory(out_dir).as_data_source(split))


def _shard_format(path: str) -> str:
  plan = read_plan(os.path.dirname(os.path.abspath(path)))
  return plan['format'] if plan else 'records'


def _decode_entry(data: bytes, record_format: str) -> dict:
  if record_format == 'tfds':
    data = _tfds_features().deserialize_example_np(data)['record']
  return records.decode(data)


def read_record(path: str, index: int) -> dict:
  """Record `index` of one shard, decoded (either format; see the run's plan.json)."""
  from array_record.python.array_record_data_source import ArrayRecordDataSource
  with ArrayRecordDataSource([path]) as source:
    if not 0 <= index < len(source):
      raise IndexError(f'{path}: record {index} out of range (the shard has {len(source)})')
    return _decode_entry(source[index], _shard_format(path))


def read_shard(path: str) -> list[dict]:
  """Every record of one shard, decoded (for tools and tests; training reads through grain)."""
  from array_record.python.array_record_data_source import ArrayRecordDataSource
  record_format = _shard_format(path)
  with ArrayRecordDataSource([path]) as source:
    return [_decode_entry(source[i], record_format) for i in range(len(source))]
