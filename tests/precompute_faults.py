"""Faults a web-scale corpus holds, injected through precompute's real hooks (for the tests).

`open_clip` is a `reader` (precompute's hook for corpora behind a custom loader), `select` a
`selector` (precompute's and ove-llava-data's hook for another selection): names starting
with 'segfault' crash the worker process with SIGSEGV, as a decoder bug does; 'oom' ones get the
SIGKILL of the kernel's out-of-memory killer; 'hang' ones never return, as a stuck network read
or decoder does; 'interrupt' ones raise KeyboardInterrupt; 'error' ones raise RuntimeError (a
selector's bug); any other name is a local path.
`work` is the same for `data_pipeline.workers.ordered_map` on plain numbers.
"""

import os
import signal
import time


def crash_or_hang(name: str) -> None:
  base = os.path.basename(str(name))
  if base.startswith('segfault'):
    os.kill(os.getpid(), signal.SIGSEGV)
  if base.startswith('oom'):  # what the kernel's out-of-memory killer sends
    os.kill(os.getpid(), signal.SIGKILL)
  if base.startswith('interrupt'):  # what Ctrl-C or a scheduler's SIGINT does mid-run
    raise KeyboardInterrupt
  if base.startswith('hang'):
    while True:
      time.sleep(60)
  if base.startswith('error'):  # a selector's own bug: not the video's fault
    raise RuntimeError(f'{base}: the selector failed')


def open_clip(name: str) -> str:
  crash_or_hang(name)
  return name


def select(video, **options):
  """codec.select, after `crash_or_hang(video)` (a `selector` for ove-llava-data)."""
  crash_or_hang(video)
  from data_pipeline import codec

  return codec.select(video, **options)


def work(item):
  """2 * item for numbers, None for None; 'segfault...' / 'hang...' strings crash or hang;
  'raise' raises."""
  if item is None:
    return None
  if item == 'raise':
    raise ValueError('asked to raise')
  crash_or_hang(item)
  return 2 * item


def env(name: str):
  """A worker's view of one environment variable."""
  return os.environ.get(name)


def select_torn(video, **options):
  """`select`, except that a video named 'torn*' writes a temporary file as a killed writer
  leaves it (`fileio.temp_name` of the path in $OVE_TEST_TORN_PATH, from this process) and then
  gets the out-of-memory killer's SIGKILL."""
  if os.path.basename(str(video)).startswith('torn'):
    from data_pipeline import fileio

    with open(fileio.temp_name(os.environ['OVE_TEST_TORN_PATH']), 'wb') as f:
      f.write(b'half a picture')
    os.kill(os.getpid(), signal.SIGKILL)
  return select(video, **options)


def malloc_state(_item) -> str | None:
  """What the worker's `host_memory.configure_malloc` did."""
  from data_pipeline import host_memory

  return host_memory.APPLIED
