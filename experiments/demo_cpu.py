r"""The CPU demo: the tiny encoder pretrained on built-in synthetic clips and images.

Generates its data on first use (synthetic H.264 clips labelled by object shape and motion,
codec-selected at K=512 patches; images labelled by shape and texture), then trains the video and
image heads together on 8 virtual CPU devices (data 4 x fsdp 2). A few minutes on 2 cores.

  python -m ove_jax.train --config=experiments/demo_cpu.py --workdir=/tmp/ove_demo_cpu
  python -m ove_jax.train --config=experiments/demo_cpu.py:smoke --workdir=/tmp/ove_smoke
  # two processes x 4 devices, as two hosts would run it:
  python tools/launch_local.py --processes=2 --devices_per_process=4 -- \
      python -m ove_jax.train --config=experiments/demo_cpu.py:smoke,workers=0 \
      --workdir=/tmp/ove_smoke_2x4

Arguments: smoke (20 steps on 8 clips), steps=N, workers=N (input worker processes per head),
data_root=PATH (where the built-in data lives; default <workdir>/builtin_data).
"""
from ove_jax import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, smoke=False, steps=0, workers=1, data_root='')
  c = config_lib.defaults()
  c.total_steps = a.steps or (20 if a.smoke else 300)
  c.log_every = 2 if a.smoke else 10
  c.checkpoint_every = 5 if a.smoke else 50
  c.eval_every = 0 if a.smoke else 100
  c.cpu_devices = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 2, 1

  c.model.preset = 'tiny'
  c.model.dtype = 'float32'

  c.builtin.enabled = True
  c.builtin.root = a.data_root
  c.builtin.clips = 8 if a.smoke else 48
  c.builtin.images = 16 if a.smoke else 96
  c.builtin.budget = 512

  # Labels per sample: 3 (fine class, shape, direction/texture); every class scored (the sets are
  # tiny, and a quota below the batch's positives would drop targets).
  c.loss.sampling_blocks = 8
  c.loss.sample_rate = 1.0
  c.loss.num_slots = 3
  c.heads.video = config_lib.head(53)
  c.heads.image = config_lib.head(29)

  c.optim.lr = 2e-3
  c.optim.warmup = 0.1
  c.optim.weight_decay = 0.05

  c.data.worker_count = a.workers
  c.data.patch_dtype = 'uint8'   # 4x less to move between processes; normalised on the device
  c.data.heads.video = dict(kind='video', source='{builtin:video}', rows=8, tokens_per_row=512,
                            max_segments=1, num_labels=3, video_modes=(1.0, 0.0, 0.0))
  c.data.heads.image = dict(kind='image', source='{builtin:image}', rows=8, tokens_per_row=256,
                            max_segments=1, num_labels=3, resolution=224)
  return c
