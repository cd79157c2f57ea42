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
warning where the run will not repeat the original exactly.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

import jax
import ml_collections

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


def start_state(manager, workdir: str, iterator, program, config) -> tuple[dict, int]:
  """(train state, step) to start from: the workdir's last checkpoint (the iterator moved to
  its position), else `program`'s fresh init, warm-started as config.init says."""
  start = manager.latest_step()
  if start is None:
    return warm_start.initialise_from(program.init(), config, program), 0
  meta = checkpoint.read_meta(workdir, start)
  check_resume(meta.get('config', {}), config)
  check_layout(workdir, start, program)
  saved = meta.get('process_count', jax.process_count())
  if saved == jax.process_count():
    state = checkpoint.restore_state(manager, start, program.abstract_state, iterator)
  else:
    state = checkpoint.restore_state(manager, start, program.abstract_state)
    reposition(iterator, checkpoint.read_positions(manager, start, saved), start, config)
  log.info('resumed from %s step %d', workdir, start)
  return state, start


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
