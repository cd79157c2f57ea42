"""Probe a frozen encoder on labelled records: codec patches vs uniform frames (docs/spec.md §6).

  # a random-init tiny encoder on small built-in data (made under the folder on first use),
  # probing the objects' texture (the built-in data's default label)
  ove-probe --checkpoint random:tiny --builtin /tmp/ove_probe_data --out r.json
  # a training run's latest checkpoint on precomputed records: label slot `action` of three
  # named slots, three probe seeds
  ove-probe --checkpoint /ckpt/stage2 --records '/data/k400/records/*-train.array_record-*' \
      --label-names action,scene,camera --label action --seeds 0,1,2 --out /ckpt/stage2/probe.json
  # a release-format directory (e.g. the released onevision-encoder-large), codec inputs only
  ove-probe --checkpoint /models/onevision-encoder-large --records 'recs/*' --mode codec

Features of every clip are extracted once per input mode; the attentive, logistic-regression and
k-NN probes are trained on the training split and scored (top-1) on the test split, at an equal
token budget for the two modes ('codec': a clip's K selected patches; 'uniform': K / 256 whole
frames). The split, the epochs and the seeds: `ove_jax.probes` (docs/labels_and_probes.md). The
label is named: the built-in data's slots are fine, shape, direction, texture (default
texture); records of your own are named with --label-names (else label0, label1, ...). Bad input
exits with status 2 and a message naming the flag or file.
"""

from __future__ import annotations

import argparse
import sys
import time

from ove_jax import cli
from ove_jax import probes as probes_lib

# The flags passed to `probes.probe_records` as they are, under the same names.
PROBE_FLAGS = (
  'num_frames',
  'test_fraction',
  'epochs',
  'lr',
  'batch_size',
  'extract_batch_size',
  'knn_k',
  'video_root',
)


def _int_list(text: str, flag: str) -> list[int]:
  try:
    values = [int(x) for x in text.split(',') if x.strip()]
  except ValueError:
    raise probes_lib.ProbeError(f'{flag} {text!r}: expected comma-separated integers') from None
  if not values:
    raise probes_lib.ProbeError(f'{flag} {text!r}: expected at least one integer')
  return values


def build_parser() -> argparse.ArgumentParser:
  parser = cli.doc_parser('ove-probe', __doc__)
  parser.add_argument(
    '--checkpoint',
    required=True,
    help='a training workdir (its latest step), a step folder, a '
    'release-format directory (local or a gs:// / s3:// URL), or random:<preset>',
  )
  parser.add_argument(
    '--step', type=int, help='the checkpoint step of a training workdir (refused for others)'
  )
  parser.add_argument('--seed', type=int, default=0, help='the random init of random:<preset>')
  data = parser.add_mutually_exclusive_group(required=True)
  data.add_argument('--records', help='video record files (glob; several comma-separated)')
  data.add_argument('--builtin', help='a folder of data_pipeline.builtin data (made if absent)')
  parser.add_argument('--clips', type=int, default=16, help='clips of new --builtin data')
  parser.add_argument(
    '--budget', type=int, default=512, help='codec patches per clip of new --builtin data'
  )
  parser.add_argument('--video-root', default='', help="joined to records' relative sources")
  label = parser.add_mutually_exclusive_group()
  label.add_argument(
    '--label',
    help='the label to probe, by name (built-in data: fine, shape, '
    f'direction, texture; default {probes_lib.BUILTIN_DEFAULT_LABEL}) or slot '
    'number (records: default the first slot)',
  )
  label.add_argument('--label-index', type=int, help='the label to probe, by slot number')
  parser.add_argument(
    '--label-names',
    help="names of the records' label slots, "
    'comma-separated (default label0, label1, ...; built-in data has its own)',
  )
  parser.add_argument(
    '--mode', choices=('codec', 'uniform', 'both'), default='both', help='input mode(s) to probe'
  )
  parser.add_argument(
    '--num-frames',
    type=int,
    default=None,
    help="frames of the uniform mode (default: the records' K / 256, the "
    'equal token budget; 8 for K = 2048)',
  )
  parser.add_argument(
    '--test-fraction', type=float, default=0.3, help='share of the records that test the probes'
  )
  parser.add_argument(
    '--probes', default='attentive,linear,knn', help='comma-separated: attentive, linear, knn'
  )
  parser.add_argument(
    '--epochs',
    type=int,
    default=None,
    help=f'attentive probe epochs (default 10; 30 below {probes_lib.SMALL_SET} clips)',
  )
  parser.add_argument('--lr', type=float, default=1e-4, help='attentive probe peak lr')
  parser.add_argument('--batch-size', type=int, default=32, help='attentive probe batch')
  parser.add_argument('--extract-batch-size', type=int, default=8, help='encoder forward batch')
  parser.add_argument('--knn-k', type=int, default=20, help='neighbours of the k-NN probe')
  parser.add_argument('--seeds', default='0', help='probe seeds, e.g. 0,1,2')
  parser.add_argument(
    '--out',
    type=cli.output_file,
    default='',
    help='write the results here as JSON (checked before any work; its folder is made)',
  )
  return parser


def load_encoder(spec: str, seed: int = 0, step: int | None = None):
  """(encoder, description) of --checkpoint (`checkpoint.load_encoder`, errors naming the flag)."""
  from ove_jax import checkpoint, cli

  try:
    loaded = checkpoint.load_encoder(spec, step=step, seed=seed)
  except (OSError, ValueError, KeyError) as e:
    raise probes_lib.ProbeError(cli.about('--checkpoint', spec, e)) from None
  return loaded.model, loaded.source


def check_step(spec: str, step: int | None) -> None:
  """Refuses --step for a --checkpoint that is not a training run (it would be ignored)."""
  from ove_jax import encoder_source

  kind = encoder_source.encoder_kind(spec) if step is not None else 'training'
  if kind != 'training':
    raise probes_lib.ProbeError(
      f'--step {step}: picks a checkpoint of a training workdir only, and --checkpoint {spec} is '
      f'{encoder_source.ENCODER_KINDS[kind]}; drop --step (or give the training workdir)'
    )


def run(args) -> dict:
  """The probes of the parsed command line; prints progress and the table, returns the results."""
  start = time.perf_counter()
  check_step(args.checkpoint, args.step)
  seeds = _int_list(args.seeds, '--seeds')
  probes = [p.strip() for p in args.probes.split(',') if p.strip()]
  from ove_jax import checkpoint

  missing = checkpoint.encoder_source_error(args.checkpoint)  # cheap: the load comes last
  if missing:
    raise probes_lib.ProbeError(f'--checkpoint {missing}')
  if args.builtin:
    records, where, names = probes_lib.builtin_records(
      args.builtin, clips=args.clips, budget=args.budget
    )
    label = args.label or probes_lib.BUILTIN_DEFAULT_LABEL
  else:
    files = probes_lib.record_files(args.records)
    records = probes_lib.read_records(files)
    where = f'{len(files)} record file(s) of {args.records}'
    names = probes_lib.label_names(
      records, args.label_names.split(',') if args.label_names else None
    )
    label = args.label or 0
  if args.label_index is not None:
    label, flag = args.label_index, f'--label-index {args.label_index}'
  else:
    flag = f'--label {label}'
  index = probes_lib.label_index(label, names)
  try:
    probes_lib.record_labels(records, index)
  except probes_lib.ProbeError as e:
    raise probes_lib.ProbeError(f'{flag}: {e}') from None
  encoder, source = load_encoder(args.checkpoint, args.seed, args.step)  # after the data's checks
  print(f'encoder: {source} (width {encoder.cfg.width}, depth {encoder.cfg.depth})')
  print(f'data: {where}')
  modes = ('codec', 'uniform') if args.mode == 'both' else (args.mode,)
  results = probes_lib.probe_records(
    encoder,
    records,
    label=index,
    label_names=names,
    modes=modes,
    probes=probes,
    seeds=seeds,
    log=lambda line: print(line, flush=True),
    **cli.keywords(args, *PROBE_FLAGS),
  )
  results = {
    'checkpoint': args.checkpoint,
    'encoder': source,
    'data': where,
    **results,
    'seconds': time.perf_counter() - start,
  }
  print()
  print(probes_lib.format_table(results))
  print(f'\n{results["seconds"]:.1f} s')
  if args.out:
    try:
      cli.write_output_json(args.out, results)  # a local path (folder made) or a URL
    except OSError as e:
      raise probes_lib.ProbeError(
        f'--out {args.out}: not written ({e}); the table above holds the results'
      ) from None
    print(f'wrote {args.out}')
  return results


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    run(args)
  except probes_lib.ProbeError as e:
    print(f'ove-probe: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
