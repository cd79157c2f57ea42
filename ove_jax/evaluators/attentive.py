"""The attentive probe (docs/spec.md §6): a new MAP head on a frozen encoder's output tokens.

  tokens [B, L, C] -> MAPHead (as the encoder's, fresh weights) -> LayerNorm -> Linear(classes)

trained with AdamW (lr 1e-4, weight decay 0, linear decay to 1e-7 over the run), label smoothing 0.1
and gradient clipping at global norm 5, for `epochs` passes over the training features (10; 30
for small sets). The epoch reported is the one with the best top-1 on a validation split held out
from the training features, never chosen on the test split (the release picks its best epoch on
the split it reports; docs/evaluation.md); we report its test top-1 and top-5, and the last
epoch's. As the release's head: AdamW's schedule ends at 1e-7, the classifier starts scaled by
1e-3. `ove_jax.evaluators.protocol` runs the release's full protocol (features recomputed per
batch with the training augmentation) on clips instead of fixed features.

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

  epochs: int = 10  # docs/spec.md §6: 10, or 30 for small sets
  batch_size: int = 32
  learning_rate: float = 1e-4  # AdamW peak, linearly decayed to end_learning_rate
  end_learning_rate: float = 1e-7  # the release's default_min_lr
  weight_decay: float = 0.0
  label_smoothing: float = 0.1
  clip_norm: float = 5.0  # global gradient norm
  seed: int = 0  # initialisation and batch order
  init_scale: float = 1e-3  # classifier init (trunc. normal 0.02) scaled, as the release
  val_fraction: float = 0.1  # of the training features, held out to choose the epoch

  def __post_init__(self):
    if self.epochs < 1 or self.batch_size < 1:
      raise ValueError(f'epochs={self.epochs}, batch_size={self.batch_size}; both must be >= 1')
    if self.learning_rate <= 0:
      raise ValueError(f'learning_rate={self.learning_rate}; must be > 0')
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f'label_smoothing={self.label_smoothing}; must be in [0, 1)')
    if not 0 <= self.val_fraction < 1 or self.init_scale <= 0:
      raise ValueError(
        f'val_fraction={self.val_fraction}, init_scale={self.init_scale}; '
        'val_fraction in [0, 1), init_scale > 0'
      )


class AttentiveProbe(nnx.Module):
  """MAPHead -> LayerNorm -> Linear. The head takes the encoder's config (width, heads, MLP
  width), in float32 whatever the encoder's compute dtype."""

  def __init__(
    self, cfg: EncoderConfig, num_classes: int, *, rngs: nnx.Rngs, init_scale: float = 1e-3
  ):
    cfg = dataclasses.replace(cfg, dtype='float32', remat='none', attention='xla')
    # The head's parameters carry logical axis names; with no mesh set they must not be placed.
    no_mesh = sharding.current_mesh() is None
    with nnx.use_eager_sharding(False) if no_mesh else contextlib.nullcontext():
      self.pool = MAPHead(cfg, sharding.DEFAULT_RULES, rngs=rngs)
    self.norm = nnx.LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, rngs=rngs)
    # The release's ClassificationHead: trunc_normal(std 0.02) weights, zero bias, both then
    # multiplied by init_scale (1e-3): the probe starts from near-uniform logits.
    self.classifier = nnx.Linear(
      cfg.width,
      num_classes,
      rngs=rngs,
      kernel_init=nnx.initializers.truncated_normal(
        0.02 * init_scale, lower=-2 / 0.02, upper=2 / 0.02
      ),
    )

  def __call__(self, tokens_BxLxC, mask_BxL):
    pooled_Bx1xC, _ = self.pool(tokens_BxLxC, mask_BxL.astype(jnp.int32), 1)
    return self.classifier(self.norm(pooled_Bx1xC[:, 0]))


def optimizer(config: AttentiveConfig, total_steps: int) -> optax.GradientTransformation:
  """Clip at global norm `clip_norm`, then AdamW with a linear decay from `learning_rate` to
  `end_learning_rate` over `total_steps`."""
  schedule = optax.linear_schedule(
    config.learning_rate, config.end_learning_rate, max(total_steps, 1)
  )
  return optax.chain(
    optax.clip_by_global_norm(config.clip_norm),
    optax.adamw(schedule, weight_decay=config.weight_decay),
  )


def smoothed_cross_entropy(logits_BxK, labels_B, smoothing: float):
  """Per-sample cross-entropy against one-hot labels smoothed to (1 - e) + e / K and e / K."""
  k = logits_BxK.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels_B, k), smoothing)
  return optax.softmax_cross_entropy(logits_BxK.astype(jnp.float32), targets)


def batches(n: int, batch_size: int, rng: np.random.Generator | None) -> np.ndarray:
  """Index batches of exactly `batch_size` (the last padded with -1), shuffled when `rng`."""
  order = rng.permutation(n) if rng is not None else np.arange(n)
  pad = -n % batch_size
  order = np.concatenate([order, -np.ones(pad, np.int64)])
  return order.reshape(-1, batch_size)


def take(array, index_B):
  """Rows `index_B` of `array`, with -1 (padding) taking row 0."""
  return array[np.maximum(index_B, 0)]


def split_indices(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(kept, held out) of n items: i is held out when floor((i + 1) f) > floor(i f), which
  spreads the held-out items evenly over the order (no randomness: the same split every run)."""
  i = np.arange(n)
  held = np.floor((i + 1) * fraction) > np.floor(i * fraction)
  return i[~held], i[held]


def top_k_hits(logits_BxK, labels_B, k: int) -> np.ndarray:
  """bool [B]: the label is among the k highest logits (k capped at the class count)."""
  logits_BxK = np.asarray(logits_BxK)
  k = min(k, logits_BxK.shape[-1])
  top = np.argpartition(-logits_BxK, k - 1, axis=-1)[:, :k]
  return (top == np.asarray(labels_B)[:, None]).any(-1)


def new_probe(
  encoder_config: EncoderConfig, num_classes: int, config: AttentiveConfig, total_steps
):
  """(graphdef, params, opt_state, static step arguments) of a fresh probe for `config`."""
  model = AttentiveProbe(
    encoder_config, num_classes, rngs=nnx.Rngs(config.seed), init_scale=config.init_scale
  )
  graphdef, params = nnx.split(model)
  opt_state = optimizer(config, total_steps).init(params)
  # The jitted step's static key leaves out the seed: repeats over seeds compile once.
  static = dict(
    graphdef=graphdef, config=dataclasses.replace(config, seed=0), total_steps=total_steps
  )
  return graphdef, params, opt_state, static


# Module-level jits with the probe's structure and settings as static arguments: a probe
# retrained with other seeds, or again at the next periodic evaluation, reuses the compiled step.


@functools.partial(jax.jit, static_argnames=('graphdef', 'config', 'total_steps'))
def train_step(
  params,
  opt_state,
  tokens_BxLxC,
  mask_BxL,
  labels_B,
  weights_B,
  *,
  graphdef,
  config: AttentiveConfig,
  total_steps: int,
):
  """One AdamW step of the probe on a batch (samples of weight 0 are padding)."""

  def loss_fn(params):
    logits = nnx.merge(graphdef, params)(tokens_BxLxC, mask_BxL)
    per_sample = smoothed_cross_entropy(logits, labels_B, config.label_smoothing)
    return (per_sample * weights_B).sum() / jnp.maximum(weights_B.sum(), 1.0)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = optimizer(config, total_steps).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames='graphdef')
def logits(params, tokens_BxLxC, mask_BxL, *, graphdef):
  """The probe's class logits [B, classes]."""
  return nnx.merge(graphdef, params)(tokens_BxLxC, mask_BxL)


def accuracy(
  params, graphdef, tokens_NxLxC, mask_NxL, labels_N, batch_size: int
) -> dict[str, float]:
  """{top1, top5} of the probe on features."""
  hits1 = hits5 = 0
  for index in batches(len(labels_N), batch_size, None):
    out = np.asarray(
      logits(params, take(tokens_NxLxC, index), take(mask_NxL, index), graphdef=graphdef)
    )
    real = index >= 0
    hits1 += int((top_k_hits(out, take(labels_N, index), 1) & real).sum())
    hits5 += int((top_k_hits(out, take(labels_N, index), 5) & real).sum())
  return {'top1': hits1 / len(labels_N), 'top5': hits5 / len(labels_N)}


def train_attentive(
  train_tokens_NxLxC,
  train_mask_NxL,
  train_labels_N,
  test_tokens_MxLxC,
  test_mask_MxL,
  test_labels_M,
  encoder_config: EncoderConfig,
  *,
  num_classes: int | None = None,
  config: AttentiveConfig = AttentiveConfig(),
  log=None,
) -> dict[str, Any]:
  """Trains the probe on the training features and picks its epoch on a validation split.

  `config.val_fraction` of the training features (every 1/f-th, `split_indices`) is held out;
  after each epoch the probe is scored on it, and the epoch with the best validation top-1
  (the first to reach it) is the one reported: `top1_best` / `top5` are the test figures of that
  epoch's probe. The test split never takes part in the choice. With fewer than 2 training
  features per held-out one (or val_fraction 0) nothing is held out and the last epoch counts.
  Train and test tokens may have different lengths.

  Returns {top1_best, top5, top1_last, best_epoch, epochs, num_val, history: [{epoch, loss,
  val_top1, val_top5, top1 (test, reported only)}], seconds, settings}.
  """
  train_labels_N = np.asarray(train_labels_N, np.int64)
  test_labels_M = np.asarray(test_labels_M, np.int64)
  if len(train_labels_N) == 0 or len(test_labels_M) == 0:
    raise ValueError('the attentive probe needs at least one training and one test sample')
  if num_classes is None:
    num_classes = int(max(train_labels_N.max(), test_labels_M.max())) + 1
  if train_tokens_NxLxC.shape[-1] != encoder_config.width:
    raise ValueError(
      f'token features are {train_tokens_NxLxC.shape[-1]} wide; the encoder '
      f'config says {encoder_config.width}'
    )
  start = time.perf_counter()
  fit, val = split_indices(len(train_labels_N), config.val_fraction)
  if len(fit) < 2 * len(val) or len(val) == 0:
    fit, val = np.arange(len(train_labels_N)), np.zeros(0, np.int64)
  b = config.batch_size
  total_steps = config.epochs * -(-len(fit) // b)
  graphdef, params, opt_state, static = new_probe(encoder_config, num_classes, config, total_steps)
  rng = np.random.default_rng(config.seed)
  history, chosen = [], None
  for epoch in range(1, config.epochs + 1):
    losses = []
    for index in batches(len(fit), b, rng):
      rows = np.where(index >= 0, take(fit, index), -1)
      params, opt_state, loss = train_step(
        params,
        opt_state,
        take(train_tokens_NxLxC, rows),
        take(train_mask_NxL, rows),
        take(train_labels_N, rows),
        (rows >= 0).astype(np.float32),
        **static,
      )
      losses.append(loss)
    entry = {'epoch': epoch, 'loss': float(np.mean(jax.device_get(losses)))}
    if len(val):
      scores = accuracy(
        params, graphdef, train_tokens_NxLxC[val], train_mask_NxL[val], train_labels_N[val], b
      )
      entry.update(val_top1=scores['top1'], val_top5=scores['top5'])
    # The test figure of every epoch is reported (as the release prints it), never compared.
    entry['top1'] = accuracy(params, graphdef, test_tokens_MxLxC, test_mask_MxL, test_labels_M, b)[
      'top1'
    ]
    history.append(entry)
    if chosen is None or not len(val) or entry['val_top1'] > chosen[0]['val_top1']:
      chosen = (entry, params)
    if log is not None:
      log(
        f'attentive probe epoch {epoch}/{config.epochs}: loss {entry["loss"]:.4f}'
        + (f', val top-1 {entry["val_top1"]:.4f}' if len(val) else '')
      )
  best = accuracy(chosen[1], graphdef, test_tokens_MxLxC, test_mask_MxL, test_labels_M, b)
  return {
    'top1_best': best['top1'],
    'top5': best['top5'],
    'top1_last': history[-1]['top1'],
    'best_epoch': chosen[0]['epoch'],
    'epochs': config.epochs,
    'num_val': len(val),
    'history': history,
    'seconds': time.perf_counter() - start,
    'settings': dataclasses.asdict(config),
  }
