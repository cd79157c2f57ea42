"""Probe a frozen encoder on labelled video records: codec patches vs uniform frames (SPEC §6).

Features of every clip are extracted once per input mode, then the attentive probe (a new MAP
head, LayerNorm, linear; AdamW 1e-4, label smoothing 0.1), a logistic-regression probe and a
cosine k-NN probe are trained on the training split and scored (top-1) on the test split. The
two modes have an equal token budget: 'codec' feeds a clip's K selected patches, 'uniform'
feeds K / 256 whole frames (`--num-frames`, by default the records' K / 256), so the table
compares where the same number of tokens is spent.

  # a random-init tiny encoder on small built-in data (made under the folder on first use)
  python tools/probe.py --checkpoint random:tiny --builtin /tmp/ove_probe_data --out r.json
  # a training run's latest checkpoint on precomputed records, label 1, three probe seeds
  ove-probe --checkpoint /ckpt/stage2 --records '/data/k400/records/*-train.array_record-*' \
      --label-index 1 --seeds 0,1,2 --mode both --out /ckpt/stage2/probe.json
  # a release-format directory (e.g. the released onevision-encoder-large), codec inputs only
  ove-probe --checkpoint /models/onevision-encoder-large --records 'recs/*' --mode codec

The split is deterministic by record index: record i is a test record when
floor((i + 1) f) > floor(i f), f = --test-fraction, which spreads the test records evenly over
the file order. Epochs default to SPEC §6's: 10, or 30 for a small training split (< 1000
clips). With several --seeds the attentive and linear probes are retrained per seed and the
table gives mean ± std (k-NN is deterministic and runs once). Bad input exits with status 2 and
a message naming the flag or file.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

SMALL_SET = 1000  # training clips below which SPEC §6's 30 epochs apply instead of 10


class InputError(Exception):
  """Bad user input: printed as `error: ...`, exit status 2."""


def _int_list(text: str, flag: str) -> list[int]:
  try:
    values = [int(x) for x in text.split(',') if x.strip()]
  except ValueError:
    raise InputError(f'{flag} {text!r}: expected comma-separated integers') from None
  if not values:
    raise InputError(f'{flag} {text!r}: expected at least one integer')
  return values


def load_encoder(spec: str, seed: int = 0):
  """The encoder of `--checkpoint`: `random:<preset>`, a release-format directory (config.json
  and model.safetensors), or a training workdir (its latest checkpoint)."""
  from ove_jax.models import PRESETS, EncoderConfig, create_encoder

  if spec.startswith('random:'):
    preset = spec.split(':', 1)[1]
    if preset not in PRESETS:
      raise InputError(f'--checkpoint {spec}: unknown preset {preset!r}; choose one of '
                       f'{sorted(PRESETS)}')
    return create_encoder(EncoderConfig.preset(preset), seed=seed), f'random init {preset}'
  if not os.path.isdir(spec):
    raise InputError(f'--checkpoint {spec}: no such directory (give a training workdir, a '
                     'release-format directory, or random:<preset>)')
  try:
    # A training workdir has a config.json too (the experiment's): the weights file decides.
    if os.path.isfile(os.path.join(spec, 'model.safetensors')):
      from ove_jax import convert
      return convert.load_pytorch(spec), f'release-format directory {spec}'
    from ove_jax_tools.convert_checkpoint import trained_encoder
    model, step, _ = trained_encoder(spec)
    return model, f'training run {spec} step {step}'
  except (OSError, ValueError, KeyError) as e:
    raise InputError(f'--checkpoint {spec}: cannot load an encoder: {e}') from None


def load_records(args) -> tuple[list[dict], str]:
  """The labelled video records of --records or --builtin, in file order."""
  from data_pipeline import precompute

  if args.builtin:
    from data_pipeline import builtin
    root = os.path.abspath(args.builtin)
    marker = os.path.join(root, 'builtin.json')
    params = {'clips': args.clips, 'images': 1, 'budget': args.budget, 'seed': 0}
    if os.path.isfile(marker):  # made before: take it as it is, whatever it was made with
      try:
        with open(marker) as f:
          made_with = json.load(f)['params']
        params = {k: made_with[k] for k in params}
      except (OSError, ValueError, KeyError) as e:
        raise InputError(f'--builtin {args.builtin}: unreadable {marker} ({e})') from None
    try:
      made = builtin.ensure(root, progress=False, **params)
    except (OSError, ValueError, RuntimeError) as e:
      raise InputError(f'--builtin {args.builtin}: {e}') from None
    paths, where = made['video_source'].split(','), f'built-in data in {root}'
  else:
    paths = sorted({p for pattern in args.records.split(',') if pattern
                    for p in glob.glob(os.path.expanduser(pattern))})
    if not paths:
      raise InputError(f'--records {args.records!r}: no file matches')
    where = f'{len(paths)} record file(s) of {args.records}'
  records = []
  for path in paths:
    try:
      shard = precompute.read_shard(path)
    except Exception as e:  # pylint: disable=broad-except  -- any unreadable file is bad input
      raise InputError(f'--records: cannot read {path}: {e}') from None
    for i, record in enumerate(shard):
      if record.get('labels') is None or record.get('positions') is None:
        raise InputError(f'{path}: record {i} is not a labelled video record (it has '
                         f'{sorted(record)}); the probes need `labels` and codec `positions`')
    records.extend(shard)
  return records, where


def split(n: int, test_fraction: float) -> tuple[list[int], list[int]]:
  """(train, test) record indices: i is a test record when floor((i+1) f) > floor(i f)."""
  test = [i for i in range(n) if int((i + 1) * test_fraction) > int(i * test_fraction)]
  chosen = set(test)
  return [i for i in range(n) if i not in chosen], test


def _format_table(results: dict) -> str:
  seeds = results['seeds']
  lines = [f'{"mode":8} {"tokens":>6}  {"probe":9}  top-1 (mean ± std over {len(seeds)} seed(s))']
  for mode, entry in results['modes'].items():
    for probe in results['probes']:
      r = entry[probe]
      extra = (f'  (best of {r["runs"][0]["epochs"]} epochs; last epoch {r["top1_last"]:.3f})'
               if probe == 'attentive' else '')
      lines.append(f'{mode:8} {entry["tokens_per_sample"]:6.0f}  {probe:9}  '
                   f'{r["top1"]:.3f} ± {r["top1_std"]:.3f}{extra}')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True,
                      help='a training workdir, a release-format directory, or random:<preset>')
  parser.add_argument('--seed', type=int, default=0, help='the random init of random:<preset>')
  data = parser.add_mutually_exclusive_group(required=True)
  data.add_argument('--records', help='video record files (glob; several comma-separated)')
  data.add_argument('--builtin', help='a folder of data_pipeline.builtin data (made if absent)')
  parser.add_argument('--clips', type=int, default=16, help='clips of new --builtin data')
  parser.add_argument('--budget', type=int, default=512,
                      help='codec patches per clip of new --builtin data')
  parser.add_argument('--video-root', default='', help='joined to records\' relative sources')
  parser.add_argument('--mode', choices=('codec', 'uniform', 'both'), default='both')
  parser.add_argument('--num-frames', type=int, default=None,
                      help='frames of the uniform mode (default: the records\' K / 256, the '
                      'equal token budget; 8 for K = 2048)')
  parser.add_argument('--test-fraction', type=float, default=0.3)
  parser.add_argument('--probes', default='attentive,linear,knn')
  parser.add_argument('--epochs', type=int, default=None,
                      help=f'attentive probe epochs (default 10; 30 below {SMALL_SET} clips)')
  parser.add_argument('--lr', type=float, default=1e-4, help='attentive probe peak lr')
  parser.add_argument('--batch-size', type=int, default=32, help='attentive probe batch')
  parser.add_argument('--extract-batch-size', type=int, default=8, help='encoder forward batch')
  parser.add_argument('--knn-k', type=int, default=20)
  parser.add_argument('--label-index', type=int, default=0, help='which of a record\'s labels')
  parser.add_argument('--seeds', default='0', help='probe seeds, e.g. 0,1,2')
  parser.add_argument('--out', help='write the results here as JSON')
  args = parser.parse_args(argv)
  start = time.perf_counter()
  try:
    return _run(args, start)
  except InputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


def _run(args, start: float) -> int:
  from ove_jax import evaluators

  seeds = _int_list(args.seeds, '--seeds')
  try:
    probes = evaluators.check_probes([p.strip() for p in args.probes.split(',') if p.strip()])
  except ValueError as e:
    raise InputError(f'--probes {args.probes!r}: {e}') from None
  if not 0 < args.test_fraction < 1:
    raise InputError(f'--test-fraction {args.test_fraction}: must be between 0 and 1')
  for flag in ('epochs', 'num_frames', 'batch_size', 'extract_batch_size', 'knn_k'):
    value = getattr(args, flag)
    if value is not None and value < 1:
      raise InputError(f'--{flag.replace("_", "-")} {value}: must be >= 1')
  if args.lr <= 0:
    raise InputError(f'--lr {args.lr}: must be > 0')
  if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
    raise InputError(f'--out {args.out}: its folder does not exist')

  import numpy as np
  encoder, source = load_encoder(args.checkpoint, args.seed)
  records, where = load_records(args)
  try:
    labels = [evaluators.record_label(r, args.label_index) for r in records]
  except ValueError as e:
    raise InputError(f'--label-index {args.label_index}: {e}') from None
  train_idx, test_idx = split(len(records), args.test_fraction)
  if not train_idx or not test_idx:
    raise InputError(f'--test-fraction {args.test_fraction} of {len(records)} record(s) leaves '
                     f'{len(train_idx)} for training and {len(test_idx)} for testing; both need '
                     'at least one')
  budget = int(np.median([len(r['positions']) for r in records]))
  num_frames = args.num_frames or max(1, round(budget / 256))
  epochs = args.epochs or (30 if len(train_idx) < SMALL_SET else 10)
  modes = ('codec', 'uniform') if args.mode == 'both' else (args.mode,)
  print(f'encoder: {source} (width {encoder.cfg.width}, depth {encoder.cfg.depth})')
  print(f'data: {where}: {len(records)} clips ({len(train_idx)} train, {len(test_idx)} test), '
        f'{len(set(labels))} classes in label {args.label_index}; codec K = {budget}, uniform '
        f'{num_frames} frames = {num_frames * 256} tokens')
  if 'uniform' in modes and num_frames * 256 != budget:
    print(f'note: the token budgets differ (codec {budget}, uniform {num_frames * 256})')

  results = {'checkpoint': args.checkpoint, 'encoder': source, 'data': where,
             'num_records': len(records), 'num_train': len(train_idx),
             'num_test': len(test_idx), 'label_index': args.label_index,
             'num_frames': num_frames, 'codec_budget': budget, 'epochs': epochs, 'seeds': seeds,
             'probes': list(probes), 'test_fraction': args.test_fraction, 'modes': {}}
  attentive = evaluators.AttentiveConfig(epochs=epochs, batch_size=args.batch_size,
                                         learning_rate=args.lr)
  for mode in modes:
    try:
      samples = evaluators.video_samples(records, mode, num_frames, label_index=args.label_index,
                                         video_root=args.video_root)
    except (OSError, ValueError) as e:
      raise InputError(f'{where}: cannot build the {mode} samples: {e}') from None
    entry = evaluators.evaluate(
        encoder, [samples[i] for i in train_idx], [samples[i] for i in test_idx], probes=probes,
        batch_size=args.extract_batch_size, seeds=seeds, attentive=attentive, knn_k=args.knn_k)
    results['modes'][mode] = entry
    print(f'{mode}: features in {entry["features_seconds"]:.1f} s, ' + ', '.join(
        f'{p} top-1 {entry[p]["top1"]:.3f}' for p in probes), flush=True)
  results['seconds'] = time.perf_counter() - start
  print()
  print(_format_table(results))
  print(f'\n{time.perf_counter() - start:.1f} s')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)
    print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
