"""A restart's time to its first step, without and with the persistent compilation cache.

  ove-restart-time                                  the CPU demo (smoke, built-in data)
  ove-restart-time --config=stage1_image:smoke --steps=2 --root=/tmp/restart

Trains `--steps` steps of the experiment once (checkpoint at that step, the compilation cache in
that workdir, as `compilation_cache_dir`'s default puts it), then restarts from that checkpoint
in fresh copies of the workdir, alternately without the cache and with the first run's, `--repeats`
times each, and prints side by side for each restart: seconds from starting the process to its
first finished step (wall; what a preempted job waits before it trains again), and the whole
process's wall, user and system seconds (each restart trains 2 more steps and saves). The last
line is one JSON object with every figure. Timings on a shared machine vary: compare the two
columns of one run.

A rerun into the same `--root` starts afresh: it removes the run folders (`first`,
`restart_*`) that an earlier ove-restart-time made there (listed in its `ove-restart-time.json`),
and refuses folders of those names that it did not make. The built-in data (`data`) is kept.
A trainer's bad-input error (exit 2: an unknown experiment or key) is printed as the trainer
wrote it, with exit status 2. SIGTERM or SIGINT is passed on to the running trainer; the tool
waits for it, removes its temporary root and exits with 128 + the signal's number.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from data_pipeline import fileio
from ove_jax import checkpoint, cli

FIRST_STEP = 'first step of this process'  # the trainer's log line (ove_jax/train.py)
MORE_STEPS = 2  # each restart trains this many steps
MARKER = 'ove-restart-time.json'  # in --root: the run folders this tool made there
FIRST = 'first'  # the first run's folder in the root
RESTART_PREFIX = 'restart_'  # the restarts' folders: restart_<i>_<without|with>
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RootError(ValueError):
  """A --root that cannot be used; one line, exit status 2."""


class TrainerError(RuntimeError):
  """A trainer process that failed: its exit status and the last lines it wrote."""

  def __init__(self, command: Sequence[str], code: int, tail: Sequence[str], problem: str):
    super().__init__(f'{" ".join(command)} {problem}')
    self.code, self.tail = code, list(tail)

  def error_lines(self) -> list[str]:
    """The trainer's own error message (from its last `config error:` or `error:` line on)."""
    starts = [
      i
      for i, line in enumerate(self.tail)
      if line.startswith(('config error:', 'error:')) or ': error: ' in line
    ]
    lines = self.tail[starts[-1] :] if starts else self.tail[-1:]
    return [line.rstrip('\n') for line in lines if line.strip()]


class Interrupted(Exception):
  """SIGTERM or SIGINT reached this tool (and was passed on to its running trainer)."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


class Signals:
  """While entered: SIGTERM and SIGINT are passed on to the running trainer's process group (it
  saves and stops; a second signal kills it), and raise `Interrupted` once it is done, or at once
  when no trainer runs."""

  def __init__(self):
    self.child: subprocess.Popen | None = None
    self.received = 0
    self.previous = {}

  def __enter__(self):
    self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
    return self

  def __exit__(self, *exc):
    for s, handler in self.previous.items():
      signal.signal(s, handler)

  def handle(self, signum, frame):
    again = bool(self.received)
    self.received = self.received or signum
    if self.child is None:
      raise Interrupted(self.received)
    stop(self.child, signal.SIGKILL if again else signum)


def stop(proc: subprocess.Popen, signum: int) -> None:
  """Sends `signum` to `proc`'s process group (it leads one: start_new_session)."""
  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(proc.pid, signum)


def trainer(config: str, workdir: str, total: int, *overrides: str) -> list[str]:
  return [
    sys.executable,
    '-m',
    'ove_jax.train',
    f'--config={config}',
    f'--workdir={workdir}',
    f'--config.total_steps={total}',
    *overrides,
  ]


def timed(command: Sequence[str], signals: Signals) -> dict:
  """Runs `command`: seconds to its first-step line, its wall, user and system seconds. The
  trainer runs in its own process group, which `signals` stops on SIGTERM / SIGINT."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # the config says which cache, not the caller
  start = time.perf_counter()
  proc = subprocess.Popen(
    command,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    env=env,
    text=True,
    start_new_session=True,
  )
  first, tail = None, []
  try:
    signals.child = proc
    for line in proc.stderr:
      if first is None and FIRST_STEP in line:
        first = time.perf_counter() - start
      tail = (tail + [line])[-20:]
    _, status, usage = os.wait4(proc.pid, 0)
  except BaseException:  # a signal before the handler knew the trainer: stop it, then go on
    stop(proc, signal.SIGTERM)
    proc.wait()
    raise
  finally:
    signals.child = None
  wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  if signals.received:
    raise Interrupted(signals.received)
  if proc.returncode != 0:
    raise TrainerError(command, proc.returncode, tail, f'failed (exit {proc.returncode})')
  if first is None:
    raise TrainerError(command, 1, tail, f'logged no {FIRST_STEP!r} line (trained no step)')
  return {
    'first_step_s': round(first, 2),
    'wall_s': round(wall, 2),
    'user_s': round(usage.ru_utime, 2),
    'sys_s': round(usage.ru_stime, 2),
  }


def restart(
  root: str, source: str, step: int, name: str, command: list[str], signals: Signals
) -> dict:
  """`command` restarted in a fresh workdir holding only checkpoint `step` of `source`."""
  workdir = os.path.join(root, name)
  shutil.rmtree(workdir, ignore_errors=True)
  folder = os.path.join(checkpoint.CHECKPOINT_DIR, str(step))
  shutil.copytree(os.path.join(source, folder), os.path.join(workdir, folder))
  return timed([a.replace('{workdir}', workdir) for a in command], signals)


def prepare_root(root: str, folders: Sequence[str]) -> None:
  """Makes `root` ready for a run that makes `folders` there: removes the run folders an earlier
  run of this tool made (listed in MARKER), refuses run folders it did not make, and lists
  `folders` in MARKER before any of them exists."""
  flag = f'--root={root}'
  if os.path.exists(root) and not os.path.isdir(root):
    raise RootError(f'{flag}: a file, not a folder; give a folder (it is made if missing)')
  os.makedirs(root, exist_ok=True)
  marker = os.path.join(root, MARKER)
  try:
    made = fileio.read_json(marker) or {}
  except ValueError:
    made = {}
  ours = set(made.get('folders', [])) if isinstance(made, dict) else set()
  present = sorted(
    name for name in os.listdir(root) if name == FIRST or name.startswith(RESTART_PREFIX)
  )
  foreign = [name for name in present if name not in ours]
  if foreign:
    raise RootError(
      f'{flag}: run folders already there that ove-restart-time did not make (no {MARKER} '
      f'lists them): {", ".join(foreign)}; give a new or empty folder as --root, or remove them'
    )
  for name in present:  # an earlier run's: this run starts afresh
    shutil.rmtree(os.path.join(root, name))
  fileio.write_json(marker, {'made_by': 'ove-restart-time', 'folders': sorted(folders)})


def main(argv: Sequence[str] | None = None) -> int:
  parser = cli.ArgumentParser(
    prog='ove-restart-time', description=__doc__.split('\n\n')[0], allow_abbrev=False
  )
  parser.add_argument(
    '--config',
    default='',
    help='the experiment and its arguments (default: demo_cpu:smoke,workers=0 '
    'with its built-in data under --root)',
  )
  parser.add_argument(
    '--root', default='', help='folder for the runs (default: a temporary one, removed at the end)'
  )
  parser.add_argument(
    '--steps',
    type=int,
    default=2,
    help='steps of the first run, where the restarts start (default 2)',
  )
  parser.add_argument(
    '--repeats', type=int, default=1, help='restarts of each kind, alternated (default 1)'
  )
  parser.add_argument(
    '--override',
    action='append',
    default=[],
    metavar='KEY=VALUE',
    help='a config override for every run (repeatable), e.g. --override=model.preset=small',
  )
  args = parser.parse_args(argv)
  if args.steps < 1 or args.repeats < 1:
    parser.error(f'--steps={args.steps} --repeats={args.repeats}: both must be 1 or more')
  signals, root = Signals(), args.root
  try:
    with signals:
      root = root or tempfile.mkdtemp(prefix='ove_restart_')
      measure(args, root, signals)
  except RootError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except TrainerError as e:
    if e.code == 2:  # the trainer's bad-input error: its own message, its own status
      print('\n'.join(e.error_lines()), file=sys.stderr)
      return 2
    sys.stderr.writelines(f'  {line}' for line in e.tail)
    print(f'error: {e} (its last lines are above)', file=sys.stderr)
    return 1
  except Interrupted as e:
    print(f'ove-restart-time: stopped by {e}', file=sys.stderr)
    return 128 + e.signum
  finally:
    if not args.root and root:
      shutil.rmtree(root, ignore_errors=True)
  return 0


def restart_name(i: int, kind: str) -> str:
  return f'{RESTART_PREFIX}{i}_{kind.split()[0]}'


def measure(args, root: str, signals: Signals) -> None:
  """The first run and the restarts in `root`; prints a line for each and the summary."""
  kinds = ('without cache', 'with cache')
  if args.root:
    prepare_root(root, [FIRST] + [restart_name(i, k) for i in range(args.repeats) for k in kinds])
  config = args.config or f'demo_cpu:smoke,workers=0,data_root={os.path.join(root, "data")}'
  total = args.steps + MORE_STEPS
  overrides = [f'--config.{o}' for o in args.override] + [
    f'--config.checkpoint_every={args.steps}',
    '--config.keep_checkpoints=10',
  ]
  first = os.path.join(root, FIRST)
  print(f'first run: {args.steps} of {total} steps of {config} in {first}', flush=True)
  timed(trainer(config, first, total, *overrides), signals)
  cache = os.path.join(first, 'compilation_cache')
  flags = dict(zip(kinds, ('', cache)))  # the restarts' compilation_cache_dir
  results = {kind: [] for kind in kinds}
  for i in range(args.repeats):
    for kind, folder in flags.items():
      flag = f'--config.compilation_cache_dir={folder}'
      command = trainer(config, '{workdir}', total, *overrides, flag)
      r = restart(root, first, args.steps, restart_name(i, kind), command, signals)
      results[kind].append(r)
      print(
        f'  restart {i + 1} {kind:13s} first step after {r["first_step_s"]:6.1f} s   '
        f'(process: wall {r["wall_s"]:.1f} s, user {r["user_s"]:.1f} s, '
        f'sys {r["sys_s"]:.1f} s)',
        flush=True,
      )
  median = {
    kind: statistics.median(r['first_step_s'] for r in runs) for kind, runs in results.items()
  }
  print(
    f'time to first step: {median["without cache"]:.1f} s without the cache, '
    f'{median["with cache"]:.1f} s with it '
    f'({median["without cache"] / median["with cache"]:.2f}x)'
  )
  print(
    json.dumps(
      {'config': config, 'steps': args.steps, 'restarts': results, 'median_first_step_s': median}
    ),
    flush=True,
  )


if __name__ == '__main__':
  sys.exit(main())
