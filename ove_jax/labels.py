"""Cluster labels (docs/spec.md §3): k-means over teacher features, each sample's nearest centres.

  x, ids = load_features('feats.npz')                 # [N, D] or [N, F, D] -> unit rows
  x = teacher_features(encoder, records)              # or an ove_jax encoder over records
  x, ids = sharded_teacher_features(HFTeacher('openai/clip-vit-base-patch16'), records,
                                    '/data/labels/features')   # or a transformers model
  report = make_labels(x, '/data/labels', k=2000)     # labels.npy, centres.npy, report.json

Features. A file holds [N, D] (one feature per sample) or [N, F, D] (F per-frame features of a
video: each frame L2-normalised, the F concatenated and re-normalised, as the paper does with 8
MetaCLIP frames); a `.npz` holds `features` and optionally `ids`. Or an ove_jax encoder is the
teacher, run on precomputed records: an image record gives one feature (224 centre crop); a
video record gives 8 uniform frames (one per bin of its timeline, seeded per record), each
encoded alone on the 16 x 16 grid at t = 0, pooled, and combined as above. Or a transformers
vision model (`HFTeacher`) is the teacher on the same frames, its features written in resumable
shards (`sharded_teacher_features`).

Clustering. scikit-learn (Lloyd, one init), `ove_jax.kmeans` (centres sharded over the mesh,
points in chunks) or faiss (`ove_jax.kmeans_backends.fit`); the default ('auto') is scikit-learn
when k * N is small, else JAX. Features are L2-normalised first and the JAX and faiss k-means are
spherical (cosine), as the labels are by cosine; scikit-learn runs Euclidean k-means on the
normalised features.

Outputs: labels.npy int32 [N, n] (the n = 10 nearest centres by cosine, nearest first),
centres.npy float32 [k, D], ids.npy (when the features had ids), report.json: k, N, inertia,
iterations, empty clusters, cluster sizes (min / median / max and a histogram). With records,
OUT/records/ holds a copy of every input shard (same file names, records format) with `labels`
replaced. Bad input raises `LabelsError`, whose message names the argument (spelled as the
`ove-cluster-labels` flag of the same name) and the file.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from data_pipeline import fileio, paths
from ove_jax.vectors import l2_normalise

NUM_LABELS = 10
FRAMES = 8  # frames per video feature (docs/spec.md §3)
SKLEARN_MAX_WORK = 1 << 26  # k * N up to which the default backend is scikit-learn
SPHERICAL_OBJECTIVE = 'spherical: sum of 2 - 2 cos (squared distance on the sphere)'
BACKENDS = ('auto', 'sklearn', 'jax', 'faiss')


class LabelsError(ValueError):
  """Bad input; the message names the argument or file."""


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------


def combine_frames(f_NxFxD: np.ndarray) -> np.ndarray:
  """Per-frame L2 normalisation, concatenation, re-normalisation (docs/spec.md §3): [N, F*D]."""
  n = f_NxFxD.shape[0]
  return l2_normalise(l2_normalise(f_NxFxD.astype(np.float32)).reshape(n, -1))


def prepare_features(feats: np.ndarray, where: str = 'features') -> np.ndarray:
  """Checked float32 unit rows [N, D] of [N, D] or [N, F, D] (per-frame) features."""
  feats = np.asarray(feats)
  if feats.ndim not in (2, 3) or feats.dtype.kind not in 'fiu' or 0 in feats.shape:
    raise LabelsError(
      f'{where}: array of shape {feats.shape} ({feats.dtype}); expected '
      'numbers of shape [N, D] or [N, F, D] (per-frame features)'
    )
  if not np.isfinite(feats).all():
    raise LabelsError(f'{where}: holds NaN or infinite values')
  return combine_frames(feats) if feats.ndim == 3 else l2_normalise(feats.astype(np.float32))


def load_features(path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """(features [N, D] float32 unit rows, ids or None) from a .npy / .npz."""
  where = f'--features {path}'
  if not os.path.isfile(path):
    raise LabelsError(f'{where}: no such file')
  try:
    data = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise LabelsError(f'{where}: not a .npy / .npz file ({e})') from None
  ids = None
  if isinstance(data, np.lib.npyio.NpzFile):
    with data:
      if 'features' not in data.files:
        raise LabelsError(
          f'{where}: the .npz has {sorted(data.files)}; it needs `features` (and optionally `ids`)'
        )
      feats = data['features']
      ids = data['ids'] if 'ids' in data.files else None
  else:
    feats = data
  if ids is not None and len(ids) != len(feats):
    raise LabelsError(f'{where}: {len(ids)} ids for {len(feats)} feature rows')
  return prepare_features(feats, where), ids


def record_shards(pattern: str) -> list[str]:
  """The ArrayRecord shards of a precompute output folder (its finished shards, in order) or of
  a glob; a folder's plan, progress and failure files are not shards and are skipped."""
  from data_pipeline import precompute, sources

  try:
    if os.path.isdir(pattern):
      paths = precompute.shard_files(pattern)
    else:
      paths = [
        p
        for p in sources.expand_paths(pattern)
        if os.path.isfile(p) and '.array_record' in os.path.basename(p)
      ]
  except FileNotFoundError as e:
    raise LabelsError(f'--records {pattern}: {e}') from None
  if not paths:
    raise LabelsError(f'--records {pattern}: no ArrayRecord shards (*.array_record*) there')
  return paths


def read_shards(paths: Sequence[str]) -> list[list[dict]]:
  """Every shard's records, shard by shard."""
  from data_pipeline import precompute

  return [precompute.read_shard(p) for p in paths]


def record_frames(record: dict, index: int, seed: int) -> np.ndarray:
  """uint8 [F, 256, 588]: one 224 centre crop of an image record, 8 uniform frames of a video."""
  from data_pipeline import transforms

  if 'image' in record:
    # ImageTransform wants labels, which records get only from cluster labels: any will do here.
    transform = transforms.ImageTransform(
      resolution=transforms.VIDEO_RESOLUTION, crop='centre', flip_prob=0.0
    )
    sample = transform({**record, 'labels': np.zeros(1, np.int32)}, np.random.default_rng(0))
    return sample['patches'][None]
  transform = transforms.VideoTransform(mode_probs=(0, 1, 0), num_frames=FRAMES)
  patches, _ = transform.frames(record, np.random.default_rng([seed, index]), collage=False)
  return patches.reshape(FRAMES, -1, transforms.PATCH_DIM)


def teacher_features(model, recs: Sequence[dict], batch: int = 32, seed: int = 0) -> np.ndarray:
  """Pooled embeddings of every record's frames, each frame alone at t = 0, combined per record:
  float32 unit rows [N, D] (D = F x width for videos)."""
  import jax
  from flax import nnx
  from tqdm import tqdm

  from data_pipeline import transforms

  forward = nnx.jit(lambda m, p, pos: m(p, pos)['pooled'][:, 0])
  frames = [record_frames(r, i, seed) for i, r in enumerate(recs)]
  counts = {len(f) for f in frames}
  if len(counts) > 1:
    raise LabelsError('--records mixes image and video records; cluster each kind separately')
  flat = np.concatenate(frames).astype(np.uint8)  # [N*F, 256, 588]
  grid = transforms.VIDEO_RESOLUTION // transforms.PATCH
  pos = np.broadcast_to(transforms.grid_positions(0, grid, grid), (batch, grid * grid, 3))
  out = []
  for start in tqdm(range(0, len(flat), batch), desc='teacher', unit='batch'):
    part = flat[start : start + batch]
    n = len(part)
    if n < batch:  # one compiled shape for every batch
      part = np.concatenate([part, np.zeros((batch - n, *part.shape[1:]), part.dtype)])
    out.append(np.asarray(jax.device_get(forward(model, transforms.normalise(part), pos)))[:n])
  f = np.concatenate(out).astype(np.float32).reshape(len(recs), counts.pop(), -1)
  return combine_frames(f) if f.shape[1] > 1 else l2_normalise(f[:, 0])


# ------------------------------------------------------------------------------------------------
# Clustering
# ------------------------------------------------------------------------------------------------


def initial_centres(init: str, k: int, d: int):
  """'k-means++', 'random', or the [k, D] centres of a .npy file."""
  if init in ('k-means++', 'random'):
    return init
  if not os.path.isfile(init):
    raise LabelsError(f'--init {init}: not "k-means++", "random" or an existing .npy file')
  c = np.load(init, allow_pickle=False)
  if c.shape != (k, d):
    raise LabelsError(f'--init {init}: centres of shape {c.shape}; expected {(k, d)}')
  return c.astype(np.float32)


def cluster(
  x_NxD: np.ndarray,
  k: int,
  *,
  backend: str | None = None,
  init: str = 'k-means++',
  iters: int = 100,
  tol: float = 1e-4,
  seed: int = 0,
  chunk: int | None = None,
  mesh=None,
) -> dict[str, Any]:
  """Centres, sizes, inertia and iteration count of the chosen backend (None or 'auto':
  scikit-learn when k * N <= SKLEARN_MAX_WORK, else the JAX k-means on `mesh`; 'faiss':
  spherical faiss k-means through `ove_jax.kmeans_backends.fit`)."""
  start = initial_centres(init, k, x_NxD.shape[1])
  if backend not in BACKENDS + (None,):
    raise LabelsError(f'--backend {backend}: choose one of {BACKENDS}')
  if backend in (None, 'auto'):
    backend = 'sklearn' if k * len(x_NxD) <= SKLEARN_MAX_WORK else 'jax'
  if backend == 'faiss':
    from ove_jax import kmeans_backends

    try:
      r = kmeans_backends.fit(
        x_NxD, k, backend='faiss', init=start, iters=iters, seed=seed, spherical=True
      )
    except ImportError as e:
      raise LabelsError(f'--backend faiss: {e}') from None
    return _kmeans_result(backend, r, empty_reseeded=None)
  if backend == 'sklearn':
    from sklearn.cluster import KMeans

    km = KMeans(
      k, init=start, n_init=1, max_iter=iters, tol=tol, random_state=seed, algorithm='lloyd'
    ).fit(x_NxD)
    sizes = np.bincount(km.labels_, minlength=k)
    return {
      'backend': backend,
      'centres': km.cluster_centers_.astype(np.float32),
      'inertia': float(km.inertia_),
      'iterations': int(km.n_iter_),
      'sizes': sizes,
      'empty_reseeded': None,
      'converged': int(km.n_iter_) < iters,
      'objective': 'squared euclidean on L2-normalised features',
    }
  import jax

  from ove_jax import kmeans

  with jax.set_mesh(mesh or default_mesh()):
    r = kmeans.fit(
      x_NxD, k, init=start, iters=iters, tol=tol, seed=seed, spherical=True, chunk=chunk
    )
  return _kmeans_result(backend, r, empty_reseeded=r.empty_reseeded)


def _kmeans_result(backend: str, r, *, empty_reseeded: int | None) -> dict[str, Any]:
  """`cluster`'s answer from a spherical `ove_jax.kmeans.KMeans` (the JAX or faiss backend)."""
  return {
    'backend': backend,
    'centres': r.centres,
    'inertia': r.inertia,
    'iterations': r.n_iter,
    'sizes': r.sizes,
    'empty_reseeded': empty_reseeded,
    'converged': r.converged,
    'objective': SPHERICAL_OBJECTIVE,
  }


def default_mesh():
  """Every device on the data axis: centres and points are sharded over all of them anyway."""
  from ove_jax import sharding

  return sharding.make_mesh({'data': -1})


def size_report(sizes: np.ndarray, bins: int = 10) -> dict:
  """Min, median, max and a histogram of the cluster sizes."""
  counts, edges = np.histogram(sizes, bins=min(bins, max(1, int(sizes.max()) + 1)))
  return {
    'min': int(sizes.min()),
    'median': float(np.median(sizes)),
    'max': int(sizes.max()),
    'histogram': {'edges': [float(e) for e in edges], 'counts': counts.tolist()},
  }


# ------------------------------------------------------------------------------------------------
# Records and the whole run
# ------------------------------------------------------------------------------------------------


def write_records(
  shards: Sequence[str],
  shard_records: Sequence[Sequence[dict]],
  labels_NxL: np.ndarray,
  out_dir: str,
) -> list[str]:
  """Copies of the input shards with `labels` replaced, row i of labels for record i in order."""
  from data_pipeline import precompute, records

  paths.makedirs(out_dir)
  written, i = [], 0
  for path, recs in zip(shards, shard_records):
    target = paths.join(out_dir, paths.basename(path))
    if paths.absolute(target) == paths.absolute(path):
      raise LabelsError(f'--out: {target} would overwrite its input shard')
    writer = precompute.ShardWriter(target)
    try:
      for record in recs:
        writer.write(records.encode({**record, 'labels': labels_NxL[i]}))
        i += 1
      writer.commit()
    except BaseException:
      writer.abandon()
      raise
    written.append(target)
  return written


def make_labels(
  x_NxD: np.ndarray,
  out: str,
  *,
  k: int,
  num_labels: int = NUM_LABELS,
  ids: np.ndarray | None = None,
  shards: Sequence[str] = (),
  shard_records: Sequence[Sequence[dict]] = (),
  source: str = '',
  chunk: int | None = None,
  mesh=None,
  start: float | None = None,
  **cluster_options,
) -> dict[str, Any]:
  """Clusters the unit rows `x_NxD`, labels every row with its `num_labels` nearest centres and
  writes labels.npy, centres.npy, ids.npy (with `ids`), report.json and, with `shards`, the
  relabelled records into `out`. Returns the report (`start`: the perf_counter its `seconds`
  count from; default now). `cluster_options` (backend, init, iters, tol, seed) go to `cluster`
  as they are."""
  import jax

  from ove_jax import kmeans

  start = time.perf_counter() if start is None else start
  if k < 1:
    raise LabelsError(f'--k {k}: must be >= 1')
  if num_labels < 1:
    raise LabelsError(f'--num-labels {num_labels}: must be >= 1')
  n = len(x_NxD)
  if k > n:
    raise LabelsError(f'--k {k} is more than the N = {n} samples of {source or "the features"}')
  if num_labels > k:  # a sample has only k nearest centres
    print(
      f'warning: --num-labels {num_labels} > --k {k}: each sample gets its {k} nearest centres '
      '(report.json and labels.npy say so)',
      file=sys.stderr,
    )
  num_records = sum(len(r) for r in shard_records)
  if shards and num_records != n:
    raise LabelsError(f'{num_records} records but {n} feature rows ({source})')
  mesh = mesh or default_mesh()
  result = cluster(x_NxD, k, chunk=chunk, mesh=mesh, **cluster_options)
  with jax.set_mesh(mesh):
    labels, _ = kmeans.nearest(
      x_NxD, result['centres'], min(num_labels, k), spherical=True, chunk=chunk
    )
  paths.makedirs(out)  # a local folder or a URL (data_pipeline.paths)
  fileio.write_npy(paths.join(out, 'labels.npy'), labels.astype(np.int32))
  fileio.write_npy(paths.join(out, 'centres.npy'), result['centres'].astype(np.float32))
  if ids is not None:
    fileio.write_npy(paths.join(out, 'ids.npy'), ids)
  sizes = np.asarray(result['sizes'])
  report = {
    'k': k,
    'N': n,
    'D': int(x_NxD.shape[1]),
    'backend': result['backend'],
    'objective': result['objective'],
    'inertia': result['inertia'],
    'iterations': result['iterations'],
    'converged': bool(result['converged']),
    'empty_clusters': int(np.sum(sizes == 0)),
    'empty_reseeded': result['empty_reseeded'],
    'sizes': size_report(sizes),
    'num_labels': int(labels.shape[1]),
    'source': source,
    'seconds': round(time.perf_counter() - start, 3),
  }
  if shards:
    written = write_records(shards, shard_records, labels, paths.join(out, 'records'))
    report['records'] = {'shards': len(written), 'dir': paths.join(out, 'records')}
  fileio.write_json(paths.join(out, 'report.json'), report, sort_keys=False)
  return report


# ------------------------------------------------------------------------------------------------
# Teachers from transformers (`--teacher hf:DIR_OR_HUB_ID`)
# ------------------------------------------------------------------------------------------------

HF_PREFIX = 'hf:'
SHARD_RECORDS = 1024  # records per feature shard of a transformers teacher


def record_pixels(record: dict, index: int, seed: int) -> np.ndarray:
  """uint8 [F, 224, 224, 3]: the frames of `record_frames` as pictures (the inverse of
  data_pipeline.tokens.patchify on the 16 x 16 grid)."""
  from data_pipeline import tokens

  patches = record_frames(record, index, seed)
  f, grid, p = len(patches), tokens.VIDEO_GRID, tokens.PATCH
  x = patches.reshape(f, grid, grid, p, p, tokens.CHANNELS).transpose(0, 1, 3, 2, 4, 5)
  return np.ascontiguousarray(x.reshape(f, grid * p, grid * p, tokens.CHANNELS))


class HFTeacher:
  """A transformers vision model as the teacher: the pooled image embedding of every frame.

  The embedding is `get_image_features` of a two-tower model (CLIP, SigLIP, MetaCLIP), else the
  vision model's `image_embeds` (with a projection) or `pooler_output`. Pictures are prepared by
  the directory's own image processor when it has one (preprocessor_config.json), else resized
  to the model's `image_size` and normalised with the CLIP mean / std. Runs on CUDA when torch
  sees a GPU.
  """

  def __init__(self, name: str):
    import torch
    import transformers

    from ove_jax.convert import hub

    self.where = where = f'--teacher {HF_PREFIX}{name}'
    try:
      self.path = hub.resolve(name)
    except FileNotFoundError as e:
      raise LabelsError(f'{where}: {e}') from None
    try:
      config = transformers.AutoConfig.from_pretrained(self.path)
    except (OSError, ValueError) as e:
      raise LabelsError(f'{where}: not a transformers model directory ({e})') from None
    vision = getattr(config, 'vision_config', None) or config
    self.image_size = getattr(vision, 'image_size', None)
    arch = (getattr(config, 'architectures', None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls if cls is not None else transformers.AutoModel
    try:
      model = cls.from_pretrained(self.path)
    except (OSError, ValueError) as e:
      raise LabelsError(f'{where}: transformers cannot load it ({e})') from None
    import inspect

    self.two_towers = callable(getattr(model, 'get_image_features', None))
    takes_pixels = 'pixel_values' in inspect.signature(model.forward).parameters
    if not self.image_size or not (self.two_towers or takes_pixels):
      raise LabelsError(
        f'{where}: {type(model).__name__} ({config.model_type}) is not a vision '
        'model (no image_size / pixel_values); give a CLIP, SigLIP or MetaCLIP '
        'vision model or two-tower model'
      )
    self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    self.model = model.to(self.device).eval()
    self.processor = None
    if os.path.isfile(os.path.join(self.path, 'preprocessor_config.json')):
      self.processor = transformers.AutoImageProcessor.from_pretrained(self.path)

  def pixel_values(self, pictures_BxHxWx3: np.ndarray) -> np.ndarray:
    """float32 [B, 3, S, S]: the model's input for uint8 pictures."""
    if self.processor is not None:
      return np.asarray(
        self.processor(images=list(pictures_BxHxWx3), return_tensors='np')['pixel_values'],
        np.float32,
      )
    from PIL import Image

    from data_pipeline import tokens

    s = int(self.image_size)
    x = (
      np.stack(
        [
          np.asarray(Image.fromarray(p).resize((s, s), Image.Resampling.BICUBIC))
          for p in pictures_BxHxWx3
        ]
      ).astype(np.float32)
      / 255.0
    )
    x = (x - np.asarray(tokens.CLIP_MEAN, np.float32)) / np.asarray(tokens.CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

  def embed(self, pictures_BxHxWx3: np.ndarray) -> np.ndarray:
    """float32 [B, D]: the pooled embeddings (not normalised) of uint8 pictures."""
    import torch

    x = torch.from_numpy(self.pixel_values(pictures_BxHxWx3)).to(self.device)
    with torch.inference_mode():
      if self.two_towers:
        out = self.model.get_image_features(pixel_values=x)
      else:
        out = self.model(pixel_values=x)
        emb = getattr(out, 'image_embeds', None)
        emb = emb if emb is not None else getattr(out, 'pooler_output', None)
        if emb is None:
          raise LabelsError(
            f'{self.where}: {type(self.model).__name__} gives '
            'no pooled image embedding (image_embeds or pooler_output); give a '
            'vision model with a pooler, or a CLIP / SigLIP two-tower model'
          )
        out = emb
    return out.float().cpu().numpy()


def hf_record_features(
  teacher: HFTeacher, recs: Sequence[dict], batch: int, seed: int, offset: int = 0
) -> np.ndarray:
  """float32 unit rows [n, D] (D = F x width for videos) of `recs` (global record numbers from
  `offset`, which seed the video frames as `teacher_features` does)."""
  counts, pending, out = set(), [], []  # frames waiting for a forward: fewer than batch + F
  for i, r in enumerate(recs):
    pictures = record_pixels(r, offset + i, seed)  # [F, 224, 224, 3]
    counts.add(len(pictures))
    if len(counts) > 1:
      raise LabelsError('--records mixes image and video records; cluster each kind separately')
    pending.extend(pictures)
    while len(pending) >= batch or (pending and i == len(recs) - 1):
      out.append(teacher.embed(np.stack(pending[:batch])))
      del pending[:batch]
  f = np.concatenate(out).astype(np.float32).reshape(len(recs), counts.pop(), -1)
  return combine_frames(f) if f.shape[1] > 1 else l2_normalise(f[:, 0])


def record_ids(recs: Sequence[dict], offset: int = 0) -> np.ndarray:
  """Every record's `source` (its number when it has none): the ids of its feature row."""
  return np.asarray([str(r.get('source', offset + i)) for i, r in enumerate(recs)])


def save_npy(path: str, array: np.ndarray) -> None:
  """`array` as a .npy file at `path`, written atomically (np.save would rename a temp name)."""
  import io

  buf = io.BytesIO()
  np.save(buf, array, allow_pickle=False)
  fileio.write_atomic(path, buf.getvalue())


def sharded_teacher_features(
  teacher: HFTeacher,
  recs: Sequence[dict],
  folder: str,
  *,
  batch: int = 32,
  seed: int = 0,
  shard_records: int = SHARD_RECORDS,
  about: str = '',
) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, D], ids [N]) of a transformers teacher over `recs`, written to `folder` as
  features-SSSSS.npy + ids-SSSSS.npy per `shard_records` records; a shard already there (same
  ids, written by the same teacher, seed and shard size per folder/meta.json) is read, not
  recomputed, so an interrupted run over a corpus resumes."""
  from tqdm import tqdm

  if shard_records < 1:
    raise LabelsError(f'--shard-records {shard_records}: must be >= 1')
  if not recs:
    raise LabelsError('--records: the shards hold no records')
  os.makedirs(folder, exist_ok=True)
  meta = {'teacher': about, 'seed': seed, 'shard_records': shard_records}
  meta_path = os.path.join(folder, 'meta.json')
  if os.path.isfile(meta_path):
    if fileio.read_json(meta_path) != meta:
      raise LabelsError(
        f'{folder}: feature shards of {fileio.read_json(meta_path)}, not of '
        f'{meta}; remove the folder or give another --out'
      )
  else:
    fileio.write_json(meta_path, meta)
  feats, ids = [], []
  for s, start in enumerate(tqdm(range(0, len(recs), shard_records), desc='teacher shards')):
    part = recs[start : start + shard_records]
    f_path, i_path = (os.path.join(folder, f'{kind}-{s:05d}.npy') for kind in ('features', 'ids'))
    want = record_ids(part, start)
    if os.path.isfile(f_path) and os.path.isfile(i_path):
      have = np.load(i_path, allow_pickle=False)
      if have.shape != want.shape or (have != want).any():
        raise LabelsError(
          f'{i_path}: its ids are not those of records {start}..'
          f'{start + len(part) - 1} of --records; remove {folder} or give '
          'another --out'
        )
      x = np.load(f_path, allow_pickle=False)
    else:
      x = hf_record_features(teacher, part, batch, seed, start)
      save_npy(i_path, want)
      save_npy(f_path, x)  # last: a shard counts as done when its features are there
    feats.append(x)
    ids.append(want)
  return np.concatenate(feats), np.concatenate(ids)
