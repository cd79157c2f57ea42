"""The probe suite: benchmarks x input modes x encoders, one results table (docs/evaluation.md).

  plan = suite_plan(config, encoders=['random:tiny', '/ckpt/run'], modes=['codec:2048'])
  rows = run_suite(plan, '/results/probe')   # cells/<key>.json, results.csv, results.md

Every cell (benchmark, input mode, encoder) runs `evaluators.protocol.run_protocol` and is
written as `cells/<key>.json` when it ends (atomically, `data_pipeline.fileio`), with status
'ok' or 'failed' (the error and its traceback's tail): a cell that fails is recorded and the
suite goes on. Rerunning the same command resumes: cells already 'ok' are read, not rerun; failed
and missing ones run. The table (`results.csv`, `results.md`) is rewritten from all cell files
after every cell, so it is current while the suite runs.

Clips are read once per (benchmark, mode) and shared by the encoders; codec selections are made
once per clip and K and kept in `selection_cache` (default OUT/selections), so a rerun reads them;
each encoder is loaded once.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import re
import time
import traceback
from typing import Any, Callable, Sequence

from data_pipeline import benchmarks as benchmarks_lib
from data_pipeline import fileio
from data_pipeline.probe_inputs import ClipSampler, ColorJitter, InputMode
from ove_jax.evaluators.protocol import ProtocolConfig, run_protocol

COLUMNS = (
  'benchmark',
  'mode',
  'encoder',
  'status',
  'top1',
  'top1_std',
  'top5',
  'top5_std',
  'seeds',
  'lr',
  'epoch',
  'num_train',
  'num_val',
  'num_test',
  'num_classes',
  'tokens',
  'seconds',
  'error',
)


class SuiteError(ValueError):
  """Bad input to the suite; the message names the argument or file."""


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
  """One benchmark of a plan: where its clips are and its recipe."""

  name: str
  train: str
  test: str
  num_classes: int
  batch_size: int
  epochs: int
  learning_rates: tuple[float, ...] = (1e-4,)
  root: str | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
  benchmarks: tuple[BenchmarkSpec, ...]
  modes: tuple[InputMode, ...]
  encoders: tuple[str, ...]
  protocol: ProtocolConfig  # epochs, batch and lrs are each benchmark's
  static_share: float = 0.5
  encoder_seed: int = 0  # the init of random:<preset> encoders
  selection_cache: str | None = None  # codec selections kept here (default OUT/selections)

  def cells(self) -> list[tuple[BenchmarkSpec, InputMode, str]]:
    return [(b, m, e) for b in self.benchmarks for m in self.modes for e in self.encoders]


def suite_plan(
  config,
  *,
  encoders: Sequence[str],
  modes: Sequence[str] = (),
  benchmarks: Sequence[str] = (),
  seeds: Sequence[int] = (),
  epochs: int | None = None,
  batch_size: int | None = None,
  eval_batch_size: int = 32,
  encoder_seed: int = 0,
  selection_cache: str | None = None,
) -> Plan:
  """A plan from an experiment config (experiments/probe_benchmarks.py) and command-line picks
  (empty: the config's)."""
  entries = [dict(e) for e in config.benchmarks]
  if benchmarks:
    known = [e['name'] for e in entries]
    unknown = [b for b in benchmarks if b not in known]
    if unknown:
      raise SuiteError(
        f'--benchmarks {",".join(benchmarks)}: {",".join(unknown)} not in the '
        f'config (it has {", ".join(known)})'
      )
    entries = [e for e in entries if e['name'] in benchmarks]
  try:
    parsed = tuple(InputMode.parse(m) for m in (modes or config.modes))
  except ValueError as e:
    raise SuiteError(f'--modes: {e}') from None
  if not encoders:
    raise SuiteError(
      '--encoders: give at least one (a checkpoint, a release directory or random:<preset>)'
    )
  specs = tuple(
    BenchmarkSpec(
      e['name'],
      e['train'],
      e['test'],
      int(e['num_classes']),
      int(batch_size or e['batch_size']),
      int(epochs or e['epochs']),
      tuple(e['learning_rates']),
      e.get('root'),
    )
    for e in entries
  )
  protocol = ProtocolConfig(
    seeds=tuple(seeds or config.seeds),
    val_fraction=config.val_fraction,
    end_learning_rate=config.end_learning_rate,
    label_smoothing=config.label_smoothing,
    init_scale=config.init_scale,
    eval_batch_size=eval_batch_size,
  )
  return Plan(
    specs,
    parsed,
    tuple(encoders),
    protocol,
    encoder_seed=encoder_seed,
    selection_cache=selection_cache,
  )


def cell_key(benchmark: str, mode: str, encoder: str) -> str:
  """A file name for a cell: readable, and unique by a hash of the three names."""
  digest = hashlib.sha1(f'{benchmark}\0{mode}\0{encoder}'.encode()).hexdigest()[:10]
  readable = re.sub(r'[^A-Za-z0-9_.+-]+', '_', f'{benchmark}__{mode}__{encoder}')[-80:]
  return f'{readable}__{digest}'


def cell_path(out_dir: str, benchmark: str, mode: str, encoder: str) -> str:
  return os.path.join(out_dir, 'cells', cell_key(benchmark, mode, encoder) + '.json')


def _row(cell: dict) -> dict[str, Any]:
  result = cell.get('result') or {}
  runs = result.get('runs', [])
  row = {k: cell.get(k, '') for k in ('benchmark', 'mode', 'encoder', 'status', 'error', 'seconds')}
  row.update(
    {
      k: result.get(k, '')
      for k in (
        'top1',
        'top1_std',
        'top5',
        'top5_std',
        'num_train',
        'num_val',
        'num_test',
        'num_classes',
      )
    }
  )
  row['tokens'] = result.get('tokens_per_sample', '')
  row['seeds'] = len(runs) or ''
  row['lr'] = '/'.join(f'{r["lr"]:g}' for r in runs)
  row['epoch'] = '/'.join(str(r['epoch']) for r in runs)
  return row


def read_cells(out_dir: str) -> list[dict]:
  folder = os.path.join(out_dir, 'cells')
  if not os.path.isdir(folder):
    return []
  return [
    fileio.read_json(os.path.join(folder, n))
    for n in sorted(os.listdir(folder))
    if n.endswith('.json')
  ]


def format_markdown(rows: Sequence[dict]) -> str:
  """The table as Markdown: top-1 / top-5 as mean ± std in percent."""
  lines = [
    '| benchmark | mode | encoder | top-1 | top-5 | seeds | lr / epoch | status |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    ok = r['status'] == 'ok'
    top1 = f'{100 * r["top1"]:.1f} ± {100 * r["top1_std"]:.1f}' if ok else ''
    top5 = f'{100 * r["top5"]:.1f} ± {100 * r["top5_std"]:.1f}' if ok else ''
    status = 'ok' if ok else f'{r["status"]}: {str(r["error"]).splitlines()[0][:80]}'
    lines.append(
      f'| {r["benchmark"]} | {r["mode"]} | {r["encoder"]} | {top1} | {top5} | '
      f'{r["seeds"]} | {r["lr"]} / {r["epoch"]} | {status} |'
    )
  return '\n'.join(lines) + '\n'


def write_table(out_dir: str, plan: Plan | None = None) -> list[dict]:
  """results.csv and results.md from the cell files (in the plan's order when given)."""
  cells = read_cells(out_dir)
  if plan is not None:
    order = {cell_key(b.name, m.name, e): i for i, (b, m, e) in enumerate(plan.cells())}
    cells.sort(
      key=lambda c: order.get(cell_key(c['benchmark'], c['mode'], c['encoder']), len(order))
    )
  rows = [_row(c) for c in cells]
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator='\n')
  writer.writeheader()
  for r in rows:
    writer.writerow(
      {k: str(r[k]).splitlines()[0] if k == 'error' and r[k] else r[k] for k in COLUMNS}
    )
  fileio.write_atomic(os.path.join(out_dir, 'results.csv'), buffer.getvalue().encode())
  fileio.write_atomic(os.path.join(out_dir, 'results.md'), format_markdown(rows).encode())
  return rows


class _Resources:
  """Clips, samplers and encoders, each made once per suite run."""

  def __init__(self, plan: Plan, selection_cache: str):
    self.plan, self.selection_cache = plan, selection_cache
    self.clips: dict[tuple[str, str], list] = {}
    self.samplers: dict[tuple[str, str], tuple[ClipSampler, ClipSampler]] = {}
    self.encoders: dict[str, Any] = {}

  def check_inputs(self) -> None:
    """Every benchmark's lists read (kept for the cells), every local encoder path there: a
    SuiteError naming it otherwise, before any cell runs."""
    from ove_jax.evaluators import attentive

    for bench in self.plan.benchmarks:
      for spec in (bench.train, bench.test):
        try:
          self.clips[(bench.name, spec)] = benchmarks_lib.open_clips(spec, bench.root)
        except (OSError, ValueError) as e:  # benchmarks.BenchmarkError is a ValueError
          raise SuiteError(f'benchmark {bench.name}: {e}') from None
      n, share = len(self.clips[(bench.name, bench.train)]), self.plan.protocol.val_fraction
      fit, val = attentive.split_indices(n, share)
      if not len(fit) or not len(val):
        raise SuiteError(
          f'benchmark {bench.name}: {n} training clip(s) with val_fraction {share} leave '
          f'{len(fit)} to train and {len(val)} to validate; set val_fraction (the config '
          'argument val_fraction=...) so that both get at least one'
        )
    from ove_jax import checkpoint

    for spec in self.plan.encoders:
      error = checkpoint.encoder_source_error(spec)
      if error:
        raise SuiteError(f'--encoders {error}')

  def samplers_of(self, bench: BenchmarkSpec, mode: InputMode):
    key = (bench.name, mode.name)
    if key not in self.samplers:
      splits = []
      for spec in (bench.train, bench.test):
        if (bench.name, spec) not in self.clips:
          self.clips[(bench.name, spec)] = benchmarks_lib.open_clips(spec, bench.root)
        splits.append(self.clips[(bench.name, spec)])
      common = dict(static_share=self.plan.static_share, selection_cache=self.selection_cache)
      self.samplers[key] = (
        ClipSampler(splits[0], mode, augment=ColorJitter(), **common),
        ClipSampler(splits[1], mode, augment=None, **common),
      )
    return self.samplers[key]

  def encoder(self, spec: str):
    if spec not in self.encoders:
      from ove_jax import checkpoint

      self.encoders[spec] = checkpoint.load_encoder(spec, seed=self.plan.encoder_seed).model
    return self.encoders[spec]


def run_cell(
  plan: Plan,
  resources: _Resources,
  bench: BenchmarkSpec,
  mode: InputMode,
  encoder: str,
  log: Callable[[str], None] | None = None,
) -> dict:
  train, test = resources.samplers_of(bench, mode)
  config = dataclasses.replace(
    plan.protocol,
    epochs=bench.epochs,
    batch_size=bench.batch_size,
    learning_rates=bench.learning_rates,
  )
  return run_protocol(
    resources.encoder(encoder), train, test, config, num_classes=bench.num_classes, log=log
  )


def run_suite(plan: Plan, out_dir: str, *, log: Callable[[str], None] = print) -> list[dict]:
  """Runs the plan's unfinished cells (see the module docstring); returns the table's rows."""
  os.makedirs(os.path.join(out_dir, 'cells'), exist_ok=True)
  fileio.remove_stale_temporaries(os.path.join(out_dir, 'cells'))
  resources = _Resources(plan, plan.selection_cache or os.path.join(out_dir, 'selections'))
  resources.check_inputs()  # a list or encoder that every cell of it would fail on: bad input
  cells = plan.cells()
  for n, (bench, mode, encoder) in enumerate(cells, 1):
    path = cell_path(out_dir, bench.name, mode.name, encoder)
    where = f'[{n}/{len(cells)}] {bench.name} {mode.name} {encoder}'
    if os.path.isfile(path) and fileio.read_json(path).get('status') == 'ok':
      log(f'{where}: done before, skipped')
      continue
    log(f'{where}: running')
    start = time.perf_counter()
    cell = {'benchmark': bench.name, 'mode': mode.name, 'encoder': encoder}
    try:
      result = run_cell(plan, resources, bench, mode, encoder, log=log)
      cell.update(status='ok', result=result, error='')
      log(  # in percent, as the table
        f'{where}: top-1 {100 * result["top1"]:.2f} ± {100 * result["top1_std"]:.2f}%, top-5 '
        f'{100 * result["top5"]:.2f}%'
      )
    except Exception as e:  # pylint: disable=broad-except  -- recorded, and the suite goes on
      cell.update(
        status='failed',
        result=None,
        error=f'{type(e).__name__}: {e}\n' + ''.join(traceback.format_exc()[-2000:]),
      )
      log(f'{where}: failed: {type(e).__name__}: {e}')
    cell['seconds'] = round(time.perf_counter() - start, 2)
    fileio.write_json(path, cell)
    write_table(out_dir, plan)
  return write_table(out_dir, plan)
