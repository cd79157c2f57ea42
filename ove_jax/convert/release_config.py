"""The release's `config.json` schema (docs/spec.md §1.4): one home for its fields and checks.

Standard library only: the PyTorch port (`torch_model`), the transformers configuration of an
export and the JAX converter (`ove_jax.convert.hf`) all read and write config.json through
`OVEncoderConfig`, and exports carry a copy of this file beside the port. Each field records
the `ove_jax.models.encoder.EncoderConfig` field it maps to (`OURS`), or none where the release
allows one value only, so the converter maps both ways by the schema instead of a second list.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

MODEL_TYPE = 'onevision_encoder'
ARCHITECTURES = ['OneVisionEncoderModel']
CONFIG_NAME = 'config.json'

# Sizes with no sensible default: a config file without them is not a usable config.
REQUIRED_KEYS = ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads')
# The metadata key naming the EncoderConfig field of a release field.
OURS = 'ove_jax'


def is_release_folder_config(folder: str) -> bool:
  """Whether `folder` (local or a URL) has a config.json of ours (`model_type` MODEL_TYPE),
  read without transformers; a missing or unreadable one is not."""
  from data_pipeline import fileio, paths  # pylint: disable=g-import-not-at-top

  try:
    config = fileio.read_json(paths.join(folder, CONFIG_NAME))
  except (ValueError, OSError):  # not JSON, or not a folder
    return False
  return isinstance(config, dict) and config.get('model_type') == MODEL_TYPE


def _key(default, ours: str | None = None):
  """A release field with its default; `ours` names the EncoderConfig field it maps to."""
  return dataclasses.field(default=default, metadata={OURS: ours})


@dataclasses.dataclass
class OVEncoderConfig:
  """The fields of the release's `config.json` that shape the model, with the release's
  defaults (its large model)."""

  # sizes
  hidden_size: int = _key(1024, 'width')
  intermediate_size: int = _key(4096, 'mlp_dim')
  num_hidden_layers: int = _key(24, 'depth')
  num_attention_heads: int = _key(16, 'num_heads')
  # input
  num_channels: int = _key(3, 'num_channels')
  image_size: int = _key(448, 'image_size')
  patch_size: int = _key(14, 'patch_size')
  # layers: only the release's choices are accepted (validate)
  hidden_act: str = _key('gelu')
  layer_norm_eps: float = _key(1e-6, 'layer_norm_eps')
  layer_norm_type: str = _key('layer_norm')
  attention_dropout: float = _key(0.0)
  initializer_range: float = _key(0.02)
  # positions (docs/spec.md §1.3) and the pooling head
  rope_theta: float = _key(10000.0, 'rope_theta')
  rope_temporal_size: int = _key(64, 'rope_temporal_size')
  use_head: bool = _key(True, 'use_head')

  def __post_init__(self):
    self.validate()

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def rope_axis_sizes(self) -> tuple:
    return rope_axis_sizes(self)

  def validate(self, source: str | None = None):
    where = f' in {source}' if source else ''
    for key in REQUIRED_KEYS:
      value = getattr(self, key)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f'{key} is {value!r}{where}; expected a positive integer')
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f'hidden_size {self.hidden_size} is not divisible by num_attention_heads '
        f'{self.num_attention_heads}{where}'
      )
    # The 4:6:6 RoPE split needs head_dim / 2 to be a multiple of 16 (64 in every release size).
    if (self.head_dim // 2) % 16 or self.head_dim % 2:
      raise ValueError(
        f'head_dim {self.head_dim} (hidden_size / num_attention_heads) is not '
        f'supported{where}: head_dim / 2 must be divisible by 16 for the 4:6:6 '
        f'RoPE split (the release uses 64)'
      )
    # Anything else would be computed silently wrong, so refuse it rather than approximate it.
    if self.hidden_act != 'gelu':
      raise ValueError(
        f'hidden_act {self.hidden_act!r}{where} is not supported; only the exact '
        f'(erf) "gelu" of the release is'
      )
    if self.layer_norm_type != 'layer_norm':
      raise ValueError(
        f'layer_norm_type {self.layer_norm_type!r}{where} is not supported; only "layer_norm" is'
      )

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], source: str | None = None) -> OVEncoderConfig:
    """Builds a config from a `config.json` dict; keys that are not fields are ignored."""
    where = source or 'the config dict'
    model_type = d.get('model_type')
    if model_type is not None and model_type != MODEL_TYPE:
      raise ValueError(
        f'{where} has model_type {model_type!r}, '
        f'expected {MODEL_TYPE!r}; this is not a OneVision-Encoder config'
      )
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
      raise ValueError(f'{where} lacks the required field(s) {missing}')
    # Bypass __post_init__ so a failed check can name the file it came from.
    config = cls.__new__(cls)
    for f in dataclasses.fields(cls):
      value = d.get(f.name)
      if value is None:
        value = f.default
      elif f.type == 'float' and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
      setattr(config, f.name, value)
    config.validate(source)
    return config

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> OVEncoderConfig:
    with open(path, encoding='utf-8') as f:
      d = json.load(f)
    return cls.from_dict(d, source=str(path))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_ours(cls, encoder_config) -> OVEncoderConfig:
    """The release fields of an `EncoderConfig` (fixed-value fields keep the release's)."""
    return cls(
      **{
        f.name: getattr(encoder_config, f.metadata[OURS])
        for f in dataclasses.fields(cls)
        if f.metadata[OURS]
      }
    )

  def ours(self) -> dict[str, Any]:
    """The `EncoderConfig` keyword arguments these fields set."""
    return {
      f.metadata[OURS]: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata[OURS]
    }


def rope_axis_sizes(config) -> tuple:
  """(n_t, n_h, n_w): the 4:6:6 split of head_dim / 2. `config` is any object with the release's
  fields (OVEncoderConfig, or the transformers config of an export)."""
  unit = config.hidden_size // config.num_attention_heads // 2 // 16
  return 4 * unit, 6 * unit, 6 * unit
