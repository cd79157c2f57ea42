"""The host settings our command lines apply before JAX starts (ove_jax.host_runtime), and the
release-style packing of the encoder bench's PyTorch input (ove_jax.torch_comparison)."""

import sys

import numpy as np
import pytest

from data_pipeline import host_memory
from data_pipeline.tokens import patchify
from ove_jax import benchmarks, host_runtime, torch_comparison

FLAG = host_runtime.CPU_XLA_FLAGS[0]
FLAG_NAME = FLAG.split('=', 1)[0]


def test_flags_added_to_what_the_user_set():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  assert host_runtime.add_xla_flags(env) == list(host_runtime.CPU_XLA_FLAGS)
  assert env['XLA_FLAGS'].split() == [
    '--xla_force_host_platform_device_count=8',
    *host_runtime.CPU_XLA_FLAGS,
  ]
  assert host_runtime.add_xla_flags(env) == []  # idempotent
  empty = {}
  host_runtime.add_xla_flags(empty)
  assert empty['XLA_FLAGS'] == ' '.join(host_runtime.CPU_XLA_FLAGS)


def test_user_flag_value_is_never_overridden():
  env = {'XLA_FLAGS': f'{FLAG_NAME}=dot'}
  assert host_runtime.add_xla_flags(env) == [
    f for f in host_runtime.CPU_XLA_FLAGS if not f.startswith(FLAG_NAME + '=')
  ]
  assert f'{FLAG_NAME}=dot' in env['XLA_FLAGS'].split()
  assert FLAG not in env['XLA_FLAGS'].split()


def test_user_malloc_settings_are_left_alone():
  assert host_memory.user_malloc_settings({}) == []
  assert host_memory.user_malloc_settings({'MALLOC_ARENA_MAX': '2'}) == ['MALLOC_ARENA_MAX']
  env = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1', 'XLA_FLAGS': ''}
  assert host_memory.user_malloc_settings(env) == ['GLIBC_TUNABLES']
  applied = host_runtime.configure(env)
  assert applied['malloc'] == 'left to the user (GLIBC_TUNABLES)'
  assert 'GLIBC_TUNABLES' in host_runtime.describe(applied)
  assert host_memory.user_malloc_settings({'GLIBC_TUNABLES': 'glibc.rtld.nns=2'}) == []


def test_switched_off():
  env = {host_runtime.DISABLE_VAR: '0'}
  assert host_runtime.configure(env) == {}
  assert 'XLA_FLAGS' not in env
  assert host_runtime.DISABLE_VAR in host_runtime.describe({})


def test_malloc_tuned_on_glibc():
  # Only where the bytes live changes (the process keeps freed memory); safe to apply here.
  assert host_memory.tune_malloc() == sys.platform.startswith('linux')


def test_release_inputs_pack_patches_into_frames():
  rng = np.random.default_rng(0)
  k, ps = 2 * benchmarks.PATCHES_PER_FRAME, benchmarks.PATCH_SIZE
  patches = rng.standard_normal((2, k, ps * ps * 3), dtype=np.float32)
  flat = np.stack([np.sort(rng.choice(64 * 256, k, replace=False)) for _ in range(2)])
  g = benchmarks.GRID
  positions = np.stack([flat // (g * g), (flat // g) % g, flat % g], -1)
  pixels, indices = torch_comparison.release_inputs(patches, positions, ps)
  assert pixels.shape == (2, 3, 2, 224, 224) and pixels.flags['C_CONTIGUOUS']
  # The release's Conv2d sees frames whose patches, in order, are the K given ones.
  np.testing.assert_array_equal(patchify(pixels.transpose(0, 2, 3, 4, 1), ps), patches)
  np.testing.assert_array_equal(indices, flat)
  with pytest.raises(ValueError, match='multiple of 256'):
    torch_comparison.release_inputs(patches[:, :300], positions[:, :300], ps)


def test_malloc_waits_for_the_backend_when_asked():
  env = {'XLA_FLAGS': ''}
  applied = host_runtime.configure(env, malloc=False)
  assert 'malloc' not in applied and applied['xla_flags']
  assert 'tuned only on a CPU backend' in host_runtime.describe(applied)
  assert host_memory.configure_malloc({'MALLOC_ARENA_MAX': '4'}) == (
    'left to the user (MALLOC_ARENA_MAX)'
  )
  assert host_memory.configure_malloc({host_runtime.DISABLE_VAR: '0'}).startswith('left alone')
