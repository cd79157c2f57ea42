"""Offline codec patch selection over a video corpus, written as sharded ArrayRecord files.

Selection reads every frame of a clip and exports motion vectors, so it is done once, offline,
and the training input reads only the kept patches' frames. `precompute` runs
`data_pipeline.codec.select` over a list of videos in a pool of processes and writes one record
(`data_pipeline.records`, video clip fields) per good clip. `tools/precompute_codec.py` is its
command line. The folder's layout and record formats, the writer and the readers are
`data_pipeline.shards`; the inputs and the shard plan are `data_pipeline.shard_plan`; one clip's
work is `data_pipeline.clip_work`; the worker processes are `data_pipeline.workers`.

Guarantees:
- Deterministic: the same input list and settings give the same clips in the same shards in the
  same order (inputs are shuffled with a fixed seed, then cut into balanced contiguous shards),
  byte for byte, on any machine and with any number of workers or tasks.
- Resumable: a shard is finished when its file and its progress marker exist; the file is
  fsynced and renamed from a unique temporary name before the marker is written, so a killed
  run leaves no half shard behind; re-running the same command skips finished shards and does
  the rest. A different plan in the same folder is refused.
- Bad clips never stop a run: their reason goes to the failure manifest as they happen. A clip
  that runs past `clip_timeout` or crashes its worker process (a segfault in a decoder, the
  out-of-memory killer) is a failure like any other, and a fresh worker takes over. Failures
  are not retried by a re-run unless asked (`retry_failures`). The one exception is a run whose
  first clips all fail with errors that are not VideoError, which means the options or the
  selector are wrong, not the videos.
- One writer: a run holds a lock on the folder (`data_pipeline.locks`); a second run on the same
  folder (or the same task of it) refuses, naming the pid and host of the first.
- Split over machines: task I of N (`task_index`, `num_tasks`: a SLURM array, a Kubernetes
  indexed job) writes shards I, I + N, I + 2N, ... of the one plan; the task that finds every
  shard finished writes the corpus's failure manifest, summary and TFDS metadata, and `check`
  says whether a folder is complete and which shards (of which task) are missing.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

from data_pipeline import fileio, locks, paths
from data_pipeline import shards as shard_format
from data_pipeline import workers as workers_lib
from data_pipeline.clip_work import (  # noqa: F401
  Clip,
  Done,
  Failed,
  Settings,
  init_worker,
  picture_type_codes,
  process_clip,
  resolve,
  selection_record,
)
from data_pipeline.codec.release import preset_record
from data_pipeline.shard_plan import (  # noqa: F401  (re-exported: the plan was this module's)
  VIDEO_EXTENSIONS,
  Aborted,
  PlanMismatch,
  abort_reason,
  check_hooks,
  check_options,
  clear_outputs,
  finished_markers,
  input_clips,
  intact,
  make_plan,
  num_shards_for,
  plan_changes,
  plan_shards,
  read_inputs,
  rolled_back,
  task_shards,
)
from data_pipeline.shards import (  # noqa: F401
  FAILURES,
  FORMATS,
  PLAN,
  PROGRESS_DIR,
  SUMMARY,
  TFDS_FILES,
  DecodedSource,
  ShardWriter,
  count_records,
  marker_path,
  read_plan,
  read_record,
  read_shard,
  shard_files,
  shard_name,
  shard_path,
  tfds_data_source,
  write_tfds_metadata,
)

# The name plans record for the default selection (codec.select, called directly).
DEFAULT_SELECTOR = 'data_pipeline.codec:select'
DEFAULT_NAME = 'ove_codec'
DEFAULT_SPLIT = 'train'


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def precompute(
  inputs,
  out_dir: str,
  *,
  options: Mapping[str, Any] | None = None,
  clips_per_shard: int = 1000,
  num_shards: int | None = None,
  shuffle_seed: int | None = 0,
  workers: int | None = None,
  inline_max_bytes: int = 1 << 20,
  store_scores: bool = False,
  name: str = DEFAULT_NAME,
  split: str = DEFAULT_SPLIT,
  record_format: str = 'records',
  selector: str | None = None,
  reader: str | None = None,
  overwrite: bool = False,
  progress: bool = True,
  max_shards: int | None = None,
  store_patches: bool = False,
  clip_timeout: float | None = None,
  task_index: int = 0,
  num_tasks: int = 1,
  retry_failures: bool = False,
) -> dict:
  """Runs (or resumes) the selection over `inputs` into `out_dir`; returns the summary.

  Args:
    inputs: a list file or folder (see `read_inputs`), or a sequence of `Clip`s / paths.
    out_dir: output folder; created if needed.
    options: keyword arguments of the selector (`num_frames`, `budget`, `resolution`,
      `patch_size`, `policy`, ...), JSON-serialisable.
    clips_per_shard / num_shards: shard size, or the shard count directly.
    shuffle_seed: seed of the write-time shuffle; None keeps the input order.
    workers: processes (default: the CPUs this process may use, `workers.usable_cpus`); 0 runs
      in this process (debugging: no time limit, and a crash stops the run).
    inline_max_bytes: files up to this size are stored in the record (`video`); 0: never.
    store_scores: also store the [T, Hp, Wp] score map (float16) in each record.
    name, split: dataset name and split (they name the shard files, TFDS style).
    record_format: 'records' or 'tfds' (see `data_pipeline.shards`).
    selector: 'module:function' used instead of codec.select (an alternative selection for
      ablations, such as 'data_pipeline.codec:select_random'); None: codec.select.
    reader: 'module:function' that turns a clip's name into what the selector reads (a local
      path or the file's bytes): for corpora on object storage or behind a custom loader.
      None: names are local paths.
    overwrite: delete an earlier run's outputs and start over (default: resume the same plan,
      refuse a different one).
    progress: show a tqdm progress bar.
    max_shards: stop after writing this many shards (a run in instalments; tests use it to
      simulate a killed run).
    store_patches: also store the selected patches' pixels (uint8 [K, 588], about 0.6 KB a
      patch) so that training reads them instead of decoding the video: the input pipeline then
      costs almost nothing per clip (codec mode only; the frame modes still decode).
    clip_timeout: seconds a clip may take in its worker before the worker is killed and the
      clip listed as failed (None: no limit; needs workers >= 1).
    task_index, num_tasks: this run is task I of N over one plan (see the module docstring).
    retry_failures: select again the clips that failed in earlier runs (default: a known
      failure is kept, not retried).
  """
  check_run_arguments(
    out_dir, name, split, record_format, clip_timeout, task_index, num_tasks, overwrite
  )
  clips = input_clips(inputs)
  options = dict(options or {})
  if selector == DEFAULT_SELECTOR:
    selector = None
  check_hooks(options, selector, reader)  # before any worker starts, not in every one
  if workers is None:
    workers = workers_lib.usable_cpus()
  shards = plan_shards(
    clips, num_shards or num_shards_for(len(clips), clips_per_shard), shuffle_seed
  )
  settings = Settings(
    options,
    int(inline_max_bytes),
    bool(store_scores),
    record_format,
    bool(store_patches),
    selector,
    reader,
  )
  common = {
    'selector': selector or DEFAULT_SELECTOR,
    'options': options,
    'inline_max_bytes': int(inline_max_bytes),
    'store_scores': bool(store_scores),
    'format': record_format,
  }
  # Only when set, so earlier runs' plans still match.
  if store_patches:
    common['store_patches'] = True
  if reader:
    common['reader'] = reader
  common.update(preset_record(options.get('preset')))  # what the preset meant when the run began
  plan = make_plan(clips, shards, name, split, shuffle_seed, common)
  return run_plan(
    out_dir,
    plan,
    shards,
    task_index,
    num_tasks,
    overwrite,
    retry_failures,
    lambda run: run.execute(settings, workers, clip_timeout, max_shards, progress),
  )


def check_run_arguments(
  out_dir: str,
  name: str,
  split: str,
  record_format: str,
  clip_timeout: float | None,
  task_index: int,
  num_tasks: int,
  overwrite: bool,
) -> None:
  """The checks of a run's arguments that need no input: before anything is read or written."""
  blocked = paths.not_a_folder(out_dir)
  if blocked:
    raise ValueError(f'OUT_DIR {out_dir}: {blocked}; give a new or existing one')
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise ValueError(f'dataset name {name!r}: use lower case letters, digits and _ (TFDS rule)')
  if not re.fullmatch(r'[a-z][a-z0-9_]*', split):
    raise ValueError(f'split {split!r}: use lower case letters, digits and _')
  if record_format not in FORMATS:
    raise ValueError(f'record format {record_format!r}: one of {FORMATS}')
  workers_lib.check_timeout(clip_timeout)
  task_shards(0, task_index, num_tasks)  # validates the task numbers
  if overwrite and num_tasks > 1:
    raise ValueError(
      "overwrite with num_tasks > 1: tasks would delete each other's shards; "
      'clear the folder once (a single --overwrite run, or rm) before the tasks'
    )


def run_plan(
  out_dir: str,
  plan: dict,
  shards: Sequence[Sequence[Clip]],
  task_index: int,
  num_tasks: int,
  overwrite: bool,
  retry_failures: bool,
  execute: Callable[[Run], dict],
) -> dict:
  """Runs `execute` on this task's `Run` of `plan`, holding the task's lock on `out_dir`: an
  earlier plan there is resumed when equal, cleared with `overwrite`, else refused. Shared by
  every precompute (videos here, images in `data_pipeline.image_precompute`). The task locks of
  an object store `out_dir` are local files at its `paths.local_folder` (objects cannot be
  locked): they keep two runs of one task on one machine apart, not on two."""
  paths.makedirs(out_dir)
  os.makedirs(paths.local_folder(out_dir), exist_ok=True)
  with locks.hold(
    paths.local_folder(out_dir),
    f'task-{task_index:05d}-of-{num_tasks:05d}',
    f'task {task_index} of {num_tasks}',
    conflicts=lambda other: not other.endswith(f'-of-{num_tasks:05d}'),
  ):
    old_plan = read_plan(out_dir)
    if old_plan is not None and overwrite:
      clear_outputs(out_dir, old_plan)
    elif old_plan is not None and old_plan != plan:
      changes = '; '.join(plan_changes(old_plan, plan))
      raise PlanMismatch(
        f'{out_dir} holds the output of a different run ({changes}); use a new '
        'folder, or overwrite=True / --overwrite to replace it'
      )
    paths.makedirs(paths.join(out_dir, PROGRESS_DIR))
    fileio.write_json(paths.join(out_dir, PLAN), plan)
    return execute(Run(out_dir, plan, shards, task_index, num_tasks, retry_failures))


class Run:
  """One run of one task over a plan: which shards to do, their known failures, the loop."""

  def __init__(
    self,
    out_dir: str,
    plan: dict,
    shards: Sequence[Sequence[Clip]],
    task_index: int,
    num_tasks: int,
    retry_failures: bool,
  ):
    self.out_dir, self.plan, self.shards = out_dir, plan, shards
    self.task = (task_index, num_tasks)
    mine = task_shards(len(shards), task_index, num_tasks)
    finished = finished_markers(out_dir, plan)
    # This task's finished shards are read back (size and record count; the size alone in an
    # object store, where counting downloads the shard): a file damaged since its marker was
    # written (cut short by a full disk, overwritten) is redone, not skipped.
    self.count = not paths.is_url(out_dir)
    self.damaged = [
      i
      for i in sorted(finished)
      if i in mine and not intact(shard_path(out_dir, plan, i), finished[i], self.count)
    ]
    for i in self.damaged:
      del finished[i]
    if retry_failures:
      finished = {i: m for i, m in finished.items() if not m['failures'] or i not in mine}
    self.markers = {i: m for i, m in finished.items() if i in mine}
    self.todo = [i for i in mine if i not in self.markers]
    self.skipped = len(self.markers)
    # Failures of unfinished shards recorded by a run that was killed: kept, not retried.
    todo = set(self.todo)
    self.known = (
      {}
      if retry_failures
      else {
        (e['shard'], e['file']): e['reason']
        for e in shard_format.read_journals(out_dir)
        if e.get('shard') in todo and 'file' in e and 'reason' in e
      }
    )
    self.journal = shard_format.journal_path(out_dir, task_index, num_tasks)
    # The journal restarts from the finished shards' failures and the known ones, so failures
    # of an unfinished shard are not listed twice; new ones are appended as they happen.
    listed = finished if num_tasks == 1 else self.markers
    entries = [e for i in sorted(listed) for e in listed[i]['failures']]
    entries += [{'file': f, 'reason': r, 'shard': s} for (s, f), r in sorted(self.known.items())]
    shard_format.write_failures(self.journal, entries)
    self.journal_start = os.path.getsize(self.journal)  # what an aborted run rolls back to
    self.written_now: list[int] = []  # the shards this run finished
    self.counts = {
      'processed': 0,
      'failed': 0,
      'unexpected': 0,
      'lost': 0,  # timed out or crashed their worker
      'written': 0,
      'known': 0,
      'select_seconds': 0.0,
    }

  def tasks(self, todo: Sequence[int]):
    """The clips the workers select: every clip of the shards to do, but known failures."""
    for i in todo:
      for clip in self.shards[i]:
        if (i, clip.path) not in self.known:
          yield clip

  def execute(
    self,
    settings: Settings,
    workers: int,
    clip_timeout: float | None,
    max_shards: int | None,
    progress: bool,
    work: Callable = process_clip,
    initializer: Callable = init_worker,
    unit: str = 'clip',
  ) -> dict:
    """Writes this task's shards to do; `work(clip)` (run in the workers after
    `initializer(settings, blas_threads)`) returns a `Done` or a `Failed` per input."""
    todo = self.todo[:max_shards]
    for i in todo:  # temporaries a killed run left; ours to remove, we hold the shard's lock
      for stale in paths.glob(glob.escape(shard_path(self.out_dir, self.plan, i)) + '.tmp*'):
        paths.remove(stale)
    start = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(
      total=sum(len(self.shards[i]) for i in todo),
      unit=unit,
      desc='precompute',
      disable=not progress,
      dynamic_ncols=True,
    )
    # One BLAS thread per worker: processes are the parallelism. The selection's matrix work
    # is small, and a second BLAS thread per worker made it 3.5x slower per clip on a busy
    # 2-core machine (1.1 s -> 3.9 s for a 64-frame clip).
    results = workers_lib.ordered_map(
      work,
      self.tasks(todo),
      workers,
      timeout=clip_timeout,
      initializer=initializer,
      initargs=(settings, 1 if workers else 0),
    )
    writer = None
    try:
      with open(self.journal, 'a', encoding='utf-8') as journal:
        for i in todo:
          writer = ShardWriter(shard_path(self.out_dir, self.plan, i))
          self.write_shard(i, writer, results, journal, bar)
          writer = None
    finally:
      bar.close()
      if writer is not None:
        writer.abandon()
      results.close()  # stops the worker processes
    return self.finish(time.perf_counter() - start, settings.record_format)

  def write_shard(self, i: int, writer: ShardWriter, results, journal, bar) -> None:
    shard_failures, kept, candidates, seconds = [], 0, 0, 0.0
    for clip in self.shards[i]:
      reason = self.known.get((i, clip.path))
      if reason is not None:
        self.counts['known'] += 1
        shard_failures.append({'file': clip.path, 'reason': reason, 'shard': i})
        bar.update(1)
        continue  # already in the journal
      result = next(results)
      self.counts['processed'] += 1
      if isinstance(result, Done):
        writer.write(result.data)
        kept += result.kept
        candidates += result.candidates
        seconds += result.seconds
      else:
        if isinstance(result, workers_lib.Lost):  # the worker timed out or died on this clip
          self.counts['lost'] += 1
          result = Failed(f'{clip.path}: {result.reason}', video_error=False)
        entry = {'file': clip.path, 'reason': result.reason, 'shard': i}
        shard_failures.append(entry)
        journal.write(json.dumps(entry) + '\n')
        journal.flush()
        self.counts['failed'] += 1
        self.counts['unexpected'] += not result.video_error
        c = self.counts
        reason = abort_reason(c['processed'], c['unexpected'], c['lost'], result.reason)
        if reason:
          journal.close()
          raise Aborted(f'{reason}; {self.roll_back()}')
      bar.update(1)
      bar.set_postfix(failed=self.counts['failed'], refresh=False)
    num_bytes = writer.commit()  # fsynced and renamed: the marker may name it now
    self.counts['select_seconds'] += seconds
    self.markers[i] = {
      'shard': i,
      'digest': self.plan['shard_digests'][i],
      'file': os.path.basename(writer.path),
      'num_records': writer.count,
      'num_bytes': num_bytes,
      'kept_patches': kept,
      'candidate_patches': candidates,
      'failures': shard_failures,
    }
    # The marker goes last: a shard file without its marker is redone on the next run.
    fileio.write_json(marker_path(self.out_dir, i), self.markers[i])
    self.counts['written'] += 1
    self.written_now.append(i)

  def roll_back(self) -> str:
    """Undoes an aborted run: every clip it processed failed for a reason the run's settings
    give (`Aborted`), so its shards (nothing but failures) and journal lines go. Where no shard
    of the plan is finished (by any task) the plan and this task's journal go too, so the
    command with other options or another selector is not refused as a different run. Returns
    the message's advice (`rolled_back`)."""
    for i in self.written_now:
      paths.remove(marker_path(self.out_dir, i))
      paths.remove(shard_path(self.out_dir, self.plan, i))
      del self.markers[i]
    cleared = not finished_markers(self.out_dir, self.plan)
    if cleared:  # the journal's known failures were recorded under this plan
      os.remove(self.journal)
      paths.remove(paths.join(self.out_dir, PLAN))
    else:
      with open(self.journal, 'r+', encoding='utf-8') as journal:
        journal.truncate(self.journal_start)
    single = ' (or, with a single task, --overwrite)' if self.task[1] == 1 else ''
    return rolled_back(cleared, f'a new folder{single}')

  def finish(self, seconds: float, record_format: str) -> dict:
    """Summaries: this task's (returned; summary.json of a single task), and once every shard
    is finished the corpus's (summary.json, with the final manifest and metadata)."""
    task_index, num_tasks = self.task
    all_markers = finished_markers(self.out_dir, self.plan)
    if len(all_markers) == self.plan['num_shards']:  # read every shard back before saying so
      # (this task's own were read back at the start or written by this run)
      all_markers = finished_markers(self.out_dir, self.plan, True, self.count, self.markers)
    complete = len(all_markers) == self.plan['num_shards']
    if complete:
      finalize(self.out_dir, self.plan, all_markers, record_format)

    def summary_of(markers: Mapping[int, dict]) -> dict:
      out = make_summary(self.out_dir, self.plan, markers, self.counts, self.skipped, seconds)
      out.update(
        complete=complete,
        task_index=task_index,
        num_tasks=num_tasks,
        shards_of_task=len(task_shards(self.plan['num_shards'], *self.task)),
        corpus_shards_finished=len(all_markers),
        shards_damaged=self.damaged,
        shards_damaged_redone=[i for i in self.damaged if i in self.written_now],
        failure_manifest=paths.join(self.out_dir, FAILURES) if complete else self.journal,
      )
      return out

    summary = summary_of(all_markers if num_tasks == 1 else self.markers)
    if num_tasks > 1:
      fileio.write_json(
        paths.join(
          self.out_dir, PROGRESS_DIR, f'summary-task-{task_index:05d}-of-{num_tasks:05d}.json'
        ),
        summary,
      )
    if num_tasks == 1 or complete:
      fileio.write_json(
        paths.join(self.out_dir, SUMMARY), summary if num_tasks == 1 else summary_of(all_markers)
      )
    return summary


def finalize(out_dir: str, plan: dict, markers: Mapping[int, dict], record_format: str) -> None:
  """What a complete corpus gets once: the failure manifest in shard order (whatever order the
  runs went in) and, for format 'tfds', the TFDS metadata."""
  shard_format.write_failures(
    paths.join(out_dir, FAILURES), [e for i in sorted(markers) for e in markers[i]['failures']]
  )
  if record_format == 'tfds':
    write_tfds_metadata(
      out_dir, plan['name'], plan['split'], [markers[i] for i in range(plan['num_shards'])]
    )


def make_summary(out_dir, plan, markers, counts, skipped, seconds) -> dict:
  """Figures of a run: over `markers` (the corpus's finished shards, or one task's) and this
  run's `counts`."""
  records_total = sum(m['num_records'] for m in markers.values())
  clips_done = sum(m['num_records'] + len(m['failures']) for m in markers.values())
  kept = sum(m['kept_patches'] for m in markers.values())
  candidates = sum(m['candidate_patches'] for m in markers.values())
  selected = counts['processed'] - counts['failed']
  return {
    'out_dir': paths.absolute(out_dir),
    'shards': plan['num_shards'],
    'shards_finished': len(markers),
    'shards_written': counts['written'],
    'shards_skipped': skipped,
    'clips': plan['num_clips'],
    'clips_processed': counts['processed'],
    'records': records_total,
    'failures': sum(len(m['failures']) for m in markers.values()),
    'failures_this_run': counts['failed'],
    'failures_known': counts['known'],
    # Over the finished shards: the share of clips that became records, and the share of
    # candidate patches the selection kept.
    'clips_kept_fraction': records_total / clips_done if clips_done else 0.0,
    'patches_kept_fraction': kept / candidates if candidates else 0.0,
    'seconds': round(seconds, 3),
    'clips_per_second': counts['processed'] / seconds if seconds > 0 else 0.0,
    'select_seconds_per_clip': counts['select_seconds'] / selected if selected else 0.0,
  }


def check(out_dir: str) -> dict:
  """Whether `out_dir` holds its whole plan: every shard finished, its file there with the size
  and record count its marker says. Finalises a complete corpus (manifest, TFDS metadata) and
  returns {'complete', 'shards', 'finished', 'missing': [shard indices], 'records', 'failures'}.
  """
  if not paths.isdir(out_dir):
    raise FileNotFoundError(f'{out_dir}: no such folder (give the OUT_DIR a run wrote)')
  plan = read_plan(out_dir)
  if plan is None:
    raise FileNotFoundError(f'{out_dir}: no {PLAN}; not a precompute output folder')
  markers = finished_markers(out_dir, plan, verify=True)
  missing = [i for i in range(plan['num_shards']) if i not in markers]
  complete = not missing
  if complete:
    finalize(out_dir, plan, markers, plan['format'])
  return {
    'out_dir': paths.absolute(out_dir),
    'complete': complete,
    'shards': plan['num_shards'],
    'finished': len(markers),
    'missing': missing,
    'records': sum(m['num_records'] for m in markers.values()),
    'failures': sum(len(m['failures']) for m in markers.values()),
  }
