"""Exports that transformers loads, sharded weights, and hub ids (docs/spec.md §1.4).

`save_pytorch` (hf.py) writes, besides the release's config.json, weights and
preprocessor_config.json:
  - `auto_map` in config.json and our remote code: configuration_onevision_encoder.py,
    modeling_onevision_encoder.py and the PyTorch port they build on (torch_model.py, hub.py,
    release_config.py),
    so `AutoModel.from_pretrained(export_dir, trust_remote_code=True)` loads the export (as
    LLaVA-style code loads the released vision tower) with no ove_jax installed;
  - the weights as one model.safetensors, or, above `max_shard_size`, as shards
    model-0000i-of-0000n.safetensors with model.safetensors.index.json (transformers' layout),
    which every loader here reads back (`read_weights`; the port; init.pytorch);
  - one export id (`export_id`, a hash of what is exported) in every weight file's metadata, the
    index's metadata and config.json, written config.json last: a folder whose files carry
    different ids, such as a re-export killed half-way, is refused by every loader here
    (`hub.check_one_export`).
Directories may be given as Hugging Face hub ids (`hub.resolve`); `push_to_hub` uploads an export
to the hub, `upload_export` to object storage (gs://, s3://), after `check_writable`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

from data_pipeline import fileio, paths
from ove_jax.convert import hub

# The remote code every export carries (files of this package, copied unchanged).
REMOTE_CODE = (
  'configuration_onevision_encoder.py',
  'modeling_onevision_encoder.py',
  'torch_model.py',
  'hub.py',
  'release_config.py',
)
AUTO_MAP = {
  'AutoConfig': 'configuration_onevision_encoder.OneVisionEncoderConfig',
  'AutoModel': 'modeling_onevision_encoder.OneVisionEncoderModel',
}
MAX_SHARD_SIZE = '5GB'  # transformers' default: the large encoder in fp32 (1.26 GB) is one file


def with_auto_map(config: dict) -> dict:
  """config.json's dict with `auto_map` naming the remote code's classes."""
  return {**config, 'auto_map': dict(AUTO_MAP)}


def write_remote_code(directory: str) -> list[str]:
  """Copies the remote code into `directory`; returns the paths written."""
  here = os.path.dirname(os.path.abspath(__file__))
  written = []
  for name in REMOTE_CODE:
    target = os.path.join(directory, name)
    with fileio.atomic_path(target) as tmp:
      shutil.copyfile(os.path.join(here, name), tmp)
    written.append(target)
  return written


def export_id(params: dict, config: dict, dtype: str, max_shard_size: int | str) -> str:
  """The id of an export: a hash of the parameters (flat path -> array), config.json's dict, the
  stored dtype and the shard size, so the same export gives the same files, byte for byte, and
  any other export another id."""
  digest = hashlib.sha256(
    json.dumps([config, dtype, hub.parse_size(max_shard_size)], sort_keys=True).encode()
  )
  for path in sorted(params, key=str):
    array = np.ascontiguousarray(params[path])
    digest.update(repr((path, array.dtype.str, array.shape)).encode())
    digest.update(array.reshape(-1).view(np.uint8).data)
  return digest.hexdigest()[:16]


def write_export(
  directory: str,
  tensors: dict,
  config: dict,
  preprocessor: dict,
  *,
  export_id: str,
  max_shard_size: int | str = MAX_SHARD_SIZE,
) -> None:
  """Writes an export into `directory`: the weights (stale ones of an earlier export removed),
  the remote code, preprocessor_config.json, then config.json, each file atomically and each
  carrying `export_id`, so that a write cut short leaves files the loaders refuse as a mix."""
  from ove_jax.convert.hf import CONFIG_FILE, PREPROCESSOR_FILE

  os.makedirs(directory, exist_ok=True)
  write_weights(directory, tensors, max_shard_size, export_id=export_id)
  write_remote_code(directory)
  fileio.write_json(os.path.join(directory, PREPROCESSOR_FILE), preprocessor, sort_keys=False)
  config = {**with_auto_map(config), hub.EXPORT_ID: export_id}
  fileio.write_json(os.path.join(directory, CONFIG_FILE), config, sort_keys=False)


def write_weights(
  directory: str,
  tensors: dict[str, np.ndarray],
  max_shard_size: int | str = MAX_SHARD_SIZE,
  *,
  export_id: str | None = None,
) -> list[str]:
  """Writes `tensors` as model.safetensors, or as shards with an index (written last) when they
  exceed `max_shard_size` (bytes, or '5GB' / '500MB'), with `export_id` in each file's metadata;
  removes the weight files of an earlier export in `directory` that the new ones do not replace,
  and temporary files a killed export left. Returns the files written."""
  from ove_jax.convert.hf import write_safetensors

  metadata = {hub.EXPORT_ID: export_id} if export_id else None
  sizes = {name: int(tensors[name].nbytes) for name in sorted(tensors)}  # arrays or Deferred
  shards = hub.plan_shards(sizes, hub.parse_size(max_shard_size))
  if len(shards) == 1:
    written = [os.path.join(directory, hub.WEIGHTS_NAME)]
    write_safetensors(written[0], tensors, metadata)
  else:
    written = []
    for i, names in enumerate(shards):
      written.append(os.path.join(directory, hub.shard_name(i, len(shards))))
      write_safetensors(written[-1], {name: tensors[name] for name in names}, metadata)
    written.append(os.path.join(directory, hub.WEIGHTS_INDEX_NAME))
    fileio.write_json(written[-1], hub.index(shards, sizes, export_id))
  remove_stale_weights(directory, {os.path.basename(p) for p in written})
  return written


def remove_stale_weights(directory: str, keep) -> list[str]:
  """Removes the weight files of an earlier export in `directory` (a local folder or a gs:// /
  s3:// URL) whose names are not in `keep`, and the temporary weight files a killed export left
  (`model*.tmp-*`): a stale model.safetensors would be read instead of new shards (loaders try it
  first), and stale shards waste space. Returns the paths removed."""
  earlier = (
    paths.glob(paths.join(directory, 'model-*-of-*.safetensors'))
    + [paths.join(directory, n) for n in (hub.WEIGHTS_NAME, hub.WEIGHTS_INDEX_NAME)]
    + paths.glob(paths.join(directory, f'model*{fileio.TMP_MARK}*'))
  )
  removed = []
  for path in earlier:
    if paths.basename(path) not in keep and paths.isfile(path):
      paths.remove(path)
      removed.append(path)
  return removed


def read_weights(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of `directory`'s model.safetensors or of all its shards (a key in two shards is
  refused); `directory` may be a gs:// / s3:// URL (read through data_pipeline.paths)."""
  from ove_jax.convert.hf import CheckpointError, read_safetensors

  try:
    files = hub.weight_files(directory, paths)
  except (FileNotFoundError, hub.MixedExportError) as e:
    raise CheckpointError(str(e)) from None
  tensors: dict[str, np.ndarray] = {}
  for path in files:
    part = read_safetensors(path)
    twice = sorted(set(part) & set(tensors))
    if twice:
      raise CheckpointError(f'{path}: key {twice[0]} is also in another shard of {directory}')
    tensors.update(part)
  return tensors


def push_to_hub(
  directory: str,
  repo_id: str,
  *,
  private: bool = False,
  revision: str | None = None,
  token: str | None = None,
  commit_message: str = 'OneVision-Encoder export (ove_jax)',
  api=None,
) -> str:
  """Uploads an export directory to the hub repository `repo_id` (created if missing); returns
  the commit's URL. Needs network access and a token (HF_TOKEN or `huggingface-cli login`)."""
  problem = repo_id_problem(repo_id)
  if problem:
    raise ValueError(f'{repo_id}: {problem}')
  missing = [
    n for n in ('config.json', *REMOTE_CODE) if not os.path.isfile(os.path.join(directory, n))
  ]
  if missing:
    raise FileNotFoundError(f'{directory}: {missing} missing; export with save_pytorch first')
  if api is None:
    import huggingface_hub

    api = huggingface_hub.HfApi(token=token)
  try:
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
      folder_path=directory,
      repo_id=repo_id,
      revision=revision,
      commit_message=commit_message,
      allow_patterns=list(hub.ALLOW_PATTERNS),
    )
  except Exception as e:  # requests / huggingface_hub: no network, no token, no write access
    raise PushError(
      f'pushing {directory} to the hub repository {repo_id} failed ({first_line(e)}); the '
      f'export in {directory} is kept. Check network access and a token with '
      f'write access (HF_TOKEN or `huggingface-cli login`), then push it again '
      f'(`huggingface-cli upload {repo_id} {directory}`)'
    ) from e
  return str(getattr(info, 'commit_url', info))


def repo_id_problem(repo_id: str) -> str | None:
  """Why `repo_id` cannot name a hub repository (huggingface_hub's own check, made without the
  network), None when it can; for checking a push target before anything is converted."""
  try:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
  except ImportError:
    return 'pushing to the hub needs huggingface_hub (pip install huggingface_hub)'
  try:
    validate_repo_id(repo_id)
  except HFValidationError as e:
    return (
      f'not a hub repository id ({first_line(e)}); give NAME or ORG/NAME, e.g. me/my-ove-encoder'
    )
  return None


WRITE_CHECK = '.ove_write_check'  # the object check_writable writes and removes again


def check_writable(url: str) -> None:
  """Raises TargetError, naming `url` and the fix, when objects cannot be written and removed
  under `url` (no such bucket, no credentials, no write access); checked by writing a small
  object and removing it, before an export is made."""
  probe = paths.join(url, WRITE_CHECK)
  try:
    with paths.open_file(probe, 'wb') as f:
      f.write(b'ove_jax write check')
    paths.remove(probe)
  except Exception as e:  # gcsfs / s3fs / botocore: a missing bucket, credentials, permission
    scheme, rest = url.split('://', 1)
    bucket = f'{scheme}://{rest.split("/")[0]}'
    reason = 'no such bucket, or no access' if isinstance(e, FileNotFoundError) else first_line(e)
    raise TargetError(
      f'{url}: cannot write there ({reason}); check that the bucket {bucket} exists and that '
      'your credentials may write and delete objects in it'
    ) from None


def upload_export(local: str, url: str) -> list[str]:
  """Uploads the export folder `local` to `url` file by file, then removes the weight files of
  an earlier export at `url` that this one does not replace; returns the URLs written. A failed
  upload is a PushError naming `local`, which the caller keeps."""
  try:
    written = paths.upload_folder(local, url)
    remove_stale_weights(url, set(os.listdir(local)))
  except Exception as e:  # gcsfs / s3fs / botocore: network, credentials, permission
    raise PushError(
      f'uploading {local} to {url} failed ({first_line(e)}); the checked export in {local} is '
      f'kept: once the cause is fixed, export again, or copy its files to {url} and delete the '
      'weight files there that it lacks'
    ) from e
  return written


def first_line(error: BaseException) -> str:
  """`Type: first line of the message` (at most 300 characters) of `error`, for one-line
  reports of what a storage or network library raised."""
  return f'{type(error).__name__}: {(str(error).strip().splitlines() or [""])[0][:300]}'


class PushError(RuntimeError):
  """An export that could not be uploaded to the hub or to object storage (it stays on disk)."""


class TargetError(ValueError):
  """An upload target (a gs:// / s3:// URL) where nothing can be written: checked before work."""
