"""k-NN probe: cosine similarity on pooled features, the k nearest training samples vote.

The vote is similarity-weighted by default, each neighbour counting exp(cos / T) with T = 0.07
(the weighting of DINO's k-NN evaluation), so a few close neighbours outvote many far ones;
`vote='majority'` counts each neighbour once. Ties go to the lowest class id.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ove_jax.vectors import l2_normalise

VOTES = ('weighted', 'majority')


def knn_probe(
  train_NxC,
  train_labels_N,
  test_MxC,
  test_labels_M,
  *,
  k: int = 20,
  vote: str = 'weighted',
  temperature: float = 0.07,
) -> dict[str, Any]:
  """Top-1 of cosine k-NN (k capped at the training set's size). Returns {top1, k, vote}."""
  if vote not in VOTES:
    raise ValueError(f'vote={vote!r}; choose one of {VOTES}')
  if k < 1:
    raise ValueError(f'k={k}; must be >= 1')
  y_train = np.asarray(train_labels_N, np.int64)
  y_test = np.asarray(test_labels_M, np.int64)
  if len(y_train) == 0 or len(y_test) == 0:
    raise ValueError('the k-NN probe needs at least one training and one test sample')
  k = min(k, len(y_train))
  sims_MxN = (
    l2_normalise(np.asarray(test_MxC, np.float64))
    @ l2_normalise(np.asarray(train_NxC, np.float64)).T
  )
  nearest_MxK = np.argpartition(-sims_MxN, k - 1, axis=1)[:, :k]
  sims_MxK = np.take_along_axis(sims_MxN, nearest_MxK, axis=1)
  weights_MxK = np.exp(sims_MxK / temperature) if vote == 'weighted' else np.ones_like(sims_MxK)
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  votes = np.zeros((len(y_test), num_classes))  # [M, classes]
  np.add.at(votes, (np.arange(len(y_test))[:, None], y_train[nearest_MxK]), weights_MxK)
  return {'top1': float((votes.argmax(1) == y_test).mean()), 'k': k, 'vote': vote}
