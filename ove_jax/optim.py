"""The optimiser of docs/spec.md §5: AdamW, warmup then decay, gradient clipping per group.

Groups are the top-level parts of the parameter tree: the backbone ('encoder') and each head
('heads/<name>'). The release clips each group's gradient to global norm 5 on its own, so one
head's burst cannot scale down the others' updates.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

DECAYS = ('linear', 'cosine', 'constant')
DECAY_MASKS = ('all', 'matrices')


def warmup_steps(cfg: Mapping[str, Any], total_steps: int) -> int:
  """`optim.warmup` is a step count (>= 1) or a fraction of `total_steps` (< 1)."""
  warmup = cfg['warmup']
  return int(round(warmup * total_steps)) if warmup < 1 else int(warmup)


def schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then linear or cosine decay to `lr * end_lr_fraction`."""
  if cfg['decay'] not in DECAYS:
    raise ValueError(f'optim.decay={cfg["decay"]!r}; choose one of {DECAYS}')
  lr, end = cfg['lr'], cfg['lr'] * cfg['end_lr_fraction']
  warm = warmup_steps(cfg, total_steps)
  rest = max(total_steps - warm, 1)
  if cfg['decay'] == 'linear':
    after = optax.linear_schedule(lr, end, rest)
  elif cfg['decay'] == 'cosine':
    after = optax.cosine_decay_schedule(lr, rest, alpha=cfg['end_lr_fraction'])
  else:
    after = optax.constant_schedule(lr)
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def group_of(path: tuple) -> str:
  """'encoder' or 'heads/<name>' for a parameter path such as ('heads', 'video', 'centres')."""
  keys = [getattr(k, 'key', getattr(k, 'name', k)) for k in path]
  return f'heads/{keys[1]}' if keys[0] == 'heads' else str(keys[0])


def group_norms(tree) -> dict[str, jax.Array]:
  """Global L2 norm of each group of a parameter-shaped tree."""
  squares: dict[str, jax.Array] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    g = group_of(path)
    squares[g] = squares.get(g, 0.0) + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return {g: jnp.sqrt(s) for g, s in squares.items()}


class _Empty(NamedTuple):
  pass


def clip_by_group_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales each group's updates so that the group's global norm is at most `max_norm`."""

  def update(updates, state, params=None):
    del params
    norms = group_norms(updates)
    factors = {g: jnp.minimum(1.0, max_norm / jnp.maximum(n, 1e-12)) for g, n in norms.items()}
    updates = jax.tree_util.tree_map_with_path(
      lambda path, u: (u * factors[group_of(path)]).astype(u.dtype), updates
    )
    return updates, state

  return optax.GradientTransformation(lambda params: _Empty(), update)


def decay_mask(kind: str):
  """Which parameters get weight decay: 'all' (the release) or 'matrices' (not norms, biases)."""
  if kind not in DECAY_MASKS:
    raise ValueError(f'optim.weight_decay_mask={kind!r}; choose one of {DECAY_MASKS}')
  if kind == 'all':
    return None
  from ove_jax.models import layout  # scanned blocks: the leading layers axis is not a matrix's

  return lambda params: jax.tree_util.tree_map_with_path(
    lambda path, p: p.ndim - layout.is_stacked_path(path) >= 2, params
  )


def make(
  cfg: Mapping[str, Any], total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(transformation, learning-rate schedule) from the experiment's `optim` section."""
  lr = schedule(cfg, total_steps)
  parts = []
  if cfg['clip_norm'] > 0:
    parts.append(clip_by_group_norm(cfg['clip_norm']))
  parts.append(
    optax.adamw(
      lr,
      b1=cfg['b1'],
      b2=cfg['b2'],
      eps=cfg['eps'],
      weight_decay=cfg['weight_decay'],
      mask=decay_mask(cfg['weight_decay_mask']),
    )
  )
  return optax.chain(*parts), lr
