"""k-NN probe: cosine similarity on pooled features, the k nearest training samples vote.

The vote is similarity-weighted by default, each neighbour counting exp(cos / T) with T = 0.07
(the weighting of DINO's k-NN evaluation), so a few close neighbours outvote many far ones;
`vote='majority'` counts each neighbour once. Ties go to the lowest class id. The settings are
one `KnnConfig`, passed as it is from the probe runs (`evaluators.evaluate`, `run_probes`) down
to `knn_probe`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ove_jax.vectors import l2_normalise

VOTES = ('weighted', 'majority')


@dataclasses.dataclass(frozen=True)
class KnnConfig:
  """The k-NN probe's settings: `k` nearest training samples vote (capped at the training set's
  size), `vote` one of VOTES, `temperature` the T of the weighted vote exp(cos / T)."""

  k: int = 20
  vote: str = 'weighted'
  temperature: float = 0.07

  def __post_init__(self):
    if self.vote not in VOTES:
      raise ValueError(f'KnnConfig(vote={self.vote!r}): choose one of {VOTES}')
    if self.k < 1:
      raise ValueError(f'KnnConfig(k={self.k}): must be >= 1')
    if self.temperature <= 0:
      raise ValueError(f'KnnConfig(temperature={self.temperature}): must be > 0')


def knn_probe(
  train_NxC, train_labels_N, test_MxC, test_labels_M, config: KnnConfig = KnnConfig()
) -> dict[str, Any]:
  """Top-1 of cosine k-NN (k capped at the training set's size). Returns {top1, k, vote}."""
  y_train = np.asarray(train_labels_N, np.int64)
  y_test = np.asarray(test_labels_M, np.int64)
  if len(y_train) == 0 or len(y_test) == 0:
    raise ValueError('the k-NN probe needs at least one training and one test sample')
  k = min(config.k, len(y_train))
  sims_MxN = (
    l2_normalise(np.asarray(test_MxC, np.float64))
    @ l2_normalise(np.asarray(train_NxC, np.float64)).T
  )
  nearest_MxK = np.argpartition(-sims_MxN, k - 1, axis=1)[:, :k]
  sims_MxK = np.take_along_axis(sims_MxN, nearest_MxK, axis=1)
  weighted = config.vote == 'weighted'
  weights_MxK = np.exp(sims_MxK / config.temperature) if weighted else np.ones_like(sims_MxK)
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  votes = np.zeros((len(y_test), num_classes))  # [M, classes]
  np.add.at(votes, (np.arange(len(y_test))[:, None], y_train[nearest_MxK]), weights_MxK)
  return {'top1': float((votes.argmax(1) == y_test).mean()), 'k': k, 'vote': config.vote}
