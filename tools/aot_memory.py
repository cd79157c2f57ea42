"""Ahead-of-time memory check: compile an experiment's train step for a target mesh, run nothing.

Out-of-memory errors on a 256-accelerator run should be found before the accelerators are
rented. This command (over `ove_jax.memory`) builds the trainer's `Program` for the experiment
on N virtual CPU devices, lowers and compiles its train step from abstract inputs
(`jax.ShapeDtypeStruct` with the state's and batch's shardings: no parameter, optimiser state
or batch is ever allocated), and prints what one device would hold:

  params      the device's shard of the float32 master weights (from the param shardings)
  optimizer   its shard of the AdamW moments (and the optimiser's small counters)
  batch       its share of one step's batch (all accumulated micro-batches, every head)
  temp        XLA's temporaries of the step: activations kept for the backward pass, gradients,
              the loss's sampled logits, collective buffers (`compiled.memory_analysis()`)
  total       arguments + outputs - aliased (the donated state) + temporaries: the step's peak

then whether the total fits an H100 (80 GB), an H200 (141 GB), a TPU v5p (95 GB) or
`--device-memory`, the analytic FLOPs per step the trainer uses for MFU, the compile time, and a
check of the compiled per-device program: no buffer of (batch x classes) for any head, since
the class centres and their logits are sharded by class (ove_jax.losses). The last line of the
output is one JSON object with every figure (bytes are per device).

  # the release's stage 2 (large encoder, heads of 2M + 365k + 400k classes) on 64 and 256
  # devices, each with the release's per-GPU batches 16 / 8 / 16 (gpus= sizes the batch)
  ove-aot-memory --config=experiments/stage2_video.py:gpus=64 --devices=64
  ove-aot-memory --config=experiments/stage2_video.py:gpus=256 --devices=256
  # another mesh (data, fsdp, tensor; one may be -1), a config override, a custom device
  ove-aot-memory --config=experiments/huge.py --devices=256 --mesh=-1,32,1 \\
      --config.model.remat=dots --device-memory=192
  # the CPU demo on 8 devices, in seconds
  ove-aot-memory --config=experiments/demo_cpu.py --devices=8

What the figures are. `params`, `optimizer` and `batch` follow from shapes and shardings alone
and are exact. `temp` (and so `total`) is by default XLA:CPU's buffer assignment of the
SPMD-partitioned step (one device's program; every device runs the same one), compiled with
XLA:CPU's memory-minimising scheduler (`compiler_options`). It can be above what a GPU or TPU
compiler plans:
  - with unrolled blocks (`model.scan_layers=False`) XLA:CPU's scheduler places each block's
    rematerialised forward early, inside the forward pass, not just before that block's
    backward, and the plan holds nearly every block's attention buffers at once (stage2_video
    unrolled: hundreds of GB a device, docs/memory.md); the scanned blocks that base/large/huge use
    by default plan one block's (stage2_video on 64 devices: 42.5 GB, docs/memory.md);
  - XLA:CPU runs bf16 dots in float32, so the bf16 attention probabilities become float32
    buffers;
  - model.attention='xla' materialises [rows, heads, L, L] logits, which the flash kernels
    ('cudnn', 'splash') never do; those run only on their accelerators.
Read the CPU `temp` as an upper bound and for comparing settings; for the accelerator's own plan,
run with `--platform=native` on a machine that has the accelerators (a mesh no larger than its
devices: e.g. 8 GPUs with `:gpus=8`, the same per-device batch as any gpus=N). On GPUs, JAX
preallocates 75% of the memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise; compare
with that share. The step is compiled with every head in the batch (data.mixing='all'); under
mixing='weighted' a step holds one head, so the figure is an upper bound there.

Bad input (an unknown experiment file, a mesh that does not match the device count, a batch or
sampling_blocks that the mesh does not divide, --devices < 1) prints one `error:` line naming the
flag and the fix, and exits with status 2.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from ove_jax import cli, memory

MESH_FLAG_HELP = (
  'data=8,fsdp=8, or sizes in the order data, fsdp, tensor: 8,8,1 or 8x8x1; one size may be -1 '
  '(the rest of the devices)'
)


def build_parser() -> cli.Parser:
  parser = cli.Parser(
    prog='ove-aot-memory',
    description=__doc__.split('\n\n')[0],
    epilog='Any --config.KEY=VALUE overrides the experiment, as in the trainer.',
  )
  parser.add_argument('--config', required=True, help='experiments/<name>.py[:args]')
  parser.add_argument(
    '--devices',
    type=int,
    required=True,
    help='the number of devices to compile for (virtual CPU devices)',
  )
  parser.add_argument('--mesh', help=f"override the config's mesh: {MESH_FLAG_HELP}")
  parser.add_argument(
    '--platform',
    choices=('cpu', 'native'),
    default='cpu',
    help="cpu: N virtual CPU devices (any N, XLA:CPU's plan); native: the "
    "first N of this machine's own GPUs/TPUs (their compiler's plan)",
  )
  parser.add_argument(
    '--device-memory',
    type=float,
    default=None,
    metavar='GB',
    help='also say whether the step fits a device of this many GB',
  )
  return parser


def parse_mesh(text: str) -> dict[str, int]:
  from ove_jax import sharding

  try:
    return sharding.parse_mesh(text)
  except ValueError as e:
    raise cli.UsageError(f'--mesh={text}: {e}') from None


def load_config(args, overrides: list[str]):
  """The experiment with its overrides and --mesh, checked against --devices."""
  from ove_jax import config as config_lib

  if args.devices < 1:
    raise cli.UsageError(f'--devices={args.devices}: give the number of devices, 1 or more')
  if args.device_memory is not None and not args.device_memory > 0:
    raise cli.UsageError(f'--device-memory={args.device_memory:g}: give a size in GB above 0')
  if args.mesh:
    overrides = overrides + [f'mesh.{axis}={size}' for axis, size in parse_mesh(args.mesh).items()]
  try:
    config = config_lib.load(args.config, overrides)
  except config_lib.ConfigError as e:
    raise cli.UsageError(f'--config: {e}') from None
  try:
    memory.check_mesh(config, args.devices)  # before JAX starts: a wrong mesh fails fast
  except memory.PlanError as e:
    where = '--mesh' if args.mesh and 'mesh' in str(e) else '--config'
    raise cli.UsageError(f'{where}: {e}') from None
  return config


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    args, rest = build_parser().parse_known_args(cli.attach_values(argv))
    config = load_config(args, cli.config_overrides(rest))
    result = memory.analyse(config, args.devices, args.device_memory, args.platform)
  except (cli.UsageError, memory.PlanError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for line in memory.report_lines(result, args.config):
    print(line)
  print(json.dumps(result), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
