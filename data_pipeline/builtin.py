"""The built-in training data: labelled synthetic clips and images, made once under a folder.

The trainer's `demo_cpu` experiment trains on this so that a first run needs no download and no
data preparation. `ensure(root)` makes it on first use and returns the `sources.open_source`
strings and label counts to train on; later calls (or a second trainer process on the same
machine) find it ready and return at once.

Layout under `root`:
  videos/clip-{i:05d}.mp4      64-frame 224x224 H.264 clips with B-frames (`synthetic.make_clip`)
  videos/clips.tsv             the clip list with label ids (`precompute.read_inputs` format)
  videos/made.tsv, images/made.tsv   finished files and their labels (for resuming)
  records/                     their codec selections (`precompute.precompute` output folder)
  images/img-{i:05d}.png       224x224 stills of one object (a 1-frame synthetic clip)
  images/labels.npy            int32 [N, 3], one row per image in sorted file order
  builtin.json                 the parameters and the result, written last: the data is ready
  .lock-builtin                the flock that serialises concurrent calls (`data_pipeline.locks`)

Labels come from the synthetic ground truth of the (one) object: a fine class and the
attributes it combines, so a probe can learn something real from a few dozen samples. Videos
carry a fourth, the object's texture, which the demo probes; a trainer head reading 3 labels
per sample takes the first three.
  videos (57): shape * 8 + direction (0..39), 40 + shape (40..44), 45 + direction (45..52),
               53 + texture (53..56)
  images (29): shape * 4 + texture (0..19), 20 + shape (20..24), 25 + texture (25..28)

A killed run is resumed: files are written by rename, and a log per folder (`made.tsv`) records
each finished file's labels, so the next call reuses every logged file that still decodes, makes
the rest, and lets `precompute` resume its unfinished shards.
"""

from __future__ import annotations

import io
import os
import time
from typing import Callable, Sequence

import numpy as np

from data_pipeline import fileio, locks, precompute, sources, synthetic
from data_pipeline import video as video_lib
from data_pipeline.codec.options import POLICIES

VERSION = 3  # bump when the same parameters would make different data
NUM_FRAMES = 64
RESOLUTION = 224
PATCH_SIZE = 14
VIDEO_LABELS = 4  # labels per clip (fine, shape, direction, texture)
IMAGE_LABELS = 3  # labels per image (fine, shape, texture)
CLIPS_PER_SHARD = 8  # small shards: a killed precompute loses little
VIDEO_CLASSES = (
  len(synthetic.SHAPES) * len(synthetic.DIRECTIONS)
  + len(synthetic.SHAPES)
  + len(synthetic.DIRECTIONS)
  + len(synthetic.TEXTURES)
)
IMAGE_CLASSES = (
  len(synthetic.SHAPES) * len(synthetic.TEXTURES) + len(synthetic.SHAPES) + len(synthetic.TEXTURES)
)
SELECTION_OPTIONS = {
  'num_frames': NUM_FRAMES,
  'resolution': RESOLUTION,
  'patch_size': PATCH_SIZE,
  'policy': 'zero',
  'camera_compensation': 'median',
}

_MARKER = 'builtin.json'
_STARTED = '.builtin-started.json'
_LIST = 'clips.tsv'
_IMAGE_LABELS = 'labels.npy'
_LOG = 'made.tsv'
# Seed streams of synthetic.make_clip: videos and images never share a seed.
_VIDEO_STREAM, _IMAGE_STREAM = 0, 1
# Characters that the source strings give a meaning to: ',' separates shard paths, glob
# patterns expand, and the folder spec is URL-query parsed ('?', '&', '+', '%').
_UNSAFE = ',*?[&+%'


def video_labels(labels: dict) -> tuple[int, int, int, int]:
  """A clip's four label ids from `SyntheticClip.labels`."""
  shape, direction, texture = labels['shape_id'], labels['direction_id'], labels['texture_id']
  if direction < 0:
    raise ValueError("the clip's first object does not move; it has no direction class")
  num_shapes, num_directions = len(synthetic.SHAPES), len(synthetic.DIRECTIONS)
  first = num_shapes * num_directions
  return (
    shape * num_directions + direction,
    first + shape,
    first + num_shapes + direction,
    first + num_shapes + num_directions + texture,
  )


def video_attributes(label_ids) -> dict[str, int]:
  """The ground truth behind a clip's label ids (`video_labels`): shape, direction and texture as
  indices into synthetic.SHAPES / DIRECTIONS / TEXTURES."""
  _, shape, direction, texture = (int(x) for x in np.asarray(label_ids).reshape(-1)[:VIDEO_LABELS])
  first = len(synthetic.SHAPES) * len(synthetic.DIRECTIONS)
  return {
    'shape': shape - first,
    'direction': direction - first - len(synthetic.SHAPES),
    'texture': texture - first - len(synthetic.SHAPES) - len(synthetic.DIRECTIONS),
  }


def image_attributes(label_ids) -> dict[str, int]:
  """The ground truth behind an image's label ids (`image_labels`): shape and texture."""
  fine = int(np.asarray(label_ids).reshape(-1)[0])
  return {'shape': fine // len(synthetic.TEXTURES), 'texture': fine % len(synthetic.TEXTURES)}


def image_labels(labels: dict) -> tuple[int, int, int]:
  """An image's three label ids from the `SyntheticClip.labels` of its 1-frame clip."""
  shape, texture = labels['shape_id'], labels['texture_id']
  num_shapes, num_textures = len(synthetic.SHAPES), len(synthetic.TEXTURES)
  return (
    shape * num_textures + texture,
    num_shapes * num_textures + shape,
    num_shapes * num_textures + num_shapes + texture,
  )


def item_seed(seed: int, stream: int, index: int) -> int:
  """make_clip's seed of item `index`: independent streams, no overlap between nearby seeds."""
  return int(np.random.SeedSequence([seed, stream, index]).generate_state(1)[0])


def ensure(
  root: str,
  *,
  clips: int = 32,
  images: int = 64,
  budget: int = 1024,
  seed: int = 0,
  workers: int = 1,
  progress: bool = True,
  policy: str = SELECTION_OPTIONS['policy'],
) -> dict:
  """Makes (or finds) the built-in data under `root`; returns what a trainer config needs.

  Args:
    root: the folder; created if needed. Use a fresh one per set of parameters.
    clips / images: how many video clips and still images.
    budget: patches the codec selection keeps per clip (the video head's tokens per row).
    seed: seeds every clip and image.
    policy: the selection's frame policy (codec.POLICIES; docs/spec.md §2.6), an ablation knob.
      Data of another policy is other data: a root made with one refuses another, like
      `budget`.
    workers: precompute's processes (0: in this process). Does not change the data.
    progress: print a line per stage (and precompute's progress bar).

  Returns:
    {'video_source', 'image_source'} (`sources.open_source` strings), 'video_classes',
    'image_classes', 'video_labels' / 'image_labels' (labels per sample), and 'clips' / 'images':
    the samples each source holds.

  Raises:
    ValueError: `root` holds data made with other parameters (named in the message).
    RuntimeError: fewer than 2 clips survived the selection (see the failure manifest named).
  """
  if clips < 2 or images < 1:
    raise ValueError(f'clips={clips}, images={images}: need at least 2 clips and 1 image')
  frame_patches = (RESOLUTION // PATCH_SIZE) ** 2
  if not 1 <= budget <= NUM_FRAMES * frame_patches:
    raise ValueError(
      f'budget={budget}: between 1 and {NUM_FRAMES * frame_patches} patches '
      f'({NUM_FRAMES} frames of {frame_patches})'
    )
  if seed < 0:
    raise ValueError(f'seed={seed}: must be >= 0')
  if policy not in POLICIES:
    raise ValueError(f'policy={policy!r}: allowed values are {", ".join(POLICIES)}')
  root = os.path.abspath(os.path.expanduser(os.fspath(root)))
  unsafe = sorted(set(_UNSAFE) & set(root))
  if unsafe:
    raise ValueError(
      f"{root}: the built-in data folder's path must not contain "
      f'{" ".join(unsafe)} (they mean something in source strings)'
    )
  params = {
    'version': VERSION,
    'clips': int(clips),
    'images': int(images),
    'budget': int(budget),
    'seed': int(seed),
  }
  if policy != SELECTION_OPTIONS['policy']:  # only when set, so earlier folders still match
    params['policy'] = policy

  # No lock on the way in: the marker is written last, by rename, so if it is there and
  # matches, everything it names is complete.
  ready = _ready(root, params)
  if ready is not None:
    return ready
  os.makedirs(root, exist_ok=True)

  def say(text: str) -> None:
    if progress:
      print(f'[builtin data] {text}', flush=True)

  with locks.hold(root, 'builtin', 'making the built-in data', wait=say):
    ready = _ready(root, params)  # another process may have made it while we waited
    if ready is not None:
      say(f'ready in {root} (made by another process)')
      return ready
    _check_params(root, fileio.read_json(os.path.join(root, _STARTED)), params)
    fileio.write_json(os.path.join(root, _STARTED), params)
    start = time.perf_counter()
    list_file = _make_videos(root, params, say)
    shards, num_records = _make_records(root, list_file, params, workers, progress, say)
    _make_images(root, params, say)
    result = _result(root, shards, num_records, params)
    # Fail here, not in the trainer, if a source string does not open.
    for spec, expected in (
      (result['video_source'], num_records),
      (result['image_source'], params['images']),
    ):
      found = len(sources.open_source(spec))
      if found != expected:
        raise RuntimeError(f'{spec}: {found} records where {expected} were made')
    fileio.write_json(
      os.path.join(root, _MARKER),
      {'params': params, 'shards': [os.path.basename(p) for p in shards], 'clips': num_records},
    )
    os.remove(os.path.join(root, _STARTED))
    say(
      f'ready in {root}: {num_records} clips, {params["images"]} images '
      f'({time.perf_counter() - start:.1f} s)'
    )
    return result


# ---------------------------------------------------------------------------------------------
# Marker, parameters, lock
# ---------------------------------------------------------------------------------------------


def _result(root: str, shards: Sequence[str], num_records: int, params: dict) -> dict:
  images = os.path.join(root, 'images')
  return {
    'video_source': ','.join(shards),
    'image_source': f'folder:{images}?labels={os.path.join(images, _IMAGE_LABELS)}',
    'video_classes': VIDEO_CLASSES,
    'image_classes': IMAGE_CLASSES,
    'video_labels': VIDEO_LABELS,
    'image_labels': IMAGE_LABELS,
    'clips': num_records,
    'images': params['images'],
  }


def _ready(root: str, params: dict) -> dict | None:
  """The result when `root` holds finished data for `params`; None when it must be (re)made."""
  marker = fileio.read_json(os.path.join(root, _MARKER))
  if marker is None:
    return None
  _check_params(root, marker['params'], params)
  shards = [os.path.join(root, 'records', name) for name in marker['shards']]
  # Made, then partly deleted by hand: remake what is missing rather than fail in the trainer.
  if not all(map(os.path.exists, shards + [os.path.join(root, 'images', _IMAGE_LABELS)])):
    return None
  return _result(root, shards, marker['clips'], params)


def _check_params(root: str, old: dict | None, new: dict) -> None:
  if old is None or old == new:
    return
  # A parameter left out of the marker has its default (see `policy` in ensure).
  implied = {'policy': SELECTION_OPTIONS['policy']}
  value = lambda params, key: params.get(key, implied.get(key))
  changed = [
    f'{key}={value(old, key)!r} there, {value(new, key)!r} asked'
    for key in sorted(set(old) | set(new))
    if value(old, key) != value(new, key)
  ]
  raise ValueError(
    f'{root} holds built-in data made with other parameters '
    f'({"; ".join(changed)}); use another root, or delete {root} to remake it'
  )


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def _make_videos(root: str, params: dict, say) -> str:
  folder = os.path.join(root, 'videos')
  names = [f'clip-{i:05d}.mp4' for i in range(params['clips'])]

  def make(i: int) -> tuple[bytes, tuple[int, ...]]:
    clip = synthetic.make_clip(
      item_seed(params['seed'], _VIDEO_STREAM, i),
      num_frames=NUM_FRAMES,
      bframes=2,
      num_objects=1,
      background='pan' if i % 2 else 'static',
    )
    return clip.data, video_labels(clip.labels)

  labels = _make_files(folder, names, make, _video_ok, 'clips', VIDEO_LABELS, say)
  list_file = os.path.join(folder, _LIST)
  _write_if_changed(
    list_file,
    ''.join(f'{name}\t{",".join(map(str, ids))}\n' for name, ids in zip(names, labels)).encode(),
  )
  return list_file


def _make_records(
  root: str, list_file: str, params: dict, workers: int, progress: bool, say
) -> tuple[list[str], int]:
  out_dir = os.path.join(root, 'records')
  say(f'precomputing codec selections (budget {params["budget"]}, {workers} worker(s))')
  kwargs = dict(
    options={
      **SELECTION_OPTIONS,
      'budget': params['budget'],
      'policy': params.get('policy', SELECTION_OPTIONS['policy']),
    },
    clips_per_shard=CLIPS_PER_SHARD,
    workers=workers,
    progress=progress,
    # Pixels in the records: training reads them instead of decoding the clips, so
    # the tiny demo model is not input-bound on 2 cores.
    store_patches=True,
  )
  try:
    summary = precompute.precompute(list_file, out_dir, **kwargs)
  except precompute.PlanMismatch as e:
    # The parameters are checked already, so the records are of this data at another path
    # (the folder was moved) or of an older selection: they are ours to redo.
    say(f'redoing the selections ({e})')
    summary = precompute.precompute(list_file, out_dir, overwrite=True, **kwargs)
  if summary['records'] < 2:
    raise RuntimeError(
      f'only {summary["records"]} of {params["clips"]} built-in clips have a '
      f'codec selection (2 needed); the reasons are in '
      f'{summary["failure_manifest"]}'
    )
  if summary['failures']:
    say(f'{summary["failures"]} clip(s) failed the selection; see {summary["failure_manifest"]}')
  say(f'{summary["records"]} clip selections in {out_dir}')
  return precompute.shard_files(out_dir), summary['records']


def _make_images(root: str, params: dict, say) -> None:
  folder = os.path.join(root, 'images')
  names = [f'img-{i:05d}.png' for i in range(params['images'])]

  def make(i: int) -> tuple[bytes, tuple[int, ...]]:
    # A 1-frame clip is the still: the same renderer and classes as the videos, and the 1-frame
    # encode it pays for is a few milliseconds.
    clip = synthetic.make_clip(
      item_seed(params['seed'], _IMAGE_STREAM, i),
      num_frames=1,
      height=RESOLUTION,
      width=RESOLUTION,
      num_objects=1,
      keep_frames=True,
    )
    return _png(clip.frames[0]), image_labels(clip.labels)

  labels = _make_files(folder, names, make, _image_ok, 'images', IMAGE_LABELS, say)
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(labels, np.int32).reshape(len(names), IMAGE_LABELS))
  _write_if_changed(os.path.join(folder, _IMAGE_LABELS), buffer.getvalue())


def _make_files(
  folder: str,
  names: Sequence[str],
  make: Callable[[int], tuple],
  usable: Callable[[str], bool],
  what: str,
  num_labels: int,
  say,
) -> list[tuple[int, ...]]:
  """Each file of `names` (reused when logged and usable, else made); their labels in order.

  `make(i)` returns (file bytes, label ids). A file is written by rename and then logged with
  its labels, so a file in the log is complete and its labels need no re-rendering.
  """
  os.makedirs(folder, exist_ok=True)
  fileio.remove_stale_temporaries(folder)  # left by a killed run; we hold the lock
  log_path = os.path.join(folder, _LOG)
  logged = _read_log(log_path, num_labels)
  start, reused, labels = time.perf_counter(), 0, []
  with open(log_path, 'a', encoding='utf-8') as log:
    for i, name in enumerate(names):
      path = os.path.join(folder, name)
      if name in logged and usable(path):
        labels.append(logged[name])
        reused += 1
        continue
      data, ids = make(i)
      fileio.write_atomic(path, data)
      log.write(f'{name}\t{",".join(map(str, ids))}\n')
      log.flush()
      labels.append(tuple(ids))
  say(
    f'{len(names)} {what} in {folder} ({len(names) - reused} made, {reused} reused, '
    f'{time.perf_counter() - start:.1f} s)'
  )
  return labels


def _read_log(path: str, num_labels: int) -> dict[str, tuple[int, ...]]:
  """name -> label ids of the complete lines of a log (a killed run may leave half a line)."""
  entries = {}
  try:
    with open(path, encoding='utf-8') as f:
      for line in f:
        name, _, ids = line.rstrip('\n').partition('\t')
        try:
          values = tuple(int(x) for x in ids.split(','))
        except ValueError:
          continue
        if line.endswith('\n') and len(values) == num_labels:
          entries[name] = values
  except FileNotFoundError:
    pass
  return entries


def _video_ok(path: str) -> bool:
  """The clip decodes, all of its frames (a cheap check: ~10 ms for 64 frames at 224)."""
  try:
    container = video_lib.open_video(path)
    with container:
      return sum(1 for _ in container.decode(video=0)) == NUM_FRAMES
  except Exception:  # pylint: disable=broad-except  -- anything unreadable is simply remade
    return False


def _image_ok(path: str) -> bool:
  from PIL import Image

  try:
    with Image.open(path) as image:
      image.load()
      return image.size == (RESOLUTION, RESOLUTION)
  except Exception:  # pylint: disable=broad-except
    return False


def _png(rgb: np.ndarray) -> bytes:
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(rgb).save(buffer, format='PNG')
  return buffer.getvalue()


def _write_if_changed(path: str, data: bytes) -> None:
  """Leaves an identical file alone: a resumed run then changes nothing it need not change."""
  try:
    with open(path, 'rb') as f:
      if f.read() == data:
        return
  except FileNotFoundError:
    pass
  fileio.write_atomic(path, data)
