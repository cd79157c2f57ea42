"""The two parameter layouts of the encoder's blocks, and exact conversion between them.

  unrolled  (`scan_layers=False`): one module per block, paths ('blocks', n, ...), e.g.
            ('blocks', 3, 'mlp', 'fc1', 'kernel') of shape [C, I];
  stacked   (`scan_layers=True`): one module whose parameters carry a leading 'layers' axis,
            paths ('blocks', ...), e.g. ('blocks', 'mlp', 'fc1', 'kernel') of shape [N, C, I].

Parameters are given as flat dicts (path tuple -> array), the form `ove_jax.convert` and
`ove_jax.checkpoint` use. 'blocks' may sit anywhere in a path (('encoder', 'blocks', n, ...) in a
training state, or under an optimiser's moments), so a whole train state converts the same way.
Stacking and unstacking only copy values, so a round trip is bit-exact; everything outside
'blocks' passes through unchanged. Host (numpy) arrays stay numpy, device arrays stay JAX arrays.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

BLOCKS = 'blocks'

Params = Mapping[tuple, Any]


def _split(path: tuple):
  """(prefix up to and with 'blocks', the rest) of a block parameter's path, else None."""
  if isinstance(path, str):
    raise ValueError(
      f'parameter key {path!r} is a string; keys are path tuples such as '
      "('blocks', 0, 'mlp', 'fc1', 'kernel') (tuple(key.split('/')) makes one)"
    )
  if BLOCKS not in path[:-1]:
    return None
  i = path.index(BLOCKS) + 1
  return path[:i], path[i:]


def _is_block_path(path: tuple) -> bool:
  return _split(path) is not None


def _layer_index(path: tuple):
  """n of an unrolled path (..., 'blocks', n, ...) (int, or a digit string as in nested dicts)."""
  n = _split(path)[1][0]
  if isinstance(n, (int, np.integer)):
    return int(n)
  if isinstance(n, str) and n.isdigit():
    return int(n)
  return None


def is_stacked_path(path) -> bool:
  """Whether `path` names a stacked block parameter (leading 'layers' axis): ..., 'blocks', then
  a name, not a layer number. Takes plain keys or JAX key entries (`tree_map_with_path`), so a
  rule on parameter rank (e.g. weight decay on matrices only) can discount the layers axis."""
  keys = tuple(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))) for k in path)
  split = _split(keys)
  return split is not None and _layer_index(keys) is None


def is_stacked(params: Params) -> bool:
  """Whether `params` hold the blocks stacked (True) or unrolled (False)."""
  block_paths = [p for p in params if _is_block_path(p)]
  if not block_paths:
    raise ValueError('no block parameters (paths starting with "blocks") in the parameters')
  unrolled = [_layer_index(p) is not None for p in block_paths]
  if any(unrolled) and not all(unrolled):
    raise ValueError(
      'the parameters mix the unrolled (blocks/<n>/...) and stacked (blocks/...) layouts'
    )
  return not unrolled[0]


def stack_blocks(params: Params, depth: int) -> dict[tuple, Any]:
  """Unrolled -> stacked: ('blocks', n, *rest) for n < depth -> ('blocks', *rest) [depth, ...]."""
  per_rest: dict[tuple, dict[int, Any]] = {}  # (prefix, rest) -> layer -> value
  out = {}
  for path, value in params.items():
    if not _is_block_path(path):
      out[path] = value
      continue
    n = _layer_index(path)
    if n is None:
      raise ValueError(f'parameter {"/".join(map(str, path))} is already stacked')
    prefix, rest = _split(path)
    per_rest.setdefault((prefix, rest[1:]), {})[n] = value
  for (prefix, rest), layers in per_rest.items():
    if sorted(layers) != list(range(depth)):
      missing = sorted(set(range(depth)) - set(layers)) or sorted(set(layers) - set(range(depth)))
      name = '/'.join(map(str, prefix + ('<n>',) + rest))
      raise ValueError(
        f'{name}: layers {sorted(layers)} do not cover 0..{depth - 1} (first '
        f"mismatch: {missing[0]}); is depth {depth} the checkpoint's own?"
      )
    values = [layers[n] for n in range(depth)]
    stack = jnp.stack if any(isinstance(v, jax.Array) for v in values) else np.stack
    out[prefix + rest] = stack(values)
  return out


def unstack_blocks(params: Params) -> dict[tuple, Any]:
  """Stacked -> unrolled: ('blocks', *rest) [depth, ...] -> ('blocks', n, *rest) for every n."""
  out = {}
  depths = set()
  for path, value in params.items():
    if not _is_block_path(path):
      out[path] = value
      continue
    if _layer_index(path) is not None:
      raise ValueError(f'parameter {"/".join(map(str, path))} is already unrolled')
    prefix, rest = _split(path)
    depths.add(value.shape[0])
    for n in range(value.shape[0]):
      out[prefix + (n,) + rest] = value[n]
  if len(depths) > 1:
    raise ValueError(f'stacked block parameters disagree on the depth: {sorted(depths)}')
  return out


def to_layout(params: Params, *, scan_layers: bool, depth: int) -> dict[tuple, Any]:
  """`params` in the layout of `scan_layers` (converted only when they are in the other one)."""
  if is_stacked(params) == scan_layers:
    return dict(params)
  return stack_blocks(params, depth) if scan_layers else unstack_blocks(params)
