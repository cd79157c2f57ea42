"""Token inputs of the attentive-probe protocol: the release's frame sampling, augmentation and
codec selection, and the paper's interventions (docs/evaluation.md).

  sampler = ClipSampler(clips, InputMode.parse('codec:2048'))
  sample = sampler.sample(i, train=True, rng=np.random.default_rng([seed, epoch, i]))
  # {'patches': uint8 [N, 588], 'positions': int32 [N, 3], 'label': int}

Input modes (`InputMode.parse`), as eval_encoder/attentive_probe_codec.py and
dataloader/ap_dataloader_dali{,_codec}.py feed them:
  uniform:N   N frames by segment sampling: the clip's frames split into N segments of
              (frames - 1) / N, a random offset in each when training, the segment's centre at
              test; each frame at grid time round(id / (frames - 1) * 63) on the 64-frame grid
              (the release's interpolate_frame_indices); N x 256 tokens.
  codec:K     the K patches of the `release_probe` codec selection over 64 timeline frames
              (linspace over the clip, the same in training and at test, as the release's codec
              loader); computed once per clip (the release caches it too).
The training augmentation is the release codec loader's, per clip (one draw for all frames):
brightness / contrast with probability 0.8, saturation 0.8, hue 0.8, RGB -> BGR channel swap 0.1
(`ColorJitter`); nothing at test. Every frame is the short side resized to 224 and the centre
224 x 224 (the release's resize_shorter + centre crop).

Interventions (`+name` after the mode, e.g. 'codec:2048+shuffle_positions'), all at the mode's
token budget:
  shuffle_positions      the (t, h, w) positions permuted over the tokens: each patch keeps its
                         pixels but sits at another token's place (the paper: -13.4 points)
  static_motion          a share (`static_share`, 0.5) of the selected motion patches, drawn at
                         random, replaced by the same number of the clip's most static patches
                         (lowest codec score, unselected) (the paper: half replaced, -6.1)
  counterfactual_motion  the clip's own pixels at the selection of another clip (the next one
                         of the list whose selection differs from the clip's own): patches where
                         some other video moved, so the selection carries motion that does not
                         belong to the clip
The random draws (offsets, jitter, which patches, the permutation) come from the `rng` argument:
the protocol seeds it per (seed, epoch, clip) when training and per clip at test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
from typing import Any, Callable, Sequence

import numpy as np

from data_pipeline import fileio
from data_pipeline import video as video_lib
from data_pipeline.benchmarks import ProbeClip
from data_pipeline.tokens import (
  PATCH_DIM,
  TEMPORAL_SIZE,
  VIDEO_GRID,
  VIDEO_RESOLUTION,
  timeline_to_grid,
)
from data_pipeline.transforms import frame_patches, gather_patches, grid_positions

KINDS = ('codec', 'uniform')
INTERVENTIONS = ('none', 'shuffle_positions', 'static_motion', 'counterfactual_motion')
CODEC_TIMELINE = 64  # the release's codec probe reads 64 frames (sequence_length 64)
CODEC_PRESET = 'release_probe'
DONOR_TRIES = 8  # clips counterfactual_motion looks at for a selection other than the clip's
SEGMENT_CRF = 18  # re-encoding of a segment / a frames array before its codec selection
SELECTION_FIELDS = frozenset({'frame_ids', 'positions', 'scores'})  # of a cached selection
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class InputMode:
  """'codec:K' or 'uniform:N', optionally '+intervention'."""

  kind: str
  amount: int
  intervention: str = 'none'

  def __post_init__(self):
    if self.kind not in KINDS or self.amount < 1:
      raise ValueError(f'input mode {self.kind}:{self.amount}: codec:K or uniform:N, K, N >= 1')
    if self.intervention not in INTERVENTIONS:
      raise ValueError(f'intervention {self.intervention!r}: choose one of {INTERVENTIONS}')
    if self.kind != 'codec' and self.intervention in ('static_motion', 'counterfactual_motion'):
      raise ValueError(
        f'{self.name}: {self.intervention} changes a codec selection; use it with codec:K'
      )

  @classmethod
  def parse(cls, text: str) -> InputMode:
    base, _, intervention = text.strip().partition('+')
    kind, sep, amount = base.partition(':')
    if not sep or not amount.strip().isdigit():
      raise ValueError(
        f'input mode {text!r}: write codec:K or uniform:N (e.g. codec:2048, '
        'uniform:8), optionally +shuffle_positions / +static_motion / '
        '+counterfactual_motion'
      )
    return cls(kind.strip(), int(amount), intervention.strip() or 'none')

  @property
  def name(self) -> str:
    extra = '' if self.intervention == 'none' else f'+{self.intervention}'
    return f'{self.kind}:{self.amount}{extra}'

  @property
  def tokens(self) -> int:
    return self.amount if self.kind == 'codec' else self.amount * VIDEO_GRID * VIDEO_GRID


# ------------------------------------------------------------------------------------------------
# Frame sampling and augmentation
# ------------------------------------------------------------------------------------------------


def segment_frame_ids(
  num_frames: int, count: int, *, train: bool, rng: np.random.Generator | None = None
) -> np.ndarray:
  """The release's segment sampling (ap_dataloader_dali._get_frame_indices): `count` segments
  of (num_frames - 1) / count, a uniform offset in each when training, the centre at test; a
  clip shorter than `count` repeats its last frame."""
  if num_frames < count:
    return np.asarray(list(range(num_frames)) + [num_frames - 1] * (count - num_frames), np.int64)
  seg = (num_frames - 1) / count
  offsets = rng.uniform(0, seg, count) if train else np.full(count, seg / 2)
  return (seg * np.arange(count) + offsets).astype(np.int64)


def grid_times(
  frame_ids: np.ndarray, num_frames: int, temporal_size: int = TEMPORAL_SIZE
) -> np.ndarray:
  """Grid time of frame ids of a clip of `num_frames`: round(id / (frames - 1) * (size - 1))."""
  scaled = np.asarray(frame_ids, np.float64) / max(num_frames - 1, 1) * (temporal_size - 1)
  return np.clip(np.round(scaled), 0, temporal_size - 1).astype(np.int32)


# RGB <-> YIQ, the colour space DALI's hue / saturation operators work in.
_RGB_TO_YIQ = np.array(
  [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ColorJitter:
  """The release codec probe loader's training augmentation, one draw per clip.

  brightness / contrast (probability 0.8): out = 255 b + 128 + c (x - 128), c ~ U(0.6, 1.4),
  b ~ U(-0.125, 0.125). The release calls DALI's brightness_contrast with `brightness` =
  U(-0.125, 0.125), which DALI takes as a multiplier (an almost black clip); its evident intent,
  a shift of +-12.5% of the range, is the default; `literal_brightness=True` multiplies as DALI
  does. saturation (0.8): the YIQ chroma scaled by U(0.6, 1.4). hue (0.8): the chroma rotated by
  U(-0.2, 0.2) degrees (DALI's unit). channel swap (0.1): RGB -> BGR.
  """

  p_brightness_contrast: float = 0.8
  contrast: tuple[float, float] = (0.6, 1.4)
  brightness: tuple[float, float] = (-0.125, 0.125)
  p_saturation: float = 0.8
  saturation: tuple[float, float] = (0.6, 1.4)
  p_hue: float = 0.8
  hue_degrees: tuple[float, float] = (-0.2, 0.2)
  p_channel_swap: float = 0.1
  literal_brightness: bool = False

  def __call__(self, patches_Nx588: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = patches_Nx588.reshape(len(patches_Nx588), -1, 3).astype(np.float32)
    if rng.random() < self.p_brightness_contrast:
      c, b = rng.uniform(*self.contrast), rng.uniform(*self.brightness)
      x = 128 + c * (x - 128)
      x = b * x if self.literal_brightness else x + 255 * b
      x = np.clip(x, 0, 255)
    if rng.random() < self.p_saturation:
      x = self._chroma(x, scale=rng.uniform(*self.saturation), degrees=0.0)
    if rng.random() < self.p_hue:
      x = self._chroma(x, scale=1.0, degrees=rng.uniform(*self.hue_degrees))
    if rng.random() < self.p_channel_swap:
      x = x[..., ::-1]
    return np.round(x).astype(np.uint8).reshape(patches_Nx588.shape)

  @staticmethod
  def _chroma(x: np.ndarray, *, scale: float, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    rot = np.array(
      [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]], np.float32
    ) * [[1], [scale], [scale]]
    matrix = _YIQ_TO_RGB @ rot.astype(np.float32) @ _RGB_TO_YIQ
    return np.clip(x @ matrix.T, 0, 255)


# ------------------------------------------------------------------------------------------------
# Interventions
# ------------------------------------------------------------------------------------------------


def shuffle_positions(positions_Nx3: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """The positions permuted over the tokens (a derangement when there are two or more distinct
  positions: no token keeps its own)."""
  order = rng.permutation(len(positions_Nx3))
  source = np.empty_like(order)
  source[order] = np.roll(order, -1)  # one random cycle through all tokens: no fixed point
  return np.asarray(positions_Nx3)[source]


def static_replacement(
  positions_Kx3: np.ndarray, scores_TxHxW: np.ndarray, share: float, rng: np.random.Generator
) -> np.ndarray:
  """`share` of the selected positions (drawn at random) replaced by as many of the clip's
  lowest-scoring unselected patches (ties: (t, h, w) order); sorted by (t, h, w)."""
  positions = np.asarray(positions_Kx3, np.int64)
  k = len(positions)
  swap = int(round(share * k))
  t, h, w = scores_TxHxW.shape
  flat_selected = (positions[:, 0] * h + positions[:, 1]) * w + positions[:, 2]
  free = np.setdiff1d(np.arange(t * h * w), flat_selected)
  swap = min(swap, len(free))
  static = free[np.argsort(scores_TxHxW.reshape(-1)[free], kind='stable')[:swap]]
  kept = np.delete(flat_selected, rng.choice(k, size=swap, replace=False))
  flat = np.sort(np.concatenate([kept, static]))
  return np.stack(np.unravel_index(flat, (t, h, w)), axis=-1).astype(np.int64)


# ------------------------------------------------------------------------------------------------
# Clips -> samples
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClipSelection:
  """What the sampler keeps of a clip's codec selection (not its timings or picture types)."""

  frame_ids: np.ndarray  # int [64] source frames of the timeline
  positions: np.ndarray  # int [K, 3] (t, h, w), t on the timeline
  scores: np.ndarray  # float16 [64, 16, 16] (the static_motion intervention's ranking)


def _crop(frames_TxHxWx3: np.ndarray) -> np.ndarray:
  return np.stack(
    [video_lib.resize_short_side_centre_crop(f, VIDEO_RESOLUTION) for f in frames_TxHxWx3]
  )


def selection_key(video) -> str:
  """What identifies a clip's video for its cached selection: the content's hash for bytes or
  frames; for a file its absolute path, size and modification time, so a file replaced at the
  same path (a re-encode) gets a new selection."""
  if isinstance(video, np.ndarray):
    return hashlib.sha1(video.tobytes()).hexdigest()
  if isinstance(video, (bytes, bytearray, memoryview)):
    return hashlib.sha1(bytes(video)).hexdigest()
  path = os.path.abspath(os.fspath(video))
  try:
    stat = os.stat(path)
  except OSError:  # not there: the selection fails with a VideoError naming it
    return path
  return f'{path}\0{stat.st_size}\0{stat.st_mtime_ns}'


def video_frame_count(video, counts: dict) -> int:
  """Frames of a clip's whole video: a frames array's length, else the container's count,
  probed once per file (kept in `counts`, by path; bytes by the object)."""
  if isinstance(video, np.ndarray):
    return len(video)
  key = id(video) if isinstance(video, (bytes, bytearray, memoryview)) else os.fspath(video)
  if key not in counts:
    from data_pipeline.codec import bitstream

    counts[key] = bitstream.probe(video).num_frames
  return counts[key]


def segment_error(clip: ProbeClip, total: int) -> str | None:
  """Why a clip's segment does not fit its video of `total` frames; None when it does."""
  if clip.start is None or clip.end <= total:
    return None
  return (
    f'{clip.name or clip.video}: the segment {clip.start}..{clip.end} (end exclusive) runs past '
    f"the video's {total} frames; fix the line (0 <= start < end <= {total})"
  )


def check_clips(
  clips: Sequence[ProbeClip], *, num_classes: int | None = None, frame_counts: dict | None = None
) -> None:
  """A ValueError naming the first bad clip (its list file and line) and how many more there
  are, checked in this order: a label outside 0..num_classes - 1, a video file that is not
  there, a segment past its video's end or in a video that cannot be read (one probe per file,
  kept in `frame_counts`). Cheap next to a probe run; a damaged whole-file video is found only
  when it is read."""
  counts = {} if frame_counts is None else frame_counts

  def label(clip):
    if num_classes is None or 0 <= clip.label < num_classes:
      return None
    return (
      f'{clip.name}: label {clip.label} is outside 0..{num_classes - 1} (num_classes '
      f'{num_classes}); fix the label or set num_classes'
    )

  def missing(clip):
    if isinstance(clip.video, (str, os.PathLike)) and not os.path.isfile(clip.video):
      return f'{clip.name}: {os.fspath(clip.video)}: no such video file'
    return None

  def segment(clip):
    if clip.start is None:
      return None
    try:
      return segment_error(clip, video_frame_count(clip.video, counts))
    except ValueError as e:  # video.VideoError
      return f'{clip.name}: {e}'

  for check in (label, missing, segment):
    problems = [p for p in map(check, clips) if p]
    if problems:
      more = f' (and {len(problems) - 1} more clip(s) like it)' if len(problems) > 1 else ''
      raise ValueError(problems[0] + more)


class ClipSampler:
  """Token samples of a list of clips in one input mode (see the module docstring)."""

  def __init__(
    self,
    clips: Sequence[ProbeClip],
    mode: InputMode | str,
    *,
    augment: ColorJitter | None = ColorJitter(),
    static_share: float = 0.5,
    preset: str = CODEC_PRESET,
    temporal_size: int = TEMPORAL_SIZE,
    selection_cache: str | None = None,
    frame_counts: dict | None = None,
    log: Callable[[str], None] | None = None,
  ):
    """`selection_cache`: a folder keeping every clip's codec selection as .npz (by a hash of
    the clip's identity, `selection_key`, K and the preset), so a rerun or another encoder does
    not make it again (the release caches its visible indices the same way); a damaged one is
    named through `log` and made again. `frame_counts`: the videos' frame counts (by
    `frame_count_key`), shared between samplers of the same clips so each video is probed
    once."""
    self.clips = list(clips)
    self.mode = InputMode.parse(mode) if isinstance(mode, str) else mode
    if self.mode.intervention == 'counterfactual_motion' and len(self.clips) < 2:
      raise ValueError("counterfactual_motion borrows another clip's selection: give >= 2 clips")
    if not 0 <= static_share <= 1:
      raise ValueError(f'static_share={static_share}: must be in [0, 1]')
    self.augment, self.static_share = augment, static_share
    self.preset, self.temporal_size = preset, temporal_size
    self.selection_cache = selection_cache
    self.log = log or _LOG.warning
    self._selections: dict[int, Any] = {}
    self._frame_counts = {} if frame_counts is None else frame_counts

  def __len__(self) -> int:
    return len(self.clips)

  def labels(self) -> np.ndarray:
    return np.asarray([c.label for c in self.clips], np.int64)

  def sample(self, index: int, *, train: bool, rng: np.random.Generator) -> dict[str, Any]:
    """Clip `index` as tokens: training sampling and augmentation when `train`, else the test
    sampling (centre frames, no augmentation)."""
    clip = self.clips[index]
    if self.mode.kind == 'uniform':
      patches, positions = self._uniform(index, train=train, rng=rng)
    else:
      patches, positions = self._codec(index, rng)
    if train and self.augment is not None:
      patches = self.augment(patches, rng)
    if self.mode.intervention == 'shuffle_positions':
      positions = shuffle_positions(positions, rng)
    return {'patches': patches, 'positions': np.asarray(positions, np.int32), 'label': clip.label}

  # -- reading -----------------------------------------------------------------------------------

  def num_frames(self, index: int) -> int:
    """Frames of the clip: its segment's (checked to lie within the video), else its video's."""
    clip = self.clips[index]
    total = video_frame_count(clip.video, self._frame_counts)
    if clip.start is None:
      return total
    error = segment_error(clip, total)
    if error:
      raise ValueError(error)
    return clip.end - clip.start

  def frames(self, index: int, frame_ids: np.ndarray) -> np.ndarray:
    """uint8 [n, 224, 224, 3] of the clip's frames (ids within its segment)."""
    clip = self.clips[index]
    ids = np.asarray(frame_ids, np.int64) + (clip.start or 0)
    if isinstance(clip.video, np.ndarray):
      return _crop(clip.video[np.minimum(ids, len(clip.video) - 1)])
    return video_lib.decode_frames(clip.video, ids, VIDEO_RESOLUTION)

  def video(self, index: int):
    """A decodable video of the clip for its codec selection: its file, or (a segment, a frames
    array) its frames at 224 x 224 encoded with H.264 (GOP 16)."""
    clip = self.clips[index]
    if clip.start is None and not isinstance(clip.video, np.ndarray):
      return clip.video
    from data_pipeline.synthetic import encode

    frames = self.frames(index, np.arange(self.num_frames(index)))
    return encode(frames, 'h264', gop=16, crf=SEGMENT_CRF)

  def selection(self, index: int) -> ClipSelection:
    """The clip's release_probe codec selection at the mode's K over 64 frames: made once, kept
    in `selection_cache` when given (and read from there each time: a large set's selections
    need not fit in memory), else in memory."""
    if index in self._selections:
      return self._selections[index]
    path = self._cache_path(index)
    found = self._cached_selection(path) if path and os.path.isfile(path) else None
    if found is None:
      from data_pipeline import codec

      sel = codec.select(
        self.video(index),
        num_frames=CODEC_TIMELINE,
        budget=self.mode.amount,
        resolution=VIDEO_RESOLUTION,
        preset=self.preset,
      )
      found = ClipSelection(
        sel.frame_ids.astype(np.int32),
        sel.positions.astype(np.int16),
        sel.scores.astype(np.float16),
      )
      if path:
        buffer = io.BytesIO()
        np.savez(buffer, **dataclasses.asdict(found))
        fileio.write_atomic(path, buffer.getvalue())
    if not path:
      self._selections[index] = found
    return found

  def _cached_selection(self, path: str) -> ClipSelection | None:
    """The selection kept in `path`, or None (named through `log`) when the file is damaged:
    unreadable, or not the arrays of a selection at this K."""
    what = 'the cached codec selection'
    try:
      stored = fileio.read_arrays(path, what)
      held = sorted(stored) if isinstance(stored, dict) else 'one array'
      if held != sorted(SELECTION_FIELDS):
        raise ValueError(f'{what} {path}: holds {held}; expected {sorted(SELECTION_FIELDS)}')
      found = ClipSelection(stored['frame_ids'], stored['positions'], stored['scores'])
      if found.positions.shape != (self.mode.amount, 3) or found.scores.ndim != 3:
        raise ValueError(
          f'{what} {path}: positions {found.positions.shape}, scores {found.scores.shape}; '
          f'expected positions ({self.mode.amount}, 3) and scores [T, H, W]'
        )
      return found
    except ValueError as e:  # fileio.ArrayFileError is a ValueError
      self.log(f'{e}; making the selection again')
      return None

  def _cache_path(self, index: int) -> str | None:
    if not self.selection_cache:
      return None
    clip = self.clips[index]
    parts = (selection_key(clip.video), clip.start, clip.end, self.mode.amount, self.preset)
    key = '\0'.join(map(str, parts))
    os.makedirs(self.selection_cache, exist_ok=True)
    return os.path.join(self.selection_cache, hashlib.sha1(key.encode()).hexdigest() + '.npz')

  def donor_selection(self, index: int) -> ClipSelection:
    """The selection counterfactual_motion lends clip `index`: the next clip's in list order
    whose positions differ from the clip's own (two static-fallback clips share theirs), among
    the next `DONOR_TRIES`; the next clip's when none differs."""
    own = np.asarray(self.selection(index).positions)
    candidates = [(index + j) % len(self.clips) for j in range(1, len(self.clips))]
    for j in candidates[:DONOR_TRIES]:
      found = self.selection(j)
      if not np.array_equal(np.asarray(found.positions), own):
        return found
    return self.selection(candidates[0])

  # -- modes -------------------------------------------------------------------------------------

  def _uniform(self, index: int, *, train: bool, rng: np.random.Generator):
    total = self.num_frames(index)
    ids = segment_frame_ids(total, self.mode.amount, train=train, rng=rng)
    patches = frame_patches(self.frames(index, ids))
    times = grid_times(ids, total, self.temporal_size)
    positions = np.concatenate([grid_positions(int(t), VIDEO_GRID, VIDEO_GRID) for t in times])
    return patches, positions

  def _codec(self, index: int, rng: np.random.Generator):
    sel = self.selection(index)
    positions = np.asarray(sel.positions, np.int64)
    if self.mode.intervention == 'static_motion':
      positions = static_replacement(
        positions, sel.scores.astype(np.float32), self.static_share, rng
      )
    elif self.mode.intervention == 'counterfactual_motion':
      positions = np.asarray(self.donor_selection(index).positions, np.int64)
    # The pixels come from the clip itself (its file, segment or array), only the frames used.
    used_t = np.unique(positions[:, 0])
    frames = self.frames(index, np.asarray(sel.frame_ids)[used_t])
    patches = gather_patches(
      frames, np.searchsorted(used_t, positions[:, 0]), positions[:, 1], positions[:, 2]
    )
    assert patches.shape == (self.mode.amount, PATCH_DIM), patches.shape
    grid_t = timeline_to_grid(len(sel.frame_ids), self.temporal_size)
    positions = np.stack([grid_t[positions[:, 0]], positions[:, 1], positions[:, 2]], -1)
    return patches, positions.astype(np.int32)
