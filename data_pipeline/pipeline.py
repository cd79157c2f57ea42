"""The per-host Grain input pipeline: records -> samples -> packed token rows, per head, mixed.

One head (image, OCR or video; docs/spec.md §3) is this chain of Grain stages:

  source (sources.open_source)                 item i = {index, name, raw bytes}
  .shuffle(seed)                               global, the same permutation on every host
  .repeat(num_epochs)                          each epoch reshuffled (Grain folds the epoch in)
  .random_map(SampleFn)                        decode + transform; rng from (seed, global index)
  [process_index::process_count]               this host's part: the hosts partition every epoch
  .to_iter_dataset(read threads)
  PackIterDataset                              first-fit into batches of R rows x L tokens
  .mp_prefetch(worker_count)                   worker processes, each packing its own slice

and `build` mixes heads into one iterator of {head name: batch} dicts (batch fields: see
`data_pipeline.packing`). Random choices depend only on the seed and the record's global position,
never on the host count, worker count or timing, and every stage's state is exact, so
`get_state()` / `set_state()` (or Grain's orbax `CheckpointSave` / `CheckpointRestore`) resume
bit-exactly. Changing `worker_count` changes which samples share a batch (each worker packs its
own slice), so restore with the worker count you saved with.

A record that fails to decode or transform (corrupt bytes, unreadable video, no labels) is
dropped with a logged warning; each batch says how many were dropped while it was filled
(`num_skipped`), for the trainer to add up and log.

Config: `PipelineConfig` / `HeadConfig` dataclasses, or `PipelineConfig.from_dict` on a plain or
ml_collections dict:

  {'seed': 0, 'process_index': 0, 'process_count': 1, 'worker_count': 2,
   'heads': {'image': {'kind': 'image', 'source': '/data/img-*.array_record', 'rows': 16,
                       'tokens_per_row': 1024, 'max_segments': 4},
             'video': {'kind': 'video', 'source': '/data/k400-*.array_record', 'rows': 8,
                       'tokens_per_row': 2048, 'max_segments': 1}}}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import signal
import zlib
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from data_pipeline import packing, sources, tokens, transforms

_log = logging.getLogger(__name__)

KINDS = ('image', 'ocr', 'video')
MIXING = ('all', 'weighted')

# Per kind: labels per sample, resolution, crop, flip probability (docs/spec.md §3; the OCR crop
# is the release's: short side to 448, centre crop, which keeps text undistorted).
_KIND_DEFAULTS = {
  'image': dict(num_labels=10, resolution=224, crop='random_resized', flip_prob=0.5),
  'ocr': dict(num_labels=100, resolution=448, crop='centre', flip_prob=0.0),
  'video': dict(num_labels=10),  # frames are always 224 (the codec grid), never flipped
}


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """One head's data: where it comes from, how samples are made, how they are packed.

  Fields left None take the kind's default (`_KIND_DEFAULTS`).
  """

  kind: str  # 'image', 'ocr' or 'video'
  source: str | tuple[str, ...]  # see sources.open_source
  rows: int = 8  # R: rows per per-host batch
  tokens_per_row: int = 2048  # L
  max_segments: int = 8  # S: samples per row at most
  weight: float = 1.0  # share of steps under mixing='weighted'
  num_labels: int | None = None  # n: 10 (image, video) or 100 (OCR)
  # Images and OCR.
  resolution: int | None = None  # 224 or 448
  crop: str | None = None  # 'random_resized', 'centre' or 'resize'
  area_range: tuple[float, float] = (0.7, 1.0)
  aspect_range: tuple[float, float] = (0.8, 1.25)
  flip_prob: float | None = None
  native_aspect: bool = False  # keep the image's aspect, up to max_image_tokens
  max_image_tokens: int | None = None  # native-aspect budget (default tokens_per_row)
  # Videos.
  video_modes: tuple[float, ...] = (0.5, 0.375, 0.125)  # codec, uniform, collage[, random]
  num_frames: int = 8  # frames of the uniform and collage modes
  temporal_size: int = tokens.TEMPORAL_SIZE
  video_root: str = ''  # prefix of records' relative `source` paths
  # Canvas of records that do not name theirs ('crop', 'letterbox'); a record's own `geometry`
  # field (codec.select(geometry='letterbox'), ove-llava-data import) wins.
  geometry: str = 'crop'

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'head kind {self.kind!r}; choose one of {KINDS}')
    if self.weight <= 0:
      raise ValueError(f'weight={self.weight}; must be > 0')
    self.transform()  # validate the sample options now, in the main process
    # Samples of a known size must fit a row; say so here rather than from a worker process.
    # (Codec samples have the size their record gives; a too-long one is named when packed.)
    if self.kind == 'video':
      frames_tokens = self.num_frames * tokens.VIDEO_GRID**2
      if max(self.video_modes[1:3]) > 0 and frames_tokens > self.tokens_per_row:
        raise ValueError(
          f'{self.num_frames} frames x {tokens.VIDEO_GRID**2} patches = '
          f'{frames_tokens} tokens > tokens_per_row={self.tokens_per_row}'
        )
    else:
      image_tokens = (
        (self.max_image_tokens or self.tokens_per_row)
        if self.native_aspect
        else (self.get('resolution') // tokens.PATCH) ** 2
      )
      if image_tokens > self.tokens_per_row:
        raise ValueError(
          f'{self.kind} samples have up to {image_tokens} tokens > '
          f'tokens_per_row={self.tokens_per_row}'
        )

  def get(self, field: str) -> Any:
    value = getattr(self, field)
    return _KIND_DEFAULTS[self.kind][field] if value is None else value

  def transform(self):
    """The sample transform of this head (transforms.ImageTransform or VideoTransform)."""
    if self.kind == 'video':
      return transforms.VideoTransform(
        mode_probs=tuple(self.video_modes),
        num_frames=self.num_frames,
        temporal_size=self.temporal_size,
        num_labels=self.get('num_labels'),
        video_root=self.video_root,
        geometry=self.geometry,
      )
    return transforms.ImageTransform(
      resolution=self.get('resolution'),
      crop=self.get('crop'),
      area_range=tuple(self.area_range),
      aspect_range=tuple(self.aspect_range),
      flip_prob=self.get('flip_prob'),
      native_aspect=self.native_aspect,
      max_tokens=self.max_image_tokens or self.tokens_per_row,
      num_labels=self.get('num_labels'),
    )


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """The whole input: heads, seed, this host's place, workers."""

  heads: Mapping[str, HeadConfig]
  seed: int = 0  # shared by all hosts: one global shuffle, then [i::n]
  num_epochs: int | None = None  # None: repeat forever (each epoch reshuffled)
  process_index: int = 0  # this host (jax.process_index() in the trainer)
  process_count: int = 1
  worker_count: int = 2  # worker processes per head; 0 = in the calling process
  worker_buffer: int = 2  # batches each worker prepares ahead
  read_threads: int = 1  # threads per process decoding records
  read_buffer: int = 4  # records decoded ahead per process
  mixing: str = 'all'  # 'all': every head each step; 'weighted': one head per step
  patch_dtype: str = 'float32'  # 'float32' (CLIP-normalised) or 'uint8' (normalise on device)
  max_consecutive_skips: int = 1000  # this many failed records in a row is an error, not bad luck
  local_cache_dir: str = ''  # where shards in object storage are staged ('': default)

  def __post_init__(self):
    if not self.heads:
      raise ValueError('no heads configured')
    if self.mixing not in MIXING:
      raise ValueError(f'mixing={self.mixing!r}; choose one of {MIXING}')
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index={self.process_index} is not in [0, {self.process_count})')
    if self.patch_dtype not in packing.PATCH_DTYPES:
      raise ValueError(f'patch_dtype={self.patch_dtype!r}; choose one of {packing.PATCH_DTYPES}')
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f'num_epochs={self.num_epochs}; use None to repeat forever')
    if not 0 <= self.seed < 2**32:
      raise ValueError(f'seed={self.seed}; must be in [0, 2**32)')

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> PipelineConfig:
    """From a nested dict (or ml_collections.ConfigDict); heads may be dicts or HeadConfigs."""
    config = dict(config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(config) - known
    if unknown:
      raise ValueError(f'unknown pipeline config key(s) {sorted(unknown)}; known: {sorted(known)}')
    head_fields = {f.name for f in dataclasses.fields(HeadConfig)}
    heads = {}
    for name, head in dict(config.get('heads', {})).items():
      if not isinstance(head, HeadConfig):
        head = dict(head)
        unknown = set(head) - head_fields
        if unknown:
          raise ValueError(
            f'head {name!r}: unknown key(s) {sorted(unknown)}; known: {sorted(head_fields)}'
          )
        head = HeadConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in head.items()})
      heads[name] = head
    config['heads'] = heads
    return cls(**config)


def head_seed(seed: int, name: str) -> int:
  """A head's own seed: heads of one run differ, and a head keeps its seed when others change."""
  return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**32


# ------------------------------------------------------------------------------------------------
# Records to samples, never raising on bad data
# ------------------------------------------------------------------------------------------------


_MEMORY_FILE = re.compile(r'<_io\.BytesIO object at 0x[0-9a-fA-F]+>')
_WARNED: set[tuple[str, str]] = set()  # (head, record) skipped and logged by this process
MAX_WARNED = 1000  # records logged a process; PackIterDataset still counts every skip


@dataclasses.dataclass(frozen=True)
class SampleFn:
  """Grain random_map: a source item -> a sample, or a SKIPPED marker for a bad record."""

  transform: Any  # transforms.ImageTransform | transforms.VideoTransform
  head: str = ''

  def __call__(self, item: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    try:
      sample = self.transform(sources.to_record(item['raw']), rng)
    except Exception as e:  # pylint: disable=broad-except
      # Corrupt data raises anything from zipfile, PIL, PyAV or numpy; one bad record among
      # millions must not stop a run. PackIterDataset counts these and stops only if they never end.
      message = _MEMORY_FILE.sub('its bytes', str(e))  # PIL names the in-memory file, not ours
      reason = f'{item["name"]}: {type(e).__name__}: {message}'
      key = (self.head, item['name'])
      if key not in _WARNED and len(_WARNED) < MAX_WARNED:  # a source repeats each epoch
        _WARNED.add(key)
        _log.warning(
          '[%s] skipping record %s (logged once a process, the first %d)',
          self.head,
          reason,
          MAX_WARNED,
        )
      return {packing.SKIPPED: reason}
    sample['index'], sample['name'] = item['index'], item['name']
    return sample


# ------------------------------------------------------------------------------------------------
# One head
# ------------------------------------------------------------------------------------------------


class SourceError(ValueError):
  """A head's source cannot be opened (no file matches, no such dataset) or holds nothing."""

  def __init__(self, head: str, source, reason: str, fix: str = ''):
    """`fix`: what to do, where it is not to give another source (the callers' default)."""
    super().__init__(f'head {head!r}: the source {source!r}: {reason}' + (fix and f'; {fix}'))
    self.head, self.source, self.reason, self.fix = head, source, reason, fix


def open_head_source(name: str, head: HeadConfig, cfg: PipelineConfig):
  """The random-access source of one head, checked to hold records (else SourceError)."""
  try:
    source = sources.open_source(head.source, cfg.local_cache_dir or None)
  except (OSError, ValueError) as e:
    raise SourceError(name, head.source, str(e)) from e
  if len(source) == 0:
    raise SourceError(name, head.source, 'it has no records')
  unlabelled = _unlabelled_first_record(source)
  if unlabelled:
    raise SourceError(
      name,
      head.source,
      f'its first record ({unlabelled}) has no `labels` field (a head trains on cluster labels)',
      'make them with ove-cluster-labels --records (docs/labels_and_probes.md) and point the '
      'source at the labelled records it writes',
    )
  return source


def _unlabelled_first_record(source) -> str:
  """The name of the source's first record when it reads and has no `labels` field (records
  without labels, a codec precompute's output say, cannot train a head; every sample would be
  skipped), else ''. A first record that does not read is left to the pipeline, which skips
  corrupt records."""
  try:
    item = source[0]
    record = sources.to_record(item['raw'])
  except Exception:  # pylint: disable=broad-except  (corrupt data raises anything)
    return ''
  return '' if 'labels' in record else str(item.get('name', 0))


def check_sources(cfg: PipelineConfig | Mapping[str, Any]) -> dict[str, int]:
  """Opens every head's source without building a pipeline (no reader threads, no workers):
  its record count by head name, or SourceError for the first that cannot be read."""
  if not isinstance(cfg, PipelineConfig):
    cfg = PipelineConfig.from_dict(cfg)
  return {name: len(open_head_source(name, head, cfg)) for name, head in cfg.heads.items()}


def sample_dataset(
  name: str, head: HeadConfig, cfg: PipelineConfig, source=None
) -> grain.MapDataset:
  """This host's samples of one head (before packing): a MapDataset, indexable for inspection."""
  if source is None:
    source = open_head_source(name, head, cfg)
  elif len(source) == 0:
    raise SourceError(name, head.source, 'it has no records')
  seed = head_seed(cfg.seed, name)
  ds = grain.MapDataset.source(source).shuffle(seed=seed)
  ds = ds.repeat(cfg.num_epochs)
  # Before the host slice: a record's random choices depend on its global position only.
  ds = ds.random_map(SampleFn(head.transform(), name), seed=(seed + 1) % 2**32)
  return ds[cfg.process_index :: cfg.process_count]


def head_dataset(
  name: str, head: HeadConfig, cfg: PipelineConfig, source=None
) -> grain.IterDataset:
  """This host's packed batches of one head, prepared in `cfg.worker_count` processes."""
  ds = sample_dataset(name, head, cfg, source).to_iter_dataset(
    grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer)
  )
  ds = packing.PackIterDataset(
    ds,
    rows=head.rows,
    tokens_per_row=head.tokens_per_row,
    max_segments=head.max_segments,
    num_labels=head.get('num_labels'),
    patch_dtype=cfg.patch_dtype,
    max_consecutive_skips=cfg.max_consecutive_skips,
  )
  if cfg.worker_count > 0:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer
      ),
      worker_init_fn=leave_interrupts_to_the_parent,
    )
  return ds


def leave_interrupts_to_the_parent(worker_index: int, worker_count: int) -> None:
  """In each Grain worker process: SIGINT ignored. A terminal's Ctrl-C reaches the whole
  process group; the trainer stops on it after saving (`ove_jax.preemption`) and then closes
  its iterator, which ends the workers. Without this each worker died at once with a
  KeyboardInterrupt traceback, and a step still to be fed would have waited on them."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  if hasattr(signal, 'pthread_sigmask'):  # started from a thread that blocks it (prefetch.py)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


# ------------------------------------------------------------------------------------------------
# Heads together
# ------------------------------------------------------------------------------------------------


class HeadMixIterDataset(grain.IterDataset):
  """{head: batch} per step: every head ('all'), or one head drawn by weight ('weighted').

  The weighted draw of step k uses a generator seeded by (seed, k): deterministic, and restored
  exactly by the step count in the state. With finite epochs the mixture ends when its first
  head runs out (as Grain's own mix does).
  """

  def __init__(
    self,
    parents: Mapping[str, grain.IterDataset],
    *,
    mixing: str = 'all',
    weights: Sequence[float] | None = None,
    seed: int = 0,
  ):
    super().__init__(list(parents.values()))
    if mixing not in MIXING:
      raise ValueError(f'mixing={mixing!r}; choose one of {MIXING}')
    self._names = list(parents)
    weights = np.ones(len(self._names)) if weights is None else np.asarray(weights, np.float64)
    if weights.shape != (len(self._names),) or weights.min() <= 0:
      raise ValueError(f'weights {weights}: one positive weight per head {self._names}')
    self._probs = weights / weights.sum()
    self._mixing, self._seed = mixing, seed

  def __iter__(self) -> grain.DatasetIterator:
    return _HeadMixIterator(
      [p.__iter__() for p in self._parents], self._names, self._mixing, self._probs, self._seed
    )

  def __str__(self) -> str:
    return f'HeadMixIterDataset({self._names}, mixing={self._mixing})'


class _HeadMixIterator(grain.DatasetIterator):
  def __init__(self, parents, names, mixing, probs, seed):
    super().__init__(parents)
    self._names, self._mixing, self._probs, self._seed = names, mixing, probs, seed
    self._step = 0

  def __next__(self) -> dict[str, dict[str, np.ndarray]]:
    if self._mixing == 'all':
      out = {name: next(it) for name, it in zip(self._names, self._parents)}
    else:
      rng = np.random.default_rng([self._seed, self._step])
      k = int(rng.choice(len(self._names), p=self._probs))
      out = {self._names[k]: next(self._parents[k])}
    self._step += 1
    return out

  def get_state(self) -> dict[str, Any]:
    return {
      'step': self._step,
      'heads': {name: it.get_state() for name, it in zip(self._names, self._parents)},
    }

  def set_state(self, state: dict[str, Any]) -> None:
    missing = set(self._names) - set(state['heads'])
    if missing:
      raise ValueError(
        f'the saved data state has no head(s) {sorted(missing)}; it has {sorted(state["heads"])}'
      )
    for name, it in zip(self._names, self._parents):
      it.set_state(state['heads'][name])
    self._step = int(state['step'])


def _ensure_absl_flags_parsed():
  # Grain reads absl flags when it starts worker processes and fails with
  # UnparsedFlagAccessError in programs that do not use absl.app (plain scripts, notebooks).
  # Programs that parse flags themselves are left alone.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def build(cfg: PipelineConfig | Mapping[str, Any], sources_by_head=None) -> grain.IterDataset:
  """The host's input: an IterDataset of {head name: batch} dicts; `iter()` it to read.

  `sources_by_head` may give ready source objects by head name (tests, custom sources).
  """
  if not isinstance(cfg, PipelineConfig):
    cfg = PipelineConfig.from_dict(cfg)
  _ensure_absl_flags_parsed()
  sources_by_head = sources_by_head or {}
  heads = {
    name: head_dataset(name, head, cfg, sources_by_head.get(name))
    for name, head in cfg.heads.items()
  }
  return HeadMixIterDataset(
    heads, mixing=cfg.mixing, seed=cfg.seed, weights=[head.weight for head in cfg.heads.values()]
  )


def make_iterator(cfg: PipelineConfig | Mapping[str, Any]) -> grain.DatasetIterator:
  """`iter(build(cfg))`: a checkpointable iterator (get_state / set_state, orbax CheckpointSave)."""
  return iter(build(cfg))


# ------------------------------------------------------------------------------------------------
# Resuming on another process count
# ------------------------------------------------------------------------------------------------


def _index_leaves(state: Any, path: tuple = ()) -> list[tuple]:
  """The paths of every `next_index` in an iterator state, in order (one per reading iterator:
  the host's, or each worker's)."""
  if isinstance(state, Mapping):
    return [
      p
      for k in sorted(state)
      for p in ([path + (k,)] if k == 'next_index' else _index_leaves(state[k], path + (k,)))
    ]
  if isinstance(state, (list, tuple)):
    return [p for i, v in enumerate(state) for p in _index_leaves(v, path + (i,))]
  return []


def _get(state, path):
  for key in path:
    state = state[key]
  return state


def records_read(state: Mapping[str, Any]) -> dict[str, int]:
  """Per head, how many of its host's records an iterator (a `make_iterator` state) has used: the
  records of the batches it gave (what workers read ahead is not in a state)."""
  return {
    name: sum(int(_get(head, p)) for p in _index_leaves(head))
    for name, head in state['heads'].items()
  }


def state_after(
  fresh: Mapping[str, Any],
  global_read: Mapping[str, int],
  process_index: int,
  process_count: int,
  draws: int,
) -> dict[str, Any]:
  """An iterator state for host `process_index` of `process_count` that starts each head at
  global record `global_read[head]` of the shuffled order (the sum of every old host's
  `records_read`), from `fresh` (a new iterator's `get_state()`), and the head mixture at its
  `draws`-th draw.

  Host j reads global records j, j + n, ... (the host slice above), so the records before G are
  exactly its first ceil((G - j) / n); within a host, worker w of W reads the host's
  records w, w + W, .... The records are the ones the uninterrupted run reads from there, up to
  the few each old host had read past the others; which of them share a batch differs (packing
  runs per host and worker).
  """
  state = json.loads(json.dumps(fresh))
  for name, head in state['heads'].items():
    total = int(global_read[name])
    mine = total // process_count + (1 if process_index < total % process_count else 0)
    leaves = _index_leaves(head)
    for w, path in enumerate(leaves):
      _get(head, path[:-1])[path[-1]] = mine // len(leaves) + (1 if w < mine % len(leaves) else 0)
  state['step'] = int(draws)
  return state
