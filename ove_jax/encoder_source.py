"""What an encoder argument names (a training run, a release-format directory, ...) and which
version of it a load gives now, without loading it: the probe suite stores that version with
each cell, so a resumed suite sees an encoder trained on or rewritten in place
(docs/evaluation.md); `ove-probe` refuses --step for anything but a training run.

  encoder_kind('/ckpt/run')                 # 'training'
  encoder_identity('/ckpt/run')             # {'encoder_step': 20}
  encoder_identity('/models/ove-large')     # {'encoder_weights': '3 file(s), ... id 1f0c...'}
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

from data_pipeline import paths

# What an encoder argument names, as `checkpoint.load_encoder` tells them apart.
ENCODER_KINDS = {
  'random': 'a random:<preset> init',
  'hub': 'a Hugging Face hub id',
  'release': 'a release-format directory',
  'params': 'an ove_jax parameter directory',
  'training': 'a training run',
}


def encoder_kind(spec: str) -> str:
  """Which of ENCODER_KINDS `spec` is, told as `checkpoint.load_encoder` tells it (a training
  workdir holds a config.json too: the weights file or a release config.json decides), without
  reading any weights. A path that is none of the others is 'training' (the load says why not)."""
  from ove_jax import checkpoint
  from ove_jax.convert import hub, release_config

  if spec.startswith('random:'):
    return 'random'
  full = paths.absolute(spec)
  if not paths.is_url(spec) and not paths.exists(full) and hub.is_hub_id(spec):
    return 'hub'
  if any(paths.isfile(paths.join(full, n)) for n in (hub.WEIGHTS_NAME, hub.WEIGHTS_INDEX_NAME)):
    return 'release'
  if release_config.is_release_folder_config(full):
    return 'release'
  return 'params' if paths.isfile(paths.join(full, checkpoint.CONFIG_FILE)) else 'training'


def files_fingerprint(folder: str, files: Sequence[str]) -> str:
  """'<n> file(s), <size> bytes, id <hash>', the hash of each file's name under `folder`, size
  and modification time (a URL's object version): a file rewritten in place changes it, and no
  content is read."""
  entries, total = [], 0
  for path in sorted(files):
    size = paths.getsize(path)
    version = paths.object_version(path) if paths.is_url(path) else os.stat(path).st_mtime_ns
    entries.append(f'{path[len(folder) :].lstrip("/")}\0{size}\0{version}')
    total += size
  digest = hashlib.sha1('\n'.join(entries).encode()).hexdigest()[:12]
  return f'{len(entries)} file(s), {total} bytes, id {digest}'


def encoder_identity(spec: str, *, seed: int = 0, step: int | None = None) -> dict:
  """Which version of the encoder `spec` a load gives now, as settings of its cells (so that a
  changed encoder is a changed setting on resume): `encoder_step`, the checkpoint step of a
  training run (its latest, or `step`); `encoder_weights`, the `files_fingerprint` of a
  release-format directory's weight files and config.json (a hub id's cached snapshot) or of an
  ove_jax parameter directory; `encoder_seed`, the init of random:<preset>. FileNotFoundError
  or ValueError name what cannot be read."""
  from ove_jax import checkpoint
  from ove_jax.convert import hub

  kind = encoder_kind(spec)
  if kind == 'random':
    return {'encoder_seed': seed}
  if kind == 'training':
    return {'encoder_step': checkpoint.locate(spec, step, accepted=checkpoint.ACCEPTED)[1]}
  folder = hub.resolve(spec, paths) if kind == 'hub' else paths.absolute(spec)
  if kind == 'params':
    files = list(paths.walk_files(folder))
  else:
    config = paths.join(folder, 'config.json')
    files = hub.weight_files(folder, paths) + ([config] if paths.isfile(config) else [])
  return {'encoder_weights': files_fingerprint(folder, files)}
