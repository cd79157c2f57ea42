"""README's first command runs end to end and reports what it checked."""
import json
import os

from ove_jax_tools import demo


def test_demo_runs_and_writes_summary(tmp_path):
  assert demo.main(['--workdir', str(tmp_path), '--clips', '4', '--budget', '512']) == 0
  with open(os.path.join(tmp_path, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['sharded_vs_single_max_abs_diff'] < 1e-4
  assert summary['torch_port_max_rel_diff'] < 1e-4
  shares = summary['share_of_kept_patches_on_moving_objects']
  # Codec selection lands on the moving objects far more often than the baselines do.
  assert shares['codec'] > 3 * max(shares['uniform_frames'], shares['random_patches'])
  for name in ('png', 'gif'):
    assert os.path.getsize(summary['selection_pictures'][name]) > 1000
  assert os.path.isfile(os.path.join(tmp_path, 'hf_export', 'model.safetensors'))
