"""README's first command runs end to end and reports what it checked."""
import json
import math
import os

import numpy as np

from ove_jax_tools import demo


def test_demo_runs_and_writes_summary(tmp_path):
  # The smoke variant of the experiment (8 clips / 16 images of built-in data, 8 held-out clips,
  # k = 8, 2-epoch probes) and 16 steps keep this near a minute; the default run is README's.
  assert demo.main(['--workdir', str(tmp_path), '--clips', '4', '--budget', '512', '--smoke',
                    '--train-steps', '16']) == 0
  with open(os.path.join(tmp_path, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['sharded_vs_single_max_abs_diff'] < 1e-4
  shares = summary['share_of_kept_patches_on_moving_objects']
  # Codec selection lands on the moving objects far more often than the baselines do.
  assert shares['codec'] > 3 * max(shares['uniform_frames'], shares['random_patches'])
  for name in ('png', 'gif'):
    assert os.path.getsize(summary['selection_pictures'][name]) > 1000

  # Pretraining ran, logged and checkpointed; the loss fell (else main() returns 1).
  assert summary['train_steps'] == 16
  assert math.isfinite(summary['train_loss_last'])
  assert summary['train_loss_last'] < summary['train_loss_first']
  assert 0.0 <= summary['train_input_wait_fraction'] <= 1.0
  assert summary['train_seconds'] > 0
  assert os.path.isfile(summary['metrics'])
  assert os.listdir(summary['tensorboard'])
  assert '16' in os.listdir(summary['checkpoints'])

  # Cluster labels from the oracle teacher, the student trained on them, the probes reported.
  assert summary['teacher'].startswith('oracle')
  assert summary['clusters']['video']['k'] == 8 and summary['clusters']['video']['N'] == 8
  labels = np.load(os.path.join(summary['cluster_labels'], 'video', 'labels.npy'))
  assert labels.shape == (8, 8) and labels.min() >= 0 and labels.max() < 8
  for key in ('pretrained', 'random_init', 'codec_inputs', 'uniform_inputs'):
    assert 0.0 <= summary[f'probe_top1_{key}'] <= 1.0
  assert summary['probe_top1_codec_inputs'] == summary['probe_top1_pretrained']
  assert set(summary['probes']) == {'pretrained', 'random_init'}
  assert summary['test_clips'] == 8 and summary['seconds'] > 0

  # The export is the trained encoder of the last checkpoint, and our PyTorch port matches it.
  assert summary['export_step'] == 16
  assert os.path.isfile(os.path.join(summary['export'], 'model.safetensors'))
  assert summary['torch_port_max_rel_diff'] < 1e-4
