"""The options of `codec.select`, checked by name and value, and the release presets.

Defaults follow the paper where the paper and the release differ (policy 'paper'); the release's
evaluation-path extras (camera compensation, centre prior, static fallback) are off by default.
`select(..., preset='release_train' | 'release_probe' | 'release_llava')` starts from the values
in `release.PRESETS` instead; options given explicitly win over the preset's.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np

from data_pipeline.codec.geometry import GEOMETRIES, RESAMPLES
from data_pipeline.codec.release import PRESETS

POLICIES = ('paper', 'first_frame', 'zero', 'zero_first')
FUSIONS = ('mean', 'max', 'sum', 'geomean')
CAMERA_COMPENSATIONS = ('none', 'median', 'mean', 'similarity', 'affine')
MATHS = ('ove', 'release')
STATIC_TESTS = ('ove', 'release')
DEFAULT_GOP = 32
TRANSCODES = ('sampled', 'faithful', 'paired')
REPEATED_FRAMES = ('first', 'last', 'all')
KEYFRAMES = ('samples', 'source')
VECTOR_GRIDS = ('cover', 'llava')


@dataclasses.dataclass(frozen=True)
class Options:
  """Every option of `select`; see the field comments for meaning and allowed values."""

  # Which frames are kept whole: 'paper' I-frames, 'first_frame' frame 0, 'zero' none (I-frame
  # and first-frame scores set to 0, pure top-K), 'zero_first' none (only the first position's
  # scores set to 0: the release's training data, which assumes only frame 0 is an I-frame).
  policy: str = 'paper'
  # 'ove': vectors of both directions per frame of reference distance, coded cells only in the
  # statistics. 'release': the release's maths (`release` module): list-0 vectors in pixels,
  # uncoded cells as zero vectors, its compensation fits, fused map and centre prior clipped.
  maths: str = 'ove'
  # How the normalised motion and residual maps combine: 'mean' (weighted), 'max', 'sum',
  # 'geomean'; the weights apply to all four.
  fusion: str = 'mean'
  motion_weight: float = 1.0
  residual_weight: float = 1.0
  # Camera-motion compensation of the vectors: 'none', 'median' / 'mean' (per-frame median /
  # mean vector), 'similarity' (least-squares zoom/rotation/shift; 'ove': 2 trimming passes
  # keeping 70% of the coded cells; 'release': the release's fit on moving vectors), 'affine'
  # (six-parameter least squares, the release's fit).
  camera_compensation: str = 'none'
  # True (maths 'release'): the motion reads each vector in whole pixels, truncated toward zero,
  # as FFmpeg exports it in a vector's source position (src_x = dst_x + motion_x / motion_scale,
  # integer division) and the release's LLaVA reader takes it (src - dst); the prediction still
  # uses the exact quarter-pel vector. False: motion_x / motion_scale.
  whole_pixel_vectors: bool = False
  # The grid the motion is taken on (maths 'release'): 'cover' every coded block on
  # ceil(H / 4) x ceil(W / 4) cells, pixels read by their centre; 'llava' the release's LLaVA
  # reader's (`release_motion`: floor(H / 4) x floor(W / 4) cells, blocks with a 4-pixel side
  # left out, statistics over the cells, stretched by nearest neighbour). The prediction keeps
  # 'cover'.
  vector_grid: str = 'cover'
  # 0, or an odd k >= 3: the motion score is the k x k local variance of the compensated
  # magnitude (the release's MV "inconsistency") instead of the magnitude.
  motion_inconsistency: int = 0
  # Centre prior strength s: fused * (1 + s * g). The release uses 0.3; 0 turns it off.
  centre_prior: float = 0.0
  centre_sigma: float = 0.35  # the prior's sigma as a share of min(H, W)
  # True: the fused map is stored as uint8 (floor(255 x)) and the canvas rounded to uint8
  # before the patch sums, as the release's train and probe paths do.
  quantise: bool = False
  # How a map reaches the canvas: 'area' (exact area integral), 'linear' / 'cubic' (OpenCV's
  # INTER_LINEAR / INTER_CUBIC resize, then patch sums: the release's LLaVA / probe paths).
  resample: str = 'area'
  # 'crop' (short side to resolution, centre crop) or 'letterbox' (long side to resolution,
  # centred on a zero canvas; only patches wholly inside the picture are candidates).
  geometry: str = 'crop'
  # When the picture's patches cannot fill the budget (a letterbox of a very wide or tall clip),
  # fill the rest with padding patches in (t, h, w) order instead of refusing the clip: the
  # release's LLaVA stage1 scores padding -1e-4, below every picture patch ('release_llava').
  padding_fill: bool = False
  # Static fallback (docs/spec.md §2.7): a clip whose scores are faint or flat keeps `static_frames`
  # uniformly spaced frames whole. With m the mean score of each patch location over the
  # scored frames (per pixel, so in [0, 1] for 'mean' fusion): static when p95(m) is below
  # `static_threshold` (0.03: a still synthetic clip gives ~0.02, moving objects 0.2-0.35), or
  # (p95 - p50) / p95 below `static_rel_threshold`.
  # static_test 'release': m over all T x Hp x Wp patch means on the 0-255 scale, static when
  # p95 < static_threshold, or p95 < 2 * static_threshold and rel < static_rel_threshold (the
  # release's probe: 126 and 0.38).
  static_fallback: bool = False
  static_test: str = 'ove'
  static_threshold: float = 0.03
  static_rel_threshold: float = 0.38
  static_frames: int = 4
  # Which copies of a frame the timeline repeats (clips shorter than T) are scored: 'first' (the
  # others score 0 and are never kept whole), 'last' (the release's probe loader: its position
  # map keeps a frame's last position), 'all' (the release's LLaVA stage1 scores every one; the
  # first copy alone is the one a policy keeps whole or zeroes).
  repeated_frames: str = 'first'
  # GOP of the libx264 transcode. None: H.264 sources are read as they are and other codecs
  # are transcoded with GOP 32 (2 I-frames over 64 frames); an int forces the transcode.
  gop: int | None = None
  crf: int = 18  # libx264 quality of the transcode (0-51)
  # What the transcode re-encodes: 'sampled' the distinct sampled frames only (vectors measure
  # the step from one sample to the next, as the release's training data), 'faithful' every
  # source frame from the first sample to the last (vectors measure the step between source
  # frames, as the release's probe data re-encodes whole clips), 'paired' each sample after the
  # source frame just before it (the step between source frames at twice the frames of
  # 'sampled'). I-frames fall on the same samples in all three. docs/codec.md gives the costs.
  transcode: str = 'paired'
  # Where the transcode's I-frames fall: 'samples' (every gop-th sample) or 'source' (on source
  # frames 0, gop, 2 gop, ...: a whole-source re-encode's keyframes, which the release's probe
  # reads from its GOP-16 HEVC files; samples between them are P-frames).
  keyframes: str = 'samples'
  # Policy 'zero': at most this many I-frame positions zeroed, the earliest (0: every one; the
  # release's probe zeroes at most 8, its tokeq_target_frames).
  max_zeroed: int = 0
  # Short side of the analysis, None: `resolution`. The transcode scales to it (never up);
  # H.264 read as it is is block-averaged by the largest integer factor that keeps its short
  # side at least this (vectors stay in coded pixels).
  analysis_size: int | None = None
  # A stream that decodes fewer frames than its container promises raises VideoError; with
  # True the timeline is laid over the frames that do decode.
  allow_truncated: bool = False

  @classmethod
  def from_kwargs(cls, options: dict[str, Any], preset: str | None = None) -> Options:
    """Options from keyword arguments, on top of `preset`'s values when one is named."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in options:
      if key not in names:
        raise ValueError(f'unknown option {key!r}; the options are: {", ".join(names)}')
    if preset is not None and preset not in PRESETS:
      raise ValueError(
        f'preset={preset!r}: allowed values are None, {", ".join(repr(p) for p in PRESETS)}'
      )
    values = {**(PRESETS[preset] if preset else {}), **options}
    if values.get('camera_compensation', 'none') is None:
      values['camera_compensation'] = 'none'
    out = cls(**values)
    out.check()
    return out

  def check(self):
    _choice('policy', self.policy, POLICIES)
    _choice('fusion', self.fusion, FUSIONS)
    _choice('camera_compensation', self.camera_compensation, CAMERA_COMPENSATIONS)
    _choice('maths', self.maths, MATHS)
    _choice('resample', self.resample, RESAMPLES)
    _choice('geometry', self.geometry, GEOMETRIES)
    _choice('static_test', self.static_test, STATIC_TESTS)
    _flag('whole_pixel_vectors', self.whole_pixel_vectors)
    if self.whole_pixel_vectors and self.maths != 'release':
      raise ValueError("option whole_pixel_vectors=True needs maths='release' (its motion path)")
    _choice('vector_grid', self.vector_grid, VECTOR_GRIDS)
    if self.vector_grid != 'cover' and self.maths != 'release':
      raise ValueError(
        f"option vector_grid={self.vector_grid!r} needs maths='release' (its motion path)"
      )
    _integer(
      'motion_inconsistency',
      self.motion_inconsistency,
      '0 or an odd integer >= 3',
      lambda v: v == 0 or (v >= 3 and v % 2 == 1),
    )
    _number('centre_sigma', self.centre_sigma, 'a number > 0', lambda v: v > 0)
    _flag('quantise', self.quantise)
    _number('motion_weight', self.motion_weight, 'a number >= 0', lambda v: v >= 0)
    _number('residual_weight', self.residual_weight, 'a number >= 0', lambda v: v >= 0)
    total = self.motion_weight + self.residual_weight
    if not 0 < total < math.inf:
      raise ValueError(
        f'motion_weight={self.motion_weight!r} and residual_weight={self.residual_weight!r}: '
        'allowed values are numbers >= 0, not both 0, with a finite sum'
      )
    _number('centre_prior', self.centre_prior, 'a number >= 0', lambda v: v >= 0)
    _flag('static_fallback', self.static_fallback)
    _flag('padding_fill', self.padding_fill)
    _number('static_threshold', self.static_threshold, 'a number >= 0', lambda v: v >= 0)
    _number(
      'static_rel_threshold', self.static_rel_threshold, 'a number in [0, 1]', lambda v: 0 <= v <= 1
    )
    _integer('static_frames', self.static_frames, 'an integer >= 1', lambda v: v >= 1)
    if self.gop is not None:
      _integer('gop', self.gop, 'None or an integer >= 1', lambda v: v >= 1)
    _choice('transcode', self.transcode, TRANSCODES)
    _choice('repeated_frames', self.repeated_frames, REPEATED_FRAMES)
    _choice('keyframes', self.keyframes, KEYFRAMES)
    _integer('max_zeroed', self.max_zeroed, 'an integer >= 0', lambda v: v >= 0)
    _integer('crf', self.crf, 'an integer in [0, 51]', lambda v: 0 <= v <= 51)
    if self.analysis_size is not None:
      _integer('analysis_size', self.analysis_size, 'None or an integer >= 16', lambda v: v >= 16)
    _flag('allow_truncated', self.allow_truncated)


def _choice(name: str, value, allowed: tuple):
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(
      f'option {name}={value!r}: allowed values are {", ".join(repr(a) for a in allowed)}'
    )


def _number(name: str, value, allowed: str, ok):
  real = not isinstance(value, bool) and isinstance(value, numbers.Real)
  if not real or not math.isfinite(value) or not ok(value):
    raise ValueError(f'option {name}={value!r}: allowed values are {allowed} (finite)')


def _integer(name: str, value, allowed: str, ok):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not ok(value):
    raise ValueError(f'option {name}={value!r}: allowed values are {allowed}')


def _flag(name: str, value):
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f'option {name}={value!r}: allowed values are True, False')
