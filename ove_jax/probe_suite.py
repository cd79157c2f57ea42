"""The probe suite: benchmarks x input modes x encoders, one results table (docs/evaluation.md).

  plan = suite_plan(config, encoders=['random:tiny', '/ckpt/run'], modes=['codec:2048'])
  rows = run_suite(plan, '/results/probe')   # cells/<key>.json, results.csv, results.md

Every cell (benchmark, input mode, encoder) runs `evaluators.protocol.run_protocol` and is
written as `cells/<key>.json` when it ends (atomically, `data_pipeline.fileio`), with status
'ok' or 'failed' (the error and its traceback's tail) and the settings it ran with
(`cell_settings`): a cell that fails is recorded and the suite goes on. Rerunning the same
command resumes: cells already 'ok' are read, not rerun; failed, missing and unreadable ones
run. An 'ok' cell stored with other settings than the plan's (a changed --seeds, --epochs, list,
an encoder trained on or rewritten in place since: `encoder_source.encoder_identity`, ...) is
refused before any cell runs, naming the cell and the settings, unless `rerun_changed` (then it
runs again and its file is replaced). The table (`results.csv`, `results.md`) holds the
plan's cells, rewritten from their files after every cell, so it is current while the suite
runs; cell files of other plans in the folder stay, outside the table.

Before any cell runs, what every cell of a benchmark or encoder would fail on is refused as a
SuiteError: a list that cannot be read, a label outside the class count, a missing video file, a
segment past its video's end, a split that leaves no clip to train or validate on, an encoder
that cannot be loaded. Clips are read once per (benchmark, mode) and shared by the encoders;
codec selections are made once per clip and K and kept in `selection_cache` (default
OUT/selections), so a rerun reads them (a damaged one is named and made again); each encoder is
loaded once.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import time
import traceback
from typing import Any, Callable, Sequence

from data_pipeline import benchmarks as benchmarks_lib
from data_pipeline import fileio, paths, probe_inputs
from data_pipeline.probe_inputs import ClipSampler, ColorJitter, InputMode
from ove_jax import cli, encoder_source
from ove_jax.evaluators.protocol import ProtocolConfig, run_protocol

COLUMNS = (
  'benchmark',
  'mode',
  'encoder',
  'encoder_version',
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

  def protocol_of(self, bench: BenchmarkSpec) -> ProtocolConfig:
    """The protocol of a benchmark's cells: the plan's, at the benchmark's recipe."""
    return dataclasses.replace(
      self.protocol,
      epochs=bench.epochs,
      batch_size=bench.batch_size,
      learning_rates=bench.learning_rates,
    )


# Protocol settings that change how fast a cell runs, not its result: not compared on resume.
SPEED_SETTINGS = ('eval_batch_size', 'eval_cache_bytes')


def cell_settings(plan: Plan, bench: BenchmarkSpec, mode: InputMode, identity: dict) -> dict:
  """What a cell's result depends on beyond its key (benchmark, mode, encoder), as JSON values:
  the benchmark's sources and classes, the protocol, the encoder's version (`identity`, from
  `encoder_identity`), and where they apply the codec preset and the static share. Stored with
  the cell and compared on resume."""
  protocol = dataclasses.asdict(plan.protocol_of(bench))
  settings = {k: v for k, v in protocol.items() if k not in SPEED_SETTINGS}
  settings.update(train=bench.train, test=bench.test, root=bench.root)
  settings['num_classes'] = bench.num_classes
  settings.update(identity)
  if mode.kind == 'codec':
    settings['codec_preset'] = probe_inputs.CODEC_PRESET
  if mode.intervention == 'static_motion':
    settings['static_share'] = plan.static_share
  return json.loads(json.dumps(settings))  # tuples as lists: as read back from a cell file


def encoder_version(settings: dict | None) -> str:
  """The encoder's version in a cell's settings, short, for the table: 'step 20', 'weights
  <hash>' or 'seed 0' ('' for a cell that did not store it)."""
  settings = settings if isinstance(settings, dict) else {}
  if 'encoder_step' in settings:
    return f'step {settings["encoder_step"]}'
  if 'encoder_weights' in settings:
    return f'weights {str(settings["encoder_weights"]).rsplit(" ", 1)[-1]}'
  if 'encoder_seed' in settings:
    return f'seed {settings["encoder_seed"]}'
  return ''


def settings_change(stored: dict | None, wanted: dict) -> str:
  """The settings that differ, as 'name stored -> wanted; ...' ('' when none)."""
  if not isinstance(stored, dict):
    return 'settings not recorded (an older version wrote the cell)'
  return '; '.join(
    f'{k} {stored.get(k, "(unset)")} -> {wanted.get(k, "(unset)")}'
    for k in sorted(set(stored) | set(wanted))
    if stored.get(k) != wanted.get(k)
  )


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
  try:  # the protocol's own checks (val_fraction in (0, 1), seeds, ...), at every recipe
    protocol = ProtocolConfig(
      seeds=tuple(seeds or config.seeds),
      val_fraction=config.val_fraction,
      end_learning_rate=config.end_learning_rate,
      label_smoothing=config.label_smoothing,
      init_scale=config.init_scale,
      eval_batch_size=eval_batch_size,
    )
    plan = Plan(
      specs,
      parsed,
      tuple(encoders),
      protocol,
      encoder_seed=encoder_seed,
      selection_cache=selection_cache,
    )
    for spec in specs:
      plan.protocol_of(spec)
  except ValueError as e:
    raise SuiteError(
      f'the config: {e}; fix the experiment argument (e.g. val_fraction=0.1) or the flag that '
      'sets it'
    ) from None
  return plan


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
  row['encoder_version'] = encoder_version(cell.get('settings'))
  row['tokens'] = result.get('tokens_per_sample', '')
  row['seeds'] = len(runs) or ''
  row['lr'] = '/'.join(f'{r["lr"]:g}' for r in runs)
  row['epoch'] = '/'.join(str(r['epoch']) for r in runs)
  return row


def read_cell(path: str, log: Callable[[str], None] | None = None) -> dict | None:
  """A cell file's content; None when there is none, or when it is damaged (not a cell's JSON:
  named through `log`, and the cell counts as not run)."""
  try:
    cell = fileio.read_json(path)
  except (ValueError, OSError) as e:  # json.JSONDecodeError and UnicodeDecodeError: ValueErrors
    cell = e
  if cell is None:
    return None
  if not isinstance(cell, dict) or not all(k in cell for k in ('benchmark', 'mode', 'status')):
    if log is not None:
      why = f'{type(cell).__name__}: {cell}' if isinstance(cell, Exception) else 'not a cell'
      log(f'{path}: unreadable cell file ({why}); the cell runs again')
    return None
  return cell


def read_cells(out_dir: str, log: Callable[[str], None] | None = None) -> list[dict]:
  """Every readable cell file of the folder (of any plan)."""
  folder = os.path.join(out_dir, 'cells')
  if not os.path.isdir(folder):
    return []
  names = sorted(n for n in os.listdir(folder) if n.endswith('.json'))
  found = (read_cell(os.path.join(folder, n), log) for n in names)
  return [c for c in found if c is not None]


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
    encoder = f'{r["encoder"]} ({r["encoder_version"]})' if r['encoder_version'] else r['encoder']
    lines.append(
      f'| {r["benchmark"]} | {r["mode"]} | {encoder} | {top1} | {top5} | '
      f'{r["seeds"]} | {r["lr"]} / {r["epoch"]} | {status} |'
    )
  return '\n'.join(lines) + '\n'


def write_table(out_dir: str, plan: Plan | None = None) -> list[dict]:
  """results.csv and results.md: the plan's cells that have a readable file, in the plan's
  order (every cell file of the folder when no plan is given)."""
  if plan is None:
    cells = read_cells(out_dir)
  else:
    found = (read_cell(cell_path(out_dir, b.name, m.name, e)) for b, m, e in plan.cells())
    cells = [c for c in found if c is not None]
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


def prepare_folder(path: str, flag: str) -> None:
  """Makes the folder `path` (given as `flag`), or a SuiteError naming it and the fix."""
  why = paths.not_a_folder(path)
  if why:
    raise SuiteError(f'{flag} {path}: {why}; give a folder path')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise SuiteError(f'{flag} {path}: cannot make the folder ({e.strerror or e})') from None


class _Resources:
  """Clips, samplers and encoders, each made once per suite run."""

  def __init__(self, plan: Plan, selection_cache: str, log: Callable[[str], None]):
    self.plan, self.selection_cache, self.log = plan, selection_cache, log
    self.clips: dict[tuple[str, str], list] = {}
    self.frame_counts: dict[str, dict] = {}  # per benchmark: its videos' frame counts
    self.samplers: dict[tuple[str, str], tuple[ClipSampler, ClipSampler]] = {}
    self.encoders: dict[str, Any] = {}

  def check_benchmark(self, bench: BenchmarkSpec) -> None:
    """The benchmark's lists read (kept for the cells) and their clips checked
    (`probe_inputs.check_clips`), its training list split: a SuiteError naming the benchmark,
    the list line and the fix otherwise."""
    from ove_jax.evaluators import attentive

    counts = self.frame_counts.setdefault(bench.name, {})
    for spec in (bench.train, bench.test):
      try:
        clips = benchmarks_lib.open_clips(spec, bench.root)
        probe_inputs.check_clips(clips, num_classes=bench.num_classes, frame_counts=counts)
      except (OSError, ValueError) as e:  # benchmarks.BenchmarkError is a ValueError
        raise SuiteError(f'benchmark {bench.name}: {e}') from None
      self.clips[(bench.name, spec)] = clips
    n, share = len(self.clips[(bench.name, bench.train)]), self.plan.protocol.val_fraction
    fit, val = attentive.split_indices(n, share)
    if not len(fit) or not len(val):
      raise SuiteError(
        f'benchmark {bench.name}: {n} training clip(s) with val_fraction {share} leave '
        f'{len(fit)} to train and {len(val)} to validate; set val_fraction (the config '
        'argument val_fraction=...) so that both get at least one'
      )

  def load_encoder(self, spec: str, step: int | None) -> None:
    """Loads the encoder once (a training run at `step`, the one its cells record), or a
    SuiteError naming it (the suite's cells would all fail)."""
    from ove_jax import checkpoint

    try:
      loaded = checkpoint.load_encoder(spec, seed=self.plan.encoder_seed, step=step)
      self.encoders[spec] = loaded.model
    except Exception as e:  # pylint: disable=broad-except  -- any loader error: bad input
      raise SuiteError(cli.about('--encoders', spec, e) + ' (it cannot be loaded)') from None

  def samplers_of(self, bench: BenchmarkSpec, mode: InputMode):
    key = (bench.name, mode.name)
    if key not in self.samplers:
      splits = [self.clips[(bench.name, spec)] for spec in (bench.train, bench.test)]
      common = dict(
        static_share=self.plan.static_share,
        selection_cache=self.selection_cache,
        frame_counts=self.frame_counts[bench.name],
        log=self.log,
      )
      self.samplers[key] = (
        ClipSampler(splits[0], mode, augment=ColorJitter(), **common),
        ClipSampler(splits[1], mode, augment=None, **common),
      )
    return self.samplers[key]


def run_cell(
  plan: Plan,
  resources: _Resources,
  bench: BenchmarkSpec,
  mode: InputMode,
  encoder: str,
  log: Callable[[str], None] | None = None,
) -> dict:
  train, test = resources.samplers_of(bench, mode)
  return run_protocol(
    resources.encoders[encoder],
    train,
    test,
    plan.protocol_of(bench),
    num_classes=bench.num_classes,
    log=log,
  )


def identify_encoders(plan: Plan) -> dict[str, dict]:
  """Each encoder's `encoder_identity` (its step, weights or seed), or a SuiteError naming an
  encoder that cannot be read."""
  from ove_jax import checkpoint

  found = {}
  for spec in plan.encoders:
    error = checkpoint.encoder_source_error(spec)
    if error:
      raise SuiteError(f'--encoders {error}')
    try:
      found[spec] = encoder_source.encoder_identity(spec, seed=plan.encoder_seed)
    except (OSError, ValueError) as e:
      raise SuiteError(cli.about('--encoders', spec, e) + ' (it cannot be loaded)') from None
  return found


def cells_to_run(
  plan: Plan,
  out_dir: str,
  identities: dict[str, dict],
  *,
  rerun_changed: bool,
  log: Callable[[str], None],
) -> list[tuple[BenchmarkSpec, InputMode, str]]:
  """The plan's cells without an 'ok' file at the plan's settings (with the encoders'
  `identities`). 'ok' cells stored with other settings (an encoder trained on or rewritten in
  place among them) are a SuiteError naming them and the settings, unless `rerun_changed`."""
  todo, changed = [], []
  for bench, mode, encoder in plan.cells():
    cell = read_cell(cell_path(out_dir, bench.name, mode.name, encoder), log)
    if cell is None or cell.get('status') != 'ok':
      todo.append((bench, mode, encoder))
      continue
    wanted = cell_settings(plan, bench, mode, identities[encoder])
    change = settings_change(cell.get('settings'), wanted)
    if change:
      todo.append((bench, mode, encoder))
      changed.append(f'{bench.name} {mode.name} {encoder} ({change})')
  if changed and not rerun_changed:
    more = f'; and {len(changed) - 3} more' if len(changed) > 3 else ''
    raise SuiteError(
      f'--out {out_dir}: {len(changed)} finished cell(s) there ran with other settings: '
      f'{"; ".join(changed[:3])}{more}. Give a new --out to keep both, or add --rerun-changed '
      'to run them again with these settings (their results are replaced)'
    )
  return todo


def run_suite(
  plan: Plan,
  out_dir: str,
  *,
  log: Callable[[str], None] = print,
  rerun_changed: bool = False,
) -> list[dict]:
  """Runs the plan's unfinished cells (see the module docstring); returns the table's rows."""
  prepare_folder(out_dir, '--out')
  prepare_folder(os.path.join(out_dir, 'cells'), '--out')
  selections = plan.selection_cache or os.path.join(out_dir, 'selections')
  prepare_folder(selections, '--selection-cache')
  fileio.remove_stale_temporaries(os.path.join(out_dir, 'cells'))
  identities = identify_encoders(plan)
  todo = cells_to_run(plan, out_dir, identities, rerun_changed=rerun_changed, log=log)
  # What every cell of a benchmark or encoder would fail on is bad input, refused before any
  # cell runs (checked only for those with cells to run).
  resources = _Resources(plan, selections, log)
  for bench in plan.benchmarks:
    if any(b is bench for b, _, _ in todo):
      resources.check_benchmark(bench)
  for encoder in plan.encoders:
    if any(e == encoder for _, _, e in todo):
      resources.load_encoder(encoder, identities[encoder].get('encoder_step'))
  cells = plan.cells()
  for n, (bench, mode, encoder) in enumerate(cells, 1):
    where = f'[{n}/{len(cells)}] {bench.name} {mode.name} {encoder}'
    if (bench, mode, encoder) not in todo:
      log(f'{where}: done before, skipped')
      continue
    log(f'{where}: running')
    start = time.perf_counter()
    cell = {'benchmark': bench.name, 'mode': mode.name, 'encoder': encoder}
    cell['settings'] = cell_settings(plan, bench, mode, identities[encoder])
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
    fileio.write_json(cell_path(out_dir, bench.name, mode.name, encoder), cell)
    write_table(out_dir, plan)
  others = len(read_cells(out_dir)) - len(cells)
  if others > 0:
    log(f'{others} cell file(s) of other commands kept in {out_dir}/cells, not in this table')
  return write_table(out_dir, plan)
