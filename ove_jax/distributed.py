"""Starting JAX for one process or many: the one call every entry point makes first.

A multi-process run (several hosts, or several processes on one machine for tests) needs
`jax.distributed.initialize` before anything touches the JAX backend: once the backend exists, it
only ever sees this process's devices. `initialize()` finds out whether such a run was asked for,
from explicit arguments, then `OVE_*` environment variables (set by tools/launch_local.py or by
hand), then SLURM, and starts `jax.distributed` only then. A plain single-process run needs none
of it. The resolution is pure (`from_environment`, `expand_slurm_nodelist`) so it is tested
without starting JAX.

Environment variables:
  OVE_COORDINATOR_ADDRESS  host:port of process 0's coordinator service
  OVE_NUM_PROCESSES        how many processes take part
  OVE_PROCESS_ID           this process's index, 0 .. OVE_NUM_PROCESSES - 1
  OVE_LOCAL_DEVICE_COUNT   virtual CPU devices per process (CPU only)
  OVE_COORDINATOR_PORT     the coordinator's port under SLURM (default 12355)
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

import jax

logger = logging.getLogger('ove_jax.distributed')

DEFAULT_SLURM_PORT = 12355

# (field, OVE variable, argument of `initialize`) for the three values a multi-process run needs.
_FIELDS = (
    ('coordinator_address', 'OVE_COORDINATOR_ADDRESS', 'coordinator_address'),
    ('num_processes', 'OVE_NUM_PROCESSES', 'num_processes'),
    ('process_id', 'OVE_PROCESS_ID', 'process_id'),
)


def expand_slurm_nodelist(text: str) -> list[str]:
  """Expands a SLURM host list such as `node[01-04,07],login` into host names, in order.

  Handles comma-separated hosts, bracketed ranges and lists (zero padding kept), and several
  bracket groups in one name (`r[1-2]n[1-2]`); that is all SLURM writes for plain clusters, so
  `scontrol show hostnames` is not needed (nor always installed where the job runs).
  """
  text = text.strip()
  if not text:
    return []
  hosts = []
  for item in _split_top_level(text):
    hosts.extend(_expand_one(item, text))
  return hosts


def _split_top_level(text: str) -> list[str]:
  """Splits at commas outside brackets."""
  items, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch == '[':
      depth += 1
    elif ch == ']':
      depth -= 1
      if depth < 0:
        raise ValueError(f'bad SLURM node list {text!r}: unbalanced "]"')
    elif ch == ',' and depth == 0:
      items.append(text[start:i])
      start = i + 1
  if depth:
    raise ValueError(f'bad SLURM node list {text!r}: unbalanced "["')
  items.append(text[start:])
  return [item.strip() for item in items if item.strip()]


def _expand_one(item: str, whole: str) -> list[str]:
  match = re.match(r'^([^\[]*)\[([^\]]*)\](.*)$', item)
  if match is None:
    return [item]
  prefix, body, rest = match.groups()
  names = []
  for part in body.split(','):
    part = part.strip()
    bounds = re.fullmatch(r'(\d+)(?:-(\d+))?', part)
    if bounds is None:
      raise ValueError(f'bad SLURM node list {whole!r}: cannot read range {part!r}')
    lo, hi = bounds.group(1), bounds.group(2) or bounds.group(1)
    if int(hi) < int(lo):
      raise ValueError(f'bad SLURM node list {whole!r}: range {part!r} runs backwards')
    names.extend(f'{prefix}{n:0{len(lo)}d}' for n in range(int(lo), int(hi) + 1))
  return [name + tail for name in names for tail in _expand_one(rest, whole)] if rest else names


def from_environment(env: Mapping[str, str]) -> dict | None:
  """The multi-process setup that `env` asks for, or None for a single-process run.

  Returns `{'coordinator_address', 'num_processes', 'process_id'}`. `OVE_*` variables win over
  SLURM value by value (so `OVE_COORDINATOR_ADDRESS` can override the SLURM coordinator). Raises
  ValueError naming the variable when a value is malformed or one of the three is missing.
  """
  return _resolve({}, env)


def _resolve(explicit: Mapping[str, Any], env: Mapping[str, str]) -> dict | None:
  """Merges explicit arguments over `OVE_*` over SLURM, field by field, and validates."""
  layers = [
      {k: (v, f'argument {k}') for k, v in explicit.items() if v is not None},
      _ove_values(env),
      _slurm_values(env),
  ]
  values, sources = {}, {}
  for field, _, _ in _FIELDS:
    for layer in layers:
      if field in layer:
        values[field], sources[field] = layer[field]
        break
  if not values:
    return None
  if 'num_processes' in values:
    num = _as_int(values['num_processes'], sources['num_processes'])
    if num == 1 and set(values) == {'num_processes'}:
      return None  # `OVE_NUM_PROCESSES=1` alone: a single-process run, said outright.
  missing = [(var, arg) for field, var, arg in _FIELDS if field not in values]
  if missing:
    given = ', '.join(sources[f] for f, _, _ in _FIELDS if f in sources)
    need = ', '.join(f'{var} (or the argument {arg})' for var, arg in missing)
    fix = ('Set all of OVE_COORDINATOR_ADDRESS, OVE_NUM_PROCESSES and OVE_PROCESS_ID, or none of '
           'them for a single-process run.')
    if any(src.startswith('SLURM') for src in sources.values()):
      fix += (' Under SLURM, start each task with srun, which sets SLURM_PROCID and '
              'SLURM_STEP_NODELIST.')
    raise ValueError(f'A multi-process run was asked for ({given}) but {need} is missing. {fix}')
  num = _as_int(values['num_processes'], sources['num_processes'])
  pid = _as_int(values['process_id'], sources['process_id'])
  if num < 1:
    raise ValueError(f'{sources["num_processes"]}={num}: the number of processes must be at '
                     'least 1.')
  if not 0 <= pid < num:
    raise ValueError(f'{sources["process_id"]}={pid} is out of range for '
                     f'{sources["num_processes"]}={num}: process ids run from 0 to {num - 1}.')
  address = _check_address(values['coordinator_address'], sources['coordinator_address'])
  if num == 1:
    return None
  return {'coordinator_address': address, 'num_processes': num, 'process_id': pid}


def _ove_values(env: Mapping[str, str]) -> dict:
  return {field: (env[var].strip(), var) for field, var, _ in _FIELDS
          if env.get(var, '').strip()}


def _slurm_values(env: Mapping[str, str]) -> dict:
  """The SLURM task layout, when this is one task of several (`SLURM_NTASKS` > 1).

  Start the program with `srun` (one task per process): a script run straight from the batch
  shell is a single task, but it sees the job's `SLURM_NTASKS` and would wait for tasks that never
  start.
  """
  ntasks = env.get('SLURM_NTASKS', '').strip()
  if not ntasks:
    return {}
  num = _as_int(ntasks, 'SLURM_NTASKS')
  if num <= 1:
    return {}
  values = {'num_processes': (num, 'SLURM_NTASKS')}
  if env.get('SLURM_PROCID', '').strip():
    values['process_id'] = (env['SLURM_PROCID'].strip(), 'SLURM_PROCID')
  nodelist_var = next((v for v in ('SLURM_STEP_NODELIST', 'SLURM_JOB_NODELIST')
                       if env.get(v, '').strip()), None)
  if nodelist_var is not None:
    hosts = expand_slurm_nodelist(env[nodelist_var])
    port = _as_int(env.get('OVE_COORDINATOR_PORT', '').strip() or DEFAULT_SLURM_PORT,
                   'OVE_COORDINATOR_PORT')
    values['coordinator_address'] = (f'{hosts[0]}:{port}',
                                     f'{nodelist_var} (first host) with OVE_COORDINATOR_PORT')
  return values


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
    raise ValueError(f'{source}={text!r}: the coordinator address must be host:port, e.g. '
                     '127.0.0.1:12355 (process 0 listens on that port; every process uses the '
                     'same address).')
  return text


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_count: int | None = None) -> dict:
  """Starts JAX for this run, multi-process when asked, and returns what it sees.

  Call it first, before any other JAX call: `jax.distributed` and the CPU device count can only
  be set before the backend starts. Calling it again later is fine (it re-reports). Returns
  `{'process_index', 'process_count', 'local_device_count', 'global_device_count',
  'platform'}`, and logs the same as one line.

  Args:
    coordinator_address: host:port of process 0; else `OVE_COORDINATOR_ADDRESS`, else SLURM.
    num_processes: else `OVE_NUM_PROCESSES`, else `SLURM_NTASKS`.
    process_id: else `OVE_PROCESS_ID`, else `SLURM_PROCID`.
    local_device_count: virtual CPU devices for this process, else `OVE_LOCAL_DEVICE_COUNT`;
      it sets `jax_num_cpu_devices`, which only the CPU backend reads.
  """
  explicit = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
              'process_id': process_id}
  setup = _resolve(explicit, os.environ)
  devices = _local_device_count(local_device_count)
  started = jax.distributed.is_initialized()
  backend_up = _backend_initialized()

  if devices is not None and not started:
    use_cpu_devices(devices, caller='ove_jax.distributed.initialize')

  if setup is not None and not started:
    if backend_up:
      raise RuntimeError(
          'ove_jax.distributed.initialize: a multi-process run was requested '
          f'({setup["num_processes"]} processes, coordinator {setup["coordinator_address"]}) '
          'but the JAX backend has already started in this process, so it can only see its '
          'own devices. Call ove_jax.distributed.initialize() at the very start of the '
          'program, before anything else uses JAX (jax.devices(), creating arrays, jit, '
          'jax.config changes that start the backend).')
    logger.info('Starting jax.distributed: process %d of %d, coordinator %s.',
                setup['process_id'], setup['num_processes'], setup['coordinator_address'])
    jax.distributed.initialize(coordinator_address=setup['coordinator_address'],
                               num_processes=setup['num_processes'],
                               process_id=setup['process_id'])
  elif setup is None and not started:
    logger.info('Single-process run: jax.distributed not started.')

  info = {
      'process_index': jax.process_index(),
      'process_count': jax.process_count(),
      'local_device_count': jax.local_device_count(),
      'global_device_count': jax.device_count(),
      'platform': jax.default_backend(),
  }
  logger.info('JAX process %d/%d: %d local devices, %d global devices, platform %s.',
              info['process_index'], info['process_count'], info['local_device_count'],
              info['global_device_count'], info['platform'])
  return info


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
        f'XLA_FLAGS={CPU_DEVICES_FLAG}=N before Python starts.')


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
