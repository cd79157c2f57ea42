"""Cluster discrimination with Partial FC (docs/spec.md §4), class centres sharded over the mesh.

Each head (image, OCR, video) owns a matrix of class centres W [N, C]. Per step and per label slot,
every sample's embedding is scored against a subset S of the centres: every positive of that slot
in the *global* batch plus random others (Partial FC), with a CosFace margin on the target and
inter-class filtering of too-similar negatives, under a softmax cross-entropy in float32.

Layout. W's rows are sharded over every mesh axis (logical axis `classes`). Inside a
`jax.shard_map`, each device gathers the global batch's embeddings ([B, C], small), scores them
against *its own* sampled centres only ([B, k_local]) and the softmax normaliser (max, sum of
exponentials) and the target logit are reduced across devices with `pmax` / `psum`. No device
ever holds logits for all classes, the whole centre matrix, or a [B, N] buffer.

Sampling. The classes are cut into `sampling_blocks` equal blocks (N is padded up to a multiple;
padding classes are never chosen as valid). Each block keeps `ceil(sample_rate * block_size)`
classes: its positives first, then the others in the order of a hash of (seed, step, slot, class
id), which is uniform and deterministic given the step. Because the draw is per block and keyed by
the global class id, the sampled set does not depend on the mesh: any mesh whose device count
divides `sampling_blocks` trains identically, which is what lets a run resume on another mesh.

A block with more positives than its quota keeps all of them and no random others, as the
release's Partial FC does on a rank whose positives overflow (its subset grows to the positives).
Shapes stay static: each block scores `block_capacity(B)` classes, the quota plus a headroom of
`positive_headroom` quotas (never more than the batch or the block can need); the slots beyond a
block's quota that hold no positive are masked out. Positives beyond the headroom (more distinct
positives in one block than the capacity) leave their samples out of that slot's loss and are
counted in `dropped` (the trainer warns whenever it is not zero): raise `positive_headroom`.
The headroom costs compute only when the batch exceeds the quota: the logits are
[B, sampling_blocks * block_capacity(B)] per slot.

Slots. Each sample has n labels (its nearest centres); each step draws `num_slots` of them without
replacement, by a hash of (seed, step, sample id, label position): deterministic, and independent
of where the sample sits in the batch, so a batch split across hosts (or into accumulated
micro-batches) trains as in one piece. The class draw also folds in the micro-batch index, so
accumulated micro-batches score different random classes, as separate steps of the release do.

`partial_fc_loss` runs sharded when a mesh is set (jax.set_mesh) and plainly otherwise;
`reference_loss` is the plain single-device form of the same maths, for tests.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ove_jax import sharding

_NEG = -1e9  # logit of an unsampled slot: exp() underflows to exactly 0, gradients stay finite


@dataclasses.dataclass(frozen=True)
class PartialFCConfig:
  """One head's loss. Defaults are the release's values (docs/spec.md §4)."""

  num_classes: int
  sample_rate: float = 0.1  # share of each block's centres scored per slot
  num_slots: int = 8  # label slots per step (at most the labels per sample)
  margin: float = 0.3  # CosFace: target logit cos - margin
  scale: float = 64.0  # s: logits are s * cos
  filter_threshold: float = 0.75  # non-target cos above this -> 0 (>= 1 disables)
  sampling_blocks: int = 8  # a multiple of the device count (see the module docstring)
  seed: int = 0  # salt of the sampling hashes
  positive_headroom: float = 1.0  # extra classes per block for overflowing positives, in quotas

  def __post_init__(self):
    if self.num_classes < 1:
      raise ValueError(f'num_classes={self.num_classes}; must be >= 1')
    if not 0 < self.sample_rate <= 1:
      raise ValueError(f'sample_rate={self.sample_rate}; must be in (0, 1]')
    if self.num_slots < 1:
      raise ValueError(f'num_slots={self.num_slots}; must be >= 1')
    if self.sampling_blocks < 1:
      raise ValueError(f'sampling_blocks={self.sampling_blocks}; must be >= 1')
    if self.scale <= 0:
      raise ValueError(f'scale={self.scale}; must be > 0')
    if self.positive_headroom < 0:
      raise ValueError(
        f'positive_headroom={self.positive_headroom}; must be >= 0 (0 keeps at '
        'most the quota of positives per block)'
      )

  @property
  def padded_classes(self) -> int:
    return self.sampling_blocks * self.block_size

  @property
  def block_size(self) -> int:
    return -(-self.num_classes // self.sampling_blocks)

  @property
  def block_samples(self) -> int:
    """Classes kept per block per slot: positives first, then random ones."""
    return max(1, min(self.block_size, math.ceil(self.sample_rate * self.block_size)))

  def block_capacity(self, batch: int) -> int:
    """Classes scored per block per slot for a global batch of `batch` samples: the quota, or up
    to `positive_headroom` quotas more when the batch can hold more positives than the quota."""
    k = self.block_samples
    extra = math.ceil(self.positive_headroom * k)
    return max(k, min(self.block_size, batch, k + extra))

  def check_devices(self, num_devices: int, name: str = '', key: str = '') -> None:
    """The centres are sharded by whole blocks over every device. The error names `key` (the
    config key that set sampling_blocks), else heads.<name>.sampling_blocks."""
    if self.sampling_blocks % num_devices:
      key = key or (f'heads.{name}.' if name else '') + 'sampling_blocks'
      multiple = num_devices * max(1, round(self.sampling_blocks / num_devices))
      raise ValueError(
        f'{key}={self.sampling_blocks} is not a multiple of the {num_devices} '
        f'devices the class centres are sharded over; set --config.{key}='
        f'{multiple} (any multiple of {num_devices})'
      )


# ------------------------------------------------------------------------------------------------
# Deterministic hashing (uniform 32-bit values from integers, the same on every device and mesh)
# ------------------------------------------------------------------------------------------------


def _mix32(x):
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_u32(*values) -> jax.Array:
  """A well-mixed uint32 of integer arrays (broadcast together)."""
  h = jnp.uint32(0x9E3779B9)
  for v in values:
    h = _mix32(h ^ (jnp.asarray(v).astype(jnp.uint32) + jnp.uint32(0x9E3779B9)))
  return h


def class_keys(cfg: PartialFCConfig, step, micro, slot, class_ids) -> jax.Array:
  """int32 keys in [0, 2^30) ordering the negatives of a (step, micro-batch, slot): the uniform
  random draw of Partial FC, the same on every device and mesh."""
  return (hash_u32(cfg.seed, step, micro, slot, class_ids) >> 2).astype(jnp.int32)


def choose_slots(
  labels_BxN: jax.Array, sample_ids_B: jax.Array, step, cfg: PartialFCConfig
) -> jax.Array:
  """[J, B] labels: J = min(num_slots, n) of each sample's n labels, without replacement."""
  n = labels_BxN.shape[1]
  j = min(cfg.num_slots, n)
  keys = hash_u32(cfg.seed, step, sample_ids_B[:, None], jnp.arange(n)[None, :])
  order = jnp.argsort(keys, axis=1)[:, :j]
  return jnp.take_along_axis(labels_BxN, order, axis=1).T


# ------------------------------------------------------------------------------------------------
# The loss of one slot on one shard of the centres, with the cross-shard reductions passed in
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Reduce:
  sum: Callable
  max: Callable


_LOCAL = _Reduce(sum=lambda x: x, max=lambda x: x)


def _slot(
  e_BxC, y_B, valid_B, centres_NxC, offset, step, micro, slot, cfg: PartialFCConfig, reduce: _Reduce
):
  """Per-sample loss, found-target flag and correctness of one slot; see the module docstring."""
  n_local = centres_NxC.shape[0]
  bs, k = cfg.block_size, cfg.block_samples
  cap = cfg.block_capacity(y_B.shape[0])
  ids = offset + jnp.arange(n_local, dtype=jnp.int32)  # global class ids of this shard
  # Positives of the global batch that live here.
  local_y = y_B - offset
  here = valid_B & (local_y >= 0) & (local_y < n_local)
  positive = (
    jnp.zeros((n_local,), bool).at[jnp.where(here, local_y, n_local)].set(True, mode='drop')
  )
  # Positives first, then a hash order; padding classes last.
  rand = class_keys(cfg, step, micro, slot, ids)  # [0, 2^30)
  # Positives in [2^30, 2^31), ordered among themselves by the same hash: when a block has more
  # positives than its capacity, which ones are left out is random, not always the highest ids.
  score = jnp.where(positive, rand | jnp.int32(2**30), jnp.where(ids < cfg.num_classes, rand, -1))
  _, top = jax.lax.top_k(score.reshape(n_local // bs, bs), cap)
  chosen = (top + (jnp.arange(n_local // bs) * bs)[:, None]).reshape(-1)  # [k_local]
  chosen_ids = ids[chosen]
  # A block keeps its first k (positives, then random) and beyond them only positives: a block
  # whose positives overflow the quota scores exactly its positives, as the release.
  within_quota = jnp.tile(jnp.arange(cap) < k, n_local // bs)
  real = (chosen_ids < cfg.num_classes) & (within_quota | positive[chosen])

  w = centres_NxC[chosen].astype(jnp.float32)
  w = w * jax.lax.rsqrt(jnp.maximum(jnp.sum(w * w, axis=1, keepdims=True), 1e-24))
  cos = jnp.clip(e_BxC @ w.T, -1.0, 1.0)  # [B, k_local], float32
  is_target = (chosen_ids[None, :] == y_B[:, None]) & real[None, :]
  too_close = jax.lax.stop_gradient(~is_target & (cos > cfg.filter_threshold))
  logits = cfg.scale * jnp.where(is_target, cos - cfg.margin, jnp.where(too_close, 0.0, cos))
  logits = jnp.where(real[None, :], logits, _NEG)

  top_logit = reduce.max(jax.lax.stop_gradient(jnp.max(logits, axis=1)))
  top_logit = jax.lax.stop_gradient(top_logit)
  sum_exp = reduce.sum(jnp.sum(jnp.exp(logits - top_logit[:, None]), axis=1))
  target_logit = reduce.sum(jnp.sum(jnp.where(is_target, logits, 0.0), axis=1))
  found = reduce.sum(jnp.sum(is_target, axis=1, dtype=jnp.int32)) > 0
  loss = jnp.log(sum_exp) + top_logit - target_logit

  # Accuracy among the sampled classes, on the raw cosines (no margin, no filter).
  raw = jax.lax.stop_gradient(cos)
  target_cos = reduce.sum(jnp.sum(jnp.where(is_target, raw, 0.0), axis=1))
  other_cos = reduce.max(jnp.max(jnp.where(is_target | ~real[None, :], -2.0, raw), axis=1))
  correct = target_cos > other_cos
  return loss, found, correct


def _head_loss(
  e_BxC,
  valid_B,
  labels_BxN,
  sample_ids_B,
  centres_NxC,
  offset,
  step,
  micro,
  cfg: PartialFCConfig,
  reduce: _Reduce,
) -> dict[str, jax.Array]:
  """Mean over slots of the mean over the valid samples whose target was sampled."""
  e = jnp.asarray(e_BxC, jnp.float32)
  centres_NxC, valid_B = jnp.asarray(centres_NxC), jnp.asarray(valid_B, bool)
  labels_BxN = jnp.asarray(labels_BxN, jnp.int32)
  sample_ids_B = jnp.asarray(sample_ids_B, jnp.int32)
  e = e * jax.lax.rsqrt(jnp.maximum(jnp.sum(e * e, axis=1, keepdims=True), 1e-24))
  y_JxB = choose_slots(labels_BxN, sample_ids_B, step, cfg)
  slots = jnp.arange(y_JxB.shape[0])
  loss, found, correct = jax.vmap(
    lambda y, j: _slot(e, y, valid_B, centres_NxC, offset, step, micro, j, cfg, reduce)
  )(y_JxB, slots)
  use = valid_B[None, :] & found  # [J, B]
  count = jnp.sum(use, axis=1)
  per_slot = jnp.sum(jnp.where(use, loss, 0.0), axis=1) / jnp.maximum(count, 1)
  return {
    'loss': jnp.mean(per_slot),
    'accuracy': jnp.sum(use & correct) / jnp.maximum(jnp.sum(use), 1),
    'dropped': jnp.sum(valid_B[None, :] & ~found),
  }


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def reference_loss(
  e_BxC, valid_B, labels_BxN, sample_ids_B, centres_NxC, step, cfg: PartialFCConfig, micro=0
) -> dict[str, jax.Array]:
  """The loss on one device, all centres local: the plain form of `partial_fc_loss`."""
  _check_shapes(e_BxC, valid_B, labels_BxN, sample_ids_B, centres_NxC, cfg)
  return _head_loss(
    e_BxC,
    valid_B,
    labels_BxN,
    sample_ids_B,
    centres_NxC,
    0,
    jnp.asarray(step, jnp.int32),
    jnp.asarray(micro, jnp.int32),
    cfg,
    _LOCAL,
  )


def partial_fc_loss(
  e_BxC,
  valid_B,
  labels_BxN,
  sample_ids_B,
  centres_NxC,
  step,
  cfg: PartialFCConfig,
  rules=sharding.DEFAULT_RULES,
  micro=0,
) -> dict[str, jax.Array]:
  """The head loss; sharded over the mesh when one is set (`jax.set_mesh`).

  Args:
    e_BxC: embeddings (any float dtype; normalised here in float32), batch sharded by
      `act_batch` as the encoder leaves it.
    valid_B: bool, which rows are real samples (packing leaves empty segments).
    labels_BxN: int32 label ids, n per sample, all in [0, num_classes).
    sample_ids_B: int32 sample identities (the record index), keying the slot draw.
    centres_NxC: the head's centres, N = cfg.padded_classes, rows sharded over every mesh axis.
    step: int32 scalar, the training step: the slot and class draws depend on it.
    micro: int32 scalar, the micro-batch index under gradient accumulation (class draws only).

  Returns {'loss', 'accuracy', 'dropped'}: scalars, identical on every device.
  """
  _check_shapes(e_BxC, valid_B, labels_BxN, sample_ids_B, centres_NxC, cfg)
  step, micro = jnp.asarray(step, jnp.int32), jnp.asarray(micro, jnp.int32)
  mesh = sharding.current_mesh()
  if mesh is None or mesh.size == 1:
    return _head_loss(
      e_BxC, valid_B, labels_BxN, sample_ids_B, centres_NxC, 0, step, micro, cfg, _LOCAL
    )
  cfg.check_devices(mesh.size)
  class_axes = tuple(mesh.axis_names)
  batch_axes = sharding.batch_axes(mesh, rules)
  reduce = _Reduce(
    sum=lambda x: jax.lax.psum(x, class_axes), max=lambda x: jax.lax.pmax(x, class_axes)
  )
  n_local = cfg.padded_classes // mesh.size

  def local(e, valid, labels, ids, centres, step, micro):
    if batch_axes:
      # 'invarying': the gathered batch is the same on every device (typed so for shard_map).
      e, valid, labels, ids = (
        jax.lax.all_gather(x, batch_axes, axis=0, tiled=True, to='invarying')
        for x in (e, valid, labels, ids)
      )
    offset = jax.lax.axis_index(class_axes) * n_local
    return _head_loss(e, valid, labels, ids, centres, offset, step, micro, cfg, reduce)

  batch = P(batch_axes or None)
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(batch, batch, batch, batch, P(class_axes), P(), P()),
    out_specs=P(),
  )(e_BxC, valid_B, labels_BxN, sample_ids_B, centres_NxC, step, micro)


def _check_shapes(e, valid, labels, ids, centres, cfg):
  b = e.shape[0]
  if valid.shape != (b,) or ids.shape != (b,) or labels.ndim != 2 or labels.shape[0] != b:
    raise ValueError(
      f'embeddings {e.shape}, valid {valid.shape}, labels {labels.shape}, '
      f'sample ids {ids.shape}: expected [B, C], [B], [B, n], [B]'
    )
  if centres.shape != (cfg.padded_classes, e.shape[1]):
    raise ValueError(
      f'centres {centres.shape}; expected {(cfg.padded_classes, e.shape[1])} '
      f'({cfg.num_classes} classes padded to {cfg.sampling_blocks} blocks)'
    )


def init_centres(key, cfg: PartialFCConfig, width: int, std: float = 0.01) -> jax.Array:
  """N(0, std) centres (docs/spec.md §4: 0.01); padding rows too (they are never scored)."""
  return std * jax.random.normal(key, (cfg.padded_classes, width), jnp.float32)


def loss_flops(cfg: PartialFCConfig, batch: int, width: int, num_labels: int) -> int:
  """Matmul FLOPs of one head's loss, forward and backward (3x the forward's 2*B*k*C per slot,
  k the scored classes including the positive headroom)."""
  k = cfg.sampling_blocks * cfg.block_capacity(batch)
  return 3 * 2 * batch * k * width * min(cfg.num_slots, num_labels)
