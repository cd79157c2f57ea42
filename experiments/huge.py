r"""The huge encoder (width 1280, 32 layers, ~650M parameters) on the stage-2 data, large meshes.

Not a release run: the release trained base (stage 1) and large (stage 2) only. This is
experiments/stage2_video.py (the same heads, data, per-GPU batches 16 / 8 / 16, global batch
20,480, optimiser; see its docstring for which values are the release's) with the huge preset,
sized by default for 256 GPUs: mesh fsdp=16 and accumulate = 20,480 / (40 x 256) = 2. Every
argument of stage2_video.py applies; only the defaults of gpus and fsdp differ.

Data: the sources are placeholders, as in stage2_video.py:
  --config.data.heads.image.source=... --config.data.heads.ocr.source=...
  --config.data.heads.video.source=...

Multi-host, one process per host (32 hosts x 8 GPUs):
  OVE_COORDINATOR_ADDRESS=host0:12355 OVE_NUM_PROCESSES=32 OVE_PROCESS_ID=<0..31> \
  ove-train --config=huge --workdir=/ckpt/huge
  # or under SLURM:
  srun --nodes=32 --ntasks-per-node=1 ove-train \
      --config=huge --workdir=/ckpt/huge
  # 512 GPUs: the global batch stays 20,480 (accumulate 1)
  srun --nodes=64 --ntasks-per-node=1 ove-train \
      --config=huge:gpus=512,fsdp=32 --workdir=/ckpt/huge
Single host (8 GPUs; accumulate 64, slow, for checking memory before a large run):
  ove-train --config=huge:gpus=8,fsdp=8 --workdir=/tmp/huge
On this CPU (huge's own shape at width 128: the huge_smoke preset, 4 scanned blocks of 2 heads of
64, MLP 4x; bf16, remat full, an fsdp-heavy mesh data 2 x fsdp 4, Partial FC sampling 10% of
4096 classes a head; every head and video mode on the built-in data, 3 steps of 2 accumulated
micro-batches), and as 2 hosts x 4 devices:
  ove-train --config=huge:smoke --workdir=/tmp/huge_smoke
  python tools/launch_local.py --processes=2 --devices_per_process=4 -- \
      ove-train --config=huge:smoke \
      --workdir=/tmp/huge_smoke_2x4

Arguments: those of experiments/stage2_video.py, with gpus=256 and fsdp=16 by default.
"""

import os

from ove_jax import config as config_lib

stage2 = config_lib.load_module(
  os.path.join(os.path.dirname(os.path.abspath(__file__)), 'stage2_video.py')
)


SMOKE_CLASSES = 4096  # per head: 8 sampling blocks of 512 classes, 51 sampled from each


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **{**stage2.ARGS, 'gpus': 256, 'fsdp': 16})
  c = stage2.build(a, preset='huge')
  if a.smoke:
    smoke(c)
  return c


def smoke(c):
  """stage2_video's smoke (its heads, data and sizes of rows) made to check something of huge:
  huge's shape ratios at width 128 (preset huge_smoke), scanned; huge's bf16 and full remat;
  a mesh sharded more by fsdp than by data (huge: 16 x 16 at 256 GPUs, stage 2: 16 x 8); the
  release's Partial FC sample rate (0.1) over class counts large enough to sample from. The
  built-in samples have 3 labels, so 3 label slots stay."""
  c.model.update(dict(preset='huge_smoke', dtype='bfloat16', remat='full', scan_layers=True))
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 4, 1
  c.loss.sample_rate = config_lib.defaults().loss.sample_rate
  for name in stage2.CLASSES:
    c.heads[name] = config_lib.head(SMOKE_CLASSES)
