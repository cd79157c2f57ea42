"""A transformers vision model as the cluster labels' teacher (`ove-cluster-labels --teacher
hf:DIR_OR_HUB_ID`), its features written in resumable shards.

  teacher = HFTeacher('openai/clip-vit-base-patch16')   # a directory or a hub id
  x, ids = sharded_teacher_features(teacher, records, '/data/labels/features')
  report = labels.make_labels(x, '/data/labels', k=2000, ids=ids)

The teacher sees the frames the ove_jax-encoder teacher of `ove_jax.labels` sees (an image
record's 224 centre crop; a video record's 8 uniform frames, seeded per record); a video's frame
embeddings are L2-normalised, concatenated and re-normalised (docs/spec.md §3). Bad input raises
`labels.LabelsError` naming the flag or file.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np

from data_pipeline import fileio
from ove_jax.labels import LabelsError, combine_frames, frames_per_record, record_frames
from ove_jax.vectors import l2_normalise

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
    from ove_jax.convert import release_config

    if release_config.is_release_folder_config(self.path):  # before transformers' trust prompt
      raise LabelsError(
        f'{where}: a OneVision-Encoder export (release format), which ove_jax runs itself: give '
        f'it without {HF_PREFIX} (--teacher {name})'
      )
    try:
      config = transformers.AutoConfig.from_pretrained(self.path)
    except (OSError, ValueError) as e:
      raise LabelsError(f'{where}: not a transformers model directory ({e})') from None
    vision = getattr(config, 'vision_config', None) or config
    self.image_size = getattr(vision, 'image_size', None)
    arch = (getattr(config, 'architectures', None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls if cls is not None else transformers.AutoModel
    from safetensors import SafetensorError

    try:  # damaged weights: safetensors' own error, or torch's RuntimeError for a .bin
      model = cls.from_pretrained(self.path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
      raise LabelsError(
        f'{where}: transformers cannot load it ({type(e).__name__}: {e}); check or download '
        'its weights again'
      ) from None
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

    s, bicubic = int(self.image_size), Image.Resampling.BICUBIC
    x = np.stack([np.asarray(Image.fromarray(p).resize((s, s), bicubic)) for p in pictures_BxHxWx3])
    x = (x.astype(np.float32) / 255.0 - np.asarray(tokens.CLIP_MEAN, np.float32)) / np.asarray(
      tokens.CLIP_STD, np.float32
    )
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
  frames, pending, out = frames_per_record(recs), [], []  # pending: fewer than batch + F frames
  for i, r in enumerate(recs):
    pending.extend(record_pixels(r, offset + i, seed))  # [F, 224, 224, 3]
    while len(pending) >= batch or (pending and i == len(recs) - 1):
      out.append(teacher.embed(np.stack(pending[:batch])))
      del pending[:batch]
  f = np.concatenate(out).astype(np.float32).reshape(len(recs), frames, -1)
  return combine_frames(f) if f.shape[1] > 1 else l2_normalise(f[:, 0])


def record_ids(recs: Sequence[dict], offset: int = 0) -> np.ndarray:
  """Every record's `source` (its number when it has none): the ids of its feature row."""
  return np.asarray([str(r.get('source', offset + i)) for i, r in enumerate(recs)])


def cached_features(f_path: str, i_path: str, want: np.ndarray, width: int | None):
  """The features of a finished feature shard, or None when it cannot be used as it is (a file
  empty, truncated or garbled; features short, not finite, or not `width` wide; ids of another
  count): a note names the file and the caller computes the shard again. Ids that differ from
  the records' are refused: the records changed under the folder."""
  problem = None
  try:
    have = np.asarray(fileio.read_arrays(i_path, 'feature shard'))
    x = np.asarray(fileio.read_arrays(f_path, 'feature shard'))
  except fileio.ArrayFileError as e:
    problem = str(e)
  else:
    if have.shape == want.shape and (have != want).any():
      raise LabelsError(
        f'{i_path}: its ids are not those of the same records of --records (the records '
        f'changed); remove {os.path.dirname(i_path)} or give another --out'
      )
    rows, d = x.shape if x.ndim == 2 else (-1, -1)
    if have.shape != want.shape or rows != len(want) or d != (width or d):
      problem = (
        f'{f_path}: features of shape {x.shape} and ids of shape {have.shape} for '
        f'{len(want)} records' + (f' of width {width}' if width else '')
      )
    elif x.dtype.kind != 'f' or not np.isfinite(x).all():
      problem = f'{f_path}: {x.dtype} features with NaN or infinite values, or not floats'
  if problem:
    print(f'note: {problem}; computing this feature shard again', file=sys.stderr)
    return None
  return x


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
  frames_per_record(recs)  # no records, or mixed kinds: refused before any shard is computed
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
    want, x = record_ids(part, start), None
    if os.path.isfile(f_path) and os.path.isfile(i_path):
      x = cached_features(f_path, i_path, want, feats[0].shape[1] if feats else None)
    if x is None:
      x = hf_record_features(teacher, part, batch, seed, start)
      fileio.write_npy(i_path, want)
      fileio.write_npy(f_path, x)  # last: a shard counts as done when its features are there
    feats.append(x)
    ids.append(want)
  return np.concatenate(feats), np.concatenate(ids)
