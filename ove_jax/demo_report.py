"""What a demo run reports (`ove-demo`): the summary as printed, and several runs' figures (one
per --seed) as one Markdown table of mean ± std.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ove_jax.demo import HEADLINE_PROBE, PROBE_RUNS


def summary_lines(summary: dict[str, Any]) -> list[str]:
  """The summary as the demo prints it: every figure, the probe table, where things are."""
  from ove_jax import evaluators

  lines = ['', 'summary']
  for key, value in summary.items():
    if key not in ('probes', 'clusters'):
      lines.append(f'  {key:42s} {value}')
  lines.append(
    f"\nprobe top-1 on the held-out clips' texture (mean ± std over probe seeds "
    f'{summary["probe_seeds"]}; headline: {HEADLINE_PROBE})'
  )
  lines.append(
    f'  {"encoder":12s} {"inputs":8s} ' + ''.join(f'{p:>16s}' for p in evaluators.PROBES)
  )
  for name, modes in summary['probes'].items():
    for mode, entry in modes.items():
      lines.append(
        f'  {name:12s} {mode:8s} '
        + ''.join(
          f'{entry[p]["top1"]:>9.3f} ± {entry[p]["top1_std"]:.3f}' for p in evaluators.PROBES
        )
      )
  lines.append(f'\nselection pictures: {", ".join(summary["selection_pictures"].values())}')
  lines.append(
    f'TensorBoard logs:   {summary["tensorboard"]}  (tensorboard --logdir {summary["tensorboard"]})'
  )
  return lines


def seed_figures(summary: dict[str, Any]) -> dict[str, float]:
  """The figures of one demo run's summary that `seed_table` compares across runs."""
  out = {
    'linear probe, pretrained, codec inputs': summary['probe_top1_codec_inputs'],
    'linear probe, pretrained, uniform frames': summary['probe_top1_uniform_inputs'],
    'linear probe, random init, codec inputs': summary['probe_top1_codec_inputs_random_init'],
    'linear probe, random init, uniform frames': summary['probe_top1_uniform_inputs_random_init'],
  }
  for probe in ('knn', 'attentive'):
    for name, mode in PROBE_RUNS:
      out[f'{probe} probe, {name.replace("_", " ")}, {mode} inputs'] = summary['probes'][name][
        mode
      ][probe]['top1']
  out.update(
    {
      'clip clusters vs ground truth (NMI), texture': summary['cluster_nmi']['texture'],
      'total loss, first logged step': summary['train_loss_first'],
      'total loss, last logged step': summary['train_loss_last'],
      'pretraining seconds': summary['train_seconds'],
      'probe stage seconds': summary['probe_seconds'],
      'whole demo seconds': summary['seconds'],
    }
  )
  return {k: float(v) for k, v in out.items()}


def seed_table(summaries: Sequence[dict[str, Any]]) -> list[str]:
  """Several demo runs' figures (their summary.json, e.g. one per --seed) as Markdown table
  lines: per figure, mean ± std (population std over the runs) and each run's value."""
  figures = [seed_figures(s) for s in summaries]
  lines = [
    '| figure | mean ± std | ' + ' | '.join(f'seed {s.get("seed", "?")}' for s in summaries) + ' |',
    '|---|---|' + '---|' * len(summaries),
  ]
  for label in figures[0]:
    values = np.asarray([f[label] for f in figures])
    digits = 1 if 'seconds' in label or 'loss' in label else 3
    lines.append(
      f'| {label} | {values.mean():.{digits}f} ± {values.std():.{digits}f} | '
      + ' | '.join(f'{v:.{digits}f}' for v in values)
      + ' |'
    )
  return lines
