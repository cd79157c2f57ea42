"""Codec patch selection over a video corpus, into sharded ArrayRecord files (resumable).

  python tools/precompute_codec.py VIDEOS OUT_DIR [--num-frames 64 --budget 2048
      --resolution 224 --patch-size 14 --policy paper] [--options '{"key": value}' | opts.json]
      [--workers 16] [--clips-per-shard 1000 | --num-shards N] [--inline-max-bytes 1048576]

VIDEOS is a list file (one path per line, optionally a tab and label ids "3,17,42"; relative
paths are relative to the list file) or a folder searched recursively for video files. Every good
clip becomes one record (data_pipeline/records.py: source, frame ids, positions, picture types,
labels, stats_*; the file itself when it is small). Bad clips are listed in
OUT_DIR/failures.jsonl as they happen and never stop the run. Running the same command again
skips the finished shards, so a killed run is resumed by re-running it. At the end the summary
(clips/s, failures, kept fractions, shards) is printed and written to OUT_DIR/summary.json.

At corpus scale: a clip that runs past --clip-timeout seconds or crashes its worker process
(segfault, out-of-memory kill) is listed in failures.jsonl with the reason and a fresh worker
goes on; known failures are not retried by a re-run unless --retry-failures. A second run on
the same folder refuses (naming the first run's pid and host). N machines (a SLURM array, a
Kubernetes indexed job) split one plan with --task-index I --num-tasks N, each writing shards
I, I+N, ...; the task that finds every shard finished writes the final manifest and metadata,
and `--check OUT_DIR` says whether the corpus is complete (exit 0) or which shards are missing
(exit 1).

  # SLURM: sbatch --array=0-15 ..., each task running
  ove-precompute-codec videos.tsv /data/ove_codec --num-shards 1600 \
      --task-index $SLURM_ARRAY_TASK_ID --num-tasks 16
  ove-precompute-codec --check /data/ove_codec

Reading the output (D/ove_codec/1.0.0 as OUT_DIR makes D a TFDS data_dir):
  --format records (default)  data_pipeline.sources.open_source('OUT_DIR/ove_codec-train.*')
  --format tfds               data_pipeline.sources.open_source('tfds:ove_codec?data_dir=OUT_DIR')
                              (or data_dir=D), tfds.data_source('ove_codec', data_dir=D),
                              tfds.builder_from_directory(OUT_DIR).as_data_source('train')
  either format               data_pipeline.precompute.read_shard / read_record

The library side is data_pipeline/precompute.py (the run) and data_pipeline/shards.py (the
files).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from ove_jax import cli

# The flags passed to `precompute.precompute` as they are, under the same names.
RUN_FLAGS = (
  'clips_per_shard',
  'num_shards',
  'workers',
  'inline_max_bytes',
  'store_scores',
  'store_patches',
  'name',
  'split',
  'selector',
  'reader',
  'overwrite',
  'max_shards',
  'task_index',
  'num_tasks',
  'retry_failures',
)


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(
    prog='ove-precompute-codec',
    description=__doc__.split('\n')[0],
    epilog=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    'inputs', nargs='?', metavar='VIDEOS', help='video list file, or a folder searched recursively'
  )
  p.add_argument(
    'out_dir', nargs='?', metavar='OUT_DIR', help='output folder (shards, manifests, TFDS metadata)'
  )
  sel = p.add_argument_group(
    'selection (passed to data_pipeline.codec.select; unset flags keep its defaults)'
  )
  sel.add_argument('--num-frames', type=int, help='frames sampled per clip (T)')
  sel.add_argument('--budget', type=int, help='patches kept per clip (K)')
  sel.add_argument('--resolution', type=int, help='model input side in pixels')
  sel.add_argument('--patch-size', type=int, help='patch side in pixels')
  sel.add_argument('--policy', help='frame policy: paper, first_frame, zero or zero_first')
  cli.add_options_flag(sel, 'the flags above override its keys')
  sel.add_argument(
    '--selector',
    default=None,
    help='module:function used instead of data_pipeline.codec.select '
    '(e.g. data_pipeline.codec:select_random for an ablation)',
  )
  sel.add_argument(
    '--reader',
    default=None,
    help='module:function turning each input name into a local path or the '
    "file's bytes (e.g. a fetcher for gs:// or s3:// names); default: names "
    'are local paths',
  )
  out = p.add_argument_group('output')
  out.add_argument('--clips-per-shard', type=cli.positive, default=1000, help='clips per shard')
  out.add_argument(
    '--num-shards', type=cli.positive, help='shard count (overrides --clips-per-shard)'
  )
  out.add_argument(
    '--shuffle-seed', type=int, default=0, help='seed of the write-time shuffle of the input list'
  )
  out.add_argument('--no-shuffle', action='store_true', help='keep the input order')
  out.add_argument(
    '--inline-max-bytes',
    type=cli.non_negative,
    default=1 << 20,
    help='store files up to this size inside the record (0: never)',
  )
  out.add_argument(
    '--store-scores',
    action='store_true',
    help="also store each clip's score map (float16) for inspection",
  )
  out.add_argument(
    '--store-patches',
    action='store_true',
    help="also store the selected patches' pixels (uint8 [K, 588]) so training "
    'reads them instead of decoding the video',
  )
  out.add_argument('--name', default='ove_codec', help='dataset name (TFDS; names the shards)')
  out.add_argument('--split', default='train', help='split name (TFDS; names the shards)')
  out.add_argument(
    '--format',
    default='records',
    choices=('records', 'tfds'),
    help='records: records.encode bytes per entry (shard globs of '
    'data_pipeline.sources); tfds: tf.train.Example entries plus TFDS metadata '
    '(tfds.data_source, builder_from_directory)',
  )
  run = p.add_argument_group('run')
  cli.add_pool_flags(run)
  run.add_argument(
    '--retry-failures',
    action='store_true',
    help='select again the clips that failed in earlier runs (default: known failures are kept)',
  )
  run.add_argument(
    '--task-index',
    type=int,
    default=0,
    help="this machine's task I of --num-tasks (e.g. $SLURM_ARRAY_TASK_ID, "
    '$JOB_COMPLETION_INDEX); it writes shards I, I+N, I+2N, ...',
  )
  run.add_argument(
    '--num-tasks',
    type=int,
    default=None,
    help='machines sharing the plan (all run the same command but --task-index; default 1); '
    "with --runner beam the pipeline's elements (default: one per shard)",
  )
  run.add_argument(
    '--runner',
    choices=('local', 'beam'),
    default='local',
    help='local: this process and its workers; beam: an Apache Beam pipeline running every '
    'task of the plan (the beam extra), with --beam-args',
  )
  run.add_argument(
    '--beam-args',
    default='--runner=DirectRunner',
    help="Beam's pipeline options, one string after '=' (e.g. --beam-args='--runner="
    'DataflowRunner --project=P --region=R --temp_location=gs://B/tmp '
    "--extra_package=dist/ove_jax-0.1.0-py3-none-any.whl'; docs/codec.md has Flink and Spark)",
  )
  run.add_argument(
    '--check',
    metavar='OUT_DIR',
    help='only check that OUT_DIR holds its whole corpus (exit 0) or list the '
    'missing shards (exit 1); writes the final manifest when complete',
  )
  run.add_argument(
    '--overwrite',
    action='store_true',
    help="delete an earlier run's outputs in OUT_DIR and start over",
  )
  run.add_argument(
    '--max-shards',
    type=cli.positive,
    help='write at most this many shards, then stop (run in instalments)',
  )
  run.add_argument('--no-progress', action='store_true', help='no progress bar')
  return p


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.check is None and (args.inputs is None or args.out_dir is None):
    parser.error('give VIDEOS and OUT_DIR (or --check OUT_DIR)')
  # Imported after parsing so --help is instant.
  from data_pipeline import locks, precompute

  if args.check is not None:
    return _check(precompute, args.check)
  from data_pipeline import paths

  problem = paths.buckets_problem(args.out_dir)  # before the list is read and workers start
  if problem:
    print(f'ove-precompute-codec: OUT_DIR {args.out_dir}: {problem}', file=sys.stderr)
    return 2
  options = dict(args.options)
  for flag in ('num_frames', 'budget', 'resolution', 'patch_size', 'policy'):
    value = getattr(args, flag)
    if value is not None:
      options[flag] = value
  common = dict(
    options=options,
    shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
    record_format=args.format,
    clip_timeout=cli.clip_timeout(args, 'ove-precompute-codec'),
  )
  if args.num_tasks is None and args.runner == 'local':
    args.num_tasks = 1
  try:
    if args.runner == 'beam':
      return _run_beam(parser, args, common)
    summary = precompute.precompute(
      args.inputs,
      args.out_dir,
      progress=not args.no_progress,
      **common,
      **cli.keywords(args, *RUN_FLAGS),
    )
  except (precompute.PlanMismatch, locks.Locked, FileNotFoundError, ValueError) as e:
    print(f'ove-precompute-codec: {e}', file=sys.stderr)
    return 2
  except precompute.Aborted as e:
    print(f'ove-precompute-codec: stopped: {e}', file=sys.stderr)
    return 1
  print(json.dumps(summary, indent=2, sort_keys=True))
  for i in summary['shards_damaged']:
    done = i in summary['shards_damaged_redone']
    print(
      f'ove-precompute-codec: shard {i} did not match its marker (size or record count: damaged '
      f'since it was written) and was {"made again" if done else "left for a later run"}',
      file=sys.stderr,
    )
  print(
    f'{summary["records"]} records in {summary["shards_finished"]}/{summary["shards"]} shards '
    f'({summary["shards_skipped"]} already done), {summary["failures"]} failures '
    f'(see {summary["failure_manifest"]}), {summary["clips_per_second"]:.1f} clips/s, '
    f'{100 * summary["patches_kept_fraction"]:.2f}% of patches kept',
    file=sys.stderr,
  )
  if args.task_index >= summary['shards']:
    print(
      f'ove-precompute-codec: warning: task {args.task_index} of {args.num_tasks} owns no shard '
      f'(the plan has {summary["shards"]}; shard i belongs to task i % {args.num_tasks}): '
      'use fewer tasks, or more shards (--num-shards, a smaller --clips-per-shard)',
      file=sys.stderr,
    )
  if args.num_tasks > 1:
    print(
      f'task {args.task_index} of {args.num_tasks}: corpus '
      f'{summary["corpus_shards_finished"]}/{summary["shards"]} shards finished'
      + (' (complete)' if summary['complete'] else ''),
      file=sys.stderr,
    )
  return 0


def _run_beam(parser, args, common: dict) -> int:
  """--runner beam: every task of the plan as a Beam pipeline's elements, then the check."""
  if args.task_index or args.max_shards:
    parser.error('--task-index and --max-shards are for --runner local (Beam runs every task)')
  from data_pipeline import beam_runner

  beam_set = ('task_index', 'num_tasks', 'max_shards')  # what the Beam runner decides
  report = beam_runner.run(
    args.inputs,
    args.out_dir,
    num_tasks=args.num_tasks,
    pipeline_args=shlex.split(args.beam_args),
    **common,
    **cli.keywords(args, *(f for f in RUN_FLAGS if f not in beam_set)),
  )
  return _report(report, args.out_dir)


def _check(precompute, out_dir: str) -> int:
  try:
    report = precompute.check(out_dir)
  except FileNotFoundError as e:
    print(f'ove-precompute-codec: {e}', file=sys.stderr)
    return 2
  return _report(report, out_dir)


def _report(report: dict, out_dir: str) -> int:
  """Prints `precompute.check`'s report; 0 when the corpus is complete, else 1."""
  print(json.dumps(report, indent=2, sort_keys=True))
  if report['complete']:
    print(
      f'{out_dir}: complete, {report["records"]} records in {report["shards"]} shards, '
      f'{report["failures"]} failures',
      file=sys.stderr,
    )
    return 0
  shown = ', '.join(map(str, report['missing'][:20])) + (
    ' ...' if len(report['missing']) > 20 else ''
  )
  print(
    f'{out_dir}: incomplete, {len(report["missing"])} of {report["shards"]} shards missing '
    f'({shown}); re-run the tasks that own them (shard i belongs to task i % N)',
    file=sys.stderr,
  )
  return 1


if __name__ == '__main__':
  sys.exit(main())
