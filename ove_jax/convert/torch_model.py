"""A self-contained PyTorch OneVision encoder that reads and writes the release's checkpoints.

It needs only torch, numpy and safetensors: a checkpoint exported from the JAX code works without
JAX, and the converter has an independent reference. Module names and parameter shapes follow
the release exactly (docs/spec.md §1.4): a release directory loads here, and ours in it.

Usage:

  from ove_jax.convert.torch_model import load_pretrained
  model = load_pretrained('path/to/onevision-encoder-large').eval()
  with torch.no_grad():
    out = model(pixel_values_Bx3xHxW)                       # images, CLIP-normalised
    out = model(video_Bx3xTxHxW)                            # every patch of T frames
    out = model(video_Bx3x64xHxW, visible_indices=idx_BxK)  # codec-selected patches
  out['last_hidden_state']  # (B, L, C), after layernorm_post
  out['pooler_output']      # (B, C), the MAP head's embedding (None without the head)

  model = OVEncoderTorch(OVEncoderConfig(hidden_size=128, num_hidden_layers=2, ...))
  save_pretrained(model, 'some/dir')  # config.json + model.safetensors

Checkpoints are read with safetensors only; pickled torch files are never opened. Its relative
imports use the standard library only: `.hub` finds the files of a directory or a hub id,
`.release_config` is the release's config.json schema. Object storage (`gs://bucket/ove-large`,
s3://, any fsspec URL) is read through fsspec and its scheme's file system, shard by shard.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Mapping

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from .hub import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, LocalFiles, release_directory, weight_files
from .release_config import ARCHITECTURES, CONFIG_NAME, MODEL_TYPE, OVEncoderConfig, rope_axis_sizes

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------------------------
# Rotary position embedding (docs/spec.md §1.3)
# ------------------------------------------------------------------------------------------------


def rope_inv_freqs(config: OVEncoderConfig, device=None) -> tuple:
  """float32 inverse frequencies per axis; each axis is normalised by its own size (k/n)."""
  out = []
  for n in rope_axis_sizes(config):
    k = torch.arange(n, dtype=torch.float32, device=device)
    out.append(1.0 / (config.rope_theta ** (k / n)))
  return tuple(out)


def rope_angles(positions_BxLx3: torch.Tensor, config: OVEncoderConfig) -> torch.Tensor:
  """(B, L, head_dim) float32 angles for positions (t, h, w)."""
  pos = positions_BxLx3.to(torch.float32)
  inv_t, inv_h, inv_w = rope_inv_freqs(config, device=pos.device)
  half = torch.cat([pos[..., 0:1] * inv_t, pos[..., 1:2] * inv_h, pos[..., 2:3] * inv_w], dim=-1)
  # Duplicated by concatenation, not interleaving: the released weights were trained this way.
  return torch.cat([half, half], dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
  """rotate_pairs(x)[2i] = -x[2i+1], rotate_pairs(x)[2i+1] = x[2i]."""
  pairs = x.unflatten(-1, (-1, 2))
  return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope(x_BxHxLxD: torch.Tensor, angles_BxLxD: torch.Tensor) -> torch.Tensor:
  # cos/sin are taken in float32, then rounded to the activation dtype, as the release does.
  cos = torch.cos(angles_BxLxD).to(x_BxHxLxD.dtype)[:, None]
  sin = torch.sin(angles_BxLxD).to(x_BxHxLxD.dtype)[:, None]
  return x_BxHxLxD * cos + rotate_pairs(x_BxHxLxD) * sin


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------


class OVEmbeddings(nn.Module):
  def __init__(self, config: OVEncoderConfig):
    super().__init__()
    self.patch_embedding = nn.Conv2d(
      config.num_channels,
      config.hidden_size,
      kernel_size=config.patch_size,
      stride=config.patch_size,
      bias=False,
    )


# How OVAttention computes attention: 'sdpa' (F.scaled_dot_product_attention, the default) or
# 'eager' (explicit logits, a float32 softmax, then the weighted sum: the path transformers takes
# with attn_implementation='eager', the release's only CPU path). Both compute the same function.
ATTENTION_IMPLEMENTATIONS = ('sdpa', 'eager')


def eager_attention(q, k, v, scale: float, dropout: float = 0.0, training: bool = False):
  """transformers' eager_attention_forward on [B, H, L, D] tensors: the [B, H, L, L]
  probabilities materialised."""
  weights = torch.matmul(q, k.transpose(2, 3)) * scale
  weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
  weights = F.dropout(weights, p=dropout, training=training)
  return torch.matmul(weights, v)


def set_attention_implementation(model: nn.Module, implementation: str) -> nn.Module:
  """Switches every OVAttention of `model` to `implementation` (ATTENTION_IMPLEMENTATIONS)."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
      f'attention implementation {implementation!r}; choose one of {ATTENTION_IMPLEMENTATIONS}'
    )
  for module in model.modules():
    if isinstance(module, OVAttention):
      module.attn_implementation = implementation
  return model


class OVAttention(nn.Module):
  def __init__(self, config: OVEncoderConfig):
    super().__init__()
    self.attn_implementation = 'sdpa'
    c = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.head_dim = config.hidden_size // config.num_attention_heads
    self.dropout = config.attention_dropout
    self.q_proj = nn.Linear(c, c)
    self.k_proj = nn.Linear(c, c)
    self.v_proj = nn.Linear(c, c)
    self.out_proj = nn.Linear(c, c)

  def forward(self, x_BxLxC: torch.Tensor, angles_BxLxD: torch.Tensor) -> torch.Tensor:
    b, l, c = x_BxLxC.shape
    split = lambda y: y.view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
    q = apply_rope(split(self.q_proj(x_BxLxC)), angles_BxLxD)
    k = apply_rope(split(self.k_proj(x_BxLxC)), angles_BxLxD)
    v = split(self.v_proj(x_BxLxC))
    if self.attn_implementation == 'eager':
      o = eager_attention(q, k, v, self.head_dim**-0.5, self.dropout, self.training)
    else:
      o = F.scaled_dot_product_attention(
        q, k, v, dropout_p=self.dropout if self.training else 0.0, scale=self.head_dim**-0.5
      )
    return self.out_proj(o.transpose(1, 2).reshape(b, l, c))


class OVMLP(nn.Module):
  def __init__(self, config: OVEncoderConfig):
    super().__init__()
    self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
    self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    # F.gelu's default is the exact erf form; the tanh approximation would drift from the release.
    return self.fc2(F.gelu(self.fc1(x)))


class OVEncoderLayer(nn.Module):
  def __init__(self, config: OVEncoderConfig):
    super().__init__()
    self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    self.self_attn = OVAttention(config)
    self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    self.mlp = OVMLP(config)

  def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    x = x + self.self_attn(self.layer_norm1(x), angles)
    return x + self.mlp(self.layer_norm2(x))


class OVEncoder(nn.Module):
  def __init__(self, config: OVEncoderConfig):
    super().__init__()
    self.layers = nn.ModuleList([OVEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class OVRMSNorm(nn.Module):
  """RMSNorm with a weight and no bias; statistics in float32 so bf16 runs stay stable."""

  def __init__(self, dim: int, eps: float = 1e-6):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x32 = x.to(torch.float32)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return y.to(x.dtype) * self.weight


class OVPoolingHead(nn.Module):
  """The MAP head: a learned probe attends to every token (no RoPE), then a residual MLP."""

  def __init__(self, config: OVEncoderConfig):
    super().__init__()
    c = config.hidden_size
    self.probe = nn.Parameter(torch.empty(1, 1, c))
    self.attention = nn.MultiheadAttention(c, config.num_attention_heads, batch_first=True)
    self.norm = OVRMSNorm(c, eps=1e-6)
    self.mlp = OVMLP(config)

  def forward(self, x_BxLxC: torch.Tensor) -> torch.Tensor:
    probe = self.probe.expand(x_BxLxC.shape[0], -1, -1)
    a = self.attention(probe, x_BxLxC, x_BxLxC, need_weights=False)[0]
    y = a + self.mlp(self.norm(a))
    return y[:, 0]


@torch.no_grad()
def init_module(module: nn.Module, std: float) -> None:
  """From-scratch initialisation of one module (docs/spec.md §1.2), not of its children: linear and
  patch weights N(0, std), biases 0, norm weights 1 (the pooling head's own parameters: see
  init_head)."""
  # MultiheadAttention's out_proj is a Linear subclass, so it is covered here too.
  if isinstance(module, nn.Linear):
    nn.init.normal_(module.weight, 0.0, std)
    if module.bias is not None:
      nn.init.zeros_(module.bias)
  elif isinstance(module, nn.Conv2d):
    nn.init.normal_(module.weight, 0.0, std)
  elif isinstance(module, nn.LayerNorm):
    nn.init.ones_(module.weight)
    nn.init.zeros_(module.bias)
  elif isinstance(module, OVRMSNorm):
    nn.init.ones_(module.weight)


@torch.no_grad()
def init_head(head: OVPoolingHead) -> None:
  """The pooling head's probe N(0, 1) and its fused in-projection Xavier-uniform, bias 0."""
  nn.init.normal_(head.probe, 0.0, 1.0)
  nn.init.xavier_uniform_(head.attention.in_proj_weight)
  nn.init.zeros_(head.attention.in_proj_bias)


class EncoderForward:
  """The encoder's modules (named as the release's state dict) and its forward pass, over a
  `config` with the release's fields. Shared by OVEncoderTorch and the transformers model that
  exports carry (modeling_onevision_encoder.py), so both compute exactly the same thing."""

  def build_modules(self, config) -> None:
    c = config.hidden_size
    self.embeddings = OVEmbeddings(config)
    self.layernorm_pre = nn.LayerNorm(c, eps=config.layer_norm_eps)
    self.encoder = OVEncoder(config)
    if config.use_head:
      self.layernorm_post = nn.LayerNorm(c, eps=config.layer_norm_eps)
      self.head = OVPoolingHead(config)
    else:
      self.layernorm_post = None
      self.head = None

  # -- inputs to tokens --------------------------------------------------------------------------

  def _patch_grid(self, h: int, w: int) -> tuple:
    p = self.config.patch_size
    if h % p or w % p:
      raise ValueError(f'image size {h}x{w} is not a multiple of the patch size {p}')
    return h // p, w // p

  def _embed_frames(self, pixel_values: torch.Tensor) -> tuple:
    """Patch tokens (B, T*Hp*Wp, C) ordered frame, row, column; plus (T, Hp, Wp)."""
    weight = self.embeddings.patch_embedding.weight
    if pixel_values.dim() == 4:
      frames = pixel_values[:, :, None]
    elif pixel_values.dim() == 5:
      frames = pixel_values
    else:
      raise ValueError(
        f'pixel_values must be (B, 3, H, W) or (B, 3, T, H, W), got shape '
        f'{tuple(pixel_values.shape)}'
      )
    b, ch, t, h, w = frames.shape
    if ch != self.config.num_channels:
      raise ValueError(
        f'pixel_values has {ch} channels, the model expects '
        f'{self.config.num_channels} (channels first)'
      )
    hp, wp = self._patch_grid(h, w)
    frames = frames.permute(0, 2, 1, 3, 4).reshape(b * t, ch, h, w).to(weight.dtype)
    x = self.embeddings.patch_embedding(frames)  # (B*T, C, Hp, Wp)
    x = x.flatten(2).transpose(1, 2).reshape(b, t * hp * wp, -1)
    return x, (t, hp, wp)

  @staticmethod
  def _grid_positions(t: int, hp: int, wp: int, batch: int, device) -> torch.Tensor:
    tt, hh, ww = torch.meshgrid(
      torch.arange(t, device=device),
      torch.arange(hp, device=device),
      torch.arange(wp, device=device),
      indexing='ij',
    )
    pos = torch.stack([tt, hh, ww], dim=-1).reshape(1, t * hp * wp, 3).to(torch.float32)
    return pos.expand(batch, -1, -1)

  def forward(
    self,
    pixel_values: torch.Tensor,
    visible_indices: torch.Tensor | None = None,
    patch_positions: torch.Tensor | None = None,
    output_hidden_states: bool = False,
  ) -> dict[str, Any]:
    """Encodes images (B, 3, H, W) or videos (B, 3, T, H, W) with the release's conventions.

    visible_indices (B, K): flat patch indices n on a virtual grid of `rope_temporal_size`
      frames, giving t = n // (Hp*Wp), h = (n // Wp) % Hp, w = n % Wp. When K differs from the
      number of input patches the tokens at those indices are gathered; when it is equal, the
      input already holds exactly the visible patches and the indices only assign positions.
    patch_positions (B, L, 3): explicit (t, h, w) per token, overriding any other positions.
    """
    x, (t, hp, wp) = self._embed_frames(pixel_values)
    b, n, _ = x.shape
    positions = None
    if visible_indices is not None:
      if visible_indices.dim() != 2 or visible_indices.shape[0] != b:
        raise ValueError(
          f'visible_indices must be (B={b}, K), got shape {tuple(visible_indices.shape)}'
        )
      if visible_indices.is_floating_point():
        raise ValueError('visible_indices must be an integer tensor')
      idx = visible_indices.to(device=x.device, dtype=torch.long)
      if idx.shape[1] != n:
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
          raise ValueError(
            f'visible_indices must lie in [0, {n}) to gather from the {n} input '
            f'patches; got range [{int(idx.min())}, {int(idx.max())}]'
          )
        x = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
      positions = torch.stack([idx // (hp * wp), (idx // wp) % hp, idx % wp], dim=-1).to(
        torch.float32
      )
    if patch_positions is not None:
      if patch_positions.dim() != 3 or patch_positions.shape[-1] != 3:
        raise ValueError(
          f'patch_positions must be (B, L, 3), got shape {tuple(patch_positions.shape)}'
        )
      if tuple(patch_positions.shape[:2]) != tuple(x.shape[:2]):
        raise ValueError(
          f'patch_positions has shape {tuple(patch_positions.shape)} but there are '
          f'{x.shape[1]} tokens for batch {x.shape[0]}'
        )
      positions = patch_positions.to(device=x.device, dtype=torch.float32)
    if positions is None:
      positions = self._grid_positions(t, hp, wp, b, x.device)
    return self._trunk(x, positions, output_hidden_states)

  def forward_tokens(
    self, patches: torch.Tensor, positions: torch.Tensor, output_hidden_states: bool = False
  ) -> dict[str, Any]:
    """Encodes pre-flattened patches (B, L, p*p*3) in (row, column, channel) order.

    This is the layout of a packed token pipeline; one sample per row, no padding.
    """
    weight = self.embeddings.patch_embedding.weight  # (C, ch, p, p): (channel, row, column)
    c, ch, p, _ = weight.shape
    if patches.dim() != 3 or patches.shape[-1] != p * p * ch:
      raise ValueError(f'patches must be (B, L, {p * p * ch}), got shape {tuple(patches.shape)}')
    if tuple(positions.shape) != (*patches.shape[:2], 3):
      raise ValueError(f'positions must be {(*patches.shape[:2], 3)}, got {tuple(positions.shape)}')
    w_rcc = weight.permute(0, 2, 3, 1).reshape(c, p * p * ch)
    x = patches.to(weight.dtype) @ w_rcc.t()
    return self._trunk(x, positions.to(device=x.device, dtype=torch.float32), output_hidden_states)

  # -- transformer -------------------------------------------------------------------------------

  def _trunk(
    self, x: torch.Tensor, positions: torch.Tensor, output_hidden_states: bool
  ) -> dict[str, Any]:
    angles = rope_angles(positions, self.config)
    x = self.layernorm_pre(x)
    hidden = [x] if output_hidden_states else None
    for layer in self.encoder.layers:
      x = layer(x, angles)
      if hidden is not None:
        hidden.append(x)
    pooled = None
    if self.head is not None:
      x = self.layernorm_post(x)
      pooled = self.head(x)
    out = {'last_hidden_state': x, 'pooler_output': pooled}
    if output_hidden_states:
      out['hidden_states'] = tuple(hidden)
    return out


class OVEncoderTorch(EncoderForward, nn.Module):
  """The OneVision encoder with the release's parameter names (docs/spec.md §1.2-1.4)."""

  def __init__(self, config: OVEncoderConfig):
    super().__init__()
    config.validate()
    self.config = config
    self.build_modules(config)
    self.reset_parameters()

  @torch.no_grad()
  def reset_parameters(self):
    """From-scratch initialisation of docs/spec.md §1.2."""
    for m in self.modules():
      init_module(m, self.config.initializer_range)
    if self.head is not None:
      init_head(self.head)


# ------------------------------------------------------------------------------------------------
# Checkpoint I/O
# ------------------------------------------------------------------------------------------------


def expected_shapes(config: OVEncoderConfig) -> dict[str, tuple]:
  """The release's state-dict keys and shapes for `config` (docs/spec.md §1.4)."""
  c, i, p, ch = config.hidden_size, config.intermediate_size, config.patch_size, config.num_channels
  shapes = {
    'embeddings.patch_embedding.weight': (c, ch, p, p),
    'layernorm_pre.weight': (c,),
    'layernorm_pre.bias': (c,),
  }
  for li in range(config.num_hidden_layers):
    pre = f'encoder.layers.{li}.'
    for name in ('layer_norm1', 'layer_norm2'):
      shapes[pre + name + '.weight'] = (c,)
      shapes[pre + name + '.bias'] = (c,)
    for name in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
      shapes[pre + f'self_attn.{name}.weight'] = (c, c)
      shapes[pre + f'self_attn.{name}.bias'] = (c,)
    shapes.update(
      {
        pre + 'mlp.fc1.weight': (i, c),
        pre + 'mlp.fc1.bias': (i,),
        pre + 'mlp.fc2.weight': (c, i),
        pre + 'mlp.fc2.bias': (c,),
      }
    )
  if config.use_head:
    shapes.update(
      {
        'layernorm_post.weight': (c,),
        'layernorm_post.bias': (c,),
        'head.probe': (1, 1, c),
        'head.attention.in_proj_weight': (3 * c, c),
        'head.attention.in_proj_bias': (3 * c,),
        'head.attention.out_proj.weight': (c, c),
        'head.attention.out_proj.bias': (c,),
        'head.norm.weight': (c,),
        'head.mlp.fc1.weight': (i, c),
        'head.mlp.fc1.bias': (i,),
        'head.mlp.fc2.weight': (c, i),
        'head.mlp.fc2.bias': (c,),
      }
    )
  return shapes


class URLFiles:
  """`hub`'s file access for a URL (gs://, s3://, any fsspec protocol): fsspec, with the file
  system of the URL's scheme (gcsfs, s3fs); its listing cache is dropped (another process may
  have written since)."""

  def __init__(self, url: str):
    try:
      import fsspec

      self.fs = fsspec.core.url_to_fs(url)[0]
    except (ImportError, ValueError) as e:
      raise ImportError(
        f'{url}: reading a URL needs fsspec and the file system of its scheme '
        f'(pip install gcsfs for gs://, s3fs for s3://): {e}'
      ) from None
    self.fs.invalidate_cache()

  def isdir(self, path: str) -> bool:
    return self.fs.isdir(path)

  def isfile(self, path: str) -> bool:
    return self.fs.isfile(path)

  @staticmethod
  def join(base: str, name: str) -> str:
    return f'{base.rstrip("/")}/{name}'

  @staticmethod
  def basename(path: str) -> str:
    return path.rstrip('/').rsplit('/', 1)[-1]

  def open_file(self, path: str, mode: str = 'r', encoding: str | None = None):
    return self.fs.open(path, mode, **({'encoding': encoding} if encoding else {}))

  def download(self, path: str, local: str) -> None:
    self.fs.get_file(path, local)


def _load_file(local: str, name: str) -> dict:
  try:  # a truncated, empty or garbled file: safetensors' own error names no path
    return safetensors.torch.load_file(local)
  except safetensors.SafetensorError as e:
    raise ValueError(f'{name}: unreadable safetensors ({e}); export or fetch it again') from None


def _read_weights(directory: str, files) -> tuple:
  """(state_dict, description of the file(s)); a sharded index is followed if present. An object
  goes through a local temporary copy, one at a time, its tensors cloned out of load_file's map
  of it (which would hold the deleted copy); from bytes, safetensors holds the file twice."""
  names = weight_files(directory, files)
  state = {}
  for path in names:
    if files is LocalFiles:
      state.update(_load_file(path, path))
      continue
    with tempfile.TemporaryDirectory(prefix='ove_weights_') as tmp:
      files.download(path, os.path.join(tmp, WEIGHTS_NAME))
      mapped = _load_file(os.path.join(tmp, WEIGHTS_NAME), path)
      state.update({key: mapped.pop(key).clone() for key in list(mapped)})
  if len(names) == 1:
    return state, names[0]
  shards = [files.basename(p) for p in names]
  return state, f'{files.join(directory, WEIGHTS_INDEX_NAME)} (shards {shards})'


def check_state_dict(
  state: Mapping[str, torch.Tensor], config: OVEncoderConfig, source: str = 'the state dict'
):
  """Raises ValueError on any missing key, unexpected key or wrong shape."""
  expected = expected_shapes(config)
  missing = [k for k in expected if k not in state]
  if missing:
    k = missing[0]
    raise ValueError(
      f'{source} lacks {len(missing)} key(s), first {k!r} (expected shape '
      f'{expected[k]}); all missing: {missing}'
    )
  unexpected = [k for k in state if k not in expected]
  if unexpected:
    raise ValueError(
      f'{source} has {len(unexpected)} unexpected key(s) for this config, first '
      f'{unexpected[0]!r} (shape {tuple(state[unexpected[0]].shape)}); all: '
      f'{unexpected}'
    )
  for k, shape in expected.items():
    if tuple(state[k].shape) != shape:
      raise ValueError(f'{source}: key {k!r} has shape {tuple(state[k].shape)}, expected {shape}')


def load_pretrained(directory: PathLike, dtype: torch.dtype = torch.float32) -> OVEncoderTorch:
  """A release-format directory (config.json + model.safetensors or its shards) as an
  OVEncoderTorch: a local folder, a hub id (`org/name[@revision]`, from the hub's cache) or a
  gs:// / s3:// URL (fsspec, `URLFiles`)."""
  text = os.fspath(directory)
  files = URLFiles(text) if '://' in text else LocalFiles
  directory = release_directory(text, files)  # a training run, or no export, says so
  config_path = files.join(directory, CONFIG_NAME)
  with files.open_file(config_path, encoding='utf-8') as f:
    text = f.read()
  try:
    config = OVEncoderConfig.from_dict(json.loads(text), source=config_path)
  except json.JSONDecodeError as e:
    raise ValueError(f'{config_path}: not JSON ({e})') from None
  state, source = _read_weights(directory, files)
  check_state_dict(state, config, source)
  state = {k: v.to(dtype) for k, v in state.items()}
  # Built on the meta device so a large model is not randomly initialised only to be overwritten.
  with torch.device('meta'):
    model = OVEncoderTorch(config)
  model.load_state_dict(state, strict=True, assign=True)
  return model


def _dtype_name(dtype: torch.dtype) -> str:
  return str(dtype).replace('torch.', '')


def save_pretrained(model: OVEncoderTorch, directory: PathLike):
  """Writes config.json and model.safetensors in the release's format."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
  check_state_dict(state, model.config, 'the model being saved')
  dtypes = {v.dtype for v in state.values()}
  dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
  config = {
    'model_type': MODEL_TYPE,
    'architectures': list(ARCHITECTURES),
    **model.config.to_dict(),
    'torch_dtype': _dtype_name(dtype),
  }
  with open(directory / CONFIG_NAME, 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write('\n')
  safetensors.torch.save_file(state, str(directory / WEIGHTS_NAME), metadata={'format': 'pt'})


def num_parameters(model: nn.Module) -> int:
  return int(sum(np.prod(p.shape) for p in model.parameters()))
