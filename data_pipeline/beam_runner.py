"""Apache Beam as a runner of codec precompute: the same per-clip work into the same shards.

`run(inputs, out_dir, num_tasks=N, pipeline_args=[...], **options)` runs one Beam pipeline whose
elements are the task indices 0..N-1 of one plan; each element runs `precompute.precompute` as
task I of N (shards I, I + N, ...: what a SLURM array task runs), so the per-clip work, its time
limit and crash containment (`data_pipeline.workers`), the shard files and their markers, the
failure manifest and the final metadata are precompute's own, byte for byte. A task Beam retries
resumes: its finished shards are skipped (`overwrite` clears the folder once, at the launch,
which holds the folder's lock: a second launch, or a precompute task writing there, is refused).
When the pipeline ends, `precompute.check` reads the folder back and says whether the corpus is
complete.

The runner is Beam's, chosen by `pipeline_args`: DirectRunner here (the tests), or Dataflow,
Flink or Spark (docs/codec.md#precompute-at-scale shows each). The input list is read where the
pipeline is launched and handed to every task; on a cluster every worker must read the clips
(a file system mounted at the same path, or a `reader` hook that fetches each name) and OUT_DIR
(a shared file system or a bucket: gs://, s3://), and needs this package (a wheel through
--extra_package, or a container image with it installed).
`--workers` is per task: the processes one Beam worker starts for its clips.

Needs the `beam` extra (`pip install 'ove-jax[beam]'`, apache-beam 2.77.0).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from data_pipeline import fileio, locks, paths, precompute
from data_pipeline.clip_work import Clip
from data_pipeline.shard_plan import clear_outputs, num_shards_for
from data_pipeline.shards import PROGRESS_DIR, read_plan

# The input list as the launch read it, for every task: OUT_DIR/progress/beam_inputs.json.
INPUTS = 'beam_inputs.json'


def run(
  inputs,
  out_dir: str,
  *,
  num_tasks: int | None = None,
  pipeline_args: Sequence[str] = ('--runner=DirectRunner',),
  **options: Any,
) -> dict:
  """Precompute `inputs` into `out_dir` as `num_tasks` Beam elements (default: one per shard of
  the plan); returns `precompute.check(out_dir)` once the pipeline has run. `options`: the
  keyword arguments of `precompute.precompute` but task_index / num_tasks / progress."""
  for name in ('task_index', 'num_tasks', 'progress'):
    if name in options:
      raise ValueError(f'{name}: the Beam runner sets it (give num_tasks to run() instead)')
  beam, pipeline_options = _beam()
  # The list is read here, once, and written beside the plan for every task (not into the
  # pipeline's graph, which a runner ships whole): workers on other machines need not see the
  # list file (they do need to read the clips, or the `reader` hook to fetch them).
  clips = precompute.input_clips(inputs)
  if options.get('selector') == precompute.DEFAULT_SELECTOR:
    options['selector'] = None
  precompute.check_hooks(
    options.get('options') or {}, options.get('selector'), options.get('reader')
  )
  if num_tasks is None:
    num_tasks = options.get('num_shards') or num_shards_for(
      len(clips), options.get('clips_per_shard', 1000)
    )
  # What precompute checks before reading anything, checked once here and not in N workers.
  precompute.check_run_arguments(
    out_dir,
    options.get('name', precompute.DEFAULT_NAME),
    options.get('split', precompute.DEFAULT_SPLIT),
    options.get('record_format', 'records'),
    options.get('clip_timeout'),
    0,
    num_tasks,
    False,
  )
  overwrite = options.pop('overwrite', False)
  paths.makedirs(out_dir)
  os.makedirs(paths.local_folder(out_dir), exist_ok=True)
  # Held while the pipeline runs: a second launch on this folder from this machine, or a launch
  # while a precompute task writes here, is refused before anything is cleared. (Named like a
  # task lock of this plan, so the launch's own tasks do not take it for another plan's run.)
  with locks.hold(
    paths.local_folder(out_dir),
    f'beam-launch-of-{num_tasks:05d}',
    'a Beam launch',
    conflicts=lambda other: True,
  ):
    if overwrite:  # cleared once, here: a task Beam retries must resume
      old_plan = read_plan(out_dir)
      if old_plan is not None:
        clear_outputs(out_dir, old_plan)
    listing = paths.join(out_dir, PROGRESS_DIR, INPUTS)
    paths.makedirs(paths.join(out_dir, PROGRESS_DIR))
    fileio.write_json(listing, [[c.path, c.labels] for c in clips], sort_keys=False)
    with beam.Pipeline(options=pipeline_options(list(pipeline_args))) as pipeline:
      _ = (
        pipeline
        | 'tasks' >> beam.Create(list(range(num_tasks)))
        | 'spread' >> beam.Reshuffle()  # one task a worker, not all of them in one bundle
        | 'precompute' >> beam.Map(run_task, listing, out_dir, num_tasks, options)
      )
  return precompute.check(out_dir)


def run_task(task_index: int, listing: str, out_dir: str, num_tasks: int, options: dict) -> dict:
  """One element: task `task_index` of `num_tasks` of the plan (its summary), over the clips the
  launch listed in `listing`."""
  clips = [Clip(path, labels and tuple(labels)) for path, labels in fileio.read_json(listing)]
  return precompute.precompute(
    clips, out_dir, task_index=task_index, num_tasks=num_tasks, progress=False, **options
  )


def _beam():
  try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
  except ImportError as e:
    raise ImportError(
      f'the Beam runner needs apache-beam ({e}): pip install "ove-jax[beam]"'
    ) from e
  return beam, PipelineOptions
