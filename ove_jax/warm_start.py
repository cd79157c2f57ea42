"""Warm start: a run's first parameters from a released model or from an earlier stage.

`init.pytorch` takes the encoder of a release-format (Hugging Face) directory; `init.checkpoint`
takes the encoder, and with `init.heads` the cluster heads, of another run's checkpoint (a later
stage starting from an earlier one). Only parameters are read (never the source's optimiser
state), straight onto this run's shardings, whatever mesh wrote them; the optimiser state and the
step start fresh. A source whose blocks are in the other layout (unrolled vs scanned,
`model.scan_layers`) is read to the host and converted (`models.layout`: exact).
"""

from __future__ import annotations

import logging
from typing import Any

from ove_jax import checkpoint
from ove_jax import config as config_lib

log = logging.getLogger('ove_jax.train')

# What must agree for an encoder's weights to load into another run's encoder.
ARCH_FIELDS = ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size', 'use_head')


def initialise_from(state: dict, config, program) -> dict:
  """`state` (a fresh train state of `program`) with its parameters replaced as config.init says;
  unchanged when it names no source."""
  params = state['params']
  if config.init.pytorch:
    params = _from_release(params, config, program)
  elif config.init.checkpoint:
    params = _from_checkpoint(params, config, program)
  if config.init.release_centres:
    params = _release_centres(params, config, program)
  return state if params is state['params'] else {**state, 'params': params}


def _release_centres(params: dict, config, program) -> dict:
  """Heads started from the release's Partial FC centres (its per-rank .npy shards), the padding
  rows drawn as a fresh head's (docs/kmeans_and_release_heads.md)."""
  from ove_jax.convert import release_heads

  where = f'init.release_centres={config.init.release_centres}'
  try:
    found = release_heads.load_release_centres(
      config.init.release_centres, program.heads, program.encoder_cfg.width
    )
    heads = dict(params['heads'])
    for name, centres_NxC in found.items():
      head = program.heads[name]
      full = release_heads.into_head(centres_NxC, head.padded_classes, config.seed)
      heads[name] = checkpoint.place(full, params['heads'][name], f'heads/{name}')
      log.info(
        "initialised head %s from the release's centres (%d classes)", name, centres_NxC.shape[0]
      )
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(f'{where}: {e}') from None
  return {**params, 'heads': heads}


def _check_arch(source: str, theirs: dict[str, Any], config, program) -> None:
  mine = program.encoder_cfg
  for field in ARCH_FIELDS:
    if field in theirs and theirs[field] != getattr(mine, field):
      raise config_lib.ConfigError(
        f"{source}: its {field} is {theirs[field]}, this run's "
        f'model.preset={config.model.preset} has {getattr(mine, field)}'
      )


def _from_release(params: dict, config, program) -> dict:
  import dataclasses

  from ove_jax.convert import hf

  directory = config.init.pytorch
  try:  # a missing or broken directory is the config's error, named by its key
    raw, tensors = hf.read_directory(directory)
    _check_arch(
      f'init.pytorch={directory}',
      dataclasses.asdict(hf.config_from_hf(raw, source=directory)),
      config,
      program,
    )
    flat = hf.hf_to_params(tensors, program.encoder_cfg, source=directory)
    encoder = checkpoint.place(checkpoint.nest(flat), params['encoder'], 'encoder')
  except config_lib.ConfigError:
    raise
  except (OSError, ValueError) as e:  # hf.CheckpointError is a ValueError
    raise config_lib.ConfigError(f'init.pytorch={directory}: {e}') from None
  log.info('initialised the encoder from %s (heads fresh)', directory)
  return {**params, 'encoder': encoder}


def _encoder_from_checkpoint(source: str, target, program) -> tuple[Any, int]:
  """(the source's encoder on this run's shardings, step), converted to this run's block layout
  when the source has the other one."""
  from ove_jax.models import layout

  saved = checkpoint.flatten(checkpoint.param_shapes(source, subtree=checkpoint.ENCODER))
  scan_layers = layout.is_stacked(checkpoint.flatten(target))
  if layout.is_stacked(saved) == scan_layers:
    encoder, _, step = checkpoint.restore_params(source, subtree=checkpoint.ENCODER, target=target)
    return encoder, step
  host, _, step = checkpoint.restore_params(source, subtree=checkpoint.ENCODER)
  flat = layout.to_layout(
    checkpoint.flatten(host), scan_layers=scan_layers, depth=program.encoder_cfg.depth
  )
  log.info(
    'init.checkpoint: the source has its blocks %s, this run %s: converted',
    *(('unrolled', 'stacked (scan_layers)') if scan_layers else ('stacked', 'unrolled')),
  )
  return checkpoint.place(checkpoint.nest(flat), target, 'encoder'), step


def _from_checkpoint(params: dict, config, program) -> dict:
  source = config.init.checkpoint
  where = f'init.checkpoint={source}'
  try:
    meta = checkpoint.read_meta(source)
    _check_arch(
      where + f' (model.preset={meta.get("config", {}).get("model", {}).get("preset")})',
      meta.get('encoder_config', {}),
      config,
      program,
    )
    abstract = program.abstract_state['params']
    encoder, step = _encoder_from_checkpoint(source, abstract['encoder'], program)
    heads = dict(params['heads'])
    theirs = checkpoint.param_shapes(source, step, subtree=('params', 'heads'))
    kept = []
    for name in sorted(heads) if config.init.heads != 'fresh' else ():
      if name not in theirs:
        if config.init.heads == 'matching':
          continue
        raise config_lib.ConfigError(
          f'init.heads=keep: the source has no head {name!r} (it has {sorted(theirs)}); use '
          '--config.init.heads=matching (keep the heads it has, start the others fresh) or '
          'fresh'
        )
      if config.init.heads == 'matching' and theirs[name] != tuple(heads[name].shape):
        continue
      heads[name], _, _ = checkpoint.restore_params(
        source, step, subtree=('params', 'heads', name), target=abstract['heads'][name]
      )
      kept.append(name)
  except (FileNotFoundError, ValueError) as e:
    if isinstance(e, config_lib.ConfigError):
      raise
    raise config_lib.ConfigError(f'{where}: {e}') from None
  log.info('initialised from %s step %d (heads kept: %s)', source, step, ', '.join(kept) or 'none')
  return {**params, 'encoder': encoder, 'heads': heads}
