"""What the command lines share: a parser whose errors the caller prints, and `--config.KEY`
overrides passed through to an experiment.

Tools that take an experiment (`ove-sweep`, `ove-aot-memory`) accept the trainer's overrides
`--config.KEY=VALUE` (or `--config.KEY VALUE`) beside their own flags; argparse does not know
those keys, so they come back from `parse_known_args` and are split off here.
"""
from __future__ import annotations

import argparse
from typing import Sequence

OVERRIDE_PREFIX = '--config.'


class UsageError(ValueError):
  """Bad command-line input; printed as one `error: ...` line, exit status 2."""


class Parser(argparse.ArgumentParser):
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
    message = message[len(value) + 2:]
  return f'{flag} {value}: {message}'


def config_overrides(rest: Sequence[str]) -> list[str]:
  """`KEY=VALUE` of every `--config.KEY=VALUE` / `--config.KEY VALUE` in `rest` (what
  `parse_known_args` left); anything else there is an unknown argument."""
  overrides, unknown, i = [], [], 0
  while i < len(rest):
    arg = rest[i]
    if arg.startswith(OVERRIDE_PREFIX) and '=' in arg:
      overrides.append(arg[len(OVERRIDE_PREFIX):])
    elif arg.startswith(OVERRIDE_PREFIX) and i + 1 < len(rest):
      overrides.append(f'{arg[len(OVERRIDE_PREFIX):]}={rest[i + 1]}')
      i += 1
    else:
      unknown.append(arg)
    i += 1
  if unknown:
    raise UsageError(f'unknown argument(s) {" ".join(unknown)} (see --help)')
  return overrides


def doc_parser(prog: str, doc: str) -> Parser:
  """A tool's `Parser`: `prog` its console script, the first paragraph of its docstring the
  description and the rest, as written, the epilog."""
  description, _, epilog = doc.partition('\n\n')
  return Parser(prog=prog, description=description, epilog=epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter)


def main_of(prog: str, parser: argparse.ArgumentParser, run, errors: tuple, argv=None,
            ok=lambda result: True) -> int:
  """A tool's main(): `run(args)`; a usage error or one of `errors` is printed as
  `prog: error: ...` with status 2; else status 0, or 1 when `ok(result)` is false."""
  import sys
  try:
    result = run(parser.parse_args(argv))
  except (UsageError, *errors) as e:
    print(f'{prog}: error: {e}', file=sys.stderr)
    return 2
  return 0 if ok(result) else 1
