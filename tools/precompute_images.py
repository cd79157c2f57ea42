"""Image corpora into the ArrayRecord shards of the image and OCR heads (resumable).

  ove-precompute-images SOURCE OUT_DIR [--name laion] [--images-per-shard 10000 | --num-shards N]
      [--labels folders|LABELS.npy] [--json-label-key label] [--image-column image]
      [--label-column labels ...] [--workers 16] [--max-pixels 89478485]

SOURCE is an image folder (searched recursively), a list file (one path per line, optionally a
tab and label ids "3,17,42", on every line or none), a webdataset tar set
('/data/wds/shard-{000..099}.tar', globs, comma-separated; members key.jpg/.png/.webp with
optional key.cls or key.json labels) or parquet files ('/data/laion/*.parquet', a Hugging Face
dataset's parquet files too: an image column of bytes or {bytes, path}, optional label
columns). Every good image becomes one record
(data_pipeline/records.py: image bytes, labels, source) in OUT_DIR/NAME-SPLIT-00000-of-000NN.
array_record, which the trainer reads as --config.data.heads.image.source='OUT_DIR/NAME-*.
array_record'. CMYK, YCbCr and 16-bit grey images are converted (stored as PNG); bad images (not
an image, truncated, a decompression bomb over --max-pixels, other modes, a bad label) are listed
in OUT_DIR/failures.jsonl and never stop the run, nor do a damaged tar or an unreadable parquet
file (one entry each). Input wrong for the whole run (OUT_DIR a file, a --labels file that is not
whole ids >= 0, a list mixing labelled and unlabelled lines) exits 2 before any image is read.

Running the same command again skips the finished shards, so a killed run is resumed by
re-running it; known failures are not retried unless --retry-failures. N machines split one plan
with --task-index I --num-tasks N; `--check OUT_DIR` says whether the corpus is complete (exit 0)
or which shards are missing (exit 1). The library side is data_pipeline/image_precompute.py over
the video precompute's run (data_pipeline/precompute.py).

  # the stage-1 / stage-2 image head's data (labels from cluster_labels, or a labelled source)
  ove-precompute-images '/data/laion-wds/{00000..01999}.tar' /data/laion --name laion \
      --task-index $SLURM_ARRAY_TASK_ID --num-tasks 16
  ove-precompute-images --check /data/laion
"""

from __future__ import annotations

import argparse
import json
import sys

from ove_jax import cli

PROG = 'ove-precompute-images'


# The run's flags, each as (flag, add_argument options).
RUN_FLAGS = (
  (
    '--workers',
    dict(
      type=cli.count,
      help='worker processes (default: the usable CPUs; 0: in this process, no time limit)',
    ),
  ),
  (
    '--image-timeout',
    dict(
      type=cli.seconds,
      default=60.0,
      help='seconds one image may take before '
      'its worker is killed and the image listed as failed (0: none)',
    ),
  ),
  (
    '--retry-failures',
    dict(
      action='store_true',
      help='check again the images that failed in '
      'earlier runs (default: a known failure stays one)',
    ),
  ),
  (
    '--task-index',
    dict(
      type=int,
      default=0,
      help="this machine's task I of --num-tasks "
      '($SLURM_ARRAY_TASK_ID, $JOB_COMPLETION_INDEX): shards I, I+N, ...',
    ),
  ),
  (
    '--num-tasks',
    dict(
      type=int,
      default=1,
      help='machines sharing one plan, each running this command with its own --task-index',
    ),
  ),
  (
    '--check',
    dict(
      metavar='OUT_DIR',
      help='say whether OUT_DIR holds its whole corpus '
      '(exit 0) or which shards are missing (exit 1); nothing else is done',
    ),
  ),
  (
    '--overwrite',
    dict(action='store_true', help='start over: remove what an earlier run wrote to OUT_DIR'),
  ),
  (
    '--max-shards',
    dict(
      type=int,
      help='stop after writing this many shards (a run in instalments; the next run goes on)',
    ),
  ),
  ('--no-progress', dict(action='store_true', help='do not draw a progress bar')),
)


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(
    prog=PROG,
    description=__doc__.split('\n')[0],
    epilog=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    'source',
    nargs='?',
    metavar='SOURCE',
    help='image folder, list file, tar patterns or parquet patterns',
  )
  p.add_argument('out_dir', nargs='?', metavar='OUT_DIR', help='output folder')
  src = p.add_argument_group('source')
  src.add_argument(
    '--kind',
    choices=('folder', 'list', 'tar', 'parquet'),
    help='what SOURCE is (default: from its name)',
  )
  src.add_argument(
    '--labels',
    help='folders: "folders" (the index of each image\'s top subfolder) or a '
    '.npy of label ids (whole numbers >= 0), a row per image in sorted relative-path order; '
    'default: no labels (make them with ove-cluster-labels --records)',
  )
  src.add_argument(
    '--json-label-key',
    default='label',
    help='tar sets: the field of key.json holding the label ids (key.cls wins)',
  )
  src.add_argument(
    '--image-column',
    help='parquet: the image column (default: the first of image, jpg, png, '
    'webp, img, image_bytes)',
  )
  src.add_argument(
    '--label-column',
    action='append',
    default=[],
    help='parquet: a label column of ints or lists of ints (repeat for more; '
    'their ids are concatenated)',
  )
  out = p.add_argument_group('output')
  out.add_argument(
    '--name',
    default='images',
    help='dataset name: shards are OUT_DIR/NAME-SPLIT-00000-of-000NN.array_record',
  )
  out.add_argument('--split', default='train', help='split name (in the shard names)')
  out.add_argument('--images-per-shard', type=cli.positive, default=10000, help='images per shard')
  out.add_argument(
    '--num-shards', type=cli.positive, help='shard count (overrides --images-per-shard)'
  )
  out.add_argument(
    '--shuffle-seed',
    type=int,
    help='seed of the write-time shuffle (default: 0 for folders and lists; '
    'tar sets and parquet keep their order, read sequentially)',
  )
  out.add_argument('--no-shuffle', action='store_true', help='keep the source order')
  out.add_argument(
    '--max-pixels',
    type=int,
    default=None,
    help='images with more pixels are rejected as decompression bombs '
    "(default: pillow's limit, 89478485)",
  )
  run = p.add_argument_group("run (the video precompute's: resume, manifest, task split)")
  for flag, options in RUN_FLAGS:
    run.add_argument(flag, **options)
  return p


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.check:
    from data_pipeline import precompute  # imported after parsing: --help is instant

    try:
      report = precompute.check(args.check)
    except FileNotFoundError as e:
      print(f'{PROG}: {e}', file=sys.stderr)
      return 2
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0 if report['complete'] else 1
  if not (args.source and args.out_dir):
    parser.error('SOURCE and OUT_DIR are needed (or only --check OUT_DIR)')
  from data_pipeline import image_precompute, locks, precompute

  shuffle = (
    None if args.no_shuffle else ('auto' if args.shuffle_seed is None else args.shuffle_seed)
  )
  try:
    # Flags named as precompute_images' parameters pass through as they are.
    same = {
      k: getattr(args, k)
      for k in (
        'kind',
        'labels',
        'json_label_key',
        'image_column',
        'images_per_shard',
        'num_shards',
        'workers',
        'name',
        'split',
        'overwrite',
        'max_shards',
        'task_index',
        'num_tasks',
        'retry_failures',
      )
    }
    summary = image_precompute.precompute_images(
      args.source,
      args.out_dir,
      label_columns=args.label_column,
      shuffle_seed=shuffle,
      max_pixels=args.max_pixels or image_precompute.DEFAULT_MAX_PIXELS,
      image_timeout=args.image_timeout or None,
      progress=not args.no_progress,
      **same,
    )
  except (precompute.PlanMismatch, locks.Locked, FileNotFoundError, ValueError) as e:
    parser.exit(2, f'{PROG}: {e}\n')
  except precompute.Aborted as e:
    parser.exit(1, f'{PROG}: stopped: {e}\n')
  print(json.dumps(summary, indent=2, sort_keys=True))
  state = (
    'complete'
    if summary['complete']
    else (f'{summary["corpus_shards_finished"]} of {summary["shards"]} shards finished')
  )
  sys.stderr.write(
    f'{PROG}: {summary["records"]} images kept, {summary["failures"]} rejected '
    f'(listed in {summary["failure_manifest"]}); corpus {state}\n'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
