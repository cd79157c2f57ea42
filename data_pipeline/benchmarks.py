"""Video benchmarks for the attentive probe: clip lists, TFDS and Hugging Face sources, recipes.

A benchmark split is a list of `ProbeClip`s (a video, its class, optionally a segment of it),
read from one of:

  /data/ssv2_hevc/ssv2_train_new.csv       a video list as the release's probe lists: one clip per
  list:/data/lists/train.csv?root=/videos  line, `path,label` or `path,label,start,end` (frame
                                           ids, start inclusive, end exclusive), comma or
                                           whitespace separated; a relative path is joined to
                                           `root` (default: the list's own folder, as the
                                           release joins its data_root)
  tfds:ucf101?split=train&data_dir=/tfds   a TFDS video dataset (`video` frames [T, H, W, 3],
         &video=video&label=label          `label`); read with tfds.data_source, no TensorFlow
  hf:/data/hmdb_hf?split=train             a Hugging Face `datasets` dataset saved with
         &video=video&label=label          save_to_disk (or a hub name, read from the cache);
                                           `video` a path, bytes, {'path'|'bytes'} or frames

`open_clips(spec)` reads any of them; `clips_from_examples(examples)` is the shared adapter for
example dicts (what TFDS and `datasets` yield), so a dataset object already in hand works too.

`BENCHMARKS` holds the recipe of each benchmark of the paper's table, as the release's
eval_encoder/shells_eval_ap/common_codec.sh and attentive_probe_codec.py run it: class count,
batch size per device (8 devices), epochs, learning rates, and the list files under the
release's data_root layout (`<name>_hevc/train_new.csv`, ...). The release's "val" list is the
split it reports on: here it is the test split, and the probe's validation split is carved
from the training list (docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# The release's device count: its per-device batch sizes times this are the global batches.
RELEASE_DEVICES = 8


@dataclasses.dataclass(frozen=True)
class ProbeClip:
  """One labelled clip: `video` a path, the bytes of a file, or frames uint8 [T, H, W, 3];
  `start` / `end` a segment of it in frame ids (end exclusive; None: the whole video)."""

  video: Any
  label: int
  start: int | None = None
  end: int | None = None
  name: str = ''


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A benchmark's probe recipe (the release's values; `batch_size` is per device)."""

  name: str
  num_classes: int
  batch_size: int
  epochs: int
  folder: str  # under data_root
  train_list: str = 'train_new.csv'
  test_list: str = 'val_new.csv'
  learning_rates: tuple[float, ...] = (1e-4,)

  @property
  def global_batch_size(self) -> int:
    return self.batch_size * RELEASE_DEVICES

  def lists(self, data_root: str) -> tuple[str, str]:
    """(train list, test list) under `data_root`."""
    folder = os.path.join(os.path.expanduser(data_root), self.folder)
    return os.path.join(folder, self.train_list), os.path.join(folder, self.test_list)


def _recipe(name: str, num_classes: int, batch_size: int, epochs: int, **kw) -> Benchmark:
  return Benchmark(name, num_classes, batch_size, epochs, folder=f'{name}_hevc', **kw)


# The paper's eight video sets (the release's DEFAULT_DATASETS, class counts of its
# nb_classes_map, get_batch_size and get_epochs of common_codec.sh).
BENCHMARKS = {
  b.name: b
  for b in (
    _recipe('ssv2', 174, 4, 10, train_list='ssv2_train_new.csv', test_list='ssv2_val_new.csv'),
    _recipe(
      'diving48', 48, 4, 30, train_list='diving48_train_new.csv', test_list='diving48_val_new.csv'
    ),
    _recipe('perception_test', 63, 4, 30),
    _recipe('epic_verb', 97, 16, 10),
    _recipe('epic_noun', 300, 16, 10),
    _recipe('hmdb51', 51, 2, 30),
    _recipe('k400', 400, 16, 10),
    _recipe('charadesego', 157, 16, 10),
  )
}
# The input modes of the paper's comparison: codec selections at the 8- and 16-frame budgets
# (release_probe selection) and 8 / 16 uniform frames.
PAPER_MODES = ('codec:2048', 'codec:4096', 'uniform:8', 'uniform:16')


class BenchmarkError(ValueError):
  """A benchmark source that cannot be read; the message names the file / spec and the fix."""


# ------------------------------------------------------------------------------------------------
# Video lists
# ------------------------------------------------------------------------------------------------


def read_video_list(path: str, root: str | None = None) -> list[ProbeClip]:
  """The clips of a release-format list: `path,label[,start,end]` per line."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise BenchmarkError(
      f'{path}: no such video list; give a file of `path,label[,start,end]` '
      "lines (the release's probe lists)"
    )
  root = os.path.dirname(os.path.abspath(path)) if root is None else os.path.expanduser(root)
  clips = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      fields = [x.strip() for x in (line.split(',') if ',' in line else line.split())]
      if len(fields) not in (2, 4):
        raise BenchmarkError(
          f'{path}:{number}: {line!r} has {len(fields)} field(s); expected '
          '`path,label` or `path,label,start,end`'
        )
      try:
        label = int(fields[1])
        start, end = (int(fields[2]), int(fields[3])) if len(fields) == 4 else (None, None)
      except ValueError:
        raise BenchmarkError(
          f'{path}:{number}: {line!r}: label, start and end must be integers'
        ) from None
      if label < 0 or (start is not None and not 0 <= start < end):
        raise BenchmarkError(f'{path}:{number}: {line!r}: a label >= 0 and 0 <= start < end')
      video = fields[0] if os.path.isabs(fields[0]) else os.path.join(root, fields[0])
      clips.append(ProbeClip(video, label, start, end, name=f'{path}:{number}'))
  if not clips:
    raise BenchmarkError(f'{path}: the list holds no clip')
  return clips


def write_video_list(path: str, clips: Iterable[ProbeClip], root: str = '') -> str:
  """Writes clips (paths relative to `root` when under it) as a release-format list."""
  from data_pipeline import fileio

  lines = []
  for clip in clips:
    where = os.fspath(clip.video)
    if root and os.path.abspath(where).startswith(os.path.abspath(root) + os.sep):
      where = os.path.relpath(where, root)
    segment = f',{clip.start},{clip.end}' if clip.start is not None else ''
    lines.append(f'{where},{clip.label}{segment}\n')
  fileio.write_atomic(path, ''.join(lines).encode())
  return path


# ------------------------------------------------------------------------------------------------
# Example datasets (TFDS, Hugging Face datasets)
# ------------------------------------------------------------------------------------------------


def _video_of(value: Any, where: str) -> Any:
  """A clip's video from an example field: a path, bytes, {'path'|'bytes'} or frames."""
  if isinstance(value, Mapping):
    value = value.get('bytes') or value.get('path')
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (str, os.PathLike, bytes, bytearray)):
    return value
  frames = np.asarray(value)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise BenchmarkError(
      f'{where}: the video field holds {type(value).__name__} of shape '
      f'{frames.shape}; expected a path, file bytes or frames [T, H, W, 3]'
    )
  return frames.astype(np.uint8)


def clips_from_examples(
  examples: Sequence[Mapping[str, Any]],
  *,
  video: str = 'video',
  label: str = 'label',
  start: str = '',
  end: str = '',
  name: str = 'dataset',
) -> list[ProbeClip]:
  """Clips of example dicts (a TFDS data source, a `datasets.Dataset`, a list of dicts)."""
  clips = []
  for i in range(len(examples)):
    example = examples[i]
    where = f'{name}[{i}]'
    missing = [k for k in (video, label, start, end) if k and k not in example]
    if missing:
      raise BenchmarkError(
        f'{where}: no field {missing[0]!r} (fields: {sorted(example)}); name '
        'the video and label fields with video= and label='
      )
    segment = (int(example[start]), int(example[end])) if start and end else (None, None)
    clips.append(
      ProbeClip(_video_of(example[video], where), int(example[label]), *segment, name=where)
    )
  return clips


def _hf_dataset(path: str, split: str):
  try:
    import datasets  # optional: pip install datasets (not among ove_jax's pins)
  except ImportError:
    raise BenchmarkError(
      f'hf:{path}: the Hugging Face `datasets` package is not installed '
      '(pip install datasets), or pass the dataset object to '
      'clips_from_examples'
    ) from None
  if os.path.isdir(os.path.expanduser(path)):
    loaded = datasets.load_from_disk(os.path.expanduser(path))
    return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
  return datasets.load_dataset(path, split=split)


def _tfds_dataset(name: str, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds

  from data_pipeline.sources import tfds_dataset_folder

  try:
    folder = tfds_dataset_folder(name, data_dir)
  except FileNotFoundError as e:
    raise BenchmarkError(str(e)) from None
  if folder is not None:
    return tfds.builder_from_directory(folder).as_data_source(split)
  return tfds.data_source(name, split=split, data_dir=data_dir)


def open_clips(spec: str, root: str | None = None) -> list[ProbeClip]:
  """The clips of a source spec (see the module docstring)."""
  kind, sep, rest = spec.partition(':')
  if not sep or kind not in ('list', 'tfds', 'hf'):
    return read_video_list(spec, root)
  path, _, query = rest.partition('?')
  options = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
  allowed = {
    'list': {'root'},
    'tfds': {'split', 'data_dir', 'video', 'label', 'start', 'end'},
    'hf': {'split', 'video', 'label', 'start', 'end'},
  }[kind]
  unknown = sorted(set(options) - allowed)
  if unknown:
    raise BenchmarkError(
      f'{spec}: unknown option(s) {unknown}; {kind}: takes {", ".join(sorted(allowed))}'
    )
  if kind == 'list':
    return read_video_list(path, options.get('root', root))
  fields = {
    k: options.get(k, d)
    for k, d in (('video', 'video'), ('label', 'label'), ('start', ''), ('end', ''))
  }
  split = options.get('split', 'train')
  examples = (
    _tfds_dataset(path, split, options.get('data_dir'))
    if kind == 'tfds'
    else _hf_dataset(path, split)
  )
  return clips_from_examples(examples, name=f'{kind}:{path}[{split}]', **fields)
