"""What a failed orbax restore leaves behind, kept out of a clean error's way.

When a restore fails (a damaged step: `checkpoint._read` turns it into one config error naming
the step and the way on), orbax's other reads of that restore are still under way: asyncio tasks
of its deserializer whose exceptions nobody retrieves, coroutines that never finish, and
tensorstore's callbacks into orbax's closed event loop. They end later, at garbage collection or
at exit, and Python reports each: asyncio logs 'Task exception was never retrieved' with the
task's traceback (through the 'asyncio' logger; '_GatheringFuture exception was never retrieved'
for the future of a gather of them), the interpreter prints 'Exception ignored in ...'
(through `sys.unraisablehook`). Both came after the one-line error of a damaged step's exit 2,
hundreds of lines of the same failure, and only now and then (it depends on when the collector
runs). `quiet()` drops those, and only those, for the rest of the process.
"""

from __future__ import annotations

import logging
import os
import re
import sys

_ORBAX = f'{os.sep}orbax{os.sep}'
# asyncio's report of a failed task or future (an asyncio.gather of orbax's reads: its class,
# '_GatheringFuture', starts the line) whose exception nobody retrieved.
_UNRETRIEVED = ' exception was never retrieved'


class _UnretrievedOrbaxTasks(logging.Filter):
  """Drops asyncio's report of an orbax task or future whose exception nobody retrieved: the
  task's repr in the message names the coroutine's file, and a future's exception was raised in
  orbax's code (its traceback, or that of the exception it was raised from, passes through it)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if not message.split('\n', 1)[0].endswith(_UNRETRIEVED):
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not (_ORBAX in message or _raised_in_orbax(record.exc_info) or _native_read(error))


# TensorStore's errors (what orbax's array reads raise) carry an absl status code first.
_STATUS = re.compile(r'^(FAILED_PRECONDITION|DATA_LOSS|NOT_FOUND|INVALID_ARGUMENT|UNKNOWN|'
                     r'INTERNAL|OUT_OF_RANGE|UNAVAILABLE|ABORTED|CANCELLED): ')  # fmt: skip


def _native_read(error) -> bool:
  """An error TensorStore set on a future from its own threads: no Python traceback, its
  message an absl status ('FAILED_PRECONDITION: Error reading ... in OCDBT database ...'). A
  plain future of orbax's reads ends so, its report naming no orbax file (a CI run's last
  stderr line, 'ValueError: FAILED_PRECONDITION: ... Truncated Zstd-compressed stream')."""
  return error is not None and error.__traceback__ is None and bool(_STATUS.match(str(error)))


def _raised_in_orbax(exc_info) -> bool:
  error, seen = exc_info[1] if exc_info else None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    tb = error.__traceback__
    while tb is not None:
      if _ORBAX in tb.tb_frame.f_code.co_filename:
        return True
      tb = tb.tb_next
    error = error.__cause__ or error.__context__
  return False


def _is_leftover(unraisable) -> bool:
  code = getattr(unraisable.object, 'cr_code', None)  # an orbax coroutine never finished
  if code is not None and _ORBAX in code.co_filename:
    return True
  exc = unraisable.exc_value  # a tensorstore callback into orbax's closed asyncio loop
  if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
    return True
  return unraisable.exc_traceback is None and _native_read(exc)


def quiet() -> None:
  """From now on this process drops the leftovers of failed orbax reads (see the module);
  anything else is reported as before. Installed once however often called."""
  asyncio_logger = logging.getLogger('asyncio')
  if not any(isinstance(f, _UnretrievedOrbaxTasks) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_UnretrievedOrbaxTasks())
  previous = sys.unraisablehook
  if getattr(previous, 'ove_quiets_failed_reads', False):
    return

  def hook(unraisable):
    if not _is_leftover(unraisable):
      previous(unraisable)

  hook.ove_quiets_failed_reads = True
  sys.unraisablehook = hook
