r"""Stage 2 of the release: image + OCR + video heads on the large encoder (docs/spec.md §3, §5).

The release's values: the large encoder, started from stage 1; three heads with their own class
centres: image (2,000,000 classes, 10 labels, 448 = 32 x 32 = 1024 tokens, random-resized crop,
flip 0.5), OCR (365,187 word classes, 100 labels cyclically padded, 448, centre crop, no flip) and
video (400,000 classes, 10 labels; per clip one of codec K = 2048 patches / 8 uniform frames x 256
patches / an 8-frame collage, drawn 50% / 37.5% / 12.5%; 2048 tokens per row); loss weights 1, 1,
1; 128 GPUs with per-GPU batches 16 / 8 / 16 (image / OCR / video) and gradient accumulation 4,
i.e. a global batch of 20,480 samples; AdamW (0.9, 0.999, 1e-8), lr 5e-5 (the paper: 1e-4),
weight decay 0.05, warmup 1e-4 of the steps then linear decay, clipping at 5 per parameter group,
bf16 compute. The release trained on 320M to 4B samples.

Ours, not the release's: rows per head = per-GPU batch x `gpus` (image 2048, OCR 1024, video 2048
at gpus=128), accumulate = batch / (40 x gpus) so the global batch stays 20,480 on any GPU count
that divides it; total_steps = samples / batch (default samples=4e9: 195,312 steps, warmup 20);
mesh data x fsdp=8 with full rematerialisation; 1024 sampling blocks (a multiple of the device
count; fine up to 1024 devices); uint8 patches normalised on the device.

Data: the sources below are placeholders. Point them at your precomputed records: the video
head's codec selections with `ove-precompute-codec` (docs/codec.md), the image and OCR heads'
images with `ove-precompute-images` (docs/images.md), e.g.
  ove-precompute-images '/data/laion-wds/{00000..01999}.tar' /data/laion --name laion
  ove-precompute-images '/data/ocr/*.parquet' /data/ocr --name ocr --label-column word_ids
and cluster labels from a teacher where the images have none (docs/labels_and_probes.md). Records
whose video `source` is a relative path are joined to data.heads.video.video_root for the uniform
and collage modes:
  --config.data.heads.image.source='/data/laion-*.array_record' \
  --config.data.heads.ocr.source='/data/ocr-*.array_record' \
  --config.data.heads.video.source='/data/video-codec-*.array_record'

Single host (its local GPUs; gpus= is the device count the batch is sized for):
  ove-train --config=stage2_video:gpus=8,init=/ckpt/stage1 \
      --workdir=/ckpt/stage2 --config.data.heads.image.source=... (and ocr, video)
Multi-host, one process per host (16 hosts x 8 GPUs = the release's 128 GPUs):
  OVE_COORDINATOR_ADDRESS=host0:12355 OVE_NUM_PROCESSES=16 OVE_PROCESS_ID=<0..15> \
  ove-train --config=stage2_video:init=/ckpt/stage1 \
      --workdir=/ckpt/stage2
  # or under SLURM:
  srun --nodes=16 --ntasks-per-node=1 ove-train \
      --config=stage2_video:init=/ckpt/stage1 --workdir=/ckpt/stage2
The paper's learning rate: add `paper` (lr 1e-4). Keep the heads of a stage-2 checkpoint
(init=<stage-2 workdir>,heads=keep); a stage-1 run has no OCR or video head, so from stage 1
the heads start fresh (the default).
On this CPU (3 steps of every head and video mode on the built-in data, about a minute), and as
2 hosts x 4 devices:
  ove-train --config=stage2_video:smoke --workdir=/tmp/stage2_smoke
  python tools/launch_local.py --processes=2 --devices_per_process=4 -- \
      ove-train --config=stage2_video:smoke \
      --workdir=/tmp/stage2_smoke_2x4

The release's single-node stage 2 (`release_single_node,si=DIR`, DIR the release's
`onevision-encoder-large-si` folder): the encoder from DIR (init.pytorch) and the image and video
heads only, with the release's values of shells/ov_encoder_large_stage2_residual_8gpus.sh
(EvolvingLMMs-Lab/OneVision-Encoder): 8 GPUs, per-GPU batches 8 (image, 448 px) and 8 (video,
8 frames of 224 px, 2048 patches), backward_passes_per_step 4 (a global batch of 512), lr 5e-5,
warmup_ratio 0.001, sample rates 0.1 / 0.1, num_sampled_data 1.28e9 (2,500,000 steps of 512);
the video modes are training/train.py's defaults residual_ratio 0.4 / frame_sampling_ratio 0.4
as its integer split of a per-GPU batch of 8 makes them (n1 = int(8 x 0.4) = 3 codec, 3
uniform-frame, 2 collage clips: 0.375 / 0.375 / 0.25); image head 2,000,000 classes with 10
labels (dataset/dataset_onevision_encoder.py, onevision_encoder_si_cfs_single_node), video
400,000. The image head starts from the release's centres, DIR/ov_encoder_si_8gpus/
ov_encoder_si_%03d.npy (`--list_init_partial_fc_paths`; config key init.release_centres), the
video head fresh (docs/kmeans_and_release_heads.md). gpus, batch, samples and init do not apply:
  ove-train --config=stage2_video:release_single_node,si=/ckpt/onevision-encoder-large-si \
      --workdir=/ckpt/stage2_single_node --config.data.heads.image.source=... (and video)

Arguments: smoke, paper, release_single_node, si=DIR, gpus=N, fsdp=N (mesh.fsdp), batch=N
(global samples per step), samples=X (samples seen in all), steps=N (total_steps directly),
blocks=N (loss.sampling_blocks), init=PATH (an earlier stage's workdir or step folder),
heads=fresh|keep, workers=N (input worker processes per head and host), data_root=PATH (smoke:
the built-in data's folder).
"""

from ove_jax import config as config_lib

PER_GPU = {'image': 16, 'ocr': 8, 'video': 16}  # the release's per-GPU batches
CLASSES = {'image': 2_000_000, 'ocr': 365_187, 'video': 400_000}
# No finished step in this long: stacks of every thread, exit 70 (ove_jax/preemption.py). It
# covers the restore and the first step's compilation at this size.
WATCHDOG_SECONDS = 1800.0
# The release's single-node stage 2 (shells/ov_encoder_large_stage2_residual_8gpus.sh).
RELEASE_PER_GPU = {'image': 8, 'video': 8}
RELEASE_CENTRES = '%s/ov_encoder_si_8gpus/ov_encoder_si_%%03d.npy'  # % si, then % rank
# get_config's arguments (the module docstring says what each does), with their defaults: the
# variants, the run's size, where it starts, the input.
ARGS = dict(smoke=False, paper=False, release_single_node=False, si='')
ARGS.update(gpus=128, fsdp=8, batch=20_480, samples=4e9, steps=0, blocks=1024)
ARGS.update(init='', heads='fresh', workers=8, data_root='')
# The placeholder sources of the heads (the module docstring: point them at your records).
SOURCES = {
  'image': '/data/laion-*.array_record',
  'ocr': '/data/ocr-*.array_record',
  'video': '/data/video-codec-*.array_record',
}


def get_config(arg=None):
  return build(config_lib.parse_arg(arg, **ARGS), preset='large')


def build(a, *, preset: str):
  """The stage-2 config for parsed arguments `a` (ARGS) on the encoder `preset`."""
  per_step = sum(PER_GPU.values()) * a.gpus
  if a.batch % per_step:
    raise config_lib.ConfigError(
      f'argument batch={a.batch} is not a multiple of the {per_step} samples of one '
      f'micro-batch ({" + ".join(map(str, PER_GPU.values()))} per GPU x gpus={a.gpus})'
    )
  c = config_lib.defaults()
  c.model.update(dict(preset=preset, dtype='bfloat16', remat='full'))
  c.init.checkpoint, c.init.heads = a.init, a.heads
  # The release's AdamW: warmup over 1e-4 of the steps, then linear decay to 0; clipping at 5.
  c.optim.update(lr=1e-4 if a.paper else 5e-5, warmup=1e-4, decay='linear', end_lr_fraction=0.0)
  c.optim.update(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, clip_norm=5.0)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, a.fsdp, 1
  c.accumulate = a.batch // per_step
  c.total_steps = a.steps or max(1, round(a.samples / a.batch))
  c.log_every, c.checkpoint_every, c.keep_checkpoints, c.keep_every = 20, 1000, 3, 20_000
  c.loss.sampling_blocks = a.blocks
  c.data.worker_count = a.workers
  c.watchdog_seconds = WATCHDOG_SECONDS
  c.data.patch_dtype = 'uint8'
  c.data.mixing = 'all'
  for name, classes in CLASSES.items():
    c.heads[name] = config_lib.head(classes)
  for name, n in PER_GPU.items():  # one sample per row in every head
    c.data.heads[name] = dict(kind=name, source=SOURCES[name], rows=n * a.gpus, max_segments=1)
  # Images and words at 448 (32 x 32 = 1024 tokens); clips in the video modes codec / uniform /
  # collage, 8 frames in the uniform and collage modes.
  c.data.heads.image.update(
    tokens_per_row=1024, num_labels=10, resolution=448, crop='random_resized', flip_prob=0.5
  )
  c.data.heads.ocr.update(
    tokens_per_row=1024, num_labels=100, resolution=448, crop='centre', flip_prob=0.0
  )
  c.data.heads.video.update(
    tokens_per_row=2048, num_labels=10, num_frames=8, video_root='', geometry='crop'
  )
  c.data.heads.video.video_modes = (0.5, 0.375, 0.125)
  if a.release_single_node:
    release_single_node(c, a, preset)
  if a.smoke:
    smoke(c, a)
  return c


def release_single_node(c, a, preset: str):
  """The release's 8-GPU stage 2 from its `-si` checkpoint (the module docstring cites it)."""
  if preset != 'large' or not a.si:
    raise config_lib.ConfigError(
      "argument release_single_node needs si=DIR (the release's onevision-encoder-large-si "
      f"folder) and the large encoder (this experiment's preset is {preset!r})"
    )
  gpus, accumulate = 8, 4
  c.init.pytorch, c.init.checkpoint, c.init.heads = a.si, '', 'fresh'
  c.init.release_centres = f'image={RELEASE_CENTRES % a.si}'
  c.optim.update(dict(lr=5e-5, warmup=1e-3))
  c.accumulate = accumulate
  c.total_steps = a.steps or round(1.28e9 / (sum(RELEASE_PER_GPU.values()) * gpus * accumulate))
  del c.heads['ocr']
  del c.data.heads['ocr']
  c.data.heads.image.rows = RELEASE_PER_GPU['image'] * gpus
  c.data.heads.video.update(
    dict(rows=RELEASE_PER_GPU['video'] * gpus, video_modes=(0.375, 0.375, 0.25))
  )


def smoke(c, a):
  """Every head and video mode at toy sizes on the built-in data: 112-pixel images (64 tokens),
  2-frame uniform / collage clips and 512-patch codec selections, 2 accumulated micro-batches."""
  config_lib.cpu_smoke(c, data_root=a.data_root, steps=a.steps or 3)
  c.accumulate = 2
  for name in CLASSES:
    c.heads[name] = config_lib.head(64)  # built-in labels: images 0..28, videos 0..52
  for name in ('image', 'ocr'):
    c.data.heads[name].update(
      dict(source='{builtin:image}', rows=8, tokens_per_row=64, num_labels=3, resolution=112)
    )
  c.data.heads.video.update(
    dict(source='{builtin:video}', rows=8, tokens_per_row=512, num_labels=3, num_frames=2)
  )
