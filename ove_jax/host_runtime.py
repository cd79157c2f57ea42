"""Process settings that make XLA:CPU steps fast, applied by our command lines before JAX starts.

Measured with `ove-bench-encoder` (docs/benchmarks.md) on a 2-core CPU, two overheads outside the
arithmetic decided the figures:

  - page faults: XLA:CPU allocates a step's temporaries afresh on every run. glibc serves large
    blocks with mmap and returns them to the kernel on free, so every step faults its
    temporaries in again (the dense 16k-token step spent more system time in faults than user
    time in arithmetic). `tune_malloc` (`data_pipeline.host_memory`, which the input side's
    worker processes use too) keeps freed memory in the process (one malloc arena, no mmap'd
    blocks, no trimming), so from the second step on the temporaries reuse pages already
    mapped. Same results, bit for bit: only where the bytes live changes.
  - YNNPACK reduce fusions: XLA:CPU hands the softmax's reductions to YNNPACK, which ran them far
    slower than XLA's own loops. `CPU_XLA_FLAGS` turns them off (XLA's loops compute the same
    sums; the parity and scan tests pass either way).

`configure()` applies both unless the user already chose: a flag named in XLA_FLAGS is never
overridden, and malloc is left alone when GLIBC_TUNABLES sets glibc.malloc.* or any MALLOC_*
variable is set. `OVE_HOST_TUNING=0` turns all of it off. XLA reads XLA_FLAGS when its first
backend starts, so `configure()` must run before the first JAX computation (importing jax is
fine); the command lines call it first thing in main().
"""

from __future__ import annotations

import dataclasses
import os
from typing import MutableMapping

# The malloc half lives with the input side, whose worker processes tune it too.
from data_pipeline import host_memory
from data_pipeline.host_memory import DISABLE_VAR

# XLA:CPU flags added to XLA_FLAGS when the user's XLA_FLAGS does not name them.
CPU_XLA_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=-reduce',)


def add_xla_flags(environ: MutableMapping[str, str], flags=CPU_XLA_FLAGS) -> list[str]:
  """Appends each of `flags` to environ['XLA_FLAGS'] unless a flag of that name is already
  there; returns the flags added."""
  current = environ.get('XLA_FLAGS', '').split()
  named = {f.split('=', 1)[0] for f in current}
  added = [f for f in flags if f.split('=', 1)[0] not in named]
  if added:
    environ['XLA_FLAGS'] = ' '.join(current + added)
  return added


def configure(
  environ: MutableMapping[str, str] | None = None, malloc: bool = True
) -> dict[str, object]:
  """Applies CPU_XLA_FLAGS and (with `malloc`) tune_malloc where the user has not chosen
  otherwise; returns what was applied ({} when OVE_HOST_TUNING=0), for the command line to
  report. The XLA flags must come before JAX starts; malloc may be tuned later
  (`host_memory.configure_malloc`), once the process knows its backend is the CPU."""
  environ = os.environ if environ is None else environ
  if environ.get(DISABLE_VAR, '1') == '0':
    return {}
  applied: dict[str, object] = {'xla_flags': add_xla_flags(environ)}
  if malloc:
    applied['malloc'] = host_memory.configure_malloc(environ)
  return applied


@dataclasses.dataclass(frozen=True)
class Usage:
  """What this process has used so far (`process_usage`)."""

  user_s: float  # CPU seconds in user mode, all threads
  system_s: float  # CPU seconds in the kernel (on a CPU backend mostly page faults)
  page_faults: int  # minor + major: pages the kernel had to map in for the process


def process_usage() -> Usage:
  """User and system CPU time and page faults of this process so far (`getrusage`: microsecond
  CPU times where os.times() counts 10 ms ticks, a tenth of a 100 ms step). Off POSIX: os.times()
  and no fault count (0). Imports nothing heavy, so tools without JAX read it too."""
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:  # not POSIX
    t = os.times()
    return Usage(t.user, t.system, 0)
  u = resource.getrusage(resource.RUSAGE_SELF)
  return Usage(u.ru_utime, u.ru_stime, u.ru_minflt + u.ru_majflt)


def describe(applied: dict[str, object]) -> str:
  """One line for a log: what `configure` did."""
  if not applied:
    return f'host tuning off ({DISABLE_VAR}=0)'
  flags = ' '.join(applied['xla_flags']) or 'none (XLA_FLAGS already names them)'
  malloc = applied.get('malloc', 'tuned only on a CPU backend')
  return f'host tuning: XLA flags added: {flags}; malloc: {malloc}'
