"""Convert encoder checkpoints between ove_jax and the released PyTorch / Hugging Face format.

  # a fresh preset (random init, docs/spec.md §1.2) -> release-format directory
  python tools/convert_checkpoint.py to-hf --preset large --out /tmp/ove_large_hf
  # an ove_jax parameter directory -> release format, stored in bfloat16
  python tools/convert_checkpoint.py to-hf --params /tmp/ove_params --out /tmp/hf --dtype bfloat16
  # a training run's encoder (latest checkpoint, or --step N) -> release format
  python tools/convert_checkpoint.py from-train --workdir /ckpt/stage2 --out /tmp/hf \
      [--step 20000] [--dtype bfloat16]
  # release-format directory (e.g. the released onevision-encoder-large) -> ove_jax parameters
  python tools/convert_checkpoint.py from-hf --hf /path/to/onevision-encoder-large --out /tmp/p
  # ... or one kept in a bucket (read in place, shards one at a time; docs/storage.md)
  python tools/convert_checkpoint.py from-hf --hf gs://bucket/exports/ove-large --out /tmp/p
  # numerical check: our JAX encoder vs our PyTorch port on the same directory and inputs
  python tools/convert_checkpoint.py verify --hf /tmp/ove_large_hf

Every conversion ends with a numerical check of the written checkpoint against the source
(parameters bit-exact at the stored precision, and with `verify` both frameworks' outputs on the
same pixels). Installed as the console script `ove-convert`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import numpy as np

from ove_jax import cli


def _to_hf(args) -> int:
  from ove_jax import checkpoint
  from ove_jax.convert.hf import model_from_params
  from ove_jax.models import EncoderConfig, create_encoder

  if args.params:
    cfg, params = checkpoint.load_params(args.params)
    model = model_from_params(cfg, params)
    source = args.params
  else:
    model = create_encoder(EncoderConfig.preset(args.preset), seed=args.seed)
    source = f'preset {args.preset} (seed {args.seed})'
  return _write(model, args.out, args.dtype, source, args)


def _write(model, out: str, dtype: str, source: str, args=None, upload_to: str = '') -> int:
  """Saves `model` in the release format, then checks the written file against its parameters
  (bit-exact in float32; in bfloat16 / float16, to the stored precision); with --push-to-hub,
  uploads the checked export. An `out` in object storage (gs://, s3://) is written and checked
  in a local temporary folder, then uploaded file by file (weight files of an earlier export at
  `out` that the new one does not write are removed); a failed upload keeps that folder and names
  it (hf_modeling.PushError)."""
  from data_pipeline import paths
  from ove_jax import convert
  from ove_jax.convert import hf_modeling

  if paths.is_url(out):
    local = tempfile.mkdtemp(prefix='ove_export_')
    try:
      code = _write(model, local, dtype, source, args, upload_to=out)
      if code == 0:
        hf_modeling.upload_export(local, out)
        print(f'uploaded to {out}')
    except hf_modeling.PushError:
      raise  # its message names `local`, which is kept
    except BaseException:
      shutil.rmtree(local, ignore_errors=True)
      raise
    shutil.rmtree(local, ignore_errors=True)  # uploaded, or refused by the round-trip check
    return code

  convert.save_pytorch(
    model, out, dtype=dtype, max_shard_size=getattr(args, 'max_shard_size', None) or '5GB'
  )
  worst, count = convert.verify_export(model, out, dtype)  # tensor by tensor: no second copy
  print(f'round trip check ({dtype}): max |difference| over {count} parameters = {worst}')
  if worst != 0.0:
    print('error: the written checkpoint does not reproduce the parameters', file=sys.stderr)
    return 1
  # Made for an upload: the temporary folder is gone once the export is uploaded.
  where = f'the export for {upload_to} (checked locally)' if upload_to else out
  print(f'wrote {where} ({dtype}) from {source}')
  if getattr(args, 'push_to_hub', None):
    print(f'pushed to {hf_modeling.push_to_hub(out, args.push_to_hub, private=args.private)}')
  return 0


def _from_train(args) -> int:
  from ove_jax import checkpoint

  loaded = checkpoint.load_encoder(args.workdir, step=args.step)
  if loaded.step is None:
    raise ValueError(
      f'{args.workdir}: not a training run ({loaded.source}); from-train takes a '
      'training workdir, its checkpoints folder or one step folder'
    )
  return _write(
    loaded.model,
    args.out,
    args.dtype,
    f'{args.workdir} step {loaded.step} (the encoder; heads left out: '
    f'{", ".join(loaded.heads) or "none"})',
    args,
  )


def run_overlap(out: str, workdir: str) -> str | None:
  """Why the export folder `out` may not be written, None when it may: it is, contains or lies
  inside the training run of `workdir` (a workdir, its checkpoints folder or one step folder).
  An export into the workdir replaces the run's config.json, after which the run is refused as
  a training run and load_encoder(workdir) returns the export."""
  from data_pipeline import paths
  from ove_jax import checkpoint

  target, given = _norm(out), _norm(workdir)
  run = given  # the run's workdir, from its checkpoints folder or one of its step folders
  if paths.basename(given) == checkpoint.CHECKPOINT_DIR:
    run = paths.dirname(given)
  elif paths.basename(paths.dirname(given)) == checkpoint.CHECKPOINT_DIR:
    run = paths.dirname(paths.dirname(given))
  inside = target == run or target.startswith(run.rstrip('/') + '/')
  if inside or run.startswith(target.rstrip('/') + '/'):
    where = 'is' if target == run else 'lies inside' if inside else 'contains'
    return _nested(out, where, run, f' (--workdir {workdir})')
  return None


def run_at(out: str) -> str | None:
  """Why `out` may not be written, None when it may: it is a training run (a folder with
  config.json and checkpoints/), lies inside one (its checkpoints folder, a step folder, any
  folder below), or holds one directly. Every subcommand that writes checks its --out."""
  from data_pipeline import paths

  target = folder = _norm(out)
  while True:  # the folder itself, then each folder above it
    if _is_run(folder):
      return _nested(out, 'is' if folder == target else 'lies inside', folder)
    parent = paths.dirname(folder)
    if not parent or parent == folder:
      break
    folder = parent
  if paths.isdir(target):
    for name in paths.listdir(target):
      if _is_run(paths.join(target, name)):
        return _nested(out, 'contains', paths.join(target, name))
  return None


def _is_run(folder: str) -> bool:
  from data_pipeline import paths
  from ove_jax import checkpoint

  return paths.isdir(paths.join(folder, checkpoint.CHECKPOINT_DIR)) and paths.isfile(
    paths.join(folder, 'config.json')
  )


def _norm(path: str) -> str:
  from data_pipeline import paths

  full = paths.absolute(path)
  return full if paths.is_url(full) else os.path.realpath(full)


def _nested(out: str, where: str, run: str, note: str = '') -> str:
  from data_pipeline import paths

  suggestion = paths.join(paths.dirname(run), paths.basename(run) + '_hf')
  if paths.dirname(run) == run.rstrip('/'):  # a bucket's root: everything in it is inside
    scheme = run.split('://', 1)[0]
    suggestion = f'{scheme}://OTHER_BUCKET/{paths.basename(run)}_hf, or a local folder'
  return (
    f'--out {out} {where} the training run {run}{note}; what ove-convert writes and a run must '
    'not nest (the run would then load as what is written there, and an export replaces its '
    f'config.json); give a folder outside the run, e.g. --out {suggestion}'
  )


def push_flags_error(args) -> str | None:
  """Why --push-to-hub / --private cannot be used as given (checked before any conversion)."""
  from ove_jax.convert import hf_modeling

  repo = getattr(args, 'push_to_hub', None)
  if getattr(args, 'private', False) and not repo:
    return '--private applies to --push-to-hub only; add --push-to-hub ORG/NAME or drop --private'
  problem = repo and hf_modeling.repo_id_problem(repo)
  return f'--push-to-hub {repo}: {problem}' if problem else None


def _from_hf(args) -> int:
  from ove_jax import checkpoint, convert

  model = convert.load_pytorch(args.hf)
  params = convert.model_params(model)
  checkpoint.save_params(args.out, model.cfg, params)
  cfg, back = checkpoint.load_params(args.out)
  same = all(np.array_equal(back[k], params[k]) for k in params)
  print(f'round trip check: {len(params)} parameters {"bit-exact" if same else "DIFFER"}')
  if not same:
    return 1
  print(f'wrote ove_jax parameters to {args.out} (width {cfg.width}, depth {cfg.depth})')
  return 0


def _verify(args) -> int:
  import jax
  from flax import nnx

  from ove_jax import convert

  try:
    import torch

    from ove_jax.convert import torch_model
  except ImportError:
    print(
      'error: verify needs PyTorch: pip install "ove_jax[torch]" (torch==2.13.0)', file=sys.stderr
    )
    return 2
  model = convert.load_pytorch(args.hf)
  port = torch_model.load_pretrained(args.hf).eval()
  rng = np.random.RandomState(0)
  res = args.resolution
  cases = {
    'image': (rng.randn(1, res, res, 3), {}),
    'video, 8 frames': (rng.randn(1, 8, 224, 224, 3), {}),
    'video, 64 frames, 2048 visible patches': (
      rng.randn(1, 64, 224, 224, 3),
      {'visible_indices': np.sort(rng.choice(64 * 256, 2048, replace=False))[None]},
    ),
  }
  forward = nnx.jit(lambda m, x, **k: m.forward_pixels(x, **k))
  worst = 0.0
  for name, (x, kwargs) in cases.items():
    x = x.astype(np.float32)
    ours = jax.device_get(forward(model, x, **kwargs))
    tx = (
      torch.from_numpy(x).permute(0, 3, 1, 2)
      if x.ndim == 4
      else torch.from_numpy(x).permute(0, 4, 1, 2, 3)
    )
    with torch.no_grad():
      ref = port(tx, **{k: torch.from_numpy(v) for k, v in kwargs.items()})
    for key in ('last_hidden_state', 'pooler_output'):
      b = ref[key].numpy()
      rel = float(np.abs(ours[key] - b).max() / np.abs(b).max())
      worst = max(worst, rel)
      print(f'{name:42s} {key:18s} max relative difference {rel:.2e}')
  ok = worst <= args.tolerance
  print(
    json.dumps(
      {
        'directory': args.hf,
        'max_relative_difference': worst,
        'tolerance': args.tolerance,
        'ok': ok,
      }
    )
  )
  return 0 if ok else 1


EXPORT_DTYPES = ('float32', 'bfloat16', 'float16')  # hf.STORE_DTYPES, without importing JAX


def _export_flags(p) -> None:
  p.add_argument(
    '--dtype',
    default='float32',
    choices=EXPORT_DTYPES,
    help='the precision the weights are stored in',
  )
  p.add_argument(
    '--out',
    required=True,
    help='the release-format directory to write (a local folder or a gs:// / s3:// URL)',
  )
  p.add_argument(
    '--max-shard-size',
    default='5GB',
    help=(
      'above this, weights are written as model-0000i-of-0000n.safetensors shards '
      'with model.safetensors.index.json (bytes, or e.g. 2GB / 500MB)'
    ),
  )
  p.add_argument(
    '--push-to-hub',
    metavar='ORG/NAME',
    help=(
      'after the round-trip check, upload the export to this hub repository '
      '(needs network and HF_TOKEN or huggingface-cli login)'
    ),
  )
  p.add_argument('--private', action='store_true', help='with --push-to-hub: a private repository')


def main(argv=None) -> int:
  parser = cli.doc_parser('ove-convert', __doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  to_hf = sub.add_parser('to-hf', help='ove_jax (preset or parameters) -> release format')
  src = to_hf.add_mutually_exclusive_group(required=True)
  src.add_argument('--preset', help='tiny, small, base, large or huge, freshly initialised')
  src.add_argument('--params', help='an ove_jax parameter directory (see `from-hf`)')
  to_hf.add_argument('--seed', type=int, default=0, help='the initialisation seed of --preset')
  _export_flags(to_hf)
  from_train = sub.add_parser(
    'from-train', help="a training checkpoint's encoder -> release format"
  )
  from_train.add_argument(
    '--workdir',
    required=True,
    help="the run's workdir (ove-train --workdir=...), its checkpoints folder or one step folder",
  )
  from_train.add_argument('--step', type=int, help='the checkpoint step (default: the latest)')
  _export_flags(from_train)
  from_hf = sub.add_parser('from-hf', help='release format -> ove_jax parameters')
  from_hf.add_argument(
    '--hf',
    required=True,
    help=(
      'directory with config.json and model.safetensors (or shards), local or a '
      'gs:// / s3:// URL, or a hub id org/name[@revision]'
    ),
  )
  from_hf.add_argument('--out', required=True, help='the ove_jax parameter directory to write')
  verify = sub.add_parser('verify', help='JAX vs PyTorch port on one release-format directory')
  verify.add_argument(
    '--hf',
    required=True,
    help='the release-format directory (local or a gs:// / s3:// URL) or hub id',
  )
  verify.add_argument('--resolution', type=int, default=448, help='image side of the test input')
  verify.add_argument(
    '--tolerance', type=float, default=1e-4, help='largest relative difference accepted'
  )
  args = parser.parse_args(argv)

  from data_pipeline import paths
  from ove_jax.convert import CheckpointError, hf_modeling

  out = getattr(args, 'out', None)
  blocked = out and paths.not_a_folder(out)  # an export is a folder (config.json, weights, code)
  if blocked:
    print(f'error: --out {out}: {blocked}; give a new or existing folder', file=sys.stderr)
    return 2
  refused = run_overlap(out, args.workdir) if args.command == 'from-train' else None
  refused = refused or push_flags_error(args)
  if refused:
    print(f'error: {refused}', file=sys.stderr)
    return 2
  try:
    if out and paths.is_url(out):  # before any conversion: a bucket that is there, credentials
      hf_modeling.check_writable(out)
    refused = out and run_at(out)  # into, inside or around a training run
    if refused:
      print(f'error: {refused}', file=sys.stderr)
      return 2
    return {'to-hf': _to_hf, 'from-train': _from_train, 'from-hf': _from_hf, 'verify': _verify}[
      args.command
    ](args)
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except hf_modeling.PushError as e:  # written and checked, not uploaded
    print(f'error: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
