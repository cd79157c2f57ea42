"""The OneVision encoder: a sparse ViT over codec-selected patches with a shared 3D RoPE.

Read top to bottom: config and presets, attention, MLP, block, the MAP pooling head, and the
encoder with its two entry points (the 3D RoPE is `ove_jax.models.rope`, the Linear and the
norms `ove_jax.models.layers`):

  `Encoder.__call__(patches_BxLxP, positions_BxLx3, segment_ids_BxL, num_segments=S)`
      the native, packed interface the trainer uses. Rows hold several samples; attention stays
      within a segment and the head pools each segment on its own.
  `Encoder.forward_pixels(pixel_values, visible_indices=None, patch_positions=None)`
      the released PyTorch model's forward, with its position conventions (docs/spec.md §1.3), for
      feature extraction and for checking against the release.

Patches are flattened in (row, column, channel) order, channel fastest, matching NHWC pixels;
the converter permutes to the release's Conv2d (C, 3, 14, 14) layout.

Every parameter carries logical axis names (see `ove_jax.sharding`); a rules table maps them
onto the mesh. Parameters are float32; `dtype` sets the compute dtype (bfloat16 for training).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The token contract (CLIP mean/std, patch order, frame placement) has one home, shared with the
# input pipeline; re-exported here for the model's users.
from data_pipeline.tokens import CLIP_MEAN, CLIP_STD, clip_positions, patchify  # noqa: E402,F401
from data_pipeline.tokens import timeline_to_grid as uniform_frame_times  # noqa: E402,F401
from ove_jax import sharding
from ove_jax.models import cpu_blas
from ove_jax.models.attention import IMPLEMENTATIONS, dot_product_attention
from ove_jax.models.layers import LayerNorm, RMSNorm, dense, param_init
from ove_jax.models.rope import ROPE_VARIANTS, apply_rope, rope_tables

# ------------------------------------------------------------------------------------------------
# Config and presets
# ------------------------------------------------------------------------------------------------

# name: (width, depth, heads, mlp_dim). head_dim is 64 in every size: the 4:6:6 RoPE split needs
# head_dim / 2 divisible by 16.
PRESETS = {
  'tiny': (128, 2, 2, 512),
  'small': (384, 12, 6, 1536),
  'base': (768, 12, 12, 3072),
  'large': (1024, 24, 16, 4096),
  'huge': (1280, 32, 20, 5120),
  # huge's shape at a CPU-sized width, for experiments/huge.py:smoke: head_dim 64, MLP 4x,
  # depth / width as huge's 32 / 1280 (rounded up to 4 blocks), scanned as huge is.
  'huge_smoke': (128, 4, 2, 512),
}

REMAT_POLICIES = ('none', 'full', 'dots')
# Presets whose blocks run as one scanned, stacked module by default (`scan_layers`): compile
# time and XLA's memory plan stay flat in depth. The small presets default to the unrolled list.
SCANNED_PRESETS = ('base', 'large', 'huge', 'huge_smoke')
# The stacked layers axis stays unsharded (each device holds every layer's slice of a weight);
# appended to the rules an encoder is given unless they map 'layers' themselves.
LAYERS_RULE = ('layers', None)


def with_layers_rule(rules) -> tuple:
  """`rules` as a tuple of pairs, with LAYERS_RULE added when they do not name 'layers'."""
  rules = tuple(tuple(r) for r in rules)
  return rules if any(name == 'layers' for name, _ in rules) else rules + (LAYERS_RULE,)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  width: int = 128
  depth: int = 2
  num_heads: int = 2
  mlp_dim: int = 512
  patch_size: int = 14
  num_channels: int = 3
  rope_theta: float = 10000.0
  rope_temporal_size: int = 64  # the virtual frame grid of flat visible indices
  rope: str = '3d'  # ROPE_VARIANTS; only '3d' exports to the release's format
  use_head: bool = True
  layer_norm_eps: float = 1e-6
  image_size: int = 448  # recorded in exported configs; inputs may have any size
  dtype: str = 'float32'  # compute dtype; parameters stay float32
  remat: str = 'none'  # per block: 'none', 'full', or 'dots' (keep matmul outputs)
  attention: str = 'xla'  # see ove_jax.models.attention.IMPLEMENTATIONS
  scan_layers: bool = False  # blocks stacked on a leading 'layers' axis, run by one scan

  def __post_init__(self):
    for name in ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f'{name}={value!r}; must be an integer >= 1')
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} is not divisible by num_heads {self.num_heads}')
    if self.head_dim % 32:
      raise ValueError(
        f'head_dim = width / num_heads = {self.head_dim}; the 4:6:6 3D RoPE needs head_dim / 2 '
        'divisible by 16 (use head_dim 64, as every preset does)'
      )
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat={self.remat!r}; choose one of {REMAT_POLICIES}')
    if self.attention not in IMPLEMENTATIONS:
      raise ValueError(f'attention={self.attention!r}; choose one of {IMPLEMENTATIONS}')
    if self.dtype not in ('float32', 'bfloat16', 'float16'):
      raise ValueError(f'dtype={self.dtype!r}; choose float32, bfloat16 or float16')
    if self.rope not in ROPE_VARIANTS:
      raise ValueError(f'rope={self.rope!r}; choose one of {ROPE_VARIANTS}')

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.num_channels

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def preset(cls, name: str, **overrides) -> EncoderConfig:
    """A preset's sizes; `scan_layers` defaults to on for SCANNED_PRESETS (None = default)."""
    if name not in PRESETS:
      raise ValueError(f'unknown encoder preset {name!r}; choose one of {sorted(PRESETS)}')
    width, depth, heads, mlp = PRESETS[name]
    if overrides.get('scan_layers') is None:
      overrides['scan_layers'] = name in SCANNED_PRESETS
    return cls(**{'width': width, 'depth': depth, 'num_heads': heads, 'mlp_dim': mlp, **overrides})


def num_params(cfg: EncoderConfig) -> int:
  """Analytic parameter count (with the head when `use_head`)."""
  c, i = cfg.width, cfg.mlp_dim
  block = 4 * (c * c + c) + (c * i + i) + (i * c + c) + 4 * c
  total = cfg.patch_dim * c + 2 * c + cfg.depth * block
  if cfg.use_head:
    total += 2 * c + c + 4 * (c * c + c) + c + (c * i + i) + (i * c + c)
  return total


def encoder_flops(
  cfg: EncoderConfig, num_tokens: int, *, num_segments: int = 1, backward: bool = False
) -> int:
  """Matmul FLOPs (2 per multiply-add) of the encoder on one row of `num_tokens` tokens.

  Forward: 2 x (parameters in matmuls) x L for the patch embedding and the blocks' projections
  and MLPs, plus 4 L^2 C per block for attention (QK^T and PV, over all heads). Attention is
  counted over the full L x L square, as the xla path computes it whatever the segments. With the
  head: the k/v projections of every token, the probe's logits over the row, and per segment the
  weighted sum, out projection and MLP (the probe's own q projection is counted once per row).
  Norms, RoPE, GELU, softmax and bias adds are not counted.

  `backward=True` gives forward + backward = 3x forward (the usual 2x for the backward; it
  slightly overcounts the patch embedding, whose input needs no gradient).
  """
  c, i, l, s = cfg.width, cfg.mlp_dim, num_tokens, num_segments
  flops = 2 * cfg.patch_dim * c * l
  flops += cfg.depth * (2 * (4 * c * c + 2 * c * i) * l + 4 * l * l * c)
  if cfg.use_head:
    flops += 2 * 2 * c * c * l  # k and v projections of every token
    flops += 2 * c * c  # q projection of the probe
    flops += 2 * c * l  # probe . k, all heads, once per row
    flops += 2 * s * l * c  # probabilities . v, per segment
    flops += 2 * s * (c * c + 2 * c * i)  # out projection and MLP, per segment
  return 3 * flops if backward else flops


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------


class SelfAttention(nnx.Module):
  def __init__(self, cfg: EncoderConfig, rules, *, rngs: nnx.Rngs):
    self.cfg, self.rules = cfg, rules
    c = cfg.width
    self.q_proj = dense(cfg, rules, c, c, ('embed', 'heads'), rngs=rngs)
    self.k_proj = dense(cfg, rules, c, c, ('embed', 'heads'), rngs=rngs)
    self.v_proj = dense(cfg, rules, c, c, ('embed', 'heads'), rngs=rngs)
    self.out_proj = dense(cfg, rules, c, c, ('heads', 'embed'), rngs=rngs)

  def __call__(self, x_BxLxC, cos_BxLxD, sin_BxLxD, segment_ids_BxL):
    cfg = self.cfg
    b, l, _ = x_BxLxC.shape

    def heads(y_BxLxC):
      y_BxLxC = sharding.constrain(y_BxLxC, ('act_batch', 'act_length', 'act_heads'), self.rules)
      return y_BxLxC.reshape(b, l, cfg.num_heads, cfg.head_dim)

    q = apply_rope(heads(self.q_proj(x_BxLxC)), cos_BxLxD, sin_BxLxD)
    k = apply_rope(heads(self.k_proj(x_BxLxC)), cos_BxLxD, sin_BxLxD)
    v = heads(self.v_proj(x_BxLxC))
    o_BxLxHxD = dot_product_attention(q, k, v, segment_ids_BxL, implementation=cfg.attention)
    o_BxLxC = sharding.constrain(
      o_BxLxHxD.reshape(b, l, cfg.width), ('act_batch', 'act_length', 'act_heads'), self.rules
    )
    return self.out_proj(o_BxLxC)


class Mlp(nnx.Module):
  def __init__(self, cfg: EncoderConfig, rules, *, rngs: nnx.Rngs):
    self.rules = rules
    self.fc1 = dense(cfg, rules, cfg.width, cfg.mlp_dim, ('embed', 'mlp'), rngs=rngs)
    self.fc2 = dense(cfg, rules, cfg.mlp_dim, cfg.width, ('mlp', 'embed'), rngs=rngs)

  def __call__(self, x):
    h = jax.nn.gelu(self.fc1(x), approximate=False)  # exact (erf) GELU, as released
    h = sharding.constrain(h, ('act_batch', 'act_length', 'act_mlp'), self.rules)
    return self.fc2(h)


class Block(nnx.Module):
  def __init__(self, cfg: EncoderConfig, rules, *, rngs: nnx.Rngs):
    self.rules = rules
    self.layer_norm1 = LayerNorm(cfg, rules, rngs=rngs)
    self.self_attn = SelfAttention(cfg, rules, rngs=rngs)
    self.layer_norm2 = LayerNorm(cfg, rules, rngs=rngs)
    self.mlp = Mlp(cfg, rules, rngs=rngs)

  def __call__(self, x, cos, sin, segment_ids):
    x = x + self.self_attn(self.layer_norm1(x), cos, sin, segment_ids)
    x = x + self.mlp(self.layer_norm2(x))
    return sharding.constrain(x, ('act_batch', 'act_length', 'act_embed'), self.rules)


def _xavier_fused_qkv(width: int):
  """Xavier-uniform bounds of the release's fused (3C, C) in-projection, one third at a time."""
  bound = float(np.sqrt(6.0 / (width + 3 * width)))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class MAPHead(nnx.Module):
  """Multi-head attention pooling: a learned probe attends to each segment's tokens (no RoPE).

  The release keeps q/k/v as one fused (3C, C) matrix; we keep three so tensor parallelism
  splits heads cleanly. The converter fuses and splits them.
  """

  def __init__(self, cfg: EncoderConfig, rules, *, rngs: nnx.Rngs):
    self.cfg, self.rules = cfg, rules
    c = cfg.width
    self.probe = nnx.Param(
      param_init(nnx.initializers.normal(1.0), (None, None, 'embed'), rules)(
        rngs.params(), (1, 1, c), jnp.float32
      )
    )
    xavier = _xavier_fused_qkv(c)
    # q and k come out float32 so that the pooling logits are float32 end to end; v stays in
    # the compute dtype.
    self.q_proj = dense(
      cfg, rules, c, c, ('embed', 'heads'), kernel_init=xavier, rngs=rngs, float32_out=True
    )
    self.k_proj = dense(
      cfg, rules, c, c, ('embed', 'heads'), kernel_init=xavier, rngs=rngs, float32_out=True
    )
    self.v_proj = dense(cfg, rules, c, c, ('embed', 'heads'), kernel_init=xavier, rngs=rngs)
    self.out_proj = dense(cfg, rules, c, c, ('heads', 'embed'), rngs=rngs)
    self.norm = RMSNorm(cfg, rules, rngs=rngs)
    self.mlp = Mlp(cfg, rules, rngs=rngs)

  def __call__(self, x_BxLxC, segment_ids_BxL, num_segments: int):
    """Returns pooled [B, S, C] and valid [B, S] (segment s+1 has at least one token)."""
    cfg = self.cfg
    b, l, _ = x_BxLxC.shape
    h, d, s = cfg.num_heads, cfg.head_dim, num_segments
    probe_1x1xC = self.probe[...]
    q_1xHxD = self.q_proj(probe_1x1xC).reshape(1, h, d)
    k_BxLxHxD = self.k_proj(x_BxLxC).reshape(b, l, h, d)
    v_BxLxHxD = self.v_proj(x_BxLxC).reshape(b, l, h, d)
    logits_BxHxL = (
      jnp.einsum('hd,blhd->bhl', q_1xHxD[0], k_BxLxHxD, preferred_element_type=jnp.float32)
      * d**-0.5
    )
    member_BxSxL = segment_ids_BxL[:, None, :] == jnp.arange(1, s + 1)[None, :, None]
    valid_BxS = member_BxSxL.any(-1)
    # An empty segment softmaxes over nothing; let it see everything so values stay finite.
    mask_BxSxL = member_BxSxL | ~valid_BxS[..., None]
    logits_BxSxHxL = jnp.where(
      mask_BxSxL[:, :, None, :], logits_BxHxL[:, None], jnp.finfo(jnp.float32).min
    )
    probs = jax.nn.softmax(logits_BxSxHxL, axis=-1).astype(v_BxLxHxD.dtype)
    a_BxSxHxD = jnp.einsum('bshl,blhd->bshd', probs, v_BxLxHxD)
    # The head's residual add in float32, as the blocks'.
    a_BxSxC = self.out_proj(a_BxSxHxD.reshape(b, s, cfg.width)).astype(jnp.float32)
    return a_BxSxC + self.mlp(self.norm(a_BxSxC)), valid_BxS


# ------------------------------------------------------------------------------------------------
# The encoder
# ------------------------------------------------------------------------------------------------


def _remat_policy(name):
  """'dots' keeps the matmul outputs without batch dimensions: the dot_generals, and the dense
  products a one-device CPU run computes with MKL (custom calls, named cpu_blas.SAVE_NAME)."""
  policies = jax.checkpoint_policies
  dots = policies.save_from_both_policies(
    policies.dots_with_no_batch_dims_saveable, policies.save_only_these_names(cpu_blas.SAVE_NAME)
  )
  return {'full': None, 'dots': dots}[name]


def _block_fn(cfg: EncoderConfig, *, in_scan: bool):
  """One block's forward, rematerialised by `cfg.remat` (the body of the loop or of the scan;
  a scan body needs no CSE barrier, jax.checkpoint's documented advice)."""

  def run_block(block, x, cos, sin, segment_ids):
    return block(x, cos, sin, segment_ids)

  if cfg.remat != 'none':
    run_block = nnx.remat(run_block, policy=_remat_policy(cfg.remat), prevent_cse=not in_scan)
  return run_block


def stacked_blocks(cfg: EncoderConfig, rules, rngs: nnx.Rngs) -> Block:
  """`cfg.depth` blocks as one Block whose parameters have a leading 'layers' axis (each layer
  drawn from its own split of `rngs`); the axis is unsharded unless `rules` map 'layers'."""

  @nnx.split_rngs(splits=cfg.depth)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def make(rngs):
    return Block(cfg, rules, rngs=rngs)

  return make(rngs)


def scan_blocks(
  cfg: EncoderConfig, blocks: Block, x, cos, sin, segment_ids, *, collect: bool = False
):
  """Runs stacked `blocks` over x with one `nnx.scan`: XLA compiles (and plans the memory of) one
  block whatever the depth. Returns the output and, with `collect`, every block's output
  stacked [depth, ...] (else None)."""
  run_block = _block_fn(cfg, in_scan=True)

  @nnx.scan(
    in_axes=(0, nnx.Carry, None, None, None),
    out_axes=(nnx.Carry, 0),
    transform_metadata={nnx.PARTITION_NAME: 'layers'},
  )
  def body(block, x, cos, sin, segment_ids):
    y = run_block(block, x, cos, sin, segment_ids)
    return y, (y if collect else None)

  return body(blocks, x, cos, sin, segment_ids)


class Encoder(nnx.Module):
  """OneVision encoder. Create under `jax.set_mesh(mesh)` to get parameters sharded by `rules`;
  with no mesh set, parameters are created unsharded (annotations kept for later sharding)."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, rules=sharding.DEFAULT_RULES):
    self.cfg, self.rules = cfg, with_layers_rule(rules)
    rules = self.rules
    no_mesh = sharding.current_mesh() is None
    with nnx.use_eager_sharding(False) if no_mesh else contextlib.nullcontext():
      self.patch_embed = dense(
        cfg, rules, cfg.patch_dim, cfg.width, ('patch', 'embed'), use_bias=False, rngs=rngs
      )
      self.layernorm_pre = LayerNorm(cfg, rules, rngs=rngs)
      if cfg.scan_layers:
        self.blocks = stacked_blocks(cfg, rules, rngs)
      else:
        self.blocks = nnx.List([Block(cfg, rules, rngs=rngs) for _ in range(cfg.depth)])
      if cfg.use_head:
        self.layernorm_post = LayerNorm(cfg, rules, rngs=rngs)
        self.head = MAPHead(cfg, rules, rngs=rngs)

  def __call__(
    self,
    patches_BxLxP,
    positions_BxLx3,
    segment_ids_BxL=None,
    *,
    num_segments: int = 1,
    return_hidden_states: bool = False,
  ) -> dict[str, Any]:
    """Packed forward.

    Args:
      patches_BxLxP: flattened patches (row, column, channel), CLIP-normalised.
      positions_BxLx3: (t, h, w) of every token; any values, integer or float.
      segment_ids_BxL: 0 for padding, 1..S for the samples packed in the row (default: all 1).
      num_segments: S, how many segments per row the head pools (static).
      return_hidden_states: also return every block's input/output (no post-norm): element 0
        is the input of block 0, element i the output of block i (either layout).

    Returns a dict: `last_hidden_state` [B, L, C] (after layernorm_post when the head is used),
    `pooled` [B, S, C] and `pooled_valid` [B, S] (with the head), `hidden_states` (on request).
    """
    cfg = self.cfg
    b, l, p = patches_BxLxP.shape
    if p != cfg.patch_dim:
      raise ValueError(
        f'patches have {p} values per token; this encoder expects '
        f'{cfg.patch_dim} = {cfg.patch_size}x{cfg.patch_size}x{cfg.num_channels}'
      )
    if positions_BxLx3.shape != (b, l, 3):
      raise ValueError(f'positions shape {positions_BxLx3.shape}; expected {(b, l, 3)}')
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((b, l), jnp.int32)
    cos, sin = rope_tables(positions_BxLx3, cfg)

    x = self.patch_embed(patches_BxLxP.astype(cfg.compute_dtype))
    x = self.layernorm_pre(x)
    x = sharding.constrain(x, ('act_batch', 'act_length', 'act_embed'), self.rules)

    hidden = [x]
    if cfg.scan_layers:
      x, outputs_NxBxLxC = scan_blocks(
        cfg, self.blocks, x, cos, sin, segment_ids_BxL, collect=return_hidden_states
      )
      if return_hidden_states:
        hidden += [outputs_NxBxLxC[n] for n in range(cfg.depth)]
    else:
      run_block = _block_fn(cfg, in_scan=False)
      for block in self.blocks:
        x = run_block(block, x, cos, sin, segment_ids_BxL)
        hidden.append(x)

    out = {}
    if cfg.use_head:
      x = self.layernorm_post(x)
      out['pooled'], out['pooled_valid'] = self.head(x, segment_ids_BxL, num_segments)
    out['last_hidden_state'] = x
    if return_hidden_states:
      out['hidden_states'] = tuple(hidden)
    return out

  # ----------------------------------------------------------------------------------------------
  # The release's entry point (contract)
  # ----------------------------------------------------------------------------------------------

  def forward_pixels(
    self,
    pixel_values,
    visible_indices=None,
    patch_positions=None,
    *,
    output_hidden_states: bool = False,
  ) -> dict[str, Any]:
    """The released model's forward, in NHWC.

    Args:
      pixel_values: [B, H, W, 3] image or [B, T, H, W, 3] video, CLIP-normalised; H and W
        multiples of the patch size.
      visible_indices: [B, K] flat indices n on a virtual `rope_temporal_size`-frame grid
        (t = n // (Hp*Wp), h = (n // Wp) % Hp, w = n % Wp). When K differs from the number of
        input patches they also select the tokens (gather); otherwise they only place them.
      patch_positions: [B, L, 3] explicit (t, h, w) per token (takes precedence for positions).

    Without indices or positions an image sits at t = 0 and a T-frame video at t = 0..T-1.
    Returns `last_hidden_state`, `pooler_output` and, on request, `hidden_states` (depth + 1:
    element 0 the input of block 0, element i the output of block i; either block layout).
    """
    cfg = self.cfg
    pixel_values = jnp.asarray(pixel_values)
    if pixel_values.ndim == 4:
      pixel_values = pixel_values[:, None]
    if pixel_values.ndim != 5 or pixel_values.shape[-1] != cfg.num_channels:
      raise ValueError(
        f'pixel_values shape {pixel_values.shape}; expected [B, H, W, '
        f'{cfg.num_channels}] or [B, T, H, W, {cfg.num_channels}] (channels last)'
      )
    b, t, hgt, wid, _ = pixel_values.shape
    ps = cfg.patch_size
    if hgt % ps or wid % ps:
      raise ValueError(
        f'pixel_values are {hgt}x{wid}; height and width must be multiples of the '
        f'patch size {ps} (resize or centre-crop first)'
      )
    hp, wp = hgt // ps, wid // ps
    n = t * hp * wp
    patches = patchify(pixel_values, ps)  # [B, N, P], frame-major order

    grid_BxNx3 = jnp.broadcast_to(clip_positions(t, hp, wp), (b, n, 3))
    positions = grid_BxNx3
    if visible_indices is not None:
      idx_BxK = jnp.asarray(visible_indices).astype(jnp.int32)
      if idx_BxK.ndim != 2 or idx_BxK.shape[0] != b:
        raise ValueError(f'visible_indices shape {idx_BxK.shape}; expected [B={b}, K]')
      plane = hp * wp
      positions = jnp.stack([idx_BxK // plane, (idx_BxK // wp) % hp, idx_BxK % wp], axis=-1)
      if idx_BxK.shape[1] != n:
        if not isinstance(idx_BxK, jax.core.Tracer) and (
          int(idx_BxK.min()) < 0 or int(idx_BxK.max()) >= n
        ):
          raise ValueError(
            f'visible_indices select {idx_BxK.shape[1]} of the {n} input patches, so they must '
            f'lie in [0, {n - 1}]; got [{int(idx_BxK.min())}, {int(idx_BxK.max())}] (pass '
            f'all {t} frames of the grid, or as many indices as input patches to only place '
            'them)'
          )
        patches = jnp.take_along_axis(patches, idx_BxK[..., None], axis=1)
    if patch_positions is not None:
      positions = jnp.asarray(patch_positions)
      if positions.shape[:2] != patches.shape[:2] or positions.shape[-1] != 3:
        raise ValueError(
          f'patch_positions shape {positions.shape}; expected '
          f'{(*patches.shape[:2], 3)} (one (t, h, w) per token)'
        )
    out = self(patches, positions, None, num_segments=1, return_hidden_states=output_hidden_states)
    result = {
      'last_hidden_state': out['last_hidden_state'],
      'pooler_output': out['pooled'][:, 0] if cfg.use_head else None,
    }
    if output_hidden_states:
      result['hidden_states'] = out['hidden_states']
    return result


def create_encoder(cfg: EncoderConfig, seed: int = 0, *, rules=sharding.DEFAULT_RULES) -> Encoder:
  """Builds an encoder with fresh parameters (sharded when a mesh is set)."""
  return Encoder(cfg, rngs=nnx.Rngs(seed), rules=rules)
