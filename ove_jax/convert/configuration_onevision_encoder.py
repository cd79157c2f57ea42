"""The transformers configuration of a OneVision-Encoder export (docs/spec.md §1.4).

`AutoConfig.from_pretrained(export_dir, trust_remote_code=True)` builds this from config.json
(whose `auto_map` names it). Every export carries a copy of this file beside
modeling_onevision_encoder.py and the PyTorch port (torch_model.py, hub.py, release_config.py),
written by `ove_jax.convert.save_pytorch`; inside ove_jax it is an ordinary module. The fields
and their defaults are the release schema's `OVEncoderConfig` (release_config.py), which also
checks them (head_dim, GELU, LayerNorm).
"""

import dataclasses

try:  # transformers 5 names it PreTrainedConfig; 4.x only PretrainedConfig
  from transformers import PreTrainedConfig
except ImportError:
  from transformers import PretrainedConfig as PreTrainedConfig

# transformers copies a local export's modules through the direct relative imports of the file
# it loads only, so the port's own `.hub` and `.torch_model` are named here too.
from .hub import WEIGHTS_NAME  # noqa: F401
from .release_config import MODEL_TYPE, OVEncoderConfig
from .torch_model import EncoderForward  # noqa: F401

FIELDS = {f.name: f.default for f in dataclasses.fields(OVEncoderConfig)}


class OneVisionEncoderConfig(PreTrainedConfig):
  """The release's config.json fields (hidden_size, num_hidden_layers, rope_theta, ...)."""

  model_type = MODEL_TYPE

  def __init__(self, **kwargs):
    for name, default in FIELDS.items():
      setattr(self, name, kwargs.pop(name, default))
    super().__init__(**kwargs)
    self.encoder_config()  # refuses what the model would compute wrongly, naming the field

  def encoder_config(self) -> OVEncoderConfig:
    """The port's dataclass of these fields (validated)."""
    return OVEncoderConfig(**{name: getattr(self, name) for name in FIELDS})
