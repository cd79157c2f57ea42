"""L2 normalisation: the one function for host (numpy) and device (JAX) arrays.

Cluster labels are by cosine (docs/spec.md §3): teacher features, k-means centres and the
probes' pooled embeddings are all put on the unit sphere the same way, whether they live on the
host (scikit-learn, the k-NN probe) or on the devices (the sharded k-means). One function, one
eps, so a host and a device computation of the same thing agree.
"""

from __future__ import annotations

import sys

import numpy as np

EPS = 1e-12  # the norm floor: an all-zero row stays zero instead of becoming NaN


def l2_normalise(x, axis: int = -1, eps: float = EPS):
  """`x / max(||x||, eps)` along `axis`; numpy in, numpy out (its dtype kept; integers become
  float64), and JAX in, JAX out (traceable: usable inside jit and shard_map)."""
  jax = sys.modules.get('jax')  # a JAX array exists only once JAX is imported: no import here
  if jax is not None and isinstance(x, jax.Array):  # tracers are jax.Arrays too
    return x / jax.numpy.maximum(jax.numpy.linalg.norm(x, axis=axis, keepdims=True), eps)
  x = np.asarray(x)
  if x.dtype.kind not in 'fc':
    x = x.astype(np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)
