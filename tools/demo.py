"""End-to-end pretraining demo on built-in data, CPU (README's first command).

  ove-demo --workdir /tmp/ove_demo                           # a few minutes on 2 cores
  ove-demo --workdir /tmp/ove_quick --clips 4 --budget 512 --smoke --train-steps 16  # the tests'
  ove-demo --table /tmp/ove_demo_s{0,1,2}/summary.json          # several runs' figures

The stages (each prints its progress):
  1. writes synthetic 64-frame H.264 clips (textured objects moving over photographs, with
     B-frames; `data_pipeline.synthetic`) and precomputes their codec selections, K = 2048 of
     16,384 patches per clip (`data_pipeline.precompute`) into ArrayRecord shards; draws one
     selection as PNG/GIF;
  2. measures, with the clips' ground-truth motion, the share of kept patches that land on moving
     objects: codec selection vs uniform frames vs random patches at the same budget;
  3. reads the shards back through the Grain pipeline (codec mode, packed rows, worker process)
     and runs the tiny encoder on a batch, sharded over an 8-virtual-device CPU mesh
     (data 2 x fsdp 2 x tensor 2), checked against a single-device run;
  4. makes the built-in data (`data_pipeline.builtin`): 256 clips of one textured object each,
     codec-selected at K = 512, and 256 stills for pretraining, plus 96 held-out clips for the
     probes' test split;
  5. cluster labels from a teacher (`ove_jax.labels`, as `ove-cluster-labels`): k-means (k = 32
     for clips, 16 for images) over the teacher's features, each sample labelled with its
     nearest centres, the clips' records rewritten with them. The teacher is an ORACLE: no
     teacher network can be downloaded here (the paper's is MetaCLIP-H/14), so each sample's
     teacher feature embeds the generator's ground truth of its object (texture, motion
     direction, shape; one-hot blocks weighted 1, 0.8, 0.6). The student never sees those
     attributes, only cluster ids; a real teacher is one flag away (`ove-cluster-labels
     --teacher DIR` or `--features`);
  6. pretrains the tiny encoder from scratch on the cluster labels with the trainer
     (`ove_jax.train`, experiments/demo_cpu.py:student=...: video and image heads, Partial FC
     with CosFace, 8-device CPU mesh data 4 x fsdp 2), the clips in the release's mixed video
     modes (codec patches / 2 uniform frames / the 2 frames as a collage, weights
     0.5 / 0.375 / 0.125, `--video-modes`); metrics in <workdir>/train/metrics.jsonl and
     TensorBoard, checkpoints in <workdir>/train/checkpoints;
  7. probes the frozen encoder (`ove_jax.evaluators`) on the object's texture (4 classes; the
     256 pretraining clips with their true labels train the probes, the 96 held-out clips test
     them): the pretrained and the random-init encoder, each on codec inputs and on uniform
     frames (K / 256 = 2 whole frames: the same 512 tokens), so that the random-init encoder's
     codec vs uniform gap shows what the inputs alone give. Attentive probe (docs/spec.md §6, 30
     epochs), logistic regression and k-NN on the pooled embedding; the summary's
     `probe_top1_*` are the logistic-regression probe's (docs/demo.md);
  8. exports the trained encoder of the last checkpoint to the release's PyTorch format
     (<workdir>/hf_export, as `ove-convert from-train` does) and, when torch is
     installed, checks our PyTorch port on the exported directory against the JAX encoder.
It writes `summary.json` into the work directory and exits non-zero when a check fails: the
sharded vs single-device run or the PyTorch port differ by 1e-4 or more, or the training loss
did not fall (last logged loss >= first). The stages are functions of `ove_jax.demo`.
"""

from __future__ import annotations

import argparse
import os
import sys

from ove_jax import cli


def build_parser() -> argparse.ArgumentParser:
  parser = cli.doc_parser('ove-demo', __doc__)
  parser.add_argument('--workdir', default='/tmp/ove_demo', help='where everything is written')
  parser.add_argument(
    '--clips',
    type=int,
    default=8,
    help='synthetic clips of the codec-selection stages (1-3)',
  )
  parser.add_argument(
    '--budget',
    type=int,
    default=2048,
    help='codec patches per clip of stages 1-3 (a multiple of 256)',
  )
  parser.add_argument('--devices', type=int, default=8, help='virtual CPU devices')
  parser.add_argument(
    '--train-steps',
    type=int,
    help="pretraining steps (default: the experiment's, 300; 20 with --smoke)",
  )
  parser.add_argument(
    '--seed',
    type=int,
    default=0,
    help='seeds the built-in data, the pretraining and the random-init baseline',
  )
  parser.add_argument(
    '--test-clips',
    type=int,
    help="held-out clips for the probes' test split (default 96; 8 --smoke)",
  )
  parser.add_argument(
    '--k', type=int, help='k-means centres for the clips (default 32; 8 --smoke); images get half'
  )
  parser.add_argument(
    '--probe-seeds',
    help='probe seeds, comma-separated (default 0: one run of each probe; '
    'the spread the docs give is over demo --seed values)',
  )
  parser.add_argument(
    '--probe-epochs',
    type=int,
    help='attentive probe epochs (default 30, docs/spec.md §6 for small sets; 2 --smoke)',
  )
  parser.add_argument(
    '--video-modes',
    default='0.5,0.375,0.125',
    help="pretraining's video modes: weights of codec patches, uniform frames "
    "and collage, comma-separated (default the release's 0.5,0.375,0.125; "
    '1,0,0 pretrains on codec inputs only)',
  )
  parser.add_argument(
    '--table',
    nargs='+',
    metavar='SUMMARY',
    help='print the Markdown table (mean ± std and per-run values) of earlier '
    "runs' summary.json files, e.g. one per --seed, and exit",
  )
  parser.add_argument(
    '--smoke',
    action='store_true',
    help="a quick run for the tests: the experiment's smoke variant (8 clips "
    'and 16 images of built-in data), 8 held-out clips, k = 8, short probes',
  )
  return parser


def options(parser: argparse.ArgumentParser, argv=None):
  """The checked flags as `ove_jax.demo.Options` (defaults resolved)."""
  from ove_jax import demo

  args = parser.parse_args(argv)
  if args.train_steps is not None and args.train_steps < 2:
    parser.error('--train-steps must be at least 2 (the demo compares the first and last loss)')
  if args.devices < 2 or args.devices % 2:
    parser.error('--devices must be even (the meshes have an fsdp axis of 2)')
  if args.budget % 256 or not 256 <= args.budget <= 64 * 256:
    parser.error(
      f'--budget {args.budget}: use a multiple of 256 (whole 224x224 frames, for the '
      'uniform-frame comparison) between 256 and 16384'
    )
  if args.clips < 2:
    parser.error('--clips must be at least 2')
  if args.seed < 0:
    parser.error(f'--seed {args.seed}: must be >= 0')
  try:
    seeds = [int(x) for x in (args.probe_seeds or '0').split(',') if x.strip()]
  except ValueError:
    parser.error(f'--probe-seeds {args.probe_seeds!r}: expected comma-separated integers')
  try:
    modes = tuple(float(x) for x in args.video_modes.split(','))
  except ValueError:
    modes = ()
  if len(modes) != 3 or min(modes) < 0 or sum(modes) <= 0:
    parser.error(
      f'--video-modes {args.video_modes!r}: three comma-separated weights >= 0 '
      '(codec, uniform, collage), not all 0'
    )
  opts = demo.Options(
    **cli.keywords(args, 'workdir', 'clips', 'budget', 'devices', 'train_steps', 'seed', 'smoke'),
    test_clips=args.test_clips or (8 if args.smoke else 96),
    k=args.k or (8 if args.smoke else 32),
    probe_seeds=seeds,
    probe_epochs=args.probe_epochs or (2 if args.smoke else 30),
    video_modes=modes,
  )
  if opts.test_clips < 2 or opts.k < 2 or opts.probe_epochs < 1 or not opts.probe_seeds:
    parser.error(
      '--test-clips and --k must be at least 2, --probe-epochs at least 1, and '
      '--probe-seeds must name a seed'
    )
  try:
    demo.find_experiment()
  except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))
  return opts


def print_table(paths) -> int:
  """Prints the seed table of these summary.json files (ove_jax.demo_report.seed_table)."""
  from data_pipeline import fileio
  from ove_jax import demo_report

  summaries = []
  for path in paths:
    try:
      summaries.append(fileio.read_json(path))
    except (OSError, ValueError) as e:
      print(f'error: --table: cannot read {path}: {e}', file=sys.stderr)
      return 2
  try:
    print('\n'.join(demo_report.seed_table(summaries)))
  except KeyError as e:
    print(
      f'error: --table: a summary lacks {e} (written by an older demo?); rerun it', file=sys.stderr
    )
    return 2
  return 0


def main(argv=None) -> int:
  parser = build_parser()
  args, _ = parser.parse_known_args(argv)
  if args.table:
    return print_table(args.table)
  opts = options(parser, argv)
  from ove_jax import demo, demo_report, distributed, preemption

  distributed.use_cpu_devices(opts.devices)
  from data_pipeline import pictures

  try:
    with preemption.ctrl_c_raises_interrupted():  # while training: save, then stop (a 2nd: now)
      summary, failed = demo.run(opts, pictures.render, say=lambda line: print(line, flush=True))
  except (KeyboardInterrupt, preemption.Interrupted):
    print('interrupted (Ctrl-C); the demo starts over when run again', file=sys.stderr)
    return preemption.INTERRUPTED_EXIT_CODE
  except demo.DemoError as e:
    kind = {
      2: 'config error',
      preemption.PREEMPTED_EXIT_CODE: 'stopped',
      preemption.INTERRUPTED_EXIT_CODE: 'interrupted',
    }.get(e.exit_code, 'error')
    print(f'{kind}: {e}', file=sys.stderr)
    return e.exit_code
  print('\n'.join(demo_report.summary_lines(summary)))
  print(f'wrote {os.path.join(os.path.abspath(opts.workdir), "summary.json")}')
  for failure in failed:
    print(f'error: {failure}', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
