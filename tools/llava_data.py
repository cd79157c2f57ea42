"""LLaVA training data in the release's format, and the release's selections as our records.

  # A video list (.jsonl / .json with "id", "video", "conversations"; or .txt, one path a line)
  # -> the release's stage1 files, canvases and training jsonl:
  ove-llava-data make DATASET --visidx-root V --image-root I --out-jsonl train.jsonl
      [--num-frames 64 --resolution 576 --patch-size 16 --budget 10368 --num-images 8]
      [--image-format jpg|png] [--no-first-full] [--options '{"key": value}']

  # The release's (or our) stage1 files -> one ArrayRecord shard of clip records:
  ove-llava-data import V out.array_record [--model-grid 16] [--video-root ROOT]

`make` follows llava_next/Compressed_Video_Reader/tool/stage1.py and stage2.py (names, shapes,
the jsonl; data_pipeline/llava.py says what differs); selection is
codec.select(preset='release_llava'). Bad videos go to OUT_JSONL.failures.jsonl and the run
goes on, as do clips that run past --clip-timeout or crash their worker process (a segfault
in a decoder); clips are made in --workers processes (default: the usable CPUs). Running it again
skips finished clips (and known failures unless --retry-failures); a second run on the same
OUT_JSONL at the same time refuses.
--task-index I --num-tasks N splits the list over N processes or machines (a SLURM array), each
writing OUT_JSONL.shardIIofNN.jsonl as the release's stage2 does; `cat` them for the whole set.
`import` writes records readable by data_pipeline.sources.open_source('out.array_record');
with --model-grid 16 positions move from the release's 36 x 36 grid to our 224 / 14 model grid
(the records say geometry='letterbox', which the training pipeline follows). A file set it
cannot read (a truncated .npy, a missing frame_ids) goes to OUT.failures.jsonl and the import
goes on; it exits 1 when no record could be read (an earlier OUT stays as it was). Records whose
video is not found from here are written with a warning: a relative video path in meta.json is
read from the folder `make` ran in, so import there (with --video-root ROOT to store the paths
relative to ROOT, for readers that join ROOT: data.heads.video.video_root).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys

from data_pipeline import llava, llava_import, locks
from data_pipeline.shard_plan import Aborted
from ove_jax import cli


def parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(
    prog='ove-llava-data', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sub = p.add_subparsers(dest='command', required=True)
  make = sub.add_parser('make', help='video list -> stage1 files, canvases, training jsonl')
  make.add_argument('dataset', help='.jsonl / .json (id, video, conversations) or .txt list')
  make.add_argument('--visidx-root', required=True, help='folder of the stage1 files')
  make.add_argument('--image-root', required=True, help='folder of the per-clip canvases')
  make.add_argument('--out-jsonl', required=True, help='the training jsonl to write')
  make.add_argument('--num-frames', type=int, default=64, help='timeline length T')
  make.add_argument('--resolution', type=int, default=576, help='square canvas side')
  make.add_argument('--patch-size', type=int, default=16, help='patch side in pixels')
  make.add_argument('--budget', type=int, default=10368, help='selected patches K per clip')
  make.add_argument('--num-images', type=int, default=8, help='canvases per clip')
  make.add_argument(
    '--image-format',
    default='jpg',
    choices=llava.IMAGE_FORMATS,
    help='jpg as the release (quality 95); png keeps the pixels exactly',
  )
  make.add_argument(
    '--no-first-full',
    action='store_true',
    help='pack canvas 0 like the others (default: the whole first frame, '
    "as the release's --first_full)",
  )
  cli.add_options_flag(
    make,
    'over the release_llava preset (num_frames, budget, resolution and patch_size come from the '
    'flags)',
    example='{"camera_compensation": "median"}',
  )
  make.add_argument('--failures', help='failures file (default OUT_JSONL.failures.jsonl)')
  make.add_argument(
    '--retry-failures',
    action='store_true',
    help='try the videos of the failures file again',
  )
  make.add_argument(
    '--task-index',
    type=int,
    default=0,
    help="this task's index I: it makes the rows the release's stage2 gives shard I "
    "(sha1 of 'video|id|row' modulo N)",
  )
  make.add_argument(
    '--num-tasks',
    type=int,
    default=1,
    help='N tasks (processes, machines) splitting the list; each writes '
    'OUT_JSONL.shardIIofNN.jsonl',
  )
  cli.add_pool_flags(make)
  make.add_argument(
    '--selector',
    default=None,
    help='module:function called instead of data_pipeline.codec.select, with its arguments',
  )
  imp = sub.add_parser('import', help='stage1 files -> an ArrayRecord shard of clip records')
  imp.add_argument('visidx_root', help='folder searched for *.visidx_thw.npy')
  imp.add_argument('out', help='the .array_record shard to write')
  imp.add_argument(
    '--model-grid',
    type=int,
    default=None,
    help='move positions onto this grid (16 for our 224 / 14 model)',
  )
  imp.add_argument(
    '--failures', help='where unreadable file sets are listed (default OUT.failures.jsonl)'
  )
  imp.add_argument(
    '--video-root',
    default='',
    help='store the video paths relative to this folder, for readers that join it '
    '(data.heads.video.video_root; default: the paths as in meta.json)',
  )
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  if args.command == 'make':
    clash = sorted(set(args.options) & set(inspect.signature(llava.run).parameters))
    if clash:
      print(
        f'ove-llava-data: --options {", ".join(clash)}: these are settings of the run, '
        'not of codec.select; give them as flags',
        file=sys.stderr,
      )
      return 2
    sizes = ('num_frames', 'resolution', 'patch_size', 'budget', 'num_images', 'image_format')
    settings = llava.Settings(**cli.keywords(args, *sizes), first_full=not args.no_first_full)
    try:
      counts = llava.run(
        args.dataset,
        args.visidx_root,
        args.image_root,
        args.out_jsonl,
        settings,
        clip_timeout=cli.clip_timeout(args, 'ove-llava-data make'),
        **cli.keywords(
          args, 'failures', 'retry_failures', 'task_index', 'num_tasks', 'workers', 'selector'
        ),
        **args.options,
      )
    except (locks.Locked, ValueError) as e:
      print(f'ove-llava-data: {e}', file=sys.stderr)
      return 2
    except Aborted as e:
      print(f'ove-llava-data: stopped: {e}', file=sys.stderr)
      return 1
    print(json.dumps(counts))
    return 0
  problem = cli.output_file_problem(args.out)
  if problem:  # before the files are read, whose records would have nowhere to go
    print(f'ove-llava-data import: OUT {args.out}: {problem}', file=sys.stderr)
    return 2
  try:
    counts = llava_import.import_files(
      args.visidx_root, args.out, args.model_grid, args.video_root, args.failures
    )
  except ValueError as e:
    print(f'ove-llava-data: {e}', file=sys.stderr)
    return 2
  print(json.dumps(counts))
  if counts['videos_missing']:
    print(
      f'ove-llava-data: warning: {counts["videos_missing"]} of {counts["records"]} records name a '
      f'video not found from here (e.g. {counts["video_missing"]}); a relative path in '
      'meta.json is read from the folder `make` ran in: run the import there (--video-root ROOT '
      'then stores the paths relative to ROOT, for readers that join ROOT: '
      'data.heads.video.video_root)',
      file=sys.stderr,
    )
  if counts['failed']:
    print(
      f'ove-llava-data: {counts["failed"]} file sets could not be read; see {counts["failures"]}',
      file=sys.stderr,
    )
  return 0 if counts['records'] else 1


if __name__ == '__main__':
  sys.exit(main())
