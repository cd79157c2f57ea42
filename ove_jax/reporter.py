"""What the trainer says about each step: the NaN check, the metrics line, rates and MFU.

The loop hands every finished step to `StepReporter.finish` one step late (`StepResult` holds
its metrics still on the devices), so reading them never stalls the next step's dispatch. Every
step is checked for NaN/Inf; every `log_every` steps one line goes to the metrics writers
(metrics.jsonl, TensorBoard, wandb) with the step's metrics, the window's rates (step time, clips
and tokens per second, input-wait fraction, MFU), the input wait of the slowest process, the
device memory in use, the dropped records, and what the loop added since (`extra`: evaluation
results, checkpoint time).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from data_pipeline import paths
from ove_jax import metrics as metrics_lib

log = logging.getLogger('ove_jax.train')

COUNTS = ('clips', 'tokens', 'skipped')  # summed over the window, not logged per step


class TrainingError(RuntimeError):
  """The run cannot go on (diverged, data ran out); the message says what and where."""


@dataclasses.dataclass
class StepResult:
  """A step whose metrics may still be on the devices."""

  step: int
  metrics: dict[str, jax.Array]  # replicated scalars
  wait: float  # seconds the step waited for its input
  seconds: float  # wall time since the previous step ended


class Window:
  """Sums over the steps since the last metrics line (the first step of a process, which
  compiles, is left out): wall and input-wait seconds, and the COUNTS."""

  def __init__(self):
    self.steps = 0
    self.seconds = self.wait = 0.0
    self.clips = self.tokens = self.skipped = 0.0

  def rates(self, flops_per_step: int | None, peak_per_device: float, devices: int) -> dict:
    if not self.steps:
      return {}
    out = {
      'step_seconds': self.seconds / self.steps,
      'clips_per_second': self.clips / self.seconds,
      'tokens_per_second': self.tokens / self.seconds,
      'input_wait_fraction': self.wait / self.seconds,
    }
    if peak_per_device > 0 and flops_per_step:
      out['mfu'] = flops_per_step * self.steps / self.seconds / (peak_per_device * devices)
    return out


def input_wait_across_processes(wait_fraction: float) -> dict[str, float]:
  """Every process's input-wait fraction (this one's is `wait_fraction`) gathered: their max and
  mean, and the index of the slowest process (the one that waited most for its input).

  A collective: every process calls it at the same steps (the log steps). A multi-host run goes
  at the pace of its slowest input, which no single process's own fraction shows.
  """
  if jax.process_count() == 1:
    fractions = np.asarray([wait_fraction], np.float32)
  else:
    fractions = np.asarray(
      multihost_utils.process_allgather(np.asarray([wait_fraction], np.float32))
    ).reshape(-1)
  return {
    'input_wait/max': float(fractions.max()),
    'input_wait/mean': float(fractions.mean()),
    'input_wait/slowest_process': int(fractions.argmax()),
  }


def fetch(tree: dict[str, jax.Array]) -> dict[str, float]:
  """Replicated device scalars as floats, in one batched device-to-host read."""
  values = jax.device_get({k: v.addressable_data(0) for k, v in tree.items()})
  return {k: float(v) for k, v in values.items()}


class StepReporter:
  """The metrics writer, the progress bar and the current window of one training process (only
  the main process writes)."""

  def __init__(
    self,
    workdir: str,
    *,
    total_steps: int,
    log_every: int,
    start: int,
    peak_per_device: float,
    devices: int,
    checkpoints: str,
    main_process: bool,
    writers: tuple[str, ...] = ('jsonl', 'tensorboard'),
    wandb_options: dict[str, str] | None = None,
    run_config: dict | None = None,
  ):
    from tqdm import tqdm

    self.total_steps, self.log_every, self.start = total_steps, log_every, start
    self.peak_per_device, self.devices, self.checkpoints = peak_per_device, devices, checkpoints
    self.writers = writers
    self.flops_per_step: int | None = None  # set by the loop once it has seen a batch
    self.extra: dict[str, float] = {}  # for the next metrics line
    self.last: dict[str, Any] = {}  # the last line written
    self.window = Window()
    # Partial FC positives left out, summed over every step since the last line (the first step
    # of a process included): a drop at any step is reported, not only at logged ones.
    self.dropped: dict[str, float] = {}
    self.dropped_steps: list[int] = []
    self.writer = metrics_lib.MetricWriter(
      workdir,
      enabled=main_process,
      writers=writers,
      wandb_options=wandb_options,
      run_config=run_config,
    )
    self.progress = tqdm(
      total=total_steps,
      initial=start,
      disable=not main_process,
      desc='train',
      unit='step',
      dynamic_ncols=True,
      mininterval=1.0,
    )

  def finish(self, done: StepResult) -> None:
    """Checks a finished step, counts it, and writes the metrics line every log_every steps."""
    values = fetch(done.metrics)
    # Inf gradients with a finite loss give NaN weights through the clip (5 / inf * inf):
    # check what the update produced too, so such a state is never saved.
    checked = ('loss', 'param_norm', *sorted(k for k in values if k.startswith('grad_norm/')))
    bad = [k for k in checked if not np.isfinite(values[k])]
    if bad:
      raise TrainingError(
        f'{", ".join(f"{k} is {values[k]}" for k in bad)} at step {done.step}; stopping '
        f'without saving this state. The last checkpoint is in {self.checkpoints}; lower '
        'optim.lr or check the data of this step.'
      )
    counts = {k: values.pop(k) for k in COUNTS}
    for k in [k for k in values if k.endswith('/dropped')]:
      value = values.pop(k)
      self.dropped[k] = self.dropped.get(k, 0.0) + value
      if value > 0 and self.dropped_steps[-1:] != [done.step]:  # once a step, however many heads
        self.dropped_steps.append(done.step)
    if done.step > self.start + 1:  # the first step of a process compiles: not in the rates
      w = self.window
      w.seconds, w.wait, w.steps = w.seconds + done.seconds, w.wait + done.wait, w.steps + 1
      for k, v in counts.items():
        setattr(w, k, getattr(w, k) + v)
    self.progress.update(1)
    self.progress.set_postfix(loss=f'{values["loss"]:.3f}', refresh=False)
    if done.step % self.log_every and done.step != self.total_steps:
      return
    if self.dropped_steps:
      steps = self.dropped_steps
      log.warning(
        '%s: positives left out of the loss (more distinct positives in a class '
        'block than its capacity, quota + headroom; raise loss.positive_headroom): %s',
        f'step {steps[0]}'
        if len(steps) == 1
        else f'{len(steps)} steps from {steps[0]} to {steps[-1]}',
        {k: v for k, v in self.dropped.items() if v > 0},
      )
    # Each '<head>/dropped' of the line is the sum over the steps since the line before.
    values.update(self.dropped)
    self.dropped, self.dropped_steps = {}, []
    line = {**values, **self.window.rates(self.flops_per_step, self.peak_per_device, self.devices)}
    line['skipped_records'] = self.window.skipped
    if self.window.steps:  # the same on every process: each joins the gather or none does
      line.update(input_wait_across_processes(self.window.wait / self.window.seconds))
    line.update(metrics_lib.device_memory())
    line.update(self.extra)
    self.extra.clear()
    self.writer.write(done.step, line)
    self.last = {'step': done.step, **line}
    self.window = Window()

  def print_outputs(self, workdir: str, heading: str, steps: list[int]) -> None:
    """Prints where the run's checkpoints (`steps` of them) and the writers' outputs are."""
    outputs = {
      'jsonl': f'metrics:     {os.path.join(workdir, metrics_lib.METRICS_FILE)}',
      'tensorboard': 'TensorBoard: tensorboard --logdir '
      f'{os.path.join(workdir, metrics_lib.TENSORBOARD_DIR)}',
      # wandb writes local files only: a URL workdir's are in its local folder.
      'wandb': f'wandb:       {os.path.join(paths.local_folder(workdir), metrics_lib.WANDB_DIR)}',
    }
    print(
      f'{heading} of {workdir}\n  checkpoints: {self.checkpoints} (steps {steps})'
      + ''.join(f'\n  {outputs[w]}' for w in self.writers),
      flush=True,
    )

  def flush(self) -> None:
    """Hands the metrics writers' buffered lines on (in a bucket: uploads metrics.jsonl); the
    trainer calls it before a checkpoint save, so a run resumed from that checkpoint has them."""
    self.writer.flush()

  def close(self) -> None:
    self.progress.close()
    self.writer.close()
