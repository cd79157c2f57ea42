"""Conversion to and from the release's format: keys, layouts, round trips, bad directories."""

import json
import os
import re
import shutil
import tempfile
import time

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from jax.sharding import AxisType

from data_pipeline import paths
from ove_jax import checkpoint, convert
from ove_jax.convert import hf_modeling, hub, torch_model
from ove_jax.models import EncoderConfig, create_encoder
from ove_jax_tools import convert_checkpoint

TINY = EncoderConfig.preset('tiny')


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  model = create_encoder(TINY, seed=7)
  directory = str(tmp_path_factory.mktemp('hf'))
  convert.save_pytorch(model, directory)
  return model, directory


def _copy(directory, tmp_path):
  target = str(tmp_path / 'copy')
  shutil.copytree(directory, target)
  return target


def test_keys_shapes_and_config_match_release(exported):
  _, directory = exported
  tensors = safetensors.numpy.load_file(os.path.join(directory, 'model.safetensors'))
  c, i = TINY.width, TINY.mlp_dim
  assert tensors['embeddings.patch_embedding.weight'].shape == (c, 3, 14, 14)
  assert tensors['encoder.layers.1.self_attn.out_proj.weight'].shape == (c, c)
  assert tensors['encoder.layers.0.mlp.fc1.weight'].shape == (i, c)
  assert tensors['head.attention.in_proj_weight'].shape == (3 * c, c)
  assert tensors['head.probe'].shape == (1, 1, c)
  assert 'head.norm.bias' not in tensors and 'embeddings.patch_embedding.bias' not in tensors
  assert len(tensors) == 3 + TINY.depth * 16 + 2 + 1 + 4 + 1 + 4
  with open(os.path.join(directory, 'config.json')) as f:
    cfg = json.load(f)
  assert cfg['model_type'] == 'onevision_encoder'
  assert cfg['architectures'] == ['OneVisionEncoderModel']
  for key, value in {
    'hidden_size': c,
    'intermediate_size': i,
    'num_hidden_layers': 2,
    'num_attention_heads': 2,
    'patch_size': 14,
    'rope_theta': 10000.0,
    'rope_temporal_size': 64,
    'use_head': True,
    'layer_norm_eps': 1e-6,
    'hidden_act': 'gelu',
    'layer_norm_type': 'layer_norm',
  }.items():
    assert cfg[key] == value, key
  with open(os.path.join(directory, 'preprocessor_config.json')) as f:
    pre = json.load(f)
  assert pre['image_mean'] == [0.48145466, 0.4578275, 0.40821073]
  assert pre['crop_size'] == {'height': 448, 'width': 448} and pre['resample'] == 3


def test_patch_embedding_layout_is_conv_over_channel_row_column(exported):
  model, directory = exported
  weight = safetensors.numpy.load_file(os.path.join(directory, 'model.safetensors'))[
    'embeddings.patch_embedding.weight'
  ]
  kernel = np.asarray(model.patch_embed.kernel[...])  # [(row, col, channel), C]
  rng = np.random.RandomState(0)
  patch = rng.randn(14, 14, 3).astype(np.float32)
  ours = patch.reshape(-1) @ kernel
  conv = np.einsum('ocrs,rsc->o', weight, patch)
  np.testing.assert_allclose(ours, conv, rtol=1e-5, atol=1e-5)


def test_round_trip_is_bit_exact(exported, tmp_path):
  model, directory = exported
  back = convert.load_pytorch(directory)
  a, b = convert.model_params(model), convert.model_params(back)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  again = str(tmp_path / 'again')
  convert.save_pytorch(back, again)
  with (
    open(os.path.join(directory, 'model.safetensors'), 'rb') as f1,
    open(os.path.join(again, 'model.safetensors'), 'rb') as f2,
  ):
    assert f1.read() == f2.read()


def test_port_round_trip_and_safetensors_interop(exported, tmp_path):
  # The port's own save (the `safetensors` library) loads back into JAX bit-exactly.
  model, directory = exported
  port = torch_model.load_pretrained(directory)
  torch_dir = str(tmp_path / 'from_torch')
  torch_model.save_pretrained(port, torch_dir)
  back = convert.model_params(convert.load_pytorch(torch_dir))
  for k, v in convert.model_params(model).items():
    assert np.array_equal(v, back[k]), k


def test_bfloat16_export(exported, tmp_path):
  model, _ = exported
  directory = str(tmp_path / 'bf16')
  convert.save_pytorch(model, directory, dtype='bfloat16')
  raw = convert.read_safetensors(os.path.join(directory, 'model.safetensors'))
  assert raw['head.probe'].dtype == ml_dtypes.bfloat16
  port = torch_model.load_pretrained(directory)  # the torch side reads our bf16 file too
  assert port.head.probe.dtype.is_floating_point
  back = convert.model_params(convert.load_pytorch(directory))
  ref = convert.model_params(model)
  for k in ref:
    np.testing.assert_array_equal(back[k], ref[k].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_load_onto_a_mesh_shards_parameters(exported):
  _, directory = exported
  mesh = jax.make_mesh((1, 2, 4), ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    model = convert.load_pytorch(directory)
  kernel = model.blocks[0].mlp.fc1.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')


# ------------------------------------------------------------------------------------------------
# Bad directories: the error names the file, the key and the expected shape
# ------------------------------------------------------------------------------------------------


def _rewrite(directory, edit):
  path = os.path.join(directory, 'model.safetensors')
  tensors = convert.read_safetensors(path)
  edit(tensors)
  convert.write_safetensors(path, tensors)


@pytest.mark.parametrize(
  'edit, message',
  [
    (
      lambda t: t.pop('encoder.layers.1.mlp.fc2.bias'),
      r'key encoder\.layers\.1\.mlp\.fc2\.bias is missing \(expected shape \(128,\)\)',
    ),
    (
      lambda t: t.update({'head.attention.in_proj_weight': np.zeros((128, 128), np.float32)}),
      r'head\.attention\.in_proj_weight has shape \(128, 128\), expected \(384, 128\)',
    ),
    (
      lambda t: t.update({'vision_model.extra': np.zeros(3, np.float32)}),
      r'unexpected key vision_model\.extra',
    ),
  ],
  ids=['missing_key', 'wrong_shape', 'unexpected_key'],
)
def test_bad_tensors_are_named(exported, tmp_path, edit, message):
  d = _copy(exported[1], tmp_path)
  _rewrite(d, edit)
  with pytest.raises(convert.CheckpointError, match=message):
    convert.load_pytorch(d)


def test_not_an_ov_encoder_config(exported, tmp_path):
  d = _copy(exported[1], tmp_path)
  with open(os.path.join(d, 'config.json'), 'w') as f:
    json.dump({'model_type': 'siglip_vision_model', 'hidden_size': 128}, f)
  with pytest.raises(convert.CheckpointError, match="model_type is 'siglip_vision_model'"):
    convert.load_pytorch(d)


def test_missing_files_and_pickles_are_refused(exported, tmp_path):
  d = _copy(exported[1], tmp_path)
  os.remove(os.path.join(d, 'model.safetensors'))
  with open(os.path.join(d, 'pytorch_model.bin'), 'wb') as f:
    f.write(b'not loaded')
  with pytest.raises(convert.CheckpointError, match='model.safetensors is missing.*never loaded'):
    convert.load_pytorch(d)
  os.remove(os.path.join(d, 'pytorch_model.bin'))
  message = f'{d}: model.safetensors is missing (and there is no model.safetensors.index.json of '
  with pytest.raises(convert.CheckpointError, match=re.escape(message + 'shards)')):
    convert.load_pytorch(d)  # the words of the PyTorch port (hub.weight_files) and docs/storage.md
  with pytest.raises(FileNotFoundError, match=re.escape(message + 'shards)')):
    torch_model.load_pretrained(d)
  with pytest.raises(convert.CheckpointError, match='no such directory'):
    convert.load_pytorch(str(tmp_path / 'nowhere'))


def test_truncated_weights_are_reported(exported, tmp_path):
  d = _copy(exported[1], tmp_path)
  path = os.path.join(d, 'model.safetensors')
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(convert.CheckpointError, match='truncated'):
    convert.load_pytorch(d)


# ------------------------------------------------------------------------------------------------
# The CLI, both directions
# ------------------------------------------------------------------------------------------------


def test_cli_both_directions_and_verify(tmp_path, capsys):
  hf, params, hf2 = (str(tmp_path / n) for n in ('hf', 'params', 'hf2'))
  assert convert_checkpoint.main(['to-hf', '--preset', 'tiny', '--seed', '3', '--out', hf]) == 0
  assert convert_checkpoint.main(['from-hf', '--hf', hf, '--out', params]) == 0
  cfg, flat = checkpoint.load_params(params)
  assert cfg == TINY and len(flat) == 51
  assert convert_checkpoint.main(['to-hf', '--params', params, '--out', hf2]) == 0
  with (
    open(os.path.join(hf, 'model.safetensors'), 'rb') as f1,
    open(os.path.join(hf2, 'model.safetensors'), 'rb') as f2,
  ):
    assert f1.read() == f2.read()
  assert convert_checkpoint.main(['verify', '--hf', hf, '--resolution', '224']) == 0
  assert '"ok": true' in capsys.readouterr().out


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
  assert (
    convert_checkpoint.main(['from-hf', '--hf', str(tmp_path), '--out', str(tmp_path / 'o')]) == 2
  )
  assert 'config.json is missing' in capsys.readouterr().err
  taken = tmp_path / 'a_file'
  taken.write_text('')
  assert convert_checkpoint.main(['to-hf', '--preset', 'tiny', '--out', str(taken)]) == 2
  assert f'--out {taken}: a file, not a folder' in capsys.readouterr().err
  hf = str(tmp_path / 'hf')
  assert convert_checkpoint.main(['to-hf', '--preset', 'tiny', '--out', hf]) == 0
  with open(os.path.join(hf, 'config.json'), 'w') as f:
    f.write('{"model_type": ')
  with pytest.raises(ValueError, match=r'hf/config.json: not JSON'):
    torch_model.load_pretrained(hf)


# ------------------------------------------------------------------------------------------------
# A training checkpoint's encoder -> release format (from-train)
# ------------------------------------------------------------------------------------------------


def test_cli_from_train_exports_a_training_checkpoint(two_step_run, tmp_path, capsys):
  # The demo's smoke run for 2 steps (tests/conftest.py), then its encoder through the CLI; the
  # PyTorch port on the export must compute what our encoder computes from the checkpoint's
  # parameters.
  workdir, train_seconds = two_step_run
  out = str(tmp_path / 'hf')
  start = time.perf_counter()
  assert (
    convert_checkpoint.main(['from-train', '--workdir', str(workdir), '--step', '2', '--out', out])
    == 0
  )
  export_seconds = time.perf_counter() - start
  assert 'step 2' in capsys.readouterr().out
  assert (
    convert_checkpoint.main(['from-train', '--workdir', str(workdir), '--step', '7', '--out', out])
    == 2
  )
  err = capsys.readouterr().err
  assert 'no checkpoint of step 7' in err and 'has steps [2]' in err

  bf16 = str(tmp_path / 'hf_bf16')
  assert (
    convert_checkpoint.main(
      ['from-train', '--workdir', str(workdir), '--out', bf16, '--dtype', 'bfloat16']
    )
    == 0
  )
  raw = convert.read_safetensors(os.path.join(bf16, 'model.safetensors'))
  assert raw['head.probe'].dtype == ml_dtypes.bfloat16

  params, meta, step = checkpoint.restore_params(str(workdir), subtree=('params',))
  assert step == 2 and set(params['heads']) == {'video', 'image'}
  cfg = checkpoint.encoder_config(meta['encoder_config'], 'meta')
  model = convert.model_from_params(cfg, checkpoint.flatten(params['encoder']))
  port = torch_model.load_pretrained(out).eval()

  rng = np.random.RandomState(0)
  patches = rng.randn(2, 48, 588).astype(np.float32)
  positions = np.stack(
    [rng.randint(0, 64, (2, 48)), rng.randint(0, 16, (2, 48)), rng.randint(0, 16, (2, 48))], -1
  ).astype(np.int32)
  ours = nnx.jit(lambda m, p, q, s: m(p, q, s, num_segments=1))(
    model, patches, positions, np.ones((2, 48), np.int32)
  )['pooled'][:, 0]
  with torch.no_grad():
    ref = port.forward_tokens(torch.from_numpy(patches), torch.from_numpy(positions))
  np.testing.assert_allclose(np.asarray(ours), ref['pooler_output'].numpy(), atol=1e-4, rtol=0)
  # The probe and the cluster-label tools take the same workdir as their encoder (a training
  # workdir holds a config.json too; it must not be mistaken for a release-format directory).
  from ove_jax_tools import cluster_labels, probe

  for encoder in (probe.load_encoder(str(workdir))[0], cluster_labels.load_teacher(str(workdir))):
    np.testing.assert_array_equal(
      np.asarray(encoder.blocks[0].mlp.fc1.kernel[...]),
      np.asarray(params['encoder']['blocks']['0']['mlp']['fc1']['kernel']),
    )
  print(f'from-train: training {train_seconds:.1f} s, export {export_seconds:.1f} s')


def test_export_converts_one_tensor_at_a_time_and_verifies_tensor_by_tensor(tmp_path, monkeypatch):
  # save_pytorch writes Deferred tensors: each is made when written and dropped before the next,
  # so an export never holds a second copy of the weights; verify_export reads one at a time too.
  import gc
  import weakref

  from ove_jax.convert import hf

  model = create_encoder(EncoderConfig.preset('tiny'), seed=0)
  alive, made = [], [0]
  original = hf._to_hf

  def spy(rule, params, dtype):
    gc.collect()
    assert not [r for r in alive if r() is not None], 'an earlier converted tensor is still alive'
    tensor = original(rule, params, dtype)
    if tensor.base is None and not any(tensor is params[p] for p in rule.paths):
      alive.append(weakref.ref(tensor))  # a converted copy (not the parameter itself)
    made[0] += 1
    return tensor

  monkeypatch.setattr(hf, '_to_hf', spy)
  convert.save_pytorch(model, str(tmp_path / 'out'))
  assert made[0] == len(hf.mapping(model.cfg))
  worst, count = convert.verify_export(model, str(tmp_path / 'out'))
  assert worst == 0.0 and count == len(convert.model_params(model))
  # a changed weight in the file is found
  path = str(tmp_path / 'out' / 'model.safetensors')
  tensors = convert.read_safetensors(path)
  tensors['layernorm_post.bias'] = tensors['layernorm_post.bias'] + 1.0
  convert.write_safetensors(path, tensors)
  assert convert.verify_export(model, str(tmp_path / 'out'))[0] == pytest.approx(1.0)
  # a tensor that comes out other than announced is refused before the file is kept
  bad = {'x': hf.Deferred((2, 3), np.dtype(np.float32), lambda: np.zeros((3, 2), np.float32))}
  with pytest.raises(ValueError, match='announced'):
    convert.write_safetensors(str(tmp_path / 'bad.safetensors'), bad)
  assert not os.path.exists(tmp_path / 'bad.safetensors')


def test_cli_writes_sharded_exports_and_checks_every_shard(tmp_path, capsys):
  out = str(tmp_path / 'sharded')
  assert (
    convert_checkpoint.main(
      ['to-hf', '--preset', 'tiny', '--out', out, '--max-shard-size', '200KB']
    )
    == 0
  )
  assert os.path.isfile(os.path.join(out, 'model.safetensors.index.json'))
  shards = sorted(f for f in os.listdir(out) if f.startswith('model-'))
  assert len(shards) > 1 and not os.path.exists(os.path.join(out, 'model.safetensors'))
  assert 'max |difference| over' in capsys.readouterr().out
  # a changed weight in one shard fails the check tool's own verification
  path = os.path.join(out, shards[0])
  tensors = convert.read_safetensors(path)
  key = sorted(tensors)[0]
  tensors[key] = tensors[key] + 1.0
  convert.write_safetensors(path, tensors, hub.safetensors_metadata(path))  # the export's id kept
  model = convert.load_pytorch(out)
  fresh = create_encoder(EncoderConfig.preset('tiny'), seed=0)
  assert convert.verify_export(fresh, out)[0] > 0.5
  assert convert.verify_export(model, out)[0] == 0.0


# ------------------------------------------------------------------------------------------------
# Where an export may go: not into its training run; a bucket checked first, stale weights gone
# ------------------------------------------------------------------------------------------------


def params_of(directory):
  return convert.model_params(convert.load_pytorch(directory))


def assert_params_of_seed(directory, seed):
  want = convert.model_params(create_encoder(TINY, seed=seed))
  got = params_of(directory)
  assert set(got) == set(want)
  for path, value in want.items():
    np.testing.assert_array_equal(got[path], value, err_msg=str(path))


def test_reexport_to_a_bucket_leaves_no_stale_weights(gcs, tmp_path, monkeypatch, capsys):
  # One file, then shards, then one file again into the same gs:// folder: each time only the
  # new export's weights are there (a stale model.safetensors is read before the shards).
  monkeypatch.chdir(tmp_path)
  url = paths.join(gcs, 'exports', 'E')
  to_hf = ['to-hf', '--preset', 'tiny', '--out', url, '--seed']
  assert convert_checkpoint.main([*to_hf, '1']) == 0
  assert 'model.safetensors' in paths.listdir(url)
  assert convert_checkpoint.main([*to_hf, '2', '--max-shard-size', '200KB']) == 0
  names = paths.listdir(url)
  shards = [n for n in names if n.startswith('model-')]
  assert 'model.safetensors' not in names and 'model.safetensors.index.json' in names, names
  assert len(shards) >= 3, names
  assert_params_of_seed(url, 2)
  assert convert_checkpoint.main([*to_hf, '3']) == 0
  names = paths.listdir(url)
  assert [n for n in names if n.endswith(('.safetensors', '.json')) and 'config' not in n] == [
    'model.safetensors'
  ], names
  assert hf_modeling.WRITE_CHECK not in names
  assert_params_of_seed(url, 3)
  assert capsys.readouterr().out.count(f'uploaded to {url}') == 3
  assert not os.path.exists(tmp_path / 'gs:')


@pytest.mark.parametrize(
  'workdir, out, where',
  [
    ('run', 'run', 'is'),
    ('run/checkpoints', 'run/', 'is'),
    ('run/checkpoints/10', 'run/checkpoints/export', 'lies inside'),
    ('link/checkpoints', 'run/export', 'lies inside'),  # a symbolic link to run
    ('run', '.', 'contains'),
    ('gs://bkt/run', 'gs://bkt/run/', 'is'),
    ('gs://bkt/run/checkpoints', 'gs://bkt/run/hf', 'lies inside'),
    ('gs://bkt/run/checkpoints/10', 'gs://bkt', 'contains'),
  ],
)
def test_from_train_refuses_an_out_that_nests_with_the_run(
  tmp_path, monkeypatch, capsys, workdir, out, where
):
  # Refused before anything is read (no checkpoint is needed, the bucket is never reached); the
  # run's config.json stays the training config.
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  (tmp_path / 'run' / 'config.json').write_text('{"training": true}')
  (tmp_path / 'link').symlink_to(tmp_path / 'run')
  assert convert_checkpoint.main(['from-train', '--workdir', workdir, '--out', out]) == 2
  err = capsys.readouterr().err
  run = workdir.split('/checkpoints')[0]
  run = run if '://' in run else str(tmp_path / 'run')
  assert len(err.strip().splitlines()) == 1, err
  assert f'error: --out {out} {where} the training run {run} (--workdir {workdir})' in err, err
  assert f'give a folder outside the run, e.g. --out {run}_hf' in err, err
  assert (tmp_path / 'run' / 'config.json').read_text() == '{"training": true}'
  assert sorted(os.listdir(tmp_path / 'run')) == ['checkpoints', 'config.json']


def test_outs_beside_a_run_are_not_taken_for_it(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for out, workdir in (
    ('run_hf', 'run'),
    ('run2', 'run/checkpoints'),
    ('other/checkpoints', 'run/checkpoints'),
    ('gs://bkt/run_hf', 'gs://bkt/run'),
    ('gs://bkt2/run', 'gs://bkt/run'),
  ):
    assert convert_checkpoint.run_overlap(out, workdir) is None, (out, workdir)


def test_an_unwritable_out_url_is_refused_before_converting(
  gcs, tmp_path, monkeypatch, capsys, fresh_object_store_clients
):
  # A bucket that does not exist (gs://) and missing credentials (s3://): one line, exit 2, and
  # nothing converted (no temporary export made).
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  for name in ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN', 'AWS_PROFILE'):
    monkeypatch.delenv(name, raising=False)
  for name in ('AWS_SHARED_CREDENTIALS_FILE', 'AWS_CONFIG_FILE'):
    monkeypatch.setenv(name, str(tmp_path / 'none'))
  monkeypatch.setenv('AWS_EC2_METADATA_DISABLED', 'true')  # no instance-metadata lookups
  missing = gcs + '-missing'
  for out, reason in (
    (f'{missing}/x', f'(no such bucket, or no access); check that the bucket {missing} exists'),
    ('s3://ove-no-credentials/x', 'NoCredentialsError'),
  ):
    assert convert_checkpoint.main(['to-hf', '--preset', 'tiny', '--out', out]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f'error: {out}: cannot write there (') and reason in captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert 'round trip check' not in captured.out and not os.listdir(tmp_path), captured


def test_a_failed_upload_keeps_the_checked_export(gcs, tmp_path, monkeypatch, capsys):
  # The bucket passes the check, then is gone by the upload (here: the check skipped and a bucket
  # that does not exist): exit 1, and the checked export stays in the folder the error names.
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  monkeypatch.setattr(hf_modeling, 'check_writable', lambda url: None)
  out = f'{gcs}-missing/x'
  assert convert_checkpoint.main(['to-hf', '--preset', 'tiny', '--seed', '4', '--out', out]) == 1
  captured = capsys.readouterr()
  (local,) = [str(p) for p in tmp_path.iterdir()]
  assert 'round trip check' in captured.out and 'uploaded' not in captured.out
  assert captured.err.startswith(f'error: uploading {local} to {out} failed (')
  assert f'the checked export in {local} is kept' in captured.err
  assert len(captured.err.strip().splitlines()) == 1, captured.err
  assert_params_of_seed(local, 4)
