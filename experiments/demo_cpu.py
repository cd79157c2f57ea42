r"""The CPU demo: the tiny encoder on built-in synthetic clips and images, 8 virtual CPU devices.

Generates its data on first use (synthetic H.264 clips of one textured object moving over a
photograph, codec-selected at K=512 patches; stills of one object), then trains on 8 virtual CPU
devices (data 4 x fsdp 2). Two variants:

  default     video and image heads on the generator's ground-truth labels (clips: shape x
              direction, shape, direction; images: shape x texture, shape, texture)
  student=DIR cluster labels made by tools/cluster_labels.py, no ground truth (tools/demo.py's
              pretraining): the video head on DIR/video (records: the clips relabelled with
              their nearest centres; report.json: k) and, when DIR/image exists, the image head
              on the images of data_root with DIR/image/labels.npy

  ove-train --config=demo_cpu --workdir=/tmp/ove_demo_cpu
  ove-train --config=demo_cpu:smoke --workdir=/tmp/ove_smoke
  ove-train --config=demo_cpu:student=/tmp/labels,data_root=/tmp/d \
      --workdir=/tmp/ove_student
  # two processes x 4 devices, as two hosts would run it:
  python tools/launch_local.py --processes=2 --devices_per_process=4 -- \
      ove-train --config=demo_cpu:smoke,workers=0 \
      --workdir=/tmp/ove_smoke_2x4

The clips are fed in the release's mixed video modes (data_pipeline/transforms.py, docs/spec.md
§3): each sample is its codec-selected patches, uniform frames or the same frames as one collage
image, drawn with weights codec / uniform / collage = 0.5 / 0.375 / 0.125 (the release's large
run); the frames are budget / 256 whole 224 x 224 frames (2 at K = 512), so every mode has the
same token count.

Arguments: smoke (a few steps on 8 clips and 16 images), steps=N, workers=N (input worker
processes per head), data_root=PATH (where the built-in data lives; default
<workdir>/builtin_data), clips=N and images=N (built-in data sizes), student=DIR, codec=W,
uniform=W, collage=W (the video modes' weights; codec=1,uniform=0,collage=0 trains on codec
inputs only).
"""

import json
import os

from data_pipeline import builtin, tokens
from ove_jax import config as config_lib

# The student reads the nearest 3 of the (by default 10) centres cluster_labels writes: at this
# size, farther centres are other concepts more than neighbours of the sample's own.
STUDENT_LABELS = 3
# Weights of the video modes codec / uniform frames / collage: the release's large run's
# (data_pipeline/pipeline.py's default; docs/spec.md §3).
VIDEO_MODES = (0.5, 0.375, 0.125)
# get_config's arguments (the module docstring says what each does), with their defaults.
ARGS = dict(smoke=False, steps=0, workers=1, data_root='', clips=0, images=0, student='')
ARGS.update(codec=VIDEO_MODES[0], uniform=VIDEO_MODES[1], collage=VIDEO_MODES[2])


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **ARGS)
  modes = (a.codec, a.uniform, a.collage)
  if min(modes) < 0 or sum(modes) <= 0:
    raise config_lib.ConfigError(
      f'demo_cpu: codec={a.codec}, uniform={a.uniform}, '
      f"collage={a.collage}: the video modes' weights must be >= 0 "
      'and not all 0'
    )
  c = config_lib.defaults()
  c.total_steps = a.steps or (20 if a.smoke else 300)
  c.log_every = 2 if a.smoke else 10
  c.checkpoint_every = 5 if a.smoke else 50
  c.eval_every = 0 if a.smoke else 100
  c.cpu_devices = 8
  # A stall (a stuck input worker, a lost peer) ends the run with the stacks of every thread.
  c.watchdog_seconds = 600.0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 2, 1

  c.model.preset = 'tiny'
  c.model.dtype = 'float32'

  c.builtin.enabled = True
  c.builtin.root = a.data_root
  c.builtin.clips = a.clips or (8 if a.smoke else 256)
  c.builtin.images = a.images or (16 if a.smoke else 256)
  c.builtin.budget = 512

  # Every class scored (the sets are tiny, and a quota below the batch's positives would drop
  # targets); one slot per label read.
  c.loss.sampling_blocks = 8
  c.loss.sample_rate = 1.0
  c.loss.num_slots = 3

  c.optim.lr = 2e-3
  c.optim.warmup = 0.1
  c.optim.weight_decay = 0.05

  c.data.worker_count = a.workers
  c.data.patch_dtype = 'uint8'  # 4x less to move between processes; normalised on the device
  # 8 rows of one sample each; clips of 512 patches (or budget / 256 whole frames), images of
  # 256 tokens (224 x 224).
  video = dict(kind='video', source='{builtin:video}', rows=8, tokens_per_row=512, max_segments=1)
  video.update(num_labels=3, video_modes=modes, num_frames=c.builtin.budget // tokens.VIDEO_GRID**2)
  image = dict(kind='image', source='{builtin:image}', rows=8, tokens_per_row=256, max_segments=1)
  image.update(num_labels=builtin.IMAGE_LABELS, resolution=224)
  if not a.student:
    # The clips' first three labels (fine, shape, direction); the fourth, texture, is the probe's.
    c.heads.video = config_lib.head(builtin.VIDEO_CLASSES)
    c.data.heads.video = video
    c.heads.image = config_lib.head(builtin.IMAGE_CLASSES)
    c.data.heads.image = image
  else:
    labels = os.path.abspath(os.path.expanduser(a.student))
    c.builtin.enabled = False  # the clips come relabelled, from DIR/video/records
    c.heads.video = config_lib.head(_num_centres(os.path.join(labels, 'video'), a.student))
    c.data.heads.video = dict(
      video, source=os.path.join(labels, 'video', 'records', '*'), num_labels=STUDENT_LABELS
    )
    image_labels = os.path.join(labels, 'image')
    if os.path.isdir(image_labels):
      if not a.data_root:
        raise config_lib.ConfigError(
          f'demo_cpu:student={a.student}: {image_labels} labels images; give data_root=PATH, '
          'the built-in data folder that holds them (PATH/images)'
        )
      images = os.path.join(os.path.abspath(os.path.expanduser(a.data_root)), 'images')
      c.heads.image = config_lib.head(_num_centres(image_labels, a.student))
      c.data.heads.image = dict(
        image,
        source=f'folder:{images}?labels={os.path.join(image_labels, "labels.npy")}',
        num_labels=STUDENT_LABELS,
      )
  return c


def _num_centres(folder: str, arg: str) -> int:
  """k of a tools/cluster_labels.py output folder (its report.json)."""
  report = os.path.join(folder, 'report.json')
  try:
    with open(report, encoding='utf-8') as f:
      return int(json.load(f)['k'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise config_lib.ConfigError(
      f'demo_cpu:student={arg}: cannot read k from {report} ({e}); make the labels first, '
      'e.g. python tools/cluster_labels.py --features FEATURES.npz --records '
      f'<built-in data>/records --k K --out {folder}'
    ) from None
