"""One clip of `ove-llava-data make` (`data_pipeline.llava`): select, pack and write its files in
a worker process, and the checks, before any clip, that a run's options and selector can make
them."""

from __future__ import annotations

import inspect
import os

import numpy as np

from data_pipeline import fileio
from data_pipeline import paths as paths_lib
from data_pipeline.llava import (
  Item,
  Settings,
  clip_files,
  clip_paths,
  encode_image,
  jsonl_line,
  pack_canvases,
  save_npy,
  valid_ranges,
)


def make_clip(
  item: Item,
  visidx_root: str,
  image_root: str,
  s: Settings,
  selector: str | None = None,
  **options,
) -> dict:
  """Select, pack and write one clip's files; returns its jsonl line. Raises VideoError for a
  video that cannot be used. `selector`: 'module:function' called as codec.select is (the
  video, `Settings.select_options()` and `options`), instead of it."""
  from data_pipeline import codec
  from data_pipeline.clip_work import resolve
  from data_pipeline.codec import bitstream, geometry

  paths = clip_paths(item, visidx_root, image_root, s)
  select = resolve(selector) if selector else codec.select
  # A video in a bucket is read once, its bytes selected from and decoded (the files keep the URL).
  video = paths_lib.read_bytes(item.video) if paths_lib.is_url(item.video) else item.video
  sel = select(video, **s.select_options(), **options)
  side = s.resolution // s.patch_size
  first_whole = int(np.sum(np.asarray(sel.positions)[:, 0] == 0)) == side * side
  if s.first_full and not first_whole:
    raise ValueError(
      f'{item.video}: the selection did not keep frame 0 whole, which the first canvas (the whole '
      "first frame, first_full) assumes; keep the preset's policy, or pack canvas 0 like the "
      'others (--no-first-full)'
    )
  frames = geometry.decode_canvas(video, sel.frame_ids, s.resolution, 'letterbox')
  canvases, packed = pack_canvases(frames, sel.positions, s.num_images, s.patch_size, s.first_full)
  for path, canvas in zip(paths['images'], canvases):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fileio.write_atomic(path, encode_image(canvas, s.image_format))
  save_npy(paths['positions'], packed)

  info = bitstream.probe(video)
  box = geometry.canvas(info.height, info.width, s.resolution, 'letterbox')
  valid = geometry.valid_patches(info.height, info.width, s.resolution, s.patch_size, 'letterbox')
  os.makedirs(visidx_root, exist_ok=True)
  save_npy(paths['visidx'], sel.positions.astype(np.int32))
  save_npy(paths['frame_ids'], sel.frame_ids.astype(np.int32))
  fileio.write_json(
    paths['meta'],
    {
      'sample_id': item.id,
      'sample_key': item.sample_key,
      'video': item.video,
      'T': s.num_frames,
      'frame_ids': None,
      'preprocess': f'square{s.resolution}',
      'square_size': s.resolution,
      'patch': s.patch_size,
      'keep_frames_equiv': s.budget // (side * side),
      'padding_policy': 'zero',
      'keep_uniform_first': False,
      'keep_first_full_frame': first_whole,
      'H0': info.height,
      'W0': info.width,
      'pad_info': {
        'scale': s.resolution / max(info.height, info.width),
        'Hn': box.new_h,
        'Wn': box.new_w,
        'pad_top': box.top,
        'pad_left': box.left,
        'pad_bottom': s.resolution - box.new_h - box.top,
        'pad_right': s.resolution - box.new_w - box.left,
        'out_size': s.resolution,
        'H0': info.height,
        'W0': info.width,
      },
      'hb': side,
      'wb': side,
      'S_total': side * side,
      'S_valid': int(valid.sum()),
      'K': int(len(sel.positions)),
      # stage1's count of selected patches on padding (frame 0's, kept whole): not a removal
      'padding_patch_filtered': int((~valid[sel.positions[:, 1], sel.positions[:, 2]]).sum()),
      'valid_ranges': valid_ranges(valid),
      'selection': s.preset,
      'codec': sel.codec,
      'transcoded': bool(sel.transcoded),
    },
    sort_keys=False,
  )
  return jsonl_line(item, paths, s)


def remove_temporaries(paths: dict, pid: int | None) -> list[str]:
  """Removes the temporary files (`fileio.temp_name`) that the dead worker process `pid` left
  beside a clip's files (`clip_paths`), no other process's (split tasks share `visidx_root`)."""
  if pid is None:
    return []
  names = set(clip_files(paths))
  folders = {os.path.dirname(paths['meta']), os.path.dirname(paths['positions'])}
  return [t for f in sorted(folders) for t in fileio.remove_stale_temporaries(f, pid, names)]


def init_worker(selector: str | None) -> None:
  """Imports the selection in a fresh worker, so a clip's time limit does not count it."""
  from data_pipeline import codec  # noqa: F401
  from data_pipeline.clip_work import resolve

  if selector:
    resolve(selector)


def make_task(task: tuple) -> dict:
  """`make_clip` in a worker process: {'line': its jsonl line} or {'reason': why it failed,
  'video_error': whether the video was at fault (VideoError) rather than the run}."""
  from data_pipeline.video import VideoError

  item, visidx_root, image_root, settings, selector, options = task
  try:
    return {'line': make_clip(item, visidx_root, image_root, settings, selector, **options)}
  except Exception as e:  # any bad video: the run records it and goes on
    return {'reason': f'{type(e).__name__}: {e}', 'video_error': isinstance(e, VideoError)}


def check_selection(settings: Settings, options: dict, selector: str | None) -> None:
  """Refuses, before any clip, options and selectors that cannot make these files: the
  canvases are letterboxed (stage1's square canvas), canvas 0 with `first_full` is frame 0
  whole (a policy that zeroes it would lose patches), and the selector must take the video and
  codec.select's keywords of the grid, the preset and `options`."""
  from data_pipeline.clip_work import resolve
  from data_pipeline.codec import Options

  opts = Options.from_kwargs(options, settings.preset)
  if opts.geometry != 'letterbox':
    raise ValueError(
      f"geometry={opts.geometry!r} (preset {settings.preset}, options {options}): the release's "
      "LLaVA canvases are letterboxed (stage1's square canvas); give geometry='letterbox'"
    )
  policy = opts.policy
  if settings.first_full and policy not in WHOLE_FIRST_FRAME:
    raise ValueError(
      f'options policy={policy!r}: canvas 0 is the whole first frame (first_full), so the '
      f'selection must keep frame 0 whole (policy {" or ".join(WHOLE_FIRST_FRAME)}); or pack '
      'canvas 0 like the others (--no-first-full)'
    )
  if selector:
    try:
      inspect.signature(resolve(selector)).bind('video', **settings.select_options(), **options)
    except TypeError as e:
      raise ValueError(
        f'selector {selector}: it must take the video and keywords as codec.select does '
        f'({", ".join(sorted({**settings.select_options(), **options}))}): {e}'
      ) from None


# The frame policies that keep frame 0 whole (`codec.Options.policy`: every I-frame, the first).
WHOLE_FIRST_FRAME = ('first_frame', 'paper')
