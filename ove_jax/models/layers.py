"""The encoder's layers with logical axis names (see `ove_jax.sharding`): the Linear every
projection uses and the float32 norms (docs/spec.md §1.2).

`ove_jax.models.encoder` builds its blocks and the MAP head from these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from ove_jax.models import cpu_layouts

if TYPE_CHECKING:
  from ove_jax.models.encoder import EncoderConfig


def param_init(init, names, rules):
  """`init` with the parameter's logical axis `names`, placed by `rules` under a mesh."""
  return nnx.with_partitioning(init, names, sharding_rules=rules)


def dense(
  cfg, rules, d_in, d_out, names, *, use_bias=True, kernel_init=None, rngs, float32_out=False
):
  """A Linear whose inputs are cast to the compute dtype; `float32_out` accumulates and returns
  float32 (bf16 inputs, float32 products: the MAP head's q and k)."""
  return nnx.Linear(
    d_in,
    d_out,
    use_bias=use_bias,
    dtype=cfg.compute_dtype,
    param_dtype=jnp.float32,
    preferred_element_type=jnp.float32 if float32_out else None,
    dot_general=cpu_layouts.dot_general,
    kernel_init=param_init(kernel_init or nnx.initializers.normal(0.02), names, rules),
    bias_init=param_init(nnx.initializers.zeros, names[1:], rules),
    rngs=rngs,
  )


def _norm_param(init, cfg: EncoderConfig, rules) -> nnx.Param:
  """A norm's float32 [width] scale or bias, named 'norm' (its init draws nothing: ones, zeros)."""
  return nnx.Param(param_init(init, ('norm',), rules)(jax.random.key(0), (cfg.width,), jnp.float32))


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 (two-pass variance, as PyTorch), output float32.

  As under the release's autocast, where LayerNorm runs and returns float32: the next matmul
  casts its input to the compute dtype, and the residual stream stays float32 (docs/spec.md
  §1.2).
  """

  def __init__(self, cfg: EncoderConfig, rules, *, rngs: nnx.Rngs):
    del rngs
    self.eps = cfg.layer_norm_eps
    self.scale = _norm_param(nnx.initializers.ones, cfg, rules)
    self.bias = _norm_param(nnx.initializers.zeros, cfg, rules)

  def __call__(self, x):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class RMSNorm(nnx.Module):
  """RMSNorm in float32, output float32 (as LayerNorm)."""

  def __init__(self, cfg: EncoderConfig, rules, *, rngs: nnx.Rngs):
    del rngs
    self.eps = cfg.layer_norm_eps
    self.scale = _norm_param(nnx.initializers.ones, cfg, rules)

  def __call__(self, x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps) * self.scale[...]
