"""The installed package, not the checkout: a built wheel carries the experiments (as
`ove_jax_experiments`) and the tools, and an experiment resolves by name from another directory
with nothing of the checkout on the path."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = (
  'ove_jax',
  'data_pipeline',
  'tools',
  'experiments',
  'setup.cfg',
  'pyproject.toml',
  'README.md',
)


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
  """The wheel `pip wheel --no-deps --no-build-isolation` builds from a copy of the sources (the
  checkout gets no build/ or egg-info)."""
  root = tmp_path_factory.mktemp('wheel')
  src = root / 'src'
  src.mkdir()
  ignore = shutil.ignore_patterns('__pycache__', '*.pyc', '*.egg-info')
  for name in SOURCES:
    path = os.path.join(REPO, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=ignore)
    else:
      shutil.copy(path, src / name)
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'pip',
      'wheel',
      '--no-deps',
      '--no-build-isolation',
      '-q',
      '-w',
      str(root / 'dist'),
      str(src),
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  (built,) = os.listdir(root / 'dist')
  return str(root / 'dist' / built)


def test_wheel_contains_the_experiments_and_the_tools(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
  shipped = {
    f'ove_jax_experiments/{n}'
    for n in os.listdir(os.path.join(REPO, 'experiments'))
    if n.endswith('.py')
  }
  assert shipped and shipped <= names
  assert 'ove_jax_experiments/stage2_video.py' in names
  assert 'ove_jax_tools/sweep.py' in names and 'ove_jax/config.py' in names
  # The remote code that every export copies out of the installed package (hf_modeling.py).
  from ove_jax.convert import hf_modeling

  assert {f'ove_jax/convert/{n}' for n in hf_modeling.REMOTE_CODE} <= names
  assert not any(n.startswith(('experiments/', 'tools/', 'tests/')) for n in names)


def test_installed_wheel_resolves_experiments_by_name_from_another_directory(wheel, tmp_path):
  site = tmp_path / 'site'
  with zipfile.ZipFile(wheel) as z:
    z.extractall(site)  # a wheel's pure-Python install is its unpacked files on the path
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  script = (
    'import os\n'
    'from ove_jax import config\n'
    'assert config.__file__.startswith(os.environ["SITE"]), config.__file__\n'
    'assert config.experiments_dir().startswith(os.environ["SITE"]), config.experiments_dir()\n'
    'by_name = config.flatten(config.load("stage2_video:gpus=64"))\n'
    'readme = config.flatten(config.load("experiments/stage2_video.py:gpus=64"))\n'
    'assert by_name == readme and by_name["accumulate"] == 8, by_name["accumulate"]\n'
    'print(",".join(config.experiment_names()))\n'
    'try:\n'
    '  config.load("stage3")\n'
    'except config.ConfigError as e:\n'
    '  print(e)\n'
  )
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env.update(PYTHONPATH=str(site), SITE=str(site))
  proc = subprocess.run(
    [sys.executable, '-c', script],
    cwd=elsewhere,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  names, error = proc.stdout.splitlines()[-2:]
  assert names.split(',') == sorted(
    n[:-3] for n in os.listdir(os.path.join(REPO, 'experiments')) if n.endswith('.py')
  )
  assert '--config=stage3: no experiment file' in error and 'stage2_video' in error
