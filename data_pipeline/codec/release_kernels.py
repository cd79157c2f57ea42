"""Compiled (numba) passes of the release's own maths (`release`), bit for bit its numpy code.

As `kernels` for `maps`: `maps` dispatches here when its kernels are on (`maps.KERNELS`), the
numpy code in `release` stays the reference, and each kernel repeats its float32 operations in
the same order without fastmath (tests/test_codec_kernels.py compares the two).
"""

from __future__ import annotations

import numpy as np

from data_pipeline.codec.kernels import jit


@jit
def local_variance(x_HxW, k):
  """`release.local_variance`: the k x k window variance of `release.window_variance` (edge
  padding of k // 2, float32 integral images summed down the rows and then along them as
  numpy's two cumsums do, each window's four corners combined in numpy's order), stretched back
  to H x W by `release.nearest_resize`'s indices, in one call: [H, W] float32. Needs
  H, W > k - 2 * (k // 2) (a non-empty window map)."""
  h, w = x_HxW.shape
  pad = k // 2
  ph, pw = h + 2 * pad, w + 2 * pad
  sums = np.empty((ph, pw), np.float32)
  squares = np.empty((ph, pw), np.float32)
  for i in range(ph):
    si = min(max(i - pad, 0), h - 1)
    for j in range(pw):
      value = x_HxW[si, min(max(j - pad, 0), w - 1)]
      square = value * value
      if i > 0:
        sums[i, j] = sums[i - 1, j] + value
        squares[i, j] = squares[i - 1, j] + square
      else:
        sums[i, j] = value
        squares[i, j] = square
  for i in range(ph):
    for j in range(1, pw):
      sums[i, j] = sums[i, j - 1] + sums[i, j]
      squares[i, j] = squares[i, j - 1] + squares[i, j]
  vh, vw = ph - k, pw - k
  area = np.float32(k * k)
  zero = np.float32(0.0)
  out = np.empty((h, w), np.float32)
  for y in range(h):
    i = min((y * vh) // h, vh - 1)
    for x in range(w):
      j = min((x * vw) // w, vw - 1)
      mean = (sums[i + k, j + k] - sums[i, j + k] - sums[i + k, j] + sums[i, j]) / area
      mean_square = (
        squares[i + k, j + k] - squares[i, j + k] - squares[i + k, j] + squares[i, j]
      ) / area
      variance = mean_square - mean * mean
      # np.maximum(variance, 0): the first operand when it is >= 0 or NaN.
      out[y, x] = variance if (variance >= zero or variance != variance) else zero
  return out
