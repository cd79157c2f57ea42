"""The report of ove-gpu-check (`ove_jax.gpu_check`): statuses, the summary, the printed table
and its lines, and the report made JSON-proper."""

from __future__ import annotations

import math
from typing import Any, Mapping

GPU_PLATFORMS = ('gpu', 'cuda', 'rocm')
PASS, FAIL, SKIPPED, ERROR = 'pass', 'fail', 'skipped', 'error'


def is_gpu(platform: str) -> bool:
  return platform in GPU_PLATFORMS


def summary(report: Mapping[str, Any]) -> dict[str, Any]:
  """Counts of pass / fail / skipped / error over every result, and `ok` (nothing failed)."""
  results = list(report['attention']) + list(report['steps'])
  counts = {s: sum(r['status'] == s for r in results) for s in (PASS, FAIL, SKIPPED, ERROR)}
  return {**counts, 'ok': counts[FAIL] == 0 and counts[ERROR] == 0}


def _gb(n) -> str:
  return '-' if n is None else f'{n / 1e9:.2f} GB'


def _number(value, spec: str) -> str:
  """`value` formatted by `spec`; '-' for None; as it is for a string (a report read back from
  JSON holds non-finite figures as 'inf' / 'nan', `json_safe`)."""
  if value is None:
    return '-'
  return format(value, spec) if isinstance(value, (int, float)) else str(value)


def attention_line(r: Mapping[str, Any]) -> str:
  name = r['implementation'] + (' (interpret)' if r.get('interpret') else '')
  err = _number(r.get('max_rel'), '.3g')
  tol = _number(r.get('tolerance'), 'g')
  return (
    f'  {name:<24} {r["dtype"]:<9} {r["status"]:<8} {err:<12} {tol}'
    + (f'  {r["reason"]}' if r.get('reason') else '')
    + (f'  ({r["note"]})' if r.get('note') else '')
  )


def step_line(r: Mapping[str, Any]) -> str:
  if r['status'] in (SKIPPED, ERROR):
    return f'  {r["preset"]:<10} {r["status"]:<8} {r["reason"]}'
  mfu = r['mfu']
  mfu = f'{100 * mfu:.1f}%' if isinstance(mfu, (int, float)) else _number(mfu, '')
  fallback = r.get('attention_fallback')
  return (
    f'  {r["preset"]:<10} {r["status"]:<8} {_number(r["step_seconds"], ".4g"):<10} {mfu:<8} '
    f'{_gb(r["peak_bytes_in_use"]):<12} {_gb(r["plan"]["total_bytes"]):<12} {r["attention"]}'
    + (f' ({fallback["from"]} raised: {fallback["reason"][:200]})' if fallback else '')
  )


def table_lines(report: Mapping[str, Any]) -> list[str]:
  lines = [
    f'backend {report["platform"]} ({report["device_kind"]}), jax {report["jax"]}',
    'attention vs xla           dtype     status   max rel err  tolerance',
  ]
  lines.extend(attention_line(r) for r in report['attention'])
  lines.append('train step   status   step s     MFU      peak memory  AOT plan     attention')
  lines.extend(step_line(r) for r in report['steps'])
  s = report['summary']
  lines.append(
    f'{s[PASS]} passed, {s[FAIL]} failed, {s[ERROR]} errors, {s[SKIPPED]} skipped'
    + (
      ''
      if is_gpu(report['platform'])
      else ' (no GPU: the GPU checks above are skipped, not passed)'
    )
  )
  return lines


def json_safe(value):
  """`value` with non-finite floats as strings ('inf', 'nan'): JSON proper, not Infinity/NaN."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, Mapping):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  return value
