"""Sweeps: an experiment's `sweep(add, arg)` as one run folder and one trainer command per point.

  ove-sweep --config=experiments/ablations.py:smoke,study=selection \
      --root=/tmp/sweep_sel --run                 # run them here, one after another
  ove-sweep --config=experiments/ablations.py:study=budget --root=/ckpt/abl_budget --print
  ove-sweep --config=experiments/ablations.py:study=budget --root=/ckpt/abl_budget \
      --job-array=/ckpt/abl_budget.jobs --config.data.heads.image.source=...
  ove-sweep --config=... --root=/ckpt/abl_budget --collect   # results of runs made elsewhere

How an experiment defines its sweep, how points are named and what the results table holds:
the `ove_jax.sweeps` docstring (docs/sweeps.md). Each point's command is
`python -m ove_jax.train --config=SPEC --workdir=<root>/<name> --config.KEY=VALUE ...`: the
point's overrides, then the --config.KEY=VALUE given here (which may not set a swept key).

Modes (one; --print when none is given):
  --run        run the points here in turn. A finished run (its newest committed checkpoint is of
               step total_steps) is skipped; an unfinished one is resumed by the trainer. A run
               that fails, or whose checkpoint is beyond total_steps, is reported (its output is
               in <root>/<name>/train.log) and the sweep goes on; the exit status is 1 when any
               failed. SIGTERM or SIGINT (Ctrl-C) is forwarded to the running trainer as SIGTERM:
               it saves its step and exits, and the sweep writes the results so far and exits
               with 75 (SIGTERM, as the trainer: restart me) or 130 (SIGINT); a rerun resumes.
               The runs share a JAX compilation cache (--compile-cache, default
               <root>/jax_cache), so points of one shape compile once.
  --print      print the commands, one a line.
  --job-array FILE  write the commands to FILE (a path or a gs:// URL), one a line, under a
               comment showing how an array task picks its line (SLURM's sbatch --array, or any
               scheduler's task index).
  --collect    only gather the results of the runs in <root>.
--only NAME keeps the named point (repeat it for more; names may hold commas). --job-array, --run
and --collect write <root>/sweep.json (the points, their commands and status); --run and
--collect write <root>/results.csv and results.md. --print writes nothing.

A config error (an experiment file that does not load, a sweep() that raises or does not take
(add, arg=None), an unknown key in a point, a value that does not survive the command line, a
duplicate name) exits with status 2 before anything runs, naming the file or the point and the
key. So does a run already in <root> whose config.json differs from the config the sweep gives
it now (a rerun with other --config. flags), naming the point and the keys (saved -> now): give
a new --root, or remove that run's folder to run it again. Keys a resume may change (the mesh,
total_steps, logging, the watchdog; ove_jax.sweeps.RESUMABLE_KEYS) are not compared.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

from data_pipeline import paths
from ove_jax import cli, sweep_runs, sweeps
from ove_jax import config as config_lib


def build_parser() -> cli.Parser:
  p = cli.Parser(
    prog='ove-sweep',
    description=__doc__.split('\n\n')[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=__doc__.split('\n\n', 1)[1] + '\nAny --config.KEY=VALUE overrides '
    "every point's config, as in the trainer.",
  )
  p.add_argument(
    '--config',
    required=True,
    metavar='SPEC',
    help='the experiment with its sweep: experiments/<name>.py[:args]',
  )
  p.add_argument('--root', required=True, help='the folder of the runs (one per point)')
  mode = p.add_mutually_exclusive_group()
  mode.add_argument(
    '--run',
    action='store_const',
    const='run',
    dest='mode',
    help='run the unfinished points here, one after another',
  )
  mode.add_argument(
    '--print',
    action='store_const',
    const='print',
    dest='mode',
    help='print the commands, one a line (the default)',
  )
  mode.add_argument(
    '--job-array',
    metavar='FILE',
    help="write the commands to FILE, one a line, for a scheduler's job array",
  )
  mode.add_argument(
    '--collect',
    action='store_const',
    const='collect',
    dest='mode',
    help='only gather the results of the runs in --root',
  )
  p.add_argument(
    '--only', action='append', metavar='NAME', help='keep this point (repeat for more)'
  )
  p.add_argument(
    '--compile-cache',
    metavar='DIR',
    help='JAX compilation cache of --run (default <root>/jax_cache; empty: none)',
  )
  return p


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    args, rest = build_parser().parse_known_args(argv)
    common = cli.config_overrides(rest)
  except cli.UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  mode = 'job-array' if args.job_array else (args.mode or 'print')
  spec, root = args.config, paths.absolute(args.root)  # a URL (gs://...) stays one
  from ove_jax import checkpoint

  try:  # the points' workdirs: where checkpoints can be kept (what --print prints too)
    checkpoint.check_checkpoint_path(root)
  except ValueError as e:
    print(f'error: --root {e}', file=sys.stderr)
    return 2
  if mode != 'print':  # buckets that are not there, before any point starts
    for flag, url in (('--root', root), ('--job-array', args.job_array or '')):
      problem = paths.buckets_problem(url)
      if problem:
        print(f'error: {flag} {url}: {problem}', file=sys.stderr)
        return 2
  try:
    points = sweeps.select(sweeps.expand(spec), args.only)
    configs = {p.name: sweeps.point_config(spec, p, common) for p in points}
    if mode != 'print':  # the runs already there must be the ones this sweep would make
      sweeps.check_saved_configs(root, points, configs)
  except config_lib.ConfigError as e:
    print(f'config error: {e}', file=sys.stderr)
    return 2

  python = sys.executable if mode == 'run' else 'python'
  commands = {
    p.name: sweeps.train_command(spec, root, p, configs[p.name], common, python) for p in points
  }
  if mode == 'print':
    for p in points:
      print(shlex.join(commands[p.name]))
    return 0
  if mode == 'job-array':
    path = sweeps.write_job_array(args.job_array, spec, root, points, commands)
    print(f'wrote {len(points)} commands to {path}')
    return 0

  failures: dict[str, str] = {}
  interrupted = None
  if mode == 'run':
    cache = args.compile_cache
    cache = paths.join(root, 'jax_cache') if cache is None else cache
    paths.makedirs(root)
    try:
      failures = sweep_runs.run_points(root, points, configs, commands, compile_cache=cache)
    except sweep_runs.Interrupted as e:
      interrupted, failures = e, e.failures
      print(f'{e}: writing the results so far (a rerun resumes)', file=sys.stderr)
  csv_path, md_path = sweeps.collect(root, spec, points, configs, commands, failures)
  with paths.open_file(md_path, encoding='utf-8') as f:
    print(f.read(), end='')
  print(f'results: {md_path}, {csv_path}')
  if interrupted:
    return interrupted.exit_code
  if failures:
    print(f'{len(failures)} of {len(points)} runs failed: {", ".join(failures)}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
