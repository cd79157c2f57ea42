"""Preemption: SIGTERM asks the trainer for a clean save at the end of the current step.

A cluster scheduler preempts a job with SIGTERM and a grace period before SIGKILL. `StopRequest`
turns the signal into a flag the loop reads between steps; `agree` makes every process of a
multi-host run stop at the same step (the signal reaches hosts at different steps, and a host
that saves while another steps on would hang the collectives).
"""
from __future__ import annotations

import signal

import jax
import numpy as np


class StopRequest:
  """While entered, SIGTERM sets `requested` instead of killing the process. The previous handler
  comes back on exit. Off the main thread (where Python allows no handler) it never fires."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> StopRequest:
    if hasattr(signal, 'SIGTERM'):
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: no handler, no clean stop
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc) -> bool:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def agree(flag: bool) -> bool:
  """True on every process when it is true on any. A collective: every process must call it at
  the same step."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))) > 0)
