"""Conversion to and from the released PyTorch / Hugging Face format.

  ove_jax.convert.save_pytorch(model, directory)   our encoder -> release-format directory
  ove_jax.convert.load_pytorch(directory)          release-format directory -> our encoder
  ove_jax.convert.with_layout(model, scan_layers)  the same weights, blocks scanned or unrolled
  ove_jax.convert.torch_model                      our PyTorch port (needs only torch)

Attributes load lazily so that `ove_jax.convert.torch_model` works without JAX installed.
"""

import importlib

_HF = (
  'save_pytorch',
  'load_pytorch',
  'CheckpointError',
  'mapping',
  'params_to_hf',
  'hf_to_params',
  'model_params',
  'model_from_params',
  'read_safetensors',
  'write_safetensors',
  'iter_safetensors',
  'verify_export',
  'hf_tensors',
  'config_from_hf',
  'hf_config',
  'read_directory',
  'with_layout',
)

__all__ = list(_HF)


def __getattr__(name):
  if name in _HF:
    return getattr(importlib.import_module('ove_jax.convert.hf'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
