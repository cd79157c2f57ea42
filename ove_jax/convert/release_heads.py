"""The release's Partial FC class centres (per-rank `.npy` shards) as our heads' centre matrices.

The release's `-si` checkpoint ships the image head's centres as one file per training rank,
`ov_encoder_si_8gpus/ov_encoder_si_%03d.npy` (rank 000 ... 007), each that rank's
`PartialFC_V2.weight`: float32 [num_local, C] with C the embedding width, and the release's
trainer starts a head from them with `--list_init_partial_fc_paths <dir>/ov_encoder_si_%03d.npy`,
the `%03d` filled with the rank (release: training/train.py, `init_partial_fc % rank`;
shells/ov_encoder_large_stage2_residual_8gpus.sh). The rows of rank r are classes
[start_r, start_r + num_local_r) of the contiguous split of
training/fused_partial_fc_v2_multi_res.py:

    num_local_r = num_classes // world + (r < num_classes % world)
    start_r     = num_classes // world * r + min(r, num_classes % world)

so the shards concatenated in rank order are the [num_classes, C] matrix, without padding. Ours
keeps one matrix per head, `params/heads/<name>` [padded_classes, C] (docs/spec.md §4: the class
count padded up to whole sampling blocks); `into_head` fills the rows past num_classes, which no
label ever names, as a fresh head would be (normal, std 0.01).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Mapping

import numpy as np

from data_pipeline import fileio

_RANK = re.compile(r'(\d+)\.npy$')


def rank_files(pattern: str) -> list[str]:
  """The shard files of one head, in rank order, from the release's `%03d` template
  (`.../ov_encoder_si_%03d.npy`), a glob (`.../ov_encoder_si_*.npy`) or a folder of them."""
  if '%' in pattern:
    files, rank = [], 0
    while os.path.exists(pattern % rank):
      files.append(pattern % rank)
      rank += 1
    if not files:
      raise FileNotFoundError(f'{pattern % 0}: no rank-0 shard for the template {pattern!r}')
    extra = glob.glob(re.sub(r'%0?\d*d', '*', pattern))
    if len(extra) != len(files):
      stray = sorted(set(extra) - set(files))
      raise ValueError(
        f'{pattern!r}: ranks 0..{len(files) - 1} exist but also {stray[:3]}: a '
        "rank is missing in between; copy every rank's shard"
      )
    return files
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, '*.npy')
  found = glob.glob(pattern)
  if not found:
    raise FileNotFoundError(f'{pattern}: no .npy centre shards match')
  ranked = {}
  for path in found:
    m = _RANK.search(os.path.basename(path))
    if not m:
      raise ValueError(
        f'{path}: no rank number before .npy (the release names its shards '
        '<head>_%03d.npy); point at the shards only'
      )
    if int(m.group(1)) in ranked:
      raise ValueError(f'{path} and {ranked[int(m.group(1))]} are both rank {int(m.group(1))}')
    ranked[int(m.group(1))] = path
  missing = sorted(set(range(max(ranked) + 1)) - set(ranked))
  if missing:
    raise ValueError(
      f'{pattern}: shards of rank(s) {missing} are missing (found ranks '
      f'{sorted(ranked)}); every rank 0..{max(ranked)} is needed'
    )
  return [ranked[r] for r in sorted(ranked)]


def rank_rows(num_classes: int, world: int) -> list[int]:
  """Rows of each rank's shard in the release's class split (see the module docstring)."""
  return [num_classes // world + int(r < num_classes % world) for r in range(world)]


def read_rank(path: str) -> np.ndarray:
  """One rank's shard, memory-mapped (a rank of the release's 2M-class head is 1 GB). A file that
  cannot be mapped is read by `fileio.read_arrays`, whose ArrayFileError (a ValueError) names the
  file and what is wrong with it (empty, truncated, garbled, pickled)."""
  try:
    return np.load(path, mmap_mode='r', allow_pickle=False)
  except (EOFError, OSError, ValueError):
    try:
      a = fileio.read_arrays(path, 'release centre shard')
    except fileio.ArrayFileError as e:
      raise fileio.ArrayFileError(
        f"{e} (each rank's weight: np.save(path, weight.float().cpu().numpy()))"
      ) from None
  if isinstance(a, dict):
    raise ValueError(f'release centre shard {path}: a .npz; each rank is one .npy array')
  return a


def assemble(pattern: str, num_classes: int | None = None, width: int | None = None) -> np.ndarray:
  """The per-rank shards of one head as one float32 [num_classes, C] matrix.

  Checks that every rank is there, that the shards are 2-D of one width (= `width` if given),
  and that their row counts are the release's split of `num_classes` (of their sum when None).
  """
  files = rank_files(pattern)
  shards = []
  for path in files:
    a = read_rank(path)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
      raise ValueError(
        f'{path}: a {a.dtype} array of shape {a.shape}; expected float [classes of this rank, C]'
      )
    if shards and a.shape[1] != shards[0].shape[1]:
      raise ValueError(f'{path}: width {a.shape[1]}, but {files[0]} has {shards[0].shape[1]}')
    shards.append(a)
  if width is not None and shards[0].shape[1] != width:
    raise ValueError(
      f"{files[0]}: centres of width {shards[0].shape[1]}; this model's heads "
      f'are {width} wide (the encoder width): a different model size?'
    )
  rows = [len(a) for a in shards]
  total = sum(rows) if num_classes is None else num_classes
  expected = rank_rows(total, len(files))
  if rows != expected:
    bad = next(i for i, (a, b) in enumerate(zip(rows, expected)) if a != b)
    raise ValueError(
      f'{files[bad]}: {rows[bad]} rows; the release splits {total} classes over '
      f'{len(files)} ranks as {expected} (rows found: {rows}); check num_classes '
      'and that the shards come from one run'
    )
  return np.concatenate([np.asarray(a, np.float32) for a in shards], axis=0)


def parse_sources(text: str, key: str = 'init.release_centres') -> dict[str, str]:
  """'image=DIR/ov_encoder_si_%03d.npy,video=GLOB' -> {head: source} (the form a config string
  takes; a source holds no comma)."""
  out = {}
  for item in filter(None, (t.strip() for t in (text or '').split(','))):
    head, eq, source = item.partition('=')
    if not eq or not head.strip() or not source.strip():
      raise ValueError(
        f"{key}={text!r}: {item!r} is not head=SOURCE (SOURCE: the release's "
        '%03d template, a glob or a folder of per-rank .npy shards)'
      )
    if head.strip() in out:
      raise ValueError(f'{key}={text!r}: head {head.strip()!r} is named twice')
    out[head.strip()] = source.strip()
  return out


def load_release_centres(
  sources: str | Mapping[str, str], heads: Mapping[str, object], width: int | None = None
) -> dict[str, np.ndarray]:
  """{head: float32 [num_classes, C]} for each head named in `sources` (head -> template, glob
  or folder of its shards, or a `parse_sources` string); `heads` maps our head names to their
  losses.PartialFCConfig (or anything with `num_classes`), whose class count the shards must make
  up."""
  if isinstance(sources, str):
    sources = parse_sources(sources)
  unknown = sorted(set(sources) - set(heads))
  if unknown:
    raise ValueError(
      f'release centres for head(s) {unknown}, but this run has heads {sorted(heads)}'
    )
  return {name: assemble(src, heads[name].num_classes, width) for name, src in sources.items()}


def into_head(
  centres_NxC: np.ndarray, padded_classes: int, seed: int = 0, init_std: float = 0.01
) -> np.ndarray:
  """[padded_classes, C]: the release's rows first, the padding rows drawn like a fresh head's."""
  n, c = centres_NxC.shape
  if n > padded_classes:
    raise ValueError(f'{n} release centres do not fit a head of {padded_classes} padded classes')
  pad = np.random.default_rng(seed).normal(0.0, init_std, (padded_classes - n, c))
  return np.concatenate([centres_NxC, pad.astype(np.float32)], axis=0)
