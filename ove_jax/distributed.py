"""Starting JAX for one process or many: the one call every entry point makes first.

A multi-process run (hosts of a TPU pod or a GPU cluster, or several processes on one machine
for tests) needs `jax.distributed.initialize` before anything touches the JAX backend: once the
backend exists, it only ever sees this process's devices.

Which cluster this is, and its coordinator, process count and process id, are JAX's own business:
`jax.distributed.initialize()` detects Cloud TPU VM pods (GCE and GKE, multi-slice included),
SLURM, Open MPI and Kubernetes Jobs (the `jax[k8s]` extra) from what those schedulers set. This
module only decides three things:
  - whether a multi-process run is wanted at all (a detected cluster with more than one process,
    or overrides that say so); a plain single-process run starts no coordinator;
  - which overrides apply: explicit arguments, else the `OVE_*` variables below, value by value;
    every value not overridden is left to JAX's detection;
  - which accelerators each process owns under SLURM and Open MPI (`local_device_ids`), where
    JAX's default (device number = local rank) is right only for one process per device.
Initialization and heartbeat timeouts come from the config (`distributed.*`).

Environment variables (all optional):
  OVE_COORDINATOR_ADDRESS  host:port of process 0's coordinator service
  OVE_NUM_PROCESSES        how many processes take part
  OVE_PROCESS_ID           this process's index, 0 .. OVE_NUM_PROCESSES - 1
  OVE_LOCAL_DEVICE_IDS     the accelerators this process owns: `0,1` or `all`
  OVE_LOCAL_DEVICE_COUNT   virtual CPU devices per process (CPU only)
JAX itself also reads JAX_COORDINATOR_ADDRESS, JAX_COORDINATOR_PORT (the port on the detected
coordinator host) and JAX_LOCAL_DEVICE_IDS.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from typing import Any, Mapping

import jax

from data_pipeline import paths

logger = logging.getLogger('ove_jax.distributed')

# JAX's own defaults for jax.distributed.initialize; the config's distributed.* keys set them.
DEFAULT_INITIALIZATION_TIMEOUT = 300
DEFAULT_HEARTBEAT_TIMEOUT = 100

# (argument of `initialize` and of jax.distributed.initialize, its OVE variable).
OVERRIDES = (
  ('coordinator_address', 'OVE_COORDINATOR_ADDRESS'),
  ('num_processes', 'OVE_NUM_PROCESSES'),
  ('process_id', 'OVE_PROCESS_ID'),
)
LOCAL_DEVICE_IDS_VAR = 'OVE_LOCAL_DEVICE_IDS'

# Where SLURM and Open MPI say this process's rank on its node and how many processes share it.
_LOCAL_LAYOUT = {
  'SlurmCluster': ('SLURM_LOCALID', None),
  'OmpiCluster': ('OMPI_COMM_WORLD_LOCAL_RANK', 'OMPI_COMM_WORLD_LOCAL_SIZE'),
}
# What JAX detects SLURM and Open MPI by, what starts their processes, and where it reads the
# process count and this process's id. JAX reads those unchecked: a missing one is a bare KeyError
# inside jax.distributed.initialize (Open MPI is detected by its URI variable alone).
SCHEDULER_VARS = {
  'SlurmCluster': ('SLURM_JOB_ID', 'srun', 'SLURM_NTASKS', 'SLURM_PROCID'),
  'OmpiCluster': (
    'OMPI_MCA_orte_hnp_uri',
    'mpirun or mpiexec',
    'OMPI_COMM_WORLD_SIZE',
    'OMPI_COMM_WORLD_RANK',
  ),
}


def detect_cluster():
  """The cluster environment `jax.distributed.initialize()` would use here, or None.

  JAX's own detectors (`jax._src.clusters`; no public name exists for them), asked in JAX's order
  with JAX's checks; opt-in-only ones (mpi4py) are skipped as JAX skips them without
  `cluster_detection_method`. The result is JAX's class (`SlurmCluster`, `OmpiCluster`,
  `GkeTpuCluster`, `GceTpuCluster`, `K8sCluster`), with JAX's `get_process_count()` etc.
  """
  from jax._src import clusters

  return next(
    (
      env
      for env in clusters.ClusterEnv._cluster_types
      if not env.opt_in_only_method and env.is_env_present()
    ),
    None,
  )


def plan(
  explicit: Mapping[str, Any],
  env: Mapping[str, str],
  cluster,
  *,
  initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT,
  heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
) -> dict | None:
  """The keyword arguments for `jax.distributed.initialize`, or None for a single-process run.

  `explicit` holds the arguments given to `initialize` (None: not given); they win over the
  `OVE_*` variables of `env`, value by value. `cluster` is `detect_cluster()`'s answer. Values
  neither given nor overridden are left out, for JAX's detection to fill in. Without a detected
  cluster, overrides must give all three of coordinator, count and id. Raises ValueError naming
  the variable when a value is malformed or missing (a scheduler's too: check_scheduler_vars).
  """
  values, sources = {}, {}
  for field, var in OVERRIDES:
    if explicit.get(field) is not None:
      values[field], sources[field] = explicit[field], f'argument {field}'
    elif env.get(var, '').strip():
      values[field], sources[field] = env[var].strip(), var
  if 'num_processes' in values:
    values['num_processes'] = _as_int(values['num_processes'], sources['num_processes'])
    if values['num_processes'] < 1:
      raise ValueError(
        f'{sources["num_processes"]}={values["num_processes"]}: the number of '
        'processes must be at least 1.'
      )
  if 'process_id' in values:
    values['process_id'] = _as_int(values['process_id'], sources['process_id'])
  if 'coordinator_address' in values:
    values['coordinator_address'] = _check_address(
      values['coordinator_address'], sources['coordinator_address']
    )

  if env.get(LOCAL_DEVICE_IDS_VAR, '').strip():  # checked whatever the run, not only where used
    local_device_ids(env, None)
  if cluster is None:
    one = values.get('num_processes') == 1 and set(values) <= {'num_processes', 'process_id'}
    if not values or one and values.get('process_id', 0) == 0:
      # Nothing asked for, or one process said outright (a launcher's WORLD_SIZE=1, RANK=0).
      index = env.get('JOB_COMPLETION_INDEX', '').strip()
      if env.get('KUBERNETES_SERVICE_HOST') and index not in ('', '0') and not values:
        raise ValueError(
          f'JOB_COMPLETION_INDEX={index}: this pod is one of a Kubernetes Indexed Job, but '
          'jax.distributed detects no cluster here (install jax[k8s], see docs/launch.md), '
          "so it would train alone as process 0 beside the Job's other pods. Install it, or "
          'set OVE_COORDINATOR_ADDRESS, OVE_NUM_PROCESSES and OVE_PROCESS_ID.'
        )
      return None
    missing = [var for field, var in OVERRIDES if field not in values]
    if missing:
      given = ', '.join(sources[f] for f, _ in OVERRIDES if f in sources)
      raise ValueError(
        f'A multi-process run was asked for ({given}) but {", ".join(missing)} is missing and '
        'no cluster that jax.distributed detects (Cloud TPU, GKE, SLURM under srun, Open MPI, '
        'a Kubernetes Job) is present. Set all of OVE_COORDINATOR_ADDRESS, OVE_NUM_PROCESSES '
        'and OVE_PROCESS_ID, or none of them for a single-process run.'
      )
    count = values['num_processes']
  elif 'num_processes' in values:
    count = values['num_processes']
  elif cluster.__name__ in SCHEDULER_VARS:
    count = check_scheduler_vars(env, cluster.__name__, values, explicit)
  else:
    try:
      count = cluster.get_process_count()
    except Exception as e:  # JAX's detectors raise what their scheduler's API raises
      raise ValueError(
        f'JAX detected {cluster.__name__} here but could not read its process count ({e!r}). '
        'Fix the scheduler setup (see docs/launch.md), or set OVE_NUM_PROCESSES=1 for a '
        'single-process run on this machine.'
      ) from e
  if 'process_id' in values and not 0 <= values['process_id'] < count:
    count_source = (
      sources['num_processes']
      if 'num_processes' in sources
      else f'the {cluster.__name__} process count'
    )
    raise ValueError(
      f'{sources["process_id"]}={values["process_id"]} is out of range for '
      f'{count_source}={count}: process ids run from 0 to {count - 1}.'
    )
  if count == 1:
    return None
  if cluster is not None and cluster.__name__ in SCHEDULER_VARS:  # the id and the local rank
    check_scheduler_vars(env, cluster.__name__, values, explicit)
  kwargs = dict(
    values,
    initialization_timeout=int(initialization_timeout),
    heartbeat_timeout_seconds=int(heartbeat_timeout),
  )
  device_ids = local_device_ids(env, cluster and cluster.__name__, explicit.get('local_device_ids'))
  if device_ids is not None:
    kwargs['local_device_ids'] = device_ids
  return kwargs


def check_scheduler_vars(
  env: Mapping[str, str], cluster_name: str, values: Mapping[str, Any], explicit: Mapping[str, Any]
) -> int:
  """The process count of a SLURM or Open MPI run (`cluster_name`), once every variable of
  SCHEDULER_VARS and _LOCAL_LAYOUT that this run reads is a whole number: those that `values`
  (the OVE_* overrides) or device ids given another way leave to the scheduler; a count of 1
  reads nothing else. A ValueError names all that are missing or malformed, and the fix."""
  marker, starter, count_var, id_var = SCHEDULER_VARS[cluster_name]
  if 'num_processes' not in values and env.get(count_var, '').strip() == '1':
    return 1  # one process: nothing else is read
  needed = [
    var for key, var in (('num_processes', count_var), ('process_id', id_var)) if key not in values
  ]
  ids_given = explicit.get('local_device_ids') is not None or any(
    env.get(var, '').strip() for var in (LOCAL_DEVICE_IDS_VAR, 'JAX_LOCAL_DEVICE_IDS')
  )
  if not ids_given:
    needed.append(_LOCAL_LAYOUT[cluster_name][0])
  missing = [var for var in needed if not env.get(var, '').strip()]
  malformed = [
    f'{var}={env[var]!r}' for var in needed if var not in missing and not env[var].strip().isdigit()
  ]
  if missing or malformed:
    problems = [
      f'{", ".join(names)} {"is" if len(names) == 1 else "are"} {what}'
      for names, what in ((missing, 'not set'), (malformed, 'not a whole number'))
      if names
    ]
    raise ValueError(
      f'JAX detected {cluster_name} here ({marker} is set) but {"; ".join(problems)}: start '
      f'the processes with {starter}, which sets all of them (see docs/launch.md), set them '
      f'yourself, or unset {marker} (or set OVE_NUM_PROCESSES=1) for a single-process run.'
    )
  return values['num_processes'] if 'num_processes' in values else int(env[count_var])


def local_device_ids(
  env: Mapping[str, str], cluster_name: str | None, explicit: Any = None
) -> list[int] | None:
  """The accelerators (numbers among those this process can see) it should own, or None to leave
  it to JAX. An empty list means all the process can see. `cluster_name` is the class name of
  `detect_cluster()`'s answer.

  Explicit ids, then OVE_LOCAL_DEVICE_IDS (`0,1` or `all`), win. JAX_LOCAL_DEVICE_IDS, which JAX
  reads itself, comes next (None here). Under SLURM and Open MPI, with `n` processes on this
  node and this one's local rank `r`, JAX's own default is device `r` alone: right for one
  process per device, wrong for one per node (it would use device 0 of 8). So:
    - one process on the node: all devices it sees;
    - the scheduler bound devices to each process (CUDA_VISIBLE_DEVICES lists one device, or as
      many as SLURM_GPUS_PER_TASK): all devices it sees (only its own);
    - every process sees all `v` devices of the node and `n` divides `v`: devices
      r*v/n .. (r+1)*v/n - 1 (one per GPU: device r);
    - otherwise (no device list to go by): device r, as JAX would.
  Cloud TPU and Kubernetes: None (JAX never restricts TPU processes; Kubernetes Jobs run one
  process per pod).
  """
  if explicit is not None:
    return [] if explicit == 'all' else [int(i) for i in explicit]
  text = env.get(LOCAL_DEVICE_IDS_VAR, '').strip()
  if text:
    if text == 'all':
      return []
    try:
      return [int(i) for i in text.split(',')]
    except ValueError:
      raise ValueError(
        f'{LOCAL_DEVICE_IDS_VAR}={text!r}: expected device numbers such as 0,1 or "all".'
      ) from None
  if env.get('JAX_LOCAL_DEVICE_IDS', '').strip() or cluster_name not in _LOCAL_LAYOUT:
    return None
  rank_var, size_var = _LOCAL_LAYOUT[cluster_name]
  rank = _as_int(env[rank_var], rank_var)
  size = (
    _as_int(env[size_var], size_var)
    if size_var and env.get(size_var, '').strip()
    else slurm_tasks_on_node(env)
  )
  if size is None:
    return [rank]
  if size == 1:
    return []
  visible = [d for d in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
  per_task = re.search(r'(\d+)$', env.get('SLURM_GPUS_PER_TASK', '').strip())
  if visible and (len(visible) == 1 or per_task and len(visible) == int(per_task.group(1))):
    return []
  if visible and len(visible) % size == 0:
    share = len(visible) // size
    return list(range(rank * share, (rank + 1) * share))
  return [rank]


def slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
  """How many tasks of this SLURM job step run on this node: SLURM_NTASKS_PER_NODE, else this
  node's entry (SLURM_NODEID) of SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE, which SLURM
  writes run-length coded (`4(x2),2` is 4, 4, 2); None when neither is set."""
  if env.get('SLURM_NTASKS_PER_NODE', '').strip():
    return _as_int(env['SLURM_NTASKS_PER_NODE'], 'SLURM_NTASKS_PER_NODE')
  var = next(
    (v for v in ('SLURM_STEP_TASKS_PER_NODE', 'SLURM_TASKS_PER_NODE') if env.get(v, '').strip()),
    None,
  )
  if var is None:
    return None
  counts = []
  for part in env[var].split(','):
    match = re.fullmatch(r'\s*(\d+)(?:\(x(\d+)\))?\s*', part)
    if match is None:
      raise ValueError(f'{var}={env[var]!r}: expected counts such as 4(x2),2.')
    counts += [int(match.group(1))] * int(match.group(2) or 1)
  node = _as_int(env.get('SLURM_NODEID', '0') or '0', 'SLURM_NODEID')
  return counts[node] if node < len(counts) else counts[-1]


def _as_int(value, source: str) -> int:
  if isinstance(value, bool):
    raise ValueError(f'{source}={value!r}: expected a whole number.')
  if isinstance(value, int):
    return value
  try:
    return int(str(value).strip())
  except ValueError:
    raise ValueError(f'{source}={value!r}: expected a whole number.') from None


def _check_address(address, source: str) -> str:
  text = str(address).strip()
  host, sep, port = text.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(
      f'{source}={text!r}: the coordinator address must be host:port, e.g. '
      '127.0.0.1:12355 (process 0 listens on that port; every process uses the '
      'same address).'
    )
  return text


def check_coordinator(address: str, process_id: int, timeout: float, source: str) -> None:
  """Before jax.distributed starts (a coordinator it cannot reach ends the process with a C++
  abort that blames 'another task'; a port in use, with a bare 'Failed to start RPC server'):
  the host resolves; for process 0 the port is free here; for the others something accepts
  connections there within `timeout` seconds. ValueError naming `source` otherwise."""
  host, _, port = address.rpartition(':')
  host, port = host.strip('[]'), int(port)
  where = source if address in source else f'{source}={address}'
  try:
    socket.getaddrinfo(host, port)
  except socket.gaierror as e:
    raise ValueError(
      f'{where}: the host {host!r} does not resolve here ({e.strerror}); give '
      'the address of process 0 as this machine reaches it.'
    ) from None
  if process_id == 0:
    with socket.socket() as probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        probe.bind(('', port))
      except OSError as e:
        raise ValueError(
          f'{where}: port {port} is in use on this host ({e.strerror}), so process '
          '0 cannot listen there; choose a free port (ove-launch-local --port, or another '
          'port in the address every process is given).'
        ) from None
    return
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, port), timeout=5):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ValueError(
          f'{where}: nothing accepted a connection there in {timeout:g} s ({e}); '
          'is process 0 running, and is that address reachable from this host (a firewall, '
          'a wrong host)? distributed.initialization_timeout sets the wait.'
        ) from None
      time.sleep(0.5)


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_count: int | None = None,
  *,
  local_device_ids: list[int] | str | None = None,
  initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT,
  heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
) -> dict:
  """Starts JAX for this run, multi-process when asked, and returns what it sees.

  Call it first, before any other JAX call: `jax.distributed` and the CPU device count can only
  be set before the backend starts. Calling it again later is fine (it re-reports). Returns
  `{'process_index', 'process_count', 'local_device_count', 'global_device_count',
  'platform'}`, and logs the same as one line.

  Args:
    coordinator_address: host:port of process 0; else `OVE_COORDINATOR_ADDRESS`, else JAX's
      cluster detection.
    num_processes: else `OVE_NUM_PROCESSES`, else JAX's cluster detection.
    process_id: else `OVE_PROCESS_ID`, else JAX's cluster detection.
    local_device_count: virtual CPU devices for this process, else `OVE_LOCAL_DEVICE_COUNT`;
      it sets `jax_num_cpu_devices`, which only the CPU backend reads.
    local_device_ids: the accelerators this process owns (`'all'`: all it sees); else
      `OVE_LOCAL_DEVICE_IDS`, else see `local_device_ids`.
    initialization_timeout: seconds to wait for every process to connect (config
      `distributed.initialization_timeout`).
    heartbeat_timeout: seconds without a heartbeat after which a process counts as dead and the
      job is stopped (config `distributed.heartbeat_timeout`).
  """
  explicit = {
    'coordinator_address': coordinator_address,
    'num_processes': num_processes,
    'process_id': process_id,
    'local_device_ids': local_device_ids,
  }
  devices = _local_device_count(local_device_count)
  started = jax.distributed.is_initialized()

  if devices is not None and not started:
    use_cpu_devices(devices, caller='ove_jax.distributed.initialize')

  if not started:
    cluster = detect_cluster()
    setup = plan(
      explicit,
      os.environ,
      cluster,
      initialization_timeout=initialization_timeout,
      heartbeat_timeout=heartbeat_timeout,
    )
    if setup is None:
      logger.info('Single-process run: jax.distributed not started.')
    else:
      if _backend_initialized():
        raise RuntimeError(
          'ove_jax.distributed.initialize: a multi-process run was requested '
          f'({_describe(setup, cluster)}) but the JAX backend has already started in this '
          'process, so it can only see its own devices. Call ove_jax.distributed.initialize() '
          'at the very start of the program, before anything else uses JAX (jax.devices(), '
          'creating arrays, jit, jax.config changes that start the backend).'
        )
      checked = _coordinator_to_check(setup, cluster, coordinator_address)
      if checked is not None:
        address, process, source = checked
        check_coordinator(address, process, initialization_timeout, source)
      logger.info('Starting jax.distributed: %s.', _describe(setup, cluster))
      jax.distributed.initialize(**setup)

  info = {
    'process_index': jax.process_index(),
    'process_count': jax.process_count(),
    'local_device_count': jax.local_device_count(),
    'global_device_count': jax.device_count(),
    'platform': jax.default_backend(),
  }
  logger.info(
    'JAX process %d/%d: %d local devices, %d global devices, platform %s.',
    info['process_index'],
    info['process_count'],
    info['local_device_count'],
    info['global_device_count'],
    info['platform'],
  )
  return info


def _coordinator_to_check(setup: Mapping[str, Any], cluster, argument) -> tuple | None:
  """(address, process id, where the address comes from) of the coordinator this process will
  use where it is known before jax.distributed starts: given (argument, OVE_COORDINATOR_ADDRESS),
  or JAX's for SLURM (the first host of SLURM_STEP_NODELIST and a port from SLURM_JOB_ID: a job
  whose port another program holds on that host would crash in JAX's start)."""
  if 'coordinator_address' in setup and 'process_id' in setup:
    given = 'argument coordinator_address' if argument else OVERRIDES[0][1]
    return setup['coordinator_address'], setup['process_id'], given
  if 'coordinator_address' not in setup and getattr(cluster, 'name', '') == 'slurm':
    process = setup['process_id'] if 'process_id' in setup else cluster.get_process_id()
    given = os.environ.get('JAX_COORDINATOR_ADDRESS', '').strip()
    if given:  # what JAX then uses as it is
      return _check_address(given, 'JAX_COORDINATOR_ADDRESS'), process, 'JAX_COORDINATOR_ADDRESS'
    port = os.environ.get('JAX_COORDINATOR_PORT', '').strip() or None
    address = cluster.get_coordinator_address(None, port)
    address = _check_address(address, 'JAX_COORDINATOR_PORT' if port else 'SLURM_JOB_ID')
    source = (
      f"SLURM job {os.environ.get('SLURM_JOB_ID', '')}'s coordinator {address} (JAX's: the "
      'first host of SLURM_STEP_NODELIST, a port from SLURM_JOB_ID or JAX_COORDINATOR_PORT; '
      f'JAX_COORDINATOR_PORT=port or {OVERRIDES[0][1]}=host:port on every task changes it)'
    )
    return address, process, source
  return None


def _describe(setup: Mapping[str, Any], cluster) -> str:
  detected = f'JAX detected {cluster.__name__}' if cluster is not None else 'no cluster detected'
  given = ', '.join(
    f'{k}={setup[k]}'
    for k in ('coordinator_address', 'num_processes', 'process_id', 'local_device_ids')
    if k in setup
  )
  return f'{detected}; given {given or "nothing else"}'


def _local_device_count(value: int | None) -> int | None:
  source = 'argument local_device_count'
  if value is None:
    value, source = os.environ.get('OVE_LOCAL_DEVICE_COUNT', '').strip(), 'OVE_LOCAL_DEVICE_COUNT'
    if not value:
      return None
  count = _as_int(value, source)
  if count < 1:
    raise ValueError(f'{source}={count}: the local device count must be at least 1.')
  return count


def use_cpu_devices(count: int, *, caller: str = 'ove_jax.distributed.use_cpu_devices') -> None:
  """`count` virtual CPU devices in this process (`jax_num_cpu_devices`; only the CPU backend
  reads it). It must run before the JAX backend starts; afterwards it is accepted only when the
  backend already has that many devices (or is not the CPU), else a RuntimeError says where to
  call it. A process started by another (a launcher, a test) gets its count from
  `cpu_devices_env` instead."""
  count = _as_int(count, 'the CPU device count')
  if count < 1:
    raise ValueError(f'{caller}: asked for {count} CPU devices; at least 1 is needed.')
  if not _backend_initialized():
    jax.config.update('jax_num_cpu_devices', count)
  elif jax.default_backend() == 'cpu' and jax.local_device_count() != count:
    raise RuntimeError(
      f'{caller}: asked for {count} CPU devices but the JAX backend already started with '
      f'{jax.local_device_count()}. Call it at the very start of the program, before any '
      'other JAX call (jax.devices(), jnp arrays, jit), or set '
      f'XLA_FLAGS={CPU_DEVICES_FLAG}=N before Python starts.'
    )


CPU_DEVICES_FLAG = '--xla_force_host_platform_device_count'


def cpu_devices_env(env: Mapping[str, str], count: int) -> dict[str, str]:
  """`env` for a child process that must start with `count` virtual CPU devices: its XLA_FLAGS
  with the device-count flag replaced (other flags kept, in order) and OVE_LOCAL_DEVICE_COUNT,
  which `initialize` reads."""
  out = dict(env)
  flags = [f for f in out.get('XLA_FLAGS', '').split() if not f.startswith(CPU_DEVICES_FLAG + '=')]
  out['XLA_FLAGS'] = ' '.join(flags + [f'{CPU_DEVICES_FLAG}={int(count)}'])
  out['OVE_LOCAL_DEVICE_COUNT'] = str(int(count))
  return out


def _backend_initialized() -> bool:
  # No public API says whether the backend exists; this private one has been stable for years.
  from jax._src import xla_bridge

  return xla_bridge.backends_are_initialized()


def is_main_process() -> bool:
  """True on process 0, the one that writes logs, checkpoints' metadata and summaries."""
  return jax.process_index() == 0


# ------------------------------------------------------------------------------------------------
# The persistent compilation cache
# ------------------------------------------------------------------------------------------------

CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
# Cache what took this long to compile: every train, eval and init step (seconds each even for
# the CPU demo), not the many tiny jits of array setup, whose entries would cost more to write to
# a bucket than to compile again (JAX's own default is 1 s, which misses small models' steps).
CACHE_MIN_COMPILE_SECONDS = 0.1


def check_compilation_cache(directory: str) -> None:
  """A ValueError naming JAX_COMPILATION_CACHE_DIR, else compilation_cache_dir, when the cache
  folder in use cannot be a folder (a file, or a path inside one; a bucket that is not there):
  JAX would only warn at each read and run without a cache."""
  source, fix = 'compilation_cache_dir', '--config.compilation_cache_dir="" for none'
  if os.environ.get(CACHE_ENV):
    source, directory, fix = CACHE_ENV, os.environ[CACHE_ENV], f'unset {CACHE_ENV}'
  why = directory and (paths.not_a_folder(directory) or paths.buckets_problem(directory))
  if why:
    raise ValueError(
      f'{source}={directory}: {why}; give a folder for the compilation cache, or {fix}'
    )


def use_compilation_cache(directory: str) -> str:
  """Turns on JAX's persistent compilation cache in `directory` (a local path or a URL JAX's
  cache can write, e.g. gs://) before the first compilation, so a restarted process loads its
  executables instead of compiling them. JAX_COMPILATION_CACHE_DIR, when set, wins (one cache
  shared by several runs, as `ove-sweep --run` does). '' and no variable: off; off as well for
  several CPU processes (see below). Returns the directory in use. A process that has compiled
  before keeps the cache it started with."""
  directory = os.environ.get(CACHE_ENV) or directory
  if directory and jax.process_count() > 1 and jax.default_backend() == 'cpu':
    # Seen with jax 0.10.2: a multi-process CPU run (gloo collectives) whose sharded train step
    # comes from the cache hangs in that step's first collective (accelerators: not tried here).
    logger.warning('compilation cache off: several CPU processes hang on cached executables')
    return ''
  if directory:
    jax.config.update('jax_compilation_cache_dir', directory)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', CACHE_MIN_COMPILE_SECONDS)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return directory
