"""The CPU dense products through MKL's sgemm_ (ove_jax/models/cpu_blas.py): the FFI handler
against float64 numpy, its error path, the dense layer and a whole encoder step against XLA's
own products, when it is used (one device) and when not (several, switched off), and the
configuration errors."""

import ctypes
import dataclasses
import glob
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ove_jax import benchmarks as bench
from ove_jax import convert
from ove_jax.models import EncoderConfig, cpu_blas, cpu_layouts, create_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hlo(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize(
  'm,k,n', [(1, 1, 1), (3, 5, 7), (17, 33, 1), (64, 48, 96), (0, 4, 5), (4, 0, 5)]
)
@pytest.mark.parametrize('transpose_a', [False, True])
@pytest.mark.parametrize('transpose_b', [False, True])
def test_matmul_equals_float64_numpy(m, k, n, transpose_a, transpose_b):
  rng = np.random.default_rng(m * 100 + k * 10 + n)
  a = rng.standard_normal((k, m) if transpose_a else (m, k)).astype(np.float32)
  b = rng.standard_normal((n, k) if transpose_b else (k, n)).astype(np.float32)
  got = jax.jit(
    lambda x, y: cpu_blas.matmul(x, y, transpose_a=transpose_a, transpose_b=transpose_b)
  )(a, b)
  want = (a.T if transpose_a else a).astype(np.float64) @ (b.T if transpose_b else b)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_matmul_is_repeatable_and_batches_under_vmap():
  rng = np.random.default_rng(1)
  a, b = rng.random((3, 40, 24), np.float32), rng.random((3, 24, 56), np.float32)
  batched = jax.jit(jax.vmap(cpu_blas.matmul))
  first, second = np.asarray(batched(a, b)), np.asarray(batched(a, b))
  assert np.array_equal(first, second)
  np.testing.assert_allclose(first, np.einsum('bmk,bkn->bmn', a, b), rtol=1e-5)


def test_the_handler_returns_an_error_for_operands_it_cannot_take():
  target = cpu_blas._register(str(cpu_blas.library_path()))
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((2, 2), jnp.float32))
  flags = {'transpose_a': np.int32(0), 'transpose_b': np.int32(0)}
  with pytest.raises(Exception, match='ove cpu_blas: expected two float32 rank-2 operands'):
    jax.block_until_ready(
      jax.jit(lambda x, y: call(x, y, **flags))(jnp.ones((2, 2), jnp.int32), jnp.ones((2, 2)))
    )
  with pytest.raises(Exception, match='ove cpu_blas: expected'):  # no attributes
    jax.block_until_ready(jax.jit(lambda x, y: call(x, y))(jnp.ones((2, 2)), jnp.ones((2, 2))))


def _dense_loss(kernel, bias, x):
  y = cpu_layouts.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias
  return jnp.sum(jnp.sin(y) * y)


@pytest.mark.parametrize('d_in,d_out', [(48, 96), (96, 48)])
def test_dense_layer_forward_and_gradients_equal_xla_products(d_in, d_out):
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.standard_normal((d_in, d_out)).astype(np.float32) * 0.1)
  bias = jnp.asarray(rng.standard_normal(d_out).astype(np.float32))
  x = jnp.asarray(rng.standard_normal((2, 37, d_in)).astype(np.float32))

  def step():  # a fresh function for each setting: jit caches traces by function
    return jax.value_and_grad(_dense_loss, argnums=(0, 1, 2))

  with cpu_blas.blas_products():
    assert cpu_blas.use_for(x, kernel, jnp.float32)
    assert _hlo(step(), kernel, bias, x).count(f'custom_call_target="{cpu_blas.TARGET}') == 3
    blas_value, blas_grads = jax.jit(step())(kernel, bias, x)
  with cpu_blas.xla_products():
    assert cpu_blas.TARGET not in _hlo(step(), kernel, bias, x)
    value, grads = jax.jit(step())(kernel, bias, x)
  np.testing.assert_allclose(blas_value, value, rtol=1e-5)
  for got, want in zip(blas_grads, grads):
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_not_used_with_several_devices_nor_for_bfloat16():
  x, kernel = jnp.ones((4, 8)), jnp.ones((8, 16))
  assert jax.device_count() == 8  # conftest: a sharded step's products stay XLA's
  assert not cpu_blas.use_for(x, kernel, jnp.float32)
  assert cpu_blas.TARGET not in _hlo(jax.grad(_dense_loss), kernel, jnp.zeros(16), x)
  with cpu_blas.blas_products():
    assert not cpu_blas.use_for(x.astype(jnp.bfloat16), kernel, jnp.bfloat16)
    assert not cpu_blas.use_for(x, kernel, jnp.bfloat16)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_encoder_step_equals_xla_products(scan_layers):
  cfg = dataclasses.replace(EncoderConfig.preset('tiny'), depth=2, scan_layers=scan_layers)
  params = convert.model_params(create_encoder(cfg, seed=4))
  rng = np.random.RandomState(0)
  patches = jnp.asarray(rng.randn(2, 40, cfg.patch_dim).astype(np.float32))
  positions = jnp.asarray(rng.randint(0, 8, (2, 40, 3)))

  def run():
    step, _, state = bench.make_jax_step(convert.model_from_params(cfg, params))
    hlo = step.lower(state, patches, positions).compile().as_text()
    loss, grads = step(state, patches, positions)
    return hlo, float(loss), {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}

  with cpu_blas.blas_products():
    hlo, blas_loss, blas_grads = run()
  assert cpu_blas.TARGET in hlo
  with cpu_blas.xla_products():
    hlo, loss, grads = run()
  assert cpu_blas.TARGET not in hlo
  assert blas_loss == pytest.approx(loss, rel=1e-5)
  noise = 1e-6 * max(np.abs(g).max() for g in grads.values())
  for path, want in grads.items():
    assert np.abs(blas_grads[path] - want).max() <= 1e-5 * np.abs(want).max() + noise, path


def _child_env(**extra):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device
  env['PYTHONPATH'] = ROOT
  env.update(extra)
  return env


def test_a_one_device_process_uses_it_by_default_for_large_products_only():
  script = (
    'import hashlib, jax, numpy as np\n'
    'from ove_jax.models import cpu_layouts\n'
    'f = lambda x, w: cpu_layouts.dot_general(x, w, (((1,), (0,)), ((), ())))\n'
    'rng = np.random.default_rng(0)\n'
    'for m, k, n in ((2048, 256, 768), (2048, 64, 256)):\n'
    '  x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)\n'
    '  hlo = jax.jit(f).lower(x, w).compile().as_text()\n'
    '  digest = hashlib.sha256(np.asarray(jax.jit(f)(x, w)).tobytes()).hexdigest()\n'
    '  print(jax.device_count(), "ove_cpu_sgemm" in hlo, digest)\n'
  )

  def run(**env):
    done = subprocess.run(
      [sys.executable, '-c', script], env=_child_env(**env), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [line.split() for line in done.stdout.splitlines()]

  first = run()
  (devices, big, _), (_, small, _) = first
  # 403 M multiply-adds go to MKL; 34 M (a 'micro' step's) stay XLA's (cpu_blas.MIN_MULTIPLY_ADDS).
  assert (devices, big, small) == ('1', 'True', 'False')
  assert run() == first  # the same bits in another process
  assert [(device, used) for device, used, _ in run(OVE_CPU_BLAS='0')] == [('1', 'False')] * 2


def test_bad_settings_are_named(monkeypatch):
  monkeypatch.setenv('OVE_CPU_BLAS', '/no/such/libmkl_rt.so')
  with pytest.raises(cpu_blas.BlasError, match='OVE_CPU_BLAS=/no/such/libmkl_rt.so: no such file'):
    cpu_blas.describe()
  # numpy's OpenBLAS is ILP64 with prefixed names: no LP64 sgemm_.
  openblas = glob.glob(os.path.join(os.path.dirname(np.__file__), '..', 'numpy.libs', '*openblas*'))
  monkeypatch.setenv('OVE_CPU_BLAS', openblas[0])
  with pytest.raises(cpu_blas.BlasError, match='exports no sgemm_'):
    cpu_blas.describe()
  monkeypatch.setenv('OVE_CPU_BLAS', '0')
  assert "XLA's own (OVE_CPU_BLAS=0)" in cpu_blas.describe()
  monkeypatch.setenv('OVE_CPU_BLAS', '/no/such/libmkl_rt.so')  # several devices: nothing loaded
  assert cpu_blas.describe(8) == "CPU dense products: XLA's own (8 devices: sharded)"
  monkeypatch.setenv('OVE_CPU_BLAS', '0')
  with cpu_blas.blas_products():
    assert not cpu_blas.use_for(jnp.ones((2, 2)), jnp.ones((2, 2)), jnp.float32)
  monkeypatch.setenv('OVE_CPU_BLAS', str(cpu_blas._torch_mkl()))  # a path, as a user names MKL
  assert 'sgemm_ from' in cpu_blas.describe()
  cpu_blas.check_setting()
  monkeypatch.setenv('OVE_CPU_BLAS', openblas[0])
  with pytest.raises(cpu_blas.BlasError, match='exports no sgemm_'):
    cpu_blas.check_setting()
  monkeypatch.setenv('OVE_CPU_BLAS', 'auto')
  cpu_blas.check_setting()  # loads nothing: a GPU or TPU run never maps the torch library


def test_ove_train_refuses_a_bad_setting_before_any_work(tmp_path):
  run = subprocess.run(
    [
      sys.executable,
      '-m',
      'ove_jax.train',
      f'--config={ROOT}/experiments/demo_cpu.py:smoke',
      f'--workdir={tmp_path / "run"}',
    ],
    env=_child_env(OVE_CPU_BLAS=str(tmp_path / 'missing.so')),
    capture_output=True,
    text=True,
  )
  assert run.returncode == 2 and 'Traceback' not in run.stderr, run.stderr[-3000:]
  assert f'config error: OVE_CPU_BLAS={tmp_path / "missing.so"}: no such file' in run.stderr
  assert not (tmp_path / 'run').exists()


def test_the_handler_refuses_flags_that_are_not_int32():
  target = cpu_blas._register(str(cpu_blas.library_path()))
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((3, 3), jnp.float32))
  a = jnp.asarray(np.arange(9, dtype=np.float32).reshape(3, 3))
  for flags in (
    {'transpose_a': np.bool_(False), 'transpose_b': np.bool_(False)},  # a 1-byte PRED
    {'transpose_a': np.int32(0), 'transpose_b': np.int32(2)},  # neither 0 nor 1
  ):
    with pytest.raises(Exception, match='int32 transpose_a / transpose_b attributes'):
      jax.block_until_ready(jax.jit(lambda x, flags=flags: call(x, x, **flags))(a))


@pytest.mark.parametrize('transpose_a', [False, True])
@pytest.mark.parametrize('transpose_b', [False, True])
def test_matmul_gradients_to_second_order_equal_xla(transpose_a, transpose_b):
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.standard_normal((6, 5) if transpose_a else (5, 6)).astype(np.float32))
  b = jnp.asarray(rng.standard_normal((7, 6) if transpose_b else (6, 7)).astype(np.float32))

  def op(x, t):
    return x.T if t else x

  def loss(product):
    def value(a, b):
      return jnp.sum(jnp.sin(product(a, b)))

    # The gradient's own norm, differentiated again: second order through the products.
    return lambda a, b: jnp.sum(
      jnp.square(jnp.concatenate([g.ravel() for g in jax.grad(value, (0, 1))(a, b)]))
    )

  blas = jax.grad(
    loss(lambda a, b: cpu_blas.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)),
    (0, 1),
  )(a, b)
  want = jax.grad(loss(lambda a, b: op(a, transpose_a) @ op(b, transpose_b)), (0, 1))(a, b)
  for got, ref in zip(blas, want):
    # float32 rounding of terms as large as the largest entry: an entry near zero is a
    # cancellation of such terms, so the absolute tolerance scales with them (MKL's kernels, and
    # so their rounding, differ between CPUs: an AMD EPYC's missed 1e-5 by 6e-5 on an entry of
    # 0.039 among entries up to 30).
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


def test_remat_dots_keeps_the_blas_products_as_it_keeps_dots():
  cfg = EncoderConfig.preset('tiny')
  counts = {}
  for remat in ('none', 'dots', 'full'):
    model = create_encoder(dataclasses.replace(cfg, depth=2, remat=remat), seed=0)
    x, pos = jnp.ones((2, 40, cfg.patch_dim)), jnp.zeros((2, 40, 3), jnp.int32)
    with cpu_blas.blas_products():
      step, _, state = bench.make_jax_step(model)
      counts[remat] = step.lower(state, x, pos).compile().as_text().count(cpu_blas.TARGET)
  # 'dots' saves the forward products (no recompute), 'full' recomputes them.
  assert counts['none'] == counts['dots'] < counts['full']


def _python_sgemm(size_bytes):
  """A ctypes sgemm_ reading sizes of `size_bytes` (4: LP64, 8: ILP64) that refuses sizes over
  2^31 as a BLAS's parameter check does; computes column-major C = A B for 'N', 'N'."""

  def read(address):
    return (
      ctypes.c_int64.from_address(address).value
      if size_bytes == 8
      else ctypes.c_int32.from_address(address).value
    )

  @ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 13)
  def sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    m, n, k, lda, ldb, ldc = (read(p) for p in (m, n, k, lda, ldb, ldc))
    if max(m, n, k, lda, ldb, ldc) > 2**31:
      return  # refused: C untouched
    av = np.ctypeslib.as_array((ctypes.c_float * (lda * k)).from_address(a)).reshape(k, lda).T[:m]
    bv = np.ctypeslib.as_array((ctypes.c_float * (ldb * n)).from_address(b)).reshape(n, ldb).T[:k]
    cv = np.ctypeslib.as_array((ctypes.c_float * (ldc * n)).from_address(c)).reshape(n, ldc)
    cv[:, :m] = (av @ bv).T

  return sgemm


def test_the_library_self_test_refuses_64_bit_sizes():
  cpu_blas._self_test(_python_sgemm(4), 'lp64.so')  # passes
  with pytest.raises(cpu_blas.BlasError, match='ilp64.so: its sgemm_ did not compute .* LP64'):
    cpu_blas._self_test(_python_sgemm(8), 'ilp64.so')


def test_auto_falls_back_to_xla_when_the_torch_library_cannot_serve(monkeypatch, caplog):
  openblas = glob.glob(os.path.join(os.path.dirname(np.__file__), '..', 'numpy.libs', '*openblas*'))
  monkeypatch.setattr(cpu_blas, '_torch_mkl', lambda: Path(openblas[0]))
  monkeypatch.setenv('OVE_CPU_BLAS', 'auto')
  with cpu_blas.blas_products():
    assert not cpu_blas.use_for(jnp.ones((2, 2)), jnp.ones((2, 2)), jnp.float32)
  assert 'exports no sgemm_' in caplog.text and "XLA's own are used" in caplog.text
  assert cpu_blas.describe().startswith("CPU dense products: XLA's own (")
