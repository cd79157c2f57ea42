"""Runs one command as N JAX processes on this machine, each with M virtual CPU devices.

  python tools/launch_local.py --processes=2 --devices-per-process=4 -- python train.py ...

It stands in for a multi-host cluster on one CPU machine: each copy gets the environment that
`ove_jax.distributed.initialize()` reads (OVE_COORDINATOR_ADDRESS on a free local port,
OVE_NUM_PROCESSES, OVE_PROCESS_ID, OVE_LOCAL_DEVICE_COUNT), JAX_PLATFORMS=cpu and an XLA_FLAGS
device count of M. Output lines come back prefixed `[p<i>] `, a progress bar's carriage-return
updates too, as they come. When one process fails the others
are stopped (a process waiting on a dead peer would otherwise hang in a collective), and the
launcher exits with the failing code; 124 on --timeout, 130 on Ctrl-C. A process that exits with
the trainer's preemption code (75: it saved after a SIGTERM) is not a failure: its peers saved
the same step and exit too, and the launcher waits for them and exits 75 (as it does when it is
sent SIGTERM itself and every process saves and exits so). The processes agree on the step after
the largest one any of them has reached, so a save can come up to two steps after the SIGTERM:
--grace (default 25 s, then SIGKILL; schedulers commonly allow 30 s) must cover two steps, the
save and the exit. Processes still running after it are killed, named in one line, and the
launcher then exits with the signal's code (143 after SIGTERM), not 75. Raise --grace for slower
steps, and when a SIGTERM may come while the first step still compiles (15-25 s for the demo
on 2 cores); keep it below the scheduler's own grace period.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from data_pipeline import workers
from ove_jax import cli, distributed
from ove_jax.preemption import PREEMPTED_EXIT_CODE


def child_env(base: dict, *, address: str, processes: int, index: int, devices: int) -> dict:
  """The environment of process `index`: `base` plus the multi-process and device settings."""
  env = distributed.cpu_devices_env(base, devices)
  env.update(
    {
      'OVE_COORDINATOR_ADDRESS': address,
      'OVE_NUM_PROCESSES': str(processes),
      'OVE_PROCESS_ID': str(index),
      'JAX_PLATFORMS': 'cpu',
      'PYTHONUNBUFFERED': '1',  # so lines arrive as they are printed, not at exit
    }
  )
  return env


def free_port() -> int:
  """A free TCP port on this machine, for a coordinator."""
  try:
    import portpicker

    return portpicker.pick_unused_port()
  except ImportError:
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      return s.getsockname()[1]


class _Stop(Exception):
  """Raised in the main thread when the launcher itself is sent SIGTERM."""


# A child's output is cut at '\n', '\r\n' and '\r': a progress bar's '\r' updates (tqdm) are
# forwarded as they come, each with the prefix, not held until the line's end.
_BREAK = re.compile(rb'\r\n|\r|\n')


def _forward(stream, out, prefix: str, lock: threading.Lock):
  pending, after_cr = b'', False
  while chunk := stream.read1(1 << 16):
    if after_cr and chunk.startswith(b'\n'):  # a '\r\n' cut between two reads: end that line
      with lock:
        out.write('\n')
      chunk = chunk[1:]
    data, start, pieces = pending + chunk, 0, []
    for brk in _BREAK.finditer(data):
      pieces.append(prefix + data[start : brk.start()].decode('utf-8', errors='replace'))
      pieces.append('\r' if brk.group() == b'\r' else '\n')
      start = brk.end()
    pending = data[start:]
    after_cr = bool(pieces) and pieces[-1] == '\r' and not pending
    if pieces:
      with lock:
        out.write(''.join(pieces))
        out.flush()
  with lock:
    if pending or after_cr:  # an unterminated last line, or the last progress update, kept
      out.write(prefix + pending.decode('utf-8', errors='replace') + '\n' if pending else '\n')
      out.flush()
  stream.close()


def _signal_all(procs, sig):
  for proc in procs:
    if proc.poll() is None:
      try:
        # Each child leads its own process group, so its own workers (grain, ...) go too.
        os.killpg(proc.pid, sig)
      except ProcessLookupError:
        pass


def _stop_all(procs, grace: float, lock: threading.Lock):
  """SIGTERM to every running process, SIGKILL to those still running after `grace` seconds
  (named in one line)."""
  _signal_all(procs, signal.SIGTERM)
  deadline = time.monotonic() + grace
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    time.sleep(0.05)
  running = [i for i, p in enumerate(procs) if p.poll() is None]
  if running:
    _report(
      lock,
      f'process{"es" if len(running) > 1 else ""} {", ".join(map(str, running))} still running '
      f'{grace:g} s after SIGTERM: killed (SIGKILL); raise --grace if they were saving',
    )
  _signal_all(procs, signal.SIGKILL)
  for proc in procs:
    proc.wait()


def _exit_code(returncode: int) -> int:
  # A child killed by signal N reads as -N from Popen; shells report 128 + N.
  return 128 - returncode if returncode < 0 else returncode


def _parse(argv):
  parser = cli.ArgumentParser(
    prog='ove-launch-local',
    description=__doc__.split('\n\n')[0],
    usage='%(prog)s --processes=N --devices-per-process=M [--port=P] [--timeout=S] [--grace=S] '
    '-- COMMAND [ARGS ...]',
  )
  parser.add_argument('--processes', type=int, required=True, help='processes to start (N)')
  parser.add_argument(
    '--devices-per-process',
    '--devices_per_process',
    type=int,
    default=1,
    dest='devices_per_process',
    help='virtual CPU devices in each process (M); --devices_per_process is the older spelling',
  )
  parser.add_argument(
    '--port', type=int, default=0, help='coordinator port on 127.0.0.1; default: a free one'
  )
  parser.add_argument(
    '--timeout',
    type=float,
    default=0,
    help='seconds before every process is stopped (exit 124); 0: no limit',
  )
  parser.add_argument(
    '--grace',
    type=float,
    default=25.0,
    help='seconds between SIGTERM and SIGKILL when stopping processes: enough for two steps, a '
    "checkpoint save and the exit; below the scheduler's own grace period (often 30 s)",
  )
  argv = list(sys.argv[1:] if argv is None else argv)
  if '--' in argv:
    split = argv.index('--')
    argv, command = argv[:split], argv[split + 1 :]
  else:
    argv, command = argv, []
  args, extra = parser.parse_known_args(argv)
  if extra:
    parser.error(
      f'unrecognised arguments {" ".join(extra)}: put the command to run after "--", '
      'e.g. -- python train.py'
    )
  if args.processes < 1:
    parser.error(f'--processes={args.processes}: at least 1 process is needed')
  if args.devices_per_process < 1:
    parser.error(
      f'--devices-per-process={args.devices_per_process}: each process needs at least 1 device'
    )
  if not 0 <= args.port < 65536:
    parser.error(f'--port={args.port}: give a port from 1 to 65535, or 0 for a free one')
  if args.timeout < 0 or args.grace < 0:
    parser.error('--timeout and --grace take seconds, 0 or more')
  if not command:
    parser.error('no command given: put it after "--", e.g. -- python train.py')
  args.command = command
  return args


def main(argv=None) -> int:
  args = _parse(argv)
  address = f'127.0.0.1:{args.port or free_port()}'
  lock = threading.Lock()
  procs, threads = [], []

  def on_sigterm(signum, frame):
    del signum, frame
    raise _Stop()

  in_main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
  code = 0
  try:
    for i in range(args.processes):
      env = child_env(
        os.environ,
        address=address,
        processes=args.processes,
        index=i,
        devices=args.devices_per_process,
      )
      # Killed with the launcher (kill -9): their output would go nowhere, and a process whose
      # writes fail stops in a collective its peer never joins. Stopped with SIGTERM or Ctrl-C,
      # the launcher lets them save first.
      proc = subprocess.Popen(
        workers.ends_with_parent(args.command, signal.SIGKILL, env),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
      )
      procs.append(proc)
      for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
        thread = threading.Thread(
          target=_forward, args=(stream, out, f'[p{i}] ', lock), daemon=True
        )
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    while True:
      codes = [p.poll() for p in procs]
      failed = next((c for c in codes if c not in (None, 0, PREEMPTED_EXIT_CODE)), None)
      if failed is not None:
        index = codes.index(failed)
        code = _exit_code(failed)
        _report(lock, f'process {index} exited with code {code}; stopping the others')
        break
      if all(c is not None for c in codes):
        code = PREEMPTED_EXIT_CODE if PREEMPTED_EXIT_CODE in codes else 0
        break
      if deadline is not None and time.monotonic() > deadline:
        _report(lock, f'timed out after {args.timeout:g} s; stopping all processes')
        code = 124
        break
      time.sleep(0.05)
  except (KeyboardInterrupt, _Stop) as stop:
    code = 130 if isinstance(stop, KeyboardInterrupt) else 128 + signal.SIGTERM
    _report(lock, 'interrupted; sending SIGTERM to all processes')
  except OSError as err:  # the command could not be started
    _report(lock, f'cannot start {args.command[0]!r}: {err}')
    code = 127
  finally:
    if in_main_thread:  # a second SIGTERM must not cut the stop short (the processes would stay)
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _stop_all(procs, args.grace, lock)
    if code == 128 + signal.SIGTERM and all(p.returncode == PREEMPTED_EXIT_CODE for p in procs):
      code = PREEMPTED_EXIT_CODE  # every process saved and asked to be restarted
    for thread in threads:
      thread.join(timeout=2)
    if in_main_thread:
      signal.signal(signal.SIGTERM, previous)
  return code


def _report(lock: threading.Lock, message: str):
  with lock:
    sys.stderr.write(f'[launch_local] {message}\n')
    sys.stderr.flush()


if __name__ == '__main__':
  sys.exit(main())
