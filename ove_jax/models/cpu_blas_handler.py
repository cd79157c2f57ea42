"""The XLA FFI handler behind `cpu_blas.matmul`: a numba `cfunc` that calls a BLAS's `sgemm_`.

XLA calls a typed FFI handler as `XLA_FFI_Error* handler(XLA_FFI_CallFrame*)` (the C API in
jaxlib's `xla/ffi/api/c_api.h`, version 0.x). The frame and the structures it points to are
read here as arrays of 64-bit words, at these offsets (x86-64 / aarch64 LP64 layout):

  XLA_FFI_CallFrame (struct_size 168: its traits end at attrs): 0 struct_size,
    1 extension_start, 2 api, 3 ctx, 4 stage, 5-9 args {struct_size, extension_start, size,
    types, args}, 10-14 rets (the same),
    15-20 attrs {struct_size, extension_start, size, types, names, attrs}, 21 future;
  XLA_FFI_Buffer: 3 data, 4 rank, 5 dims;  XLA_FFI_Scalar: 0 dtype, 1 value;
  XLA_FFI_Extension_Base: 0 struct_size, 1 type (1 = metadata), 2 next;
    metadata extension: 3 XLA_FFI_Metadata* {0 struct_size, 1-3 api_version (major and minor
    in its 32-bit words 6 and 7), 32-bit word 8 traits};
  XLA_FFI_Api: 6 XLA_FFI_Error_Create.

The handler answers XLA's metadata query with the API version it was written against, does
nothing at the instantiate / prepare / initialize stages, and at execute checks what it reads
(frame size, two float32 rank-2 arguments, one result, two scalar attributes) before calling
`sgemm_`; anything else is returned to XLA as an error with a message, not read blindly.

Row-major C[m, n] = op(A) @ op(B) is the column-major product C^T = op(B)^T @ op(A)^T, so the
Fortran call takes B first: sgemm_(tb, ta, n, m, k, 1, B, ldb, A, lda, 0, C, n).
"""

from __future__ import annotations

import ctypes

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

API_MAJOR, API_MINOR = 0, 3
FRAME_BYTES = 168  # XLA_FFI_DEFINE_STRUCT_TRAITS(XLA_FFI_CallFrame, attrs): up to attrs
EXECUTE = 3
METADATA = 1
F32 = 11
S32 = 4
SCALAR = 3
INVALID_ARGUMENT = 3

_MESSAGES = {
  'frame': b'ove cpu_blas: an XLA FFI call frame smaller than the handler reads (a jaxlib other '
  b'than the one of requirements.txt); set OVE_CPU_BLAS=0',
  'operands': b'ove cpu_blas: expected two float32 rank-2 operands, one result and the int32 '
  b'transpose_a / transpose_b attributes (0 or 1); set OVE_CPU_BLAS=0',
}
# Compiled handlers, kept for the process: XLA holds their addresses.
_COMPILED = []
# Kept alive for the process: the handler passes their addresses to XLA_FFI_Error_Create.
_BUFFERS = {key: ctypes.create_string_buffer(text) for key, text in _MESSAGES.items()}


def _address_as(pointer_type, doc: str):
  """An intrinsic that reads an int64 address as `pointer_type`."""

  def cast(typingctx, address):
    sig = pointer_type(types.int64)

    def codegen(context, builder, signature, args):
      return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen

  cast.__doc__ = doc
  return intrinsic(cast)


_words = _address_as(types.CPointer(types.int64), 'The 64-bit words at an address.')
_int32s = _address_as(types.CPointer(types.int32), 'The 32-bit integers at an address.')
_pointer = _address_as(types.voidptr, 'An address as a void pointer (a C argument).')


@intrinsic
def _call_error_create(typingctx, function, args_address):
  """XLA_FFI_Error_Create(args) through the function pointer `function`; returns the error."""
  sig = types.int64(types.int64, types.int64)

  def codegen(context, builder, signature, args):
    i64 = ir.IntType(64)
    fnty = ir.FunctionType(i64, [i64.as_pointer()])
    fn = builder.inttoptr(args[0], fnty.as_pointer())
    return builder.call(fn, [builder.inttoptr(args[1], i64.as_pointer())])

  return sig, codegen


def compile_handler(sgemm) -> int:
  """Compiles the handler around the ctypes function `sgemm` (Fortran sgemm_, 13 pointers) and
  returns its address."""
  frame_message = ctypes.addressof(_BUFFERS['frame'])
  operands_message = ctypes.addressof(_BUFFERS['operands'])

  @numba.njit(cache=False)
  def error(frame, message):
    api = _words(frame[2])
    create_args = np.zeros(4, np.int64)
    create_args[0] = 28  # offsetof(errc) + sizeof(errc)
    create_args[2] = message
    create_args[3] = INVALID_ARGUMENT
    return _call_error_create(api[6], create_args.ctypes.data)

  @numba.njit(cache=False)
  def operand(args, i):
    buf = _words(args[i])
    if (buf[2] & 0xFFFFFFFF) != F32 or buf[4] != 2:
      return 0, 0, 0
    dims = _words(buf[5])
    return buf[3], dims[0], dims[1]

  @numba.njit(cache=False)
  def scalar(attrs, types_, i):
    """Attribute i as a 0/1 flag: an int32 scalar (XLA_FFI_Scalar: 4-byte dtype, value*)."""
    if _int32s(types_)[i] != SCALAR:  # XLA_FFI_AttrType is a 4-byte enum
      return -1
    value = _words(attrs[i])
    if _int32s(attrs[i])[0] != S32:
      return -1
    flag = _int32s(value[1])[0]
    return flag if flag in (0, 1) else -1

  @numba.cfunc(types.int64(types.CPointer(types.int64)), nopython=True)
  def handler(frame):
    extension = frame[1]
    if extension != 0:
      base = _words(extension)
      if (base[1] & 0xFFFFFFFF) == METADATA:
        version = _int32s(base[3])  # XLA_FFI_Metadata as 32-bit words
        version[6], version[7] = API_MAJOR, API_MINOR  # api_version.major_version, minor
        version[8] = 0  # traits
        return 0
    if frame[0] < FRAME_BYTES:
      return error(frame, frame_message)
    if (frame[4] & 0xFFFFFFFF) != EXECUTE:
      return 0
    if frame[7] != 2 or frame[12] != 1 or frame[17] != 2:
      return error(frame, operands_message)
    args = _words(frame[9])
    a, a0, a1 = operand(args, 0)
    b, b0, b1 = operand(args, 1)
    c, c0, c1 = operand(_words(frame[14]), 0)
    transpose_a = scalar(_words(frame[20]), frame[18], 0)
    transpose_b = scalar(_words(frame[20]), frame[18], 1)
    if a == 0 or b == 0 or c == 0 or transpose_a < 0 or transpose_b < 0:
      return error(frame, operands_message)
    m, k = (a1, a0) if transpose_a else (a0, a1)
    n = b0 if transpose_b else b1
    if (b1 if transpose_b else b0) != k or c0 != m or c1 != n:
      return error(frame, operands_message)
    ints = np.empty(6, np.int32)
    ints[0], ints[1], ints[2] = n, m, k
    ints[3] = k if transpose_b else n  # ldb
    ints[4] = m if transpose_a else k  # lda
    ints[5] = n  # ldc
    scalars = np.empty(2, np.float32)
    scalars[0], scalars[1] = 1.0, 0.0
    flags = np.empty(2, np.uint8)
    flags[0] = 84 if transpose_b else 78  # 'T' / 'N'
    flags[1] = 84 if transpose_a else 78
    i, s = ints.ctypes.data, scalars.ctypes.data
    sgemm(
      _pointer(flags.ctypes.data),
      _pointer(flags.ctypes.data + 1),
      _pointer(i),
      _pointer(i + 4),
      _pointer(i + 8),
      _pointer(s),
      _pointer(b),
      _pointer(i + 12),
      _pointer(a),
      _pointer(i + 16),
      _pointer(s + 4),
      _pointer(c),
      _pointer(i + 20),
    )
    return 0

  _COMPILED.append(handler)  # the address must stay valid for the process
  return handler.address
