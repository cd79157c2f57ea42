"""Codec patch selection (docs/spec.md §2): which patches of a clip carry motion and prediction
residual.

Contract:

  from data_pipeline import codec
  sel = codec.select(video, num_frames=64, budget=2048, resolution=224, patch_size=14,
                     preset=None, decode_thread=None, **options)  # video: path or bytes
  sel.frame_ids      int32 [T]     source frames of the T timeline positions
  sel.positions      int32 [K, 3]  (t, h, w) of the K = budget selected patches, sorted
  sel.picture_types  uint8 [T]     codes into records.PICTURE_TYPES ('?', 'I', 'P', 'B')
  sel.scores         float32 [T, Hp, Wp]
  sel.record_fields()              the clip-record fields of data_pipeline.records

`preset` ('release_train', 'release_probe', 'release_llava') starts from the values of that
release pipeline (`release.PRESETS`); explicit options win. `geometry='letterbox'` puts positions
on the square canvas of a letterboxed frame (`geometry`). `transcode` ('paired', 'faithful',
'sampled') says what the libx264 transcode of a non-H.264 source re-encodes (`bitstream`).
`decode_thread` decodes on a second thread, overlapped with the analysis (the same selection in
less wall time); by default when the decoder has at least 1.5x the analysis's pixels to go
through and `select_threads()` ($OVE_SELECT_THREADS, else the usable CPUs) allows 2 threads.

Baselines with the same return type: `select_uniform_frames`, `select_random`. Options and their
allowed values: `Options` (unknown names and bad values raise ValueError). Input that cannot be
used raises `VideoError` naming the file and the reason. The same input gives the same selection
on every run and every machine (no frame threads while vectors are exported, single-threaded
x264 for the transcode, ties broken by (t, h, w)).

Modules: `bitstream` (PyAV reading, vectors), `transcode` (the in-memory libx264 re-encode),
`maps` (motion/residual maps, normalisation, fusion, camera compensation, centre prior,
model-grid scores), `release` (the release's maths and the presets), `geometry` (crop / letterbox
canvas, resampling, canvas decoding), `selection` (policies, static fallback, top-K),
`baselines` (uniform frames, random patches), `options`.
"""

from data_pipeline.codec.baselines import select_random, select_uniform_frames
from data_pipeline.codec.bitstream import select_threads
from data_pipeline.codec.geometry import GEOMETRIES, decode_canvas
from data_pipeline.codec.options import (
  CAMERA_COMPENSATIONS,
  DEFAULT_GOP,
  FUSIONS,
  POLICIES,
  TRANSCODES,
  Options,
)
from data_pipeline.codec.release import PRESETS
from data_pipeline.codec.selection import Selection, select
from data_pipeline.video import VideoError

__all__ = [
  'select',
  'select_uniform_frames',
  'select_random',
  'select_threads',
  'Selection',
  'Options',
  'VideoError',
  'POLICIES',
  'FUSIONS',
  'CAMERA_COMPENSATIONS',
  'DEFAULT_GOP',
  'PRESETS',
  'GEOMETRIES',
  'TRANSCODES',
  'decode_canvas',
]
