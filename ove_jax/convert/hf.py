"""Conversion between our encoder and the release's Hugging Face format (docs/spec.md §1.4).

One declarative table maps every parameter of ours to a key of the release's state dict, with
the layout change between them (PyTorch Linear stores (out, in); the patch embedding is a Conv2d
over (channel, row, column); the pooling head fuses q/k/v into one in-projection). Export and
import both walk that table, so a key can never be handled in one direction only.

The table is written for the unrolled block layout (`encoder.layers.{n}.*` <-> ('blocks', n,
...)); parameters of a scanned encoder (blocks stacked on a leading 'layers' axis, see
`ove_jax.models.layout`) are unstacked on export and stacked on import, exactly.

Directories are read through `data_pipeline.paths`, so a release-format directory in object
storage (gs://, s3://) loads like a local one: tensor by tensor, with ranged reads.

Only safetensors is read or written (never pickle). The reader and writer here handle bfloat16,
which `safetensors.numpy` cannot, and need neither torch nor the Hugging Face libraries.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Callable, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from data_pipeline import fileio, paths
from ove_jax import sharding
from ove_jax.models import layout
from ove_jax.models.encoder import CLIP_MEAN, CLIP_STD, Encoder, EncoderConfig

from .release_config import ARCHITECTURES, MODEL_TYPE, OVEncoderConfig

Path = tuple  # a parameter path in nnx.state, e.g. ('blocks', 0, 'mlp', 'fc1', 'kernel')
#                (unrolled) or ('blocks', 'mlp', 'fc1', 'kernel') (scanned: [depth, C, I])

CONFIG_FILE, WEIGHTS_FILE, PREPROCESSOR_FILE = (
  'config.json',
  'model.safetensors',
  'preprocessor_config.json',
)


class CheckpointError(ValueError):
  """A directory that is not a usable OneVision-Encoder checkpoint; the message says why."""


# ------------------------------------------------------------------------------------------------
# The mapping table
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  hf_key: str
  paths: tuple[Path, ...]  # our parameter(s) that make up this release tensor
  hf_shape: tuple[int, ...]
  to_hf: Callable[[Sequence[np.ndarray]], np.ndarray]
  from_hf: Callable[[np.ndarray], Sequence[np.ndarray]]


def _same(arrays):
  return arrays[0]


def _one(array):
  return [array]


def _linear_to_hf(arrays):
  return arrays[0].T


def _linear_from_hf(array):
  return [array.T]


def _patch_rules(cfg: EncoderConfig):
  ps, ch, c = cfg.patch_size, cfg.num_channels, cfg.width

  def to_hf(arrays):  # [ps*ps*ch (row, col, channel), C] -> (C, ch, row, col)
    return arrays[0].reshape(ps, ps, ch, c).transpose(3, 2, 0, 1)

  def from_hf(array):
    return [array.transpose(2, 3, 1, 0).reshape(ps * ps * ch, c)]

  return to_hf, from_hf


def _qkv_to_hf(arrays):  # three [C, C] kernels (in, out) -> fused (3C, C) rows q, k, v
  return np.concatenate([a.T for a in arrays], axis=0)


def _qkv_from_hf(array):
  return [a.T for a in np.split(array, 3, axis=0)]


def _qkv_bias_to_hf(arrays):
  return np.concatenate(arrays, axis=0)


def _qkv_bias_from_hf(array):
  return np.split(array, 3, axis=0)


def mapping(cfg: EncoderConfig) -> list[Rule]:
  """Every release key with the parameter(s) of ours it corresponds to."""
  c, i = cfg.width, cfg.mlp_dim
  rules = []

  def linear(hf_prefix, path, d_in, d_out):
    rules.append(
      Rule(
        f'{hf_prefix}.weight', (path + ('kernel',),), (d_out, d_in), _linear_to_hf, _linear_from_hf
      )
    )
    rules.append(Rule(f'{hf_prefix}.bias', (path + ('bias',),), (d_out,), _same, _one))

  def layer_norm(hf_prefix, path):
    rules.append(Rule(f'{hf_prefix}.weight', (path + ('scale',),), (c,), _same, _one))
    rules.append(Rule(f'{hf_prefix}.bias', (path + ('bias',),), (c,), _same, _one))

  patch_to_hf, patch_from_hf = _patch_rules(cfg)
  rules.append(
    Rule(
      'embeddings.patch_embedding.weight',
      (('patch_embed', 'kernel'),),
      (c, cfg.num_channels, cfg.patch_size, cfg.patch_size),
      patch_to_hf,
      patch_from_hf,
    )
  )
  layer_norm('layernorm_pre', ('layernorm_pre',))
  for n in range(cfg.depth):
    hf, ours = f'encoder.layers.{n}', ('blocks', n)
    layer_norm(f'{hf}.layer_norm1', ours + ('layer_norm1',))
    for proj in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
      linear(f'{hf}.self_attn.{proj}', ours + ('self_attn', proj), c, c)
    layer_norm(f'{hf}.layer_norm2', ours + ('layer_norm2',))
    linear(f'{hf}.mlp.fc1', ours + ('mlp', 'fc1'), c, i)
    linear(f'{hf}.mlp.fc2', ours + ('mlp', 'fc2'), i, c)
  if cfg.use_head:
    layer_norm('layernorm_post', ('layernorm_post',))
    rules.append(Rule('head.probe', (('head', 'probe'),), (1, 1, c), _same, _one))
    qkv = tuple(('head', p) for p in ('q_proj', 'k_proj', 'v_proj'))
    rules.append(
      Rule(
        'head.attention.in_proj_weight',
        tuple(p + ('kernel',) for p in qkv),
        (3 * c, c),
        _qkv_to_hf,
        _qkv_from_hf,
      )
    )
    rules.append(
      Rule(
        'head.attention.in_proj_bias',
        tuple(p + ('bias',) for p in qkv),
        (3 * c,),
        _qkv_bias_to_hf,
        _qkv_bias_from_hf,
      )
    )
    linear('head.attention.out_proj', ('head', 'out_proj'), c, c)
    rules.append(Rule('head.norm.weight', (('head', 'norm', 'scale'),), (c,), _same, _one))
    linear('head.mlp.fc1', ('head', 'mlp', 'fc1'), c, i)
    linear('head.mlp.fc2', ('head', 'mlp', 'fc2'), i, c)
  return rules


@dataclasses.dataclass(frozen=True)
class Deferred:
  """A tensor made only when it is written: shape and dtype up front (a safetensors header needs
  them), the values from `make()` later, so an export holds one converted tensor at a time."""

  shape: tuple[int, ...]
  dtype: np.dtype
  make: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def hf_tensors(
  params: dict[Path, np.ndarray], cfg: EncoderConfig, dtype=np.float32
) -> dict[str, Deferred]:
  """Our flat parameters (path -> array, either block layout) as the release's state dict, each
  tensor converted (and cast to `dtype`) only when its `make()` is called."""
  params = _in_layout(params, cfg, scan_layers=False)
  out = {}
  for rule in mapping(cfg):
    missing = [p for p in rule.paths if p not in params]
    if missing:
      raise CheckpointError(
        f'parameter {"/".join(map(str, missing[0]))} is missing; it is needed '
        f'for {rule.hf_key} {rule.hf_shape}'
      )
    out[rule.hf_key] = Deferred(
      rule.hf_shape, np.dtype(dtype), lambda rule=rule: _to_hf(rule, params, dtype)
    )
  return out


def _to_hf(rule: Rule, params: dict[Path, np.ndarray], dtype) -> np.ndarray:
  tensor = np.ascontiguousarray(
    rule.to_hf([np.asarray(params[p]) for p in rule.paths]), dtype=dtype
  )
  assert tensor.shape == rule.hf_shape, (rule.hf_key, tensor.shape, rule.hf_shape)
  return tensor


def params_to_hf(params: dict[Path, np.ndarray], cfg: EncoderConfig) -> dict[str, np.ndarray]:
  """Our flat parameters (path -> array, either block layout) to the release's state dict."""
  return {key: tensor.make() for key, tensor in hf_tensors(params, cfg).items()}


def hf_to_params(
  tensors: dict[str, np.ndarray], cfg: EncoderConfig, *, source: str = 'state dict'
) -> dict[Path, np.ndarray]:
  """The release's state dict to our flat parameters, in the block layout of
  `cfg.scan_layers`; strict about keys and shapes."""
  rules = mapping(cfg)
  expected = {r.hf_key for r in rules}
  missing = [r for r in rules if r.hf_key not in tensors]
  if missing:
    r = missing[0]
    raise CheckpointError(
      f'{source}: key {r.hf_key} is missing (expected shape {r.hf_shape}); '
      f'{len(missing)} of {len(rules)} expected keys are missing'
    )
  unexpected = sorted(set(tensors) - expected)
  if unexpected:
    raise CheckpointError(
      f'{source}: unexpected key {unexpected[0]} with shape '
      f'{tuple(tensors[unexpected[0]].shape)} ({len(unexpected)} unexpected '
      "keys); is config.json the checkpoint's own?"
    )
  params = {}
  for rule in rules:
    tensor = tensors[rule.hf_key]
    if tuple(tensor.shape) != rule.hf_shape:
      raise CheckpointError(
        f'{source}: key {rule.hf_key} has shape {tuple(tensor.shape)}, '
        f'expected {rule.hf_shape} from config.json'
      )
    for path, array in zip(rule.paths, rule.from_hf(np.asarray(tensor))):
      params[path] = np.ascontiguousarray(array)
  return _in_layout(params, cfg, scan_layers=cfg.scan_layers)


def _in_layout(
  params: dict[Path, np.ndarray], cfg: EncoderConfig, *, scan_layers: bool
) -> dict[Path, np.ndarray]:
  try:
    return layout.to_layout(params, scan_layers=scan_layers, depth=cfg.depth)
  except ValueError as e:
    raise CheckpointError(f'block parameters: {e}') from e


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------


def hf_config(cfg: EncoderConfig, dtype: str = 'float32') -> dict:
  """The release's config.json of `cfg`. Refuses an encoder trained with another RoPE: the format
  has no field for it, and every loader of the release would silently apply 3D RoPE."""
  if cfg.rope != '3d':
    raise CheckpointError(
      f'this encoder uses rope={cfg.rope!r} (an ablation, model.rope); the release format '
      'knows only the 3D RoPE, so its loaders would run these weights with the wrong '
      'positions. Keep it as an ove_jax checkpoint (checkpoint.save_params records the rope '
      'in encoder_config.json) instead of exporting it'
    )
  return {
    'model_type': MODEL_TYPE,
    'architectures': list(ARCHITECTURES),
    **OVEncoderConfig.from_ours(cfg).to_dict(),
    'torch_dtype': dtype,
    'dtype': dtype,
  }


def config_from_hf(hf: dict, *, source: str = CONFIG_FILE, **overrides) -> EncoderConfig:
  """EncoderConfig from a release config.json dict; refuses what is not an OV-Encoder."""
  if hf.get('model_type') != MODEL_TYPE:
    raise CheckpointError(
      f'{source}: model_type is {hf.get("model_type")!r}, expected '
      f'{MODEL_TYPE!r}; this is not a OneVision-Encoder checkpoint'
    )
  try:
    release = OVEncoderConfig.from_dict(hf, source)  # its messages name `source`
  except ValueError as e:
    raise CheckpointError(str(e)) from e
  try:
    return EncoderConfig(**release.ours(), **overrides)
  except ValueError as e:
    raise CheckpointError(f'{source}: {e}') from e


def preprocessor_config(cfg: EncoderConfig) -> dict:
  """The release's CLIP preprocessing: shortest side to image_size (bicubic), centre crop."""
  return {
    'image_processor_type': 'CLIPImageProcessor',
    'do_convert_rgb': True,
    'do_resize': True,
    'size': {'shortest_edge': cfg.image_size},
    'resample': 3,  # PIL bicubic
    'do_center_crop': True,
    'crop_size': {'height': cfg.image_size, 'width': cfg.image_size},
    'do_rescale': True,
    'rescale_factor': 1 / 255,
    'do_normalize': True,
    'image_mean': list(CLIP_MEAN),
    'image_std': list(CLIP_STD),
    'patch_size': cfg.patch_size,
  }


# ------------------------------------------------------------------------------------------------
# safetensors, read and written directly (format: u64 header size, JSON header, raw data)
# ------------------------------------------------------------------------------------------------

_DTYPES = {
  'F64': np.dtype(np.float64),
  'F32': np.dtype(np.float32),
  'F16': np.dtype(np.float16),
  'BF16': np.dtype(ml_dtypes.bfloat16),
  'I64': np.dtype(np.int64),
  'I32': np.dtype(np.int32),
  'I16': np.dtype(np.int16),
  'I8': np.dtype(np.int8),
  'U8': np.dtype(np.uint8),
  'BOOL': np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def write_safetensors(
  path: str, tensors: dict[str, np.ndarray | Deferred], metadata: dict | None = None
):
  """Writes `tensors` (arrays, or `Deferred` ones made as they are written: the header needs only
  shapes and dtypes, so at most one tensor is in memory beyond its source)."""
  header, offset = {}, 0
  for key in sorted(tensors):
    t = tensors[key]
    dtype, shape = np.dtype(t.dtype), tuple(t.shape)
    if dtype not in _NAMES:
      raise ValueError(f'{key}: dtype {dtype} cannot be stored in safetensors')
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[key] = {
      'dtype': _NAMES[dtype],
      'shape': list(shape),
      'data_offsets': [offset, offset + size],
    }
    offset += size
  header['__metadata__'] = {'format': 'pt', **(metadata or {})}
  head = json.dumps(header, separators=(',', ':')).encode()
  head += b' ' * (-len(head) % 8)  # keep the data 8-byte aligned
  with fileio.atomic_path(path) as tmp:  # never leave a half-written weights file behind
    with open(tmp, 'wb') as f:
      f.write(struct.pack('<Q', len(head)))
      f.write(head)
      for key in sorted(tensors):
        t = tensors[key]
        a = np.ascontiguousarray(t.make() if isinstance(t, Deferred) else t)
        if a.shape != tuple(header[key]['shape']) or _NAMES[a.dtype] != header[key]['dtype']:
          raise ValueError(
            f'{key}: made {a.dtype}{list(a.shape)}, announced '
            f'{header[key]["dtype"]}{header[key]["shape"]}'
          )
        f.write(a.reshape(-1).view(np.uint8).data)
        del a


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  return dict(iter_safetensors(path))


def iter_safetensors(path: str):
  """(key, array) of each tensor of a safetensors file (a local file or an object), read one at
  a time (header order)."""
  size = paths.getsize(path)
  with paths.open_file(path, 'rb') as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointError(f'{path}: truncated (no safetensors header)')
    (n,) = struct.unpack('<Q', raw)
    if n > size - 8:
      raise CheckpointError(
        f'{path}: header length {n} exceeds the file; not a safetensors file or truncated'
      )
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f'{path}: unreadable safetensors header ({e})') from e
    base = 8 + n
    # Plain reads, tensor by tensor (not a memory map: mapped pages stay resident until the map
    # goes, so reading a whole file through one would hold all of it).
    for key, info in header.items():
      if key == '__metadata__':
        continue
      if info.get('dtype') not in _DTYPES:
        raise CheckpointError(f'{path}: tensor {key} has unsupported dtype {info.get("dtype")}')
      start, end = info['data_offsets']
      if base + end > size:
        raise CheckpointError(f'{path}: tensor {key} runs past the end of the file (truncated)')
      buffer = bytearray(end - start)
      f.seek(base + start)
      f.readinto(buffer)
      yield key, np.frombuffer(buffer, _DTYPES[info['dtype']]).reshape(info['shape'])


# ------------------------------------------------------------------------------------------------
# Our model <-> a Hugging Face directory
# ------------------------------------------------------------------------------------------------


def model_params(model: Encoder) -> dict[Path, np.ndarray]:
  """Flat path -> host numpy array of every parameter."""
  state = nnx.state(model, nnx.Param)
  return {
    tuple(path): np.asarray(jax.device_get(var[...])) for path, var in nnx.to_flat_state(state)
  }


def save_pytorch(
  model: Encoder,
  directory: str,
  *,
  dtype: str = 'float32',
  params: dict[Path, np.ndarray] | None = None,
  max_shard_size: int | str = '5GB',
) -> str:
  """Writes `directory` in the release's format: config.json, model.safetensors (or shards of
  at most `max_shard_size` with an index) and preprocessor_config.json, plus the remote code
  that AutoModel.from_pretrained(directory, trust_remote_code=True) loads (hf_modeling.py).
  `dtype` is the stored precision (float32, bfloat16 or float16). Every file carries the
  export's id, so that an export cut short over an earlier one is refused by the loaders.

  `params` (flat path -> array) overrides the model's own, for exporting training checkpoints.
  """
  from ove_jax.convert import hf_modeling

  cfg = model.cfg
  store = STORE_DTYPES
  if dtype not in store:
    raise ValueError(f'dtype={dtype!r}; choose one of {sorted(store)}')
  config = hf_config(cfg, dtype)  # refuses what the format cannot hold, before writing anything
  params = _in_layout(params if params is not None else model_params(model), cfg, scan_layers=False)
  # Deferred: each tensor is converted and cast as it is written (one at a time in memory).
  hf_modeling.write_export(
    directory,
    hf_tensors(params, cfg, store[dtype]),
    config,
    preprocessor_config(cfg),
    export_id=hf_modeling.export_id(params, config, dtype, max_shard_size),
    max_shard_size=max_shard_size,
  )
  return directory


STORE_DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}


def verify_export(model: Encoder, directory: str, dtype: str = 'float32') -> tuple[float, int]:
  """(largest |difference|, parameters compared) between `model` and the weights written in
  `directory` (one file or shards), after rounding the model's values to the stored `dtype`; one
  tensor at a time, so checking an export holds no second copy of the weights. A key the model
  lacks, or a parameter the files lack, is a CheckpointError."""
  from ove_jax.convert import hub

  store = STORE_DTYPES[dtype]
  params = _in_layout(model_params(model), model.cfg, scan_layers=False)
  rules = {rule.hf_key: rule for rule in mapping(model.cfg)}
  worst, seen = 0.0, set()
  for path in hub.weight_files(directory, paths):
    for key, tensor in iter_safetensors(path):
      if key not in rules:
        raise CheckpointError(f'{path}: unexpected key {key}')
      for p, got in zip(rules[key].paths, rules[key].from_hf(tensor)):
        want = np.asarray(params[p]).astype(store).astype(np.float32)
        worst = max(worst, float(np.abs(got.astype(np.float32) - want).max(initial=0.0)))
        seen.add(p)
  missing = sorted(set(params) - seen, key=str)
  if missing:
    raise CheckpointError(
      f'{directory}: parameter {"/".join(map(str, missing[0]))} was not written'
    )
  return worst, len(seen)


def read_directory(directory: str) -> tuple[EncoderConfig, dict[str, np.ndarray]]:
  """(config.json's dict, tensors) of a directory (local or a gs:// / s3:// URL) or hub id;
  sharded weights are merged."""
  from ove_jax.convert import hf_modeling, hub

  try:
    directory = hub.resolve(directory, paths)
    hub.release_directory(directory, paths)
  except hub.MissingWeightsError as e:
    extra = ''
    if any(f.endswith(('.bin', '.pt', '.pth')) for f in paths.listdir(directory)):
      extra = '; pickled PyTorch weights are never loaded: convert them to safetensors'
    raise CheckpointError(f'{e}{extra}') from None
  except FileNotFoundError as e:
    raise CheckpointError(str(e)) from None
  config_path = paths.join(directory, CONFIG_FILE)
  try:
    with paths.open_file(config_path, encoding='utf-8') as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{config_path}: not valid JSON ({e})') from e
  return hf, hf_modeling.read_weights(directory)


def load_pytorch(
  directory: str, *, dtype: str = 'float32', rules=sharding.DEFAULT_RULES, **config_overrides
) -> Encoder:
  """Our encoder with the weights of a release-format directory (e.g. the released
  `onevision-encoder-large`; local, a gs:// / s3:// URL, or a hub id). `dtype` is the compute
  dtype; parameters are float32.

  With a mesh set (`jax.set_mesh`), parameters are placed sharded by `rules`.
  """
  hf, tensors = read_directory(directory)
  cfg = config_from_hf(
    hf, source=paths.join(directory, CONFIG_FILE), dtype=dtype, **config_overrides
  )
  params = hf_to_params(tensors, cfg, source=paths.join(directory, WEIGHTS_FILE))
  return model_from_params(cfg, params, rules=rules)


def model_from_params(
  cfg: EncoderConfig, params: dict[Path, np.ndarray], *, rules=sharding.DEFAULT_RULES
) -> Encoder:
  """An encoder whose parameters are `params` (flat path -> array), without a random init.

  `params` may be in either block layout; they are stacked or unstacked to `cfg.scan_layers`
  (so a checkpoint saved unrolled loads into a scanned encoder, and back).
  """
  params = _in_layout(params, cfg, scan_layers=cfg.scan_layers)
  abstract = nnx.eval_shape(lambda: Encoder(cfg, rngs=nnx.Rngs(0), rules=rules))
  graphdef, state = nnx.split(abstract)
  mesh = sharding.current_mesh()
  flat = []
  for path, var in nnx.to_flat_state(state):
    if path not in params:
      raise CheckpointError(f'parameter {"/".join(map(str, path))} is missing')
    value = np.asarray(params[path], dtype=np.float32)
    expected = var.get_raw_value().shape
    if value.shape != expected:
      raise CheckpointError(
        f'parameter {"/".join(map(str, path))} has shape {value.shape}, expected {expected}'
      )
    if mesh is not None:
      meta = var.get_metadata()
      spec = sharding.logical_to_spec(meta.get('out_sharding') or (), rules)
      value = jax.device_put(value, spec)  # onto the mesh set by jax.set_mesh
    else:
      value = jax.numpy.asarray(value)
    flat.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def with_layout(model: Encoder, scan_layers: bool) -> Encoder:
  """The same encoder (same weights, bit for bit) with its blocks unrolled or scanned."""
  cfg = dataclasses.replace(model.cfg, scan_layers=scan_layers)
  return model_from_params(cfg, model_params(model), rules=model.rules)
