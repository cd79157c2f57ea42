"""Logical axis names and the one table that maps them onto mesh axes.

Every parameter and every large activation of the models is annotated with *logical* axis names
(`embed`, `mlp`, `heads`, ...). A rules table, a tuple of `(logical_name, mesh_axes)` pairs held
in the experiment config, decides how each is laid out on the mesh (axes `data`, `fsdp`,
`tensor`). Changing the parallelism of a run means changing that table, never the model code.
"""
from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

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
