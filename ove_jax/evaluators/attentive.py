"""The attentive probe (docs/spec.md §6): a new MAP head on a frozen encoder's output tokens.

  tokens [B, L, C] -> MAPHead (as the encoder's, fresh weights) -> LayerNorm -> Linear(classes)

trained with AdamW (lr 1e-4, weight decay 0, linear decay to 0 over the run), label smoothing 0.1
and gradient clipping at global norm 5, for `epochs` passes over the training features (10; 30
for small sets), evaluated on the test features after every epoch. The paper reports the best
epoch's top-1 (one clip per video); we report it and the last epoch's.

It trains on precomputed features (`features.extract`), never through the encoder: the probe is
a few million parameters, so each step is cheap and a probe on hundreds of samples at width 128
runs in seconds on a CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ove_jax import sharding
from ove_jax.models.encoder import EncoderConfig, MAPHead


@dataclasses.dataclass(frozen=True)
class AttentiveConfig:
  """The probe's training settings; the defaults are docs/spec.md §6's."""
  epochs: int = 10                  # docs/spec.md §6: 10, or 30 for small sets
  batch_size: int = 32
  learning_rate: float = 1e-4       # AdamW peak, linearly decayed to end_learning_rate
  end_learning_rate: float = 0.0
  weight_decay: float = 0.0
  label_smoothing: float = 0.1
  clip_norm: float = 5.0            # global gradient norm
  seed: int = 0                     # initialisation and batch order

  def __post_init__(self):
    if self.epochs < 1 or self.batch_size < 1:
      raise ValueError(f'epochs={self.epochs}, batch_size={self.batch_size}; both must be >= 1')
    if self.learning_rate <= 0:
      raise ValueError(f'learning_rate={self.learning_rate}; must be > 0')
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f'label_smoothing={self.label_smoothing}; must be in [0, 1)')


class AttentiveProbe(nnx.Module):
  """MAPHead -> LayerNorm -> Linear. The head takes the encoder's config (width, heads, MLP
  width), in float32 whatever the encoder's compute dtype."""

  def __init__(self, cfg: EncoderConfig, num_classes: int, *, rngs: nnx.Rngs):
    cfg = dataclasses.replace(cfg, dtype='float32', remat='none', attention='xla')
    # The head's parameters carry logical axis names; with no mesh set they must not be placed.
    no_mesh = sharding.current_mesh() is None
    with nnx.use_eager_sharding(False) if no_mesh else contextlib.nullcontext():
      self.pool = MAPHead(cfg, sharding.DEFAULT_RULES, rngs=rngs)
    self.norm = nnx.LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.classifier = nnx.Linear(cfg.width, num_classes, rngs=rngs,
                                 kernel_init=nnx.initializers.normal(0.02))

  def __call__(self, tokens_BxLxC, mask_BxL):
    pooled_Bx1xC, _ = self.pool(tokens_BxLxC, mask_BxL.astype(jnp.int32), 1)
    return self.classifier(self.norm(pooled_Bx1xC[:, 0]))


def optimizer(config: AttentiveConfig, total_steps: int) -> optax.GradientTransformation:
  """Clip at global norm `clip_norm`, then AdamW with a linear decay from `learning_rate` to
  `end_learning_rate` over `total_steps`."""
  schedule = optax.linear_schedule(config.learning_rate, config.end_learning_rate,
                                   max(total_steps, 1))
  return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                     optax.adamw(schedule, weight_decay=config.weight_decay))


def smoothed_cross_entropy(logits_BxK, labels_B, smoothing: float):
  """Per-sample cross-entropy against one-hot labels smoothed to (1 - e) + e / K and e / K."""
  k = logits_BxK.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels_B, k), smoothing)
  return optax.softmax_cross_entropy(logits_BxK.astype(jnp.float32), targets)


def _batches(n: int, batch_size: int, rng: np.random.Generator | None):
  """Index batches of exactly `batch_size` (the last padded with -1), shuffled when `rng`."""
  order = rng.permutation(n) if rng is not None else np.arange(n)
  pad = -n % batch_size
  order = np.concatenate([order, -np.ones(pad, np.int64)])
  return order.reshape(-1, batch_size)


def _take(array, index_B):
  """Rows `index_B` of `array`, with -1 (padding) taking row 0."""
  return array[np.maximum(index_B, 0)]


# Module-level jits with the probe's structure and settings as static arguments: a probe
# retrained with other seeds, or again at the next periodic evaluation, reuses the compiled step.

@functools.partial(jax.jit, static_argnames=('graphdef', 'config', 'total_steps'))
def _train_step(params, opt_state, tokens_BxLxC, mask_BxL, labels_B, weights_B, *, graphdef,
                config: AttentiveConfig, total_steps: int):
  def loss_fn(params):
    logits = nnx.merge(graphdef, params)(tokens_BxLxC, mask_BxL)
    per_sample = smoothed_cross_entropy(logits, labels_B, config.label_smoothing)
    return (per_sample * weights_B).sum() / jnp.maximum(weights_B.sum(), 1.0)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = optimizer(config, total_steps).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames='graphdef')
def _predict(params, tokens_BxLxC, mask_BxL, *, graphdef):
  return nnx.merge(graphdef, params)(tokens_BxLxC, mask_BxL).argmax(-1)


def train_attentive(train_tokens_NxLxC, train_mask_NxL, train_labels_N, test_tokens_MxLxC,
                    test_mask_MxL, test_labels_M, encoder_config: EncoderConfig, *,
                    num_classes: int | None = None, config: AttentiveConfig = AttentiveConfig(),
                    log=None) -> dict[str, Any]:
  """Trains the probe on the training features; top-1 on the test features after each epoch.

  Train and test tokens may have different lengths (each is padded to its own longest sample).

  Returns {top1_best, top1_last, best_epoch, epochs, history: [{epoch, loss, top1}], seconds,
  settings}.
  """
  train_labels_N = np.asarray(train_labels_N, np.int64)
  test_labels_M = np.asarray(test_labels_M, np.int64)
  if len(train_labels_N) == 0 or len(test_labels_M) == 0:
    raise ValueError('the attentive probe needs at least one training and one test sample')
  if num_classes is None:
    num_classes = int(max(train_labels_N.max(), test_labels_M.max())) + 1
  if train_tokens_NxLxC.shape[-1] != encoder_config.width:
    raise ValueError(f'token features are {train_tokens_NxLxC.shape[-1]} wide; the encoder '
                     f'config says {encoder_config.width}')
  start = time.perf_counter()
  n, b = len(train_labels_N), config.batch_size
  steps_per_epoch = -(-n // b)
  model = AttentiveProbe(encoder_config, num_classes, rngs=nnx.Rngs(config.seed))
  total_steps = config.epochs * steps_per_epoch
  graphdef, params = nnx.split(model)
  opt_state = optimizer(config, total_steps).init(params)
  # The jitted step's static key leaves out the seed: repeats over seeds compile once.
  static = dict(graphdef=graphdef, config=dataclasses.replace(config, seed=0),
                total_steps=total_steps)

  def accuracy(params) -> float:
    correct = 0
    for index in _batches(len(test_labels_M), b, None):
      pred = np.asarray(_predict(params, _take(test_tokens_MxLxC, index),
                                 _take(test_mask_MxL, index), graphdef=graphdef))
      correct += int(((pred == _take(test_labels_M, index)) & (index >= 0)).sum())
    return correct / len(test_labels_M)

  rng = np.random.default_rng(config.seed)
  history = []
  for epoch in range(1, config.epochs + 1):
    losses = []
    for index in _batches(n, b, rng):
      params, opt_state, loss = _train_step(
          params, opt_state, _take(train_tokens_NxLxC, index), _take(train_mask_NxL, index),
          _take(train_labels_N, index), (index >= 0).astype(np.float32), **static)
      losses.append(loss)
    entry = {'epoch': epoch, 'loss': float(np.mean(jax.device_get(losses))),
             'top1': accuracy(params)}
    history.append(entry)
    if log is not None:
      log(f'attentive probe epoch {epoch}/{config.epochs}: loss {entry["loss"]:.4f}, '
          f'top-1 {entry["top1"]:.4f}')
  best = max(history, key=lambda e: e['top1'])  # the first epoch reaching the best
  return {'top1_best': best['top1'], 'top1_last': history[-1]['top1'],
          'best_epoch': best['epoch'], 'epochs': config.epochs, 'history': history,
          'seconds': time.perf_counter() - start, 'settings': dataclasses.asdict(config)}
