"""Image corpora into the ArrayRecord shards the image and OCR heads read.

`precompute_images` lists the images of a source, checks each one in a pool of processes and
writes one image record (`data_pipeline.records`: `image` bytes, `labels` int32 [n], `source`)
per good image. It is the video precompute's run (`data_pipeline.precompute`: the plan, resume,
the failure manifest failures.jsonl, the lock, the task split and `check`) with an image's work
in place of a clip's; `tools/precompute_images.py` (`ove-precompute-images`) is its command line.

Sources (`list_images`):
  folder      every image file below it (`sources.IMAGE_EXTENSIONS`); labels from a .npy with a
              row per image in sorted relative-path order, or the class-per-subfolder index
              (the conventions of `sources.ImageFolderSource`), or none
  list file   one path per line, optionally a tab and label ids (`precompute.read_inputs`:
              every line or none, ids >= 0)
  tar set     webdataset shards ('shard-{000..009}.tar', globs, comma-separated): the members
              key.jpg / key.jpeg / key.png / key.webp of one key are its image, key.cls (ids in
              text) or key.json (`json_label_key`) its labels
  parquet     '*.parquet' files (a Hugging Face dataset's parquet files too): an image column of
              bytes or of {bytes, path} structs (the `datasets` Image feature), optional label
              columns of ints or lists of ints

What is kept, converted or rejected (`prepare_image`), so that every record decodes with the
trainer's `transforms.decode_image` to the pixels meant:
  kept as is      8-bit images ('1', L, LA, P, PA, RGB, RGBA): the file's own bytes
  converted       CMYK and YCbCr -> RGB; 16-bit grey (I;16*, and I within 0..65535) -> 8-bit
                  grey by the high byte (pillow's own RGB conversion of these clips every value
                  above 255 to white); stored as lossless PNG
  rejected        not an image, truncated or corrupt data, an empty file, more pixels than
                  `max_pixels` (a decompression bomb; checked from the header, before decoding),
                  other modes (32-bit float, I beyond 16 bits, LAB, HSV), a bad label
A rejected image is a failure manifest entry {"file", "reason", "shard"}, never an exception; so
is the damage of a tar (`shard.tar#(rest)`) or an unreadable parquet file (`part.parquet#(file)`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import os
import re
import tarfile
import time
import warnings
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipeline import paths, precompute, shards, sources
from data_pipeline import workers as workers_lib
from data_pipeline.clip_work import Clip, Done, Failed, failure_reason

TAR_IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
IMAGE_COLUMNS = ('image', 'jpg', 'png', 'webp', 'img', 'image_bytes')
# Shard files end in .array_record, so OUT/NAME-*.array_record names them (the experiments'
# '/data/laion-*.array_record').
SHARD_TEMPLATE = '{name}-{split}-{index:05d}-of-{num_shards:05d}.array_record'
KEEP_MODES = ('1', 'L', 'LA', 'P', 'PA', 'RGB', 'RGBA')
RGB_MODES = ('CMYK', 'YCbCr')
SIXTEEN_BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # pillow's own bomb limit: 89,478,485 pixels
KINDS = ('folder', 'list', 'tar', 'parquet')


class ImageError(ValueError):
  """A bad image (expected in a corpus): listed in the failure manifest."""


@dataclasses.dataclass(frozen=True)
class ImageItem(Clip):
  """One input image: `path` names it ('file', 'shard.tar#key.jpg', 'part.parquet#row').

  container: the tar or parquet file holding it ('': `path` is the file itself).
  offset, size: tar: where the member's data starts and its length; parquet: the row group and
    the row within it.
  problem: a fault found while listing (a bad label); the image fails with it.
  """

  container: str = ''
  offset: int = 0
  size: int = 0
  problem: str = ''


@dataclasses.dataclass(frozen=True)
class ImageSettings:
  """What every image of a run shares (sent once to each worker)."""

  max_pixels: int = DEFAULT_MAX_PIXELS
  image_column: str = ''
  record_format: str = 'records'  # what Run.finish reads; image corpora are always 'records'


# ---------------------------------------------------------------------------------------------
# Listing a source
# ---------------------------------------------------------------------------------------------


def source_kind(source: str) -> str:
  """'folder', 'list', 'tar' or 'parquet', from what `source` names (locally or in a bucket)."""
  url = paths.is_url(source)
  problem = paths.input_problem(source)
  if problem:
    raise FileNotFoundError(f'{source}: {problem}')
  if not url and os.path.isdir(os.path.expanduser(source)):
    return 'folder'
  last = re.split(r',(?![^{]*\})', source)[-1].strip().lower()
  if last.endswith('.tar'):
    return 'tar'
  if last.endswith('.parquet'):
    return 'parquet'
  if paths.isfile(source):
    return 'list'
  if url and paths.isdir(source):  # a prefix with objects under it
    return 'folder'
  raise FileNotFoundError(
    f'{source}: not a folder (or a bucket prefix with objects under it), a list file, .tar '
    'files or .parquet files; give one of those (or name the kind with --kind)'
  )


def parse_label_ids(value: Any, where: str) -> tuple[int, ...]:
  """Label ids from an int, a list of ints, or text of ints separated by commas or spaces."""
  if isinstance(value, (bytes, bytearray)):
    value = value.decode('utf-8', 'replace')
  shown = value
  if isinstance(value, str):
    value = [v for v in re.split(r'[,\s]+', value.strip()) if v]
  elif not isinstance(value, (list, tuple, np.ndarray)):
    value = [value]
  try:
    ids = tuple(int(v) for v in value if not isinstance(v, bool) and float(v) == int(v))
  except (TypeError, ValueError):
    raise ImageError(f'{where}: label {shown!r} is not integer ids') from None
  if not ids or len(ids) != len(value) or min(ids) < 0:
    raise ImageError(f'{where}: label {shown!r} is not non-negative integer ids')
  return ids


def folder_items(root: str, labels: str | None) -> list[ImageItem]:
  """A folder's images; `labels` None (unlabelled), 'folders' (class per top subfolder) or the
  path of a labels .npy (the order and rules of `sources.ImageFolderSource`)."""
  if labels is None:
    return [ImageItem(c.path) for c in precompute.read_inputs(root, sources.IMAGE_EXTENSIONS)]
  folder = sources.ImageFolderSource(root, None if labels == 'folders' else labels)
  return [
    ImageItem(paths.absolute(paths.join(folder.root, f)), tuple(map(int, row)))
    for f, row in zip(folder.files, folder.labels)
  ]


def tar_items(path: str, json_label_key: str = 'label') -> list[ImageItem]:
  """The samples of one webdataset tar: one item per key with an image member."""
  found: dict[str, dict[str, Any]] = collections.OrderedDict()
  problem = ''
  try:
    with paths.open_file(path, 'rb') as f, tarfile.open(fileobj=f, mode='r:') as tar:
      # Uncompressed only: members are read by offset (in a bucket, by range).
      for member in tar:
        if not member.isfile():
          continue
        folder, base = os.path.split(member.name)
        key, _, ext = base.partition('.')
        sample = found.setdefault(os.path.join(folder, key), {})
        ext = ext.lower()
        if ext in TAR_IMAGE_EXTENSIONS and 'image' not in sample:
          sample['image'] = member
        elif ext in ('cls', 'json'):
          sample[ext] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    problem = (
      f'{path}: unreadable tar after {len(found)} samples ({type(e).__name__}: {e}); '
      'a compressed tar must be decompressed first'
    )
  items = []
  for key, sample in found.items():
    if 'image' not in sample:
      continue
    member = sample['image']
    where = f'{path}#{member.name}'
    labels, fault = None, ''
    try:
      if 'cls' in sample:
        labels = parse_label_ids(sample['cls'], f'{path}#{key}.cls')
      elif 'json' in sample:
        meta = json.loads(sample['json'])
        if isinstance(meta, dict) and json_label_key in meta:
          labels = parse_label_ids(meta[json_label_key], f'{path}#{key}.json')
    except (ImageError, ValueError) as e:
      fault = str(e)
    items.append(ImageItem(where, labels, path, member.offset_data, member.size, fault))
  if problem:
    items.append(ImageItem(f'{path}#(rest)', None, path, problem=problem))
  return items


def parquet_items(path: str, image_column: str, label_columns: Sequence[str]) -> list[ImageItem]:
  """One item per row of a parquet file (labels read now; image bytes by the workers). A file
  pyarrow cannot read (not parquet, truncated) is one item `path#(file)` that fails, as the
  damage of a tar is: the other files' images go on."""
  errors = parquet_errors()
  try:
    meta = parquet_file(path)
    names = meta.schema_arrow.names
  except errors as e:
    return [unreadable_parquet(path, e)]
  missing = [c for c in (image_column, *label_columns) if c not in names]
  if missing:
    raise ValueError(
      f'{path}: no column(s) {missing}; it has {names} (set --image-column / --label-column)'
    )
  try:
    table = meta.read(columns=list(label_columns)) if label_columns else None
  except errors as e:
    return [unreadable_parquet(path, e)]
  columns = [table.column(c).to_pylist() for c in label_columns] if table is not None else []
  items, row = [], 0
  for group in range(meta.num_row_groups):
    for j in range(meta.metadata.row_group(group).num_rows):
      labels, fault = None, ''
      if columns:
        try:
          labels = sum(
            (
              parse_label_ids(col[row], f'{path}#{row} column {name!r}')
              for col, name in zip(columns, label_columns)
            ),
            (),
          )
        except ImageError as e:
          fault = str(e)
      items.append(ImageItem(f'{path}#{row}', labels, path, group, j, fault))
      row += 1
  return items


def parquet_file(path: str):
  """pyarrow's ParquetFile of a local file or an object in a bucket (read by range)."""
  import pyarrow.parquet as pq

  return pq.ParquetFile(paths.open_file(path, 'rb') if paths.is_url(path) else path)


def parquet_errors() -> tuple[type[Exception], ...]:
  """What pyarrow raises for a file it cannot read: ArrowInvalid (not parquet, 0 bytes,
  truncated), OSError (a folder, no permission) and its other errors."""
  import pyarrow as pa

  return (OSError, pa.ArrowException)


def unreadable_parquet(path: str, error: Exception) -> ImageItem:
  return ImageItem(
    f'{path}#(file)',
    None,
    path,
    problem=f'{path}: unreadable parquet file ({type(error).__name__}: {error}); none of its '
    'images are read',
  )


def parquet_image_column(files: Sequence[str], image_column: str | None) -> str:
  """The image column: the one named, else the first of IMAGE_COLUMNS the first readable file
  has (unreadable files are failures of their own: `parquet_items`)."""
  if image_column:
    return image_column
  for path in files:
    try:
      names = parquet_file(path).schema_arrow.names
    except parquet_errors():
      continue
    for name in IMAGE_COLUMNS:
      if name in names:
        return name
    raise ValueError(
      f'{path}: none of the columns {names} is an image column I know '
      f'({", ".join(IMAGE_COLUMNS)}); name it with --image-column'
    )
  raise ValueError(
    f'{files[0]}: pyarrow reads none of the {len(files)} parquet file(s) given; check that they '
    'are parquet files (not cut short)'
  )


def list_images(
  source: str,
  kind: str | None = None,
  labels: str | None = None,
  json_label_key: str = 'label',
  image_column: str | None = None,
  label_columns: Sequence[str] = (),
) -> tuple[list[ImageItem], dict]:
  """The images of `source` and what the plan records about how they were listed."""
  kind = kind or source_kind(source)
  if kind not in KINDS:
    raise ValueError(f'kind {kind!r}: one of {KINDS}')
  if kind != 'folder' and not paths.is_url(source) and os.path.isdir(source):
    raise ValueError(
      f'{source}: a folder, but kind {kind!r} reads files ({kind} patterns); give the files, '
      "or kind 'folder' for a folder of images"
    )
  if kind == 'folder' and labels not in (None, 'folders') and not paths.isfile(labels):
    raise FileNotFoundError(
      f'labels {labels}: no such file; give "folders" or a .npy of label ids, a row per image'
    )
  listing: dict[str, Any] = {'kind': kind}
  if kind == 'folder':
    items = folder_items(source, labels)
    listing['labels'] = labels
  elif kind == 'list':
    items = [ImageItem(c.path, c.labels) for c in precompute.read_inputs(source, what='images')]
  elif kind == 'tar':
    items = [i for path in sources.expand_files(source) for i in tar_items(path, json_label_key)]
    listing['json_label_key'] = json_label_key
    # Labels are all or nothing: a sample without one in a labelled set is a failure.
    if any(i.labels for i in items):
      items = [
        i
        if i.labels or i.problem
        else dataclasses.replace(
          i,
          problem=f'{i.path}: no label (key.cls, or key.json field {json_label_key!r}) '
          'where other samples have one',
        )
        for i in items
      ]
  else:
    files = sources.expand_files(source)
    image_column = parquet_image_column(files, image_column)
    items = [i for path in files for i in parquet_items(path, image_column, label_columns)]
    listing.update(image_column=image_column, label_columns=list(label_columns))
  if not items:
    raise FileNotFoundError(f'{source}: no images found')
  return items, listing


# ---------------------------------------------------------------------------------------------
# One image (in the workers)
# ---------------------------------------------------------------------------------------------


def prepare_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, str]:
  """The bytes a record stores for an encoded image, and what was done ('' kept, else the
  conversion); raises ImageError for an image that is rejected (module docstring)."""
  if not data:
    raise ImageError('empty file')
  try:
    with warnings.catch_warnings():
      # Our limit is max_pixels, checked below; pillow still refuses beyond twice its own.
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
      raise ImageError(
        f'decompression bomb: {width} x {height} = {width * height} pixels > '
        f'max_pixels {max_pixels}'
      )
    image.load()  # the full decode: a truncated or corrupt file fails here
  except Image.DecompressionBombError as e:
    raise ImageError(f'decompression bomb: {e}') from None
  except UnidentifiedImageError:
    raise ImageError('not an image pillow can read') from None
  except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
    if isinstance(e, ImageError):
      raise
    raise ImageError(f'corrupt or truncated image ({type(e).__name__}: {e})') from None
  mode = image.mode
  if mode in KEEP_MODES:
    return data, ''
  if mode in RGB_MODES:
    converted = image.convert('RGB')
  elif mode in SIXTEEN_BIT_MODES:
    values = np.asarray(image, dtype=np.int64)
    if values.min() < 0 or values.max() > 0xFFFF:
      raise ImageError(
        f'mode {mode} with values in [{values.min()}, {values.max()}], beyond '
        '16 bits; convert it to 8 bits first'
      )
    converted = Image.fromarray((values >> 8).astype(np.uint8), mode='L')
  else:
    raise ImageError(
      f'mode {mode} is not supported (8-bit, CMYK, YCbCr or 16-bit grey); convert it to RGB first'
    )
  buffer = io.BytesIO()
  converted.save(buffer, format='PNG')
  return buffer.getvalue(), f'{mode} -> {converted.mode}'


# The worker's state: set once per process by `init_image_worker`.
_settings = ImageSettings()
_groups: collections.OrderedDict = collections.OrderedDict()  # (file, group) -> image cells
_GROUPS_KEPT = 2


def init_image_worker(settings: ImageSettings, blas_threads: int = 0) -> None:
  """Makes this process ready to run `process_image` (the pool's initializer)."""
  global _settings
  del blas_threads  # no matrix work here
  _settings = settings
  _groups.clear()
  _close_tar()


def parquet_cell(path: str, group: int, row: int, column: str) -> Any:
  """One image cell of a parquet file (its row group read once and kept: a worker's images
  come in file order unless the plan shuffles them)."""
  key = (path, group)
  if key not in _groups:
    try:
      _groups[key] = (
        parquet_file(path).read_row_group(group, columns=[column]).column(column).to_pylist()
      )
    except parquet_errors() as e:  # kept as text: each image of the group fails without a reread
      _groups[key] = f'{path}: row group {group} unreadable ({type(e).__name__}: {e})'
    while len(_groups) > _GROUPS_KEPT:
      _groups.popitem(last=False)
  if isinstance(_groups[key], str):
    raise ImageError(_groups[key])
  return _groups[key][row]


def _tar_member(path: str, offset: int, size: int) -> bytes:
  """`size` bytes at `offset` of a tar, through one handle kept open per worker for the tar it
  reads (a worker's members come in tar order unless the plan shuffles them: in a bucket, one
  open and the handle's read-ahead instead of two requests a member); dropped on any error."""
  if not _tar_open or _tar_open[0] != path:
    _close_tar()
    _tar_open[:] = [path, paths.open_file(path, 'rb')]
  try:
    _tar_open[1].seek(offset)
    return _tar_open[1].read(size)
  except BaseException:
    _close_tar()
    raise


def _close_tar() -> None:
  if _tar_open:
    with contextlib.suppress(Exception):
      _tar_open[1].close()
    _tar_open.clear()


_tar_open: list = []  # [path, open handle] of the tar this worker last read a member of


def read_image_bytes(item: ImageItem) -> bytes:
  """The encoded image an item names: a file (or an object in a bucket), a tar member or a
  parquet cell."""
  if not item.container:
    if paths.is_url(item.path):
      return paths.read_bytes(item.path)
    with open(item.path, 'rb') as f:
      return f.read()
  if item.container.endswith('.parquet'):
    cell = parquet_cell(item.container, item.offset, item.size, _settings.image_column)
    if isinstance(cell, dict):  # the `datasets` Image feature: {'bytes': ..., 'path': ...}
      cell = cell.get('bytes')
    if cell is None:
      raise ImageError('no image bytes in the cell (null, or a path instead of bytes)')
    if not isinstance(cell, (bytes, bytearray)):
      raise ImageError(f'the image cell holds {type(cell).__name__}, not bytes')
    return bytes(cell)
  data = _tar_member(item.container, item.offset, item.size)
  if len(data) != item.size:
    raise ImageError(f'tar member cut short: {len(data)} of {item.size} bytes')
  return data


def process_image(item: ImageItem) -> Done | Failed:
  """Check one image and encode its record; every error becomes a Failed naming the image."""
  start = time.perf_counter()
  try:
    if item.problem:
      raise ImageError(item.problem)
    data, _ = prepare_image(read_image_bytes(item), _settings.max_pixels)
    record = {'image': data, 'source': item.path}
    if item.labels is not None:
      record['labels'] = np.asarray(item.labels, np.int32)
    entry = shards.encode_entry(record, 'records')
  except Exception as e:  # pylint: disable=broad-except  -- one bad image must not stop the run
    # FileNotFoundError and the like are bad inputs too; only bugs should look unexpected.
    return Failed(failure_reason(item.path, e), isinstance(e, (ImageError, OSError)))
  return Done(entry, kept=0, candidates=0, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def precompute_images(
  source: str,
  out_dir: str,
  *,
  kind: str | None = None,
  labels: str | None = None,
  json_label_key: str = 'label',
  image_column: str | None = None,
  label_columns: Sequence[str] = (),
  images_per_shard: int = 10000,
  num_shards: int | None = None,
  shuffle_seed: int | None | str = 'auto',
  workers: int | None = None,
  max_pixels: int = DEFAULT_MAX_PIXELS,
  image_timeout: float | None = 60.0,
  name: str = 'images',
  split: str = 'train',
  overwrite: bool = False,
  progress: bool = True,
  max_shards: int | None = None,
  task_index: int = 0,
  num_tasks: int = 1,
  retry_failures: bool = False,
) -> dict:
  """Runs (or resumes) an image corpus into `out_dir`; returns the summary (its `clips` are
  images).

  Args:
    source: a folder, a list file, tar patterns or parquet patterns (module docstring).
    kind: 'folder', 'list', 'tar' or 'parquet'; None: from `source`.
    labels: folders only: None, 'folders' or a labels .npy.
    json_label_key: tar sets: the field of key.json holding the label ids.
    image_column, label_columns: parquet: the image column (None: the first known name) and
      the label columns (their ids concatenated in order).
    images_per_shard / num_shards: shard size, or the shard count directly.
    shuffle_seed: seed of the write-time shuffle; None keeps the source order; 'auto': 0 for
      folders and lists, None for tar sets and parquet (their images are read in order, and
      the trainer's pipeline shuffles globally anyway).
    workers: processes (default: the usable CPUs); 0 runs in this process.
    max_pixels: larger images are rejected as decompression bombs.
    image_timeout: seconds an image may take before its worker is killed (None: no limit).
    name, split: they name the shards: OUT/{name}-{split}-00000-of-000NN.array_record.
    overwrite, progress, max_shards, task_index, num_tasks, retry_failures: as in
      `precompute.precompute`.
  """
  precompute.check_run_arguments(
    out_dir, name, split, 'records', image_timeout, task_index, num_tasks, overwrite
  )
  if not 0 < max_pixels <= 2 * DEFAULT_MAX_PIXELS:
    raise ValueError(
      f'max_pixels={max_pixels}: between 1 and {2 * DEFAULT_MAX_PIXELS} (beyond '
      'it pillow refuses the image whatever we allow)'
    )
  items, listing = list_images(source, kind, labels, json_label_key, image_column, label_columns)
  if shuffle_seed == 'auto':
    shuffle_seed = 0 if listing['kind'] in ('folder', 'list') else None
  if workers is None:
    workers = workers_lib.usable_cpus()
  planned = precompute.plan_shards(
    items, num_shards or precompute.num_shards_for(len(items), images_per_shard), shuffle_seed
  )
  settings = ImageSettings(int(max_pixels), listing.get('image_column', ''))
  common = {
    'work': 'images',
    'source': listing,
    'max_pixels': int(max_pixels),
    'format': 'records',
    'shard_template': SHARD_TEMPLATE,
  }
  plan = precompute.make_plan(items, planned, name, split, shuffle_seed, common)
  return precompute.run_plan(
    out_dir,
    plan,
    planned,
    task_index,
    num_tasks,
    overwrite,
    retry_failures,
    lambda run: run.execute(
      settings,
      workers,
      image_timeout,
      max_shards,
      progress,
      work=process_image,
      initializer=init_image_worker,
      unit='image',
    ),
  )
