"""Image corpora into the ArrayRecord shards of the image and OCR heads (resumable).

  ove-precompute-images SOURCE OUT_DIR [--name laion] [--images-per-shard 10000 | --num-shards N]
      [--labels folders|LABELS.npy] [--json-label-key label] [--image-column image]
      [--label-column labels ...] [--workers 16] [--max-pixels 89478485]

SOURCE is an image folder (searched recursively), a list file (one path per line, optionally a
tab and label ids "3,17,42"), a webdataset tar set ('/data/wds/shard-{000..099}.tar', globs,
comma-separated; members key.jpg/.png/.webp with optional key.cls or key.json labels) or parquet
files ('/data/laion/*.parquet', a Hugging Face dataset's parquet files too: an image column of
bytes or {bytes, path}, optional label columns). Every good image becomes one record
(data_pipeline/records.py: image bytes, labels, source) in OUT_DIR/NAME-SPLIT-00000-of-000NN.
array_record, which the trainer reads as --config.data.heads.image.source='OUT_DIR/NAME-*.
array_record'. CMYK, YCbCr and 16-bit grey images are converted (stored as PNG); bad images (not
an image, truncated, a decompression bomb over --max-pixels, other modes, a bad label) are listed
in OUT_DIR/failures.jsonl and never stop the run.

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

PROG = 'ove-precompute-images'


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=PROG, description=__doc__.split('\n')[0], epilog=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('source', nargs='?', metavar='SOURCE',
                 help='image folder, list file, tar patterns or parquet patterns')
  p.add_argument('out_dir', nargs='?', metavar='OUT_DIR', help='output folder')
  src = p.add_argument_group('source')
  src.add_argument('--kind', choices=('folder', 'list', 'tar', 'parquet'),
                   help='what SOURCE is (default: from its name)')
  src.add_argument('--labels',
                   help='folders: "folders" (the index of each image\'s top subfolder) or a '
                   '.npy of label ids, a row per image in sorted relative-path order; default: '
                   'no labels (make them with ove-cluster-labels --records)')
  src.add_argument('--json-label-key', default='label',
                   help='tar sets: the field of key.json holding the label ids (key.cls wins)')
  src.add_argument('--image-column',
                   help='parquet: the image column (default: the first of image, jpg, png, '
                   'webp, img, image_bytes)')
  src.add_argument('--label-column', action='append', default=[],
                   help='parquet: a label column of ints or lists of ints (repeat for more; '
                   'their ids are concatenated)')
  out = p.add_argument_group('output')
  out.add_argument('--name', default='images',
                   help='dataset name: shards are OUT_DIR/NAME-SPLIT-00000-of-000NN.array_record')
  out.add_argument('--split', default='train', help='split name (in the shard names)')
  out.add_argument('--images-per-shard', type=int, default=10000, help='images per shard')
  out.add_argument('--num-shards', type=int,
                   help='shard count (overrides --images-per-shard)')
  out.add_argument('--shuffle-seed', type=int,
                   help='seed of the write-time shuffle (default: 0 for folders and lists; '
                   'tar sets and parquet keep their order, read sequentially)')
  out.add_argument('--no-shuffle', action='store_true', help='keep the source order')
  out.add_argument('--max-pixels', type=int, default=None,
                   help='images with more pixels are rejected as decompression bombs '
                   '(default: pillow\'s limit, 89478485)')
  run = p.add_argument_group('run')
  run.add_argument('--workers', type=int, default=None,
                   help='worker processes (default: the usable CPUs; 0: in this process)')
  run.add_argument('--image-timeout', type=float, default=60.0,
                   help='seconds one image may take before its worker is killed and the image '
                   'listed as failed (0: no limit)')
  run.add_argument('--retry-failures', action='store_true',
                   help='check again the images that failed in earlier runs')
  run.add_argument('--task-index', type=int, default=0,
                   help='this machine\'s task I of --num-tasks; it writes shards I, I+N, ...')
  run.add_argument('--num-tasks', type=int, default=1,
                   help='machines sharing the plan (all run the same command but --task-index)')
  run.add_argument('--check', metavar='OUT_DIR',
                   help='only check that OUT_DIR holds its whole corpus (exit 0) or list the '
                   'missing shards (exit 1)')
  run.add_argument('--overwrite', action='store_true',
                   help='delete an earlier run\'s outputs in OUT_DIR and start over')
  run.add_argument('--max-shards', type=int,
                   help='write at most this many shards, then stop (run in instalments)')
  run.add_argument('--no-progress', action='store_true', help='no progress bar')
  return p


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.check is None and (args.source is None or args.out_dir is None):
    parser.error('give SOURCE and OUT_DIR (or --check OUT_DIR)')
  # Imported after parsing so --help is instant.
  from data_pipeline import image_precompute, locks, precompute

  if args.check is not None:
    try:
      report = precompute.check(args.check)
    except FileNotFoundError as e:
      print(f'{PROG}: {e}', file=sys.stderr)
      return 2
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0 if report['complete'] else 1
  shuffle = None if args.no_shuffle else ('auto' if args.shuffle_seed is None
                                          else args.shuffle_seed)
  try:
    summary = image_precompute.precompute_images(
        args.source, args.out_dir, kind=args.kind, labels=args.labels,
        json_label_key=args.json_label_key, image_column=args.image_column,
        label_columns=args.label_column, images_per_shard=args.images_per_shard,
        num_shards=args.num_shards, shuffle_seed=shuffle, workers=args.workers,
        max_pixels=args.max_pixels or image_precompute.DEFAULT_MAX_PIXELS,
        image_timeout=args.image_timeout or None, name=args.name, split=args.split,
        overwrite=args.overwrite, progress=not args.no_progress, max_shards=args.max_shards,
        task_index=args.task_index, num_tasks=args.num_tasks,
        retry_failures=args.retry_failures)
  except (precompute.PlanMismatch, locks.Locked, FileNotFoundError, ValueError) as e:
    print(f'{PROG}: {e}', file=sys.stderr)
    return 2
  print(json.dumps(summary, indent=2, sort_keys=True))
  print(f'{summary["records"]} images in {summary["shards_finished"]}/{summary["shards"]} shards '
        f'({summary["shards_skipped"]} already done), {summary["failures"]} rejected (see '
        f'{summary["failure_manifest"]})', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
