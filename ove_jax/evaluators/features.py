"""Frozen-encoder features for the probes, and the video samples they are computed on.

`video_samples(records, mode)` turns labelled video records into token samples at an equal token
budget: 'codec' gives a record's K selected patches, 'uniform' gives `num_frames` whole frames
(256 patches each) at their true t on the 64-frame grid, so codec K = 2048 against 8 uniform
frames is the paper's comparison (docs/spec.md §6).

`extract(encoder, samples)` runs the encoder once over them and keeps, per sample, its output
tokens (`last_hidden_state`, for the attentive probe) and its pooled embedding (for the linear
and k-NN probes). Every batch has the same shape (rows padded to one length, the last batch
padded with empty rows), so the jitted forward compiles once whatever the samples' lengths.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline import transforms

MODES = ('codec', 'uniform')
FRAME_TOKENS = transforms.VIDEO_GRID * transforms.VIDEO_GRID  # 256 patches per 224 x 224 frame
LENGTH_MULTIPLE = 128  # rows are padded to a multiple of this: fewer distinct compiled shapes


@dataclasses.dataclass
class Features:
  """Per-sample features of a frozen encoder.

  tokens_NxLxC  float32 output tokens, zero past each sample's length (None when not kept)
  mask_NxL      bool, True on a sample's real tokens (None when tokens are not kept)
  pooled_NxC    float32 pooled embeddings (the MAP head's; the token mean without a head)
  labels_N      int64 class ids (None when the samples carry no `label`)
  """

  tokens_NxLxC: np.ndarray | None
  mask_NxL: np.ndarray | None
  pooled_NxC: np.ndarray
  labels_N: np.ndarray | None

  def __len__(self) -> int:
    return len(self.pooled_NxC)


# ------------------------------------------------------------------------------------------------
# Samples
# ------------------------------------------------------------------------------------------------


def record_label(record: Mapping[str, Any], label_index: int = 0) -> int:
  """Label `label_index` of a record's `labels` (the builtin data's first is the fine class)."""
  labels = record.get('labels')
  if labels is None:
    raise ValueError(
      f'the record {record.get("source", "")!r} has no `labels` field; probes need labelled records'
    )
  labels = np.asarray(labels).reshape(-1)
  if not -len(labels) <= label_index < len(labels):
    raise ValueError(
      f'label_index {label_index}: the record {record.get("source", "")!r} has '
      f'{len(labels)} label(s)'
    )
  return int(labels[label_index])


def video_samples(
  records: Sequence[Mapping[str, Any]],
  mode: str = 'codec',
  num_frames: int = 8,
  *,
  seed: int = 0,
  label_index: int = 0,
  temporal_size: int = transforms.TEMPORAL_SIZE,
  video_root: str = '',
) -> list[dict[str, Any]]:
  """Token samples {patches uint8 [N, 588], positions int32 [N, 3], label} of video records.

  'codec': the record's K selected patches (stored ones, or gathered from its video).
  'uniform': `num_frames` frames x 256 patches, one frame per equal bin of the clip (drawn with a
  generator seeded by (seed, record index), so a run is repeatable), at their t on the grid.
  For the equal-budget comparison, pick num_frames = K / 256.
  """
  if mode not in MODES:
    raise ValueError(f'mode={mode!r}; choose one of {MODES}')
  if num_frames < 1:
    raise ValueError(f'num_frames={num_frames}; must be >= 1')
  probs = (1.0, 0.0, 0.0) if mode == 'codec' else (0.0, 1.0, 0.0)
  transform = transforms.VideoTransform(
    mode_probs=probs,
    num_frames=num_frames,
    temporal_size=temporal_size,
    num_labels=1,
    video_root=video_root,
  )
  samples = []
  for index, record in enumerate(records):
    label = record_label(record, label_index)
    if mode == 'codec':
      patches, positions = transform.codec(record)
    else:
      rng = np.random.default_rng([seed, index])
      patches, positions = transform.frames(record, rng, collage=False)
    samples.append({'patches': patches, 'positions': positions.astype(np.int32), 'label': label})
  return samples


# ------------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------------


def _pack(lengths: Sequence[int], row_length: int, num_segments: int) -> list[list[int]]:
  """Sample indices per row, in order: a row takes samples while they fit and it has < S."""
  rows, row, used = [], [], 0
  for i, n in enumerate(lengths):
    if row and (used + n > row_length or len(row) == num_segments):
      rows.append(row)
      row, used = [], 0
    row.append(i)
    used += n
  if row:
    rows.append(row)
  return rows


@functools.partial(jax.jit, static_argnames=('graphdef', 's'))
def _forward(state, patches_BxLxP, positions_BxLx3, segment_ids_BxL, *, graphdef, s: int):
  """Tokens [B, L, C] and pooled [B, S, C] in float32. Module-level with the model's structure as
  a static argument, so a periodic evaluation during training reuses the compiled forward."""
  model = nnx.merge(graphdef, state)
  if patches_BxLxP.dtype == jnp.uint8:  # normalised here: uint8 is a quarter of the transfer
    patches_BxLxP = transforms.normalise(patches_BxLxP)  # numpy maths, traced as jnp
  out = model(patches_BxLxP, positions_BxLx3, segment_ids_BxL, num_segments=s)
  tokens = out['last_hidden_state'].astype(jnp.float32)
  if model.cfg.use_head:
    return tokens, out['pooled'].astype(jnp.float32)
  # No head: the mean of each segment's tokens.
  member_BxSxL = segment_ids_BxL[:, None, :] == jnp.arange(1, s + 1)[None, :, None]
  weights = member_BxSxL / jnp.maximum(member_BxSxL.sum(-1, keepdims=True), 1)
  return tokens, jnp.einsum('bsl,blc->bsc', weights, tokens)


def extract(
  encoder,
  samples: Sequence[Mapping[str, Any]],
  *,
  batch_size: int = 8,
  num_segments: int = 1,
  keep_tokens: bool = True,
  progress: bool = False,
) -> Features:
  """Runs the frozen encoder over `samples`; returns their `Features`.

  Args:
    encoder: an `ove_jax.models.Encoder` (not changed).
    samples: dicts with `patches` [N_i, 588] (uint8 pixels, normalised here, or float already
      CLIP-normalised), `positions` [N_i, 3], and optionally an integer `label`.
    batch_size: rows per forward call.
    num_segments: samples packed per row (S). 1 (one sample per row) suits equal-length samples
      such as videos at one budget; S > 1 packs short samples (images of several sizes) into rows
      as long as the longest one, attention staying within each sample, for less padding.
    keep_tokens: keep the output tokens (the attentive probe needs them; [N, L_max, C] float32
      can be large: 1000 samples x 2048 tokens x 1024 wide is 8 GB).

  Returns `Features`; tokens padded to the longest sample, with `mask_NxL`.
  """
  if not samples:
    raise ValueError('no samples to extract features from')
  if batch_size < 1 or num_segments < 1:
    raise ValueError(f'batch_size={batch_size}, num_segments={num_segments}; both must be >= 1')
  lengths = []
  for i, sample in enumerate(samples):
    patches, positions = np.asarray(sample['patches']), np.asarray(sample['positions'])
    if patches.ndim != 2 or patches.shape[1] != encoder.cfg.patch_dim or len(patches) == 0:
      raise ValueError(
        f'sample {i}: patches of shape {patches.shape}; expected [N > 0, {encoder.cfg.patch_dim}]'
      )
    if positions.shape != (len(patches), 3):
      raise ValueError(
        f'sample {i}: positions of shape {positions.shape}; expected {(len(patches), 3)}'
      )
    lengths.append(len(patches))
  l_max = max(lengths)
  row_length = -(-l_max // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
  rows = _pack(lengths, row_length, num_segments)
  uint8 = all(np.asarray(s['patches']).dtype == np.uint8 for s in samples)
  patch_dtype = np.uint8 if uint8 else np.float32
  graphdef, state = nnx.split(encoder)
  n, c = len(samples), encoder.cfg.width
  tokens = np.zeros((n, l_max, c), np.float32) if keep_tokens else None
  pooled = np.zeros((n, c), np.float32)
  batches = range(0, len(rows), batch_size)
  if progress:
    import tqdm

    batches = tqdm.tqdm(batches, desc='features', unit='batch')
  for start in batches:
    batch_rows = rows[start : start + batch_size]
    patches = np.zeros((batch_size, row_length, encoder.cfg.patch_dim), patch_dtype)
    positions = np.zeros((batch_size, row_length, 3), np.int32)
    segments = np.zeros((batch_size, row_length), np.int32)
    spans = []  # (sample, row in batch, segment, offset)
    for r, row in enumerate(batch_rows):
      offset = 0
      for s, i in enumerate(row):
        k = lengths[i]
        patches[r, offset : offset + k] = samples[i]['patches']
        positions[r, offset : offset + k] = samples[i]['positions']
        segments[r, offset : offset + k] = s + 1
        spans.append((i, r, s, offset))
        offset += k
    tokens_BxLxC, pooled_BxSxC = jax.device_get(
      _forward(state, patches, positions, segments, graphdef=graphdef, s=num_segments)
    )
    for i, r, s, offset in spans:
      pooled[i] = pooled_BxSxC[r, s]
      if keep_tokens:
        tokens[i, : lengths[i]] = tokens_BxLxC[r, offset : offset + lengths[i]]
  mask = (np.arange(l_max)[None, :] < np.asarray(lengths)[:, None]) if keep_tokens else None
  labels = None
  if all('label' in s for s in samples):
    labels = np.asarray([int(s['label']) for s in samples], np.int64)
  return Features(tokens, mask, pooled, labels)
