"""The mesh from sizes (`sharding.make_mesh`) and from `--mesh` strings (`sharding.parse_mesh`)."""

import jax
import pytest
from jax.sharding import AxisType

from ove_jax import sharding


@pytest.mark.parametrize(
  'text, sizes',
  [
    ('data=4,fsdp=2', {'data': 4, 'fsdp': 2, 'tensor': 1}),
    ('tensor=2, data=-1', {'data': -1, 'fsdp': 1, 'tensor': 2}),
    ('4x2x1', {'data': 4, 'fsdp': 2, 'tensor': 1}),
    ('-1,8,1', {'data': -1, 'fsdp': 8, 'tensor': 1}),
    ('2x2', {'data': 2, 'fsdp': 2, 'tensor': 1}),
  ],
)
def test_parse_mesh(text, sizes):
  assert sharding.parse_mesh(text) == sizes


@pytest.mark.parametrize(
  'text', ['data=4,expert=2', 'data=2,data=2', '4x2x1x1', 'a,b', '', '-1x-1x1', 'data=0']
)
def test_parse_mesh_refuses_with_the_forms(text):
  with pytest.raises(ValueError, match='mesh') as err:
    sharding.parse_mesh(text)
  assert 'at most one may be -1' in str(err.value) or 'data=4,fsdp=2' in str(err.value)


def test_make_mesh_from_sizes():
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 2})
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2, 'tensor': 1}
  assert mesh.axis_names == sharding.MESH_AXES
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  one = sharding.make_mesh({}, jax.devices()[:1])
  assert dict(one.shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}


def test_make_mesh_errors_say_what_does_not_fit():
  with pytest.raises(ValueError, match='needs 16 devices but this run has 8'):
    sharding.make_mesh({'data': 4, 'fsdp': 4})
  with pytest.raises(ValueError, match='fixed sizes \\(3\\) do not divide the 8 devices'):
    sharding.make_mesh({'data': 3, 'fsdp': -1})
  with pytest.raises(ValueError, match="'expert' is not one of"):
    sharding.make_mesh({'expert': 8})
  with pytest.raises(ValueError, match='at most one may be -1'):
    sharding.mesh_shape({'data': -1, 'fsdp': -1}, 8)
