"""Random-access record sources for the Grain pipeline: ArrayRecord shards, image folders, TFDS.

Every source is a sequence (len, getitem) whose item i is a small dict:
  index  int          i, the record's place in the source (it reaches the batch as `sample_index`)
  name   str          where the record lives, for warnings and errors: 'shard.array_record#12'
  raw    bytes | dict a `records.encode` payload, or a record dict; `to_record` gives the dict

Reading the raw bytes is all a source does; decoding happens in the transform, inside the
pipeline's error handling, so one corrupt record cannot stop the pipeline. Sources are picklable
(Grain's worker processes start by spawn): readers reopen lazily in each process.

`open_source(spec)` picks a source from a config string:
  '/data/train-*.array_record' (one or more comma-separated globs)   ArrayRecord shards, sorted
  'folder:/data/images'                                              an image folder
  'folder:gs://bucket/images'                                        ... or a bucket prefix
  'folder:/data/images?labels=/data/labels.npy'                      ... with cluster labels
  'tfds:my_dataset/config:1.0.0?split=train&data_dir=/data/tfds'     a TFDS ArrayRecord build
  'tfds:ove_codec?data_dir=/data/ove_codec_tfds'                     ... data_dir may also be the
                                                                     dataset's own folder
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import re
import urllib.parse
from typing import Any, Sequence

import numpy as np

from data_pipeline import fileio, paths, records

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
  """Sorted files matching each glob (comma-separated in a string; local or `gs://`, `s3://`
  URLs: data_pipeline.paths); a pattern matching nothing is an error, so a typo cannot silently
  train on less data."""
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(',') if p.strip()]
  found = []
  for pattern in patterns:
    matched = paths.glob(pattern)
    if not matched:
      raise FileNotFoundError(f'no files match {pattern!r}')
    found.extend(matched)
  return found


def expand_braces(pattern: str) -> list[str]:
  """'shard-{000..009}.tar' -> shard-000.tar ... shard-009.tar (widths kept), '{a,b}' -> both;
  the first brace group is expanded, then the rest recursively."""
  match = re.search(r'\{([^{}]*)\}', pattern)
  if match is None:
    return [pattern]
  head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
  numbers = re.fullmatch(r'(\d+)\.\.(\d+)', body)
  if numbers:
    lo, hi = numbers.groups()
    width = len(lo) if lo.startswith('0') else 0
    choices = [f'{i:0{width}d}' for i in range(int(lo), int(hi) + 1)]
  else:
    choices = body.split(',')
  return [p for c in choices for p in expand_braces(head + c + tail)]


def expand_files(spec: str) -> list[str]:
  """The files of comma-separated brace patterns / globs (the image precompute's tar and parquet
  sources), each pattern's matches sorted: local paths made absolute, objects in a bucket
  (gs://, s3://) as URLs; a pattern that matches nothing is an error naming it."""
  files = []
  # Commas inside braces belong to the brace group, not to the list of patterns.
  for part in re.split(r',(?![^{]*\})', spec):
    for pattern in expand_braces(part.strip()):
      if paths.is_url(pattern):
        wild = any(c in pattern for c in '*?[')
        matched = paths.glob(pattern) if wild else [pattern] * paths.isfile(pattern)
      else:
        matched = [os.path.abspath(p) for p in sorted(glob.glob(os.path.expanduser(pattern)))]
      if not matched:
        raise FileNotFoundError(f'no files match {pattern!r} (of {spec!r})')
      files.extend(matched)
  return files


def to_record(raw: bytes | dict) -> dict[str, Any]:
  """A source item's `raw` as a record dict (decoding `records.encode` bytes)."""
  if isinstance(raw, (bytes, bytearray, memoryview)):
    return records.decode(bytes(raw))
  if isinstance(raw, dict):
    return raw
  raise TypeError(f'a record is bytes or a dict, not {type(raw).__name__}')


class ArrayRecordSource:
  """Records of ArrayRecord shards, in shard order then record order.

  ArrayRecord's reader opens local files only: shards given as URLs (`gs://...`) are staged
  first, each copied once into `cache_dir` (config `data.local_cache_dir`; default
  `paths.default_cache_dir()`) and read from there; `self.paths` keeps the URLs, for names in
  warnings. A bucket mounted with gcsfuse is read in place instead (give its local path).
  """

  def __init__(self, patterns: str | Sequence[str], cache_dir: str | None = None):
    # Imported here: array_record is only needed by pipelines that read shards.
    from array_record.python import array_record_data_source, array_record_module

    self.paths = expand_paths(patterns)
    local = [paths.stage(p, cache_dir) for p in self.paths]
    counts = []
    for path in local:
      reader = array_record_module.ArrayRecordReader(path)
      counts.append(reader.num_records())
      reader.close()
    self._ends = list(np.cumsum(counts, dtype=np.int64).tolist())
    # Grain's own reader source: thread-safe, picklable, opens each shard lazily per process.
    self._source = array_record_data_source.ArrayRecordDataSource(local)

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def name(self, index: int) -> str:
    shard = bisect.bisect_right(self._ends, index)
    start = self._ends[shard - 1] if shard else 0
    return f'{self.paths[shard]}#{index - start}'

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    return {'index': index, 'name': self.name(index), 'raw': self._source[index]}

  def __repr__(self) -> str:
    return f'ArrayRecordSource({len(self.paths)} shards, {len(self)} records)'


def read_label_table(path: str, rows: int) -> np.ndarray:
  """The int32 [rows, n] label ids of a .npy of shape [rows] or [rows, n]. Ids are whole numbers
  from 0 to 2**31 - 1 (floats that are whole numbers too); anything else is a ValueError naming
  the file and its first bad row, since casting would store 0.5 as 0 and keep -2 as a label."""
  table = fileio.read_arrays(path, 'labels')
  if isinstance(table, dict):
    raise ValueError(f'labels {path}: a .npz; give a .npy of label ids, a row per image')
  shape = table.shape
  if table.ndim == 1:
    table = table[:, None]
  if table.ndim != 2 or len(table) != rows or not table.shape[1]:
    raise ValueError(
      f'labels {path}: shape {shape}; expected [{rows}] or [{rows}, n >= 1], one row per image '
      'in sorted order'
    )
  if table.dtype.kind not in 'iuf':
    raise ValueError(f'labels {path}: dtype {table.dtype}; give integer label ids')
  with np.errstate(invalid='ignore'):
    good = (table >= 0) & (table <= np.iinfo(np.int32).max) & (table == np.floor(table))
  bad = np.flatnonzero(~good.all(axis=1))
  if len(bad):
    raise ValueError(
      f'labels {path}: row {bad[0]} holds {table[bad[0]].tolist()} ({len(bad)} bad row(s)); '
      'label ids are whole numbers >= 0'
    )
  return table.astype(np.int32)


def image_files(root: str) -> list[str]:
  """The image files under a folder or a bucket prefix (recursive), as relative names with '/'
  between their parts, sorted."""
  prefix = root.rstrip('/') + '/' if paths.is_url(root) else None
  found = []
  for path in paths.walk_files(root):
    if path.lower().endswith(IMAGE_EXTENSIONS):
      found.append(path[len(prefix) :] if prefix else os.path.relpath(path, root))
  return sorted(f.replace(os.sep, '/') for f in found)


class ImageFolderSource:
  """Image files under a folder (recursive, sorted by relative path) as image records.

  Labels: `labels` names a .npy of shape [N] or [N, n] ids >= 0 (`read_label_table`), row i for
  the i-th file in sorted order (cluster ids from the k-means tool); without it, the index of the
  file's top-level subfolder among the sorted subfolders is its one label (a class-per-folder
  layout).
  """

  def __init__(self, root: str, labels: str | None = None):
    self.root = root if paths.is_url(root) else os.path.expanduser(root)
    if not paths.isdir(self.root):
      raise FileNotFoundError(f'image folder {self.root!r} does not exist')
    self.files = image_files(self.root)
    if not self.files:
      raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {self.root!r}')
    if labels is not None:
      self.labels = read_label_table(labels, len(self.files))
    else:
      tops = [f.split('/')[0] if '/' in f else None for f in self.files]
      if None in tops:
        raise ValueError(
          f'{self.root}: images directly in the folder have no class; give a '
          'labels .npy or put each class in its own subfolder'
        )
      classes = sorted(set(tops))
      self.labels = np.asarray([[classes.index(t)] for t in tops], np.int32)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    path = paths.join(self.root, self.files[index])
    data = paths.read_bytes(path)
    return {
      'index': index,
      'name': path,
      'raw': {'image': data, 'labels': self.labels[index], 'source': path},
    }

  def __repr__(self) -> str:
    return f'ImageFolderSource({self.root!r}, {len(self)} images)'


def tfds_dataset_folder(name: str, data_dir: str | None) -> str | None:
  """The folder of dataset `name` ('name', 'name:1.0.0', 'name/config:1.0.0') under `data_dir`
  when `data_dir` is the dataset's own folder (its dataset_info.json names it; the layout
  `tools/precompute_codec.py VIDEOS OUT_DIR --format tfds` writes), else None: TFDS's layout
  data_dir/name[/config]/version is TFDS's to find.

  Raises FileNotFoundError when `data_dir` holds neither, instead of TFDS's list of every
  dataset it knows.
  """
  if data_dir is None:
    return None  # a dataset of TFDS's catalogue, in its default folder
  data_dir = os.path.expanduser(data_dir)
  base, _, version = name.partition(':')
  base = base.split('/')[0]
  info_path = os.path.join(data_dir, 'dataset_info.json')
  if os.path.isfile(info_path):
    with open(info_path, encoding='utf-8') as f:
      info = json.load(f)
    if info.get('name') == base and (not version or info.get('version') == version):
      return data_dir
    raise FileNotFoundError(
      f'tfds:{name} with data_dir={data_dir}: that folder is the dataset '
      f'{info.get("name")!r} version {info.get("version")!r}, not {name!r}'
    )
  if not os.path.isdir(os.path.join(data_dir, base)):
    raise FileNotFoundError(
      f'tfds:{name} with data_dir={data_dir}: no dataset there (looked for '
      f'{os.path.join(data_dir, base)}/[config/]VERSION/ and {info_path}); give the folder that '
      'holds dataset_info.json, or its grandparent when it is NAME/VERSION'
    )
  return None


class TfdsSource:
  """A TFDS dataset built with file_format='array_record', read without TensorFlow.

  An example holds either one `record` feature (the bytes of `records.encode`) or the record's
  fields as features; bytes features (`tfds.features.Tensor(shape=(), dtype=np.object_)`) come back
  as bytes.
  """

  def __init__(self, name: str, split: str = 'train', data_dir: str | None = None):
    self.name, self.split, self.data_dir = name, split, data_dir
    self._source = None
    self._length = len(self._open())

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # imported here: slow, and only TFDS sources need it

      folder = tfds_dataset_folder(self.name, self.data_dir)
      if folder is not None:
        builder = tfds.builder_from_directory(folder)
        splits = sorted(builder.info.splits)
        # TFDS's own error names neither the choices nor the fix; slices ('train[:10%]') and
        # unions ('train+val') name their splits before any '['.
        asked = [part.split('[')[0].strip() for part in self.split.split('+')]
        if any(name not in splits for name in asked):
          raise ValueError(
            f'tfds:{self.name} in {folder}: no split {self.split!r}; it has '
            f'{", ".join(splits)}: add &split={splits[0]} (or ?split=) to the source'
          )
        self._source = builder.as_data_source(self.split)
      else:
        try:
          self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
        except tfds.core.registered.DatasetNotFoundError:
          if self.data_dir is not None:
            raise
          # Instead of TFDS's list of every dataset it knows.
          raise FileNotFoundError(
            f'tfds:{self.name}: not a dataset of the TFDS catalogue; for one that '
            f'ove-precompute-codec --format tfds wrote, give its folder: '
            f"'tfds:{self.name}?data_dir=OUT_DIR'"
          ) from None
    return self._source

  def __getstate__(self):
    # Workers reopen from (name, split, data_dir) rather than unpickling TFDS's builder objects.
    return {**self.__dict__, '_source': None}

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    example = self._open()[index]
    if 'record' in example:
      raw = bytes(example['record'])
    else:
      raw = {key: _plain(value) for key, value in example.items()}
    return {'index': index, 'name': f'tfds:{self.name}[{self.split}]#{index}', 'raw': raw}

  def __repr__(self) -> str:
    return f'TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)'


def _plain(value: Any) -> Any:
  """TFDS feature values as record values: 0-d bytes/object arrays become bytes or str."""
  if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in 'OSU':
    value = value.item()
  return value


def open_source(spec: str | Sequence[str], cache_dir: str | None = None):
  """A source from a config string (see the module docstring) or a list of shard globs;
  `cache_dir`: where shards given as URLs are staged (ArrayRecordSource)."""
  if not isinstance(spec, str):
    return ArrayRecordSource(list(spec), cache_dir)
  kind, sep, rest = spec.partition(':')
  if sep and kind in ('folder', 'tfds'):
    path, _, query = rest.partition('?')
    options = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
    if kind == 'folder':
      unknown = set(options) - {'labels'}
      if unknown:
        raise ValueError(f'{spec}: unknown option(s) {sorted(unknown)}; folder takes labels=')
      return ImageFolderSource(path, labels=options.get('labels'))
    unknown = set(options) - {'split', 'data_dir'}
    if unknown:
      raise ValueError(f'{spec}: unknown option(s) {sorted(unknown)}; tfds takes split=, data_dir=')
    return TfdsSource(path, split=options.get('split', 'train'), data_dir=options.get('data_dir'))
  return ArrayRecordSource(spec, cache_dir)
