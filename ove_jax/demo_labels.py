"""The demo's cluster labels (stage 5 of `ove-demo`) and their teacher.

The teacher is an ORACLE: no teacher network can be downloaded here (the paper's is
MetaCLIP-H/14), so each sample's teacher feature embeds the generator's ground truth of its object
(texture, motion direction, shape; one-hot blocks weighted 1, 0.8, 0.6). The student never sees
those attributes, only cluster ids.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

import numpy as np


def oracle_features(attributes):
  """The demo's teacher: per sample, one-hot blocks of its object's ground truth (texture 1.0,
  direction 0.8 when the sample has one, shape 0.6), [N, D] float32.

  Stands in for a teacher network's features (the paper clusters MetaCLIP-H/14's). The weights
  order what k-means splits on first; the cluster ids, not these vectors, are what the student
  learns from.
  """
  from data_pipeline import synthetic

  blocks = (
    ('texture', len(synthetic.TEXTURES), 1.0),
    ('direction', len(synthetic.DIRECTIONS), 0.8),
    ('shape', len(synthetic.SHAPES), 0.6),
  )
  rows = []
  for a in attributes:
    rows.append(
      np.concatenate(
        [
          np.eye(n, dtype=np.float32)[a[name]] * w if name in a else np.zeros(n, np.float32)
          for name, n, w in blocks
        ]
      )
    )
  return np.stack(rows)


def cluster_labels(
  labels_dir: str,
  train_records: list,
  video_source: str,
  image_truth: np.ndarray,
  k: int,
  seed: int,
  say: Callable[[str], None],
) -> tuple[dict, dict]:
  """Oracle-teacher cluster labels of the clips (k) and the stills (k / 2) into `labels_dir`
  (the clips' records rewritten with them): (per kind {k, N, sizes, inertia}, normalised mutual
  information of the clip clusters with each ground-truth attribute)."""
  from sklearn.metrics import normalized_mutual_info_score

  from data_pipeline import builtin
  from ove_jax import labels as labels_lib

  shutil.rmtree(labels_dir, ignore_errors=True)
  truth = [builtin.video_attributes(r['labels']) for r in train_records]
  reports = {}
  for kind, feats, kind_k, shards in (
    ('video', oracle_features(truth), k, video_source.split(',')),
    (
      'image',
      oracle_features([builtin.image_attributes(row) for row in image_truth]),
      max(2, k // 2),
      [],
    ),
  ):
    out = os.path.join(labels_dir, kind)
    os.makedirs(out)
    path = os.path.join(out, 'teacher_features.npz')
    np.savez(path, features=feats)
    report = labels_lib.make_labels(
      labels_lib.prepare_features(feats, path),
      out,
      k=kind_k,
      shards=shards,
      shard_records=labels_lib.read_shards(shards),
      source=f'--features {path}',
      backend='sklearn',
      seed=seed,
    )
    sizes = report['sizes']
    say(
      f'        {kind}: {report["N"]} samples -> k = {kind_k}, cluster sizes {sizes["min"]} / '
      f'{sizes["median"]:g} / {sizes["max"]} (min / median / max), '
      f'{report["iterations"]} iterations'
    )
    reports[kind] = {'k': kind_k, 'N': report['N'], 'sizes': sizes, 'inertia': report['inertia']}
  nearest = np.load(os.path.join(labels_dir, 'video', 'labels.npy'))[:, 0]
  nmi = {
    name: round(float(normalized_mutual_info_score([t[name] for t in truth], nearest)), 3)
    for name in ('texture', 'direction', 'shape')
  }
  return reports, nmi
