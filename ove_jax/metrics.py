"""What the trainer reports about itself: metric logs, peak FLOP/s for MFU, and a hang watchdog.

`MetricWriter` sends every logged step to the writers a config chooses: `<workdir>/metrics.jsonl`
(the record that scripts and tests read back with `read_metrics`), TensorBoard and Weights &
Biases. `device_memory` reads what the accelerators say they hold.
`peak_flops_per_device` gives the denominator of MFU (`matmul_peak_flops` measures a
machine's). `Watchdog` turns a silent hang (a stuck
collective, a dead data worker) into a stack dump in the log.
"""

from __future__ import annotations

import faulthandler
import io
import json
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import fileio, paths

METRICS_FILE, TENSORBOARD_DIR = 'metrics.jsonl', 'tensorboard'

# JSON has no NaN or Inf; these strings stand for them so every line stays strict JSON.
_NONFINITE = {'nan': math.nan, 'inf': math.inf, '-inf': -math.inf}


# ------------------------------------------------------------------------------------------------
# Metric logs
# ------------------------------------------------------------------------------------------------

WRITERS = ('jsonl', 'tensorboard', 'wandb')
# How long metrics.jsonl lines may wait in memory before the object in a bucket is uploaded again
# (the bound of what a run killed without warning loses there; TensorBoard's flush_secs too).
OBJECT_FLUSH_SECONDS = 30.0
WANDB_DIR, WANDB_RUN_ID_FILE = 'wandb', 'wandb_run_id'


class MetricWriter:
  """Writes scalars to the outputs named in `writers` (config `metrics.writers`, a subset of
  WRITERS): 'jsonl' appends one JSON object a line to `<workdir>/metrics.jsonl` (the record that
  `read_metrics`, scripts and tests read back), 'tensorboard' mirrors the scalars to
  `<workdir>/tensorboard`, 'wandb' logs them to a Weights & Biases run under `<workdir>/wandb`.

  In a local workdir each jsonl line is flushed as it is written, so a run that is killed keeps
  every step it logged. In a bucket (a URL workdir) the lines are uploaded in batches
  (`_JsonlObjectOutput`): at most every `object_flush_seconds`, at `flush()` (the trainer calls it
  before each checkpoint save) and at `close()`; a run killed without warning loses the lines of
  the last `object_flush_seconds` at most, a normal end or a preemption save loses none.
  A resumed run appends to the same file and rewrites the steps after its checkpoint;
  `read_metrics` keeps the last line of each step; the wandb run is resumed under the same id
  (kept in `<workdir>/wandb_run_id`). With `enabled=False` (every process but the main one of a
  multi-host run) all methods do nothing and nothing is created on disk.
  """

  def __init__(
    self,
    workdir: str,
    *,
    enabled: bool = True,
    writers: tuple[str, ...] = ('jsonl', 'tensorboard'),
    wandb_options: Mapping[str, str] | None = None,
    run_config: Mapping[str, Any] | None = None,
    object_flush_seconds: float = OBJECT_FLUSH_SECONDS,
  ):
    check_writers(writers)
    self.enabled = enabled
    self._outputs: list[Any] = []
    if not enabled:
      return
    paths.makedirs(workdir)
    for name in writers:
      if name == 'jsonl':
        self._outputs.append(
          _JsonlOutput(workdir)
          if not paths.is_url(workdir)
          else _JsonlObjectOutput(workdir, object_flush_seconds)
        )
      elif name == 'tensorboard':
        self._outputs.append(_TensorBoardOutput(workdir))
      else:
        self._outputs.append(_WandbOutput(workdir, wandb_options or {}, run_config))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs `metrics` (scalars: Python, NumPy or JAX) for `step` to every output.

    Write all of a step's metrics in one call: `read_metrics` keeps only a step's last line.
    """
    if not self.enabled:
      return
    if 'step' in metrics:
      raise ValueError("'step' is the line's own key; rename that metric")
    values = {key: _to_python_scalar(key, value) for key, value in metrics.items()}
    for output in self._outputs:
      output.write(int(step), values)

  def write_text(self, step: int, name: str, text: str) -> None:
    """Logs a piece of text (a config dump, a sample) to the outputs that show text."""
    if not self.enabled:
      return
    for output in self._outputs:
      output.write_text(int(step), name, text)

  def flush(self) -> None:
    """Hands every output's buffered lines on now: the file, TensorBoard's events and, in a
    bucket, metrics.jsonl's object."""
    for output in self._outputs:
      output.flush()

  def close(self) -> None:
    """Flushes and closes every output; calling it again does nothing."""
    outputs, self._outputs = self._outputs, []
    for output in outputs:
      output.close()
    self.enabled = False

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def check_writers(writers) -> None:
  """Raises ValueError naming the fix unless `writers` is a non-empty tuple of WRITERS names,
  each once."""
  if isinstance(writers, str) or not writers:
    raise ValueError(
      f'metrics.writers={writers!r}: a non-empty tuple of names out of {WRITERS}, '
      "e.g. metrics.writers=\"('jsonl','tensorboard')\""
    )
  unknown = [w for w in writers if w not in WRITERS]
  if unknown:
    raise ValueError(f'metrics.writers: unknown writer(s) {unknown}; known: {", ".join(WRITERS)}')
  if len(set(writers)) != len(writers):
    raise ValueError(f'metrics.writers={tuple(writers)} names a writer twice')


class _JsonlOutput:
  """metrics.jsonl: one strict-JSON object a line, flushed at once."""

  def __init__(self, workdir: str):
    path = os.path.join(workdir, METRICS_FILE)
    _end_partial_line(path)
    self._file = open(path, 'a', encoding='utf-8')

  def write(self, step: int, values: Mapping[str, int | float]) -> None:
    line = {'step': step, **{key: _encode_nonfinite(value) for key, value in values.items()}}
    self._file.write(json.dumps(line, allow_nan=False) + '\n')
    self._file.flush()

  def write_text(self, step: int, name: str, text: str) -> None:
    del step, name, text  # a metrics line holds numbers only

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class _JsonlObjectOutput(_JsonlOutput):
  """metrics.jsonl in an object store, which cannot append: the lines are kept in memory and the
  whole object is uploaded again in batches, not per line: on the first line written
  `flush_seconds` or more after the last upload, at every `flush` (the trainer flushes before each
  checkpoint save, so the lines up to a checkpoint are in the bucket before it can commit) and at
  `close`. An upload is all-or-nothing, so a reader (or a killed run) sees every line up to
  some step, never half a line; a run killed without warning loses the lines logged in the
  `flush_seconds` after the last upload at most (a resumed run logs the steps after its
  checkpoint again). A resumed run starts from the object's lines. Uploading at every line, as
  a local file appends, would send the whole object again per log step: a cost that grows with
  the run's length (lines x object size)."""

  def __init__(self, workdir: str, flush_seconds: float):  # pylint: disable=super-init-not-called
    self._path = paths.join(workdir, METRICS_FILE)
    try:
      text = paths.read_bytes(self._path).decode('utf-8')
    except FileNotFoundError:
      text = ''
    self._text = text if not text or text.endswith('\n') else text + '\n'
    self._flush_seconds = flush_seconds
    self._pending = False  # lines written since the last upload
    self._uploaded = time.monotonic()

  def write(self, step: int, values: Mapping[str, int | float]) -> None:
    line = {'step': step, **{key: _encode_nonfinite(value) for key, value in values.items()}}
    self._text += json.dumps(line, allow_nan=False) + '\n'
    self._pending = True
    if time.monotonic() - self._uploaded >= self._flush_seconds:
      self.flush()

  def flush(self) -> None:
    if self._pending:
      fileio.write_atomic(self._path, self._text)
      self._pending, self._uploaded = False, time.monotonic()

  def close(self) -> None:
    self.flush()


class _TensorBoardOutput:
  """Scalars and text for TensorBoard, in <workdir>/tensorboard. tensorboardX writes `gs://`
  itself (the whole events object uploaded again at each flush, through google-cloud-storage)
  and `s3://` through boto3."""

  def __init__(self, workdir: str):
    # tensorboardX is imported here so that processes that never write do not load it.
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    # TensorBoard events are buffered; OBJECT_FLUSH_SECONDS bounds what a killed run loses.
    self._tb = SummaryWriter(
      paths.join(workdir, TENSORBOARD_DIR), flush_secs=int(OBJECT_FLUSH_SECONDS)
    )

  def write(self, step: int, values: Mapping[str, int | float]) -> None:
    for key, value in values.items():
      self._tb.add_scalar(key, value, global_step=step)

  def write_text(self, step: int, name: str, text: str) -> None:
    self._tb.add_text(name, text, global_step=step)

  def flush(self) -> None:
    self._tb.flush()

  def close(self) -> None:
    self._tb.close()


class _WandbOutput:
  """A Weights & Biases run with its files under <workdir>/wandb.

  `options` holds project, name, entity and mode (each '' for wandb's default; mode 'offline'
  writes the run to disk only, for `wandb sync` later, as does WANDB_MODE=offline). The run id is
  made once and kept in <workdir>/wandb_run_id, so a resumed training run continues the same
  wandb run instead of starting a new one.
  """

  def __init__(
    self, workdir: str, options: Mapping[str, str], run_config: Mapping[str, Any] | None
  ):
    try:
      import wandb  # pylint: disable=g-import-not-at-top  -- only when chosen
    except ImportError as e:
      raise ImportError(
        "metrics.writers names 'wandb' but wandb is not installed: "
        "pip install 'ove_jax[wandb]' (or drop 'wandb' from metrics.writers)"
      ) from e
    id_path = paths.join(workdir, WANDB_RUN_ID_FILE)
    if paths.exists(id_path):
      run_id = paths.read_bytes(id_path).decode('utf-8').strip()
    else:
      run_id = uuid.uuid4().hex[:16]  # letters and digits, as wandb ids must be
      fileio.write_atomic(id_path, run_id + '\n')
    kwargs = {k: v for k, v in options.items() if v}
    local = paths.local_folder(workdir)  # wandb writes local files only
    os.makedirs(local, exist_ok=True)
    self._run = wandb.init(
      id=run_id, resume='allow', dir=local, config=dict(run_config or {}), **kwargs
    )

  def write(self, step: int, values: Mapping[str, int | float]) -> None:
    self._run.log(dict(values), step=step)

  def write_text(self, step: int, name: str, text: str) -> None:
    self._run.summary[name] = text  # the latest text of each name, shown on the run's page

  def flush(self) -> None:
    pass  # wandb's own process writes the run file as it goes

  def close(self) -> None:
    self._run.finish()


def read_metrics(path: str, *, merge_steps: bool = False) -> list[dict]:
  """The lines of a metrics.jsonl (`path` is the file or the workdir holding it), one per step,
  sorted by step: the one reader of the file.

  A resumed run rewrites the steps after its checkpoint, so a later line of a step replaces an
  earlier one; with `merge_steps` it is merged into it instead (its keys win), for files where
  several writers log the same step on lines of their own. The strings 'nan', 'inf' and '-inf'
  become floats again. A line that is not JSON, or has no integer step (the half-written last
  line of a killed run), is skipped with a warning.
  """
  if paths.isdir(path):
    path = paths.join(path, METRICS_FILE)
  by_step: dict[int, dict] = {}
  with paths.open_file(path, 'r', encoding='utf-8') as f:
    for number, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        line = json.loads(text)
      except json.JSONDecodeError:
        line = None
      if not isinstance(line, dict) or not isinstance(line.get('step'), int):
        logging.warning(
          '%s:%d is not a metrics line (a run killed mid-write?); skipped', path, number
        )
        continue
      values = {key: _decode_nonfinite(value) for key, value in line.items()}
      if merge_steps:
        by_step.setdefault(line['step'], {}).update(values)
      else:
        by_step[line['step']] = values
  return [by_step[step] for step in sorted(by_step)]


def _end_partial_line(path: str) -> None:
  """Ends a half-written last line, so that the next run's first line is not glued onto it."""
  try:
    with open(path, 'rb+') as f:
      f.seek(0, os.SEEK_END)
      if f.tell() == 0:
        return
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b'\n':
        f.write(b'\n')
  except FileNotFoundError:
    pass


def _to_python_scalar(key: str, value: Any) -> int | float:
  """A Python int (integers and bools) or float from a Python, NumPy or JAX scalar."""
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f'metric {key!r} is not a scalar: shape {array.shape}')
  array = array.reshape(())
  if array.dtype.kind in 'biu':
    return int(array)
  try:
    return float(array)  # also bfloat16 and the other ml_dtypes, whose kind is not 'f'
  except (TypeError, ValueError) as e:
    raise TypeError(f'metric {key!r} is not a number: {value!r}') from e


def _encode_nonfinite(value: int | float) -> int | float | str:
  if isinstance(value, float) and not math.isfinite(value):
    return 'nan' if math.isnan(value) else ('inf' if value > 0 else '-inf')
  return value


def _decode_nonfinite(value: Any) -> Any:
  return _NONFINITE[value] if isinstance(value, str) and value in _NONFINITE else value


# ------------------------------------------------------------------------------------------------
# Peak FLOP/s
# ------------------------------------------------------------------------------------------------

UNKNOWN_PEAK_SOURCE = 'unknown: set config.peak_flops'

# Dense (not 2:4 sparse) bf16 matmul peak of one JAX device, from the vendors' datasheets. Matched
# in order against the lower-cased `device_kind`, so a variant stands before its family. Variants
# whose peak differs and is not listed here (H100 NVL, H200 NVL, TPU v4 lite) map to None: an
# unknown peak is reported as such, never borrowed from a sibling.
_PEAK_TABLE: tuple[tuple[str, float | None, str], ...] = (
  (r'\bh[12]00\b.*\bnvl\b', None, ''),
  (r'\bh100\b.*\bpcie\b', 756e12, 'NVIDIA H100 PCIe'),
  (r'\bh100\b', 989e12, 'NVIDIA H100 SXM'),
  (r'\bh200\b', 989e12, 'NVIDIA H200'),
  (r'\ba100\b', 312e12, 'NVIDIA A100'),
  (r'\bl4\b', 121e12, 'NVIDIA L4'),  # \b keeps L40 and L40S out
  (r'^tpu v4$', 275e12, 'TPU v4'),
  (r'^tpu v5 ?(lite|e)$', 197e12, 'TPU v5e'),
  (r'^tpu v5p?$', 459e12, 'TPU v5p'),  # JAX names v5p plain 'TPU v5'
  (r'^tpu v6 ?(lite|e)$', 918e12, 'TPU v6e'),
)

_host_flops: float | None = None


def peak_flops_per_device(device=None, *, override: float = 0.0) -> tuple[float, str]:
  """(peak bf16 matmul FLOP/s of one device, where that number comes from), for MFU.

  Accelerators are looked up by `device.device_kind`; one that is not in the table gives
  (0.0, 'unknown: set config.peak_flops'), since a guessed peak would make MFU a wrong number
  that looks right. On CPU the peak is measured (fp32 matmul, once per process) and split among
  the XLA virtual devices that share the host's cores. `override > 0` (config.peak_flops) wins.
  """
  if override > 0:
    return float(override), 'config.peak_flops'
  if device is None:
    device = jax.local_devices()[0]
  if getattr(device, 'platform', None) == 'cpu':
    shared_by = len(jax.local_devices(backend='cpu'))
    source = 'measured fp32 matmul on the host'
    if shared_by > 1:
      source += f', shared by {shared_by} virtual devices'
    return _measure_host_flops(device) / shared_by, source
  kind = str(getattr(device, 'device_kind', '')).strip().lower()
  for pattern, flops, name in _PEAK_TABLE:
    if re.search(pattern, kind):
      if flops is None:
        break
      return flops, f'table: {name} dense bf16'
  return 0.0, UNKNOWN_PEAK_SOURCE


def matmul_peak_flops(
  dtype: str = 'float32', repeats: int = 5, *, device=None, size: int | None = None
) -> float:
  """FLOP/s of the fastest of `repeats` runs (after a warm-up) of a jitted square matmul of
  `dtype` with float32 accumulation on `device` (default: the first): this machine's practical
  peak for the dtype. `size` defaults to 2048 on CPU, 8192 on accelerators."""
  if device is None:
    device = jax.local_devices()[0]
  n = size or peak_matmul_size(device)
  return matmul_flops(n, n, n, dtype, repeats, device=device)


def peak_matmul_size(device=None) -> int:
  """The side of `matmul_peak_flops`'s square product on `device` (default: the first): 2048
  on CPU, 8192 on accelerators. Benches that time the same product elsewhere (PyTorch) take it
  from here."""
  device = device or jax.local_devices()[0]
  return 2048 if device.platform == 'cpu' else 8192


def matmul_flops(
  m: int, k: int, n: int, dtype: str = 'float32', repeats: int = 5, *, device=None, product=None
):
  """FLOP/s of the fastest of `repeats` runs (after a warm-up) of a jitted [m, k] @ [k, n]
  matmul of `dtype` with float32 accumulation on `device` (default: the first); `product(x, y)`
  replaces XLA's dot (`cpu_blas.matmul`, say)."""
  if device is None:
    device = jax.local_devices()[0]
  rng = np.random.default_rng(0)
  a, b = (
    jax.device_put(rng.standard_normal(shape, np.float32).astype(jnp.dtype(dtype)), device)
    for shape in ((m, k), (k, n))
  )
  matmul = jax.jit(product or (lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)))
  matmul(a, b).block_until_ready()  # compiles and warms up
  best = math.inf
  for _ in range(max(1, repeats)):
    tick = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - tick)
  return 2 * m * k * n / best


def _measure_host_flops(device) -> float:
  """The host's fp32 matmul peak (`matmul_peak_flops` on a 1024 matrix), measured once."""
  global _host_flops
  if _host_flops is None:
    _host_flops = matmul_peak_flops('float32', repeats=10, device=device, size=1024)
  return _host_flops


# ------------------------------------------------------------------------------------------------
# Device memory
# ------------------------------------------------------------------------------------------------


def device_memory(devices=None) -> dict[str, int]:
  """The accelerator memory this process's devices (default: `jax.local_devices()`) hold:
  {'memory/bytes_in_use': ..., 'memory/peak_bytes_in_use': ...}, each the largest over the
  devices (the fullest device is the one that runs out first), from `device.memory_stats()`.

  Backends that do not report memory (CPU returns None) give {}: nothing is logged.
  """
  if devices is None:
    devices = jax.local_devices()
  out: dict[str, int] = {}
  for device in devices:
    try:
      stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
      stats = None
    for key in ('bytes_in_use', 'peak_bytes_in_use'):
      if stats and key in stats:
        out[f'memory/{key}'] = max(out.get(f'memory/{key}', 0), int(stats[key]))
  return out


# ------------------------------------------------------------------------------------------------
# Hang watchdog
# ------------------------------------------------------------------------------------------------


class Watchdog:
  """Dumps every Python thread's stack to stderr when no step finishes within `timeout_seconds`.

  A multi-host run that hangs (a collective one host never joins, a stuck input worker) otherwise
  sits silent until the job's wall-clock limit. Call `kick(step)` after every step. The clock
  starts at construction; until the first kick the limit is `first_timeout_seconds` (the
  restore and the first step's compilation, minutes for a large model where a step takes
  seconds; default: `timeout_seconds`). A stall is reported once, then `on_timeout()` is called
  (e.g. to abort); the next kick re-arms it. `timeout_seconds=0` disables the watchdog: no
  thread, every method a no-op.
  """

  def __init__(
    self,
    timeout_seconds: float,
    *,
    first_timeout_seconds: float | None = None,
    on_timeout: Callable[[], Any] | None = None,
  ):
    if timeout_seconds < 0:
      raise ValueError(f'timeout_seconds must be >= 0 (0 disables), got {timeout_seconds}')
    if first_timeout_seconds is not None and first_timeout_seconds <= 0:
      raise ValueError(
        f'first_timeout_seconds must be > 0 (None: timeout_seconds), got {first_timeout_seconds}'
      )
    self.timeout_seconds = float(timeout_seconds)
    self.first_timeout_seconds = float(first_timeout_seconds or timeout_seconds)
    self._on_timeout = on_timeout
    self._cond = threading.Condition()
    self._last_kick = time.monotonic()
    self._last_step: int | None = None
    self._kicks = 0
    self._closed = False
    self._thread = None
    if self.timeout_seconds > 0:
      self._thread = threading.Thread(target=self._run, name='ove-watchdog', daemon=True)
      self._thread.start()

  def kick(self, step: int | None = None) -> None:
    """Marks a step as done: the clock restarts and a reported stall is re-armed."""
    if self._thread is None:
      return
    with self._cond:
      self._last_kick = time.monotonic()
      self._last_step = step
      self._kicks += 1
      self._cond.notify()

  def close(self) -> None:
    if self._thread is None:
      return
    with self._cond:
      self._closed = True
      self._cond.notify()
    if threading.current_thread() is not self._thread:  # on_timeout may call close()
      self._thread.join()

  def __enter__(self) -> Watchdog:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _run(self) -> None:
    reported = None  # the kick count at the last report: one report per stall
    while True:
      with self._cond:
        if self._closed:
          return
        if self._kicks == reported:
          self._cond.wait()
          continue
        waited = time.monotonic() - self._last_kick
        limit = self.timeout_seconds if self._kicks else self.first_timeout_seconds
        if waited < limit:
          self._cond.wait(limit - waited)
          continue
        reported, step = self._kicks, self._last_step
      self._report(waited, step, limit)

  def _report(self, waited: float, step: int | None, limit: float) -> None:
    last = 'none yet' if step is None else str(step)
    sys.stderr.write(
      f'Watchdog: no step finished in {waited:.1f} s (timeout '
      f'{limit:g} s); last kicked step: {last}. '
      'Stacks of all threads follow.\n'
    )
    sys.stderr.flush()
    try:
      faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, io.UnsupportedOperation):
      faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)  # no fileno
    if self._on_timeout is not None:
      try:
        self._on_timeout()
      except Exception:  # pylint: disable=broad-except
        logging.exception('Watchdog on_timeout raised')
