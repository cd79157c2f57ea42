"""The release's LLaVA training data from a video list, and its selection files back into records.

EvolvingLMMs-Lab/OneVision-Encoder builds LLaVA data in two steps under
`llava_next/Compressed_Video_Reader/tool/`; this module writes what they write, file for file:

  stage1.py  per clip, in `visidx_root`, named
             sample_{id}__{stem}__{sha1(path)[:8]}__{sha1(key)[:8]}_T{T}_square{R}_p{P}_K{K}
             + '.visidx_thw.npy'  int32 [K, 3]  the selected (t, h, w) on the R/P square grid
             + '.frame_ids.npy'   int32 [T]     source frames of the T timeline positions
             + '.meta.json'                     sizes, padding, the valid patch ranges
             (key = '{video}|{id}|{row}', row the item's line in the dataset). Our selection is
             `codec.select(..., preset='release_llava')`: letterbox to R, the first frame whole
             (padding included), then the best patches inside the picture (docs/codec.md).
  stage2.py  per clip, in `image_root/sample_{id}__{stem}__{sha1(path)[:8]}/`, the K positions
             sorted by (t, h, w) cut into `num_images` canvases of K / num_images patches:
             '{stem}_{i:03d}.jpg' (R x R), canvas 0 the whole first frame (`first_full`, the
             release's --first_full), the others packed densely in raster order (its
             'time_spatial' layout with padding_policy 'zero': patch j of a canvas at grid cell
             (j // (R/P), j % (R/P))); 'positions_thw.npy' int32 [n, 3] the source (t, h, w) of
             every packed patch in canvas order (canvas 0 adds none when it is the whole frame,
             as the release); and a jsonl line {"id", "conversations", "image": [paths],
             "positions_thw": path} whose first human turn has its '<video>' replaced by one
             '<image>' per canvas.

Where the pixels differ from the release: frames are decoded by PyAV and resized bicubic
(`codec.geometry.letterbox_frame`, as our pipeline gathers them), where stage2 decodes with
OpenCV and resizes bilinear; stage1's visidx rows are sorted by (t, h, w) where the release keeps
top-k order (stage2 sorts them before packing, so the canvases are the same).

`data_pipeline.llava_import` reads stage1's files (ours or the release's) into clip records of
`data_pipeline.records`, so data selected by the release trains here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Sequence

import numpy as np

from data_pipeline import fileio
from data_pipeline import paths as paths_lib
from data_pipeline.codec.release import preset_record

STAGE1_SUFFIXES = ('.visidx_thw.npy', '.frame_ids.npy', '.meta.json')
IMAGE_FORMATS = ('jpg', 'png')


def sha8(text: str) -> str:
  return hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]


def stem_of(video: str) -> str:
  """The file name without its last extension (Python's Path.stem)."""
  name = os.path.basename(str(video))
  stem, _ = os.path.splitext(name)
  return stem if stem else name


@dataclasses.dataclass(frozen=True)
class Item:
  """One line of the dataset: a sample id, its video path, its conversation, its row."""

  id: str
  video: str
  conversations: list
  row: int

  @property
  def sample_key(self) -> str:
    return f'{self.video}|{self.id}|{self.row}'

  def stage1_prefix(self, num_frames: int, resolution: int, patch_size: int, budget: int) -> str:
    return (
      f'sample_{self.id}__{stem_of(self.video)}__{sha8(self.video)}__'
      f'{sha8(self.sample_key)}_T{num_frames}_square{resolution}_p{patch_size}_K{budget}'
    )

  @property
  def pack_dir(self) -> str:
    return f'sample_{self.id}__{stem_of(self.video)}__{sha8(self.video)}'


def read_items(path: str) -> list[Item]:
  """The dataset: a .jsonl (one object a line) or .json (an array) of objects with 'id' and
  'video' (and 'conversations', optional; '_row_idx' as the release's pre-sharded files), or a
  .txt of video paths, one a line (id = the line number, no conversation). The file may be an
  object in a bucket (gs://, s3://), and so may the videos it names."""
  lower = path.lower()
  if not paths_lib.isfile(path):
    raise ValueError(
      f'{path}: no such dataset file; give a .jsonl or .json list of {{"id", "video", '
      '"conversations"} objects, or a .txt of video paths'
    )
  if not lower.endswith(('.txt', '.jsonl', '.json')):
    raise ValueError(
      f'{path}: unsupported dataset; use .jsonl, .json (an array) or .txt (one video path a line)'
    )
  with paths_lib.open_file(path, 'r', encoding='utf-8') as f:
    text = f.read()  # universal newlines: '\r\n' is '\n' here
  if lower.endswith('.txt'):
    videos = [line.strip() for line in text.split('\n') if line.strip()]
    return [Item(str(i), v, [], i) for i, v in enumerate(videos)]
  if lower.endswith('.jsonl'):
    rows = []
    for number, line in enumerate(text.split('\n'), 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except ValueError as e:
          raise ValueError(f'{path}, line {number}: not a JSON object ({e})') from None
  else:
    try:
      rows = json.loads(text)
    except ValueError as e:
      raise ValueError(f'{path}: not JSON ({e})') from None
    if not isinstance(rows, list):
      raise ValueError(f'{path}: a .json dataset must hold an array of objects')
  items = []
  for i, row in enumerate(rows):
    if not isinstance(row, dict) or row.get('id') is None or not row.get('video'):
      raise ValueError(f'{path}: row {i} needs the fields "id" and "video", got {row!r:.200}')
    items.append(
      Item(
        str(row['id']),
        str(row['video']),
        list(row.get('conversations') or []),
        int(row.get('_row_idx', i)),
      )
    )
  return items


def conversations_with_images(conversations: Sequence, num_images: int) -> list:
  """The first human turn with its first '<video>' replaced by `num_images` '<image>' lines
  (left alone when it already has '<image>', the images put in front when it has neither), as
  the release's stage2 rewrites it."""
  images = '\n'.join(['<image>'] * num_images)
  out, done = [], False
  for turn in conversations:
    human = isinstance(turn, dict) and turn.get('from') == 'human'
    if not done and human and isinstance(turn.get('value'), str):
      turn, value, done = dict(turn), turn['value'], True
      if '<video>' in value:
        turn['value'] = value.replace('<video>', images, 1)
      elif '<image>' not in value:
        turn['value'] = images + '\n' + value
    out.append(turn)
  return out


def valid_ranges(valid_HpxWp: np.ndarray) -> dict:
  hb, wb = valid_HpxWp.shape
  out = {'S_valid': int(valid_HpxWp.sum()), 'hb_total': int(hb), 'wb_total': int(wb)}
  ys, xs = np.nonzero(valid_HpxWp)
  if ys.size:
    out.update(
      valid_h_start=int(ys.min()),
      valid_h_end=int(ys.max()) + 1,
      valid_w_start=int(xs.min()),
      valid_w_end=int(xs.max()) + 1,
    )
  return out


def multiples_near(value: int, step: int) -> str:
  """The multiples of `step` either side of `value`, for a message: '496 or 512'."""
  below = value // step * step
  return f'{below} or {below + step}' if below else str(step)


def check_split(budget: int, num_images: int, resolution: int, patch_size: int) -> None:
  """Refuses settings whose `budget` patches do not fill `num_images` canvases of
  (resolution / patch_size)^2 cells equally, naming the rule that fails and the fix."""
  if resolution % patch_size:
    near = multiples_near(resolution, patch_size)
    raise ValueError(
      f'resolution={resolution}, patch_size={patch_size}: a canvas side must be a whole number '
      f'of patches; give --resolution a multiple of --patch-size ({near}; the release: 576)'
    )
  if budget % num_images:
    raise ValueError(
      f'budget={budget}, num_images={num_images}: every canvas holds the same number of '
      f'patches, so the budget must be a multiple of --num-images ({budget} / {num_images} '
      f'leaves {budget % num_images}); give --budget {multiples_near(budget, num_images)}'
    )
  side = resolution // patch_size
  if budget // num_images > side * side:
    raise ValueError(
      f'budget={budget}, num_images={num_images}: {budget // num_images} patches a canvas '
      f'exceed its {side}x{side} = {side * side} cells (resolution {resolution} / patch_size '
      f'{patch_size}); give --budget at most {num_images * side * side}, or more --num-images'
    )


def pack_canvases(
  frames_TxRxRx3: np.ndarray,
  positions_Kx3: np.ndarray,
  num_images: int,
  patch_size: int,
  first_full: bool = True,
) -> tuple[list, np.ndarray]:
  """(canvases uint8 [R, R, 3] each, positions_thw int32 [n, 3]) as the release's stage2 packs
  them (module docstring). K must be num_images x a whole number of patches per canvas, at most
  the (R/P)^2 cells of one canvas."""
  _, res, _, _ = frames_TxRxRx3.shape
  side, k = res // patch_size, len(positions_Kx3)
  check_split(k, num_images, res, patch_size)
  per_image = k // num_images
  thw = np.asarray(positions_Kx3, np.int64)
  thw = thw[np.lexsort((thw[:, 2], thw[:, 1], thw[:, 0]))]
  canvases, packed = [], []
  ps = patch_size
  for i in range(num_images):
    chunk = thw[i * per_image : (i + 1) * per_image]
    if first_full and i == 0:
      canvases.append(frames_TxRxRx3[0].copy())
      continue
    canvas = np.zeros((res, res, 3), np.uint8)
    for j, (t, h, w) in enumerate(chunk):
      y, x = (j // side) * ps, (j % side) * ps
      canvas[y : y + ps, x : x + ps] = frames_TxRxRx3[
        t, h * ps : (h + 1) * ps, w * ps : (w + 1) * ps
      ]
    canvases.append(canvas)
    packed.append(chunk)
  positions = (np.concatenate(packed) if packed else np.zeros((0, 3))).astype(np.int32)
  return canvases, positions


def encode_image(rgb_HxWx3: np.ndarray, image_format: str) -> bytes:
  from PIL import Image

  buffer = io.BytesIO()
  if image_format == 'jpg':
    # The release writes with OpenCV's default JPEG quality, 95.
    Image.fromarray(rgb_HxWx3).save(buffer, format='JPEG', quality=95)
  else:
    Image.fromarray(rgb_HxWx3).save(buffer, format='PNG')
  return buffer.getvalue()


def save_npy(path: str, array: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  fileio.write_atomic(path, buffer.getvalue())


@dataclasses.dataclass(frozen=True)
class Settings:
  """The release's stage1 / stage2 defaults: 64 frames on a 576 canvas of 16-pixel patches,
  8 canvases of 36 x 36 patches (K = 10368), the first canvas the whole first frame."""

  num_frames: int = 64  # stage1 --sequence_length
  resolution: int = 576  # --square_size
  patch_size: int = 16  # --patch_size / --patch
  budget: int = 10368  # K = keep_frames_equiv (8) x 36 x 36
  num_images: int = 8  # stage2 --num_images
  first_full: bool = True  # stage2 --first_full
  image_format: str = 'jpg'  # 'png' keeps pixels exact (stage2 reads either)
  preset: str = 'release_llava'  # codec.select preset

  def select_options(self) -> dict:
    """codec.select's keywords for these settings: the model grid and the preset."""
    names = ('num_frames', 'budget', 'resolution', 'patch_size', 'preset')
    return {name: getattr(self, name) for name in names}


def clip_paths(item: Item, visidx_root: str, image_root: str, s: Settings) -> dict:
  prefix = os.path.join(
    visidx_root, item.stage1_prefix(s.num_frames, s.resolution, s.patch_size, s.budget)
  )
  pack = os.path.join(image_root, item.pack_dir)
  stem = stem_of(item.video)
  return {
    'visidx': prefix + '.visidx_thw.npy',
    'frame_ids': prefix + '.frame_ids.npy',
    'meta': prefix + '.meta.json',
    'positions': os.path.join(pack, 'positions_thw.npy'),
    'images': [os.path.join(pack, f'{stem}_{i:03d}.{s.image_format}') for i in range(s.num_images)],
  }


def jsonl_line(item: Item, paths: dict, s: Settings) -> dict:
  return {
    'id': item.id,
    'conversations': conversations_with_images(item.conversations, s.num_images),
    'image': paths['images'],
    'positions_thw': paths['positions'],
  }


def clip_files(paths: dict) -> list[str]:
  """Every file of a clip (`clip_paths`)."""
  return [paths['visidx'], paths['frame_ids'], paths['meta'], paths['positions'], *paths['images']]


def finished(paths: dict) -> bool:
  """All of a clip's files exist (each is written atomically; the meta last of stage1's)."""
  return all(os.path.exists(p) for p in clip_files(paths))


def release_task(item: Item, num_tasks: int) -> int:
  """The task (of `num_tasks`) that takes a row, as the release's stage2 shards its input: the
  first 8 hex digits of sha1('<video>|<id>|<row>') modulo N."""
  key = f'{item.video}|{item.id}|{item.row}'
  return int(hashlib.sha1(key.encode('utf-8')).hexdigest()[:8], 16) % int(num_tasks)


def task_jsonl(out_jsonl: str, task_index: int, num_tasks: int) -> str:
  """The jsonl of one task: `out_jsonl` itself, or with the release's per-shard suffix
  `.shard{I:02d}of{N:02d}.jsonl` when the list is split over N > 1 tasks."""
  if num_tasks == 1:
    return out_jsonl
  return f'{out_jsonl}.shard{task_index:02d}of{num_tasks:02d}.jsonl'


def run(
  dataset: str,
  visidx_root: str,
  image_root: str,
  out_jsonl: str,
  settings: Settings = Settings(),
  failures: str | None = None,
  retry_failures: bool = False,
  task_index: int = 0,
  num_tasks: int = 1,
  workers: int | None = None,
  clip_timeout: float | None = None,
  selector: str | None = None,
  **options,
) -> dict:
  """The whole list: each clip's files, then the jsonl (written atomically, in dataset order).

  Clips are made in `workers` processes (default: the CPUs this process may use, at most one
  per clip to make; 0: in this process, where there is no time limit and a crash is the
  run's). A video that fails, or whose worker runs past `clip_timeout` seconds or dies (a
  segfault in a decoder, the out-of-memory killer), is recorded in `failures` (default
  `<jsonl>.failures.jsonl`: id, video, reason; appended as it happens, rewritten in list order
  at the end) and left out of the jsonl; a fresh worker takes over and the run goes on. A
  re-run skips clips whose files are all there, and known failures unless `retry_failures`. A
  second run writing the same jsonl at the same time refuses (`locks.Locked`). With
  `num_tasks` N > 1 (N processes or machines), task I takes the rows `release_task` puts there
  (the release's stage2 rule, so its shards and ours hold the same rows) and writes
  `task_jsonl(out_jsonl, I, N)`; the N jsonl files together give the whole set.
  `selector`: see `make_clip`. Returns the counts."""
  from data_pipeline import locks, shards
  from data_pipeline import workers as workers_lib
  from data_pipeline.llava_clip import check_selection, init_worker, make_task, remove_temporaries
  from data_pipeline.shard_plan import Aborted, abort_reason, check_options, rolled_back

  if settings.image_format not in IMAGE_FORMATS:
    raise ValueError(
      f'image_format={settings.image_format!r}: allowed values are {", ".join(IMAGE_FORMATS)}'
    )
  # Checked here, not per clip: a setting error would otherwise fail every clip, and known
  # failures are skipped on re-runs.
  for name in ('num_frames', 'resolution', 'patch_size', 'budget', 'num_images'):
    if getattr(settings, name) < 1:
      flag = '--' + name.replace('_', '-')
      raise ValueError(f'{name}={getattr(settings, name)}: give {flag} a whole number >= 1')
  side, cut = divmod(settings.resolution, settings.patch_size)
  if settings.first_full and not cut and settings.budget != settings.num_images * side * side:
    # Canvas 0 is then the whole first frame in place of the first budget / num_images
    # selected patches: with fewer per canvas than its cells those patches would be lost.
    raise ValueError(
      f'budget={settings.budget}, num_images={settings.num_images}: with the first canvas the '
      f'whole first frame (first_full), every canvas holds its {side}x{side} patches, so the '
      f'budget must be num_images x {side * side} = {settings.num_images * side * side} (the '
      'release: 8 x 36 x 36 = 10368); or pack canvas 0 like the others (--no-first-full)'
    )
  check_split(settings.budget, settings.num_images, settings.resolution, settings.patch_size)
  if not 0 <= task_index < num_tasks:
    raise ValueError(
      f'task_index={task_index}, num_tasks={num_tasks}: need 0 <= task_index < num_tasks'
    )
  workers_lib.check_timeout(clip_timeout)
  workers = workers_lib.usable_cpus() if workers is None else workers
  if workers < 0:
    raise ValueError(f'workers={workers}: a number of processes >= 0 (0: in this process)')
  # Wrong selector names and signatures, options and OVE_SELECT_THREADS (`check_options`) fail
  # here, not once per clip (as failures that re-runs would then skip).
  clash = sorted(set(options) & set(settings.select_options()))
  if clash:
    raise ValueError(
      f'options {", ".join(clash)}: these come from the settings (llava.Settings; the flags '
      'of ove-llava-data make), not from the options'
    )
  check_options({**options, **settings.select_options()}, selector)
  check_selection(settings, options, selector)
  items = [item for item in read_items(dataset) if release_task(item, num_tasks) == task_index]
  out_jsonl = task_jsonl(out_jsonl, task_index, num_tasks)
  failures = failures or out_jsonl + '.failures.jsonl'
  for path in (failures, out_jsonl):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with locks.hold(
    os.path.dirname(os.path.abspath(out_jsonl)),
    os.path.basename(out_jsonl),
    f'making {out_jsonl}',
    kind='ove-llava-data',
  ):
    fresh = check_settings(out_jsonl, (visidx_root, image_root), settings, options, selector)
    known = {} if retry_failures else {(e['id'], e['video']): e for e in read_failures(failures)}
    plan = []  # (item, its paths, 'finished' / 'known' / 'todo')
    failed = {}  # plan row -> failure entry: the known ones from the start, so none is lost
    for row, item in enumerate(items):
      paths = clip_paths(item, visidx_root, image_root, settings)
      # A clip whose files are all there is done, even if a worker died after writing them.
      state = (
        'finished' if finished(paths) else 'known' if (item.id, item.video) in known else 'todo'
      )
      if state == 'known':
        failed[row] = known[(item.id, item.video)]
      plan.append((item, paths, state))

    def write_failures():
      shards.write_failures(failures, [failed[row] for row in sorted(failed)])

    tasks = (
      (item, visidx_root, image_root, settings, selector, options)
      for item, _, state in plan
      if state == 'todo'
    )
    # No more workers than clips to make (none: no pool to start).
    workers = min(workers, sum(state == 'todo' for _, _, state in plan))
    results = workers_lib.ordered_map(
      make_task,
      tasks,
      workers,
      timeout=clip_timeout,
      initializer=init_worker,
      initargs=(selector,),
    )
    lines = []
    counts = {'clips': len(items), 'made': 0, 'skipped': 0, 'failed': len(failed)}
    known_rows, processed, unexpected, lost = set(failed), 0, 0, 0
    write_failures()  # the known failures of this list; new ones are appended as they happen
    with open(failures, 'a', encoding='utf-8') as journal:
      try:
        for row, (item, paths, state) in enumerate(plan):
          if state == 'finished':
            lines.append(jsonl_line(item, paths, settings))
            counts['skipped'] += 1
            continue
          if state == 'known':
            continue
          result = next(results)
          processed += 1
          if isinstance(result, workers_lib.Lost):  # the worker timed out or died on this clip
            remove_temporaries(paths, result.pid)
            result = {'reason': f'{item.video}: {result.reason}', 'video_error': False}
            lost += 1
          if 'line' in result:
            lines.append(result['line'])
            counts['made'] += 1
            continue
          failed[row] = {'id': item.id, 'video': item.video, 'reason': result['reason']}
          counts['failed'] += 1
          journal.write(json.dumps(failed[row]) + '\n')  # a killed run keeps it
          journal.flush()
          unexpected += not result['video_error']
          reason = abort_reason(processed, unexpected, lost, result['reason'])
          if reason:  # the run is wrong, not its clips: none of its failures is kept as known
            failed = {row: failed[row] for row in known_rows}
            write_failures()
            for path in fresh:  # no earlier run left settings: this one's files go too
              os.remove(path)
            where = 'its own --out-jsonl, --visidx-root and --image-root'
            raise Aborted(f'{reason}; {rolled_back(bool(fresh), where)}')
      finally:
        results.close()  # stops the workers
    write_failures()  # in list order
    fileio.write_atomic(
      out_jsonl, ''.join(json.dumps(line, ensure_ascii=False) + '\n' for line in lines)
    )
  return counts


def check_settings(
  out_jsonl: str, roots: Sequence[str], settings: Settings, options: dict, selector: str | None
):
  """Keeps what makes a clip's files in `<jsonl>.settings.json` and in each of `roots` (the
  visidx and image roots, as `ove-llava-settings.json`), and refuses a run whose settings differ
  from any of them: its canvases would land over some earlier ones and beside the rest, and
  finished clips would be skipped as made with other options. The preset's values are kept too:
  a run begun under an earlier meaning of the preset is refused, not resumed. Returns the files
  it wrote where none was there (a first run), else []."""
  wanted = {**dataclasses.asdict(settings), 'options': options, 'selector': selector}
  wanted = json.loads(json.dumps({**wanted, **preset_record(settings.preset)}))
  paths = [out_jsonl + '.settings.json', *(os.path.join(r, SETTINGS_FILE) for r in roots)]
  paths = list(dict.fromkeys(os.path.abspath(p) for p in paths))
  earlier_of = {path: fileio.read_json(path) for path in paths}
  for path, earlier in earlier_of.items():
    if earlier is not None and earlier != wanted:
      changed = sorted(k for k in {*earlier, *wanted} if earlier.get(k) != wanted.get(k))
      differences = '; '.join(
        f'{k}: {earlier.get(k)!r} then, {wanted.get(k)!r} now' for k in changed
      )
      raise ValueError(
        f"{path}: this run's output was made with other settings ({differences}); give this "
        'run its own --out-jsonl, --visidx-root and --image-root, or delete the earlier files'
      )
  created = [path for path, earlier in earlier_of.items() if earlier is None]
  for path in created:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fileio.write_json(path, wanted)
  return created if len(created) == len(paths) else []


SETTINGS_FILE = 'ove-llava-settings.json'  # in the visidx and image roots (`check_settings`)


def read_failures(path: str) -> list[dict]:
  """The failures file's entries (a line torn by a killed run is left out)."""
  from data_pipeline import shards

  return shards.read_entries(path)
