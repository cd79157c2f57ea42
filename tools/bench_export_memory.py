"""Host memory of exporting a training checkpoint's encoder: params-only restore vs the full state.

  python tools/bench_export_memory.py --workdir RUN [--old-source DIR] [--cli]

Each measurement runs in a fresh Python process: it imports what the export needs, starts JAX,
takes its resident set as the baseline, then loads the encoder while a thread samples the
resident set every millisecond; the peak beyond the baseline is reported next to the encoder's
parameter bytes (float32). `params-only` is `ove_jax.checkpoint.load_encoder` of this checkout
(orbax partial restore of params/encoder); `full-state` is the same export through
`tools/convert_checkpoint.py`'s `trained_encoder` of `--old-source` (a checkout of the code
before params-only restores, e.g. `git archive <commit> | tar -x -C DIR`), which restored the
whole train state (parameters and both Adam moments) onto the host. `--cli` measures the whole
`ove-convert from-train` (load, write model.safetensors, read it back for the round-trip check)
instead of the load alone.

Make a `base`-preset checkpoint on CPU with, e.g.:
  ove-train --config experiments/demo_cpu.py:smoke,steps=2,workers=0 --workdir RUN \\
      --config.model.preset=base --config.checkpoint_every=2
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from ove_jax import cli

PROG = 'bench_export_memory'

# Run in the child: `load()` is the variant's code; the rest measures around it.
_CHILD = r"""
import json, os, resource, sys, threading, time
import jax, numpy as np
sys.path[:0] = SOURCE_PATHS
from ove_jax import checkpoint as _ckpt  # noqa: the import cost is part of the baseline
jax.devices()

def rss():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

LOAD

base, peak, done = rss(), [0], threading.Event()
max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def sample():
  while not done.is_set():
    peak[0] = max(peak[0], rss())
    time.sleep(0.001)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
model = load()
seconds = time.perf_counter() - start
done.set()
thread.join()
max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peak = max(peak[0], max_after if max_after > max_before else 0)
if isinstance(model, str):  # an export folder: its float32 weights files (headers are bytes)
  import glob
  param_bytes = sum(os.path.getsize(p) for p in glob.glob(os.path.join(model, '*.safetensors')))
else:
  from flax import nnx
  param_bytes = sum(int(np.prod(v.shape)) * 4 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
print('RESULT ' + json.dumps({'baseline_bytes': base, 'peak_bytes': peak,
                              'beyond_baseline_bytes': peak - base, 'param_bytes': param_bytes,
                              'seconds': seconds}))
"""

_NEW_LOAD = """
def load():
  return _ckpt.load_encoder(WORKDIR).model
"""
# The source's tools/convert_checkpoint.py, imported by path as `cli`.
_IMPORT_CLI = """
import importlib.util, tempfile
spec = importlib.util.spec_from_file_location(
    'convert_checkpoint', os.path.join(SOURCE_PATHS[0], 'tools', 'convert_checkpoint.py'))
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
"""
_OLD_LOAD = (
  _IMPORT_CLI
  + """
def load():
  return cli.trained_encoder(WORKDIR)[0]
"""
)
# `--cli`'s load (public: a test runs it against a stand-in converter).
CLI_LOAD = (
  _IMPORT_CLI
  + """
def load():
  # In the working folder, which `measure` removes with all in it, also on an error.
  out = tempfile.mkdtemp(dir=os.getcwd())
  assert cli.main(['from-train', '--workdir', WORKDIR, '--out', out]) == 0
  return out   # the parameter bytes are read from the written files, after the sampling stops
"""
)


def measure(workdir: str, source: str, load: str) -> dict:
  """One measurement in a fresh process, with `source` first on the import path."""
  code = (
    _CHILD.replace('LOAD', load)
    .replace('SOURCE_PATHS', repr([source]))
    .replace('WORKDIR', repr(os.path.abspath(workdir)))
  )
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([source, os.environ.get('PYTHONPATH', '')])}
  env.pop('XLA_FLAGS', None)  # one CPU device: the export's own setting
  # The child's working folder; `--cli` exports into it, so nothing is left behind.
  with tempfile.TemporaryDirectory() as cwd:
    proc = subprocess.run(
      [sys.executable, '-c', code], env=env, capture_output=True, text=True, cwd=cwd
    )
  lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
  if proc.returncode or not lines:
    raise RuntimeError(f'measurement failed ({source}):\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULT ') :])


def check_inputs(args) -> None:
  """Bad input named before any measurement starts: --workdir must hold a committed training
  checkpoint, --old-source a checkout whose tools/convert_checkpoint.py has `trained_encoder`."""
  from ove_jax import checkpoint

  try:
    checkpoint.locate(args.workdir)
  except FileNotFoundError as e:
    raise cli.UsageError(f'--workdir {e}') from None
  if args.old_source:
    module = os.path.join(args.old_source, 'tools', 'convert_checkpoint.py')
    try:
      with open(module) as f:
        found = 'def trained_encoder(' in f.read()
    except OSError:
      found = False
    if not found:
      raise cli.UsageError(
        f'--old-source {args.old_source}: no tools/convert_checkpoint.py with trained_encoder '
        'there; give a checkout of the code before params-only restores (git archive <commit> '
        '| tar -x -C DIR)'
      )


def run(args) -> dict:
  check_inputs(args)
  # This checkout: the folder above tools/ (realpath: the module may be reached through a link,
  # e.g. a package folder ove_jax_tools -> tools).
  here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
  variants = {'params-only': (here, CLI_LOAD if args.cli else _NEW_LOAD)}
  if args.old_source:
    variants['full-state'] = (
      os.path.abspath(args.old_source),
      CLI_LOAD if args.cli else _OLD_LOAD,
    )
  results = {}
  for name, (source, load) in variants.items():
    r = results[name] = measure(args.workdir, source, load)
    print(
      f'{name:12s} baseline {r["baseline_bytes"] / 2**20:8.1f} MiB  peak beyond baseline '
      f'{r["beyond_baseline_bytes"] / 2**20:8.1f} MiB = '
      f"{r['beyond_baseline_bytes'] / r['param_bytes']:.2f} x the encoder's "
      f'{r["param_bytes"] / 2**20:.1f} MiB of parameters ({r["seconds"]:.1f} s)'
    )
  if args.json:
    cli.write_output_json(
      args.json, {'workdir': os.path.abspath(args.workdir), 'cli': args.cli, **results}
    )
  return results


def main(argv=None) -> int:
  parser = cli.doc_parser(PROG, __doc__, cli.Parser)
  parser.add_argument('--workdir', required=True, help='a training workdir with a checkpoint')
  parser.add_argument(
    '--old-source',
    help=(
      'a checkout of the code before params-only restores '
      '(full-state export); omit to measure the params-only export alone'
    ),
  )
  parser.add_argument(
    '--cli',
    action='store_true',
    help='measure the whole `ove-convert from-train` instead of the load',
  )
  cli.add_output_flag(parser)
  return cli.main_of(PROG, parser, run, (), argv)


if __name__ == '__main__':
  sys.exit(main())
