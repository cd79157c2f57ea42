"""First-fit packing of variable-length token samples into batches of fixed token rows.

A batch has R rows of L tokens and at most S samples (segments) per row. Each sample goes, whole
and contiguous, into the first row that still has room for its tokens and a free segment slot;
when a sample fits in no row the batch is complete and that sample opens the next batch. Segment
ids count 1..S inside a row in order of arrival; 0 marks padding, as `Encoder.__call__` expects,
and the encoder's head pools segment s+1 into `pooled[:, s]`, which lines up with `labels[:, s]`.

Batch (numpy), from samples of `data_pipeline.transforms`:
  patches        [R, L, 588]  float32 CLIP-normalised (padding 0), or uint8 raw pixels when
                              patch_dtype='uint8' (then normalise on the device with the affine
                              map of `tokens.normalise`: 4x less host memory and transfer)
  positions      [R, L, 3]    int32 (t, h, w); padding (0, 0, 0)
  segment_ids    [R, L]       int32, 0 = padding, 1..S
  labels         [R, S, n]    int32; empty segments hold id 0 (a real id, as the loss wants)
  segment_valid  [R, S]       bool, segment s+1 holds a sample (the label mask)
  segment_mode   [R, S]       int32 transforms.MODE_* per segment, -1 when empty
  sample_index   [R, S]       int64 the sample's record index in its source, -1 when empty
  num_skipped    []           int32 corrupt records dropped while this batch was filled

`PackIterDataset` runs the packing inside a Grain pipeline (before `mp_prefetch`, so in the worker
processes) with exact checkpointing: its state is the upstream state just before the first
element of the batch being filled, so a restore re-reads and re-packs that batch identically.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import grain
import numpy as np

from data_pipeline import tokens

SKIPPED = 'skipped'  # a sample dict with this key stands for a dropped record: counted, not packed

PATCH_DTYPES = ('float32', 'uint8')


class SampleTooLongError(ValueError):
  """A sample has more tokens than a row holds; the message names the sample."""


def sample_name(sample: Mapping[str, Any]) -> str:
  return str(sample.get('name', f'sample #{sample.get("index", "?")}'))


class BatchPacker:
  """Fills one batch of R rows first-fit; `add` says whether a sample fitted, `finish` emits."""

  def __init__(
    self,
    rows: int,
    tokens_per_row: int,
    max_segments: int,
    num_labels: int,
    *,
    patch_dtype: str = 'float32',
  ):
    if min(rows, tokens_per_row, max_segments, num_labels) < 1:
      raise ValueError(
        f'rows={rows}, tokens_per_row={tokens_per_row}, max_segments={max_segments}'
        f', num_labels={num_labels}: all must be >= 1'
      )
    if patch_dtype not in PATCH_DTYPES:
      raise ValueError(f'patch_dtype={patch_dtype!r}; choose one of {PATCH_DTYPES}')
    self.rows, self.tokens_per_row = rows, tokens_per_row
    self.max_segments, self.num_labels = max_segments, num_labels
    self.patch_dtype = patch_dtype
    self._reset()

  def _reset(self):
    r, l, s = self.rows, self.tokens_per_row, self.max_segments
    self._patches_RxLxP = np.zeros((r, l, tokens.PATCH_DIM), np.uint8)
    self._positions_RxLx3 = np.zeros((r, l, 3), np.int32)
    self._segment_ids_RxL = np.zeros((r, l), np.int32)
    self._labels_RxSxN = np.zeros((r, s, self.num_labels), np.int32)
    self._mode_RxS = np.full((r, s), -1, np.int32)
    self._index_RxS = np.full((r, s), -1, np.int64)
    self._used_R = np.zeros(r, np.int64)  # tokens filled per row
    self._segments_R = np.zeros(r, np.int64)  # samples per row
    self.num_samples = 0

  def check(self, sample: Mapping[str, Any]) -> int:
    """The sample's token count, after checking its arrays against this packer's shapes."""
    n = len(sample['patches'])
    if n > self.tokens_per_row:
      raise SampleTooLongError(
        f'{sample_name(sample)}: {n} tokens do not fit a row of tokens_per_row='
        f"{self.tokens_per_row}; raise tokens_per_row or lower this head's token budget"
      )
    if n == 0:
      raise ValueError(f'{sample_name(sample)}: a sample with no tokens')
    if sample['patches'].shape != (n, tokens.PATCH_DIM) or sample['positions'].shape != (n, 3):
      raise ValueError(
        f'{sample_name(sample)}: patches {sample["patches"].shape} / positions '
        f'{sample["positions"].shape}; expected [{n}, {tokens.PATCH_DIM}] / '
        f'[{n}, 3]'
      )
    if np.shape(sample['labels']) != (self.num_labels,):
      raise ValueError(
        f'{sample_name(sample)}: labels of shape {np.shape(sample["labels"])}; '
        f'this head packs {self.num_labels} per sample'
      )
    return n

  def add(self, sample: Mapping[str, Any]) -> bool:
    """Places the sample in the first row with room; False (and no change) when none has room."""
    n = self.check(sample)
    fits_R = (self.tokens_per_row - self._used_R >= n) & (self._segments_R < self.max_segments)
    if not fits_R.any():
      return False
    row = int(np.argmax(fits_R))
    start, seg = int(self._used_R[row]), int(self._segments_R[row])
    self._patches_RxLxP[row, start : start + n] = sample['patches']
    self._positions_RxLx3[row, start : start + n] = sample['positions']
    self._segment_ids_RxL[row, start : start + n] = seg + 1
    self._labels_RxSxN[row, seg] = sample['labels']
    self._mode_RxS[row, seg] = int(sample.get('mode', -1))
    self._index_RxS[row, seg] = int(sample.get('index', -1))
    self._used_R[row] += n
    self._segments_R[row] += 1
    self.num_samples += 1
    return True

  def finish(self, num_skipped: int = 0) -> dict[str, np.ndarray]:
    """The batch filled so far (empty rows are all padding); the packer starts a new batch."""
    if self.patch_dtype == 'float32':
      patches = tokens.normalise(self._patches_RxLxP)
      patches[self._segment_ids_RxL == 0] = 0.0  # padding stays exactly zero
    else:
      patches = self._patches_RxLxP
    batch = {
      'patches': patches,
      'positions': self._positions_RxLx3,
      'segment_ids': self._segment_ids_RxL,
      'labels': self._labels_RxSxN,
      'segment_valid': self._mode_RxS >= 0,
      'segment_mode': self._mode_RxS,
      'sample_index': self._index_RxS,
      'num_skipped': np.asarray(num_skipped, np.int32),
    }
    self._reset()
    return batch


def pack(
  samples: Iterable[Mapping[str, Any]],
  *,
  rows: int,
  tokens_per_row: int,
  max_segments: int,
  num_labels: int,
  patch_dtype: str = 'float32',
) -> list[dict[str, np.ndarray]]:
  """Packs a finite list of samples into batches, exactly as the pipeline does (no skips)."""
  packer = BatchPacker(rows, tokens_per_row, max_segments, num_labels, patch_dtype=patch_dtype)
  batches = []
  for sample in samples:
    if not packer.add(sample):
      batches.append(packer.finish())
      packer.add(sample)  # an empty batch takes any sample that passed `check`
  if packer.num_samples:
    batches.append(packer.finish())
  return batches


class PackIterDataset(grain.IterDataset):
  """Grain stage: samples (or SKIPPED markers) in, packed batches out, checkpointable."""

  def __init__(
    self,
    parent: grain.IterDataset,
    *,
    rows: int,
    tokens_per_row: int,
    max_segments: int,
    num_labels: int,
    patch_dtype: str = 'float32',
    max_consecutive_skips: int = 1000,
  ):
    super().__init__(parent)
    self._kwargs = dict(
      rows=rows,
      tokens_per_row=tokens_per_row,
      max_segments=max_segments,
      num_labels=num_labels,
      patch_dtype=patch_dtype,
    )
    BatchPacker(**self._kwargs)  # validate the arguments here, not in a worker process
    self._max_consecutive_skips = max_consecutive_skips

  def __iter__(self) -> grain.DatasetIterator:
    return _PackIterator(self._parent.__iter__(), self._kwargs, self._max_consecutive_skips)

  def __str__(self) -> str:
    return f'PackIterDataset({self._kwargs})'


class _PackIterator(grain.DatasetIterator):
  def __init__(
    self, parent: grain.DatasetIterator, packer_kwargs: dict[str, Any], max_consecutive_skips: int
  ):
    super().__init__(parent)
    self._packer_kwargs = packer_kwargs
    self._packer = BatchPacker(**packer_kwargs)
    self._max_consecutive_skips = max_consecutive_skips
    self._consecutive_skips = 0
    # A sample that did not fit the previous batch, and the upstream state just before it: the
    # next batch starts with it, so that state is where a restore must re-read from.
    self._pending: Mapping[str, Any] | None = None
    self._pending_state: dict[str, Any] | None = None

  def __next__(self) -> dict[str, np.ndarray]:
    packer, num_skipped = self._packer, 0
    if self._pending is not None:
      packer.add(self._pending)  # an empty batch takes any sample that passed `check`
      self._pending, self._pending_state = None, None
    while True:
      before = self._parent.get_state()
      try:
        sample = next(self._parent)
      except StopIteration:
        if packer.num_samples == 0:
          raise
        return packer.finish(num_skipped)  # the last, partly filled batch of a finite pass
      if SKIPPED in sample:
        num_skipped += 1
        self._count_skip(sample)
        continue
      self._consecutive_skips = 0
      if not packer.add(sample):
        self._pending, self._pending_state = sample, before
        return packer.finish(num_skipped)

  def _count_skip(self, sample: Mapping[str, Any]):
    self._consecutive_skips += 1
    if 0 < self._max_consecutive_skips <= self._consecutive_skips:
      raise RuntimeError(
        f'{self._consecutive_skips} records in a row could not be used (the last: '
        f'{sample[SKIPPED]}); the source is probably wrong, not just a few corrupt records'
      )

  def get_state(self) -> dict[str, Any]:
    # Between batches nothing is half packed: resume at the pending sample, or where upstream is.
    if self._pending is not None:
      return {'parent': self._pending_state}
    return {'parent': self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._pending, self._pending_state = None, None
    self._packer = BatchPacker(**self._packer_kwargs)

  def __str__(self) -> str:
    return 'PackIterator'
