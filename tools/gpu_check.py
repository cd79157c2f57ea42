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

Each result is printed as it is made and --out is rewritten after each one (`"complete": false`
until the end), so a run cut short keeps what it had. Off the CPU the attention checks and each
preset's step run in child processes of their own (`--no-isolate` runs all in this one): a
crash (a segfault in a kernel, an abort in XLA) or a child past `--deadline` becomes that part's
`error` result, each step's peak memory is its own, and this process never holds the device.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from ove_jax import cli, gpu_report


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
    help='attention path of the train steps (default: the first of cudnn, pallas_gpu whose '
    'bfloat16 check passed, else xla; a step that raises on it runs again on xla)',
  )
  parser.add_argument('--step-attention-auto', action='store_true', help=argparse.SUPPRESS)
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
  parser.add_argument(
    '--deadline',
    type=cli.non_negative_number,
    default=0.0,
    help='seconds the whole run may take (0: no limit). In child processes a part still '
    'running then is stopped and reported as an error, parts not started as such; in one '
    'process the run exits, --out holding the results before',
  )
  parser.add_argument(
    '--isolate',
    action=argparse.BooleanOptionalAction,
    default=None,
    help='run the attention checks and each step in a child process of its own (default: '
    'on unless --platform=cpu)',
  )
  parser.add_argument('--part', default=None, help=argparse.SUPPRESS)  # a child's one part
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


# Where the GPU backend would give way to the CPU with only a warning (jax 0.10.2 starts on the
# CPU when the CUDA plugin fails), these say a GPU is there.
NVIDIA_DEVICE = '/dev/nvidia0'
MIN_PART_SECONDS = 5  # a part with less of --deadline left is not started
CHILD_MARGIN_SECONDS = 15  # a child's own deadline is this much before it would be stopped
MEMORY_FRACTION = '0.92'  # of the device for JAX's allocator (its default, 0.75, is short)


def nvidia_visible() -> bool:
  return os.path.exists(NVIDIA_DEVICE) or shutil.which('nvidia-smi') is not None


def start_backend(a) -> tuple[str | None, str]:
  """(JAX's backend, '') or (None, why it cannot run): the CPU with --platform=cpu; with
  --platform=gpu CUDA or the real start-up error; with auto the default backend, unless a GPU is
  visible and JAX fell back to the CPU."""
  if a.platform != 'cpu':
    os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', MEMORY_FRACTION)
  import jax

  try:
    if a.platform in ('cpu', 'gpu'):
      jax.config.update('jax_platforms', 'cpu' if a.platform == 'cpu' else 'cuda')
  except RuntimeError:  # the backend is already up (a test): use it as it is
    pass
  from ove_jax import gpu_check

  try:
    platform = jax.default_backend()
  except RuntimeError as e:
    return None, f'--platform={a.platform}: JAX could not start it: {e}'
  if a.platform == 'gpu' and not gpu_check.is_gpu(platform):
    return None, (
      f"--platform=gpu, but JAX's backend is {platform!r} (no GPU visible; check the CUDA "
      'jaxlib plugin and CUDA_VISIBLE_DEVICES), or use --platform=cpu --tiny'
    )
  if a.platform == 'auto' and platform == 'cpu' and nvidia_visible():
    return None, (
      f'a GPU is visible ({NVIDIA_DEVICE} or nvidia-smi) but JAX started on the CPU: its CUDA '
      'plugin did not load (the warning above says why). Run with --platform=gpu to see the '
      'error, or --platform=cpu --tiny to check on the CPU on purpose'
    )
  return platform, ''


class Report:
  """The report as it grows: each result printed when it comes and --out rewritten after it
  (from the start: a run that dies before its first result still leaves its header)."""

  def __init__(self, out: str | None, header: dict | None = None):
    self.out = out
    self.data = {**(header or {}), 'attention': [], 'steps': [], 'complete': False}
    if header:
      self.write()

  def add(self, part: str, result: dict, show: bool = True) -> None:
    """`show`: print its line (a child's results were printed by the child)."""
    self.data[part].append(result)
    if show:
      line = gpu_report.attention_line if part == 'attention' else gpu_report.step_line
      print(f'[{part}]' + line(result), flush=True)
    self.write()

  def write(self) -> None:
    if self.out:
      cli.write_output_json(self.out, gpu_report.json_safe(self.data), sort_keys=True)

  def finish(self, report: dict) -> dict:
    report = {**report, 'complete': True}
    report['summary'] = gpu_report.summary(report)
    self.data = report
    self.write()
    return report


def run_here(a) -> int:
  """Every check (or a child's one part) in this process."""
  platform, why = start_backend(a)
  if platform is None:
    print(f'error: {why}', file=sys.stderr)
    return 2
  import jax

  from ove_jax import gpu_check

  if a.devices > len(jax.devices()):
    print(
      f'error: --devices={a.devices}: the {platform} backend has {len(jax.devices())}',
      file=sys.stderr,
    )
    return 2
  parts, presets = gpu_check.PARTS, a.presets or (('tiny',) if a.tiny else ('base', 'large'))
  if a.part:
    part, _, preset = a.part.partition(':')
    parts, presets = (part,), ((preset,) if preset else presets)
  partial = Report(a.out, gpu_check.header(platform, jax.devices()[: a.devices], a.tiny))
  report = gpu_check.run(
    platform=platform,
    tiny=a.tiny,
    presets=presets,
    implementations=a.paths,
    num_devices=a.devices,
    **cli.keywords(a, 'classes', 'step_attention'),
    timing=gpu_check.StepTiming(**cli.keywords(a, 'warmup', 'steps', 'peak_flops')),
    fp32_precision=a.fp32_precision,
    parts=parts,
    on_result=partial.add,
    step_fallback=a.step_attention is None or a.step_attention_auto,
  )
  report = partial.finish(report)
  if a.part:
    return 0
  return print_report(report)


def print_report(report: dict) -> int:
  print('\n'.join(gpu_report.table_lines(report)))
  print(json.dumps(gpu_report.json_safe(report), sort_keys=True))
  return 0 if report['summary']['ok'] else 1


def child_flags(a) -> list[str]:
  """The flags a child repeats (everything but --out, --isolate, --deadline and --part)."""
  flags = [f'--platform={a.platform}', '--no-isolate']
  if a.tiny:
    flags.append('--tiny')
  if a.paths:
    flags.append(f'--paths={",".join(a.paths)}')
  for name in ('devices', 'classes', 'warmup', 'steps', 'peak_flops', 'fp32_precision'):
    flags.append(f'--{name.replace("_", "-")}={getattr(a, name)}')
  return flags


def child_command(flags: Sequence[str]) -> list[str]:
  return [sys.executable, os.path.abspath(__file__), *flags]


def run_child(part: str, flags: list[str], folder: str, timeout: float | None) -> tuple[dict, str]:
  """(the child's report, '' or why it has no complete one) of one part in a child process. The
  child's stdout (its results as they come) is this one's; its stderr is copied to this one's
  when it ends, and its end is quoted in the reason when the child failed."""
  out = os.path.join(folder, part.replace(':', '_') + '.json')
  err = os.path.join(folder, part.replace(':', '_') + '.stderr')
  command = child_command([*flags, f'--part={part}', f'--out={out}'])
  if timeout is not None:  # the child prints its stacks and exits first (it arms its deadline
    # once its flags are read, after importing JAX: a few seconds)
    command.append(f'--deadline={max(timeout - CHILD_MARGIN_SECONDS, 1):g}')
  with open(err, 'wb') as stderr:
    try:
      code = subprocess.run(command, stderr=stderr, timeout=timeout, check=False).returncode
      why = '' if code == 0 else f'exited with {describe_exit(code)}'
    except subprocess.TimeoutExpired:
      why = f'was stopped at the deadline ({timeout:.0f} s left for it)'
  with open(err, 'rb') as f:
    logged = f.read().decode('utf-8', 'replace')
  sys.stderr.write(logged)
  report = {}
  try:
    with open(out, encoding='utf-8') as f:
      report = json.load(f)
  except (OSError, ValueError):
    why = why or 'wrote no report'
  if report.get('complete') and why.startswith('exited'):
    # Every result is in: a crash on the way out (the CUDA teardown, say) is noted, not failed.
    report.setdefault('notes', []).append(f'{part}: the child process {why} after its report')
    why = ''
  if not why and not report.get('complete'):
    why = 'left its report incomplete'
  if why:
    tail = logged[-1500:].strip()
    why = f'its child process {why}' + (f'; its stderr ended: {tail}' if tail else '')
  return report, why


def describe_exit(code: int) -> str:
  if code < 0:
    import signal

    try:
      return f'signal {signal.Signals(-code).name}'
    except ValueError:
      return f'signal {-code}'
  return f'status {code}'


def run_isolated(a) -> int:
  """The attention checks and each preset's step, each in a child process (see the docstring)."""
  from ove_jax import gpu_check

  if a.platform == 'gpu' and not nvidia_visible():
    print(
      f'error: --platform=gpu, but no NVIDIA GPU is visible ({NVIDIA_DEVICE}, nvidia-smi); '
      'use --platform=cpu --tiny to check on the CPU',
      file=sys.stderr,
    )
    return 2
  start = time.monotonic()
  flags = child_flags(a)
  presets = a.presets or (('tiny',) if a.tiny else ('base', 'large'))
  partial = Report(a.out)
  report = partial.data
  report.update(isolated=True, notes=[])
  with tempfile.TemporaryDirectory(prefix='ove-gpu-check-') as folder:
    for part in ['attention', *[f'steps:{p}' for p in presets]]:
      left = a.deadline - (time.monotonic() - start) if a.deadline else None
      kind = part.partition(':')[0]
      if left is not None and left < MIN_PART_SECONDS:
        got, why = {}, f'not started: the --deadline of {a.deadline:g} s had (nearly) passed'
      else:
        step_flags = []
        if kind == 'steps':
          step_flags = [f'--step-attention={a.step_attention}']
          if not a.step_attention:
            platform = report.get('platform') or ('gpu' if a.platform == 'gpu' else '')
            chosen = gpu_check.step_attention_for(platform, report['attention'])
            step_flags = [f'--step-attention={chosen}', '--step-attention-auto']
        got, why = run_child(part, flags + step_flags, folder, left)
      report['notes'].extend(got.get('notes', []))
      for key in ('platform', 'device_kind', 'jax', 'tiny', 'environment'):
        if key in got:
          report.setdefault(key, got[key])
      for result in got.get(kind, []):
        partial.add(kind, result, show=False)
      if why:
        failed = (
          {'implementation': 'attention part', 'dtype': '-', 'status': gpu_check.ERROR}
          if kind == 'attention'
          else {'preset': part.partition(':')[2], 'status': gpu_check.ERROR}
        )
        partial.add(kind, {**failed, 'reason': why})
  for key, value in (('platform', a.platform), ('device_kind', None), ('jax', None)):
    report.setdefault(key, value)
  report.setdefault('tiny', a.tiny)
  return print_report(partial.finish(report))


def main(argv: Sequence[str] | None = None) -> int:
  a = parse_args(argv)
  isolate = a.isolate if a.isolate is not None else a.platform != 'cpu'
  if isolate and not a.part:
    return run_isolated(a)
  if a.deadline:  # past it: every thread's stack on stderr and exit, --out holding what was done
    faulthandler.dump_traceback_later(a.deadline, exit=True)
  try:
    return run_here(a)
  finally:
    if a.deadline:
      faulthandler.cancel_dump_traceback_later()


if __name__ == '__main__':
  sys.exit(main())
