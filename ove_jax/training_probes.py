"""Probes during training (`probe_every`): every N steps, a small probe of the encoder being
trained on a held-out set of labelled video records, logged as `probe/*` metrics.

  ove-train --config=demo_cpu --workdir=/tmp/run --config.probe_every=100 \\
      --config.probe.source='/data/heldout/records/*.array_record*' --config.probe.label=3

The held-out records (`probe.source`, comma-separated globs of labelled video records as
`ove-precompute-codec` or the built-in data writes them) are read and turned into token samples
once per process (codec patches, or `probe.num_frames` uniform frames), split by record index
into a probe-training and a probe-test part (`ove_jax.probes.split`, `probe.test_fraction`), and
at each probe step the frozen encoder's pooled features of both parts train the chosen probes
(`probe.probes`: k-NN and logistic regression by default; the attentive probe trains a new
head and is dearer, `ove_jax.evaluators`). The metrics line of that step gets
`probe/<probe>_top1` for each probe and `probe/seconds`, through the run's metrics writers
(metrics.jsonl, TensorBoard, wandb), where `ove-sweep` collects them.

The probe sees only features of the current parameters: it changes nothing in the run, so a
run with probes trains exactly as one without. Its time is not counted in the next step's
rates. It runs in the training process on the training mesh (tested with one process).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
from flax import nnx

from ove_jax import config as config_lib
from ove_jax import evaluators
from ove_jax import probes as probes_lib

PREFIX = 'probe/'


def due(config, step: int) -> bool:
  """Whether a probe runs after `step` (probe_every > 0 and a multiple of it)."""
  return bool(config.probe_every) and step % config.probe_every == 0


@functools.lru_cache(maxsize=2)
def probe_samples(
  source: str,
  label: int,
  mode: str,
  num_frames: int,
  test_fraction: float,
  max_records: int,
  seed: int,
) -> tuple[list[dict], list[dict]]:
  """(train samples, test samples) of the held-out records: read and decoded once per process
  (cached), the first `max_records` of the files in name order, split by record index."""
  try:
    records = probes_lib.read_records(probes_lib.record_files(source))
  except probes_lib.ProbeError as e:
    raise config_lib.ConfigError(f'probe.source={source!r}: {message(e)}') from None
  records = records[:max_records]
  train_idx, test_idx = probes_lib.split(len(records), test_fraction)
  if not train_idx or not test_idx:
    raise config_lib.ConfigError(
      f'probe.source={source!r}: {len(records)} record(s) with probe.test_fraction='
      f'{test_fraction} leave {len(train_idx)} to train and {len(test_idx)} to test the probe; '
      'both need at least one (give more records)'
    )
  if not num_frames:  # the codec budget in whole frames: the equal-budget comparison
    budget = int(np.median([len(r['positions']) for r in records]))
    num_frames = max(1, round(budget / evaluators.features.FRAME_TOKENS))
  try:
    samples = evaluators.video_samples(records, mode, num_frames, seed=seed, label_index=label)
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(
      f'probe.source={source!r}, probe.label={label}, probe.mode={mode!r}: {e}'
    ) from None
  return [samples[i] for i in train_idx], [samples[i] for i in test_idx]


def run(config, program, state) -> dict[str, float]:
  """The probes of config.probe on the encoder of the training `state` (its params, merged with
  the `program`'s graphdef, not changed): {probe/<probe>_top1, probe/seconds}."""
  start = time.perf_counter()
  p = config.probe
  train, test = probe_samples(
    p.source,
    int(p.label),
    p.mode,
    int(p.num_frames),
    float(p.test_fraction),
    int(p.max_records),
    int(config.seed),
  )
  encoder = nnx.merge(program.graphdef, state['params']).encoder
  results = evaluators.evaluate(
    encoder,
    train,
    test,
    probes=tuple(p.probes),
    batch_size=int(p.batch_size),
    seeds=(int(config.seed),),
    knn=evaluators.KnnConfig(k=int(p.knn_k)),
  )
  out: dict[str, Any] = {
    f'{PREFIX}{probe}_top1': results[probe]['top1'] for probe in evaluators.check_probes(p.probes)
  }
  out[f'{PREFIX}seconds'] = time.perf_counter() - start
  return out


def check_source(config) -> None:
  """With probe_every: a ConfigError now, before data is made or anything compiles, when
  probe.source names no record files (the records are read at the first probe)."""
  if config.probe_every and config.probe.source:
    try:
      probes_lib.record_files(config.probe.source)
    except probes_lib.ProbeError as e:
      raise config_lib.ConfigError(f'probe.source={config.probe.source!r}: {message(e)}') from None


def message(error: Exception) -> str:
  """A probes error without the --records flag it names for ove-probe."""
  return str(error).removeprefix('--records: ').removeprefix('--records ')


def check(config) -> None:
  """Config errors of the probe keys, named (config.validate calls this)."""
  if not config.probe_every:
    return
  p = config.probe
  if config.probe_every % config.log_every:
    raise config_lib.ConfigError(
      f'probe_every={config.probe_every} must be a multiple of log_every={config.log_every} '
      '(probes are logged on metrics lines)'
    )
  if not p.source:
    raise config_lib.ConfigError(
      f'probe_every={config.probe_every} needs probe.source: the held-out labelled video '
      "records to probe on, e.g. --config.probe.source='/data/heldout/records/*.array_record*'"
    )
  try:
    evaluators.check_probes(p.probes)
  except ValueError as e:
    raise config_lib.ConfigError(f'probe.probes: {e}') from None
  if p.mode not in evaluators.features.MODES:
    raise config_lib.ConfigError(
      f'probe.mode={p.mode!r}: choose one of {evaluators.features.MODES}'
    )
  if not 0 < p.test_fraction < 1:
    raise config_lib.ConfigError(f'probe.test_fraction={p.test_fraction}: between 0 and 1')
  for key in ('max_records', 'batch_size', 'knn_k'):
    if p[key] < 1:
      raise config_lib.ConfigError(f'probe.{key}={p[key]}: must be >= 1')
  if p.num_frames < 0:
    raise config_lib.ConfigError(
      f"probe.num_frames={p.num_frames}: >= 0 (0: the records' codec budget in whole frames)"
    )
