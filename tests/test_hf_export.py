"""Exports that transformers loads: AutoConfig / AutoModel.from_pretrained(export,
trust_remote_code=True) with the pinned transformers equal our JAX encoder (fp32, 1e-5) on an
image and a sparse video; sharded weights round-trip through every loader; a hub id loads from a
populated local cache with HF_HUB_OFFLINE=1 (no network).

Weights are sharpened (see conftest) so that attention, and therefore RoPE, matters.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from ove_jax import checkpoint, convert
from ove_jax.convert import hf, hf_modeling, hub, torch_model
from ove_jax.models import EncoderConfig, create_encoder

TOL = 1e-5  # relative to the largest magnitude, fp32
TINY = EncoderConfig.preset('tiny')

pixels = nnx.jit(
  lambda m, *a, **k: m.forward_pixels(*a, **k), static_argnames=('output_hidden_states',)
)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope='module')
def exported(tmp_path_factory, sharpen):
  model = sharpen(create_encoder(TINY, seed=11))
  directory = str(tmp_path_factory.mktemp('export'))
  convert.save_pytorch(model, directory)
  return model, directory


@pytest.fixture(scope='module')
def automodel(exported):
  model, info = transformers.AutoModel.from_pretrained(
    exported[1], trust_remote_code=True, output_loading_info=True
  )
  assert not any(info.values()), info  # no missing, unexpected or mismatched key
  return model.eval()


def _sparse_video(seed):
  """Two clips of 64 frames at 112x112 (4,096 candidate patches), 300 kept per clip."""
  rng = np.random.RandomState(seed)
  idx = np.stack([np.sort(rng.choice(64 * 64, 300, replace=False)) for _ in range(2)])
  return rng.randn(2, 64, 112, 112, 3).astype(np.float32), idx


def _to_torch(pixel_values_nhwc):
  x = torch.from_numpy(np.asarray(pixel_values_nhwc))
  return x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(0, 4, 1, 2, 3)  # NCHW / NCTHW


def _compare(jax_out, out):
  assert jax_out['last_hidden_state'].shape == tuple(out.last_hidden_state.shape)
  assert _rel(jax_out['last_hidden_state'], out.last_hidden_state.numpy()) <= TOL
  assert _rel(jax_out['pooler_output'], out.pooler_output.numpy()) <= TOL
  assert len(jax_out['hidden_states']) == len(out.hidden_states) == TINY.depth + 1
  for a, b in zip(jax_out['hidden_states'], out.hidden_states):
    assert _rel(a, b.numpy()) <= TOL


def test_export_carries_auto_map_and_remote_code(exported):
  _, directory = exported
  with open(os.path.join(directory, 'config.json')) as f:
    config = json.load(f)
  assert config['auto_map'] == {
    'AutoConfig': 'configuration_onevision_encoder.OneVisionEncoderConfig',
    'AutoModel': 'modeling_onevision_encoder.OneVisionEncoderModel',
  }
  for name in hf_modeling.REMOTE_CODE:
    assert os.path.isfile(os.path.join(directory, name)), name
  auto = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=True)
  assert type(auto).__name__ == 'OneVisionEncoderConfig'
  assert (
    auto.model_type,
    auto.hidden_size,
    auto.num_hidden_layers,
    auto.rope_temporal_size,
    auto.use_head,
  ) == ('onevision_encoder', TINY.width, TINY.depth, 64, True)


def test_automodel_has_the_release_keys(exported, automodel):
  assert type(automodel).__name__ == 'OneVisionEncoderModel'
  keys = {r.hf_key for r in hf.mapping(TINY)}
  assert set(automodel.state_dict()) == keys
  assert not list(automodel.buffers())  # RoPE is computed per call, nothing left to initialise


def test_automodel_equals_jax_on_an_image(exported, automodel):
  model, _ = exported
  x = np.random.RandomState(0).randn(2, 224, 224, 3).astype(np.float32)
  with torch.no_grad():
    out = automodel(_to_torch(x), output_hidden_states=True)
  _compare(pixels(model, x, output_hidden_states=True), out)


def test_automodel_equals_jax_on_a_sparse_video(exported, automodel):
  model, _ = exported
  x, idx = _sparse_video(1)
  with torch.no_grad():
    out = automodel(_to_torch(x), visible_indices=torch.from_numpy(idx), output_hidden_states=True)
    as_tuple = automodel(_to_torch(x), visible_indices=torch.from_numpy(idx), return_dict=False)
  assert out.last_hidden_state.shape[1] == 300
  _compare(pixels(model, x, output_hidden_states=True, visible_indices=idx), out)
  torch.testing.assert_close(as_tuple[0], out.last_hidden_state, rtol=0, atol=0)
  torch.testing.assert_close(as_tuple[1], out.pooler_output, rtol=0, atol=0)


def test_explicit_positions_under_both_spellings(exported, automodel):
  model, _ = exported
  rng = np.random.RandomState(2)
  n = 4 * 8 * 8
  pos = np.stack([rng.randint(0, 64, n), rng.randint(0, 16, n), rng.randint(0, 16, n)], -1)[None]
  x = rng.randn(1, 4, 112, 112, 3).astype(np.float32)
  ref = pixels(model, x, patch_positions=pos)['pooler_output']
  with torch.no_grad():
    for name in ('patch_positions', 'patch_postions'):  # the first release's spelling too
      out = automodel(_to_torch(x), **{name: torch.from_numpy(pos).long()})
      assert _rel(ref, out.pooler_output.numpy()) <= TOL, name
    with pytest.raises(ValueError, match='no attention weights'):
      automodel(_to_torch(x), output_attentions=True)


def test_bad_config_is_refused_naming_the_field():
  config = hf_modeling.with_auto_map(hf.hf_config(TINY))
  config['hidden_act'] = 'gelu_pytorch_tanh'
  from ove_jax.convert.configuration_onevision_encoder import OneVisionEncoderConfig

  with pytest.raises(ValueError, match="hidden_act 'gelu_pytorch_tanh'"):
    OneVisionEncoderConfig(**config)


# ------------------------------------------------------------------------------------------------
# Sharded exports
# ------------------------------------------------------------------------------------------------


def test_sharded_export_round_trips_through_every_loader(exported, automodel, tmp_path):
  model, single = exported
  directory = str(tmp_path / 'sharded')
  convert.save_pytorch(model, directory, max_shard_size='200KB')
  names = sorted(os.listdir(directory))
  shards = [n for n in names if n.startswith('model-') and n.endswith('.safetensors')]
  assert len(shards) >= 3 and 'model.safetensors' not in names
  with open(os.path.join(directory, 'model.safetensors.index.json')) as f:
    index = json.load(f)
  assert set(index['weight_map'].values()) == set(shards)
  assert all(os.path.getsize(os.path.join(directory, n)) < 400_000 for n in shards)
  reference = convert.read_safetensors(os.path.join(single, 'model.safetensors'))
  assert index['metadata']['total_size'] == sum(v.nbytes for v in reference.values())

  _, tensors = hf.read_directory(directory)  # what init.pytorch and load_pytorch read
  assert set(tensors) == set(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(tensors[key], value)
  back = convert.model_params(convert.load_pytorch(directory))
  for path, value in convert.model_params(model).items():
    np.testing.assert_array_equal(back[path], value)
  port = torch_model.load_pretrained(directory)
  for key, value in port.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), reference[key])
  sharded = transformers.AutoModel.from_pretrained(directory, trust_remote_code=True).eval()
  for key, value in sharded.state_dict().items():
    torch.testing.assert_close(value, automodel.state_dict()[key], rtol=0, atol=0)

  # Exporting again as one file leaves no stale shard or index to shadow or confuse it.
  convert.save_pytorch(model, directory)
  assert 'model.safetensors' in os.listdir(directory)
  stale = [n for n in os.listdir(directory) if n.startswith('model-') or n.endswith('.index.json')]
  assert not stale


def test_missing_shard_is_named(exported, tmp_path):
  model, _ = exported
  directory = str(tmp_path / 'sharded')
  convert.save_pytorch(model, directory, max_shard_size=200_000)
  os.remove(os.path.join(directory, hub.shard_name(1, len(hub.weight_files(directory)))))
  with pytest.raises(convert.CheckpointError, match=r"names shard\(s\) \['model-00002-of"):
    convert.load_pytorch(directory)
  with pytest.raises(FileNotFoundError, match=r"names shard\(s\) \['model-00002-of"):
    torch_model.load_pretrained(directory)


@pytest.mark.parametrize(
  'size, expected',
  [(123, 123), ('5GB', 5 * 10**9), ('200KB', 200_000), ('2GiB', 2 * 2**30), ('1.5MB', 1_500_000)],
)
def test_shard_sizes_parse(size, expected):
  assert hub.parse_size(size) == expected


def test_shard_plan_keeps_order_and_limit():
  sizes = {'a': 40, 'b': 40, 'c': 30, 'd': 200, 'e': 10}
  assert hub.plan_shards(sizes, 100) == [['a', 'b'], ['c'], ['d'], ['e']]
  with pytest.raises(ValueError, match='max_shard_size'):
    hub.parse_size('lots')


# ------------------------------------------------------------------------------------------------
# Hub ids: a populated local cache, offline
# ------------------------------------------------------------------------------------------------


def populate_cache(hf_home: str, repo_id: str, directory: str) -> str:
  """Lays `directory` out as huggingface_hub's cache keeps a downloaded repository (refs/main ->
  a commit, snapshots/<commit>/files); returns the commit."""
  commit = hashlib.sha1(repo_id.encode()).hexdigest()
  repo = os.path.join(hf_home, 'hub', 'models--' + repo_id.replace('/', '--'))
  shutil.copytree(directory, os.path.join(repo, 'snapshots', commit))
  os.makedirs(os.path.join(repo, 'refs'))
  with open(os.path.join(repo, 'refs', 'main'), 'w') as f:
    f.write(commit)
  return commit


_OFFLINE_SCRIPT = """
import json, sys
import numpy as np, torch, transformers
from ove_jax import checkpoint, convert
from ove_jax.convert import torch_model
x = torch.from_numpy(np.load(sys.argv[1]))
out = {}
with torch.no_grad():
  auto = transformers.AutoModel.from_pretrained('ove-test/tiny', trust_remote_code=True).eval()
  out['auto'] = auto(x).pooler_output.numpy().tolist()
  out['port'] = torch_model.load_pretrained('ove-test/tiny')(x)['pooler_output'].numpy().tolist()
jax_model = convert.load_pytorch('ove-test/tiny')
jax_out = jax_model.forward_pixels(x.permute(0, 2, 3, 1).numpy())
out['jax'] = np.asarray(jax_out['pooler_output']).tolist()
from ove_jax import checkpoint  # what ove-probe / ove-cluster-labels load a teacher with
loaded = checkpoint.load_encoder('ove-test/tiny').model
out['load_encoder'] = np.asarray(
    loaded.forward_pixels(x.permute(0, 2, 3, 1).numpy())['pooler_output']).tolist()
try:
  convert.load_pytorch('ove-test/absent')
except convert.CheckpointError as e:
  out['error'] = str(e)
print(json.dumps(out))
"""


def test_hub_id_loads_from_the_local_cache_offline(exported, tmp_path):
  model, directory = exported
  hf_home = str(tmp_path / 'hf_home')
  populate_cache(hf_home, 'ove-test/tiny', directory)
  x = np.random.RandomState(3).randn(1, 3, 112, 112).astype(np.float32)
  np.save(tmp_path / 'x.npy', x)
  env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
  env.pop('HF_HUB_CACHE', None)
  proc = subprocess.run(
    [sys.executable, '-c', _OFFLINE_SCRIPT, str(tmp_path / 'x.npy')],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  ref = np.asarray(pixels(model, x.transpose(0, 2, 3, 1))['pooler_output'])
  for loader in ('auto', 'port', 'jax', 'load_encoder'):
    assert _rel(out[loader], ref) <= TOL, loader
  assert 'ove-test/absent' in out['error'] and 'HF_HUB_OFFLINE' in out['error']


def test_push_to_hub_uploads_the_export(exported):
  _, directory = exported
  calls = []

  class FakeApi:  # records what would be sent; the real HfApi needs network and a token
    def create_repo(self, repo_id, **kwargs):
      calls.append(('create_repo', repo_id, kwargs))

    def upload_folder(self, **kwargs):
      calls.append(('upload_folder', kwargs))
      return 'https://hub.example/commit/1'

  url = hf_modeling.push_to_hub(directory, 'me/ove-tiny', private=True, api=FakeApi())
  assert url == 'https://hub.example/commit/1'
  assert calls[0] == ('create_repo', 'me/ove-tiny', {'private': True, 'exist_ok': True})
  upload = calls[1][1]
  assert upload['folder_path'] == directory and upload['repo_id'] == 'me/ove-tiny'
  assert '*.safetensors' in upload['allow_patterns'] and '*.py' in upload['allow_patterns']
  assert not any(p.endswith(('.bin', '.pt')) for p in upload['allow_patterns'])


def test_a_push_that_fails_says_why_and_keeps_the_export(exported):
  _, directory = exported

  class OfflineApi:  # what requests raises without network
    def create_repo(self, repo_id, **kwargs):
      raise ConnectionError(f"Failed to resolve 'huggingface.co' ({repo_id})\nmore lines")

  with pytest.raises(hf_modeling.PushError) as caught:
    hf_modeling.push_to_hub(directory, 'me/ove-tiny', api=OfflineApi())
  message = str(caught.value)
  assert "ConnectionError: Failed to resolve 'huggingface.co' (me/ove-tiny))" in message
  assert f'the export in {directory} is kept' in message and 'HF_TOKEN' in message
  assert 'more lines' not in message
  assert os.path.isfile(os.path.join(directory, 'config.json'))


def test_a_file_given_for_a_checkpoint_folder_names_its_folder(exported, tmp_path):
  _, directory = exported
  weights = os.path.join(directory, 'model.safetensors')
  with pytest.raises(FileNotFoundError, match=r'a file, not a directory; give the folder that'):
    hub.resolve(weights)
  with pytest.raises(FileNotFoundError, match=rf'a file, not a directory.*\({directory}\)'):
    checkpoint.load_encoder(weights)
  assert 'a file, not a directory' in checkpoint.encoder_source_error(weights)


@pytest.mark.parametrize('damage', ['truncated', 'empty', 'garbage'])
def test_the_port_names_an_unreadable_weights_file(exported, tmp_path, damage):
  _, directory = exported
  broken = tmp_path / 'broken'
  shutil.copytree(directory, broken)
  weights = broken / 'model.safetensors'
  data = weights.read_bytes()
  weights.write_bytes(
    {'truncated': data[: len(data) // 2], 'empty': b'', 'garbage': b'x' * 64}[damage]
  )
  with pytest.raises(ValueError, match=rf'{weights}: unreadable safetensors \(.*\); export or'):
    torch_model.load_pretrained(str(broken))


def test_paths_that_are_not_hub_ids_never_reach_the_hub(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'runs').mkdir()
  assert hub.is_hub_id('lmms-lab-encoder/onevision-encoder-large')
  assert hub.is_hub_id('org/name@v1.0') and not hub.is_hub_id('./org/name')
  for text in (str(tmp_path / 'nowhere'), 'runs/export', '../x', 'a/b/c'):
    with pytest.raises(FileNotFoundError, match='no such directory'):
      hub.resolve(text)  # 'runs/export' is a path: its first folder exists here
  with pytest.raises(convert.CheckpointError, match='no such directory'):
    convert.load_pytorch('runs/export')
  assert hub.resolve(str(tmp_path / 'runs')) == str(tmp_path / 'runs')
