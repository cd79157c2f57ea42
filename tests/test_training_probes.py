"""Probes during training (`probe_every`, ove_jax/training_probes.py): probe/* metrics in
metrics.jsonl and in the TensorBoard events of a short training run, equal to a probe of the
saved encoder; config errors named."""

import glob
import os
import struct

import pytest

from data_pipeline import builtin
from ove_jax import checkpoint, evaluators, train, training_probes
from ove_jax import config as config_lib
from ove_jax import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, 'experiments', 'demo_cpu.py')
TEXTURE = 3  # the built-in clips' label slot of the object's texture (4 classes)


def tensorboard_scalars(folder):
  """{tag: {step: value}} of the scalar summaries in the TensorBoard event files of `folder`.

  An event file is TFRecord: per record a little-endian uint64 length, its masked CRC (uint32),
  the bytes of an `Event` protobuf, their masked CRC (uint32).
  """
  from tensorboardX.proto import event_pb2

  scalars = {}
  for path in sorted(glob.glob(os.path.join(folder, 'events.out.tfevents.*'))):
    data = open(path, 'rb').read()
    position = 0
    while position < len(data):
      (length,) = struct.unpack('<Q', data[position : position + 8])
      event = event_pb2.Event.FromString(data[position + 12 : position + 12 + length])
      position += 12 + length + 4
      for value in event.summary.value:
        if value.HasField('simple_value'):
          scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    assert position == len(data), path
  return scalars


def probe_config(builtin_root, heldout, **changes):
  overrides = [
    'probe_every=2',
    f'probe.source={heldout}',
    f'probe.label={TEXTURE}',
    'log_every=1',
    "metrics.writers=('jsonl','tensorboard')",
  ]
  overrides += [f'{k}={v}' for k, v in changes.items()]
  return config_lib.load(f'{DEMO}:smoke,workers=0,steps=4,data_root={builtin_root}', overrides)


@pytest.fixture(scope='module')
def heldout(tmp_path_factory):
  """Records of 12 built-in clips that the smoke run does not train on (another data seed)."""
  root = str(tmp_path_factory.mktemp('heldout'))
  made = builtin.ensure(root, clips=12, images=1, budget=512, seed=1000, progress=False)
  return made['video_source']


def test_probe_every_logs_probe_metrics_to_jsonl_and_tensorboard(tmp_path, builtin_root, heldout):
  workdir = str(tmp_path / 'run')
  config = probe_config(builtin_root, heldout)
  train.train(config, workdir)

  lines = {m['step']: m for m in metrics_lib.read_metrics(workdir)}
  assert sorted(lines) == [1, 2, 3, 4]
  keys = ('probe/knn_top1', 'probe/linear_top1')
  for step in (2, 4):
    for key in keys:
      assert 0.0 <= lines[step][key] <= 1.0, (step, lines[step])
    assert lines[step]['probe/seconds'] > 0
  for step in (1, 3):
    assert not any(k.startswith('probe/') for k in lines[step]), lines[step]

  # The TensorBoard events carry the same values at the same steps.
  scalars = tensorboard_scalars(os.path.join(workdir, metrics_lib.TENSORBOARD_DIR))
  for key in (*keys, 'probe/seconds'):
    assert sorted(scalars[key]) == [2, 4], (key, scalars.get(key))
    for step in (2, 4):
      assert scalars[key][step] == pytest.approx(lines[step][key], rel=1e-6)
  assert sorted(scalars['loss']) == [1, 2, 3, 4]

  # The step-4 probe is the probe of the saved step-4 encoder (features of the run's params).
  p = config.probe
  train_samples, test_samples = training_probes.probe_samples(
    p.source, TEXTURE, p.mode, p.num_frames, p.test_fraction, p.max_records, config.seed
  )
  assert len(train_samples) + len(test_samples) == 12
  assert len(set(s['label'] for s in train_samples)) > 1
  loaded = checkpoint.load_encoder(workdir)
  assert loaded.step == 4
  again = evaluators.evaluate(
    loaded.model, train_samples, test_samples, probes=('knn', 'linear'), seeds=(config.seed,)
  )
  for probe in ('knn', 'linear'):
    assert again[probe]['top1'] == pytest.approx(lines[4][f'probe/{probe}_top1'], abs=1e-9)


@pytest.mark.parametrize(
  'changes, message',
  [
    ({'probe.source': ''}, 'probe_every=2 needs probe.source'),
    ({'probe_every': 3}, 'probe_every=3 must be a multiple of log_every=2'),
    ({'probe.probes': "('knn','svm')"}, 'probe.probes'),
    ({'probe.mode': 'collage'}, "probe.mode='collage'"),
    ({'probe.test_fraction': 1.0}, 'probe.test_fraction=1.0'),
    ({'probe_every': -1}, 'probe_every'),
  ],
)
def test_probe_config_errors_name_the_key(builtin_root, changes, message):
  overrides = ['probe_every=2', 'probe.source=/nowhere/*', 'log_every=2']
  overrides += [f'{k}={v}' for k, v in changes.items()]
  with pytest.raises(config_lib.ConfigError, match=message.replace('(', r'\(')):
    config_lib.load(f'{DEMO}:smoke,workers=0,data_root={builtin_root}', overrides)


def test_probe_source_without_records_is_a_named_error(tmp_path):
  with pytest.raises(config_lib.ConfigError, match='probe.source='):
    training_probes.probe_samples(str(tmp_path / 'none-*'), 0, 'codec', 0, 0.3, 10, 0)


def test_probe_source_is_a_glob_or_a_precompute_folder_checked_before_work(tmp_path, heldout):
  from ove_jax import probes

  files = probes.record_files(heldout)
  folder = os.path.dirname(files[0])
  assert probes.record_files(folder) == files  # the precompute output folder
  # README's 'HELDOUT/*': the plan, summary, failure and progress files beside the shards skipped.
  assert probes.record_files(os.path.join(folder, '*')) == files
  (tmp_path / 'a.json').write_text('{}')
  with pytest.raises(
    probes.ProbeError, match=r'none of the 1 file\(s\) it matches is an ArrayRecord'
  ):
    probes.record_files(str(tmp_path / '*.json'))
  # ove-train names a source without records before built-in data is made or anything compiles.
  config = probe_config(str(tmp_path / 'never_made'), str(tmp_path / 'none-*'))
  with pytest.raises(config_lib.ConfigError, match=r"^probe.source='.*none-\*': '.*': no file"):
    train.train(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'never_made') and not os.path.exists(tmp_path / 'run')


def test_probes_are_off_by_default():
  config = config_lib.defaults()
  assert config.probe_every == 0
  assert not training_probes.due(config, 100)
  config.probe_every = 50
  assert training_probes.due(config, 100) and not training_probes.due(config, 75)
