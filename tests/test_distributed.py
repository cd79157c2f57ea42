"""Multi-process start-up: what JAX's cluster detection and our overrides make of each scheduler's
variables (simulated environments), hybrid meshes, and real 2-process runs."""

import http.server
import json
import os
import random
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import clusters
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ove_jax import config as config_lib
from ove_jax import distributed, sharding
from ove_jax_tools import launch_local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, 'tools', 'launch_local.py')


# Every variable a scheduler (or a user) sets that JAX's detection or ours reads.
_SCHEDULER_VARS = re.compile(
  r'^(SLURM_|OMPI_|OVE_|JAX_COORDINATOR|JAX_LOCAL_DEVICE_IDS|TPU_|'
  r'MEGASCALE_|KUBERNETES_SERVICE_HOST$|CUDA_VISIBLE_DEVICES$|'
  r'GCE_METADATA_IP$|JOB_COMPLETION_INDEX$)'
)


@pytest.fixture
def scheduler(monkeypatch):
  """Sets a scheduler's variables (after removing every such variable of this machine) and
  returns (what ove_jax passes to jax.distributed.initialize, what JAX's detection then makes of
  it: coordinator, process count, process id, local device ids)."""
  for var in list(os.environ):
    if _SCHEDULER_VARS.match(var):
      monkeypatch.delenv(var)

  def run(env, timeout=30, **explicit):
    for var, value in env.items():
      monkeypatch.setenv(var, value)
    cluster = distributed.detect_cluster()
    kwargs = distributed.plan(
      explicit, os.environ, cluster, initialization_timeout=30, heartbeat_timeout=20
    )
    if kwargs is None:
      return cluster, None, None
    # The call jax.distributed.initialize makes with these arguments (jax/_src/distributed.py).
    seen = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      kwargs.get('coordinator_address'),
      kwargs.get('num_processes'),
      kwargs.get('process_id'),
      kwargs.get('local_device_ids'),
      None,
      timeout,
    )
    return cluster, kwargs, tuple(seen)

  return run


def _slurm(procid, localid, nodeid, tasks_per_node, ntasks, **more):
  env = {
    'SLURM_JOB_ID': '4242',
    'SLURM_STEP_NODELIST': 'gpu[07-08]',
    'SLURM_NTASKS': ntasks,
    'SLURM_PROCID': procid,
    'SLURM_LOCALID': localid,
    'SLURM_NODEID': nodeid,
    'SLURM_STEP_TASKS_PER_NODE': tasks_per_node,
    'SLURM_STEP_NUM_NODES': '2',
  }
  return {k: str(v) for k, v in {**env, **more}.items()}


SLURM_PORT = 4242 % 4096 + 61440  # JAX's port for SLURM job 4242


def test_no_request_is_single_process(scheduler):
  assert scheduler({}) == (None, None, None)
  assert scheduler({'OVE_NUM_PROCESSES': '1'}) == (None, None, None)
  # A launcher's WORLD_SIZE=1, RANK=0 mapped to the variables: one process, said outright.
  assert scheduler({'OVE_NUM_PROCESSES': '1', 'OVE_PROCESS_ID': '0'}) == (None, None, None)
  cluster, kwargs, _ = scheduler(_slurm(0, 0, 0, '1', 1))  # srun -n 1, or one task
  assert cluster.__name__ == 'SlurmCluster' and kwargs is None


def test_slurm_one_task_per_gpu(scheduler):
  """srun --ntasks-per-node=8 (--gpus-per-node=8): every task sees the node's 8 GPUs and owns the
  one numbered by its local rank; JAX's detection gives coordinator, count and id."""
  owned = []
  for localid in range(8):
    cluster, kwargs, seen = scheduler(
      _slurm(8 + localid, localid, 1, '8(x2)', 16, CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7')
    )
    assert cluster.__name__ == 'SlurmCluster'
    assert kwargs == {
      'local_device_ids': [localid],
      'initialization_timeout': 30,
      'heartbeat_timeout_seconds': 20,
    }
    assert seen == (f'gpu07:{SLURM_PORT}', 16, 8 + localid, [localid])
    owned.append(seen[3])
  assert sorted(sum(owned, [])) == list(range(8))  # each GPU owned by exactly one process
  # SLURM bound one GPU to each task (--gpus-per-task=1): the one it sees is its own.
  _, kwargs, seen = scheduler(_slurm(5, 5, 0, '8(x2)', 16, CUDA_VISIBLE_DEVICES='5'))
  assert kwargs['local_device_ids'] == [] and seen[3] == []
  # No GPU list at all (no gres): device = local rank, as JAX does by itself.
  _, kwargs, seen = scheduler(_slurm(3, 3, 0, '4(x2)', 8, CUDA_VISIBLE_DEVICES=''))
  assert kwargs['local_device_ids'] == [3] and seen[3] == [3]


def test_slurm_one_task_per_node(scheduler):
  """srun --ntasks-per-node=1: the task owns all its node's GPUs, where JAX alone would have it use
  GPU 0 only (its local rank)."""
  env = _slurm(1, 0, 1, '1(x2)', 2, CUDA_VISIBLE_DEVICES='0,1,2,3')
  cluster, kwargs, seen = scheduler(env)
  assert cluster.__name__ == 'SlurmCluster' and kwargs['local_device_ids'] == []
  assert seen == (f'gpu07:{SLURM_PORT}', 2, 1, [])
  jax_alone = clusters.ClusterEnv.auto_detect_unset_distributed_params(
    None, None, None, None, None, 30
  )
  assert jax_alone[3] == [0]
  # Two tasks per node, each seeing the node's 8 GPUs: four each.
  _, kwargs, _ = scheduler(_slurm(3, 1, 1, '2(x2)', 4, CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7'))
  assert kwargs['local_device_ids'] == [4, 5, 6, 7]
  # Four GPUs bound to each of two tasks (--gpus-per-task=4): its own four.
  _, kwargs, _ = scheduler(
    _slurm(1, 1, 0, '2', 2, CUDA_VISIBLE_DEVICES='4,5,6,7', SLURM_GPUS_PER_TASK='a100:4')
  )
  assert kwargs['local_device_ids'] == []
  assert (
    distributed.slurm_tasks_on_node({'SLURM_STEP_TASKS_PER_NODE': '4(x2),2', 'SLURM_NODEID': '2'})
    == 2
  )
  assert distributed.slurm_tasks_on_node({'SLURM_NTASKS_PER_NODE': '3'}) == 3


def test_overrides_win_value_by_value(scheduler):
  env = _slurm(2, 0, 2, '1(x4)', 4, OVE_COORDINATOR_ADDRESS='head:7000', OVE_LOCAL_DEVICE_IDS='0,1')
  _, kwargs, seen = scheduler(env)
  assert kwargs['coordinator_address'] == 'head:7000' and 'num_processes' not in kwargs
  assert seen == ('head:7000', 4, 2, [0, 1])
  _, _, seen = scheduler(
    {'OVE_COORDINATOR_ADDRESS': '', 'OVE_LOCAL_DEVICE_IDS': 'all', 'JAX_COORDINATOR_PORT': '7777'}
  )
  assert seen == ('gpu07:7777', 4, 2, [])
  _, kwargs, seen = scheduler({}, process_id=3, local_device_ids=[1])
  assert kwargs['process_id'] == 3 and seen == ('gpu07:7777', 4, 3, [1])


def test_open_mpi(scheduler):
  """mpirun: JAX reads the coordinator from Open MPI's URI; one rank per node owns all GPUs, one
  per GPU its own."""
  uri = '1531576320.0;tcp://10.96.0.1,10.148.0.1,10.108.0.1:34911'
  port = 1531576320 // 4096 % 4096 + 61440
  env = {
    'OMPI_MCA_orte_hnp_uri': uri,
    'OMPI_COMM_WORLD_SIZE': '4',
    'OMPI_COMM_WORLD_RANK': '2',
    'OMPI_COMM_WORLD_LOCAL_RANK': '0',
    'OMPI_COMM_WORLD_LOCAL_SIZE': '1',
  }
  cluster, kwargs, seen = scheduler(env)
  assert cluster.__name__ == 'OmpiCluster' and kwargs['local_device_ids'] == []
  assert seen == (f'10.96.0.1:{port}', 4, 2, [])
  _, kwargs, seen = scheduler(
    {'OMPI_COMM_WORLD_LOCAL_RANK': '2', 'OMPI_COMM_WORLD_LOCAL_SIZE': '4'}
  )
  assert seen == (f'10.96.0.1:{port}', 4, 2, [2])


def _on_tpu_vm(monkeypatch):
  """What jax's import does on a Cloud TPU VM (jax/_src/cloud_tpu_init.py): TPU chips found."""
  from jax._src.clusters import cloud_tpu_cluster, cluster

  monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', True)
  monkeypatch.setattr(cluster, 'running_in_cloud_tpu_vm', True)


def test_gke_tpu_multislice(scheduler, monkeypatch):
  """A GKE JobSet (XPK) of 2 slices of 4 hosts: JAX reads the workers and the slice from the
  variables GKE sets; TPU processes are never restricted to some of their chips."""
  _on_tpu_vm(monkeypatch)
  env = {
    'TPU_SKIP_MDS_QUERY': 'true',  # GKE's TPU pods have no TPU VM metadata server
    'TPU_WORKER_HOSTNAMES': 'localhost,w-1,w-2,w-3',
    'TPU_WORKER_ID': '2',
    'MEGASCALE_NUM_SLICES': '2',
    'MEGASCALE_SLICE_ID': '1',
    'MEGASCALE_COORDINATOR_ADDRESS': 'localhost:8080',
  }
  cluster, kwargs, seen = scheduler(env)
  assert cluster.__name__ == 'GkeTpuCluster' and 'local_device_ids' not in kwargs
  assert seen == ('localhost:8482', 8, 6, None)


def test_cloud_tpu_vm_pod(scheduler, monkeypatch):
  """`gcloud compute tpus tpu-vm ssh --worker=all`: JAX asks the TPU VM's metadata server (here a
  local one serving what a v4-16's worker 1 gets) for its worker number and the workers."""
  _on_tpu_vm(monkeypatch)
  attributes = {
    'agent-worker-number': '1',
    'worker-network-endpoints': 'localhost,t1k-w-1',
    'tpu-env': "ACCELERATOR_TYPE: 'v4-16'\nWORKER_ID: '1'\n",
  }

  class Metadata(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      key = self.path.rsplit('/', 1)[-1]
      ok = key in attributes and self.headers.get('Metadata-Flavor') == 'Google'
      body = attributes.get(key, 'not found').encode()
      self.send_response(200 if ok else 404)
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      del args

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Metadata)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    cluster, kwargs, seen = scheduler({'GCE_METADATA_IP': f'127.0.0.1:{server.server_port}'})
  finally:
    server.shutdown()
  assert cluster.__name__ == 'GceTpuCluster' and 'local_device_ids' not in kwargs
  assert seen == ('localhost:8482', 2, 1, None)


def test_kubernetes_indexed_job(scheduler, monkeypatch):
  """An Indexed Job of 4 pods behind a headless service (jax[k8s]): JAX asks the Kubernetes API
  (here the `kubernetes` client's calls answered as the API server answers them for pod 3) for
  the Job's parallelism and the coordinator pod; no device restriction (one process per pod)."""
  from jax._src.clusters import k8s_cluster

  ns = types.SimpleNamespace
  pod = ns(
    metadata=ns(
      name='ove-train-3-abcde',
      labels={'job-name': 'ove-train'},
      owner_references=[ns(controller=True, kind='Job')],
    ),
    spec=ns(subdomain='ove-svc'),
  )
  job = ns(metadata=ns(name='ove-train', labels={'job-name': 'ove-train'}), spec=ns(parallelism=4))
  queries = []

  class CoreV1Api:
    def list_namespaced_pod(self, namespace, field_selector):
      queries.append((namespace, field_selector))
      return ns(items=[pod])

  class BatchV1Api:
    def read_namespaced_job(self, name, namespace):
      queries.append((namespace, name))
      return job

  client = ns(CoreV1Api=CoreV1Api, BatchV1Api=BatchV1Api, exceptions=ns(ApiException=OSError))
  monkeypatch.setitem(
    sys.modules, 'kubernetes', ns(config=ns(load_incluster_config=lambda: None), client=client)
  )
  monkeypatch.setattr(k8s_cluster.K8sCluster, '_namespace', classmethod(lambda cls: 'team'))
  for name in ('_pod', '_job', '_controller', '_headless_svc'):
    k8s_cluster.K8sCluster.__dict__[name].__func__.cache_clear()
  try:
    cluster, kwargs, seen = scheduler(
      {'KUBERNETES_SERVICE_HOST': '10.0.0.1', 'HOSTNAME': 'localhost', 'JOB_COMPLETION_INDEX': '3'},
      timeout=0,
    )  # 0: no wait for the coordinator's DNS name
  finally:
    for name in ('_pod', '_job', '_controller', '_headless_svc'):
      k8s_cluster.K8sCluster.__dict__[name].__func__.cache_clear()
  assert cluster.__name__ == 'K8sCluster' and 'local_device_ids' not in kwargs
  assert seen == ('ove-train-0.ove-svc:55527', 4, 3, None)
  assert ('team', 'ove-train') in queries


def test_unreadable_cluster_layout_explains(scheduler):
  """A cluster JAX detects but cannot read: the error says so, and OVE_NUM_PROCESSES=1 runs this
  machine alone (a notebook pod, a SLURM login shell)."""
  with pytest.raises(
    ValueError,
    match="JAX detected SlurmCluster here .SLURM_JOB_ID is set. but SLURM_NTASKS='all' is not a "
    'whole number: start the processes with srun.*OVE_NUM_PROCESSES=1',
  ):
    scheduler(_slurm(0, 0, 0, '1', 'all'))
  assert scheduler({'OVE_NUM_PROCESSES': '1'})[1:] == (None, None)


def test_ove_variables(scheduler):
  env = {
    'OVE_COORDINATOR_ADDRESS': '10.0.0.1:5000',
    'OVE_NUM_PROCESSES': '4',
    'OVE_PROCESS_ID': '3',
  }
  cluster, kwargs, seen = scheduler(env)
  assert cluster is None and seen == ('10.0.0.1:5000', 4, 3, None)
  assert kwargs == {
    'coordinator_address': '10.0.0.1:5000',
    'num_processes': 4,
    'process_id': 3,
    'initialization_timeout': 30,
    'heartbeat_timeout_seconds': 20,
  }


def test_explicit_arguments_win():
  env = {'OVE_COORDINATOR_ADDRESS': 'x:1', 'OVE_NUM_PROCESSES': '4', 'OVE_PROCESS_ID': '3'}
  kwargs = distributed.plan({'process_id': 1, 'num_processes': 2}, env, None)
  assert {k: kwargs[k] for k in ('coordinator_address', 'num_processes', 'process_id')} == {
    'coordinator_address': 'x:1',
    'num_processes': 2,
    'process_id': 1,
  }


@pytest.mark.parametrize(
  'env, match',
  [
    (
      {'OVE_COORDINATOR_ADDRESS': 'h:1', 'OVE_NUM_PROCESSES': '2', 'OVE_PROCESS_ID': '2'},
      'OVE_PROCESS_ID=2 is out of range',
    ),
    (
      {'OVE_COORDINATOR_ADDRESS': 'h:1', 'OVE_NUM_PROCESSES': '2', 'OVE_PROCESS_ID': '-1'},
      'OVE_PROCESS_ID=-1 is out of range',
    ),
    (
      {'OVE_COORDINATOR_ADDRESS': 'h:1', 'OVE_NUM_PROCESSES': 'two', 'OVE_PROCESS_ID': '0'},
      'OVE_NUM_PROCESSES=.two.: expected a whole number',
    ),
    (
      {'OVE_COORDINATOR_ADDRESS': 'h:1', 'OVE_NUM_PROCESSES': '0', 'OVE_PROCESS_ID': '0'},
      'OVE_NUM_PROCESSES=0',
    ),
    (
      {'OVE_COORDINATOR_ADDRESS': 'localhost', 'OVE_NUM_PROCESSES': '2', 'OVE_PROCESS_ID': '0'},
      'OVE_COORDINATOR_ADDRESS=.localhost.: the coordinator address must be host:port',
    ),
    (
      {'OVE_COORDINATOR_ADDRESS': 'h:99999', 'OVE_NUM_PROCESSES': '2', 'OVE_PROCESS_ID': '0'},
      'OVE_COORDINATOR_ADDRESS',
    ),
    (
      {'OVE_COORDINATOR_ADDRESS': 'h:1', 'OVE_NUM_PROCESSES': '2'},
      'OVE_PROCESS_ID is missing and no cluster',
    ),
    (
      {
        'SLURM_JOB_ID': '1',
        'SLURM_STEP_NODELIST': 'a,b',
        'SLURM_NTASKS': '2',
        'SLURM_PROCID': '0',
        'SLURM_LOCALID': '0',
        'OVE_PROCESS_ID': '2',
      },
      'OVE_PROCESS_ID=2 is out of range for the SlurmCluster process count=2',
    ),
    (
      {
        'SLURM_JOB_ID': '1',
        'SLURM_STEP_NODELIST': 'a,b',
        'SLURM_NTASKS': '2',
        'SLURM_PROCID': '0',
        'SLURM_LOCALID': '0',
        'OVE_LOCAL_DEVICE_IDS': 'gpu0',
      },
      'OVE_LOCAL_DEVICE_IDS=.gpu0.',
    ),
    (
      {
        'SLURM_JOB_ID': '1',
        'SLURM_STEP_NODELIST': 'a,b',
        'SLURM_NTASKS': '2',
        'SLURM_PROCID': '0',
        'SLURM_LOCALID': '0',
        'SLURM_STEP_TASKS_PER_NODE': '2(2)',
      },
      'SLURM_STEP_TASKS_PER_NODE',
    ),
  ],
)
def test_invalid_values_name_the_variable(scheduler, env, match):
  with pytest.raises(ValueError, match=match):
    scheduler(env)


def test_single_process_runs_check_device_ids_and_kubernetes_indices():
  with pytest.raises(ValueError, match="OVE_LOCAL_DEVICE_IDS='abc': expected device numbers"):
    distributed.plan({}, {'OVE_LOCAL_DEVICE_IDS': 'abc'}, None)
  pod = {'KUBERNETES_SERVICE_HOST': '10.0.0.1', 'JOB_COMPLETION_INDEX': '1'}
  with pytest.raises(ValueError, match=r'JOB_COMPLETION_INDEX=1: .*\(install jax\[k8s\]'):
    distributed.plan({}, pod, None)  # no cluster detected: it would train alone as process 0
  assert distributed.plan({}, {**pod, 'JOB_COMPLETION_INDEX': '0'}, None) is None
  assert distributed.plan({}, {'JOB_COMPLETION_INDEX': '3'}, None) is None  # not in Kubernetes


def test_local_device_count_errors_name_the_variable(monkeypatch):
  monkeypatch.setenv('OVE_LOCAL_DEVICE_COUNT', 'abc')
  with pytest.raises(ValueError, match="OVE_LOCAL_DEVICE_COUNT='abc'"):
    distributed.initialize()


def test_the_coordinator_is_checked_before_jax_distributed_starts():
  var = 'OVE_COORDINATOR_ADDRESS'
  with pytest.raises(ValueError, match=r'=nosuchhost.invalid:12355: the host .* does not resolve'):
    distributed.check_coordinator('nosuchhost.invalid:12355', 1, 1, var)
  with socket.socket() as listener:
    listener.bind(('127.0.0.1', 0))
    listener.listen()
    address = f'127.0.0.1:{listener.getsockname()[1]}'
    distributed.check_coordinator(address, 1, 1, var)  # process 0 listens: go on
    with pytest.raises(ValueError, match=rf'{var}={address}: port \d+ is in use on this host'):
      distributed.check_coordinator(address, 0, 1, var)
  # Nothing listens any more: process 1 waits the timeout, then says so.
  with pytest.raises(ValueError, match=rf'{address}: nothing accepted a connection there in 1 s'):
    distributed.check_coordinator(address, 1, 1, var)
  distributed.check_coordinator(address, 0, 1, var)  # and process 0 may listen there


def test_initialize_passes_the_plan_to_jax(scheduler, monkeypatch):
  """What `initialize` hands jax.distributed.initialize under SLURM, one task per GPU: nothing
  but the device ids and the config's timeouts; JAX detects the rest."""
  calls, checked = [], []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, '_backend_initialized', lambda: False)
  monkeypatch.setattr(distributed, 'check_coordinator', lambda *args: checked.append(args))
  scheduler(_slurm(6, 2, 1, '4(x2)', 8))
  distributed.initialize(initialization_timeout=45, heartbeat_timeout=15)
  assert calls == [
    {'local_device_ids': [2], 'initialization_timeout': 45, 'heartbeat_timeout_seconds': 15}
  ]
  # JAX's own coordinator for the job is checked first: the first node, the job's port.
  [(address, process, timeout, source)] = checked
  assert (address, process, timeout) == (f'gpu07:{SLURM_PORT}', 6, 45)
  assert source.startswith(f"SLURM job 4242's coordinator gpu07:{SLURM_PORT} (JAX's")


def taken_port_in(low: int, high: int) -> socket.socket:
  """A listening socket on a port of [low, high] (where JAX puts SLURM jobs' coordinators)."""
  for port in random.Random(os.getpid()).sample(range(low, high + 1), 200):
    listener = socket.socket()
    try:
      listener.bind(('', port))
    except OSError:
      listener.close()
      continue
    listener.listen()
    return listener
  raise AssertionError(f'no free port in {low}-{high}')


@pytest.mark.parametrize('how', ['job id', 'JAX_COORDINATOR_PORT'])
def test_a_slurm_jobs_coordinator_port_in_use_is_named(scheduler, monkeypatch, how):
  """Process 0 of a SLURM job whose port (JAX's: 61440 + job id % 4096, or JAX_COORDINATOR_PORT)
  another program holds: a ValueError naming the job, the address and the way out, before
  jax.distributed starts (which crashed the process in its C++)."""
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: pytest.fail('started'))
  monkeypatch.setattr(distributed, '_backend_initialized', lambda: False)
  with taken_port_in(61440, 65535) as listener:
    port = listener.getsockname()[1]
    job = port - 61440 if how == 'job id' else 77
    more = {} if how == 'job id' else {'JAX_COORDINATOR_PORT': str(port)}
    scheduler(
      _slurm(0, 0, 0, '1(x2)', 2, SLURM_JOB_ID=job, SLURM_STEP_NODELIST='localhost,b', **more)
    )
    with pytest.raises(ValueError) as raised:
      distributed.initialize()
  message = str(raised.value)
  assert message.startswith(f"SLURM job {job}'s coordinator localhost:{port} (JAX's"), message
  assert f'port {port} is in use on this host' in message
  assert 'JAX_COORDINATOR_PORT=port or OVE_COORDINATOR_ADDRESS=host:port on every task' in message


_SLURM_CHILD = """
import json
import jax
from jax._src import xla_bridge
from ove_jax import config as config_lib, distributed, sharding

info = distributed.initialize(initialization_timeout=60, heartbeat_timeout=30)
mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 1, 'dcn_data': 2})
rows = [sorted({d.process_index for d in row.flat}) for row in mesh.devices]
print('RESULT ' + json.dumps(dict(info, visible=xla_bridge.CUDA_VISIBLE_DEVICES.value,
                                  rows=rows)), flush=True)
"""


@pytest.mark.parametrize('layout', ['per_gpu', 'per_node'])
def test_two_slurm_tasks_start_through_jax_detection(tmp_path, layout):
  """Two real processes started as srun would start them (SLURM's variables, no OVE_*), on this
  machine: JAX's SLURM detection connects them; one task per GPU owns device = its local rank,
  one task per node all devices; the hybrid mesh puts one process in each data row."""
  script = tmp_path / 'child.py'
  script.write_text(_SLURM_CHILD)
  base = {k: v for k, v in os.environ.items() if not _SCHEDULER_VARS.match(k)}
  base = distributed.cpu_devices_env(base, 2)
  port = str(launch_local.free_port())
  procs = []
  for i in range(2):
    per_gpu = layout == 'per_gpu'
    env = dict(
      base,
      JAX_PLATFORMS='cpu',
      JAX_COORDINATOR_PORT=port,
      **_slurm(
        i,
        i if per_gpu else 0,
        0 if per_gpu else i,
        '2' if per_gpu else '1(x2)',
        2,
        SLURM_STEP_NODELIST='localhost' if per_gpu else 'localhost,localhost',
      ),
    )
    procs.append(
      subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
      )
    )
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err[-3000:]
    results.append(json.loads(out.split('RESULT ', 1)[1]))
  for i, result in enumerate(results):
    assert (result['process_index'], result['process_count']) == (i, 2), result
    assert result['global_device_count'] == 4 and result['rows'] == [[0], [1]], result
    assert result['visible'] == (str(i) if layout == 'per_gpu' else 'all'), result


def test_initialize_after_backend_started_explains(monkeypatch):
  for var in (
    'OVE_COORDINATOR_ADDRESS',
    'OVE_NUM_PROCESSES',
    'OVE_PROCESS_ID',
    'OVE_LOCAL_DEVICE_COUNT',
    'SLURM_NTASKS',
  ):
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
    address='127.0.0.1:9',
    processes=2,
    index=1,
    devices=4,
  )
  assert env['XLA_FLAGS'] == '--xla_a=1 --xla_b=2 --xla_force_host_platform_device_count=4'
  assert env['KEEP'] == 'x' and env['OVE_PROCESS_ID'] == '1' and env['OVE_NUM_PROCESSES'] == '2'
  assert env['OVE_LOCAL_DEVICE_COUNT'] == '4' and env['JAX_PLATFORMS'] == 'cpu'


def test_use_cpu_devices_before_and_after_the_backend_starts():
  jax.devices()
  distributed.use_cpu_devices(jax.local_device_count())  # what it has: accepted
  with pytest.raises(
    RuntimeError, match='asked for 3 CPU devices but the JAX backend already started with 8'
  ):
    distributed.use_cpu_devices(3)
  with pytest.raises(ValueError, match='at least 1'):
    distributed.use_cpu_devices(0)
  env = distributed.cpu_devices_env({'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}, 2)
  env.pop('JAX_PLATFORMS', None)
  result = subprocess.run(
    [
      sys.executable,
      '-c',
      'import jax\nfrom ove_jax import distributed\n'
      'distributed.use_cpu_devices(3)\nprint(jax.local_device_count())',
    ],
    env={**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'},
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO,
  )
  assert result.stdout.strip() == '3', result.stderr[-2000:]
  assert env == {
    'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
    'OVE_LOCAL_DEVICE_COUNT': '2',
  }


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--processes=0', '--', 'true'], 'at least 1 process'),
    (['--processes=2', '--devices_per_process=0', '--', 'true'], 'at least 1 device'),
    (
      ['--processes=2', '--devices-per-process', '0', '--', 'true'],
      'ove-launch-local: error: --devices-per-process=0: each process needs at least 1 device',
    ),
    (['--processes=2'], 'no command given'),
  ],
)
def test_launcher_argument_errors(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    launch_local.main(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


class _Collect:
  """A text stream that records what each write() brought, for the forwarding tests."""

  def __init__(self):
    self.writes, self.event = [], threading.Event()

  def write(self, text):
    self.writes.append(text)
    self.event.set()

  def flush(self):
    pass

  def text(self):
    return ''.join(self.writes)


def test_launcher_forwards_progress_updates_as_they_come():
  read_fd, write_fd = os.pipe()
  out, lock = _Collect(), threading.Lock()
  thread = threading.Thread(
    target=launch_local._forward, args=(os.fdopen(read_fd, 'rb'), out, '[p0] ', lock)
  )
  thread.start()
  # A tqdm update ends in '\r' and no newline follows until the bar closes: it must come out
  # while the child is still running, prefixed, not when the line ends.
  for piece in (b'train: 1/3\r', b'train: 2/3\r'):
    out.event.clear()
    os.write(write_fd, piece)
    assert out.event.wait(10), f'{piece!r} was not forwarded before the line ended'
  assert out.text() == '[p0] train: 1/3\r[p0] train: 2/3\r'
  # '\r\n' (whole or cut between two reads), a multi-byte character cut between reads, an
  # unterminated last line.
  for piece in (b'train: 3/3\r', b'\nwin\r\nline\n'):
    out.event.clear()
    os.write(write_fd, piece)
    assert out.event.wait(10)
  os.write(write_fd, 'caf\u00e9'.encode()[:4])
  time.sleep(0.2)  # most often read apart; the result is the same either way
  os.write(write_fd, 'caf\u00e9'.encode()[4:] + b' last')
  os.close(write_fd)
  thread.join(10)
  assert out.text() == (
    '[p0] train: 1/3\r[p0] train: 2/3\r[p0] train: 3/3\r\n[p0] win\n[p0] line\n'
    '[p0] caf\u00e9 last\n'
  )


def test_launcher_keeps_a_last_progress_update():
  read_fd, write_fd = os.pipe()
  out = _Collect()
  os.write(write_fd, b'a\nstep 5\r')
  os.close(write_fd)
  launch_local._forward(os.fdopen(read_fd, 'rb'), out, '[p1] ', threading.Lock())
  assert out.text() == '[p1] a\n[p1] step 5\r\n'


def _launch(tmp_path, script, *flags, timeout=60):
  path = tmp_path / 'child.py'
  path.write_text(textwrap.dedent(script))
  return subprocess.run(
    [sys.executable, LAUNCHER, *flags, '--', sys.executable, str(path)],
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=REPO,
  )


def test_two_processes_compute_a_global_sum(tmp_path):
  result = _launch(
    tmp_path,
    """
      import logging
      import jax
      import jax.numpy as jnp
      import numpy as np
      from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
      from ove_jax import distributed, sharding

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
      # The hybrid mesh across the two processes (as across two GPU nodes): one per data row.
      hybrid = sharding.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1, 'dcn_data': 2})
      assert [{d.process_index for d in row.flat} for row in hybrid.devices] == [{0}, {1}]
      y = jax.make_array_from_process_local_data(
          NamedSharding(hybrid, P(('data', 'fsdp'))), local)
      total = jax.jit(jnp.sum, out_shardings=NamedSharding(hybrid, P()))(y)
      print(f'HYBRID SUM {float(total):.1f} from process {jax.process_index()}')
      """,
    '--processes=2',
    '--devices_per_process=4',
    '--timeout=50',
  )
  assert result.returncode == 0, result.stdout + result.stderr
  for i in range(2):
    assert f'[p{i}] SUM 496.0 from process {i}' in result.stdout, result.stdout + result.stderr
    assert f'[p{i}] HYBRID SUM 496.0 from process {i}' in result.stdout, result.stdout
    assert (
      f'[p{i}] INFO:ove_jax.distributed:JAX process {i}/2: 4 local devices, 8 global'
      in result.stderr
    )


def test_failing_process_stops_the_others(tmp_path):
  start = time.monotonic()
  result = _launch(
    tmp_path,
    """
      import os, sys, time
      if os.environ['OVE_PROCESS_ID'] == '1':
        sys.exit(3)
      print('waiting', flush=True)
      time.sleep(60)
      """,
    '--processes=2',
    '--devices_per_process=1',
    timeout=30,
  )
  assert result.returncode == 3, result.stdout + result.stderr
  assert time.monotonic() - start < 15
  assert 'process 1 exited with code 3' in result.stderr


def test_timeout_returns_124(tmp_path):
  result = _launch(
    tmp_path,
    """
      import time
      time.sleep(60)
      """,
    '--processes=2',
    '--timeout=1',
    timeout=30,
  )
  assert result.returncode == 124, result.stdout + result.stderr
  assert 'timed out' in result.stderr


def test_hybrid_mesh_compiles_a_sharded_step():
  """dcn_data=2 x fsdp=4 on 8 virtual devices: each data row is one granule (devices 0-3, 4-7),
  and a train-like step (batch over data, weights over fsdp, a gradient) compiles and is exact."""
  sizes = {'data': 2, 'fsdp': 4, 'tensor': 1, 'dcn_data': 2, 'dcn_fsdp': 1, 'dcn_tensor': 1}
  mesh = sharding.make_hybrid_mesh(sizes)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert [[d.id for d in row.flat] for row in mesh.devices] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert sharding.make_mesh(sizes).devices.tolist() == mesh.devices.tolist()

  rng = np.random.default_rng(0)
  x_BxD = rng.normal(size=(16, 32)).astype(np.float32)
  w_DxF = rng.normal(size=(32, 8)).astype(np.float32)
  x = jax.device_put(x_BxD, NamedSharding(mesh, P(('data', 'fsdp'))))
  w = jax.device_put(w_DxF, NamedSharding(mesh, P('fsdp')))

  def loss(w, x):
    return jnp.mean(jnp.square(x @ w))

  step = jax.jit(
    jax.value_and_grad(loss),
    out_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P('fsdp'))),
  )
  compiled = step.lower(w, x).compile()
  assert 'all-reduce' in compiled.as_text() or 'reduce-scatter' in compiled.as_text()
  value, grad = compiled(w, x)
  expected = np.mean(np.square(x_BxD.astype(np.float64) @ w_DxF))
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  grad_expected = 2 * x_BxD.T.astype(np.float64) @ (x_BxD @ w_DxF) / (16 * 8)
  np.testing.assert_allclose(np.asarray(grad), grad_expected, rtol=1e-4, atol=1e-6)
  assert grad.sharding.spec == P('fsdp')


def test_hybrid_mesh_granules_and_errors():
  devices = jax.devices()
  # dcn over two axes: four granules of two devices, each a (1, 2, 1) block.
  mesh = sharding.make_hybrid_mesh({'data': 4, 'fsdp': 2, 'dcn_data': 2, 'dcn_fsdp': 2})
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2, 'tensor': 1}
  assert [[d.id for d in row.flat] for row in mesh.devices] == [[0, 2], [1, 3], [4, 6], [5, 7]]
  with pytest.raises(ValueError, match='dcn_fsdp=3 must be >= 1 and divide mesh.fsdp=4'):
    sharding.make_hybrid_mesh({'data': 2, 'fsdp': 4, 'dcn_fsdp': 3})
  with pytest.raises(ValueError, match='mesh axis .dcn_batch. is not one of'):
    sharding.make_hybrid_mesh({'data': 8, 'dcn_batch': 2})

  class Remote:  # a device of another process, as jax.devices() lists it in a multi-host run
    def __init__(self, device, process):
      self.id, self.process_index = device.id, process

  three_processes = [Remote(d, min(d.id // 3, 2)) for d in devices]  # 3 + 3 + 2 devices
  with pytest.raises(ValueError, match='would split a process between granules'):
    sharding.device_granules(three_processes, 2)
  four_processes = [Remote(d, d.id // 2) for d in reversed(devices)]
  groups = sharding.device_granules(four_processes, 2)
  assert [[d.process_index for d in g] for g in groups] == [[0, 0, 1, 1], [2, 2, 3, 3]]


def test_config_keys_for_launch():
  """mesh.dcn_* and distributed.* are config keys, checked when the config loads."""
  demo = os.path.join(REPO, 'experiments', 'demo_cpu.py')
  config = config_lib.load(demo, ['mesh.dcn_fsdp=2', 'distributed.heartbeat_timeout=30'])
  assert (config.mesh.dcn_fsdp, config.distributed.heartbeat_timeout) == (2, 30)
  assert config_lib.defaults().distributed.to_dict() == {
    'initialization_timeout': distributed.DEFAULT_INITIALIZATION_TIMEOUT,
    'heartbeat_timeout': distributed.DEFAULT_HEARTBEAT_TIMEOUT,
  }
  for override, match in (
    ('mesh.dcn_fsdp=3', 'mesh.dcn_fsdp=3 must divide mesh.fsdp=2'),
    ('mesh.dcn_data=0', 'mesh.dcn_data=0; must be an integer >= 1'),
    (
      'distributed.initialization_timeout=0',
      'distributed.initialization_timeout=0; must be an integer >= 1',
    ),
  ):
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.load(demo, [override])


def test_ove_train_on_a_slurm_job_whose_port_is_taken_exits_2(tmp_path):
  """The trainer as srun starts process 0, the job's coordinator port held by another program:
  one config error line (exit 2) and no workdir, where JAX's start crashed the process (exit 134
  or 139)."""
  base = {k: v for k, v in os.environ.items() if not _SCHEDULER_VARS.match(k)}
  with taken_port_in(61440, 65535) as listener:
    port = listener.getsockname()[1]
    env = dict(
      base,
      PYTHONPATH=REPO,
      **_slurm(0, 0, 0, '1(x2)', 2, SLURM_JOB_ID=port - 61440, SLURM_STEP_NODELIST='localhost,b'),
    )
    workdir = tmp_path / 'run'
    demo = os.path.join(REPO, 'experiments', 'demo_cpu.py')
    result = subprocess.run(
      [sys.executable, '-m', 'ove_jax.train', f'--config={demo}:smoke', f'--workdir={workdir}'],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"config error: SLURM job {port - 61440}'s coordinator localhost:{port}")
  assert f'port {port} is in use on this host' in last and 'Traceback' not in result.stderr
  assert not workdir.exists()
