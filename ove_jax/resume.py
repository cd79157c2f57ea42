"""Where a training process starts: its workdir's last checkpoint, or a fresh (warm-started) state.

A restart in the same workdir resumes from the last committed step: parameters, optimizer state,
step and the input position, onto whatever mesh the config now asks for. With the process count
it was saved with, every process takes back its own input position and the resumed run repeats
the uninterrupted one exactly. With another process count (more or fewer hosts after a
preemption) the state is the same, and the input position is re-derived from the global number
of records the old processes had read, split over the new ones (`pipeline.state_after`): the run
goes on over the same records in the same global order, but grouped into other batches, so its
losses do not repeat the uninterrupted run's; a warning says so.

Config changes since the checkpoint are named: an error where the saved state cannot fit, a
warning where the run will not repeat the original exactly. Before any of this, process 0 takes
the workdir's lock (one trainer per workdir), and a last checkpoint past total_steps ends the
run with one line; a newest step that cannot be read is one error naming it and the way on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Iterator, Mapping

import jax
import ml_collections

from data_pipeline import locks, paths
from ove_jax import checkpoint, warm_start
from ove_jax import config as config_lib

log = logging.getLogger('ove_jax.train')

# Keys that may change between a run and its resumption (layout, logging, housekeeping).
RESUME_FREE = (
  'mesh.',
  'cpu_devices',
  'log_every',
  'checkpoint_every',
  'keep_',
  'eval_',
  'profile_',
  'watchdog_seconds',
  'watchdog_first_step_seconds',
  'peak_flops',
  'init.',
  'builtin.root',
  'data.worker_buffer',
  'compilation_cache_dir',
  'distributed.',
  'probe',
)
# Keys whose change makes the saved state unusable (shapes), not merely the resumption inexact.
RESUME_FATAL = ('model.preset', 'heads.', 'loss.sampling_blocks', 'rules')


def check_resume(saved: Mapping[str, Any], config) -> None:
  """Names what changed since the checkpoint was written: an error where the saved state cannot
  fit, a warning where the resumed run will not repeat the uninterrupted one."""
  before = config_lib.flatten(ml_collections.ConfigDict(saved))
  now = config_lib.flatten(config)
  same = lambda k: json.dumps(before.get(k), default=list) == json.dumps(now.get(k), default=list)
  changed = sorted(
    k for k in set(before) | set(now) if not same(k) and not k.startswith(RESUME_FREE)
  )
  fatal = [k for k in changed if k.startswith(RESUME_FATAL)]
  if fatal:
    raise config_lib.ConfigError(
      'the checkpoint in this workdir was written with other values of '
      + ', '.join(f'{k} ({before.get(k)!r} then, {now.get(k)!r} now)' for k in fatal)
      + '; use another --workdir, or start from it with --config.init.checkpoint=<workdir>'
    )
  if changed:
    log.warning(
      'resuming with changed config values (the run will not repeat the original exactly): %s',
      ', '.join(f'{k}: {before.get(k)!r} -> {now.get(k)!r}' for k in changed),
    )


def check_layout(workdir: str, step: int, program) -> None:
  """The checkpoint's blocks are in this run's layout (unrolled or stacked); else a ConfigError
  with the two ways on (a checkpoint from before `model.scan_layers` existed, or a run resumed
  with it flipped, would otherwise fail inside orbax with a tree-structure dump)."""
  from ove_jax.models import layout

  saved = layout.is_stacked(
    checkpoint.flatten(checkpoint.param_shapes(workdir, step, subtree=checkpoint.ENCODER))
  )
  mine = layout.is_stacked(checkpoint.flatten(program.abstract_state['params']['encoder']))
  if saved != mine:
    name = lambda stacked: 'stacked (scanned)' if stacked else 'unrolled'
    raise config_lib.ConfigError(
      f'the checkpoint in {workdir} (step {step}) has its encoder blocks {name(saved)}, this run '
      f'{name(mine)}: resume with --config.model.scan_layers={saved}, or start a new --workdir '
      f'with --config.init.checkpoint={workdir} (its weights converted to this layout, exactly)'
    )


@contextlib.contextmanager
def workdir_lock(workdir: str, main_process: bool) -> Iterator[None]:
  """For the block, process 0 holds the workdir's run lock (`data_pipeline.locks`: an flock,
  which the kernel releases when its holder ends, however it ends, so a killed trainer leaves no
  stale lock); a second trainer on the workdir is refused with a ConfigError naming the holder
  (pid, host). A URL workdir's lock lies in its local cache folder (`paths.local_folder`): it
  keeps out a second trainer on the same machine only (docs/storage.md)."""
  with contextlib.ExitStack() as stack:
    if main_process:
      folder = paths.local_folder(workdir)
      try:
        os.makedirs(folder, exist_ok=True)
        stack.enter_context(locks.hold(folder, 'train', 'ove-train', kind='ove-train'))
      except locks.Locked as e:
        raise config_lib.ConfigError(f'--workdir {workdir}: {e}') from None
      except OSError as e:  # a read-only file system, no permission: before any work
        raise config_lib.ConfigError(
          f'--workdir {workdir}: {folder} cannot be made or written ({e.strerror}); give a '
          'folder you may write to'
        ) from None
    yield


def past_total_steps(workdir: str, config) -> str | None:
  """The line that says there is nothing to train when the workdir's last checkpoint lies beyond
  total_steps (a run restarted with a smaller total_steps); None otherwise."""
  # The checkpoints folder only: a manager opened on the workdir itself would write orbax's
  # metadata there, and in a multi-process run each process would make that folder at its own
  # time (orbax's sync points then differ between processes). A new run has no such folder.
  steps = checkpoint.list_steps(checkpoint.root_of(workdir))
  if not steps or steps[-1] <= config.total_steps:
    return None
  return (
    f'checkpoint step {steps[-1]} is past total_steps {config.total_steps}: nothing to train '
    f'(in {workdir}; raise --config.total_steps to train on, or give another --workdir)'
  )


def damaged(error: checkpoint.DamagedCheckpointError, manager, step: int) -> str:
  """A damaged newest step, with the trainer's ways on: delete it (the run then resumes from the
  step before), or restore it from a copy. The trainer does not fall back by itself: the
  damaged folder would stay the newest step (every restart would meet it again) and block a new
  save of that step, and deleting it would remove what a copy may still restore."""
  before = [s for s in sorted(manager.all_steps()) if s < step]
  then = f'to resume from step {before[-1]}' if before else 'to start over'
  return (
    f'{error.args[0]}; the trainer resumes from the newest step only: delete '
    f'{paths.join(str(manager.directory), str(step))} {then}, or restore it from a copy'
  )


def start_state(manager, workdir: str, iterator, program, config) -> tuple[dict, int]:
  """(train state, step) to start from: the workdir's last checkpoint (the iterator moved to
  its position), else `program`'s fresh init, warm-started as config.init says. A last step
  that cannot be read is a ConfigError naming it and the fix (`damaged`)."""
  start = manager.latest_step()
  if start is None:
    return warm_start.initialise_from(program.init(), config, program), 0
  try:
    meta = checkpoint.read_meta(workdir, start)
    check_resume(meta.get('config', {}), config)
    check_layout(workdir, start, program)
    saved = meta.get('process_count', jax.process_count())
    if saved == jax.process_count():
      state = checkpoint.restore_state(manager, start, program.abstract_state, iterator)
    else:
      state = checkpoint.restore_state(manager, start, program.abstract_state)
      reposition(iterator, read_positions(manager, start, saved), start, config)
  except checkpoint.DamagedCheckpointError as e:
    raise config_lib.ConfigError(damaged(e, manager, start)) from None
  log.info('resumed from %s step %d', workdir, start)
  return state, start


def read_positions(manager, step: int, processes: int) -> list[dict]:
  """Every process's saved input position at `step` of a run of `processes` processes (Grain's
  handler writes one JSON file per process into the step's data item)."""
  import orbax.checkpoint as ocp
  from etils import epath

  name = ocp.step.standard_name_format().build_name(step)
  folder = epath.Path(manager.directory) / name / checkpoint.DATA
  return [
    json.loads((folder / f'process_{i}-of-{processes}.json').read_text()) for i in range(processes)
  ]


def reposition(iterator, saved_positions: list[dict], step: int, config) -> None:
  """Moves this process's fresh `iterator` to the global record count of the old processes'
  positions (`saved_positions`, one per old process), with the warning that says what differs."""
  from data_pipeline import pipeline

  read: dict[str, int] = {}
  for position in saved_positions:
    for head, n in pipeline.records_read(position).items():
      read[head] = read.get(head, 0) + n
  iterator.set_state(
    pipeline.state_after(
      iterator.get_state(),
      read,
      jax.process_index(),
      jax.process_count(),
      draws=step * config.accumulate,
    )
  )
  log.warning(
    'resuming step %d, saved by %d process(es), on %d: parameters, optimizer state and step '
    'are restored; the input restarts at the global record count the old processes had read '
    '(%s), split over the new ones. The records from there are those the uninterrupted run '
    'reads, up to the few each old process had read ahead of the others, but other records '
    'share a batch (packing runs per process and input worker), so the losses will not repeat '
    "the uninterrupted run's.",
    step,
    len(saved_positions),
    jax.process_count(),
    ', '.join(f'{head}: {n}' for head, n in sorted(read.items())),
  )
