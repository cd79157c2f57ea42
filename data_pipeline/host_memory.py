"""Keeping freed memory in the process: glibc malloc settings for processes that allocate and
free large arrays over and over (an XLA:CPU training step's temporaries; a codec worker's
per-frame maps).

glibc serves large blocks with mmap and gives them back to the kernel on free, and trims the
heap's free top; the next block of that size is faulted in again, page by page (on a VM each
fault is costly). `tune_malloc` keeps freed memory in the process (one malloc arena, no mmap'd
blocks, no trimming), so later blocks reuse pages already mapped. Same results, bit for bit:
only where the bytes live changes; the price is that the process's resident memory stays at its
peak.

Used by `ove_jax.host_runtime` (XLA:CPU steps: the dense 16k-token step spent more system time
in faults than user time in arithmetic) and by every worker of `data_pipeline.workers` (codec
selection on one thread: bikes, analysed at its full 640x272, went from 175-190 ms of CPU a
selection to 150-170 ms; docs/codec.md). Left alone when the user
configured malloc (GLIBC_TUNABLES naming glibc.malloc.*, or any MALLOC_* variable) or set
OVE_HOST_TUNING=0. Imports only the standard library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import MutableMapping

# mallopt parameters (glibc malloc.h) and the values tune_malloc sets.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# M_TRIM_THRESHOLD -1 turns trimming off (mallopt(3)); a finite threshold is an int, at most
# 2 GB, and a dense step's 4.5 GB of temporaries went back to the kernel at every step with it.
MALLOPT_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))

DISABLE_VAR = 'OVE_HOST_TUNING'

# What the last `configure_malloc` in this process did (None: never called).
APPLIED: str | None = None


def user_malloc_settings(environ: MutableMapping[str, str]) -> list[str]:
  """The environment variables by which the user already configured glibc malloc."""
  chosen = [k for k in environ if k.startswith('MALLOC_')]
  if 'glibc.malloc' in environ.get('GLIBC_TUNABLES', ''):
    chosen.append('GLIBC_TUNABLES')
  return chosen


def tune_malloc() -> bool:
  """Keeps freed memory in the process (see the module docstring); True when glibc took every
  setting. False off Linux/glibc."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
    return False
  return all(mallopt(param, value) == 1 for param, value in MALLOPT_SETTINGS)


def configure_malloc(environ: MutableMapping[str, str] | None = None) -> str:
  """tune_malloc unless the user configured malloc or set OVE_HOST_TUNING=0; says what it did
  (and keeps that in APPLIED). Worth it in a process whose one thread allocates and frees large
  arrays over and over (an XLA:CPU step's temporaries, a codec worker's maps); a GPU or TPU
  host's data threads keep glibc's defaults (one arena would serialise their allocations)."""
  global APPLIED
  environ = os.environ if environ is None else environ
  user = user_malloc_settings(environ)
  if environ.get(DISABLE_VAR, '1') == '0':
    APPLIED = f'left alone ({DISABLE_VAR}=0)'
  elif user:
    APPLIED = f'left to the user ({", ".join(user)})'
  else:
    APPLIED = 'one arena, no mmap, no trim' if tune_malloc() else 'not tuned (no glibc mallopt)'
  return APPLIED
