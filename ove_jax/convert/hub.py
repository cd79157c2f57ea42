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

WEIGHTS_NAME = 'model.safetensors'
WEIGHTS_INDEX_NAME = 'model.safetensors.index.json'
# What a loader needs from a hub repository (never pickled weights).
ALLOW_PATTERNS = ('*.json', '*.safetensors', '*.py', '*.md', '*.txt')
_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$')


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


def weight_files(directory: str, files=LocalFiles) -> list[str]:
  """The safetensors file(s) holding the weights: `model.safetensors`, else every shard named by
  `model.safetensors.index.json` (each checked to exist). Raises FileNotFoundError."""
  single = files.join(directory, WEIGHTS_NAME)
  if files.isfile(single):
    return [single]
  index = files.join(directory, WEIGHTS_INDEX_NAME)
  if not files.isfile(index):
    raise FileNotFoundError(
      f'{directory}: {WEIGHTS_NAME} is missing (and there is no {WEIGHTS_INDEX_NAME} of shards)'
    )
  with files.open_file(index, encoding='utf-8') as f:
    try:
      weight_map = json.load(f)['weight_map']
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise FileNotFoundError(f'{index}: not a safetensors index with a weight_map ({e!r})') from e
  shards = [files.join(directory, name) for name in sorted(set(weight_map.values()))]
  missing = [files.basename(p) for p in shards if not files.isfile(p)]
  if missing:
    raise FileNotFoundError(f'{index} names shard(s) {missing} that are not in {directory}')
  return shards


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


def index(shards: list[list[str]], sizes: dict[str, int]) -> dict:
  """The `model.safetensors.index.json` of `shards` (as transformers writes it)."""
  return {
    'metadata': {'total_size': int(sum(sizes.values()))},
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
