"""Where a release-format checkpoint's files are: a local directory or a Hugging Face hub id, and
its weights as one `model.safetensors` or as shards listed by `model.safetensors.index.json`.

Needs only the standard library (huggingface_hub when a hub id is given), so that the JAX
loader, the PyTorch port and the port's copy inside every export (a relative import of
torch_model.py) share it. A hub id is fetched by `huggingface_hub.snapshot_download` into its
cache (HF_HOME / HF_HUB_CACHE) and read from there; with HF_HUB_OFFLINE=1 only the cache is read.

Files are reached through `files` (default `LocalFiles`: os.path and open), so that a caller that
reads object storage passes its own with the same five functions and gets the same checks and
messages for a gs:// or s3:// directory: ove_jax passes `data_pipeline.paths`, the port an
fsspec file system (torch_model.py). Nothing here knows what a URL is beyond '://'.
"""

from __future__ import annotations

import json
import os
import re
import struct

from .release_config import CONFIG_NAME

WEIGHTS_NAME = 'model.safetensors'
WEIGHTS_INDEX_NAME = 'model.safetensors.index.json'
# What a loader needs from a hub repository (never pickled weights).
ALLOW_PATTERNS = ('*.json', '*.safetensors', '*.py', '*.md', '*.txt')
# The id of one export, written by ove_jax into every weight file's safetensors metadata, the
# index's "metadata" and config.json: files that carry different ids (or some none) are a mix of
# two exports, such as an export cut short while it rewrote an earlier one.
EXPORT_ID = 'ove_export_id'
TRAINING_CHECKPOINTS = 'checkpoints'  # a training workdir's folder of steps (ove_jax.checkpoint)
PARAMS_CONFIG = 'encoder_config.json'  # of an ove_jax parameter directory (ove_jax.checkpoint)
_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$')


class MissingWeightsError(FileNotFoundError):
  """A directory with neither model.safetensors nor an index of shards."""


class MixedExportError(ValueError):
  """A directory whose files come from different exports (one cut short, or partly overwritten)."""


class LocalFiles:
  """The file access of `resolve` and `weight_files` for local paths."""

  isdir = staticmethod(os.path.isdir)
  isfile = staticmethod(os.path.isfile)
  join = staticmethod(os.path.join)
  basename = staticmethod(os.path.basename)

  @staticmethod
  def open_file(path, mode='r', encoding=None):
    return open(path, mode, encoding=encoding)  # pylint: disable=unspecified-encoding


def is_hub_id(text: str) -> bool:
  """'org/name' or 'org/name@revision' (a branch, tag or commit)."""
  return bool(_HUB_ID.match(str(text))) and not str(text).startswith(('.', '/', '~'))


def file_not_directory(path: str) -> str:
  """The message for a file given where a checkpoint directory is expected."""
  folder = os.path.dirname(path) or '.'
  return f'{path}: a file, not a directory; give the folder that holds it ({folder})'


def resolve(name_or_path, files=LocalFiles) -> str:
  """The directory of a checkpoint given as a directory (a URL where `files` reads URLs) or a hub
  id (`org/name[@rev]`, fetched into the local cache). Raises FileNotFoundError naming what was
  tried."""
  text = os.fspath(name_or_path)
  if files.isdir(text):
    return text
  if files.isfile(text):
    raise FileNotFoundError(file_not_directory(text))
  if '://' in text:
    raise FileNotFoundError(f'{text}: no such directory (no object is stored under this URL)')
  if not is_hub_id(text) or os.path.exists(text) or os.path.isdir(text.split('/')[0]):
    raise FileNotFoundError(
      f'{text}: no such directory (and not a Hugging Face hub id such as '
      'org/name or org/name@revision)'
    )
  repo_id, _, revision = text.partition('@')
  try:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
  except ImportError:
    raise FileNotFoundError(
      f'{text}: no such directory; to read it as a hub id install '
      'huggingface_hub (pip install huggingface_hub)'
    ) from None
  try:
    return huggingface_hub.snapshot_download(
      repo_id, revision=revision or None, allow_patterns=list(ALLOW_PATTERNS)
    )
  except LocalEntryNotFoundError as e:
    offline = constants.HF_HUB_OFFLINE
    raise FileNotFoundError(
      f'{text}: no such directory, and the hub id is not in the Hugging Face cache '
      f'({constants.HF_HUB_CACHE})'
      + (
        '; HF_HUB_OFFLINE is set, so nothing is downloaded: fetch it once online '
        f'(huggingface-cli download {repo_id}) or unset HF_HUB_OFFLINE'
        if offline
        else f' and could not be downloaded ({e})'
      )
    ) from None
  except HfHubHTTPError as e:
    raise FileNotFoundError(
      f'{text}: not a local directory, and the hub refused it ({e})'
    ) from None


def release_directory(name_or_path, files=LocalFiles) -> str:
  """`resolve`, then checks that the directory holds config.json and weights (model.safetensors
  or an index of shards). Raises FileNotFoundError naming what is missing, or saying what the
  folder is instead (a training run, an ove_jax parameter directory) and how to get an export."""
  directory = resolve(name_or_path, files)
  has_config = files.isfile(files.join(directory, CONFIG_NAME))
  weights = (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
  if has_config and any(files.isfile(files.join(directory, n)) for n in weights):
    return directory
  run = training_run(directory, files)
  if run:
    raise FileNotFoundError(
      f'{directory}: a training run ({run}), not a release-format export; export its encoder with '
      f'`ove-convert from-train --workdir {run} --out {run.rstrip("/")}_hf`, or start a run '
      f'from its weights with init.checkpoint={run}'
    )
  if files.isfile(files.join(directory, PARAMS_CONFIG)):
    raise FileNotFoundError(
      f'{directory}: an ove_jax parameter directory ({PARAMS_CONFIG}, params/), not a '
      f'release-format export; convert it with `ove-convert to-hf --params {directory} --out DIR`'
    )
  if not has_config:
    raise FileNotFoundError(
      f'{directory}: {CONFIG_NAME} is missing; not a release-format export (config.json and '
      f'{WEIGHTS_NAME}, or shards listed in {WEIGHTS_INDEX_NAME})'
    )
  raise MissingWeightsError(no_weights(directory))


def training_run(directory: str, files=LocalFiles) -> str | None:
  """The workdir of the training run that `directory` is (a workdir, its checkpoints folder or
  one step folder), else None."""
  if files.isdir(files.join(directory, TRAINING_CHECKPOINTS)):
    return directory
  parts = directory.rstrip('/').rsplit('/', 2)
  if parts[-1] == TRAINING_CHECKPOINTS and len(parts) > 1:
    return '/'.join(parts[:-1])
  if len(parts) == 3 and parts[1] == TRAINING_CHECKPOINTS and parts[2].isdigit():
    return parts[0]
  return None


def no_weights(directory: str) -> str:
  return f'{directory}: {WEIGHTS_NAME} is missing (and there is no {WEIGHTS_INDEX_NAME} of shards)'


def weight_files(directory: str, files=LocalFiles) -> list[str]:
  """The safetensors file(s) holding the weights: `model.safetensors`, else every shard named by
  `model.safetensors.index.json` (each checked to exist), all of one export (`check_one_export`).
  Raises FileNotFoundError (MissingWeightsError without weights) or MixedExportError."""
  single = files.join(directory, WEIGHTS_NAME)
  if files.isfile(single):
    check_one_export(directory, [single], files)
    return [single]
  index = files.join(directory, WEIGHTS_INDEX_NAME)
  if not files.isfile(index):
    raise MissingWeightsError(no_weights(directory))
  with files.open_file(index, encoding='utf-8') as f:
    try:
      found = json.load(f)
      weight_map = found['weight_map']
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise FileNotFoundError(f'{index}: not a safetensors index with a weight_map ({e!r})') from e
  shards = [files.join(directory, name) for name in sorted(set(weight_map.values()))]
  missing = [files.basename(p) for p in shards if not files.isfile(p)]
  if missing:
    raise FileNotFoundError(f'{index} names shard(s) {missing} that are not in {directory}')
  metadata = found.get('metadata')
  check_one_export(directory, shards, files, {WEIGHTS_INDEX_NAME: (metadata or {}).get(EXPORT_ID)})
  return shards


def check_one_export(directory: str, weights: list[str], files=LocalFiles, more=None) -> None:
  """Raises MixedExportError when the weight files of `directory` (and `more`: name -> export id,
  e.g. the index's) do not all carry one export id, or config.json carries another one. Weights
  with no id at all (the release's own, transformers' save_pretrained) are one export; a
  config.json without an id (written by hand or by other tools) is left to the config checks."""
  ids = dict(more or {})
  ids.update({files.basename(p): safetensors_metadata(p, files).get(EXPORT_ID) for p in weights})
  if not any(ids.values()):
    return
  config = files.join(directory, CONFIG_NAME)
  if files.isfile(config):
    try:
      with files.open_file(config, encoding='utf-8') as f:
        found = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
      found = None  # its reader names the broken file
    if isinstance(found, dict) and found.get(EXPORT_ID):
      ids[CONFIG_NAME] = found[EXPORT_ID]
  if len(set(ids.values())) == 1:
    return
  first = next(iter(ids))
  other = next(n for n in ids if ids[n] != ids[first])
  raise MixedExportError(
    f'{directory}: its files come from different exports ({first}: {describe(ids[first])}, '
    f'{other}: {describe(ids[other])}); an export into this folder was cut short or wrote over '
    f'part of another. Export again into {directory} (an uninterrupted export replaces every '
    'file)'
  )


def describe(export_id) -> str:
  return f'export {export_id}' if export_id else 'no export id'


def safetensors_metadata(path: str, files=LocalFiles) -> dict:
  """The `__metadata__` of a safetensors file's header; {} for a file too short or garbled to
  have one (its reader names what is wrong)."""
  with files.open_file(path, 'rb') as f:
    raw = f.read(8)
    if len(raw) < 8:
      return {}
    (n,) = struct.unpack('<Q', raw)
    if n > 100_000_000:  # the safetensors limit: a garbled length
      return {}
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
      return {}
  metadata = header.get('__metadata__') if isinstance(header, dict) else None
  return metadata if isinstance(metadata, dict) else {}


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
  """Tensor names grouped into shards of at most `max_bytes` each (a larger tensor gets a shard
  of its own), in the order given."""
  if max_bytes <= 0:
    raise ValueError(f'max_shard_size={max_bytes}: must be a positive number of bytes')
  shards: list[list[str]] = [[]]
  used = 0
  for name, size in sizes.items():
    if shards[-1] and used + size > max_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += size
  return shards


def shard_name(i: int, n: int) -> str:
  """transformers' shard file names: model-00001-of-00003.safetensors."""
  return f'model-{i + 1:05d}-of-{n:05d}.safetensors'


def index(shards: list[list[str]], sizes: dict[str, int], export_id: str | None = None) -> dict:
  """The `model.safetensors.index.json` of `shards` (as transformers writes it), with the
  export's id in its metadata when one is given."""
  return {
    'metadata': {
      'total_size': int(sum(sizes.values())),
      **({EXPORT_ID: export_id} if export_id else {}),
    },
    'weight_map': {
      name: shard_name(i, len(shards)) for i, names in enumerate(shards) for name in names
    },
  }


def parse_size(size) -> int:
  """Bytes from an int or a string such as '5GB', '500MB', '2GiB'."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*', str(size), re.IGNORECASE)
  if not match:
    raise ValueError(f'max_shard_size={size!r}: give bytes or a size such as 5GB or 500MB')
  unit = (match.group(2) or 'B').upper()
  base = 1024 if 'I' in unit else 1000
  power = {'B': 0, 'K': 1, 'M': 2, 'G': 3, 'T': 4}[unit[0]]
  return int(float(match.group(1)) * base**power)
