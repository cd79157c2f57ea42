"""Exports that cannot be mistaken for something else: a re-export cut short over an earlier one
is refused by every loader (export ids), `--out` never nests with a training run, push flags are
checked before any conversion, and loaders say what a folder is when it is no export."""

import json
import os
import re

import numpy as np
import pytest
from transformers import AutoModel

from ove_jax import checkpoint, convert
from ove_jax.convert import hf, hf_modeling, hub, torch_model
from ove_jax.models import EncoderConfig, create_encoder
from ove_jax_tools import convert_checkpoint

TINY = EncoderConfig.preset('tiny')
SHARDS = '200KB'  # the tiny encoder in float32 (about 0.7 MB) in 4 or more shards


@pytest.fixture(scope='module')
def models():
  return {seed: create_encoder(TINY, seed=seed) for seed in (1, 2)}


def assert_params_of(directory, model):
  got = convert.model_params(convert.load_pytorch(directory))
  for path, value in convert.model_params(model).items():
    np.testing.assert_array_equal(got[path], value, err_msg=str(path))


def ids_in(directory):
  """The export id of every file that carries one (None for a file without)."""
  names = sorted(os.listdir(directory))
  ids = {
    n: hub.safetensors_metadata(os.path.join(directory, n)).get(hub.EXPORT_ID)
    for n in names
    if n.endswith('.safetensors')
  }
  for name in ('config.json', hub.WEIGHTS_INDEX_NAME):
    if name in names:
      with open(os.path.join(directory, name)) as f:
        found = json.load(f)
      ids[name] = (found.get('metadata', {}) if name != 'config.json' else found).get(hub.EXPORT_ID)
  return ids


def loader_errors(directory, tmp_path, capsys):
  """The message of each of our loaders on `directory` (every one must refuse it)."""
  errors = {}
  for name, load in (
    ('load_pytorch', lambda: convert.load_pytorch(directory)),
    ('read_directory (init.pytorch)', lambda: hf.read_directory(directory)),
    ('load_encoder', lambda: checkpoint.load_encoder(directory)),
    ('torch_model.load_pretrained', lambda: torch_model.load_pretrained(directory)),
    # transformers' own loader, through the export's remote code (LLaVA-style users' path).
    ('AutoModel', lambda: AutoModel.from_pretrained(directory, trust_remote_code=True)),
  ):
    with pytest.raises(ValueError) as e:
      load()
    errors[name] = str(e.value)
  for name, argv in (
    ('verify', ['verify', '--hf', directory, '--resolution', '224']),
    ('from-hf', ['from-hf', '--hf', directory, '--out', str(tmp_path / 'params')]),
  ):
    assert convert_checkpoint.main(argv) == 2, name
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    errors[name] = err
  assert not os.path.exists(tmp_path / 'params')
  return errors


class Killed(Exception):
  """Stands for the SIGKILL of a re-export (raised from inside the writer)."""


def kill_at(monkeypatch, module, name, after=0):
  """Makes module.name raise Killed on its call number `after` + 1 (the calls before run)."""
  real, calls = getattr(module, name), []

  def cut(*args, **kwargs):
    calls.append(1)
    if len(calls) > after:
      raise Killed(name)
    return real(*args, **kwargs)

  monkeypatch.setattr(module, name, cut)


@pytest.mark.parametrize(
  'first, second, killed',
  [
    (SHARDS, SHARDS, ('write_safetensors', 2)),  # new shards 1-2, old 3-n and the old index
    ('5GB', SHARDS, ('write_remote_code', 0)),  # new shards and index, the old config.json
    ('5GB', '5GB', ('write_remote_code', 0)),  # a new model.safetensors, the old config.json
    (SHARDS, '5GB', ('write_remote_code', 0)),  # a new model.safetensors beside the old index
  ],
)
def test_a_reexport_cut_short_is_refused_by_every_loader(
  models, tmp_path, monkeypatch, capsys, first, second, killed
):
  directory = str(tmp_path / 'export')
  convert.save_pytorch(models[1], directory, max_shard_size=first)
  before = ids_in(directory)
  assert len(set(before.values())) == 1 and None not in before.values(), before
  module = hf if killed[0] == 'write_safetensors' else hf_modeling
  with monkeypatch.context() as patch:
    kill_at(patch, module, *killed)
    with pytest.raises(Killed):
      convert.save_pytorch(models[2], directory, max_shard_size=second)
  # What a SIGKILL leaves besides: a weights file half-written under its temporary name.
  leftover = os.path.join(directory, hub.shard_name(2, 9) + '.tmp-123-abcdef12')
  with open(leftover, 'wb') as f:
    f.write(b'half')
  assert len(set(ids_in(directory).values())) == 2, ids_in(directory)

  for name, message in loader_errors(directory, tmp_path, capsys).items():
    assert f'{directory}: its files come from different exports (' in message, (name, message)
    assert f'Export again into {directory}' in message, (name, message)

  # An uninterrupted re-export replaces every file and removes the leftover.
  convert.save_pytorch(models[2], directory, max_shard_size=second)
  assert not os.path.exists(leftover)
  assert len(set(ids_in(directory).values())) == 1
  assert_params_of(directory, models[2])
  torch_model.load_pretrained(directory)
  assert convert_checkpoint.main(['verify', '--hf', directory, '--resolution', '224']) == 0


def test_automodel_still_loads_what_transformers_saves(models, tmp_path):
  """The export-id check runs where transformers reads our safetensors only: a folder that
  transformers itself saved as pytorch_model.bin (config.json keeping the export's id) loads."""
  directory = str(tmp_path / 'export')
  convert.save_pytorch(models[1], directory)
  model = AutoModel.from_pretrained(directory, trust_remote_code=True)
  saved = str(tmp_path / 'saved_bin')
  model.save_pretrained(saved, safe_serialization=False)
  assert os.path.exists(os.path.join(saved, 'pytorch_model.bin'))
  again = AutoModel.from_pretrained(saved, trust_remote_code=True)
  for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
    assert a.equal(b), name


def test_the_same_export_gives_the_same_files_and_another_export_another_id(models, tmp_path):
  a, b, c = (str(tmp_path / n) for n in 'abc')
  convert.save_pytorch(models[1], a, max_shard_size=SHARDS)
  convert.save_pytorch(models[1], b, max_shard_size=SHARDS)
  for name in os.listdir(a):
    with open(os.path.join(a, name), 'rb') as f1, open(os.path.join(b, name), 'rb') as f2:
      assert f1.read() == f2.read(), name
  convert.save_pytorch(models[2], c, max_shard_size=SHARDS)
  assert set(ids_in(a).values()).isdisjoint(ids_in(c).values())
  convert.save_pytorch(models[1], c, max_shard_size=SHARDS, dtype='bfloat16')
  assert set(ids_in(a).values()).isdisjoint(ids_in(c).values())


def test_exports_without_ids_load(models, tmp_path):
  # The release's own files carry no ids; transformers' save_pretrained writes weights and an
  # index without them, and keeps config.json's. This copy is the latter.
  directory = str(tmp_path / 'release')
  convert.save_pytorch(models[1], directory, max_shard_size=SHARDS)
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if name.endswith('.safetensors'):
      hf.write_safetensors(path, hf.read_safetensors(path))
    elif name == hub.WEIGHTS_INDEX_NAME:
      with open(path) as f:
        found = json.load(f)
      del found['metadata'][hub.EXPORT_ID]
      with open(path, 'w') as f:
        json.dump(found, f)
  ids = ids_in(directory)
  assert ids.pop('config.json') and set(ids.values()) == {None}, ids
  assert_params_of(directory, models[1])
  torch_model.load_pretrained(directory)
  ported = str(tmp_path / 'port')  # single file, written by the `safetensors` library
  torch_model.save_pretrained(torch_model.load_pretrained(directory), ported)
  assert_params_of(ported, models[1])


# ------------------------------------------------------------------------------------------------
# --out and a training run; push flags
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path, monkeypatch):
  """A training workdir as the trainer leaves it (config.json, checkpoints/<step>)."""
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'run' / 'checkpoints' / '2').mkdir(parents=True)
  (tmp_path / 'run' / 'config.json').write_text('{"training": true}')
  return tmp_path / 'run'


def contents(folder):
  return sorted(str(p.relative_to(folder)) for p in folder.rglob('*'))


@pytest.mark.parametrize(
  'argv, out, where',
  [
    (['to-hf', '--preset', 'tiny'], 'run', 'is'),
    (['to-hf', '--preset', 'tiny'], 'run/checkpoints', 'lies inside'),
    (['to-hf', '--params', 'nowhere'], 'run/checkpoints/2/hf', 'lies inside'),
    (['to-hf', '--preset', 'tiny'], '.', 'contains'),
    (['from-hf', '--hf', 'nowhere'], 'run', 'is'),
    (['from-hf', '--hf', 'nowhere'], 'run/p', 'lies inside'),
    (['from-train', '--workdir', 'nowhere'], 'run', 'is'),  # another run than --workdir's
  ],
)
def test_every_writer_refuses_an_out_that_nests_with_a_training_run(run, capsys, argv, out, where):
  # Refused before any work: a source that does not exist is not even looked at.
  before = contents(run)
  assert convert_checkpoint.main([*argv, '--out', out]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1, err
  assert f'error: --out {out} {where} the training run {run}' in err, err
  assert f'give a folder outside the run, e.g. --out {run}_hf' in err, err
  assert contents(run) == before and (run / 'config.json').read_text() == '{"training": true}'


def test_outs_beside_a_run_are_written(run, capsys):
  assert convert_checkpoint.run_at('run_hf') is None
  assert convert_checkpoint.run_at('other/checkpoints') is None
  assert convert_checkpoint.main(['to-hf', '--preset', 'tiny', '--out', 'run_hf']) == 0
  assert convert_checkpoint.main(['from-hf', '--hf', 'run_hf', '--out', 'run_p']) == 0
  assert 'error' not in capsys.readouterr().err


@pytest.mark.parametrize(
  'flags, message',
  [
    (
      ['--push-to-hub', 'me/a/b'],
      'error: --push-to-hub me/a/b: not a hub repository id (HFValidationError: Repo id must be',
    ),
    (['--push-to-hub', '../x'], 'error: --push-to-hub ../x: not a hub repository id ('),
    (['--private'], 'error: --private applies to --push-to-hub only; add --push-to-hub'),
  ],
)
def test_push_flags_are_checked_before_converting(tmp_path, capsys, flags, message):
  out = tmp_path / 'out'
  assert convert_checkpoint.main(['to-hf', '--preset', 'tiny', '--out', str(out), *flags]) == 2
  captured = capsys.readouterr()
  assert captured.err.startswith(message), captured.err
  assert len(captured.err.strip().splitlines()) == 1, captured.err
  assert not out.exists() and 'round trip' not in captured.out


def test_push_to_hub_refuses_a_bad_id_before_reaching_the_hub(models, tmp_path):
  directory = str(tmp_path / 'export')
  convert.save_pytorch(models[1], directory)

  class NoHub:
    def __getattr__(self, name):
      raise AssertionError(f'the hub was reached ({name})')

  with pytest.raises(ValueError, match=re.escape('me/a/b: not a hub repository id (')):
    hf_modeling.push_to_hub(directory, 'me/a/b', api=NoHub())


# ------------------------------------------------------------------------------------------------
# What a folder that is no export is, in the loaders' words
# ------------------------------------------------------------------------------------------------


def test_loaders_say_what_a_folder_is_when_it_is_no_export(run, tmp_path, models):
  missing = str(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match=f'{re.escape(missing)}: no such directory'):
    torch_model.load_pretrained(missing)
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'readme.txt').write_text('not an export')
  want = f'{tmp_path / "notes"}: config.json is missing; not a release-format export'
  with pytest.raises(FileNotFoundError, match=re.escape(want)):
    torch_model.load_pretrained(str(tmp_path / 'notes'))
  with pytest.raises(convert.CheckpointError, match=re.escape(want)):
    hf.read_directory(str(tmp_path / 'notes'))

  for given in (run, run / 'checkpoints', run / 'checkpoints' / '2'):
    want = (
      f'{given}: a training run ({run}), not a release-format export; export its encoder with '
      f'`ove-convert from-train --workdir {run} --out {run}_hf`, or start a run from its weights '
      f'with init.checkpoint={run}'
    )
    with pytest.raises(FileNotFoundError) as e:
      torch_model.load_pretrained(str(given))
    assert str(e.value) == want
    with pytest.raises(convert.CheckpointError) as e:  # what init.pytorch reads
      hf.read_directory(str(given))
    assert str(e.value) == want

  params = str(tmp_path / 'params')
  checkpoint.save_params(params, TINY, convert.model_params(models[1]))
  want = f'{params}: an ove_jax parameter directory (encoder_config.json, params/), not a '
  with pytest.raises(FileNotFoundError, match=re.escape(want)):
    torch_model.load_pretrained(params)
  with pytest.raises(convert.CheckpointError, match=re.escape(want + 'release-format export; ')):
    hf.read_directory(params)


def test_dtypes_of_every_export_command_are_the_stored_ones(capsys):
  assert set(convert_checkpoint.EXPORT_DTYPES) == set(hf.STORE_DTYPES)
  for command in ('to-hf', 'from-train'):
    with pytest.raises(SystemExit):
      convert_checkpoint.main([command, '--help'])
    assert '{float32,bfloat16,float16}' in capsys.readouterr().out, command
