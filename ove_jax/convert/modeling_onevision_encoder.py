"""The transformers model of a OneVision-Encoder export (docs/spec.md §1.2-1.4).

`AutoModel.from_pretrained(export_dir, trust_remote_code=True)` builds `OneVisionEncoderModel`
(config.json's `auto_map` names it), as LLaVA-style code loads the released vision tower. Its
modules and forward pass are the PyTorch port's (`torch_model.EncoderForward`), so the state-dict
keys are the release's and the outputs equal our JAX encoder's; RoPE frequencies are computed in
each call, never stored in buffers that a loader could leave uninitialised. Every export carries a
copy of this file, written by `ove_jax.convert.save_pytorch`.

  model = AutoModel.from_pretrained(export_dir, trust_remote_code=True).eval()
  out = model(pixel_values_Bx3xHxW)                        # images, CLIP-normalised
  out = model(video_Bx3xTxHxW, visible_indices=idx_BxK)    # codec-selected patches (64-frame grid)
  out.last_hidden_state  # (B, L, C) after layernorm_post;  out.pooler_output  # (B, C)
  out = model(x, output_hidden_states=True).hidden_states  # block inputs/outputs, no post-norm
"""

from __future__ import annotations

import os

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_onevision_encoder import OneVisionEncoderConfig

# transformers copies a local export's modules through the direct relative imports of the file
# it loads only, so the port's own `.hub` and
# `.release_config` are named here too.
from .hub import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, weight_files
from .release_config import CONFIG_NAME  # noqa: F401
from .torch_model import EncoderForward, OVPoolingHead, init_head, init_module


class OneVisionEncoderPreTrainedModel(PreTrainedModel):
  config_class = OneVisionEncoderConfig
  base_model_prefix = 'onevision_encoder'
  main_input_name = 'pixel_values'
  _no_split_modules = ['OVEncoderLayer']

  @classmethod
  def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
    """transformers' loader, after the check every loader of ours makes on a local folder: files
    that carry different export ids (a re-export cut short over an earlier one) are refused
    with hub.MixedExportError naming the folder, instead of loading a mix of two models. Only
    where transformers will read the safetensors weights our exports write (model.safetensors
    or its index); other folders (pytorch_model.bin, a variant, a given state_dict) are left to
    transformers as they are."""
    path = pretrained_model_name_or_path
    other_weights = any(kwargs.get(k) for k in ('state_dict', 'variant', 'gguf_file'))
    if (
      isinstance(path, (str, os.PathLike))
      and not other_weights
      and kwargs.get('use_safetensors') is not False
    ):
      subfolder = kwargs.get('subfolder')
      folder = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
      if any(os.path.isfile(os.path.join(folder, n)) for n in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        weight_files(folder)
    return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

  def _init_weights(self, module):
    """From-scratch initialisation (docs/spec.md §1.2) of weights a checkpoint lacks."""
    init_module(module, self.config.initializer_range)
    if isinstance(module, OVPoolingHead):
      init_head(module)


class OneVisionEncoderModel(EncoderForward, OneVisionEncoderPreTrainedModel):
  """The encoder with the release's parameter names and outputs (BaseModelOutputWithPooling)."""

  def __init__(self, config: OneVisionEncoderConfig):
    super().__init__(config)
    self.build_modules(config)
    self.post_init()

  def forward(
    self,
    pixel_values: torch.Tensor,
    visible_indices: torch.Tensor | None = None,
    patch_positions: torch.Tensor | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = None,
    **kwargs,
  ):
    """pixel_values (B, 3, H, W) or (B, 3, T, H, W); visible_indices (B, K) flat indices on the
    virtual `rope_temporal_size`-frame grid; patch_positions (B, L, 3) explicit (t, h, w)
    (`patch_postions`, the first release's spelling, is accepted too)."""
    if 'patch_postions' in kwargs:
      patch_positions = kwargs.pop('patch_postions')
    if kwargs:
      raise TypeError(f'OneVisionEncoderModel.forward got unexpected argument(s) {sorted(kwargs)}')
    if output_attentions:
      raise ValueError(
        "output_attentions=True: this model attends with torch's "
        'scaled_dot_product_attention, which returns no attention weights'
      )
    if output_hidden_states is None:
      output_hidden_states = self.config.output_hidden_states
    if return_dict is None:
      return_dict = getattr(self.config, 'return_dict', True)
    out = EncoderForward.forward(
      self,
      pixel_values,
      visible_indices=visible_indices,
      patch_positions=patch_positions,
      output_hidden_states=bool(output_hidden_states),
    )
    hidden = out.get('hidden_states')
    if not return_dict:
      return (out['last_hidden_state'], out['pooler_output']) + ((hidden,) if hidden else ())
    return BaseModelOutputWithPooling(
      last_hidden_state=out['last_hidden_state'],
      pooler_output=out['pooler_output'],
      hidden_states=hidden,
    )
