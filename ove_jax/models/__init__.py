"""Models. They import nothing of training, data, checkpointing or tools."""

from ove_jax.models.encoder import (
  CLIP_MEAN,
  CLIP_STD,
  PRESETS,
  SCANNED_PRESETS,
  Encoder,
  EncoderConfig,
  create_encoder,
  encoder_flops,
  num_params,
  patchify,
  uniform_frame_times,
)
from ove_jax.models.layout import (
  is_stacked,
  is_stacked_path,
  stack_blocks,
  to_layout,
  unstack_blocks,
)

__all__ = [
  'CLIP_MEAN',
  'CLIP_STD',
  'PRESETS',
  'SCANNED_PRESETS',
  'Encoder',
  'EncoderConfig',
  'create_encoder',
  'encoder_flops',
  'num_params',
  'patchify',
  'uniform_frame_times',
  'is_stacked',
  'is_stacked_path',
  'stack_blocks',
  'to_layout',
  'unstack_blocks',
]
