"""Float32 products through the host's MKL on the CPU backend (an XLA FFI custom call).

XLA:CPU multiplies float32 matrices with its own kernels (YNNPACK, Eigen). On the 2-core
development Xeon (AVX-512) Intel's MKL, which PyTorch's CPU wheel carries, is 1.10-1.37x faster
on every dense-layer product of an encoder step (`tools/bench_matmul.py`), and XLA:CPU's other
back ends (oneDNN, XNNPACK) changed nothing. So where an MKL is at hand the encoder's dense
layers (`cpu_layouts.dot_general`: forward, dx and dW) call its `sgemm` through a typed XLA FFI
handler: no copy, no Python, no GIL on the way; the handler is a numba `cfunc` that reads XLA's
call frame (`xla/ffi/api/c_api.h`, API 0.x) and calls the Fortran `sgemm_` on the buffers XLA
allocated. Everything else (attention, norms, fusions) stays XLA's.

Where the MKL comes from (`OVE_CPU_BLAS`):
  - unset or `auto`: the MKL inside the installed PyTorch CPU wheel (the `torch` extra):
    `torch/lib/libtorch_cpu.so` exports MKL's `sgemm_`; it is loaded with ctypes, torch itself
    is not imported. No torch, or a library that fails its check (`_sgemm`): XLA's own
    products, with one warning;
  - a path: a shared library exporting the LP64 Fortran `sgemm_` (the `mkl` wheel's
    `libmkl_rt.so.3`, say);
  - `0` / `off`: XLA's own products.

When it is used (`use_for`): the CPU backend, one device in the process (a product on sharded
operands is left to XLA's partitioner, which cannot split a custom call), float32 operands and
result, 2-D products of at least MIN_MULTIPLY_ADDS whose sizes fit the LP64 interface.
`xla_products()` switches it off while a function is traced (for comparisons), `blas_products()`
on for every float32 product (tests). `matmul` is differentiable to any order, and its outputs
carry a checkpoint name (SAVE_NAME) that the encoder's remat='dots' policy keeps.

Same maths: a float32 matrix product with float32 accumulation. The sums are taken in MKL's
order, not XLA's, so results differ from XLA's product by float rounding (relative 1e-6 on the
encoder's products); MKL's results are the same from run to run for the same thread count and
the 64-byte aligned buffers XLA hands it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

TARGET = 'ove_cpu_sgemm'
# [off, forced]: xla_products() / blas_products() while a function is traced.
_MODE = [False, False]
# LP64 sgemm takes 32-bit sizes.
MAX_DIM = 2**31 - 1
MKL_INTERFACE_LP64 = 0  # mkl_service.h
# The checkpoint name of a product's output, so remat policies that keep dots keep these too.
SAVE_NAME = 'cpu_blas_product'
# Smaller products stay XLA's: alone MKL is faster at every size measured, but inside a step the
# custom call costs its operands' layouts and XLA's fusions around it; the 'micro' bench step
# (products of 8-34 M multiply-adds) ran 5% slower in wall time with them on MKL, while width
# 256's step (134-537 M) and the 16k-token dense step (268 M) ran faster.
MIN_MULTIPLY_ADDS = 2**26


def _torch_mkl() -> Path | None:
  spec = importlib.util.find_spec('torch')
  if spec is None or not spec.submodule_search_locations:
    return None
  path = Path(next(iter(spec.submodule_search_locations))) / 'lib' / 'libtorch_cpu.so'
  return path if path.is_file() else None


def setting() -> str:
  return os.environ.get('OVE_CPU_BLAS', 'auto').strip() or 'auto'


def library_path() -> Path | None:
  """The library `OVE_CPU_BLAS` names, or the one `auto` finds; None when off or none found."""
  value = setting()
  if value.lower() in ('0', 'off', 'false', 'no'):
    return None
  if value.lower() == 'auto':
    return _torch_mkl()
  path = Path(value).expanduser()
  if not path.is_file():
    raise BlasError(
      f'OVE_CPU_BLAS={value}: no such file. Name a shared library exporting the Fortran sgemm_ '
      "(MKL's libmkl_rt.so), 'auto', or 0 to use XLA's own products."
    )
  return path


class BlasError(ValueError):
  """OVE_CPU_BLAS names a library that cannot serve the products."""


def check_setting() -> None:
  """Raises BlasError where OVE_CPU_BLAS names a library that cannot serve (missing, no LP64
  `sgemm_`), for command lines to refuse before any work; `auto` and `0` load nothing here."""
  path = library_path()
  if path is not None and setting().lower() != 'auto':
    _sgemm(str(path))


def describe(device_count: int = 1) -> str:
  """One line for a log: where a CPU run of `device_count` devices puts its float32 dense
  products. With one device it loads and checks the library, so a library named by OVE_CPU_BLAS
  that cannot serve raises BlasError here (with `auto`, the line says XLA's are used and why);
  with several it loads nothing (their products are sharded: XLA's)."""
  if device_count != 1:
    return f"CPU dense products: XLA's own ({device_count} devices: sharded)"
  path = library_path()
  if path is None:
    why = 'OVE_CPU_BLAS=' + setting() if setting().lower() != 'auto' else 'no torch wheel found'
    return f"CPU dense products: XLA's own ({why})"
  try:
    _sgemm(str(path))
  except BlasError as err:
    if setting().lower() != 'auto':
      raise
    return f"CPU dense products: XLA's own ({path} cannot serve them: {err})"
  return f'CPU dense products (one CPU device, float32): sgemm_ from {path} (OVE_CPU_BLAS=0: XLA)'


def _self_test(sgemm, path: str) -> None:
  """A 2x3 @ 3x2 product through `sgemm` with LP64 sizes; raises BlasError unless it is right.
  Each size sits in the low half of a 64-bit slot whose high half is 0x7FFF, so a library that
  reads 64-bit sizes (ILP64) sees sizes it refuses and leaves C untouched, rather than running."""
  a = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
  b = np.arange(1, 7, dtype=np.float32).reshape(3, 2)
  c = np.full((2, 2), np.nan, np.float32)
  # Row-major C = A @ B is column-major C^T = B^T A^T: sgemm_(N, N, n=2, m=2, k=3, ...).
  sizes = {
    name: np.array([v | (0x7FFF << 32)], np.int64) for name, v in dict(m=2, n=2, k=3).items()
  }
  ld = {name: np.array([v | (0x7FFF << 32)], np.int64) for name, v in dict(a=3, b=2, c=2).items()}
  no, one, zero = np.array([78], np.uint8), np.ones(1, np.float32), np.zeros(1, np.float32)
  pointer = ctypes.c_void_p
  sgemm(
    *(pointer(x.ctypes.data) for x in (no, no, sizes['n'], sizes['m'], sizes['k'], one, b)),
    *(pointer(x.ctypes.data) for x in (ld['b'], a, ld['a'], zero, c, ld['c'])),
  )
  if not np.array_equal(c, a @ b):
    raise BlasError(
      f'OVE_CPU_BLAS: {path}: its sgemm_ did not compute a 2x3 @ 3x2 product with 32-bit '
      "(LP64) sizes (an ILP64 build?). Name an LP64 MKL or set OVE_CPU_BLAS=0 to use XLA's own "
      'products.'
    )


@functools.cache
def _sgemm(path: str):
  """The ctypes `sgemm_` of the library at `path` (loaded once), checked by `_self_test`. An MKL
  single dynamic library (libmkl_rt) is set to its LP64 interface first: it reads
  MKL_INTERFACE_LAYER, which could ask for 64-bit sizes."""
  try:
    lib = ctypes.CDLL(path)
  except OSError as err:
    raise BlasError(
      f'OVE_CPU_BLAS: cannot load {path}: {err}. Set OVE_CPU_BLAS=0 to use XLA.'
    ) from err
  try:
    sgemm = lib.sgemm_
  except AttributeError as err:
    raise BlasError(
      f'OVE_CPU_BLAS: {path} exports no sgemm_ (the LP64 Fortran BLAS call). Name an MKL '
      "(libmkl_rt.so) or set OVE_CPU_BLAS=0 to use XLA's own products."
    ) from err
  sgemm.argtypes = [ctypes.c_void_p] * 13
  sgemm.restype = None
  set_layer = getattr(lib, 'MKL_Set_Interface_Layer', None)
  if set_layer is not None:
    set_layer.argtypes, set_layer.restype = [ctypes.c_int], ctypes.c_int
    set_layer(MKL_INTERFACE_LP64)
  _self_test(sgemm, path)
  return sgemm


@functools.cache
def _register(path: str) -> str:
  """Compiles the handler around `path`'s sgemm_ and registers it; returns its FFI target name
  (one per library, so a process that switches OVE_CPU_BLAS registers each once)."""
  from ove_jax.models import cpu_blas_handler  # numba: compiled (about 1 s) only when used

  address = cpu_blas_handler.compile_handler(_sgemm(path))
  name = f'{TARGET}_{_register.cache_info().currsize}'
  jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(address), platform='cpu')
  return name


def available() -> bool:
  """Whether products can go to a BLAS here (a library found, checked and registered). With
  `auto`, a torch wheel whose library cannot serve (see `_sgemm`) or a handler XLA refuses falls
  back to XLA's own products, with one warning; a library named by path raises BlasError."""
  path = library_path()
  if path is None:
    return False
  if setting().lower() != 'auto':
    return bool(_register(str(path)))
  return _auto_usable(str(path))


@functools.cache
def _auto_usable(path: str) -> bool:
  """`_register(path)` for `auto`, once per process: False, with a warning, where it fails."""
  try:
    return bool(_register(path))
  except Exception as err:  # pylint: disable=broad-except (anything: XLA's products still work)
    logging.warning(
      "OVE_CPU_BLAS=auto: %s cannot serve the products (%s); XLA's own are used", path, err
    )
    return False


@contextlib.contextmanager
def _mode(off: bool, forced: bool):
  saved = list(_MODE)
  _MODE[:] = [off, forced]
  try:
    yield
  finally:
    _MODE[:] = saved


def xla_products():
  """Functions traced inside use XLA's own products (for comparisons; jit caches by function,
  so trace a fresh function here)."""
  return _mode(True, False)


def blas_products():
  """Functions traced inside use the BLAS for every float32 product, small ones and where the
  process has several devices (for computations on one of them: unsharded operands); a library
  must be found."""
  return _mode(False, True)


def use_for(a, b, out_dtype, contracted: int | None = None) -> bool:
  """Whether the product of `a` and `b` (2-D after the caller's reshape) goes to the BLAS now;
  `contracted` is the size of the axis they share (default: a's last)."""
  off, forced = _MODE
  if off or jax.default_backend() != 'cpu' or not (forced or jax.device_count() == 1):
    return False
  if not all(jnp.dtype(d) == jnp.float32 for d in (a.dtype, b.dtype, out_dtype)):
    return False
  rows = int(np.prod(a.shape[:-1]))
  if max(rows, a.shape[-1], *b.shape) > MAX_DIM:
    return False
  multiply_adds = a.size * b.size // max(1, a.shape[-1] if contracted is None else contracted)
  if not forced and multiply_adds < MIN_MULTIPLY_ADDS:
    return False
  return available()


def matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False):
  """op(a) @ op(b) for 2-D float32 `a`, `b` (op transposes when asked), by the BLAS;
  differentiable to any order (its gradients are products of the same kind)."""
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(f'cpu_blas.matmul takes 2-D operands, got {a.shape} and {b.shape}')
  if a.dtype != jnp.float32 or b.dtype != jnp.float32:
    raise ValueError(f'cpu_blas.matmul takes float32 operands, got {a.dtype} and {b.dtype}')
  k = a.shape[0] if transpose_a else a.shape[1]
  if k != (b.shape[1] if transpose_b else b.shape[0]):
    raise ValueError(f'cpu_blas.matmul: contracted sizes differ ({a.shape}, {b.shape})')
  return _matmul(a, b, bool(transpose_a), bool(transpose_b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(a, b, transpose_a: bool, transpose_b: bool):
  m = a.shape[1] if transpose_a else a.shape[0]
  k = a.shape[0] if transpose_a else a.shape[1]
  n = b.shape[0] if transpose_b else b.shape[1]
  if 0 in (m, n, k):
    return jnp.zeros((m, n), jnp.float32)  # nothing to multiply; sgemm refuses a zero stride
  path = library_path()
  if path is None:
    raise BlasError("cpu_blas.matmul: no BLAS (OVE_CPU_BLAS is off or no torch wheel); use XLA's")
  call = jax.ffi.ffi_call(
    _register(str(path)), jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method='sequential'
  )
  return call(a, b, transpose_a=np.int32(transpose_a), transpose_b=np.int32(transpose_b))


def _matmul_fwd(a, b, transpose_a, transpose_b):
  return _matmul(a, b, transpose_a, transpose_b), (a, b)


def _matmul_bwd(transpose_a, transpose_b, residuals, dc):
  """C = op(A) op(B): d op(A) = dC op(B)^T and d op(B) = op(A)^T dC, transposed back where
  op transposed; each one product of this kind, with its own flags."""
  a, b = residuals
  if transpose_a:  # dA = (dC op(B)^T)^T = op(B) dC^T
    da = _matmul(b, dc, transpose_b, True)
  else:
    da = _matmul(dc, b, False, not transpose_b)
  if transpose_b:  # dB = (op(A)^T dC)^T = dC^T op(A)
    db = _matmul(dc, a, True, transpose_a)
  else:
    db = _matmul(a, dc, not transpose_a, False)
  return da, db


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
