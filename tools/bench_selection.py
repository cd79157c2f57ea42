"""Codec patch selection vs uniform frames vs random patches, on synthetic clips with known motion.

For each of `--clips` synthetic clips (data_pipeline.synthetic: 1-3 textured objects moving over
a photograph, half of the clips with a panning camera), every method picks K patches of the
T x 16 x 16 grid (K = 12.5% by default, the paper's pretraining budget) and we measure:

  share   the share of the K selected patches that lie on a moving object (a patch counts when
          objects cover at least --min-coverage of it); chance level is the 'base' rate below;
  of perfect  share / ceiling per clip, averaged (1.0: no selector could do better);
  recall  the share of all moving patches that were selected;
  clips/s how many clips per second the method selects (one process, decode + analysis; the
          synthetic rendering and encoding is not counted).

A perfect selector's share is min(1, moving patches / K) per clip ('ceiling'). Methods: the
codec selection with each `--variant` (comma-separated option=value pairs handed to
`codec.select`), `select_uniform_frames` (K/256 whole frames evenly spaced) and `select_random`.
The markdown table at the end is what README records.

  python tools/bench_selection.py                        # 16 clips of 64 frames, K = 2048
  python tools/bench_selection.py --clips 48 --codec hevc --bframes 0
  python tools/bench_selection.py --variant policy=zero --variant policy=zero,fusion=geomean
  python tools/bench_selection.py --budget 1024 --json /tmp/bench_selection.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from data_pipeline import codec, synthetic

DEFAULT_VARIANTS = ('policy=paper', 'policy=paper,camera_compensation=median',
                    'policy=zero,camera_compensation=median')


def parse_variant(text: str) -> dict:
  """'policy=zero,center_prior=0.3' -> {'policy': 'zero', 'center_prior': 0.3}."""
  options = {}
  for item in filter(None, (part.strip() for part in text.split(','))):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'--variant {text!r}: expected option=value pairs, got {item!r}')
    for convert in (int, float):
      try:
        value = convert(value)
        break
      except ValueError:
        pass
    if value in ('True', 'False', 'None'):
      value = {'True': True, 'False': False, 'None': None}[value]
    options[key.strip()] = value
  codec.Options.from_kwargs(options)  # unknown names and bad values fail here, before the run
  return options


def measure(clip, selection, budget: int, min_coverage: float) -> dict:
  moving_TxHpxWp = clip.patch_mask(selection.frame_ids, min_coverage=min_coverage)
  hits = int(moving_TxHpxWp[tuple(selection.positions.T)].sum())
  moving = int(moving_TxHpxWp.sum())
  return dict(share=hits / budget, recall=hits / max(moving, 1),
              base=float(moving_TxHpxWp.mean()), ceiling=min(1.0, moving / budget))


def run(args) -> dict:
  hp = args.resolution // args.patch_size
  budget = args.budget or (args.frames * hp * hp) // 8
  methods = {f'codec ({v})': ('codec', parse_variant(v)) for v in args.variant}
  methods['uniform frames'] = ('uniform', {})
  methods['random patches'] = ('random', {})
  results = {name: [] for name in methods}
  seconds = {name: 0.0 for name in methods}
  base, ceiling = [], []
  for i in range(args.clips):
    clip = synthetic.make_clip(
        args.seed + i, num_frames=args.source_frames or args.frames, height=args.height,
        width=args.width, codec=args.codec, bframes=args.bframes, gop=args.gop,
        num_objects=1 + i % 3, background='pan' if (i % 2 and args.pan) else 'static')
    for name, (kind, options) in methods.items():
      tick = time.perf_counter()
      if kind == 'codec':
        sel = codec.select(clip.data, args.frames, budget, args.resolution, args.patch_size,
                           **options)
      elif kind == 'uniform':
        sel = codec.select_uniform_frames(clip.data, args.frames, budget, args.resolution,
                                          args.patch_size)
      else:
        sel = codec.select_random(clip.data, args.frames, budget, args.resolution,
                                  args.patch_size, seed=args.seed + i)
      seconds[name] += time.perf_counter() - tick
      got = measure(clip, sel, budget, args.min_coverage)
      results[name].append(got)
    base.append(got['base'])
    ceiling.append(got['ceiling'])
    if args.verbose:
      print(f'clip {i}: ' + ', '.join(f'{n} {r[-1]["share"]:.3f}' for n, r in results.items()),
            file=sys.stderr)
  rows = []
  for name, per_clip in results.items():
    share = np.array([r['share'] for r in per_clip])
    of_perfect = np.array([r['share'] / max(r['ceiling'], 1e-9) for r in per_clip])
    recall = np.array([r['recall'] for r in per_clip])
    rows.append(dict(method=name, share_mean=float(share.mean()), share_std=float(share.std()),
                     share_min=float(share.min()), of_perfect=float(of_perfect.mean()),
                     recall_mean=float(recall.mean()),
                     lift=float(share.mean() / max(np.mean(base), 1e-9)),
                     clips_per_s=args.clips / max(seconds[name], 1e-9)))
  return dict(clips=args.clips, frames=args.frames, budget=budget,
              candidates=args.frames * hp * hp, codec=args.codec, bframes=args.bframes,
              size=f'{args.height}x{args.width}', base=float(np.mean(base)),
              ceiling=float(np.mean(ceiling)), rows=rows)


def table(summary: dict) -> str:
  lines = [
      f'{summary["clips"]} synthetic clips ({summary["codec"]}, {summary["size"]}, '
      f'B-frames {summary["bframes"]}), T = {summary["frames"]}, K = {summary["budget"]} of '
      f'{summary["candidates"]} patches ({100 * summary["budget"] / summary["candidates"]:.1f}%). '
      f'Chance share (moving patches / all): {summary["base"]:.3f}; '
      f'perfect selector: {summary["ceiling"]:.3f}.',
      '',
      '| method | share on moving objects (mean ± sd) | worst clip | of perfect | recall | '
      'x chance | clips/s |',
      '|---|---|---|---|---|---|---|']
  for row in summary['rows']:
    lines.append(f'| {row["method"]} | {row["share_mean"]:.3f} ± {row["share_std"]:.3f} | '
                 f'{row["share_min"]:.3f} | {row["of_perfect"]:.3f} | '
                 f'{row["recall_mean"]:.3f} | {row["lift"]:.2f} | {row["clips_per_s"]:.1f} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   epilog=__doc__.split('\n\n', 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--clips', type=int, default=16)
  parser.add_argument('--frames', type=int, default=64, help='T, frames on the timeline')
  parser.add_argument('--source-frames', type=int, default=None,
                      help='frames in each synthetic video (default: T)')
  parser.add_argument('--budget', type=int, default=None, help='K (default: 12.5%% of T x grid)')
  parser.add_argument('--resolution', type=int, default=224)
  parser.add_argument('--patch-size', type=int, default=14)
  parser.add_argument('--height', type=int, default=224, help='synthetic video height')
  parser.add_argument('--width', type=int, default=224, help='synthetic video width')
  parser.add_argument('--codec', default='h264', choices=sorted(synthetic.CODECS))
  parser.add_argument('--bframes', type=int, default=0)
  parser.add_argument('--gop', type=int, default=32)
  parser.add_argument('--no-pan', dest='pan', action='store_false',
                      help='all clips with a still camera (default: every other clip pans)')
  parser.add_argument('--variant', action='append', default=None,
                      help='codec.select options, e.g. policy=zero,fusion=max (repeatable; '
                           f'default: {" / ".join(DEFAULT_VARIANTS)})')
  parser.add_argument('--min-coverage', type=float, default=0.1,
                      help='share of a patch objects must cover for it to count as moving')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default=None, help='also write the figures here')
  parser.add_argument('--verbose', action='store_true', help='per-clip shares on stderr')
  args = parser.parse_args(argv)
  args.variant = args.variant or list(DEFAULT_VARIANTS)
  try:
    for v in args.variant:
      parse_variant(v)
  except ValueError as e:
    parser.error(str(e))
  summary = run(args)
  print(table(summary))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(summary, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
