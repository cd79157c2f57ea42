r"""The paper's ablations as sweeps: codec budget, patch selection, frame policy, RoPE, CosFace
margin and scale, Partial FC sample rate (docs/spec.md §1.3, §2, §4).

`get_config(arg)` is the baseline run (`study=` does not change it); `sweep(add, arg)` adds one
run per value of the study named by `study=` (tools/sweep.py expands it into run folders and
trainer commands). Two sizes:

- smoke: demo_cpu's tiny encoder on the built-in clips, the video head alone (every study is
  about the video input or the loss), 10 steps, codec selection at K = 512. A point takes 20-40 s
  on 2 CPU cores (tools/sweep.py lets runs share their built-in data and compiled programs).
- full (no `smoke`): stage2_video's setup (large encoder, image + OCR + video heads, its batch,
  optimiser and mesh; every stage2_video argument applies), the video head on codec selections
  at K = 2048 with policy 'zero' (the release's training code), 320M samples (the low end of the
  release's 320M-4B; samples= changes it). The video records of each budget and policy are a
  separate precompute (tools/precompute_codec.py --budget=K --policy=P); `video_data=` is their
  path template, with {budget} and {policy} filled in per run.

Studies (the baseline's value first in each list; the others are what the sweep adds):
  selection    codec / uniform / random at the baseline budget: the K codec patches, K / 256 whole
               frames (one per equal bin of the clip), or K patches drawn uniformly at random
               (data.heads.video.video_modes; uniform also sets num_frames). docs/spec.md §2:
               codec beats
               uniform frames at equal budgets.
  budget       K = 512, 1024, 2048, 4096 codec patches per clip (tokens per row follow K).
  policy       frame policy of the selection: paper (I-frames whole), first_frame, zero
               (smoke: builtin.policy, which remakes the built-in data; full: video_data).
  rope         model.rope: 3d (the release's 4:6:6), 1d (one flat index over the head dim), none.
  margin       loss.margin (CosFace) 0.0, 0.1, 0.3, 0.5 at scale 64.
  scale        loss.scale 16, 32, 64, 128 at margin 0.3.
  sample_rate  loss.sample_rate of Partial FC: full 0.05, 0.1, 0.2, 0.5; smoke 0.25, 0.5, 1.0
               (the ~55 built-in video classes in 8 blocks: below 0.25 a block keeps one class
               and the batch's positives overflow it).

On this CPU (each study's runs one after another, then results.csv / results.md in the root):
  ove-sweep --config=ablations:smoke,study=selection \
      --root=/tmp/sweep_sel --run
  ove-sweep --config=ablations:smoke,study=rope --root=/tmp/sweep_rope \
      --run --config.total_steps=20
One run of a study by hand (the baseline, or any point's overrides):
  ove-train --config=ablations:smoke --workdir=/tmp/abl \
      --config.model.rope=1d
Full size, as a job array for a cluster (sources as in stage2_video.py; the video one comes from
video_data, not from --config, because the budget and policy studies change it):
  ove-sweep --root=/ckpt/ablations/budget --job-array=/ckpt/budget.jobs \
      --config='ablations:study=budget,video_data=/data/k{budget}-{policy}-*' \
      --config.data.heads.image.source=... --config.data.heads.ocr.source=...

Arguments: smoke, study=NAME (which sweep), budget=K (0: 512 smoke, 2048 full), policy=NAME
(baseline frame policy), steps=N, workers=N (-1: 1 in smoke, 8 full), data_root=PATH (smoke:
one built-in data folder for every run; only for studies that keep budget and policy), and
video_data=TEMPLATE plus every argument of experiments/stage2_video.py (full size).
"""

import os

from ove_jax import config as config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))
demo_cpu = config_lib.load_module(os.path.join(_HERE, 'demo_cpu.py'))
stage2 = config_lib.load_module(os.path.join(_HERE, 'stage2_video.py'))

STUDIES = ('selection', 'budget', 'policy', 'rope', 'margin', 'scale', 'sample_rate')
FRAME_PATCHES = 256  # 16 x 16 patches of a 224 frame
# data.heads.video.video_modes: weights of (codec, uniform, collage, random).
SELECTIONS = {
  'codec': (1.0, 0.0, 0.0, 0.0),
  'uniform': (0.0, 1.0, 0.0, 0.0),
  'random': (0.0, 0.0, 0.0, 1.0),
}
BUDGETS = (512, 1024, 2048, 4096)
POLICIES = ('zero', 'paper', 'first_frame')
ROPES = ('3d', '1d', 'none')
MARGINS = (0.3, 0.0, 0.1, 0.5)
SCALES = (64.0, 16.0, 32.0, 128.0)
SAMPLE_RATES = {'full': (0.1, 0.05, 0.2, 0.5), 'smoke': (1.0, 0.25, 0.5)}
BASE_BUDGET = {'full': 2048, 'smoke': 512}
SMOKE_STEPS = 10
FULL_SAMPLES = 3.2e8
VIDEO_DATA = '/data/video-codec-k{budget}-{policy}-*.array_record'

ARGS = {
  **stage2.ARGS,
  'samples': FULL_SAMPLES,
  'workers': -1,
  'study': 'selection',
  'budget': 0,
  'policy': 'zero',
  'video_data': VIDEO_DATA,
}


def get_config(arg=None):
  a = _parse(arg)
  c = _smoke(a) if a.smoke else _full(a)
  _set_video(c, a, budget=_budget(a), policy=a.policy)
  return c


def sweep(add, arg=None):
  """One `add(**overrides)` per run of the study `study=` (see the module docstring)."""
  a = _parse(arg)
  size = 'smoke' if a.smoke else 'full'
  video = 'data.heads.video.'
  if a.study == 'selection':
    for name, modes in SELECTIONS.items():
      # num_frames is budget / 256 already: uniform frames fill the same tokens as codec.
      add(label={'selection': name}, **{video + 'video_modes': modes})
  elif a.study == 'budget':
    for budget in BUDGETS:
      add(label={'budget': budget}, **_video_overrides(a, budget, a.policy))
  elif a.study == 'policy':
    for policy in POLICIES:
      add(label={'policy': policy}, **_video_overrides(a, _budget(a), policy))
  elif a.study == 'rope':
    for rope in ROPES:
      add(**{'model.rope': rope})
  elif a.study == 'margin':
    for margin in MARGINS:
      add(**{'loss.margin': margin})
  elif a.study == 'scale':
    for scale in SCALES:
      add(**{'loss.scale': scale})
  else:  # sample_rate
    for rate in SAMPLE_RATES[size]:
      add(**{'loss.sample_rate': rate})


def _parse(arg):
  a = config_lib.parse_arg(arg, **ARGS)
  if a.study not in STUDIES:
    raise config_lib.ConfigError(f'argument study={a.study!r}; allowed: {", ".join(STUDIES)}')
  if a.policy not in POLICIES:
    raise config_lib.ConfigError(f'argument policy={a.policy!r}; allowed: {", ".join(POLICIES)}')
  budget = _budget(a)
  if not 1 <= budget <= 64 * FRAME_PATCHES:
    raise config_lib.ConfigError(f'argument budget={budget}: 1..{64 * FRAME_PATCHES} patches')
  if a.study == 'selection' and budget % FRAME_PATCHES:
    raise config_lib.ConfigError(
      f'argument budget={budget}: the selection study compares it with whole frames, so it '
      f'must be a multiple of {FRAME_PATCHES} (e.g. budget={max(1, budget // 256) * 256})'
    )
  if a.smoke and a.data_root and a.study in ('budget', 'policy'):
    raise config_lib.ConfigError(
      f'argument data_root with study={a.study}: its runs need different built-in data, so '
      'each makes its own in its run folder; leave data_root unset'
    )
  return a


def _budget(a) -> int:
  return a.budget or BASE_BUDGET['smoke' if a.smoke else 'full']


def _smoke(a):
  """demo_cpu's smoke config with the video head alone."""
  workers = 1 if a.workers < 0 else a.workers  # one process decodes while the step runs
  c = demo_cpu.get_config(f'smoke,steps={a.steps or SMOKE_STEPS},workers={workers}')
  del c.heads['image']
  del c.data.heads['image']
  c.builtin.root = a.data_root
  c.checkpoint_every = c.total_steps  # one save, at the end: what tools/sweep.py looks for
  return c


def _full(a):
  """stage2_video's config (large) with the ablation's sample count and video input."""
  args = {k: a[k] for k in stage2.ARGS}
  args.update(smoke=False, workers=8 if a.workers < 0 else a.workers)
  return stage2.build(config_lib.parse_arg(None, **args), preset='large')


def _set_video(c, a, *, budget: int, policy: str) -> None:
  c.data.heads.video.video_modes = SELECTIONS['codec']
  for key, value in _video_overrides(a, budget, policy).items():
    node = c
    *path, last = key.split('.')
    for part in path:
      node = node[part]
    node[last] = value


def _video_overrides(a, budget: int, policy: str) -> dict:
  """What a budget or policy changes: the built-in data's selection (smoke) or the video
  records (full), and the tokens per row (one clip per row)."""
  out = {
    'data.heads.video.tokens_per_row': budget,
    # The uniform and collage modes' frames at the same token count (selection study).
    'data.heads.video.num_frames': max(1, budget // FRAME_PATCHES),
  }
  if a.smoke:
    out.update({'builtin.budget': budget, 'builtin.policy': policy})
  else:
    out['data.heads.video.source'] = a.video_data.format(budget=budget, policy=policy)
  return out
