"""Compiled (numba) order statistics of float32 maps: the two ranks `maps.percentile` and
`maps.median` interpolate, found by the values' bits instead of a sort (`order_statistics`),
what np.partition finds bit for bit (tests/test_codec_kernels.py checks every rank of small
multisets at the bins' edges, weighted and not).

As `release_kernels`, compiled with and dispatched beside `kernels` (`maps.KERNELS`).
"""

from __future__ import annotations

import numba
import numpy as np

from data_pipeline.codec.kernels import jit

ZERO_BIN = -1  # `_bin_holding`'s name for the values 0.0 and -0.0, counted apart from their bins


@numba.njit(inline='always')
def _bin_holding(counts, zeros, rank):
  """(bin, count before it) of the bin holding `rank` (0-based). Bins are the float32 bits' top
  12, walked in the values' order: negative ones from the most negative (4095) to the least
  (2048), the `zeros` (ZERO_BIN), then the positive ones upwards (0 to 2047). With `zeros` 0
  the zeros may be in `counts` (bins 0 and 2048, beside the subnormals of their sign); with
  more, `counts` leaves them out."""
  before = 0
  for k in range(4097):
    if k == 2048:
      b, count = ZERO_BIN, zeros
    else:
      b = 4095 - k if k < 2048 else k - 2049
      count = counts[b]
    if before + count > rank:
      return b, before
    before += count
  return 2047, before


@numba.njit
def _histogram(bits, weights):
  """Counts of the top 12 bits, each value weighted as in `order_statistics`; 0.0 sits in bin 0
  and -0.0 in bin 2048, with the subnormals of its sign. Four interleaved tables: runs of one
  bin (a map's many zeros) would otherwise wait on the same counter element after element.
  Unweighted counts of fewer than 2**31 values go in int32 tables (half the cache lines of
  int64: a quarter faster over a map's pixels); weighted ones (the cells) in int64."""
  if weights.shape[0] > 0:
    counts = np.zeros((4, 4096), np.int64)
    for i in range(bits.shape[0]):
      counts[i & 3, bits[i] >> np.uint32(20)] += weights[i]
    return counts[0] + counts[1] + counts[2] + counts[3]
  if bits.shape[0] >= 2**31:
    wide = np.zeros((4, 4096), np.int64)
    for i in range(bits.shape[0]):
      wide[i & 3, bits[i] >> np.uint32(20)] += 1
    return wide[0] + wide[1] + wide[2] + wide[3]
  narrow = np.zeros((4, 4096), np.int32)
  for i in range(bits.shape[0]):
    narrow[i & 3, bits[i] >> np.uint32(20)] += 1
  return narrow[0].astype(np.int64) + narrow[1] + narrow[2] + narrow[3]


@numba.njit
def _zeros(bits, weights):
  """(weighted) counts of 0.0 and of -0.0."""
  positive = negative = 0
  if weights.shape[0] > 0:
    for i in range(bits.shape[0]):
      positive += weights[i] * (bits[i] == np.uint32(0))
      negative += weights[i] * (bits[i] == np.uint32(0x80000000))
  else:
    for i in range(bits.shape[0]):
      positive += bits[i] == np.uint32(0)
      negative += bits[i] == np.uint32(0x80000000)
  return positive, negative


@numba.njit(inline='always')
def _gather(values, bits, weights, bin_a, bin_b, gathered, kept_weights, kept):
  """Appends to `gathered` (and `kept_weights`) from index `kept` the values whose bit patterns
  lie in the bins from bin_a to bin_b: one unsigned range test a value, the zero's pattern left
  out when the range starts with it (each sign's zero is the first pattern of its bin, 0 or
  2048). Returns the new `kept`."""
  start = np.uint32(min(bin_a, bin_b)) << np.uint32(20)
  span = np.uint32(abs(bin_a - bin_b) + 1) << np.uint32(20)
  if (start & np.uint32(0x7FFFFFFF)) == 0:
    start, span = start + np.uint32(1), span - np.uint32(1)
  for i in range(bits.shape[0]):
    if np.uint32(bits[i] - start) < span:
      gathered[kept] = values[i]
      if weights.shape[0] > 0:
        kept_weights[kept] = weights[i]
      kept += 1
  return kept


@jit
def order_statistics(values, weights, lo, hi):
  """The values of ranks lo and hi (hi = lo or lo + 1; 0-based) of finite float32 `values` in
  ascending order, each counted weights[i] times (once when `weights` is empty): what
  np.partition finds (a zero comes back as 0.0).

  A histogram of the top 12 bits (sign, exponent, 3 mantissa bits: bins an eighth of an octave
  wide) finds the bins of the two ranks (`_bin_holding`); only those bins' non-zero values are
  gathered (one unsigned range test a value: the bins between the two, in the values' order,
  are empty) and partitioned (weighted: selected by `_weighted_rank`). Where a rank falls in a
  bin that holds a zero (bins 0 and 2048, with the subnormals), the zeros are counted apart in
  one more pass and the bins found again, so no rank among the zeros gathers them (a still
  scene's maps, mostly zero, would otherwise partition nearly all their values)."""
  bits = values.view(np.uint32)
  n = bits.shape[0]
  weighted = weights.shape[0] > 0
  counts = _histogram(bits, weights)
  bin_lo, before_lo = _bin_holding(counts, 0, lo)
  bin_hi, before_hi = _bin_holding(counts, 0, hi)
  if bin_lo == 0 or bin_lo == 2048 or bin_hi == 0 or bin_hi == 2048:
    positive_zeros, negative_zeros = _zeros(bits, weights)
    counts[0] -= positive_zeros
    counts[2048] -= negative_zeros
    zeros = positive_zeros + negative_zeros
    bin_lo, before_lo = _bin_holding(counts, zeros, lo)
    bin_hi, before_hi = _bin_holding(counts, zeros, hi)
  kept = 0
  # The bins of the two ranks as one range of bit patterns, zeros never gathered. Ranks either
  # side of 0 (no zeros between them: values of both signs, bins a >= 2048 and b < 2048) make it
  # the range from b up to a, which also takes the positive bins above b: values above both
  # ranks, which change neither statistic (nor does -0.0's pattern, inside it: there are no
  # zeros). Maps are never negative, so this costs nothing where it matters.
  a = bin_lo if bin_lo != ZERO_BIN else bin_hi
  b = bin_hi if bin_hi != ZERO_BIN else bin_lo
  # Room for what the two bins and those between hold (their counts, zeros taken out where
  # counted apart and then not gathered), not for all n: a large map's ranks gather a few
  # values. A range over both signs may gather a -0.0 its counts no longer hold: room for all.
  first_bin, last_bin = min(a, b), max(a, b)
  both_signs = first_bin < 2048 <= last_bin
  room = n if weighted or a == ZERO_BIN or both_signs else counts[first_bin : last_bin + 1].sum()
  gathered = np.empty(room, np.float32)
  kept_weights = np.empty(room if weighted else 0, np.int64)
  if a != ZERO_BIN:
    kept = _gather(values, bits, weights, a, b, gathered, kept_weights, 0)
  # Every gathered value is at least the smallest of the first rank's bin (bin_lo, or bin_hi
  # when bin_lo is the zeros), so ranks among them count from that bin's first value.
  base = before_lo if bin_lo != ZERO_BIN else before_hi
  rank_lo, rank_hi = lo - base, hi - base
  zero = np.float32(0)
  if not weighted:
    if bin_lo == ZERO_BIN:
      return zero, zero if bin_hi == ZERO_BIN else gathered[:kept].min()
    part = np.partition(gathered[:kept], rank_lo)
    if bin_hi == ZERO_BIN:
      return part[rank_lo], zero
    return part[rank_lo], part[rank_lo] if hi == lo else part[rank_lo + 1 :].min()
  # Weighted (a map's cells, counted by their pixels): each rank by a selection of its own
  # (a handful of distinct vector lengths repeat over thousands of cells; sorting them was most
  # of the time).
  a = b = zero
  if bin_lo != ZERO_BIN:
    a = _weighted_rank(gathered, kept_weights, kept, rank_lo)
  if bin_hi != ZERO_BIN:
    b = _weighted_rank(gathered, kept_weights, kept, rank_hi)
  return a, b


@numba.njit(inline='always')
def _weighted_rank(values, weights, n, rank):
  """The value of 0-based `rank` among values[:n] in ascending order, each counted weights[i]
  times (0.0 past their total): the value whose run of copies covers the rank, as a stable sort
  of the copies would give it. Quickselect with three-way partitions (less, equal, more than the
  middle value), which reorder values[:n] and weights[:n] together; each round drops the equal
  run at least, so repeated values end it in few rounds."""
  first, last = 0, n
  while first < last:
    pivot = values[first + (last - first) // 2]
    less, i, more = first, first, last
    below = equal = 0
    while i < more:
      value = values[i]
      if value < pivot:
        values[i], values[less] = values[less], value
        weights[i], weights[less] = weights[less], weights[i]
        below += weights[less]
        less += 1
        i += 1
      elif value > pivot:
        more -= 1
        values[i], values[more] = values[more], value
        weights[i], weights[more] = weights[more], weights[i]
      else:
        equal += weights[i]
        i += 1
    if rank < below:
      last = less
    elif rank < below + equal:
      return pivot
    else:
      rank -= below + equal
      first = more
  return np.float32(0)
