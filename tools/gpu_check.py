"""Checks for a GPU machine (NVIDIA H100/H200): attention paths against xla, base/large steps.

Run it wherever a GPU is at hand; it needs no data and no checkpoint:

  ove-gpu-check --out=/tmp/gpu_check.json              # every check on the first GPU
  ove-gpu-check --presets=base --classes=100000       # a smaller head (an 80 GB device)
  ove-gpu-check --platform=cpu --tiny                  # on a CPU: what runs there, in seconds

It prints a table (each attention path's largest error against xla, pass/fail against
docs/spec.md §1.4's tolerance; each step's time, MFU, peak memory and the compiler's plan), then
one JSON line with every figure, and writes that JSON to --out. A check that needs hardware this
machine lacks is reported as skipped with its reason; the exit status is 1 when any check failed
or raised, else 0. The computations are ove_jax.gpu_check's; docs/gpu_check.md reads the output.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from ove_jax import cli


def _csv(text: str) -> list[str]:
  return [x.strip() for x in text.split(',') if x.strip()]


def parse_args(argv: Sequence[str] | None):
  from ove_jax.models import PRESETS, attention

  parser = cli.ArgumentParser(
    prog='ove-gpu-check', description=__doc__.split('\n\n')[0], allow_abbrev=False
  )
  parser.add_argument(
    '--platform',
    choices=('auto', 'gpu', 'cpu'),
    default='auto',
    help='the JAX backend to run on (auto: the default backend; cpu forces '
    'the CPU even where a GPU exists)',
  )
  parser.add_argument(
    '--tiny',
    action='store_true',
    help='small attention inputs and a tiny-preset step (seconds on a CPU)',
  )
  parser.add_argument(
    '--presets',
    type=_csv,
    default=None,
    help='encoder presets of the train steps, comma-separated (default: '
    'base,large; with --tiny: tiny)',
  )
  parser.add_argument(
    '--paths',
    type=_csv,
    default=None,
    help=f'attention paths to check against xla (default: all of '
    f'{",".join(attention.IMPLEMENTATIONS[1:])})',
  )
  parser.add_argument(
    '--step-attention',
    default=None,
    help='attention path of the train steps (default: cudnn on a GPU, xla elsewhere)',
  )
  for flag, kind, default, text in (
    (
      '--devices',
      cli.positive,
      1,
      "devices of the train step (the first N; its batch is the release's per-GPU batch times N)",
    ),
    (
      '--classes',
      cli.non_negative,
      0,
      "every head's class count (0: the release's 2M / 365k / 400k)",
    ),
    ('--warmup', cli.non_negative, 2, 'untimed steps after compiling'),
    ('--steps', cli.positive, 5, 'timed steps (the median is reported)'),
    (
      '--peak-flops',
      cli.non_negative_number,
      0.0,
      'peak FLOP/s of one device for MFU (0: the device table)',
    ),
  ):
    parser.add_argument(flag, type=kind, default=default, help=text)
  parser.add_argument(
    '--fp32-precision',
    choices=('highest', 'high', 'default'),
    default='highest',
    help='matmul precision of the float32 attention checks (GPUs use TF32 at default)',
  )
  cli.add_output_flag(parser, '--out', 'the report')
  a = parser.parse_args(argv)
  for name in a.paths or ():
    if name not in attention.IMPLEMENTATIONS:
      parser.error(
        f'--paths: {name!r} is not an attention path; choose from '
        f'{",".join(attention.IMPLEMENTATIONS)}'
      )
  if a.step_attention and a.step_attention not in attention.IMPLEMENTATIONS:
    parser.error(
      f'--step-attention={a.step_attention}: choose one of {",".join(attention.IMPLEMENTATIONS)}'
    )
  for name in a.presets or ():
    if name not in PRESETS:
      parser.error(f'--presets: {name!r} is not a preset; choose from {",".join(sorted(PRESETS))}')
  return a


def main(argv: Sequence[str] | None = None) -> int:
  a = parse_args(argv)
  import jax

  if a.platform == 'cpu':
    try:
      jax.config.update('jax_platforms', 'cpu')
    except RuntimeError:  # the backend is already up (a test): use it as it is
      pass
  from ove_jax import gpu_check

  platform = jax.default_backend()
  if a.platform == 'gpu' and not gpu_check.is_gpu(platform):
    print(
      f"error: --platform=gpu, but JAX's backend is {platform!r} (no GPU visible; check "
      'the CUDA jaxlib plugin and CUDA_VISIBLE_DEVICES), or use --platform=cpu --tiny',
      file=sys.stderr,
    )
    return 2
  try:
    report = gpu_check.run(
      platform=platform,
      tiny=a.tiny,
      presets=a.presets or (('tiny',) if a.tiny else ('base', 'large')),
      implementations=a.paths,
      num_devices=a.devices,
      **cli.keywords(a, 'classes', 'step_attention'),
      timing=gpu_check.StepTiming(**cli.keywords(a, 'warmup', 'steps', 'peak_flops')),
      fp32_precision=a.fp32_precision,
    )
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print('\n'.join(gpu_check.table_lines(report)))
  line = json.dumps(report, sort_keys=True)
  if a.out:
    cli.write_output_json(a.out, report, sort_keys=True)
  print(line)
  return 0 if report['summary']['ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
