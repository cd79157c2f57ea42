"""The shard format of a precompute output folder: its file names, the writer and the readers.

`data_pipeline.precompute` runs the selection; this module is what it leaves on disk and how it
reads back, so a reader (training, the labels tool, the visualiser) needs nothing of the run.

Layout of an output folder:
  {name}-{split}.array_record-{i:05d}-of-{n:05d}   shard i: one records.encode(...) per good clip
                                                  (or the plan's `shard_template`: images)
  progress/shard-{i:05d}.json                     shard i is finished (written after its rename)
  plan.json                                       what was asked: inputs digest, options, shards
  failures.jsonl                                  {"file", "reason", "shard"} per clip not kept
  summary.json                                    figures of the last run
  dataset_info.json, features.json               TFDS metadata (format 'tfds', once complete)

Two record formats, the same content:
- 'records' (default): each ArrayRecord entry is `records.encode` bytes, what
  `data_pipeline.sources` reads from shard globs ('OUT_DIR/ove_codec-train.array_record-*') and
  what grain's ArrayRecordDataSource returns.
- 'tfds': each entry is a tf.train.Example holding those bytes in one feature `record`, and the
  folder gets TFDS metadata, so it is a TFDS ArrayRecord dataset read without TensorFlow:
  `tfds.builder_from_directory(out_dir).as_data_source(split)`, `tfds.data_source(name,
  data_dir=D)` when out_dir is D/name/version, or the 'tfds:' spec of `data_pipeline.sources`
  (which also takes the folder itself as data_dir). (A TFDS dataset of raw `records.encode`
  entries would need every reader to pass deserialize_method=RAW_BYTES; plain TFDS readers would
  fail on it, so 'records' folders carry no TFDS metadata.)
`read_record`, `read_shard` and `tfds_data_source` read either format back as record dicts.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

import numpy as np

from data_pipeline import fileio, paths, records

PROGRESS_DIR = 'progress'
FAILURES = 'failures.jsonl'
PLAN = 'plan.json'
SUMMARY = 'summary.json'
TFDS_FILES = ('dataset_info.json', 'features.json')
FORMATS = ('records', 'tfds')


def shard_name(name: str, split: str, index: int, num_shards: int) -> str:
  # TFDS's default file template, so the folder doubles as a TFDS dataset.
  return f'{name}-{split}.array_record-{index:05d}-of-{num_shards:05d}'


def shard_path(out_dir: str, plan: dict, index: int) -> str:
  """Shard `index` of a plan: TFDS's name, or the plan's own `shard_template` when it has one
  (a str.format of name, split, index and num_shards; image corpora end in .array_record)."""
  template = plan.get('shard_template')
  if template:
    return paths.join(
      out_dir,
      template.format(
        name=plan['name'], split=plan['split'], index=index, num_shards=plan['num_shards']
      ),
    )
  return paths.join(out_dir, shard_name(plan['name'], plan['split'], index, plan['num_shards']))


def marker_path(out_dir: str, index: int) -> str:
  """The file that says shard `index` is finished (its figures and failures)."""
  return paths.join(out_dir, PROGRESS_DIR, f'shard-{index:05d}.json')


def read_plan(out_dir: str) -> dict | None:
  return fileio.read_json(paths.join(out_dir, PLAN))


def shard_files(out_dir: str) -> list[str]:
  """The shard paths of a finished or partial output folder, in shard order (finished ones)."""
  plan = read_plan(out_dir)
  if plan is None:
    raise FileNotFoundError(f'{out_dir}: no {PLAN}; not a precompute output folder')
  found = []
  for i in range(plan['num_shards']):
    path = shard_path(out_dir, plan, i)
    if paths.exists(marker_path(out_dir, i)) and paths.exists(path):
      found.append(path)
  return found


def count_records(path: str) -> int:
  """The number of records in one shard (read from its index, not by reading the records)."""
  from array_record.python.array_record_module import ArrayRecordReader

  reader = ArrayRecordReader(paths.stage(path))  # the reader needs a local file
  try:
    return reader.num_records()
  finally:
    reader.close()


class ShardWriter:
  """One shard written to a temporary file, renamed into place when complete (into an object
  store: uploaded in one piece, see data_pipeline.fileio).

  The temporary name is unique to the process and call (`fileio.temp_name`), and the file is
  fsynced before its rename, so a marker written after `commit` never names a shard that a
  crash could still lose.
  """

  def __init__(self, path: str):
    from array_record.python.array_record_module import ArrayRecordWriter

    self.path, self.tmp = path, fileio.temp_name(path)
    # group_size:1 is what grain and TFDS want for fast random access.
    self._writer = ArrayRecordWriter(self.tmp, 'group_size:1')
    self.count = 0

  def write(self, data: bytes):
    self._writer.write(data)
    self.count += 1

  def commit(self) -> int:
    """Closes, fsyncs and renames the shard into place; returns its size in bytes."""
    self._writer.close()
    self._writer = None
    fileio.commit(self.tmp, self.path)
    return paths.getsize(self.path)

  def abandon(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if os.path.exists(self.tmp):
      os.remove(self.tmp)


# ---------------------------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------------------------

_features = None


def tfds_features():
  """The one-feature TFDS schema of format 'tfds': the record's bytes."""
  global _features
  if _features is None:
    import tensorflow_datasets as tfds  # slow to import; only the 'tfds' format needs it

    _features = tfds.features.FeaturesDict(
      {'record': tfds.features.Tensor(shape=(), dtype=np.object_)}
    )
  return _features


def write_tfds_metadata(out_dir: str, name: str, split: str, markers: Sequence[dict]) -> None:
  """dataset_info.json and features.json describing the shards, for TFDS's folder loader."""
  import tensorflow_datasets as tfds

  template = tfds.core.ShardedFileTemplate(
    data_dir=out_dir, dataset_name=name, split=split, filetype_suffix='array_record'
  )
  split_info = tfds.core.SplitInfo(
    name=split,
    shard_lengths=[m['num_records'] for m in markers],
    num_bytes=sum(m['num_bytes'] for m in markers),
    filename_template=template,
  )
  base = os.path.basename(os.path.normpath(out_dir))
  version = base if tfds.core.Version.is_valid(base) else '1.0.0'
  tfds.folder_dataset.write_metadata(
    data_dir=out_dir,
    features=tfds_features(),
    split_infos=[split_info],
    version=version,
    check_data=False,
    description=(
      'OneVision-Encoder codec patch selections (data_pipeline.precompute): one '
      'video clip per example; the feature `record` holds '
      'data_pipeline.records.encode bytes (frame ids, positions, picture types, '
      'labels, source, stats_*), decoded by data_pipeline.records.decode.'
    ),
  )


class DecodedSource:
  """Random access to record dicts over a TFDS source of format 'tfds'."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index) -> dict:
    return records.decode(self.source[index]['record'])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    return [records.decode(ex['record']) for ex in self.source.__getitems__(list(indices))]


def tfds_data_source(out_dir: str, split: str = 'train') -> DecodedSource:
  """The records of a 'tfds'-format output folder through TFDS, decoded."""
  plan = read_plan(out_dir)
  if plan is not None and plan['format'] != 'tfds':
    raise ValueError(
      f'{out_dir} was written in format {plan["format"]!r}, not as a TFDS '
      'dataset; read its shards with data_pipeline.sources or read_shard'
    )
  import tensorflow_datasets as tfds

  return DecodedSource(tfds.builder_from_directory(out_dir).as_data_source(split))


def shard_format(path: str) -> str:
  """'records' or 'tfds': the format of a shard, from its folder's plan.json."""
  plan = read_plan(paths.dirname(paths.absolute(path)))
  return plan['format'] if plan else 'records'


def decode_entry(data: bytes, record_format: str) -> dict:
  """One ArrayRecord entry of either format as a record dict."""
  if record_format == 'tfds':
    data = tfds_features().deserialize_example_np(data)['record']
  return records.decode(data)


def encode_entry(record: dict, record_format: str) -> bytes:
  """A record dict as one ArrayRecord entry of `record_format`."""
  data = records.encode(record)
  if record_format == 'tfds':
    data = tfds_features().serialize_example({'record': data})
  return data


def read_record(path: str, index: int) -> dict:
  """Record `index` of one shard, decoded (either format; see the run's plan.json)."""
  from array_record.python.array_record_data_source import ArrayRecordDataSource

  with ArrayRecordDataSource([paths.stage(path)]) as source:
    if not 0 <= index < len(source):
      raise IndexError(f'{path}: record {index} out of range (the shard has {len(source)})')
    return decode_entry(source[index], shard_format(path))


def read_shard(path: str) -> list[dict]:
  """Every record of one shard, decoded (for tools and tests; training reads through grain)."""
  from array_record.python.array_record_data_source import ArrayRecordDataSource

  record_format = shard_format(path)
  with ArrayRecordDataSource([paths.stage(path)]) as source:
    return [decode_entry(source[i], record_format) for i in range(len(source))]


# ---------------------------------------------------------------------------------------------
# Failure journals
# ---------------------------------------------------------------------------------------------


def journal_path(out_dir: str, task_index: int, num_tasks: int) -> str:
  """Where a run appends failures as they happen: the manifest itself for a single task, a file
  per task otherwise (tasks may run on machines that share no append-safe file). Objects cannot
  be appended to: for an object store `out_dir` the journal is a local file at the folder's
  `paths.local_folder`, and the manifest in `out_dir` is written whole when the corpus is done."""
  out_dir = paths.local_folder(out_dir)
  if num_tasks == 1:
    return os.path.join(out_dir, FAILURES)
  return os.path.join(
    out_dir, PROGRESS_DIR, f'failures-task-{task_index:05d}-of-{num_tasks:05d}.jsonl'
  )


def read_journals(out_dir: str) -> list[dict]:
  """Every failure entry in the folder's manifest and task journals."""
  entries = []
  # A URL's journals are local (in its local folder).
  folders = dict.fromkeys([paths.absolute(out_dir), paths.local_folder(out_dir)])
  for path in [
    p
    for folder in folders
    for p in [
      paths.join(folder, FAILURES),
      *paths.glob(paths.join(glob.escape(folder), PROGRESS_DIR, 'failures-task-*.jsonl')),
    ]
  ]:
    entries += read_entries(path)
  return entries


def read_entries(path: str) -> list[dict]:
  """The JSON lines of a failures file or journal ([] when it does not exist); a line that does
  not parse (the last line of a run killed mid-write) is left out."""
  try:
    with paths.open_file(path, 'r', encoding='utf-8') as f:
      lines = f.read().split('\n')  # universal newlines: '\r\n' is '\n' here
  except FileNotFoundError:
    return []
  entries = []
  for line in lines:
    try:
      entries.append(json.loads(line))
    except ValueError:
      pass
  return entries


def write_failures(path: str, entries: Sequence[dict]) -> None:
  fileio.write_atomic(path, ''.join(json.dumps(entry) + '\n' for entry in entries))
