"""Multi-process start-up: resolving the setup from the environment, and real 2-process runs."""
import os
import subprocess
import sys
import textwrap
import time

import jax
import pytest

from ove_jax import distributed
from ove_jax_tools import launch_local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, 'tools', 'launch_local.py')


def test_nodelist_expansion():
  expand = distributed.expand_slurm_nodelist
  assert expand('node[01-04,07]') == ['node01', 'node02', 'node03', 'node04', 'node07']
  assert expand('a,b') == ['a', 'b']
  assert expand('gpu[8-10],login') == ['gpu8', 'gpu9', 'gpu10', 'login']
  assert expand('r[1-2]n[1,3]') == ['r1n1', 'r1n3', 'r2n1', 'r2n3']
  assert expand('single') == ['single']
  assert expand('') == []
  for bad in ('node[01-04', 'node[4-1]', 'node[a-b]'):
    with pytest.raises(ValueError, match='SLURM node list'):
      expand(bad)


def test_no_request_is_single_process():
  assert distributed.from_environment({}) is None
  assert distributed.from_environment({'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'}) is None
  assert distributed.from_environment({'OVE_NUM_PROCESSES': '1'}) is None


def test_ove_variables():
  env = {'OVE_COORDINATOR_ADDRESS': '10.0.0.1:5000', 'OVE_NUM_PROCESSES': '4',
         'OVE_PROCESS_ID': '3'}
  assert distributed.from_environment(env) == {
      'coordinator_address': '10.0.0.1:5000', 'num_processes': 4, 'process_id': 3}


def test_slurm_variables():
  env = {'SLURM_NTASKS': '8', 'SLURM_PROCID': '5', 'SLURM_JOB_NODELIST': 'other[1-9]',
         'SLURM_STEP_NODELIST': 'node[07-08],node11'}
  assert distributed.from_environment(env) == {
      'coordinator_address': 'node07:12355', 'num_processes': 8, 'process_id': 5}
  env = {'SLURM_NTASKS': '2', 'SLURM_PROCID': '0', 'SLURM_JOB_NODELIST': 'a,b',
         'OVE_COORDINATOR_PORT': '4000'}
  assert distributed.from_environment(env)['coordinator_address'] == 'a:4000'
  # OVE variables win over SLURM's, value by value.
  env['OVE_COORDINATOR_ADDRESS'] = 'head:7000'
  assert distributed.from_environment(env)['coordinator_address'] == 'head:7000'


def test_explicit_arguments_win():
  env = {'OVE_COORDINATOR_ADDRESS': 'x:1', 'OVE_NUM_PROCESSES': '4', 'OVE_PROCESS_ID': '3'}
  assert distributed._resolve({'process_id': 1, 'num_processes': 2}, env) == {
      'coordinator_address': 'x:1', 'num_processes': 2, 'process_id': 1}


@pytest.mark.parametrize('env, match', [
    ({'OVE_COORDINATOR_ADDRESS': 'h:1', 'OVE_NUM_PROCESSES': '2', 'OVE_PROCESS_ID': '2'},
     'OVE_PROCESS_ID=2 is out of range'),
    ({'OVE_COORDINATOR_ADDRESS': 'h:1', 'OVE_NUM_PROCESSES': '2', 'OVE_PROCESS_ID': '-1'},
     'OVE_PROCESS_ID=-1 is out of range'),
    ({'OVE_COORDINATOR_ADDRESS': 'h:1', 'OVE_NUM_PROCESSES': 'two', 'OVE_PROCESS_ID': '0'},
     'OVE_NUM_PROCESSES=.two.: expected a whole number'),
    ({'OVE_COORDINATOR_ADDRESS': 'h:1', 'OVE_NUM_PROCESSES': '0', 'OVE_PROCESS_ID': '0'},
     'OVE_NUM_PROCESSES=0'),
    ({'OVE_COORDINATOR_ADDRESS': 'localhost', 'OVE_NUM_PROCESSES': '2', 'OVE_PROCESS_ID': '0'},
     'OVE_COORDINATOR_ADDRESS=.localhost.: the coordinator address must be host:port'),
    ({'OVE_COORDINATOR_ADDRESS': 'h:99999', 'OVE_NUM_PROCESSES': '2', 'OVE_PROCESS_ID': '0'},
     'OVE_COORDINATOR_ADDRESS'),
    ({'OVE_COORDINATOR_ADDRESS': 'h:1', 'OVE_NUM_PROCESSES': '2'}, 'OVE_PROCESS_ID'),
    ({'SLURM_NTASKS': '2', 'SLURM_JOB_NODELIST': 'a,b'}, 'SLURM_NTASKS.*OVE_PROCESS_ID.*srun'),
    ({'SLURM_NTASKS': '2', 'SLURM_PROCID': '2', 'SLURM_JOB_NODELIST': 'a,b'},
     'SLURM_PROCID=2 is out of range for SLURM_NTASKS=2'),
    ({'SLURM_NTASKS': 'many'}, 'SLURM_NTASKS'),
    ({'SLURM_NTASKS': '2', 'SLURM_PROCID': '0', 'SLURM_JOB_NODELIST': 'a',
      'OVE_COORDINATOR_PORT': 'x'}, 'OVE_COORDINATOR_PORT'),
])
def test_invalid_values_name_the_variable(env, match):
  with pytest.raises(ValueError, match=match):
    distributed.from_environment(env)


def test_initialize_after_backend_started_explains(monkeypatch):
  for var in ('OVE_COORDINATOR_ADDRESS', 'OVE_NUM_PROCESSES', 'OVE_PROCESS_ID',
              'OVE_LOCAL_DEVICE_COUNT', 'SLURM_NTASKS'):
    monkeypatch.delenv(var, raising=False)
  jax.devices()  # starts the backend, as any earlier JAX call would
  info = distributed.initialize()
  assert info['process_count'] == 1 and info['global_device_count'] == jax.device_count()
  assert distributed.initialize() == info  # idempotent
  assert distributed.is_main_process()
  with pytest.raises(RuntimeError, match='already started.*before anything else uses JAX'):
    distributed.initialize(coordinator_address='127.0.0.1:1234', num_processes=2, process_id=0)
  with pytest.raises(RuntimeError, match='asked for 3 CPU devices'):
    distributed.initialize(local_device_count=3)


def test_child_env_replaces_device_count():
  env = launch_local.child_env(
      {'XLA_FLAGS': '--xla_a=1 --xla_force_host_platform_device_count=8 --xla_b=2', 'KEEP': 'x'},
      address='127.0.0.1:9', processes=2, index=1, devices=4)
  assert env['XLA_FLAGS'] == '--xla_a=1 --xla_b=2 --xla_force_host_platform_device_count=4'
  assert env['KEEP'] == 'x' and env['OVE_PROCESS_ID'] == '1' and env['OVE_NUM_PROCESSES'] == '2'
  assert env['OVE_LOCAL_DEVICE_COUNT'] == '4' and env['JAX_PLATFORMS'] == 'cpu'


def test_use_cpu_devices_before_and_after_the_backend_starts():
  jax.devices()
  distributed.use_cpu_devices(jax.local_device_count())   # what it has: accepted
  with pytest.raises(RuntimeError, match='asked for 3 CPU devices but the JAX backend already '
                     'started with 8'):
    distributed.use_cpu_devices(3)
  with pytest.raises(ValueError, match='at least 1'):
    distributed.use_cpu_devices(0)
  env = distributed.cpu_devices_env({'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}, 2)
  env.pop('JAX_PLATFORMS', None)
  result = subprocess.run(
      [sys.executable, '-c', 'import jax\nfrom ove_jax import distributed\n'
       'distributed.use_cpu_devices(3)\nprint(jax.local_device_count())'],
      env={**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}, capture_output=True,
      text=True, timeout=120, cwd=REPO)
  assert result.stdout.strip() == '3', result.stderr[-2000:]
  assert env == {'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
                 'OVE_LOCAL_DEVICE_COUNT': '2'}


@pytest.mark.parametrize('argv, message', [
    (['--processes=0', '--', 'true'], 'at least 1 process'),
    (['--processes=2', '--devices_per_process=0', '--', 'true'], 'at least 1 device'),
    (['--processes=2'], 'no command given'),
])
def test_launcher_argument_errors(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    launch_local.main(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def _launch(tmp_path, script, *flags, timeout=60):
  path = tmp_path / 'child.py'
  path.write_text(textwrap.dedent(script))
  return subprocess.run([sys.executable, LAUNCHER, *flags, '--', sys.executable, str(path)],
                        capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_two_processes_compute_a_global_sum(tmp_path):
  result = _launch(tmp_path, """
      import logging
      import jax
      import jax.numpy as jnp
      import numpy as np
      from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
      from ove_jax import distributed

      logging.basicConfig(level=logging.INFO)
      info = distributed.initialize()
      assert info['process_count'] == 2, info
      assert info['local_device_count'] == 4 and info['global_device_count'] == 8, info
      assert distributed.is_main_process() == (info['process_index'] == 0)
      mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
      local = np.arange(16, dtype=np.float32) + 16 * jax.process_index()  # 0..31 over both
      x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), local)
      assert x.shape == (32,)
      total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
      print(f'SUM {float(total):.1f} from process {jax.process_index()}')
      """, '--processes=2', '--devices_per_process=4', '--timeout=50')
  assert result.returncode == 0, result.stdout + result.stderr
  for i in range(2):
    assert f'[p{i}] SUM 496.0 from process {i}' in result.stdout, result.stdout + result.stderr
    assert f'[p{i}] INFO:ove_jax.distributed:JAX process {i}/2: 4 local devices, 8 global' \
        in result.stderr


def test_failing_process_stops_the_others(tmp_path):
  start = time.monotonic()
  result = _launch(tmp_path, """
      import os, sys, time
      if os.environ['OVE_PROCESS_ID'] == '1':
        sys.exit(3)
      print('waiting', flush=True)
      time.sleep(60)
      """, '--processes=2', '--devices_per_process=1', timeout=30)
  assert result.returncode == 3, result.stdout + result.stderr
  assert time.monotonic() - start < 15
  assert 'process 1 exited with code 3' in result.stderr


def test_timeout_returns_124(tmp_path):
  result = _launch(tmp_path, """
      import time
      time.sleep(60)
      """, '--processes=2', '--timeout=1', timeout=30)
  assert result.returncode == 124, result.stdout + result.stderr
  assert 'timed out' in result.stderr
