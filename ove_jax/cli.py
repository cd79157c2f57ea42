"""What the command lines share: a tool's parser built from its console script and docstring
(`doc_parser`), a parser whose errors the caller prints, parsed flags passed on as keyword
arguments (`keywords`), and `--config.KEY` overrides passed through to an experiment.

Tools that take an experiment (`ove-sweep`, `ove-aot-memory`) accept the trainer's overrides
`--config.KEY=VALUE` (or `--config.KEY VALUE`) beside their own flags; argparse does not know
those keys, so they come back from `parse_known_args` and are split off here.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from typing import Sequence

OVERRIDE_PREFIX = '--config.'
# What a tool's `--dtype` chooses from: the encoder's compute dtype (parameters stay float32), or
# the precision an export stores.
DTYPES = ('float32', 'bfloat16')


class UsageError(ValueError):
  """Bad command-line input; printed as one `error: ...` line, exit status 2."""


def one_slash_problem(parser: argparse.ArgumentParser, parsed: argparse.Namespace, rest) -> str:
  """'FLAG VALUE: ...; write gs://' for the first flag value (or unparsed argument) that holds a
  one-slash object-store URL ('gs:/bucket/run', which every path function would take for a local
  folder named 'gs:'), '' where there is none."""
  from data_pipeline import paths  # pylint: disable=g-import-not-at-top

  flags = {a.dest: (a.option_strings or [a.dest])[-1] for a in parser._actions}  # pylint: disable=protected-access
  given = [(flags.get(k, k), v) for k, v in vars(parsed).items()] + [('argument', r) for r in rest]
  for flag, value in given:
    for text in value if isinstance(value, (list, tuple)) else [value]:
      typo = isinstance(text, str) and paths.one_slash_url(text)
      if typo:
        return f'{flag} {text}: {typo}'
  return ''


class _UrlChecked(argparse.ArgumentParser):
  """A parser that refuses one-slash object-store URLs in any flag, through its `error`."""

  def parse_known_args(self, args=None, namespace=None):
    parsed, rest = super().parse_known_args(args, namespace)
    problem = one_slash_problem(self, parsed, rest)
    if problem:
      self.error(problem)
    return parsed, rest


class ArgumentParser(_UrlChecked):
  """argparse's parser (a usage error prints the usage and exits with status 2) that also
  refuses a one-slash URL ('gs:/bucket') in any flag: every tool's parser is one of these or a
  `Parser`."""


class Parser(_UrlChecked):
  """argparse, except that a usage error raises `UsageError` (argparse would print the usage
  and exit): a tool's main() prints one error line and returns 2, and tests call main()."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('allow_abbrev', False)  # `--config` must not swallow `--config.KEY`
    super().__init__(*args, **kwargs)

  def error(self, message):
    raise UsageError(f'{message} (see --help)')


def about(flag: str, value: str, error: Exception) -> str:
  """`FLAG VALUE: message` for an error of the library about `value` (whose message may start
  with the value already: it is not repeated)."""
  message = str(error)
  if message.startswith(f'{value}: '):
    message = message[len(value) + 2 :]
  return f'{flag} {value}: {message}'


def config_overrides(rest: Sequence[str]) -> list[str]:
  """`KEY=VALUE` of every `--config.KEY=VALUE` / `--config.KEY VALUE` in `rest` (what
  `parse_known_args` left); anything else there is an unknown argument."""
  overrides, unknown, i = [], [], 0
  while i < len(rest):
    arg = rest[i]
    if arg.startswith(OVERRIDE_PREFIX) and '=' in arg:
      overrides.append(arg[len(OVERRIDE_PREFIX) :])
    elif arg.startswith(OVERRIDE_PREFIX) and i + 1 < len(rest):
      overrides.append(f'{arg[len(OVERRIDE_PREFIX) :]}={rest[i + 1]}')
      i += 1
    else:
      unknown.append(arg)
    i += 1
  if unknown:
    raise UsageError(f'unknown argument(s) {" ".join(unknown)} (see --help)')
  return overrides


def doc_parser(prog: str, doc: str, kind: type[argparse.ArgumentParser] = ArgumentParser):
  """A tool's parser: `prog` its console script, the first paragraph of its docstring the
  description and the rest, as written, the epilog. `kind` is argparse's (a usage error prints
  the usage and exits with status 2) or `Parser` (it raises `UsageError`, for a main() that
  prints it)."""
  description, _, epilog = doc.partition('\n\n')
  return kind(
    prog=prog,
    description=description,
    epilog=epilog,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )


def keywords(args: argparse.Namespace, *names: str) -> dict:
  """`{name: args.name}` of these flags: parsed values passed on as the library's keyword
  arguments of the same names, each name written once."""
  return {name: getattr(args, name) for name in names}


def add_dtype_flag(parser: argparse.ArgumentParser, default: str, help: str) -> None:
  """`--dtype`, one of `DTYPES`."""
  parser.add_argument('--dtype', default=default, choices=DTYPES, help=help)


# Seconds one clip may take in the batch tools' worker pools (ove-precompute-codec,
# ove-llava-data) before its worker is killed and the clip listed as failed.
DEFAULT_CLIP_TIMEOUT = 900.0


def _whole_number(text: str, low: int, note: str = '') -> int:
  try:
    value = int(text)
  except ValueError:
    value = low - 1
  if value < low:
    raise argparse.ArgumentTypeError(f'{text!r}: a whole number >= {low}{note}')
  return value


def count(text: str) -> int:
  """argparse type of a number of processes: an integer >= 0."""
  return _whole_number(text, 0, ' (0: in this process)')


def positive(text: str) -> int:
  """argparse type of a size or count that must be at least 1."""
  return _whole_number(text, 1)


def non_negative(text: str) -> int:
  """argparse type of a count that may be 0 (warm-up runs, say)."""
  return _whole_number(text, 0)


def _finite_at_least_zero(text: str, what: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not value >= 0 or math.isinf(value):
    raise argparse.ArgumentTypeError(f'{text!r}: {what}')
  return value


def seconds(text: str) -> float:
  """argparse type of a time limit: seconds >= 0 (0: no limit)."""
  return _finite_at_least_zero(text, 'seconds >= 0 (0: no limit)')


def non_negative_number(text: str) -> float:
  """argparse type of a finite number >= 0 (a rate whose 0 means 'look it up', say)."""
  return _finite_at_least_zero(text, 'a finite number >= 0')


def output_file_problem(path: str) -> str | None:
  """Why results could not be written to the file `path`, or None where they can: a folder is
  in the way, a file stands where a folder of its path should be, or the nearest existing folder
  is read-only. A missing folder is no problem (`write_output_json` makes it); a URL is only
  checked when written. Tools check this before the work whose results would be lost."""
  from data_pipeline import paths  # pylint: disable=g-import-not-at-top

  if paths.is_url(path):
    return None
  full = os.path.abspath(path)
  if os.path.isdir(full):
    return f'a folder; give the path of a file, e.g. {os.path.join(path, "results.json")}'
  folder = os.path.dirname(full)
  problem = paths.not_a_folder(folder)
  if problem:
    return f'its folder {folder} cannot be made: {problem}; give a path in a folder'
  existing = folder
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.access(existing, os.W_OK | os.X_OK):
    return f'the folder {existing} is not writable; give a path you may write to'
  return None


def output_file(text: str) -> str:
  """argparse type of a flag naming the file results go to (`--json`, `--out`): a path they
  could not be written to is refused as the flags are parsed, before any work ('': none)."""
  problem = text and output_file_problem(text)
  if problem:
    raise argparse.ArgumentTypeError(f'{text}: {problem}')
  return text


def add_output_flag(parser, flag: str = '--json', what: str = 'the figures') -> None:
  """`--json PATH` (or `flag`): also write `what` to a JSON file, an `output_file` checked as the
  flags are parsed ('' or absent: none)."""
  parser.add_argument(
    flag,
    metavar='PATH',
    type=output_file,
    default='',
    help=f'also write {what} to this JSON file (checked before any work; its folder is made '
    'where missing)',
  )


def write_output_json(path: str, obj, *, sort_keys: bool = False) -> None:
  """`obj` as indented JSON in the file `path` of an `output_file` flag, written atomically
  (`fileio.write_json`), its folder made where missing."""
  from data_pipeline import fileio, paths  # pylint: disable=g-import-not-at-top

  if not paths.is_url(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fileio.write_json(path, obj, sort_keys=sort_keys)


# The object an --options error shows as an example; a tool whose options lack `budget` names
# another (add_options_flag's `example`).
OPTIONS_EXAMPLE = '{"budget": 2048}'


def json_object(text: str, example: str = OPTIONS_EXAMPLE) -> dict:
  """argparse type of an --options flag: a JSON object given inline, or the path of a file
  holding one; errors show `example`."""
  source = text
  if os.path.isfile(text):
    with open(text, encoding='utf-8') as f:
      source = f.read()
  elif not text.lstrip().startswith('{') and (text.endswith('.json') or os.sep in text):
    what = 'a folder, not a JSON file' if os.path.isdir(text) else 'no such file'
    raise argparse.ArgumentTypeError(
      f"{text}: {what}; give the path of a JSON file, or the object inline ('{example}')"
    )
  try:
    value = json.loads(source)
  except ValueError as e:
    raise argparse.ArgumentTypeError(
      f"{text!r} is not JSON ({e}); give a JSON object inline ('{example}') or the path of a "
      'JSON file'
    ) from None
  if not isinstance(value, dict):
    raise argparse.ArgumentTypeError(
      f"{text!r}: give a JSON object of codec.select options ('{example}')"
    )
  return value


def add_options_flag(parser, about: str, example: str = OPTIONS_EXAMPLE) -> None:
  """`--options`: codec.select keywords as a JSON object, inline or in a file (`json_object`,
  its errors showing `example`)."""
  parser.add_argument(
    '--options',
    type=json_object
    if example == OPTIONS_EXAMPLE
    else functools.partial(json_object, example=example),
    default={},
    help=f'codec.select keyword arguments as a JSON object, inline or the path of a JSON file; '
    f'{about}',
  )


def add_pool_flags(parser: argparse.ArgumentParser) -> None:
  """`--workers` and `--clip-timeout` of a tool that runs clips in a worker pool."""
  parser.add_argument(
    '--workers',
    type=count,
    default=None,
    help='worker processes (default: the CPUs this process may use, from its '
    'affinity mask and cgroup CPU quota; 0: in this process, no time limit)',
  )
  parser.add_argument(
    '--clip-timeout',
    type=seconds,
    default=None,
    help='seconds one clip may take before its worker is killed and the clip '
    f'listed as failed (default {DEFAULT_CLIP_TIMEOUT:g}; 0: no limit)',
  )


def clip_timeout(args: argparse.Namespace, prog: str) -> float | None:
  """The time limit of `add_pool_flags` (None: no limit), with a warning where one was given
  that cannot apply: with --workers 0 the clips run in the command's own process."""
  if args.workers == 0 and args.clip_timeout:
    print(
      f'{prog}: warning: --clip-timeout {args.clip_timeout:g} does not apply with --workers 0 '
      '(clips run in this process, which nothing stops); use --workers 1 for a limit',
      file=sys.stderr,
    )
  value = DEFAULT_CLIP_TIMEOUT if args.clip_timeout is None else args.clip_timeout
  return value or None


def main_of(
  prog: str, parser: argparse.ArgumentParser, run, errors: tuple, argv=None, ok=lambda result: True
) -> int:
  """A tool's main(): `run(args)`; a usage error or one of `errors` is printed as
  `prog: error: ...` with status 2; else status 0, or 1 when `ok(result)` is false."""
  import sys

  try:
    result = run(parser.parse_args(argv))
  except (UsageError, *errors) as e:
    print(f'{prog}: error: {e}', file=sys.stderr)
    return 2
  return 0 if ok(result) else 1


# ------------------------------------------------------------------------------------------------
# ove-train
# ------------------------------------------------------------------------------------------------

TRAIN_EPILOG = """\
The experiment's keys: every key of the config can be set with --config.KEY=VALUE (e.g.
--config.optim.lr=1e-3, --config.mesh.data=-1, tuples as "(1,8)"); list them with their values
with --show-config, e.g. `ove-train --config experiments/demo_cpu.py --show-config`.

A restart with the same --workdir resumes from its last checkpoint. The run ends by printing
where its checkpoints, metrics.jsonl and TensorBoard logs are."""


def train_parser() -> argparse.ArgumentParser:
  """`ove-train`'s flags (ove_jax/train.py)."""
  from ove_jax import sharding

  parser = ArgumentParser(
    prog='ove-train',
    formatter_class=argparse.RawDescriptionHelpFormatter,
    description='Pretrains the encoder (cluster discrimination) on a device mesh, or resumes '
    'a run.',
    epilog=TRAIN_EPILOG,
  )
  parser.add_argument(
    '--config',
    required=True,
    metavar='EXPERIMENT[:ARGS]',
    help='the experiment file and its arguments, e.g. experiments/demo_cpu.py:smoke',
  )
  parser.add_argument(
    '--workdir',
    metavar='DIR',
    help='where checkpoints, metrics.jsonl, TensorBoard logs and config.json go '
    '(required unless --show-config)',
  )
  parser.add_argument(
    '--mesh',
    metavar='SIZES',
    help=f'the device mesh, overriding config.mesh: {sharding.MESH_FORMS}',
  )
  parser.add_argument(
    '--show-config',
    action='store_true',
    help='print every key of the config (after overrides) and exit',
  )
  return parser


def attach_values(argv: Sequence[str], flags: Sequence[str] = ('--mesh',)) -> list[str]:
  """`FLAG VALUE` as `FLAG=VALUE` for `flags`, whose values may start with '-' (a mesh size of
  -1), which argparse would otherwise take for a flag."""
  out, argv = [], list(argv)
  while argv:
    arg = argv.pop(0)
    if arg in flags and argv:
      arg = f'{arg}={argv.pop(0)}'
    out.append(arg)
  return out


def parse_train_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """(flags, config overrides 'key=value'). `--config.KEY=VALUE` and `--config.KEY VALUE`, like
  every flag, are accepted in both spellings."""
  from ove_jax import sharding

  parser = train_parser()
  rest, overrides, argv = [], [], attach_values(argv)
  while argv:
    arg = argv.pop(0)
    if arg.startswith('--config.'):
      item = arg[len('--config.') :]
      if '=' not in item:
        if not argv:
          parser.error(f'{arg} needs a value: {arg}=VALUE')
        item += '=' + argv.pop(0)
      overrides.append(item)
    else:
      rest.append(arg)
  args = parser.parse_args(rest)
  if args.mesh:
    try:
      sizes = sharding.parse_mesh(args.mesh)
    except ValueError as e:
      parser.error(f'--mesh: {e}')
    overrides += [f'mesh.{axis}={size}' for axis, size in sizes.items()]
  if not args.workdir and not args.show_config:
    parser.error('--workdir is required (where the run writes its checkpoints and logs)')
  return args, overrides
