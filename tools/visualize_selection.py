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

import argparse
import json
import os
import sys

import numpy as np

PICTURE_TYPES = ('?', 'I', 'P', 'B')  # the codes of data_pipeline.records
_OUTLINE = np.array([255, 214, 0], np.uint8)
# A perceptually ordered ramp (dark blue -> purple -> orange -> pale yellow), like "inferno";
# pillow has no colour maps and matplotlib is not a dependency.
_RAMP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                  [245, 125, 21], [250, 193, 39], [252, 255, 164]], np.float32)


def kept_mask(positions_Kx3: np.ndarray, num_frames: int, grid: int) -> np.ndarray:
  """bool [T, grid, grid]: which patches are selected."""
  mask = np.zeros((num_frames, grid, grid), bool)
  p = np.asarray(positions_Kx3, np.int64).reshape(-1, 3)
  mask[p[:, 0], p[:, 1], p[:, 2]] = True
  return mask


def overlay(frames_TxHxWx3: np.ndarray, mask_TxGxG: np.ndarray, dim: float = 0.3) -> np.ndarray:
  """Kept patches as they are with a one-pixel outline around kept regions; the rest dimmed."""
  t, h, w, _ = frames_TxHxWx3.shape
  patch = h // mask_TxGxG.shape[1]
  pixels = mask_TxGxG.repeat(patch, 1).repeat(patch, 2)[:, :h, :w]
  out = np.where(pixels[..., None], frames_TxHxWx3,
                 (frames_TxHxWx3.astype(np.float32) * dim).astype(np.uint8))
  # Outline the border of the kept region (not every patch: 2048 boxes would hide the image).
  padded = np.pad(pixels, ((0, 0), (1, 1), (1, 1)), constant_values=False)
  interior = (padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2]
              & padded[:, 1:-1, 2:])
  out[pixels & ~interior] = _OUTLINE
  return out


def colorize(values: np.ndarray) -> np.ndarray:
  """Values in [0, 1] -> uint8 RGB through the ramp."""
  x = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
  low = np.floor(x).astype(np.int64).clip(0, len(_RAMP) - 2)
  frac = (x - low)[..., None]
  return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).round().astype(np.uint8)


def heatmap(frames_TxHxWx3: np.ndarray, scores_TxGxG: np.ndarray, alpha: float = 0.65
            ) -> np.ndarray:
  """The score map (normalised over the clip) blended over grey frames."""
  t, h, w, _ = frames_TxHxWx3.shape
  scores = np.asarray(scores_TxGxG, np.float32)
  top = float(scores.max()) if scores.size else 0.0
  norm = scores / top if top > 0 else np.zeros_like(scores)
  patch = h // scores.shape[1]
  colors = colorize(norm.repeat(patch, 1).repeat(patch, 2)[:, :h, :w]).astype(np.float32)
  grey = frames_TxHxWx3.astype(np.float32).mean(-1, keepdims=True)
  return (alpha * colors + (1 - alpha) * grey).round().clip(0, 255).astype(np.uint8)


def _captioned(image: np.ndarray, caption: str):
  from PIL import Image, ImageDraw
  h, w, _ = image.shape
  canvas = Image.new('RGB', (w, h + 14), (0, 0, 0))
  canvas.paste(Image.fromarray(image), (0, 0))
  ImageDraw.Draw(canvas).text((2, h + 1), caption, fill=(255, 255, 255))
  return canvas


def save_grid(images: np.ndarray, captions, path: str, cols: int = 8, gap: int = 2) -> None:
  from PIL import Image
  tiles = [_captioned(im, c) for im, c in zip(images, captions)]
  cols = max(1, min(cols, len(tiles)))
  rows = -(-len(tiles) // cols)
  tw, th = tiles[0].size
  sheet = Image.new('RGB', (cols * (tw + gap) - gap, rows * (th + gap) - gap), (40, 40, 40))
  for i, tile in enumerate(tiles):
    sheet.paste(tile, ((i % cols) * (tw + gap), (i // cols) * (th + gap)))
  sheet.save(path)


def save_gif(images: np.ndarray, captions, path: str, frame_ms: int = 120) -> None:
  tiles = [_captioned(im, c) for im, c in zip(images, captions)]
  tiles[0].save(path, save_all=True, append_images=tiles[1:], duration=frame_ms, loop=0)


def render(frames: np.ndarray, frame_ids, positions, picture_types, out_dir: str,
           patch_size: int = 14, scores=None, cols: int = 8, frame_ms: int = 120
           ) -> dict[str, str]:
  """Writes selection.png, selection.gif (and heatmap.png with scores); returns their paths."""
  t, h, _, _ = frames.shape
  grid = h // patch_size
  mask = kept_mask(positions, t, grid)
  codes = np.asarray(picture_types).reshape(-1)
  captions = [f't{i} f{int(frame_ids[i])} {PICTURE_TYPES[int(codes[i])] if i < len(codes) else "?"}'
              f' {int(mask[i].sum())}/{grid * grid}' for i in range(t)]
  shown = overlay(frames, mask)
  os.makedirs(out_dir, exist_ok=True)
  paths = {'png': os.path.join(out_dir, 'selection.png'),
           'gif': os.path.join(out_dir, 'selection.gif')}
  save_grid(shown, captions, paths['png'], cols)
  save_gif(shown, captions, paths['gif'], frame_ms)
  if scores is not None:
    paths['heatmap'] = os.path.join(out_dir, 'heatmap.png')
    save_grid(heatmap(frames, scores), captions, paths['heatmap'], cols)
  return paths


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
  p = argparse.ArgumentParser(prog='ove-visualize-selection',
                              description=__doc__.split('\n')[0])
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
  p.add_argument('--options', help='more select() keyword arguments as a JSON object')
  p.add_argument('--selector', help='module:function instead of data_pipeline.codec:select')
  p.add_argument('--cols', type=int, default=8, help='frames per row of the grid')
  p.add_argument('--frame-ms', type=int, default=120, help='GIF frame duration')
  args = p.parse_args(argv)

  from data_pipeline.precompute import picture_type_codes, read_record
  from data_pipeline.codec.geometry import decode_canvas
  from data_pipeline.codec.release import PRESETS

  try:
    options = json.loads(args.options) if args.options else {}
  except json.JSONDecodeError as e:
    print(f'visualize_selection: --options is not JSON ({e})', file=sys.stderr)
    return 2
  record, selector = None, args.selector
  if args.index is not None:
    try:
      record = read_record(args.source, args.index)
    except IndexError as e:
      print(f'visualize_selection: {e}', file=sys.stderr)
      return 2
    run_options, run_selector = _run_settings(args.source)
    options, selector = {**run_options, **options}, selector or run_selector
  for flag in ('num_frames', 'budget', 'resolution', 'patch_size', 'policy', 'preset',
               'geometry'):
    if getattr(args, flag) is not None:
      options[flag] = getattr(args, flag)
  resolution = int(options.get('resolution', 224))
  patch_size = int(options.get('patch_size', 14))
  geometry = options.get('geometry') or PRESETS.get(options.get('preset'), {}).get('geometry',
                                                                                 'crop')

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
  paths = render(frames, frame_ids, positions, types, args.out, patch_size, scores, args.cols,
                 args.frame_ms)
  for kind, path in paths.items():
    print(f'{kind}: {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
