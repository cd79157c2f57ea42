"""The device prefetcher: the next steps' batches, read and put on the devices in a thread.

The train step should wait neither for the input workers (while they keep up) nor for the
host-to-device copy. `DevicePrefetch` reads this host's micro-batches from the input iterator and
turns them into global device arrays `size` steps ahead. Each item carries the iterator position
after its batches: what a checkpoint saved after that step must hold, however far the thread has
read ahead (so a resumed run repeats the uninterrupted one exactly). `device_batch` makes those
global arrays from the host's share.
"""

from __future__ import annotations

import json
import queue
import signal
import threading
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# What the step reads of each head's batch; `skipped` is made here from `num_skipped`.
BATCH_FIELDS = (
  'patches',
  'positions',
  'segment_ids',
  'labels',
  'segment_valid',
  'sample_index',
  'skipped',
)


def device_batch(
  host_batches: Sequence[Mapping[str, Mapping[str, np.ndarray]]],
  mesh: jax.sharding.Mesh,
  batch_axes: Sequence[str],
) -> dict:
  """Stacks this host's micro-batches ({head: fields}) and makes global [A, rows, ...] arrays
  whose rows are split over `batch_axes` of the mesh, each host holding its share."""
  sharding = NamedSharding(mesh, P(None, tuple(batch_axes) or None))
  out = {}
  for name in sorted(host_batches[0]):
    fields = {}
    for key in BATCH_FIELDS:
      if key == 'skipped':  # this host's dropped records, on its first row (summed in the step)
        rows = np.asarray(host_batches[0][name]['segment_valid']).shape[0]
        local = np.zeros((len(host_batches), rows), np.int32)
        local[:, 0] = [int(b[name]['num_skipped']) for b in host_batches]
      else:
        local = np.stack([np.asarray(b[name][key]) for b in host_batches])
      if key == 'sample_index':
        local = (local % (2**31 - 1)).astype(np.int32)
      global_shape = (local.shape[0], local.shape[1] * jax.process_count()) + local.shape[2:]
      fields[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    out[name] = fields
  return out


class DevicePrefetch:
  """`next()` gives (device batch, input position after it as JSON); StopIteration when the
  input ends; an error of the thread is raised there too. `to_device` turns a list of
  `accumulate` host micro-batches into the step's device batch."""

  _END = object()

  def __init__(
    self, iterator, to_device: Callable[[Sequence[Any]], Any], accumulate: int, size: int = 2
  ):
    self._iterator, self._to_device, self._accumulate = iterator, to_device, accumulate
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='device-prefetch', daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self):
    # SIGINT blocked in this thread (Python handles signals in the main thread anyway), so the
    # input workers it starts (Grain spawns them at the first batch) inherit it blocked: a
    # Ctrl-C while they import cannot kill them before they set it ignored
    # (`pipeline.leave_interrupts_to_the_parent`).
    if hasattr(signal, 'pthread_sigmask'):
      signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
      while not self._stop.is_set():
        host = [next(self._iterator) for _ in range(self._accumulate)]
        position = json.dumps(self._iterator.get_state())
        if not self._put((self._to_device(host), position)):
          return
    except StopIteration:
      self._put(self._END)
    except BaseException as e:  # pylint: disable=broad-except  -- re-raised by next()
      self._put(e)

  def next(self):
    """(device batch, input position after it); blocks until the thread has one."""
    item = self._queue.get()
    if item is self._END:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self._stop.set()
    while True:  # unblock a put, then let the thread see the stop flag
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=10)

  def __enter__(self) -> DevicePrefetch:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
