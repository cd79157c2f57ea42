r"""The paper's attentive-probe benchmarks as recipes for `ove-probe-suite` (docs/evaluation.md).

  # all eight sets of the paper's table, under the release's data_root layout
  # (<data_root>/ssv2_hevc/ssv2_train_new.csv, <data_root>/k400_hevc/train_new.csv, ...)
  ove-probe-suite --config=probe_benchmarks:data_root=/data/attentive_probe \
      --encoders random:large,/ckpt/stage2 --out /results/probe
  # some of them, some input modes
  ove-probe-suite --config=probe_benchmarks:data_root=/data/ap --benchmarks ssv2,diving48 \
      --modes codec:2048,uniform:8 --encoders /ckpt/stage2 --out /results/probe
  # a data set of your own: its two lists (train, test), its class count
  ove-probe-suite \
      --config=probe_benchmarks:name=mine,train=/d/train.csv,test=/d/test.csv,num_classes=10 \
      --encoders /ckpt/stage2 --out /results/mine

Each recipe has the release's class count, epochs (30 for Diving-48, HMDB-51, Perception Test;
10 for the others), learning rates (1e-4) and batch: its per-device batch x its 8 devices
(SSv2 / Diving-48 / Perception Test 4 -> 32, HMDB-51 2 -> 16, the others 16 -> 128), run here as
one global batch. The input modes are the paper's: codec at K = 2048 and 4096 (`release_probe`
selection), uniform 8 and 16 frames. Seeds 0, 1, 2 (mean ± std).

Arguments: data_root=PATH; name, train, test (list files or source specs, see
data_pipeline.benchmarks), root (joined to a list's relative paths), num_classes, batch_size,
epochs for your own set (a paper benchmark's recipe with train / test given overrides its
files); seeds=N (seeds 0..N-1); val_fraction=F; smoke (1 epoch, seed 0: a quick check).
"""

from data_pipeline import benchmarks as benchmarks_lib
from ove_jax import config as config_lib

# A recipe for ove-probe-suite, not a trainer config (ove_jax.config.load refuses it by name).
PROBE_SUITE = True
# get_config's arguments (the module docstring says what each does), with their defaults.
ARGS = dict(data_root='', name='', train='', test='', root='', num_classes=0, batch_size=0)
ARGS.update(epochs=0, seeds=3, val_fraction=0.1, smoke=False)


def _entry(a, name, train, test, num_classes, batch_size, epochs, learning_rates) -> dict:
  """One set's recipe for ove-probe-suite: its own values where the arguments `a` give none."""
  own = dict(
    train=train, test=test, root=None, num_classes=num_classes, batch_size=batch_size, epochs=epochs
  )
  given = {key: a[key] or value for key, value in own.items()}
  return dict(name=name, **given, learning_rates=tuple(learning_rates))


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **ARGS)
  entries = []
  if a.name and a.name not in benchmarks_lib.BENCHMARKS:
    if not (a.train and a.test and a.num_classes):
      raise config_lib.ConfigError(
        f'probe_benchmarks:name={a.name}: a set of your own needs train=LIST, test=LIST and '
        f"num_classes=N (the paper's sets: {', '.join(benchmarks_lib.BENCHMARKS)})"
      )
    entries.append(_entry(a, a.name, a.train, a.test, a.num_classes, 32, 10, (1e-4,)))
  else:
    names = [a.name] if a.name else list(benchmarks_lib.BENCHMARKS)
    for name in names:
      b = benchmarks_lib.BENCHMARKS[name]
      train, test = b.lists(a.data_root or '.')
      entries.append(
        _entry(a, name, train, test, b.num_classes, b.global_batch_size, b.epochs, b.learning_rates)
      )
  if a.smoke:
    for e in entries:
      e['epochs'] = 1
  c = config_lib.ml_collections.ConfigDict()
  c.benchmarks = entries
  c.modes = benchmarks_lib.PAPER_MODES
  c.seeds = (0,) if a.smoke else tuple(range(a.seeds))
  c.val_fraction = a.val_fraction
  c.end_learning_rate = 1e-7
  c.label_smoothing = 0.1
  c.init_scale = 1e-3
  return c
