"""Linear probe: multinomial logistic regression (scikit-learn) on L2-normalised pooled features.

The regularisation strength C is chosen on the training set by 3-fold cross-validation over a
small grid (`C_GRID`; plain, shuffled folds, since a small set may hold classes with a single
sample, which stratified folds refuse), then the model is refitted on all training features.
The folds' shuffle has a fixed seed (`FOLD_SEED`), not the probe seed, and the lbfgs fit is
deterministic: the probe gives the same result for every probe seed (std 0 over seeds).
Passing `C` fixes it and skips the search. Unit-norm features put the logits on a small scale,
hence a grid that reaches large C.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from ove_jax.vectors import l2_normalise

C_GRID = (0.1, 1.0, 10.0, 100.0)
MIN_SAMPLES_FOR_SEARCH = 6  # below this, 3 folds are too small to rank C: use DEFAULT_C
DEFAULT_C = 10.0
FOLD_SEED = 0  # the folds are the same for every probe seed: the probe is deterministic


def _model(c: float, seed: int):
  from sklearn.linear_model import LogisticRegression

  return LogisticRegression(C=c, max_iter=2000, random_state=seed)


def linear_probe(
  train_NxC,
  train_labels_N,
  test_MxC,
  test_labels_M,
  *,
  C: float | None = None,
  C_grid: Sequence[float] = C_GRID,
  seed: int = 0,
) -> dict[str, Any]:
  """Top-1 of logistic regression on L2-normalised features.

  Returns {top1, C, C_search: {C: mean cross-validated accuracy} (empty when C is fixed)}.
  """
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.model_selection import KFold, cross_val_score

  x_train = l2_normalise(np.asarray(train_NxC, np.float64))
  x_test = l2_normalise(np.asarray(test_MxC, np.float64))
  y_train = np.asarray(train_labels_N, np.int64)
  y_test = np.asarray(test_labels_M, np.int64)
  if len(y_train) == 0 or len(y_test) == 0:
    raise ValueError('the linear probe needs at least one training and one test sample')
  if len(np.unique(y_train)) < 2:  # LogisticRegression refuses one class; the answer is trivial
    return {'top1': float((y_test == y_train[0]).mean()), 'C': None, 'C_search': {}}
  search = {}
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', ConvergenceWarning)
    if C is None and len(y_train) >= MIN_SAMPLES_FOR_SEARCH:
      folds = KFold(3, shuffle=True, random_state=FOLD_SEED)
      for c in C_grid:
        search[float(c)] = float(
          cross_val_score(_model(c, seed), x_train, y_train, cv=folds).mean()
        )
      C = max(search, key=lambda c: (search[c], -c))  # ties: the stronger regularisation
    elif C is None:
      C = DEFAULT_C
    model = _model(C, seed).fit(x_train, y_train)
  return {
    'top1': float((model.predict(x_test) == y_test).mean()),
    'C': float(C),
    'C_search': search,
  }
