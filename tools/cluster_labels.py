"""Cluster labels (docs/spec.md §3): k-means over teacher features, each sample's nearest centres.

  # features you computed (an [N, D] array, or [N, F, D] per-frame features of videos)
  ove-cluster-labels --features feats.npy --k 400000 --out /data/labels_video
  # an ove_jax encoder as the teacher, run over precomputed records; relabelled copies of the
  # records are written to OUT/records/
  ove-cluster-labels --teacher /ckpt/ove_hf --records '/data/codec/ove_codec-*' \
      --k 2000 --out /data/labels
  # a transformers vision model as the teacher (a directory or a hub id; CUDA when torch sees
  # one); its features are written in shards to OUT/features/ and reused by a re-run
  ove-cluster-labels --teacher hf:openai/clip-vit-base-patch16 --records /data/codec \
      --k 2000 --batch 64 --out /data/labels --backend faiss
  # the sharded JAX k-means on 8 virtual CPU devices (on TPU/GPU: --mesh over the real devices)
  ove-cluster-labels --features feats.npz --k 5000 --backend jax --devices 8 \
      --mesh 2,4,1 --out /tmp/labels

Features. `--features FILE.npy` holds [N, D] (one feature per sample) or [N, F, D] (F per-frame
features of a video: each frame L2-normalised, the F concatenated and re-normalised, as the
paper does with 8 MetaCLIP frames); a `.npz` holds `features` and optionally `ids`. Or
`--teacher DIR`: an ove_jax encoder (a release-format Hugging Face directory, a training
workdir or one of its step folders) run on the records of `--records GLOB`: an image record
gives one feature (224 centre crop); a video record gives 8 uniform frames (one per bin of its
timeline, seeded per record), each encoded alone on the 16 x 16 grid at t = 0, pooled, and
combined as above. Or `--teacher hf:DIR_OR_HUB_ID`: a transformers vision model (CLIP, SigLIP,
MetaCLIP: a vision tower or a two-tower model; hub ids from the Hugging Face cache, offline with
HF_HUB_OFFLINE=1) on the same frames at its own input size: its pooled image embedding
(`image_embeds` / `get_image_features` with a projection, else `pooler_output`), prepared by the
directory's image processor when it has one, else CLIP mean / std. Its features are written to
OUT/features/ (features-SSSSS.npy and ids-SSSSS.npy per --shard-records records); a re-run reads
the shards already there and computes only the missing ones (and, with a note naming it, any
shard whose files are damaged or short).

Records. `--records` is a precompute output folder whose shards are all finished (a partial one
is refused, naming the unfinished shards), or a glob of shards (`'OUT/records/*.array_record*'`
for relabelled copies, or the finished shards of a partial folder).

Clustering. k-means with `--backend sklearn` (scikit-learn, Lloyd, one init), `--backend jax`
(`ove_jax.kmeans`: centres sharded over the mesh, points in chunks) or `--backend faiss`
(spherical faiss k-means, GPU faiss where installed; runs --iters updates, no --tol); `auto`
(the default) is sklearn when k * N is small, else jax. `--init k-means++` (the default) seeds
up to 5000 centres (`ove_jax.kmeans.PLUSPLUS_MAX_K`; from a sample of 20,000 points); for more
centres, as the release's 400k / 2M, it starts from k distinct random points, says so in a note
and in report.json (`init`). Features are L2-normalised first and the JAX and faiss k-means are
spherical (cosine), as the labels are by cosine; scikit-learn runs Euclidean k-means on the
normalised features.

Every flag, --init's file, --records and --out are checked before features are read or a
teacher runs; bad input exits with status 2 and a message naming the flag or file.

Outputs in `--out`: labels.npy int32 [N, n] (the n = 10 nearest centres by cosine, nearest
first), centres.npy float32 [k, D], report.json (printed too): k, N, init, inertia, iterations,
empty clusters, cluster sizes (min / median / max and a histogram). With `--records`, OUT/records/
holds a copy of every input shard (same file names, records format) with `labels` replaced.
The work is done by `ove_jax.labels`; this command parses flags and prints the report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from data_pipeline import paths
from ove_jax import cli, hf_teacher
from ove_jax import labels as labels_lib


def build_parser() -> argparse.ArgumentParser:
  p = cli.doc_parser('ove-cluster-labels', __doc__)
  src = p.add_argument_group('features (one of)')
  src.add_argument(
    '--features', help='.npy [N, D] or [N, F, D], or .npz with `features` (and optionally `ids`)'
  )
  src.add_argument(
    '--teacher',
    help='ove_jax encoder: release-format HF dir, training workdir '
    f'or step folder; or {hf_teacher.HF_PREFIX}DIR_OR_HUB_ID: a transformers '
    'vision model',
  )
  p.add_argument(
    '--records',
    help='precompute output folder (all shards finished), or glob of record shards: the '
    "teacher's input, and/or records to write relabelled copies of (one per "
    'feature row, in sorted shard order)',
  )
  p.add_argument('--step', type=int, help='checkpoint step of a training workdir (default latest)')
  p.add_argument('--batch', type=int, default=32, help='frames per teacher forward')
  p.add_argument(
    '--shard-records',
    type=int,
    default=hf_teacher.SHARD_RECORDS,
    help='records per feature shard of a transformers (hf:) teacher',
  )
  p.add_argument('--k', type=int, required=True, help='number of centres')
  p.add_argument(
    '--num-labels', type=int, default=labels_lib.NUM_LABELS, help='nearest centres per sample'
  )
  p.add_argument(
    '--backend',
    choices=labels_lib.BACKENDS,
    default='auto',
    help=f'k-means engine; auto: sklearn when k * N <= {labels_lib.SKLEARN_MAX_WORK}, else jax',
  )
  p.add_argument(
    '--init',
    default='k-means++',
    help='"k-means++" (random points above 5000 centres), "random", or a .npy of [k, D] '
    'initial centres',
  )
  p.add_argument('--iters', type=int, default=100, help='at most this many Lloyd iterations')
  p.add_argument(
    '--tol',
    type=float,
    default=1e-4,
    help='stop when the squared centre shift is <= tol x the mean feature variance',
  )
  p.add_argument('--seed', type=int, default=0, help='k-means initialisation and video frames')
  p.add_argument('--chunk', type=int, help='points scored at once by the JAX k-means')
  p.add_argument(
    '--mesh', help='data,fsdp,tensor sizes of the JAX mesh (default: all devices on data)'
  )
  p.add_argument('--devices', type=int, help='virtual CPU devices to start JAX with')
  p.add_argument('--out', required=True, help='output folder')
  return p


def load_teacher(path: str, step: int | None = None):
  """The encoder of --teacher (`checkpoint.load_encoder`, errors naming the flag)."""
  from ove_jax import checkpoint, cli

  try:
    return checkpoint.load_encoder(path, step=step).model
  except (OSError, ValueError, KeyError) as e:
    raise labels_lib.LabelsError(cli.about('--teacher', path, e)) from None


def run(args) -> dict:
  """The labels of the parsed command line; returns the report. Every flag, --init's file,
  --records and --out are checked before features are read or a teacher runs."""
  if bool(args.features) == bool(args.teacher):
    raise labels_lib.LabelsError('give exactly one of --features FILE and --teacher DIR')
  if args.teacher and not args.records:
    raise labels_lib.LabelsError('--teacher needs --records GLOB (the records to encode)')
  start = time.perf_counter()
  settings = cli.keywords(args, 'k', 'num_labels', 'backend', 'init', 'iters', 'tol', 'chunk')
  settings['init'] = labels_lib.check_settings(**settings)
  # The centres of an --init file are read once; later checks (N, D) name the file.
  about = {'init_about': f'--init {args.init}'}
  for flag, value in (('--batch', args.batch), ('--shard-records', args.shard_records)):
    if value < 1:
      raise labels_lib.LabelsError(f'{flag} {value}: must be >= 1')
  if args.devices:
    from ove_jax import distributed

    try:
      distributed.use_cpu_devices(args.devices)
    except RuntimeError as e:
      raise labels_lib.LabelsError(f'--devices {args.devices}: {e}') from None
  the_mesh = mesh(args.mesh)
  shards = labels_lib.record_shards(args.records) if args.records else []
  labels_lib.check_out(args.out, shards)
  shard_records = labels_lib.read_shards(shards)
  recs = [r for rs in shard_records for r in rs]
  ids, source = None, f'--records {args.records}'
  if args.features:
    x, ids = labels_lib.load_features(args.features)
    source = f'--features {args.features}'
    labels_lib.check_settings(**settings, **about, n=len(x), d=x.shape[1], source=source)
    if args.records and len(recs) != len(x):
      raise labels_lib.LabelsError(
        f'--records {args.records}: {len(recs)} records but {len(x)} '
        f'feature rows in --features {args.features}'
      )
  elif args.teacher.startswith(hf_teacher.HF_PREFIX):
    labels_lib.check_settings(**settings, **about, n=len(recs), source=source)
    teacher = hf_teacher.HFTeacher(args.teacher[len(hf_teacher.HF_PREFIX) :])
    # The resumable feature cache is local files: for an --out URL, in its local folder.
    x, ids = hf_teacher.sharded_teacher_features(
      teacher,
      recs,
      paths.local_folder(paths.join(args.out, 'features')),
      batch=args.batch,
      seed=args.seed,
      shard_records=args.shard_records,
      about=args.teacher,
    )
  else:
    labels_lib.check_settings(**settings, **about, n=len(recs), source=source)
    model = load_teacher(args.teacher, args.step)
    # Its features are not kept, so --init's width is checked before they are computed.
    d = labels_lib.frames_per_record(recs) * model.cfg.width
    labels_lib.check_settings(**settings, **about, d=d)
    x = labels_lib.teacher_features(model, recs, args.batch, args.seed)
  where = dict(ids=ids, shards=shards, shard_records=shard_records, source=source)
  return labels_lib.make_labels(
    x, args.out, mesh=the_mesh, start=start, seed=args.seed, **where, **settings
  )


def mesh(text: str | None):
  """The --mesh sizes as a mesh over JAX's devices (None: all devices on data)."""
  if not text:
    return None
  import jax

  from ove_jax import sharding

  try:
    return sharding.make_mesh(sharding.parse_mesh(text))
  except ValueError as e:
    raise labels_lib.LabelsError(
      f'--mesh {text}: {e} (JAX has {jax.device_count()} devices; set --devices on CPU)'
    ) from None


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    report = run(args)
  except labels_lib.LabelsError as e:
    print(f'ove-cluster-labels: error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(report, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
