"""Ahead-of-time memory planning: compile an experiment's train step for a target mesh, run nothing.

Out-of-memory errors on a 256-accelerator run should be found before the accelerators are
rented. `analyse(config, num_devices)` builds the trainer's `Program` for the experiment on N
virtual CPU devices (or this machine's own accelerators), lowers and compiles its train step from
abstract inputs (`jax.ShapeDtypeStruct` with the state's and batch's shardings: no parameter,
optimiser state or batch is ever allocated), and reports what one device would hold: its
shard of the float32 parameters and of the optimiser state, its share of one step's batch,
XLA's temporaries of the step and the total (arguments + outputs - donated + temporaries),
with whether the total fits an H100 (80 GB), an H200 (141 GB), a TPU v5p (95 GB) or a given
size, the analytic FLOPs per step the trainer uses for MFU, the compile time, and a check of the
compiled per-device program: no buffer of (batch x classes) for any head, since the class
centres and their logits are sharded by class (ove_jax.losses). `report_lines` formats it.

What the figures are: see the `ove-aot-memory` command's help (tools/aot_memory.py) and
docs/memory.md: `params`, `optimizer` and `batch` are exact; XLA:CPU's `temp` is an upper bound
for the large presets, for comparing settings.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Mapping, Sequence

# Device memory in GB (10^9 bytes) as the vendors name them. The usable capacity is a little
# above these (an H100 80GB reports 81,559 MiB), less what the runtime keeps for itself.
PRESETS = {'H100 80GB': 80.0, 'H200 141GB': 141.0, 'TPU v5p 95GB': 95.0}

_SHAPE_RE = re.compile(r'\b(pred|bf16|[suf]\d+|c\d+|f8e\w+?|f4e\w+?)\[([\d,]*)\]')
_ITEMSIZE = {'pred': 1, 'bf16': 2}


class PlanError(ValueError):
  """Bad input (a device count, a mesh, a config the mesh does not divide); the message names
  the flag of `ove-aot-memory` that sets it and the fix."""


# ------------------------------------------------------------------------------------------------
# The compiled program's buffers
# ------------------------------------------------------------------------------------------------


def hlo_shapes(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """Every array shape written in an HLO module's text, as (element type, dims), repeats kept.

  The text of a compiled SPMD program holds one device's shapes, fused intermediates included,
  so a shape that is absent here exists on no device.
  """
  return [
    (t, tuple(int(d) for d in dims.split(',') if d)) for t, dims in _SHAPE_RE.findall(hlo_text)
  ]


def _itemsize(element_type: str) -> int:
  if element_type in _ITEMSIZE:
    return _ITEMSIZE[element_type]
  bits = re.search(r'\d+', element_type)
  return max(1, int(bits.group()) // 8) if bits else 1


def batch_by_class_shapes(
  shapes, batch_sizes: Sequence[int], class_counts: Sequence[int]
) -> list[str]:
  """The shapes with a dimension in `batch_sizes` next to one in `class_counts` (either order).

  Such a buffer holds logits (or their gradient) over every class of a head for a whole batch:
  what the class-sharded loss exists to avoid. Adjacent dimensions, as a logits matrix
  [.., B, N] or its transpose has them: on small test models a batch size and a class count
  also turn up apart in unrelated shapes (rows x tokens x heads x rotary pairs). A batch of one
  is no batch dimension (it matches every unit dimension) and is left out. Shapes are written
  as HLO writes them.
  """
  batch_sizes = {b for b in batch_sizes if b >= 2}
  class_counts = set(class_counts)
  found = set()
  for element_type, dims in shapes:
    for x, y in zip(dims, dims[1:]):
      if (x in batch_sizes and y in class_counts) or (y in batch_sizes and x in class_counts):
        found.add(f'{element_type}[{",".join(map(str, dims))}]')
        break
  return sorted(found)


def largest_buffer(shapes) -> tuple[int, int, str]:
  """(elements, bytes, shape) of the largest array in the program."""
  best = (0, 0, '')
  for element_type, dims in shapes:
    n = math.prod(dims)
    if n > best[0]:
      best = (n, n * _itemsize(element_type), f'{element_type}[{",".join(map(str, dims))}]')
  return best


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard,
  which is every device's when the sizes divide)."""
  import jax
  import numpy as np

  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


# ------------------------------------------------------------------------------------------------
# Abstract inputs of the step
# ------------------------------------------------------------------------------------------------


def abstract_batch(program, config) -> dict[str, dict[str, Any]]:
  """One step's global batch ({head: fields}, [accumulate, rows, ...] leaves) as
  ShapeDtypeStructs with the shardings `Program.device_batch` gives the real arrays."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from data_pipeline import pipeline
  from ove_jax import config as config_lib
  from ove_jax import train

  data = pipeline.PipelineConfig.from_dict(
    config_lib.pipeline_dict(config, placeholder_sources=True)
  )
  sharding = NamedSharding(program.mesh, P(None, program.batch_axes or None))
  patch_dtype = np.uint8 if data.patch_dtype == 'uint8' else np.float32
  a = config.accumulate
  out = {}
  for name in sorted(program.heads):
    h = data.heads[name]
    r, length, s, n = h.rows, h.tokens_per_row, h.max_segments, h.get('num_labels')
    fields = {
      'patches': ((a, r, length, program.encoder_cfg.patch_dim), patch_dtype),
      'positions': ((a, r, length, 3), np.int32),
      'segment_ids': ((a, r, length), np.int32),
      'labels': ((a, r, s, n), np.int32),
      'segment_valid': ((a, r, s), np.bool_),
      'sample_index': ((a, r, s), np.int32),
      'skipped': ((a, r), np.int32),
    }
    if set(fields) != set(train.BATCH_FIELDS):  # the trainer's batch changed: follow it here
      raise RuntimeError(
        f'abstract_batch makes {sorted(fields)}, the trainer feeds {sorted(train.BATCH_FIELDS)}'
      )
    out[name] = {
      k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
      for k, (shape, dtype) in fields.items()
    }
  return out


# ------------------------------------------------------------------------------------------------
# Devices and mesh
# ------------------------------------------------------------------------------------------------


def compiler_options(platform: str) -> dict[str, Any]:
  """XLA:CPU's memory-minimising scheduler. Its default schedule is made for concurrency: it
  runs the rematerialised forward of every block early, so the plan keeps all their activations
  at once and `model.remat` seems to save nothing (the same temporaries with 'full' as with
  'none'); GPU and TPU schedule for memory."""
  if platform == 'cpu':
    return {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
  return {}


def cpu_devices(n: int) -> list:
  """N virtual CPU devices. Set before JAX's backend starts; when it has already started (a
  test, or a caller that used JAX), the first N of the devices it has."""
  import jax

  from ove_jax import distributed

  try:
    distributed.use_cpu_devices(n, caller='ove-aot-memory --devices')
  except RuntimeError:  # the backend is up with another count: its devices are fixed
    pass
  else:
    jax.config.update('jax_platforms', 'cpu')  # no effect once the backend is up
  devices = jax.devices()
  if len(devices) < n:
    raise PlanError(
      f'--devices={n}: this process already started JAX with {len(devices)} '
      f'devices; run it in a fresh process (ove-aot-memory ...)'
    )
  return devices[:n]


# ------------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------------


def local_devices(n: int) -> list:
  """The first N of this machine's own devices (GPUs, TPUs): their compiler's plan, not
  XLA:CPU's, for a mesh no larger than the machine."""
  import jax

  devices = jax.devices()
  if len(devices) < n:
    raise PlanError(
      f'--devices={n} with --platform=native: this machine has {len(devices)} '
      f'{devices[0].platform} device(s); use at most that many, or '
      '--platform=cpu for virtual devices'
    )
  return devices[:n]


def check_mesh(config, num_devices: int) -> None:
  """Refuses a config whose mesh does not fit `num_devices`, before JAX starts (fails fast)."""
  from ove_jax import config as config_lib
  from ove_jax import train

  try:
    train.mesh_shape(config, num_devices)
  except config_lib.ConfigError as e:
    raise PlanError(str(e)) from None


def plan_bytes(memory_analysis) -> dict[str, int]:
  """The compiler's per-device plan of an executable from `compiled.memory_analysis()`:
  arguments + outputs - aliased (donated) + temporaries; also what ove-gpu-check compares with."""
  m = memory_analysis
  plan = {
    'argument_bytes': m.argument_size_in_bytes,
    'output_bytes': m.output_size_in_bytes,
    'alias_bytes': m.alias_size_in_bytes,
    'temp_bytes': m.temp_size_in_bytes,
  }
  plan['total_bytes'] = (
    plan['argument_bytes'] + plan['output_bytes'] - plan['alias_bytes'] + plan['temp_bytes']
  )
  return plan


def analyse(
  config, num_devices: int, device_memory_gb: float | None = None, platform: str = 'cpu'
) -> dict[str, Any]:
  """Compiles the train step of `config` on `num_devices` devices (virtual CPU devices, or
  with platform='native' this machine's own); returns the report dict."""
  import contextlib

  import jax

  from ove_jax import config as config_lib
  from ove_jax import train
  from ove_jax.models import cpu_layouts

  devices = cpu_devices(num_devices) if platform == 'cpu' else local_devices(num_devices)
  # Virtual CPU devices stand for the target's accelerators: plan the program they run, plain
  # autodiff, not the CPU backend's own backward layouts (models/cpu_layouts.py).
  layouts = cpu_layouts.autodiff_layouts() if platform == 'cpu' else contextlib.nullcontext()
  try:
    mesh = train.make_mesh(config, devices)
  except config_lib.ConfigError as e:
    raise PlanError(f'--mesh / --devices={num_devices}: {e}') from None
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), layouts:
    try:
      program = train.Program(config, mesh)
    except config_lib.ConfigError as e:
      raise PlanError(f'--devices={num_devices}, mesh {dict(mesh.shape)}: {e}') from None
    batch = abstract_batch(program, config)
    t1 = time.perf_counter()
    lowered = program.step.lower(program.abstract_state, batch)
    t2 = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options(devices[0].platform))
    t3 = time.perf_counter()
  mem = compiled.memory_analysis()
  shapes = hlo_shapes(compiled.as_text())

  state = program.abstract_state
  params = shard_bytes(state['params'])
  optimizer = shard_bytes(state['opt_state'])
  batch_bytes = shard_bytes(batch)
  plan = plan_bytes(mem)
  argument, output, alias, temp, total = (
    plan[k] for k in ('argument_bytes', 'output_bytes', 'alias_bytes', 'temp_bytes', 'total_bytes')
  )

  batch_shards = math.prod(mesh.shape[a] for a in program.batch_axes)
  # A class count equal to another dimension of the model cannot be told apart in the HLO (small
  # test models only): it is not searched for. A batch size may equal one (a batch of 1024 rows,
  # width 1024): next to a full class count it is wrong whatever it is, except the width on one
  # device, where the whole [classes, width] centre matrix is rightly there.
  cfg = program.encoder_cfg
  other_dims = {
    cfg.width,
    cfg.head_dim,
    cfg.head_dim // 2,
    cfg.num_heads,
    cfg.mlp_dim,
    cfg.patch_dim,
    3,
  }
  for b in batch.values():
    other_dims |= {b['patches'].shape[2], *b['labels'].shape[2:]}  # tokens, segments, labels
  not_batch = {1} | ({cfg.width} if mesh.size == 1 else set())
  offending, unchecked = {}, []
  for name, h in sorted(program.heads.items()):
    rows, segments = batch[name]['labels'].shape[1:3]
    samples = rows * segments  # one micro-batch, the loss's global batch
    sizes = {samples, samples // batch_shards} - not_batch
    classes = {h.num_classes, h.padded_classes} - other_dims
    if not sizes or not classes:
      unchecked.append(name)
      continue
    found = batch_by_class_shapes(shapes, sizes, classes)
    if found:
      offending[name] = found
  elements, buffer_bytes, buffer_shape = largest_buffer(shapes)

  capacities = dict(PRESETS)
  if device_memory_gb:
    capacities[f'custom {device_memory_gb:g}GB'] = device_memory_gb
  return {
    'devices': num_devices,
    'mesh': {k: int(v) for k, v in mesh.shape.items()},
    'backend': devices[0].platform,
    'params_bytes': params,
    'optimizer_bytes': optimizer,
    'batch_bytes': batch_bytes,
    'argument_bytes': argument,
    'output_bytes': output,
    'alias_bytes': alias,
    'temp_bytes': temp,
    'total_bytes': total,
    'generated_code_bytes': mem.generated_code_size_in_bytes,
    'fits': {k: total <= gb * 1e9 for k, gb in capacities.items()},
    'flops_per_step': int(program.flops_per_step(batch)),
    'samples_per_step': int(sum(math.prod(b['labels'].shape[:3]) for b in batch.values())),
    'accumulate': int(config.accumulate),
    'max_buffer_elements': elements,
    'max_buffer_bytes': buffer_bytes,
    'max_buffer_shape': buffer_shape,
    'batch_by_classes_buffer': bool(offending),
    'batch_by_classes_shapes': offending,
    'batch_by_classes_unchecked': unchecked,
    'heads': {
      name: {
        'classes': h.num_classes,
        'padded_classes': h.padded_classes,
        'per_device_classes': h.padded_classes // num_devices,
      }
      for name, h in sorted(program.heads.items())
    },
    'setup_seconds': round(t1 - t0, 2),
    'lower_seconds': round(t2 - t1, 2),
    'compile_seconds': round(t3 - t2, 2),
  }


def _gb(n: int) -> str:
  return f'{n / 1e9:9.3f} GB'


def report_lines(r: Mapping[str, Any], spec: str) -> list[str]:
  mesh = ' x '.join(f'{k} {v}' for k, v in r['mesh'].items())
  lines = [
    f'{spec} on {r["devices"]} virtual {r["backend"]} devices, mesh {mesh}',
    f'  step: {r["samples_per_step"]} samples ({r["accumulate"]} accumulated micro-batches), '
    f'lowered in {r["lower_seconds"]:.1f} s, compiled in {r["compile_seconds"]:.1f} s',
    'per device:',
    f'  params (fp32 master)       {_gb(r["params_bytes"])}',
    f'  optimizer state            {_gb(r["optimizer_bytes"])}',
    f'  batch                      {_gb(r["batch_bytes"])}',
    f'  arguments (all inputs)     {_gb(r["argument_bytes"])}',
    f'  outputs                    {_gb(r["output_bytes"])}',
    f'  aliased (donated state)    {_gb(r["alias_bytes"])}',
    f'  temporaries (activations)  {_gb(r["temp_bytes"])}',
    f'  total                      {_gb(r["total_bytes"])}',
  ]
  for name, ok in r['fits'].items():
    lines.append(f'  fits {name:<21} {"yes" if ok else "NO"}')
  lines.append(f'largest buffer: {r["max_buffer_shape"]} ({r["max_buffer_bytes"] / 1e9:.3f} GB)')
  for name, h in r['heads'].items():
    lines.append(f'head {name}: {h["classes"]} classes, {h["per_device_classes"]} per device')
  if r['batch_by_classes_unchecked']:
    lines.append(
      'not checked for batch x classes buffers (a class count or batch size equals '
      f'another dimension of the model): {", ".join(r["batch_by_classes_unchecked"])}'
    )
  if r['batch_by_classes_buffer']:
    lines.append(
      "batch x classes buffers FOUND (a head's logits over all its classes): "
      + '; '.join(f'{k}: {", ".join(v)}' for k, v in r['batch_by_classes_shapes'].items())
    )
  elif len(r['batch_by_classes_unchecked']) < len(r['heads']):
    split = any(h['per_device_classes'] < h['padded_classes'] for h in r['heads'].values())
    where = '(class dimension sharded)' if split else '(one device holds every class: not sharded)'
    lines.append(f'no batch x classes buffer on any device {where}')
  lines.append(
    f'analytic FLOPs per step (for MFU): {r["flops_per_step"]:.4g} '
    f'({r["flops_per_step"] / r["devices"]:.4g} per device)'
  )
  return lines
