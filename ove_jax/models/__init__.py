"""Models. They import nothing of training, data, checkpointing or tools."""
from ove_jax.models.encoder import (CLIP_MEAN, CLIP_STD, PRESETS, Encoder, EncoderConfig,
                                    create_encoder, encoder_flops, num_params, patchify,
                                    uniform_frame_times)
