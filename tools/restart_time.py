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
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from ove_jax import checkpoint, cli

FIRST_STEP = 'first step of this process'  # the trainer's log line (ove_jax/train.py)
MORE_STEPS = 2  # each restart trains this many steps


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


def timed(command: Sequence[str]) -> dict:
  """Runs `command`: seconds to its first-step line, its wall, user and system seconds."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # the config says which cache, not the caller
  start = time.perf_counter()
  proc = subprocess.Popen(
    command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True
  )
  first, tail = None, []
  for line in proc.stderr:
    if first is None and FIRST_STEP in line:
      first = time.perf_counter() - start
    tail = (tail + [line])[-20:]
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0 or first is None:
    raise RuntimeError(f'{" ".join(command)} failed (exit {proc.returncode}):\n' + ''.join(tail))
  return {
    'first_step_s': round(first, 2),
    'wall_s': round(wall, 2),
    'user_s': round(usage.ru_utime, 2),
    'sys_s': round(usage.ru_stime, 2),
  }


def restart(root: str, source: str, step: int, name: str, command: list[str]) -> dict:
  """`command` restarted in a fresh workdir holding only checkpoint `step` of `source`."""
  workdir = os.path.join(root, name)
  shutil.rmtree(workdir, ignore_errors=True)
  folder = os.path.join(checkpoint.CHECKPOINT_DIR, str(step))
  shutil.copytree(os.path.join(source, folder), os.path.join(workdir, folder))
  return timed([a.replace('{workdir}', workdir) for a in command])


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
  root = args.root or tempfile.mkdtemp(prefix='ove_restart_')
  config = args.config or f'demo_cpu:smoke,workers=0,data_root={os.path.join(root, "data")}'
  total = args.steps + MORE_STEPS
  overrides = [f'--config.{o}' for o in args.override] + [
    f'--config.checkpoint_every={args.steps}',
    '--config.keep_checkpoints=10',
  ]
  first = os.path.join(root, 'first')
  try:
    print(f'first run: {args.steps} of {total} steps of {config} in {first}', flush=True)
    timed(trainer(config, first, total, *overrides))
    cache = os.path.join(first, 'compilation_cache')
    kinds = {
      'without cache': '--config.compilation_cache_dir=',
      'with cache': f'--config.compilation_cache_dir={cache}',
    }
    results = {kind: [] for kind in kinds}
    for i in range(args.repeats):
      for kind, flag in kinds.items():
        r = restart(
          root,
          first,
          args.steps,
          f'restart_{i}_{kind.split()[0]}',
          trainer(config, '{workdir}', total, *overrides, flag),
        )
        results[kind].append(r)
        print(
          f'  restart {i + 1} {kind:13s} first step after {r["first_step_s"]:6.1f} s   '
          f'(process: wall {r["wall_s"]:.1f} s, user {r["user_s"]:.1f} s, '
          f'sys {r["sys_s"]:.1f} s)',
          flush=True,
        )
  finally:
    if not args.root:
      shutil.rmtree(root, ignore_errors=True)
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
    )
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
