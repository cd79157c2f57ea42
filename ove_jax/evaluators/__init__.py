"""Probes of a frozen encoder: attentive (docs/spec.md §6), linear (logistic regression) and k-NN.

  evaluate(encoder, train_samples, test_samples, probes=('attentive', 'linear', 'knn'))
      extracts features once (`features.extract`) and runs the chosen probes; the one call for a
      standalone evaluation (ove_jax.probes, ove-probe) and for a periodic one during training
      (cheap settings: few epochs, `probes=('knn',)`, a few hundred samples).
  run_probes(train_features, test_features, encoder_config)
      the probes alone, on features already extracted.
  video_samples(records, mode='codec' | 'uniform', num_frames)
      labelled token samples of video records, for the codec vs uniform-frames comparison.

Each probe's result holds `top1` (the mean over `seeds`), `top1_std` and its per-seed `runs`;
the attentive probe's `top1` / `top5` are those of the epoch chosen on a validation split held out
of the training features (never on the test split) and `top1_last` the last epoch's.
`protocol.run_protocol` is the release's full protocol on clips (features recomputed per batch
with the training augmentation, a list of learning rates, top-1 and top-5).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ove_jax.evaluators.attentive import AttentiveConfig, AttentiveProbe, train_attentive
from ove_jax.evaluators.features import Features, extract, record_label, video_samples
from ove_jax.evaluators.knn import KnnConfig, knn_probe
from ove_jax.evaluators.linear import linear_probe
from ove_jax.evaluators.protocol import ProtocolConfig, run_protocol

PROBES = ('attentive', 'linear', 'knn')


def check_probes(probes: Sequence[str]) -> tuple[str, ...]:
  probes = tuple(probes)
  unknown = [p for p in probes if p not in PROBES]
  if unknown or not probes:
    raise ValueError(f'probes {list(probes)}: choose one or more of {PROBES}')
  return probes


def _summary(runs: list[dict], keys: Sequence[str]) -> dict[str, Any]:
  out = {}
  for key in keys:
    values = np.asarray([r[key] for r in runs], np.float64)
    name = 'top1' if key == 'top1_best' else key
    out[name], out[f'{name}_std'] = float(values.mean()), float(values.std())
  return {**out, 'runs': runs}


def run_probes(
  train: Features,
  test: Features,
  encoder_config,
  *,
  probes: Sequence[str] = PROBES,
  seeds: Sequence[int] = (0,),
  attentive: AttentiveConfig = AttentiveConfig(),
  linear_C: float | None = None,
  knn: KnnConfig = KnnConfig(),
  log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
  """The chosen probes on extracted features, each repeated over `seeds` (k-NN, deterministic,
  runs once). Returns {probe: {top1, top1_std, runs, ...}}."""
  probes = check_probes(probes)
  seeds = tuple(int(s) for s in seeds) or (0,)
  if train.labels_N is None or test.labels_N is None:
    raise ValueError('the probes need labelled samples (a `label` in every sample)')
  # Class ids made contiguous (0..K-1 over the labels present), so that a label slot whose ids
  # start high (the builtin data's shape labels are 40..44) does not add unused outputs.
  _, contiguous = np.unique(np.concatenate([train.labels_N, test.labels_N]), return_inverse=True)
  train = dataclasses.replace(train, labels_N=contiguous[: len(train)])
  test = dataclasses.replace(test, labels_N=contiguous[len(train) :])
  num_classes = int(contiguous.max()) + 1
  results = {}
  for probe in probes:
    start = time.perf_counter()
    if probe == 'attentive':
      if train.tokens_NxLxC is None or test.tokens_NxLxC is None:
        raise ValueError('the attentive probe needs token features (extract with keep_tokens)')
      runs = [
        train_attentive(
          train.tokens_NxLxC,
          train.mask_NxL,
          train.labels_N,
          test.tokens_NxLxC,
          test.mask_NxL,
          test.labels_N,
          encoder_config,
          num_classes=num_classes,
          config=dataclasses.replace(attentive, seed=seed),
          log=log,
        )
        for seed in seeds
      ]
      results[probe] = _summary(runs, ('top1_best', 'top5', 'top1_last'))
    elif probe == 'linear':
      runs = [
        linear_probe(
          train.pooled_NxC, train.labels_N, test.pooled_NxC, test.labels_N, C=linear_C, seed=seed
        )
        for seed in seeds
      ]
      results[probe] = _summary(runs, ('top1',))
    else:
      runs = [knn_probe(train.pooled_NxC, train.labels_N, test.pooled_NxC, test.labels_N, knn)]
      results[probe] = _summary(runs, ('top1',))
    results[probe]['seconds'] = time.perf_counter() - start
    if log is not None:
      log(
        f'{probe} probe: top-1 {results[probe]["top1"]:.4f} '
        f'(± {results[probe]["top1_std"]:.4f} over {len(runs)} run(s))'
      )
  return results


def evaluate(
  encoder,
  train_samples: Sequence[Mapping[str, Any]],
  test_samples: Sequence[Mapping[str, Any]],
  *,
  probes: Sequence[str] = PROBES,
  batch_size: int = 8,
  num_segments: int = 1,
  seeds: Sequence[int] = (0,),
  attentive: AttentiveConfig = AttentiveConfig(),
  linear_C: float | None = None,
  knn: KnnConfig = KnnConfig(),
  progress: bool = False,
  log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
  """Extracts the frozen encoder's features of both splits once and runs `probes` on them.

  Samples are dicts {patches [N_i, 588], positions [N_i, 3], label} (see `video_samples`).
  Token features are kept only when the attentive probe runs. Returns {probe: result} plus
  'num_train', 'num_test', 'num_classes', 'tokens_per_sample' (mean) and 'features_seconds'.
  """
  probes = check_probes(probes)
  start = time.perf_counter()
  keep = 'attentive' in probes
  train, test = (
    extract(
      encoder,
      split,
      batch_size=batch_size,
      num_segments=num_segments,
      keep_tokens=keep,
      progress=progress,
    )
    for split in (train_samples, test_samples)
  )
  seconds = time.perf_counter() - start
  results = run_probes(
    train,
    test,
    encoder.cfg,
    probes=probes,
    seeds=seeds,
    attentive=attentive,
    linear_C=linear_C,
    knn=knn,
    log=log,
  )
  lengths = [len(s['patches']) for s in (*train_samples, *test_samples)]
  return {
    **results,
    'num_train': len(train),
    'num_test': len(test),
    'num_classes': len(np.unique(np.concatenate([train.labels_N, test.labels_N]))),
    'tokens_per_sample': float(np.mean(lengths)),
    'features_seconds': seconds,
  }


__all__ = [
  'PROBES',
  'AttentiveConfig',
  'AttentiveProbe',
  'Features',
  'KnnConfig',
  'evaluate',
  'extract',
  'knn_probe',
  'linear_probe',
  'ProtocolConfig',
  'record_label',
  'run_probes',
  'run_protocol',
  'train_attentive',
  'video_samples',
]
