"""The rotary position embeddings of the encoder (docs/spec.md §1.3): the release's 3D RoPE, which
must match it bit for bit, and the '1d' and 'none' ablations.

The model (`ove_jax.models.encoder`) asks `rope_tables` for the (cos, sin) tables of a packed
row's (t, h, w) positions once per forward and rotates q and k with `apply_rope` in every block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
  from ove_jax.models.encoder import EncoderConfig


# Position encodings (an ablation knob; '3d' is the release's and the only one it can load):
#   '3d'    the release's 4:6:6 split of the frequencies over (t, h, w) (docs/spec.md §1.3);
#   '1d'    each (t, h, w) flattened to one index (t * G + h) * G + w, G = ROPE_1D_GRID, rotated
#           with frequencies over the whole head dim, as a language model's RoPE;
#   'none'  no rotation: the encoder sees no positions at all (a bag of patches).
ROPE_VARIANTS = ('3d', '1d', 'none')
# Row and frame strides of the '1d' flattening: 32 patches covers a 448-pixel image, the 16 x 16
# video grid and the 16-wide collage; grids wider than 32 patches would share indices.
ROPE_1D_GRID = 32


def rope_axis_sizes(head_dim: int) -> tuple[int, int, int]:
  """Frequencies per axis (t, h, w): 4:6:6 of head_dim / 2, i.e. 8, 12, 12 for head_dim 64."""
  unit = head_dim // 2 // 16
  return 4 * unit, 6 * unit, 6 * unit


def rope_inv_freqs(head_dim: int, theta: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  # Each axis is normalised by its own size, and the exponent is k/n (not 2k/n).
  return tuple(
    1.0 / (jnp.float32(theta) ** (jnp.arange(n, dtype=jnp.float32) / jnp.float32(n)))
    for n in rope_axis_sizes(head_dim)
  )


def rope_angles(positions_BxLx3: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """float32 angles [B, L, head_dim]: concat(t*inv_t, h*inv_h, w*inv_w), duplicated by concat."""
  pos = positions_BxLx3.astype(jnp.float32)
  inv_t, inv_h, inv_w = rope_inv_freqs(head_dim, theta)
  half = jnp.concatenate(
    [pos[..., 0:1] * inv_t, pos[..., 1:2] * inv_h, pos[..., 2:3] * inv_w], axis=-1
  )
  return jnp.concatenate([half, half], axis=-1)


def rope_angles_1d(positions_BxLx3: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """float32 angles [B, L, head_dim] of the '1d' ablation: one flat index per token over the
  whole half dim (inv[k] = theta^(-k/half), the 3D axes' normalisation), duplicated by concat."""
  pos = positions_BxLx3.astype(jnp.float32)
  index = (pos[..., 0:1] * ROPE_1D_GRID + pos[..., 1:2]) * ROPE_1D_GRID + pos[..., 2:3]
  half = head_dim // 2
  inv = 1.0 / (jnp.float32(theta) ** (jnp.arange(half, dtype=jnp.float32) / jnp.float32(half)))
  a_half = index * inv
  return jnp.concatenate([a_half, a_half], axis=-1)


def rope_tables(positions_BxLx3: jax.Array, cfg: EncoderConfig):
  """(cos, sin) [B, L, head_dim] float32 of `cfg.rope`, or (None, None) for 'none'."""
  if cfg.rope == 'none':
    return None, None
  angle_fn = rope_angles if cfg.rope == '3d' else rope_angles_1d
  angles_BxLxD = angle_fn(positions_BxLx3, cfg.head_dim, cfg.rope_theta)
  return jnp.cos(angles_BxLxD), jnp.sin(angles_BxLxD)


def rotate_pairs(x):
  """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): rotation of adjacent pairs."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x_BxLxHxD, cos_BxLxD, sin_BxLxD):
  if cos_BxLxD is None:  # rope='none'
    return x_BxLxHxD
  # The concatenated angles pair two different neighbouring frequencies, so this is not a pure
  # rotation; the released weights were trained with it, so it is reproduced exactly.
  cos = cos_BxLxD[:, :, None, :].astype(x_BxLxHxD.dtype)
  sin = sin_BxLxD[:, :, None, :].astype(x_BxLxHxD.dtype)
  return x_BxLxHxD * cos + rotate_pairs(x_BxLxHxD) * sin
