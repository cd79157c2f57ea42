"""Codec patch selection end to end (docs/spec.md §2), and the two baselines at the same budget.

`select` reads the vectors (`bitstream`), builds per-frame maps and model-grid scores (`maps`),
then applies the frame policy, the optional static fallback and one global top-K. Decisions
where the spec leaves room:

- A timeline position that repeats the frame of the position before it (clips shorter than T)
  brings nothing new: its scores are 0 and it is never kept whole (or see `repeated_frames`).
  Both paths analyse each distinct frame once (the transcode's I-frames fall on every
  gop-th distinct frame in every `transcode` mode, or with `keyframes='source'` on source frames
  0, gop, 2 gop, ...).
- K always equals the budget. If the whole frames (policy plus static fallback) hold more than
  the budget, the budget // (Hp*Wp) of them evenly spaced over the list are kept whole (the
  earliest ones would all sit at the start of a clip with many I-frames) and the remainder is
  chosen by score among all other patches. A budget below one frame keeps no frame whole.
- Top-K ties break by (t, h, w) order (a stable sort), so a selection is a pure function of its
  input.
- The returned `scores` are the fused scores as computed; the 'zero' policy zeroes I-frame and
  first-frame scores only for the ranking.
- The static fallback's m is the mean score of each patch location (h, w) over the frames that
  are ranked by score (not kept whole, not repeats, not zeroed by the policy), per pixel. On the
  synthetic clips a still clip gives p95(m) ~ 0.02 and rel ~ 0.37 (the release's 0.38 sits
  just above), clips with moving objects p95 0.2-0.35 and rel > 0.85, a camera pan with no
  object rel ~ 0.2. Taking m over all (t, h, w) candidates instead separates far worse: the
  sparse re-coding noise of a still clip then looks like a small moving region (rel 1.0).
  The fallback's whole frames are added to the policy's; with the release's test, a budget that
  cannot hold them is spread over them instead (`release.static_spread`).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from data_pipeline.codec import bitstream, geometry, maps, release, skipping, transcode
from data_pipeline.codec.options import DEFAULT_GOP, Options
from data_pipeline.records import PICTURE_TYPES
from data_pipeline.video import VideoError, VideoSource


@dataclasses.dataclass
class Selection:
  """The selected patches of one clip, and how they were found."""

  frame_ids: np.ndarray  # int32 [T] source frame (presentation order) of each position
  positions: np.ndarray  # int32 [K, 3] selected (t, h, w) on the model grid, sorted
  picture_types: np.ndarray  # uint8 [T] codes into records.PICTURE_TYPES ('?', 'I', 'P', 'B')
  scores: np.ndarray  # float32 [T, Hp, Wp] fused score per patch (zeros for baselines)
  whole_frames: np.ndarray  # int32 [n] timeline positions kept whole
  method: str  # 'codec', 'uniform_frames' or 'random'
  source: str = ''  # describe(video)
  codec: str = ''  # the source's codec
  num_source_frames: int = 0  # frames in the source (what the timeline spans)
  transcoded: bool = False  # vectors came from the libx264 transcode
  static_fallback: bool = False
  truncated: bool = False  # fewer frames decoded than promised (allow_truncated=True)
  vectors_past: int = 0  # 4x4 cells with a past / future vector, over the analysed frames
  vectors_future: int = 0
  decode_thread: bool = False  # decoded on a thread of its own (`select(decode_thread=...)`)
  skipped_frames: int = 0  # disposable B-frames left undecoded (`codec.skipping`)
  geometry: str = 'crop'  # the canvas the positions are on (`select(geometry=...)`)
  # Seconds per stage and 'total'; with a decoding thread 'decode' is the wait for frames.
  timings: dict = dataclasses.field(default_factory=dict)

  @property
  def picture_type_letters(self) -> list[str]:
    return [PICTURE_TYPES[int(c)] for c in self.picture_types]

  @property
  def mask(self) -> np.ndarray:
    """bool [T, Hp, Wp]: True on selected patches."""
    out = np.zeros(self.scores.shape, bool)
    out[tuple(self.positions.T)] = True
    return out

  def record_fields(self) -> dict:
    """The clip-record fields of `records` (without source, video and labels); `geometry` only
    when it is not the crop (records of a crop stay as they were)."""
    extra = {} if self.geometry == 'crop' else {'geometry': self.geometry}
    return dict(
      **extra,
      frame_ids=self.frame_ids.astype(np.int32),
      positions=self.positions.astype(np.int16),
      picture_types=self.picture_types.astype(np.uint8),
      stats_num_source_frames=int(self.num_source_frames),
      stats_kept_whole=int(len(self.whole_frames)),
      stats_transcoded=int(self.transcoded),
      stats_static_fallback=int(self.static_fallback),
      stats_truncated=int(self.truncated),
      stats_seconds=float(self.timings.get('total', 0.0)),
    )


def check_grid(num_frames, budget, resolution, patch_size) -> tuple[int, int]:
  for name, value in (
    ('num_frames', num_frames),
    ('budget', budget),
    ('resolution', resolution),
    ('patch_size', patch_size),
  ):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'{name}={value!r}: allowed values are integers >= 1')
  if resolution % patch_size:
    raise ValueError(f'resolution={resolution} must be a multiple of patch_size={patch_size}')
  side = resolution // patch_size
  if budget > num_frames * side * side:
    raise ValueError(
      f'budget={budget}: allowed values are 1..{num_frames * side * side} '
      f'(num_frames x {side}x{side} patches)'
    )
  return side, side


# ----------------------------------------------------------------------------- codec selection


def check_arguments(
  num_frames=64,
  budget=2048,
  resolution=224,
  patch_size=14,
  preset=None,
  decode_thread=None,
  **options,
):
  """`select`'s arguments checked without a video: (Options with the preset applied, the patch
  grid (Hp, Wp), decode_thread with the thread policy's no already applied); ValueError naming
  the argument otherwise. Batch tools call it before their first clip."""
  opts = Options.from_kwargs(options, preset)
  if decode_thread not in (None, True, False):
    raise ValueError(f'decode_thread={decode_thread!r}: allowed values are None, True, False')
  if decode_thread is None and bitstream.select_threads() < 2:
    decode_thread = False
  return opts, check_grid(num_frames, budget, resolution, patch_size), decode_thread


def select(
  video: VideoSource,
  num_frames: int = 64,
  budget: int = 2048,
  resolution: int = 224,
  patch_size: int = 14,
  preset: str | None = None,
  decode_thread: bool | None = None,
  **options,
) -> Selection:
  """Codec patch selection of one clip (docs/spec.md §2); see `Options` for the options.

  `video` is a path or the bytes of a file. `preset` ('release_train', 'release_probe',
  'release_llava') starts from the release pipeline's values (`release.PRESETS`); options given
  here win over them. Raises VideoError (naming the file and the reason) for input that cannot
  be used, ValueError for unknown options or bad values.

  `decode_thread`: decode on a thread of its own, overlapped with the analysis: the same
  selection in less wall time, for up to 20% more CPU time (docs/codec.md). None (the default):
  when the selection may use 2 threads (`bitstream.select_threads`) and the decoder has at
  least half as much again to do as the analysis (`bitstream.DECODE_THREAD_SHARE`).
  """
  opts, (hp, wp), decode_thread = check_arguments(
    num_frames, budget, resolution, patch_size, preset, decode_thread, **options
  )
  start = time.perf_counter()
  info, opened = bitstream.probe(video, keep_open=True)
  timings = {'probe': time.perf_counter() - start}
  analysis = _analyse(
    video,
    info,
    info.num_frames,
    num_frames,
    resolution,
    patch_size,
    opts,
    timings,
    opened,
    decode_thread,
  )
  if analysis.missing:
    if analysis.decoded == 0:
      raise VideoError(
        f'{info.name}: corrupt, no frame could be decoded'
        + (f' ({analysis.error})' if analysis.error else '')
      )
    if not opts.allow_truncated:
      raise VideoError(
        f'{info.name}: truncated or corrupt: the container promises {info.num_frames} '
        f'frames but only {analysis.decoded} decode'
        + (f' ({analysis.error})' if analysis.error else '')
        + '; pass allow_truncated=True to use the frames that decode'
      )
    analysis = _analyse(
      video,
      info,
      analysis.decoded,
      num_frames,
      resolution,
      patch_size,
      opts,
      timings,
      decode_thread=decode_thread,
    )
    if analysis.missing:
      raise VideoError(
        f'{info.name}: corrupt: decoding is not repeatable '
        f'({len(analysis.missing)} frames missing on the second pass)'
      )
    analysis.truncated = True

  if not np.isfinite(analysis.scores).all():  # float32 maps overflow long before float64 does
    raise ValueError(
      f'{info.name}: the scores overflowed float32 under motion_weight={opts.motion_weight}, '
      f'residual_weight={opts.residual_weight}, centre_prior={opts.centre_prior}: use smaller '
      'values (only their ratio matters to fusion=mean)'
    )
  tick = time.perf_counter()
  valid = geometry.valid_patches(info.height, info.width, resolution, patch_size, opts.geometry)
  try:
    positions, whole, fallback = choose(
      analysis.scores, analysis.kinds, analysis.repeats, budget, opts, patch_size, valid
    )
  except ValueError as e:
    raise VideoError(
      f'{info.name}: {e}: the {info.width}x{info.height} picture covers '
      f'{int(valid.sum())} of the {hp * wp} patches of the {resolution} '
      f'{opts.geometry}; lower the budget, use geometry=crop, or padding_fill=True'
    ) from e
  timings['select'] = time.perf_counter() - tick
  timings['total'] = time.perf_counter() - start
  return Selection(
    frame_ids=analysis.frame_ids.astype(np.int32),
    positions=positions,
    picture_types=np.array([PICTURE_TYPES.index(k) for k in analysis.kinds], np.uint8),
    scores=analysis.scores,
    whole_frames=whole,
    method='codec',
    source=info.name,
    codec=info.codec,
    num_source_frames=analysis.num_source_frames,
    transcoded=analysis.transcoded,
    static_fallback=fallback,
    truncated=analysis.truncated,
    vectors_past=analysis.vectors_past,
    vectors_future=analysis.vectors_future,
    decode_thread=analysis.decode_thread,
    skipped_frames=analysis.skipped,
    geometry=opts.geometry,
    timings=timings,
  )


@dataclasses.dataclass
class _Analysis:
  frame_ids: np.ndarray
  scores: np.ndarray  # float32 [T, Hp, Wp]
  kinds: list  # 'I' / 'P' / 'B' / '?' per position
  repeats: np.ndarray  # bool [T]
  num_source_frames: int
  transcoded: bool
  decoded: int
  missing: list
  error: Exception | None
  vectors_past: int = 0
  vectors_future: int = 0
  truncated: bool = False
  decode_thread: bool = False
  skipped: int = 0


def _analyse(
  video,
  info: bitstream.Probe,
  num_source_frames: int,
  num_frames: int,
  resolution: int,
  patch_size: int,
  opts: Options,
  timings: dict,
  opened=None,
  decode_thread: bool | None = False,
) -> _Analysis:
  """The per-frame scores of one pass over the clip; `opened`: a container open on `video`
  and not read from (`bitstream.probe(keep_open=True)`), which this closes; `decode_thread`:
  True / False, or None to decide by the decoder's share of the work."""
  tick = time.perf_counter()
  frame_ids = bitstream.timeline(num_source_frames, num_frames)
  distinct = np.unique(frame_ids)
  transcoded = opts.gop is not None or info.codec != 'h264'
  container = None
  if transcoded:
    if opened is not None:
      opened.close()
    height, width = transcode.analysis_size(
      info.height, info.width, opts.analysis_size or resolution
    )
    # source_ids[i]: the source frame at transcode position i; wanted: the samples' positions.
    gop = opts.gop or DEFAULT_GOP
    if opts.transcode == 'faithful':
      packets, count, error = transcode.transcode_segment(
        video, distinct, height, width, gop, opts.crf, opts.keyframes
      )
      missing = [int(i) for i in distinct if int(i) >= count]
      source_ids = np.arange(distinct[0], distinct[-1] + 1)
      wanted = distinct - distinct[0]
    else:
      source_ids, wanted = (
        transcode.paired_sequence(distinct)
        if opts.transcode == 'paired'
        else (distinct, np.arange(distinct.size))
      )
      got, count, error = transcode.read_frames(video, source_ids, height, width)
      missing = [int(i) for i in distinct if int(i) not in got]
      if not missing:
        intra = transcode.intra_positions(distinct, wanted, gop, opts.transcode, opts.keyframes)
        packets = transcode.encode_h264([got[int(i)] for i in source_ids], gop, opts.crf, intra)
    if missing:
      return _Analysis(frame_ids, None, [], None, num_source_frames, True, count, missing, error)
    timings['transcode'] = time.perf_counter() - tick
    frames = transcode.h264_packet_frames(packets)
    step = 1
  else:
    container, stream = bitstream.open_with_vectors(video, opened)
    wanted = distinct
    # Disposable B-frames no wanted frame can read are not decoded (`skipping`).
    try:
      plan = skipping.plan(container, stream, wanted)
    except skipping.Mismatch:  # read once and not sought back: decode it in full, opened again
      container.close()
      container, stream, plan = *bitstream.open_with_vectors(video), None
    if plan is not None:
      frames = skipping.frames(container, stream, plan)
    else:
      frames = bitstream.container_frames(container, stream)
    # Large frames are analysed block-averaged, down to a short side of at least analysis_size
    # (the transcode path scales to it); the vectors stay in coded pixels.
    step = max(1, min(info.height, info.width) // (opts.analysis_size or resolution))

  if decode_thread is None:
    # Pixels to decode per pixel analysed (see bitstream.DECODE_THREAD_SHARE).
    if transcoded:
      share = source_ids.size / distinct.size  # all at the analysis size
    else:
      share = (distinct[-1] + 1) * info.height * info.width / distinct.size
      share /= max(1, info.height // step) * max(1, info.width // step)
    decode_thread = share >= bitstream.DECODE_THREAD_SHARE
  while True:
    decoded = bitstream.Decoded()
    per_frame: dict[int, tuple] = {}
    vectors_past = vectors_future = 0
    map_seconds = 0.0
    try:
      if decode_thread:
        frames = bitstream.prefetched(frames)
      scorer = Scorer(opts, resolution, patch_size, step)
      how = (opts.camera_compensation, step, opts.maths, opts.motion_inconsistency)
      how += (opts.whole_pixel_vectors, opts.vector_grid)  # frame_maps' after the references
      found = bitstream.frames_with_references(
        frames, wanted, decoded, step, llava=how[-1] == 'llava'
      )
      for frame, past, future in found:
        map_tick = time.perf_counter()
        raw = maps.frame_maps(frame, past, future, *how)
        vectors_past += raw.vectors_past
        vectors_future += raw.vectors_future
        source_id = int(source_ids[frame.index]) if transcoded else frame.index
        per_frame[source_id] = (scorer(raw, frame.height, frame.width), frame.kind)
        map_seconds += time.perf_counter() - map_tick
      again = False
    except skipping.Mismatch:
      again = True  # the skipping decode went otherwise than planned
    finally:
      if decode_thread:
        frames.close()  # joins the decoding thread before its container closes
      if container is not None:
        container.close()
    if not again:
      break
    # Decode every frame, from a new open.
    container, stream = bitstream.open_with_vectors(video)
    frames = bitstream.container_frames(container, stream)
  timings['maps'] = timings.get('maps', 0.0) + map_seconds
  elapsed = time.perf_counter() - tick - map_seconds - timings.get('transcode', 0.0)
  timings['decode'] = timings.get('decode', 0.0) + elapsed
  missing = [int(i) for i in distinct if int(i) not in per_frame]
  counts = (num_source_frames, transcoded, decoded.count)
  if missing:
    return _Analysis(frame_ids, None, [], None, *counts, missing, decoded.error)

  side = resolution // patch_size
  scores = np.zeros((num_frames, side, side), np.float32)
  # The copies of a frame but the one that counts (never kept whole, zeroed or judged): they
  # score 0, or as the frame with repeated_frames='all'.
  repeats = np.zeros(num_frames, bool)
  if opts.repeated_frames == 'last':
    repeats[:-1] = frame_ids[:-1] == frame_ids[1:]
  else:
    repeats[1:] = frame_ids[1:] == frame_ids[:-1]
  kinds = []
  for t, source_id in enumerate(frame_ids):
    patch_scores, kind = per_frame[int(source_id)]
    if not repeats[t] or opts.repeated_frames == 'all':
      scores[t] = patch_scores
    kinds.append(kind)
  return _Analysis(
    frame_ids,
    scores,
    kinds,
    repeats,
    *counts,
    [],
    decoded.error,
    vectors_past,
    vectors_future,
    decode_thread=bool(decode_thread),
    skipped=decoded.skipped,
  )


class Scorer:
  """Raw per-frame maps -> model-grid scores [Hp, Wp] under one clip's options (docs/spec.md
  §2.5-§2.6): normalise, fuse, centre prior, then onto the canvas. Caches the prior per frame
  size (the canvas's banded matrices are cached in `geometry`, for every clip)."""

  def __init__(self, opts: Options, resolution: int, patch_size: int, step: int):
    self.opts, self.resolution, self.patch_size, self.step = opts, resolution, patch_size, step
    self._priors: dict[tuple, np.ndarray] = {}
    self._parts: dict[tuple, tuple] = {}  # per map and frame size: `geometry.read_part`

  def fused(self, raw: maps.FrameMaps, part: tuple | None = None) -> np.ndarray:
    """The fused map; of `part` only ((rows, columns) slices: what the patch sums read)."""
    opts = self.opts
    fusion = opts.fusion, opts.motion_weight, opts.residual_weight
    fused_HxW = maps.normalise_fuse(raw, *fusion, part=part)
    if opts.maths == 'release':
      fused_HxW = np.clip(fused_HxW, 0.0, 1.0)
    if opts.centre_prior > 0:
      shape = raw.residual_HxW.shape
      if shape not in self._priors:
        self._priors[shape] = maps.centre_prior(
          *shape, opts.centre_prior, opts.centre_sigma, opts.maths
        )
      fused_HxW = fused_HxW * (self._priors[shape] if part is None else self._priors[shape][part])
      if opts.maths == 'release':
        fused_HxW = np.clip(fused_HxW, 0.0, 1.0)
    return release.quantise(fused_HxW) if opts.quantise else fused_HxW

  def canvas_sums(self, fused_HxW: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resample onto the canvas (rounded to uint8 levels with `quantise`), then patch sums."""
    bands = geometry.canvas_bands(
      height, width, self.resolution, self.opts.geometry, self.opts.resample, self.step
    )
    # Ry @ map @ Rx.T through the banded matrices (`geometry.Band`): every canvas pixel's terms
    # in one fixed order, so the same bits on every CPU and BLAS build, and no BLAS threads.
    canvas_RxR = maps.to_patches_banded(fused_HxW, bands)
    if self.opts.quantise:
      canvas_RxR = np.clip(np.rint(canvas_RxR * 255.0), 0, 255) / 255.0
    side, ps = self.resolution // self.patch_size, self.patch_size
    return (
      canvas_RxR.reshape(side, ps, side, ps).sum(axis=(1, 3), dtype=np.float64).astype(np.float32)
    )

  def __call__(self, raw: maps.FrameMaps, height: int, width: int) -> np.ndarray:
    opts = self.opts
    if opts.resample != 'area' or opts.quantise:
      return self.canvas_sums(self.fused(raw), height, width)
    key = (raw.residual_HxW.shape, height, width)
    if key not in self._parts:
      bands = geometry.patch_bands(
        height, width, self.resolution, self.patch_size, opts.geometry, self.step
      )
      self._parts[key] = geometry.read_part(bands, *raw.residual_HxW.shape)
    part, bands = self._parts[key]  # a crop reads the middle of a wide frame: fused alone
    return maps.to_patches_banded(self.fused(raw, part), bands)


def choose(
  scores_TxHpxWp: np.ndarray,
  kinds: list,
  repeats_T: np.ndarray,
  budget: int,
  opts: Options,
  patch_size: int,
  valid_HpxWp: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
  """Frame policy, static fallback, global top-K: (positions [K, 3], whole frames, fallback).

  Only patches marked in `valid_HpxWp` (the letterbox's picture; default all) are candidates:
  the first frame, when kept whole, is taken whole, padding included (the release's LLaVA
  layout: a full first image); any later whole frame is its picture's patches."""
  num_frames, hp, wp = scores_TxHpxWp.shape
  per_frame = hp * wp
  rank_TxHpxWp = scores_TxHpxWp.copy()
  is_intra = np.array([k == 'I' for k in kinds]) & ~repeats_T
  zeroed = np.zeros(num_frames, bool)
  if opts.policy == 'paper':
    whole = list(np.flatnonzero(is_intra))
  elif opts.policy == 'first_frame':
    whole = [0]
  else:  # 'zero' / 'zero_first'
    whole = []
    zeroed = is_intra.copy() if opts.policy == 'zero' else np.zeros(num_frames, bool)
    zeroed[np.flatnonzero(zeroed)[opts.max_zeroed or num_frames :]] = False  # the earliest ones
    zeroed[0] = True
    rank_TxHpxWp[zeroed] = 0

  fallback = False
  # The static tests judge the picture: a letterbox's padding (zero scores, up to half of a 16:9
  # canvas) would pull the median down and make the relative test unable to fire.
  inside = np.ones((hp, wp), bool) if valid_HpxWp is None else valid_HpxWp
  if opts.static_fallback and not inside.any():
    fallback = True  # no picture patch to judge (a sliver letterboxed): nothing moves on it
  elif opts.static_fallback and opts.static_test == 'release':
    # All T x Hp x Wp patch means on the 0-255 scale, zeroed frames included, as the release.
    fallback = release.is_static(
      rank_TxHpxWp[:, inside].reshape(-1) * 255.0 / patch_size**2,
      opts.static_threshold,
      opts.static_rel_threshold,
    )
  elif opts.static_fallback:
    judged = ~repeats_T & ~zeroed
    judged[whole] = False
    # m: each patch location's mean score over the judged frames, per pixel (fused units).
    mean_HpxWp = (
      rank_TxHpxWp[judged].mean(axis=0) / patch_size**2 if judged.any() else np.zeros((0,))
    )
    mean_M = mean_HpxWp[inside] if mean_HpxWp.size else mean_HpxWp
    fallback = is_static(mean_M.reshape(-1), opts.static_threshold, opts.static_rel_threshold)
  if fallback:
    spread = np.floor(np.linspace(0, num_frames - 1, min(opts.static_frames, num_frames)))
    whole = sorted(set(int(t) for t in whole) | set(int(t) for t in spread))
    picture = np.flatnonzero(inside.reshape(-1))
    if opts.static_test == 'release' and budget < len(whole) * picture.size:
      # The release's rule when its frames cannot be kept whole: K spread over them.
      chosen = release.static_spread(whole, budget, picture, num_frames, per_frame)
      positions = np.argwhere(chosen.reshape(num_frames, hp, wp)).astype(np.int32)
      return positions, np.zeros(0, np.int32), True

  whole = np.array(sorted(int(t) for t in whole), np.int64)
  room = budget // per_frame
  if whole.size > room:
    # Spread the frames that fit over the list: the earliest would all sit at the clip's start.
    whole = whole[np.floor(np.linspace(0, whole.size - 1, room)).astype(np.int64)]
  chosen_TxHpxWp = np.zeros(scores_TxHpxWp.shape, bool)
  chosen_TxHpxWp[whole] = True
  if valid_HpxWp is not None:
    chosen_TxHpxWp[whole[whole > 0]] &= valid_HpxWp
  rest = budget - int(chosen_TxHpxWp.sum())
  if rest:
    open_TxHpxWp = ~chosen_TxHpxWp
    if valid_HpxWp is not None:
      open_TxHpxWp &= valid_HpxWp[None]
    candidates = np.flatnonzero(open_TxHpxWp.reshape(-1))
    if candidates.size < rest and opts.padding_fill and valid_HpxWp is not None:
      # Every picture patch, then padding patches in (t, h, w) order, as scores just below the
      # picture's would give them (the release's top-k leaves the order among them to torch).
      chosen_TxHpxWp.reshape(-1)[candidates] = True
      padding = ~chosen_TxHpxWp & ~valid_HpxWp[None]
      fill = np.flatnonzero(padding.reshape(-1))[: rest - candidates.size]
      chosen_TxHpxWp.reshape(-1)[fill] = True
      rest, candidates = rest - candidates.size - fill.size, candidates[:0]
    if candidates.size < rest:
      raise ValueError(
        f'budget={budget} exceeds the {candidates.size + budget - rest} patches '
        f'that can be selected (whole frames and patches inside the picture)'
      )
    chosen_TxHpxWp.reshape(-1)[
      candidates[top_indices(rank_TxHpxWp.reshape(-1)[candidates], rest)]
    ] = True
  positions = np.argwhere(chosen_TxHpxWp).astype(np.int32)  # row-major: sorted by (t, h, w)
  return positions, whole.astype(np.int32), fallback


def top_indices(values: np.ndarray, count: int) -> np.ndarray:
  """The indices of the `count` largest values, ties taken in index order: the set that
  np.argsort(-values, kind='stable')[:count] gives (in index order here), found by one
  selection: the compiled order statistics for float32 scores when the kernels are on (40x
  np.partition's speed where most scores are 0; -0.0 comes back as 0.0, which compares the same)."""
  if count >= values.size or count <= 0:
    return np.arange(min(values.size, max(count, 0)))
  rank = values.size - count
  if maps.KERNELS is not None and values.dtype == np.float32 and not np.isnan(values).any():
    from data_pipeline.codec.rank_kernels import order_statistics

    kth = order_statistics(values, np.zeros(0, np.int64), rank, rank)[0]  # the count-th largest
  else:
    kth = np.partition(values, rank)[rank]
  above = values > kth
  ties = np.flatnonzero(values == kth)[: count - int(above.sum())]
  return np.sort(np.concatenate([np.flatnonzero(above), ties]))


def is_static(mean_scores: np.ndarray, threshold: float, rel_threshold: float) -> bool:
  """docs/spec.md §2.7 on the per-patch mean scores m: faint (p95 < threshold) or flat
  ((p95 - p50) / p95 < rel_threshold)."""
  if mean_scores.size == 0:
    return True
  p95, p50 = np.percentile(mean_scores, [95, 50])
  if p95 < threshold or p95 <= 0:
    return True
  return (p95 - p50) / p95 < rel_threshold
