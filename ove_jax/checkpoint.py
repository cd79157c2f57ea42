"""Checkpoints of our own: plain nested dicts of arrays written with orbax.

A parameter directory holds `params/` (an orbax PyTree checkpoint of the encoder's parameters as
a nested dict with string keys, e.g. params['blocks']['0']['mlp']['fc1']['kernel']) and
`encoder_config.json` (the EncoderConfig fields). Plain dicts, not module objects, so that
refactoring a module never breaks a checkpoint. The trainer's checkpoints (train state, data
iterator, step) build on this layout.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from ove_jax.models.encoder import EncoderConfig

PARAMS_DIR, CONFIG_FILE = 'params', 'encoder_config.json'


def nest(flat: dict[tuple, np.ndarray], key=str) -> dict:
  """{('blocks', 0, 'mlp', 'fc1', 'kernel'): a} -> {'blocks': {'0': {...}}}: string keys, or keys
  as `key` makes them (`key=lambda k: k` keeps list indices as ints, as nnx.to_pure_dict does)."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(key(k), {})
    node[key(path[-1])] = value
  return tree


def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
  """The inverse of `nest`; digit-only keys become ints again (list indices)."""
  flat = {}
  for key, value in tree.items():
    k = int(key) if isinstance(key, str) and key.isdigit() else key
    if isinstance(value, dict):
      flat.update(flatten(value, prefix + (k,)))
    else:
      flat[prefix + (k,)] = value
  return flat


def save_params(directory: str, cfg: EncoderConfig, params: dict[tuple, np.ndarray]) -> str:
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, PARAMS_DIR)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, nest({k: np.asarray(v) for k, v in params.items()}), force=True)
  checkpointer.wait_until_finished()
  with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2, sort_keys=True)
  return directory


def encoder_config(fields: dict, source: str) -> EncoderConfig:
  """EncoderConfig from its saved fields (encoder_config.json, a training checkpoint's meta)."""
  known = {f.name for f in dataclasses.fields(EncoderConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'{source}: unknown field {unknown[0]!r}; known fields: {sorted(known)}')
  return EncoderConfig(**fields)


def load_params(directory: str) -> tuple[EncoderConfig, dict[tuple, np.ndarray]]:
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{config_path} is missing; {directory} is not an ove_jax parameter '
                            'directory (made by save_params or tools/convert_checkpoint.py)')
  with open(config_path) as f:
    cfg = encoder_config(json.load(f), config_path)
  tree = ocp.StandardCheckpointer().restore(os.path.join(directory, PARAMS_DIR))
  return cfg, {k: np.asarray(jax.device_get(v)) for k, v in flatten(tree).items()}
