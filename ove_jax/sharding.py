"""Logical axis names and the one table that maps them onto mesh axes.

Every parameter and every large activation of the models is annotated with *logical* axis names
(`embed`, `mlp`, `heads`, ...). A rules table, a tuple of `(logical_name, mesh_axes)` pairs held
in the experiment config, decides how each is laid out on the mesh (axes `data`, `fsdp`,
`tensor`). Changing the parallelism of a run means changing that table, never the model code.

The mesh itself comes from sizes per axis (`make_mesh`), written in a config's `mesh` section or
on a command line as `--mesh data=4,fsdp=2` / `--mesh 4x2x1` (`parse_mesh`).
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
MESH_FORMS = (
  'data=4,fsdp=2 (axes not named have size 1), or sizes in the order data, fsdp, '
  'tensor: 4x2x1 or 4,2,1; one size may be -1 (the rest of the devices)'
)

# FSDP shards the model dimension of every weight matrix; tensor parallelism shards heads and
# the MLP hidden dimension (Megatron-style: column-parallel in, row-parallel out).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  # parameters
  ('embed', 'fsdp'),
  ('heads', 'tensor'),
  ('mlp', 'tensor'),
  ('patch', None),
  ('norm', None),
  # class centres of the cluster-discrimination heads: rows over every device (ove_jax.losses)
  ('classes', ('data', 'fsdp', 'tensor')),
  ('centre_embed', None),
  # the leading axis of scanned blocks' stacked parameters (models.encoder scan_layers)
  ('layers', None),
  # activations
  ('act_batch', ('data', 'fsdp')),
  ('act_length', None),
  ('act_embed', None),
  ('act_heads', 'tensor'),
  ('act_mlp', 'tensor'),
)


def logical_to_spec(names: Sequence[str | None], rules=DEFAULT_RULES) -> P:
  """Maps logical axis names to a PartitionSpec with `rules`; unknown names are replicated."""
  table = dict(rules)
  return P(*(table.get(n) if n is not None else None for n in names))


def batch_axes(mesh, rules=DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes the batch is split over: the `act_batch` rule, restricted to this mesh."""
  entry = dict(rules).get('act_batch')
  entry = (entry,) if isinstance(entry, str) else tuple(entry or ())
  return tuple(a for a in entry if a in mesh.axis_names)


def current_mesh():
  """The mesh set with `jax.set_mesh`, or None when there is none."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def constrain(x: jax.Array, names: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op when no mesh is set."""
  mesh = current_mesh()
  if mesh is None:
    return x
  spec = logical_to_spec(names, rules)
  # Drop mesh axes that this mesh lacks, so one table serves meshes of any subset of axes.
  spec = P(*(_keep_axes(s, mesh.axis_names) for s in spec))
  return jax.lax.with_sharding_constraint(x, spec)


def _keep_axes(entry, axis_names):
  if entry is None:
    return None
  if isinstance(entry, str):
    return entry if entry in axis_names else None
  kept = tuple(a for a in entry if a in axis_names)
  return kept or None


# ------------------------------------------------------------------------------------------------
# The mesh
# ------------------------------------------------------------------------------------------------


def _describe(sizes: Mapping[str, int]) -> str:
  return ' x '.join(f'{a}={sizes[a]}' for a in MESH_AXES)


def _check_sizes(sizes: Mapping[str, int]) -> None:
  if sum(v == -1 for v in sizes.values()) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
    raise ValueError(
      f'mesh {_describe(sizes)}: sizes are >= 1, and at most one may be -1 '
      '(the rest of the devices)'
    )


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """The size of every axis of MESH_AXES for `num_devices` devices: `sizes` maps axis names to
  sizes (a missing axis has size 1; one size may be -1, the rest of the devices). A ValueError
  says what does not fit."""
  unknown = sorted(set(sizes) - set(MESH_AXES) - set(DCN_KEYS))  # dcn_*: make_hybrid_mesh
  if unknown:
    raise ValueError(f'mesh axis {unknown[0]!r} is not one of {MESH_AXES}')
  full = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
  _check_sizes(full)
  known = math.prod(v for v in full.values() if v != -1)
  rest = [a for a, v in full.items() if v == -1]
  if rest:
    if num_devices % known:
      largest = max((a for a, v in full.items() if v > 1), key=full.get)
      raise ValueError(
        f'mesh {_describe(full)}: the fixed sizes ({known}) do not divide the {num_devices} '
        f'devices; make their product divide {num_devices} (e.g. {largest}='
        f'{_fitting(full, largest, num_devices)}), or run on a multiple of {known} devices'
      )
    full[rest[0]] = num_devices // known
  if math.prod(full.values()) != num_devices:
    raise ValueError(
      f'mesh {_describe(full)} needs {math.prod(full.values())} devices but this '
      f'run has {num_devices}; set one size to -1 (the rest) or change the sizes'
    )
  return tuple(full[a] for a in MESH_AXES)


def _fitting(full: Mapping[str, int], axis: str, num_devices: int) -> int:
  """The largest size of `axis` that makes the fixed sizes divide `num_devices`."""
  others = math.prod(v for a, v in full.items() if v != -1 and a != axis)
  return max(
    (
      d for d in range(1, full[axis] + 1) if full[axis] % d == 0 and num_devices % (others * d) == 0
    ),
    default=1,
  )


def make_mesh(
  sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all of them) with axes MESH_AXES of the given sizes (see
  `mesh_shape`), every axis `AxisType.Auto` (what `with_sharding_constraint` and Flax need)."""
  devices = list(devices) if devices is not None else jax.devices()
  if any(int(sizes.get(k, 1)) != 1 for k in DCN_KEYS):
    return make_hybrid_mesh(sizes, devices)
  shape = mesh_shape(sizes, len(devices))
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def parse_mesh(text: str) -> dict[str, int]:
  """Sizes from a `--mesh` string: `data=4,fsdp=2` (axes not named have size 1) or sizes in the
  order of MESH_AXES, `4x2x1` or `4,2,1` (missing trailing sizes are 1). One size may be -1."""
  text = text.strip()
  try:
    if '=' in text:
      sizes = {}
      for part in text.split(','):
        name, _, value = part.partition('=')
        name = name.strip()
        if name in sizes or name not in MESH_AXES:
          raise ValueError(name)
        sizes[name] = int(value)
    else:
      values = [int(v) for v in re.split(r'[x,]', text)]
      if not 1 <= len(values) <= len(MESH_AXES):
        raise ValueError(text)
      sizes = dict(zip(MESH_AXES, values))
  except ValueError:
    raise ValueError(f'mesh {text!r}: expected {MESH_FORMS}') from None
  sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
  _check_sizes(sizes)
  return sizes


# ------------------------------------------------------------------------------------------------
# Hybrid meshes: TPU slices or GPU nodes joined by the slower data-centre network (DCN)
# ------------------------------------------------------------------------------------------------

DCN_KEYS = tuple(f'dcn_{axis}' for axis in MESH_AXES)


def make_hybrid_mesh(
  sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """A mesh whose axes span several granules (TPU slices, GPU nodes) by the `dcn_*` sizes.

  `sizes` is a config's `mesh` section: `data`, `fsdp`, `tensor` are each axis's whole size (as
  for `make_mesh`; one may be -1) and `dcn_<axis>` how many granules it spans (default 1; it
  divides the axis's size). Each granule holds an equal block of every axis: only collectives
  along an axis with `dcn_<axis>` > 1 cross the slower network, so the batch axes (`data`, whose
  gradient all-reduce is the least traffic per step) belong there and fsdp/tensor within.

  Granules: TPU slices where the devices report `slice_index` (multi-slice; the layout within a
  slice follows its physical torus, `mesh_utils.create_hybrid_device_mesh`); otherwise
  processes, in order of process index, consecutive processes making one granule (one process
  per GPU node, or several per node when SLURM starts one per GPU; process ids go node by node);
  a single process (virtual CPU devices in tests) is cut into consecutive blocks of devices.
  """
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(sizes, len(devices))
  dcn = tuple(int(sizes.get(k, 1)) for k in DCN_KEYS)
  for axis, size, across in zip(MESH_AXES, shape, dcn):
    if across < 1 or size % across:
      raise ValueError(
        f'mesh.dcn_{axis}={across} must be >= 1 and divide mesh.{axis}={size} (mesh '
        f'{_describe(dict(zip(MESH_AXES, shape)))} on {len(devices)} devices): set '
        f'mesh.dcn_{axis} to a divisor of {size}, or mesh.{axis} to a multiple of it'
      )
  ici = tuple(size // across for size, across in zip(shape, dcn))
  if len({getattr(d, 'slice_index', 0) for d in devices}) > 1:
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    blocks = [
      mesh_utils.create_device_mesh(ici, group)
      for group in device_granules(devices, math.prod(dcn))
    ]
    grid = np.empty(dcn, dtype=object)
    for index, block in zip(np.ndindex(*dcn), blocks):
      grid[index] = block
    array = np.block(grid.tolist())
  return jax.sharding.Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_granules(devices: Sequence[jax.Device], count: int) -> list[list[jax.Device]]:
  """`devices` cut into `count` equal groups of whole processes, in order of (process index,
  device id); with one process, equal blocks of its devices. A ValueError says when the
  processes cannot be grouped so."""
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  if len(ordered) % count:
    raise ValueError(
      f'{len(ordered)} devices cannot be cut into {count} equal granules (the '
      'product of the mesh dcn_* sizes)'
    )
  size = len(ordered) // count
  groups = [ordered[i * size : (i + 1) * size] for i in range(count)]
  processes = [{d.process_index for d in group} for group in groups]
  process_count = len({d.process_index for d in ordered})
  if process_count > 1 and any(a & b for a, b in zip(processes, processes[1:])):
    raise ValueError(
      f'the mesh.dcn_* sizes ask for {count} granules (their product) of {size} devices, which '
      'would split a process between granules: make the product of mesh.dcn_data, '
      f'mesh.dcn_fsdp and mesh.dcn_tensor divide the {process_count} processes of this run'
    )
  return groups
