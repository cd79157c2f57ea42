r"""Attentive probes over benchmarks x input modes x encoders, as the release's protocol
(docs/evaluation.md), into one results table.

  # the paper's eight sets (the release's data_root layout), its four input modes, two encoders
  ove-probe-suite --config=probe_benchmarks:data_root=/data/attentive_probe \
      --encoders /ckpt/stage2,random:large --out /results/probe
  # two sets, codec inputs and an intervention, one seed
  ove-probe-suite --config=probe_benchmarks:data_root=/data/ap --benchmarks ssv2,diving48 \
      --modes codec:2048,codec:2048+shuffle_positions --seeds 0 --encoders /ckpt/stage2 \
      --out /results/probe
  # your own lists (path,label[,start,end] per line)
  ove-probe-suite \
      --config=probe_benchmarks:name=mine,train=/d/train.csv,test=/d/test.csv,num_classes=10 \
      --encoders /ckpt/stage2 --out /results/mine

Writes OUT/cells/<cell>.json per (benchmark, mode, encoder) as each ends, and OUT/results.csv
and OUT/results.md (top-1 and top-5, mean ± std over seeds, the chosen lr and epoch per seed).
The table holds this command's cells. Rerun the same command to resume: finished cells are
skipped; failed ones (recorded with their error, the suite going on) run again. A finished cell
stored with other settings (--seeds, --epochs, --encoder-seed, the config's lists, the
encoder's version: a training run's step, a fingerprint of an export's files, ...) is refused,
naming them: give a new --out, or add --rerun-changed to run it again and replace it.
Exit status 0 when every cell of the command is ok, 1 when any failed, 2 for bad input (a
message naming the flag, file or list line), refused before any cell runs.
"""

from __future__ import annotations

import sys

from ove_jax import cli, probe_suite
from ove_jax import config as config_lib


def _names(text: str | None) -> list[str]:
  return [x.strip() for x in (text or '').split(',') if x.strip()]


def _ints(text: str | None, flag: str) -> list[int]:
  try:
    return [int(x) for x in _names(text)]
  except ValueError:
    raise probe_suite.SuiteError(f'{flag} {text!r}: expected comma-separated integers') from None


def build_parser() -> cli.Parser:
  parser = cli.doc_parser('ove-probe-suite', __doc__, cli.Parser)
  parser.add_argument(
    '--config',
    required=True,
    help='the benchmarks: an experiment and its argument, e.g. '
    'probe_benchmarks:data_root=/data/ap (experiments/probe_benchmarks.py)',
  )
  parser.add_argument(
    '--encoders',
    required=True,
    help='comma-separated: training workdirs, release-format directories, random:<preset>',
  )
  parser.add_argument('--out', required=True, help='the suite folder (cells/, results.*)')
  parser.add_argument(
    '--benchmarks', help="comma-separated names of the config's benchmarks (default: all of them)"
  )
  parser.add_argument(
    '--modes',
    help='comma-separated input modes: codec:K, uniform:N, with an '
    'optional +shuffle_positions, +static_motion or +counterfactual_motion '
    "(default: the config's, codec:2048,codec:4096,uniform:8,uniform:16)",
  )
  parser.add_argument('--seeds', help="probe seeds, e.g. 0,1,2 (default: the config's)")
  parser.add_argument('--epochs', type=int, help="override every benchmark's epochs")
  parser.add_argument('--batch-size', type=int, help="override every benchmark's batch")
  parser.add_argument(
    '--eval-batch-size', type=int, default=32, help='clips per encoder forward when scoring'
  )
  parser.add_argument(
    '--encoder-seed', type=int, default=0, help='the init of random:<preset> encoders'
  )
  parser.add_argument(
    '--selection-cache', help="folder keeping the clips' codec selections (default OUT/selections)"
  )
  parser.add_argument(
    '--rerun-changed',
    action='store_true',
    help='run again the finished cells of --out stored with other settings than this '
    "command's, replacing them (without it such cells are refused)",
  )
  return parser


def run(args) -> list[dict]:
  for flag, value in (
    ('--epochs', args.epochs),
    ('--batch-size', args.batch_size),
    ('--eval-batch-size', args.eval_batch_size),
  ):
    if value is not None and value < 1:
      raise probe_suite.SuiteError(f'{flag} {value}: must be >= 1')
  try:
    module, arg = config_lib.load_experiment(args.config)
    config = module.get_config(arg or None)
  except (config_lib.ConfigError, ValueError, OSError) as e:
    raise probe_suite.SuiteError(f'--config {args.config}: {e}') from None
  if not hasattr(config, 'benchmarks'):
    raise probe_suite.SuiteError(
      f'--config {args.config}: not a probe experiment (it has no '
      '`benchmarks`); use probe_benchmarks'
    )
  plan = probe_suite.suite_plan(
    config,
    encoders=_names(args.encoders),
    modes=_names(args.modes),
    benchmarks=_names(args.benchmarks),
    seeds=_ints(args.seeds, '--seeds'),
    epochs=args.epochs,
    batch_size=args.batch_size,
    eval_batch_size=args.eval_batch_size,
    encoder_seed=args.encoder_seed,
    selection_cache=args.selection_cache,
  )
  rows = probe_suite.run_suite(
    plan, args.out, log=lambda line: print(line, flush=True), rerun_changed=args.rerun_changed
  )
  print()
  print(probe_suite.format_markdown(rows))
  return rows


def main(argv=None) -> int:
  return cli.main_of(
    'ove-probe-suite',
    build_parser(),
    run,
    (probe_suite.SuiteError,),
    argv,
    ok=lambda rows: all(r['status'] == 'ok' for r in rows),
  )


if __name__ == '__main__':
  sys.exit(main())
