"""Shows which patches the codec selection keeps: a PNG grid and an animated GIF.

  python tools/visualize_selection.py VIDEO --out DIR [--num-frames 64 --budget 2048
      --resolution 224 --patch-size 14 --policy paper --preset NAME --geometry letterbox
      --options JSON] [--heatmap]
  python tools/visualize_selection.py SHARD --index I --out DIR [--heatmap]

With a video the selection is run here (data_pipeline.codec.select); with a precomputed shard
(tools/precompute_codec.py) record I is shown as stored. Every sampled frame is drawn at the
model resolution (on the selection's canvas: centre crop, or the letterbox with its black
padding) with the kept patches at full brightness and outlined, the rest dimmed, and a
caption "t / source frame / picture type / kept patches". Writes DIR/selection.png (grid),
DIR/selection.gif (one frame per sampled frame) and, with --heatmap, DIR/heatmap.png (the per-patch
score map over the frames; for a record it is the stored map, or the selection re-run with the
run's options when the record has none).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from data_pipeline.pictures import kept_mask, overlay, render  # noqa: F401 (re-exported)
from ove_jax import cli

# Shard file names (ArrayRecord, TFDS's template): record mode needs --index.
SHARD_MARKS = ('.array_record', '.tfrecord')


def is_shard(path: str) -> bool:
  return any(mark in os.path.basename(path) for mark in SHARD_MARKS)


def _select(video, selector: str | None, options: dict):
  import importlib

  module, _, attr = (selector or 'data_pipeline.codec:select').partition(':')
  return getattr(importlib.import_module(module), attr)(video, **options)


def _run_settings(shard: str) -> tuple[dict, str | None]:
  """The selection options and selector the shard was written with (its run's plan.json)."""
  from data_pipeline.precompute import read_plan

  plan = read_plan(os.path.dirname(os.path.abspath(shard)))
  return (dict(plan['options']), plan['selector']) if plan else ({}, None)


def main(argv=None) -> int:
  p = cli.ArgumentParser(prog='ove-visualize-selection', description=__doc__.split('\n')[0])
  p.add_argument('source', help='a video file, or a precomputed shard with --index')
  p.add_argument('--index', type=int, help='record index in the shard (record mode)')
  p.add_argument('--out', required=True, help='output folder')
  p.add_argument('--heatmap', action='store_true', help='also write the score heatmap')
  p.add_argument('--num-frames', type=int, help='T, frames on the timeline (select default 64)')
  p.add_argument('--budget', type=int, help='K, patches kept (select default 2048)')
  p.add_argument('--resolution', type=int, help='model resolution (select default 224)')
  p.add_argument('--patch-size', type=int, help='model patch size (select default 14)')
  p.add_argument('--policy', help='frame policy: paper, first_frame, zero, zero_first')
  p.add_argument('--preset', help='release_train, release_probe or release_llava')
  p.add_argument('--geometry', help='crop (default) or letterbox')
  cli.add_options_flag(p, 'the flags above override its keys')
  p.add_argument('--selector', help='module:function instead of data_pipeline.codec:select')
  p.add_argument('--cols', type=cli.positive, default=8, help='frames per row of the grid')
  p.add_argument('--frame-ms', type=int, default=120, help='GIF frame duration')
  args = p.parse_args(argv)
  from data_pipeline import paths as paths_lib

  problem = paths_lib.not_a_folder(args.out)
  if problem:  # before the selection, whose pictures would have nowhere to go
    print(f'visualize_selection: --out {args.out}: {problem}; give a folder', file=sys.stderr)
    return 2

  from data_pipeline.codec.geometry import decode_canvas
  from data_pipeline.codec.release import PRESETS
  from data_pipeline.precompute import picture_type_codes, read_record

  options = dict(args.options)
  record, selector = None, args.selector
  if args.index is None and is_shard(args.source):
    print(
      f'visualize_selection: {args.source} is a shard of records; give --index I (0-based) of '
      'the record to show',
      file=sys.stderr,
    )
    return 2
  if args.index is not None:
    try:
      record = read_record(args.source, args.index)
    except IndexError as e:
      print(f'visualize_selection: {e}', file=sys.stderr)
      return 2
    except (OSError, RuntimeError, ValueError) as e:
      print(
        f'visualize_selection: {args.source}: no record {args.index} could be read ({e}); '
        '--index is for a shard of records (ove-precompute-codec, ove-llava-data import): '
        'for a video, leave it out',
        file=sys.stderr,
      )
      return 2
    run_options, run_selector = _run_settings(args.source)
    options, selector = {**run_options, **options}, selector or run_selector
  for flag in ('num_frames', 'budget', 'resolution', 'patch_size', 'policy', 'preset', 'geometry'):
    if getattr(args, flag) is not None:
      options[flag] = getattr(args, flag)
  resolution = int(options.get('resolution', 224))
  patch_size = int(options.get('patch_size', 14))
  geometry = options.get('geometry') or PRESETS.get(options.get('preset'), {}).get(
    'geometry', 'crop'
  )
  if record is not None and record.get('geometry') and args.geometry is None:
    geometry = record['geometry']  # the record says which canvas its positions are on
  if record is not None and args.heatmap and record.get('scores') is None:
    if not options and not selector:  # neither its run's plan.json nor flags say how
      print(
        f'visualize_selection: record {args.index} of {args.source} stores no scores, and no '
        'plan.json beside it says how it was selected (a record ove-llava-data import made, '
        'say): a selection re-run with the defaults would draw another map; give the settings '
        "it was made with (--preset release_llava for the release's LLaVA data, --options) "
        'or leave out --heatmap',
        file=sys.stderr,
      )
      return 2
    options['geometry'] = geometry  # the map on the record's canvas
  grid = resolution // patch_size
  if record is not None and len(record['positions']) and record['positions'][:, 1:].max() >= grid:
    print(
      f'visualize_selection: record {args.index} of {args.source} has positions up to '
      f'{int(record["positions"][:, 1:].max())}, beyond the {grid} x {grid} grid of '
      f'{resolution} / {patch_size}; give --resolution and --patch-size of the grid it was '
      'made on (576 and 16 for LLaVA records imported without --model-grid)',
      file=sys.stderr,
    )
    return 2

  try:
    if record is None:
      selection = _select(args.source, selector, options)
      video, frame_ids = args.source, np.asarray(selection.frame_ids)
      positions = np.asarray(selection.positions)
      types = picture_type_codes(selection.picture_types)
      # The score map's grid fixes the patch size, whatever the selector's defaults are.
      patch_size = resolution // np.asarray(selection.scores).shape[1]
      scores = np.asarray(selection.scores) if args.heatmap else None
    else:
      video = record.get('video') or record['source']
      frame_ids, positions = record['frame_ids'], record['positions']
      types = record['picture_types']
      scores = None
      if args.heatmap:
        scores = record.get('scores')
        if scores is None:
          # Not stored: the selection is deterministic, so re-running it gives the same map.
          scores = np.asarray(_select(video, selector, options).scores)
        scores = np.asarray(scores, np.float32)
    frames = decode_canvas(video, frame_ids, resolution, geometry)
  except ValueError as e:  # VideoError (a bad file) or options the selector refuses
    print(f'visualize_selection: {e}', file=sys.stderr)
    return 2
  paths = render(
    frames, frame_ids, positions, types, args.out, patch_size, scores, args.cols, args.frame_ms
  )
  for kind, path in paths.items():
    print(f'{kind}: {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
