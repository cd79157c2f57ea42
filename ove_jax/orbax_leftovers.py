"""What a failed orbax restore leaves behind, kept out of a clean error's way.

When a restore fails (a damaged step: `checkpoint._read` turns it into one config error naming
the step and the way on), orbax's other reads of that restore are still under way: asyncio tasks
of its deserializer whose exceptions nobody retrieves, coroutines that never finish, and
tensorstore's callbacks into orbax's closed event loop. They end later, at garbage collection or
at exit, and Python reports each: asyncio logs 'Task exception was never retrieved' with the
task's traceback (through the 'asyncio' logger), the interpreter prints 'Exception ignored in ...'
(through `sys.unraisablehook`). Both came after the one-line error of a damaged step's exit 2,
hundreds of lines of the same failure, and only now and then (it depends on when the collector
runs). `quiet()` drops those, and only those, for the rest of the process.
"""

from __future__ import annotations

import logging
import os
import sys

_ORBAX = f'{os.sep}orbax{os.sep}'
_UNRETRIEVED = 'Task exception was never retrieved'


class _UnretrievedOrbaxTasks(logging.Filter):
  """Drops asyncio's report of an orbax task whose exception nobody retrieved (the task's repr,
  in the message, names the coroutine's file)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith(_UNRETRIEVED) and _ORBAX in message)


def _is_leftover(unraisable) -> bool:
  code = getattr(unraisable.object, 'cr_code', None)  # an orbax coroutine never finished
  if code is not None and _ORBAX in code.co_filename:
    return True
  exc = unraisable.exc_value  # a tensorstore callback into orbax's closed asyncio loop
  return isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'


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
