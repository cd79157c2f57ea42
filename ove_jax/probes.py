"""Probing a frozen encoder on labelled video records: codec patches vs uniform frames
(docs/spec.md §6). The runner behind `ove-probe` and the demo's probe stage.

  records, where, names = builtin_records('/tmp/ove_probe_data')    # or read_records(patterns)
  index = label_index('texture', names)                             # a label slot, by name
  results = probe_records(encoder, records, label=index, label_names=names)
  print(format_table(results))

Features of every clip are extracted once per input mode, then the attentive probe (a new MAP
head, LayerNorm, linear; AdamW 1e-4, label smoothing 0.1), a logistic-regression probe and a
cosine k-NN probe are trained on the training split and scored (top-1) on the test split
(`ove_jax.evaluators`). The two modes have an equal token budget: 'codec' feeds a clip's K
selected patches, 'uniform' feeds K / 256 whole frames (by default the records' K / 256), so
the table compares where the same number of tokens is spent.

Labels. A record holds several labels (`labels`, one per slot); a probe measures one slot. The
built-in data's video slots are named (`BUILTIN_LABELS`: fine = shape x direction, 40 classes;
shape, 5; direction, 8; texture, 4); records of your own have slots named by you, or `label0`,
`label1`, ... A bad name is refused with the names there are.

The split is deterministic by record index: record i is a test record when
floor((i + 1) f) > floor(i f), f = test_fraction, which spreads the test records evenly over
the file order. Epochs default to docs/spec.md §6's: 10, or 30 for a small training split
(< 1000 clips); the attentive probe's epoch is chosen on a validation split held out of the
training features (`AttentiveConfig.val_fraction`), never on the test split. With several seeds
the attentive and linear probes are retrained per seed and the table gives mean ± std (k-NN is
deterministic and runs once).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import numpy as np

from data_pipeline import fileio
from data_pipeline import paths as paths_lib
from ove_jax import evaluators

SMALL_SET = 1000  # training clips below which docs/spec.md §6's 30 epochs apply instead of 10
# The built-in data's video label slots (data_pipeline.builtin.video_labels), in order.
BUILTIN_LABELS = ('fine', 'shape', 'direction', 'texture')
# What a probe of built-in data measures by default: texture (4 classes) is learnable from a few
# hundred clips; the fine class (40) at that size sits at chance for any encoder.
BUILTIN_DEFAULT_LABEL = 'texture'
FRAME_TOKENS = evaluators.features.FRAME_TOKENS  # patches of one whole 224 x 224 frame


class ProbeError(ValueError):
  """Bad input: the message names the argument (as `ove-probe` spells its flag) or file."""


# ------------------------------------------------------------------------------------------------
# Records and labels
# ------------------------------------------------------------------------------------------------


def _check_records(path: str, shard: Sequence[dict]) -> None:
  for i, record in enumerate(shard):
    if record.get('labels') is None or record.get('positions') is None:
      raise ProbeError(
        f'{path}: record {i} is not a labelled video record (it has '
        f'{sorted(record)}); the probes need `labels` and codec `positions`'
      )


def read_records(paths: Sequence[str]) -> list[dict]:
  """The labelled video records of these record files, in order."""
  from data_pipeline import precompute

  records = []
  for path in paths:
    try:
      shard = precompute.read_shard(path)
    except Exception as e:  # pylint: disable=broad-except  -- any unreadable file is bad input
      raise ProbeError(f'--records: cannot read {path}: {e}') from None
    _check_records(path, shard)
    records.extend(shard)
  return records


def record_files(patterns: str) -> list[str]:
  """The record files of comma-separated sources, sorted: a glob's ArrayRecord files
  (`*.array_record*`: the plan, summary, failure and progress files beside a precompute's shards
  are skipped), or a precompute output folder's shards (`labels.record_shards`); local paths or
  gs:// / s3:// URLs."""
  from ove_jax import labels  # pylint: disable=g-import-not-at-top

  found = set()
  for pattern in (os.path.expanduser(p.strip()) for p in patterns.split(',') if p.strip()):
    if paths_lib.isdir(pattern):
      try:
        found.update(labels.record_shards(pattern))
      except labels.LabelsError as e:
        raise ProbeError(str(e)) from None
      continue
    matched = paths_lib.glob(pattern)
    records = [p for p in matched if '.array_record' in paths_lib.basename(p)]
    if matched and not records:
      raise ProbeError(
        f'--records {pattern!r}: none of the {len(matched)} file(s) it matches is an ArrayRecord '
        "file (*.array_record*); give the shards' glob or a precompute output folder"
      )
    found.update(records)
  if not found:
    raise ProbeError(f'--records {patterns!r}: no file matches')
  return sorted(found)


def builtin_records(
  root: str, *, clips: int = 16, budget: int = 512
) -> tuple[list[dict], str, tuple[str, ...]]:
  """(records, description, label names) of data_pipeline.builtin data in `root`, made there on
  first use (with `clips` clips at `budget` patches); data made before is taken as it is."""
  from data_pipeline import builtin

  root = os.path.abspath(root)
  params = {'clips': clips, 'images': 1, 'budget': budget, 'seed': 0}
  marker = os.path.join(root, 'builtin.json')
  if os.path.isfile(marker):  # made before: take it as it is, whatever it was made with
    try:
      made_with = fileio.read_json(marker)['params']
      params = {k: made_with[k] for k in params}
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ProbeError(f'--builtin {root}: unreadable {marker} ({e})') from None
  try:
    made = builtin.ensure(root, progress=False, **params)
  except (OSError, ValueError, RuntimeError) as e:
    raise ProbeError(f'--builtin {root}: {e}') from None
  records = read_records(made['video_source'].split(','))
  return records, f'built-in data in {root}', BUILTIN_LABELS


def label_names(records: Sequence[dict], names: Sequence[str] | None = None) -> tuple[str, ...]:
  """The names of the records' label slots: `names` when given (one per slot), else label0, ..."""
  slots = min(len(np.asarray(r['labels']).reshape(-1)) for r in records)
  if names is None:
    return tuple(f'label{i}' for i in range(slots))
  names = tuple(names)
  if len(names) != slots or len(set(names)) != len(names):
    raise ProbeError(
      f'--label-names {",".join(names)}: the records have {slots} label slot(s); '
      f'give {slots} different names'
    )
  return names


def label_index(label: str | int, names: Sequence[str]) -> int:
  """The slot of `label`: one of `names`, or a slot number."""
  if isinstance(label, int) or str(label).lstrip('-').isdigit():
    return int(label)
  if label not in names:
    raise ProbeError(
      f"--label {label}: the records' labels are {', '.join(names)} (or give a slot number)"
    )
  return list(names).index(label)


def record_labels(records: Sequence[dict], label: int) -> list[int]:
  """Every record's label in slot `label`."""
  try:
    return [evaluators.record_label(r, label) for r in records]
  except ValueError as e:
    raise ProbeError(str(e)) from None


def split(n: int, test_fraction: float) -> tuple[list[int], list[int]]:
  """(train, test) record indices: i is a test record when floor((i+1) f) > floor(i f)."""
  train, test = evaluators.attentive.split_indices(n, test_fraction)
  return train.tolist(), test.tolist()


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def probe_records(
  encoder,
  records: Sequence[dict],
  *,
  label: int = 0,
  label_names: Sequence[str] = (),
  modes: Sequence[str] = ('codec', 'uniform'),
  num_frames: int | None = None,
  test_fraction: float = 0.3,
  probes: Sequence[str] = evaluators.PROBES,
  epochs: int | None = None,
  lr: float = 1e-4,
  batch_size: int = 32,
  extract_batch_size: int = 8,
  knn_k: int = 20,
  seeds: Sequence[int] = (0,),
  video_root: str = '',
  log: Callable[[str], None] = print,
) -> dict:
  """Probes the frozen `encoder` on label slot `label` of `records` in each input mode.

  Returns the results: the split and settings, and per mode the `evaluators.evaluate` entry
  ({probe: {top1, top1_std, runs, ...}, tokens_per_sample, features_seconds, ...}).
  """
  try:
    probes = evaluators.check_probes(probes)
  except ValueError as e:
    raise ProbeError(f'--probes {",".join(probes)}: {e}') from None
  if not 0 < test_fraction < 1:
    raise ProbeError(f'--test-fraction {test_fraction}: must be between 0 and 1')
  for flag, value in (
    ('epochs', epochs),
    ('num-frames', num_frames),
    ('batch-size', batch_size),
    ('extract-batch-size', extract_batch_size),
    ('knn-k', knn_k),
  ):
    if value is not None and value < 1:
      raise ProbeError(f'--{flag} {value}: must be >= 1')
  if lr <= 0:
    raise ProbeError(f'--lr {lr}: must be > 0')
  name = label_names[label] if -len(label_names) <= label < len(label_names) else str(label)
  try:
    labels = record_labels(records, label)
  except ProbeError as e:
    raise ProbeError(f'--label {name}: {e}') from None
  train_idx, test_idx = split(len(records), test_fraction)
  if not train_idx or not test_idx:
    raise ProbeError(
      f'--test-fraction {test_fraction} of {len(records)} record(s) leaves '
      f'{len(train_idx)} for training and {len(test_idx)} for testing; both need '
      'at least one'
    )
  budget = int(np.median([len(r['positions']) for r in records]))
  num_frames = num_frames or max(1, round(budget / FRAME_TOKENS))
  epochs = epochs or (30 if len(train_idx) < SMALL_SET else 10)
  log(
    f'{len(records)} clips ({len(train_idx)} train, {len(test_idx)} test), label {name!r} '
    f'(slot {label}) with {len(set(labels))} classes; codec K = {budget}, uniform '
    f'{num_frames} frames = {num_frames * FRAME_TOKENS} tokens'
  )
  if 'uniform' in modes and num_frames * FRAME_TOKENS != budget:
    log(f'note: the token budgets differ (codec {budget}, uniform {num_frames * FRAME_TOKENS})')
  start = time.perf_counter()
  results = {
    'num_records': len(records),
    'num_train': len(train_idx),
    'num_test': len(test_idx),
    'label': name,
    'label_index': label,
    'label_names': list(label_names),
    'num_classes': len(set(labels)),
    'num_frames': num_frames,
    'codec_budget': budget,
    'epochs': epochs,
    'seeds': list(seeds),
    'probes': list(probes),
    'test_fraction': test_fraction,
    'modes': {},
  }
  attentive = evaluators.AttentiveConfig(epochs=epochs, batch_size=batch_size, learning_rate=lr)
  for mode in modes:
    try:
      samples = evaluators.video_samples(
        records, mode, num_frames, label_index=label, video_root=video_root
      )
    except (OSError, ValueError) as e:
      raise ProbeError(f'cannot build the {mode} samples: {e}') from None
    entry = evaluators.evaluate(
      encoder,
      [samples[i] for i in train_idx],
      [samples[i] for i in test_idx],
      probes=probes,
      batch_size=extract_batch_size,
      seeds=seeds,
      attentive=attentive,
      knn=evaluators.KnnConfig(k=knn_k),
    )
    results['modes'][mode] = entry
    log(
      f'{mode}: features in {entry["features_seconds"]:.1f} s, '
      + ', '.join(f'{p} top-1 {entry[p]["top1"]:.3f}' for p in probes)
    )
  results['seconds'] = time.perf_counter() - start
  return results


def format_table(results: dict) -> str:
  """The results as a text table: per mode and probe, top-1 mean ± std over the seeds."""
  seeds = results['seeds']
  lines = [f'{"mode":8} {"tokens":>6}  {"probe":9}  top-1 (mean ± std over {len(seeds)} seed(s))']
  for mode, entry in results['modes'].items():
    for probe in results['probes']:
      r = entry[probe]
      extra = (
        f'  (epoch chosen on validation of {r["runs"][0]["epochs"]}; top-5 '
        f'{r["top5"]:.3f}; last epoch {r["top1_last"]:.3f})'
        if probe == 'attentive'
        else ''
      )
      lines.append(
        f'{mode:8} {entry["tokens_per_sample"]:6.0f}  {probe:9}  '
        f'{r["top1"]:.3f} ± {r["top1_std"]:.3f}{extra}'
      )
  return '\n'.join(lines)
