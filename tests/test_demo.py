"""README's first command runs end to end and reports what it checked."""

import json
import math
import os

import numpy as np
import pytest

from ove_jax import demo as demo_stages
from ove_jax import demo_report
from ove_jax_tools import demo


def test_demo_runs_and_writes_summary(tmp_path, capsys):
  # The smoke variant of the experiment (8 clips / 16 images of built-in data, 8 held-out clips,
  # k = 8, 2-epoch probes) and 16 steps keep this near a minute; the default run is README's.
  assert (
    demo.main(
      [
        '--workdir',
        str(tmp_path),
        '--clips',
        '4',
        '--budget',
        '512',
        '--smoke',
        '--train-steps',
        '16',
      ]
    )
    == 0
  )
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
  # Pretrained on the release's mixed video modes, every mode at the same 512 tokens.
  assert summary['train_video_modes'] == {'codec': 0.5, 'uniform': 0.375, 'collage': 0.125}
  assert summary['train_video_frames'] == 2
  with open(os.path.join(os.path.dirname(summary['metrics']), 'config.json')) as f:
    video_head = json.load(f)['data']['heads']['video']
  assert video_head['video_modes'] == [0.5, 0.375, 0.125] and video_head['num_frames'] == 2

  # Cluster labels from the oracle teacher, the student trained on them, the probes reported.
  assert summary['teacher'].startswith('oracle')
  assert summary['clusters']['video']['k'] == 8 and summary['clusters']['video']['N'] == 8
  labels = np.load(os.path.join(summary['cluster_labels'], 'video', 'labels.npy'))
  assert labels.shape == (8, 8) and labels.min() >= 0 and labels.max() < 8
  for key in (
    'pretrained',
    'random_init',
    'codec_inputs',
    'uniform_inputs',
    'codec_inputs_random_init',
    'uniform_inputs_random_init',
  ):
    assert 0.0 <= summary[f'probe_top1_{key}'] <= 1.0
  assert summary['probe_top1_codec_inputs'] == summary['probe_top1_pretrained']
  assert summary['probe_top1_codec_inputs_random_init'] == summary['probe_top1_random_init']
  # Both encoders on both inputs: the random-init control of codec vs uniform frames.
  assert summary['probes'].keys() == {'pretrained', 'random_init'}
  for name in ('pretrained', 'random_init'):
    assert summary['probes'][name].keys() == {'codec', 'uniform'}
  assert (
    summary['probe_top1_uniform_inputs_random_init']
    == summary['probes']['random_init']['uniform']['linear']['top1']
  )
  assert summary['probe_seeds'] == [0] and summary['seed'] == 0
  assert summary['test_clips'] == 8 and summary['seconds'] > 0

  # The export is the trained encoder of the last checkpoint, and our PyTorch port matches it.
  assert summary['export_step'] == 16
  assert os.path.isfile(os.path.join(summary['export'], 'model.safetensors'))
  assert summary['torch_port_max_rel_diff'] < 1e-4

  # The demo's Grain batch is plain arrays: arrays in the workers' shared memory, held to the
  # end, would make Python warn of leaked shared_memory objects at exit.
  shards = sorted(
    os.path.join(summary['records'], f)
    for f in os.listdir(summary['records'])
    if '.array_record' in f
  )
  batch = demo_stages.pipeline_batch(shards, 512)
  assert {type(v) for v in batch.values()} == {np.ndarray}, {k: type(v) for k, v in batch.items()}

  # The table over runs: each run's value and mean ± std (two copies: std 0).
  table = demo_report.seed_table([summary, dict(summary, seed=1)])
  assert table[0] == '| figure | mean ± std | seed 0 | seed 1 |'
  codec = summary['probe_top1_codec_inputs']
  assert (
    f'| linear probe, pretrained, codec inputs | {codec:.3f} ± 0.000 | {codec:.3f} | {codec:.3f} |'
  ) in table
  uniform = summary['probe_top1_uniform_inputs_random_init']
  assert f'| linear probe, random init, uniform frames | {uniform:.3f} ± 0.000 |' in '\n'.join(
    table
  )
  capsys.readouterr()
  assert demo.main(['--table', os.path.join(tmp_path, 'summary.json')]) == 0
  assert capsys.readouterr().out.splitlines() == demo_report.seed_table([summary])


def test_seed_table_gives_mean_and_population_std():
  runs = [
    {
      'seed': seed,
      'probe_top1_codec_inputs': top1,
      'probe_top1_uniform_inputs': 0.5,
      'probe_top1_codec_inputs_random_init': 0.25,
      'probe_top1_uniform_inputs_random_init': 0.75,
      'probes': {
        name: {
          mode: {'knn': {'top1': 0.5}, 'attentive': {'top1': 0.5}} for mode in ('codec', 'uniform')
        }
        for name in ('pretrained', 'random_init')
      },
      'cluster_nmi': {'texture': 0.5},
      'train_loss_first': 50.0,
      'train_loss_last': 40.0,
      'train_seconds': 100.0,
      'probe_seconds': 10.0,
      'seconds': 500.0,
    }
    for seed, top1 in ((0, 0.9), (1, 0.8), (2, 1.0))
  ]
  table = demo_report.seed_table(runs)
  assert table[0] == '| figure | mean ± std | seed 0 | seed 1 | seed 2 |'
  assert (
    '| linear probe, pretrained, codec inputs | 0.900 ± 0.082 | 0.900 | 0.800 | 1.000 |' in table
  )
  assert '| whole demo seconds | 500.0 ± 0.0 | 500.0 | 500.0 | 500.0 |' in table


@pytest.mark.parametrize('value', ['0,0,0', '1,2', 'a,b,c', '1,-1,1'])
def test_bad_video_modes_are_refused(value, capsys):
  with pytest.raises(SystemExit) as e:
    demo.options(demo.build_parser(), ['--video-modes', value])
  assert e.value.code == 2
  assert f'--video-modes {value!r}' in capsys.readouterr().err
