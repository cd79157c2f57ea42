r"""Stage 1 of the release: cluster discrimination on images alone, at 224 (docs/spec.md §3, §5).

The release's values: the base encoder (the paper: large), one image head of 2,000,000 cluster
centres with 10 labels per image, random-resized crop (area 0.7-1.0, aspect 0.8-1.25) and flip
0.5 at 224 (one image = 16 x 16 = 256 tokens, one image per row), AdamW (0.9, 0.999, eps 1e-8)
with lr 1e-3, weight decay 0.05 (the paper: 0.2), 10% linear warmup then linear decay, clipping at
norm 5 per parameter group, bf16 compute with fp32 master weights, per-GPU batch 128 on 8+ GPUs,
13B samples seen.

Ours, not the release's: `batch` is the GLOBAL number of images per step (default 1024 = 128 per
GPU x 8 GPUs; set batch=128*GPUS to keep the release's per-GPU batch), total_steps =
samples / batch (13e9 / 1024 = 12,695,312 steps), 1024 sampling blocks (a multiple of the device
count; fine up to 1024 devices), uint8 patches normalised on the device, and the logging and
checkpoint cadence.

Data: the source below is a placeholder. Point it at your precomputed records (images with their
10 nearest-centre labels, data_pipeline.records format). Make them from a webdataset tar set, a
folder or parquet files (docs/images.md), then label unlabelled images with a teacher
(docs/labels_and_probes.md):
  ove-precompute-images '/data/laion-wds/{00000..01999}.tar' /data/laion --name laion
  ove-cluster-labels --teacher hf:facebook/metaclip-h14-fullcc2.5b \
      --records '/data/laion/laion-*.array_record*' --k 2000000 --backend faiss --out /data/labels
  --config.data.heads.image.source='/data/labels/records/laion-*.array_record*'

Single host (all local GPUs):
  ove-train --config=stage1_image:batch=1024 \
      --workdir=/ckpt/stage1 --config.data.heads.image.source='/data/laion-*.array_record'
Multi-host, one process per host (every host runs the same command):
  OVE_COORDINATOR_ADDRESS=host0:12355 OVE_NUM_PROCESSES=4 OVE_PROCESS_ID=<0..3> \
  ove-train --config=stage1_image:batch=4096 --workdir=/ckpt/stage1
  # or under SLURM (one task per node; the coordinator is the first node of the step):
  srun --nodes=4 --ntasks-per-node=1 ove-train \
      --config=stage1_image:batch=4096 --workdir=/ckpt/stage1
The paper's variant (large encoder, weight decay 0.2):
  ove-train --config=stage1_image:paper,batch=1024 --workdir=...
On this CPU (a few steps on the built-in images, about a minute), and as 2 hosts x 4 devices:
  ove-train --config=stage1_image:smoke --workdir=/tmp/stage1_smoke
  python tools/launch_local.py --processes=2 --devices_per_process=4 -- \
      ove-train --config=stage1_image:smoke \
      --workdir=/tmp/stage1_smoke_2x4

Arguments: smoke, paper, batch=N (global images per step), samples=X (images seen in all;
total_steps = samples / batch), steps=N (total_steps directly), blocks=N (loss.sampling_blocks),
workers=N (input worker processes per host), data_root=PATH (smoke: the built-in data's folder).
"""

from ove_jax import config as config_lib

RELEASE = dict(preset='base', lr=1e-3, weight_decay=0.05, samples=13e9)
PAPER = dict(preset='large', weight_decay=0.2)
IMAGE_CLASSES = 2_000_000
# No finished step in this long: stacks of every thread, exit 70 (ove_jax/preemption.py). It
# covers the restore and the first step's compilation at this size.
WATCHDOG_SECONDS = 1800.0
# get_config's arguments (the module docstring says what each does), with their defaults.
ARGS = dict(smoke=False, paper=False, batch=1024, samples=RELEASE['samples'], steps=0)
ARGS.update(blocks=1024, workers=8, data_root='')


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **ARGS)
  c = config_lib.defaults()
  c.model.preset = PAPER['preset'] if a.paper else RELEASE['preset']
  c.model.dtype = 'bfloat16'
  # The release's AdamW: 10% linear warmup, then linear decay to 0; clipping at norm 5.
  c.optim.update(lr=RELEASE['lr'], warmup=0.1, decay='linear', end_lr_fraction=0.0)
  c.optim.update(b1=0.9, b2=0.999, eps=1e-8, clip_norm=5.0)
  c.optim.weight_decay = PAPER['weight_decay'] if a.paper else RELEASE['weight_decay']
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  c.loss.sampling_blocks = a.blocks
  c.total_steps = a.steps or max(1, round(a.samples / a.batch))
  c.log_every, c.checkpoint_every, c.keep_checkpoints, c.keep_every = 100, 5000, 3, 100_000
  c.data.worker_count = a.workers
  c.watchdog_seconds = WATCHDOG_SECONDS
  c.data.patch_dtype = 'uint8'
  c.heads.image = config_lib.head(IMAGE_CLASSES)
  # One image per row at 224 (16 x 16 = 256 tokens); the source is a placeholder (see above).
  c.data.heads.image = dict(kind='image', source='/data/laion-*.array_record', rows=a.batch)
  c.data.heads.image.update(tokens_per_row=256, max_segments=1, num_labels=10, resolution=224)
  c.data.heads.image.update(crop='random_resized', flip_prob=0.5)
  if a.smoke:
    config_lib.cpu_smoke(c, data_root=a.data_root, steps=a.steps or 3)
    c.heads.image = config_lib.head(64)  # built-in labels are 0..28
    c.data.heads.image.update(dict(source='{builtin:image}', rows=8, num_labels=3))
  return c
