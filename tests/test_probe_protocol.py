"""The release's attentive-probe protocol (ove_jax.evaluators.protocol), its inputs and the
paper's interventions (data_pipeline.probe_inputs)."""

import numpy as np
import pytest

from data_pipeline import benchmarks, probe_inputs, synthetic
from data_pipeline.probe_inputs import ColorJitter, InputMode
from ove_jax import evaluators
from ove_jax.evaluators import attentive, protocol
from ove_jax.models import EncoderConfig, create_encoder

CFG = EncoderConfig.preset('tiny')
LENGTH = 32  # tokens of a fake sample


class FakeSampler:
  """A ClipSampler without videos: clip i is LENGTH patches showing the pattern of class
  `content[i]` (default: its label), noise drawn from the given rng when training (so a draw
  differs from the next); it records every call."""

  def __init__(self, labels, *, content=None, train_noise=True):
    self.clips = [benchmarks.ProbeClip(f'clip{i}', int(y)) for i, y in enumerate(labels)]
    self.content = list(labels if content is None else content)
    self.mode = InputMode('codec', LENGTH)
    self.calls, self.drawn = [], {}
    self.train_noise = train_noise

  def __len__(self):
    return len(self.clips)

  def labels(self):
    return np.asarray([c.label for c in self.clips], np.int64)

  def sample(self, index, *, train, rng):
    self.calls.append((index, train))
    label, shown = self.clips[index].label, self.content[index]
    base = np.random.default_rng([7, index]).integers(0, 64, (LENGTH, 588))
    base[:, shown * 100 : (shown + 1) * 100] += 150  # the class is visible in every token
    noise = rng.integers(0, 40, base.shape) if train and self.train_noise else 0
    patches = np.clip(base + noise, 0, 255).astype(np.uint8)
    self.drawn.setdefault((index, train), []).append(patches)
    positions = np.stack(np.unravel_index(np.arange(LENGTH), (64, 16, 16)), -1).astype(np.int32)
    return {'patches': patches, 'positions': positions, 'label': label}


@pytest.fixture(scope='module')
def encoder():
  return create_encoder(CFG, seed=0)


CONFIG = protocol.ProtocolConfig(
  epochs=2, batch_size=4, learning_rates=(1e-4, 1e-3), val_fraction=0.25, eval_batch_size=4
)


# ------------------------------------------------------------------------------------------------
# Sampling and augmentation
# ------------------------------------------------------------------------------------------------


def test_segment_sampling_takes_centres_at_test_and_random_offsets_in_training():
  seg = 63 / 8
  centre = probe_inputs.segment_frame_ids(64, 8, train=False)
  assert centre.tolist() == [int(seg * i + seg / 2) for i in range(8)]
  draws = [
    probe_inputs.segment_frame_ids(64, 8, train=True, rng=np.random.default_rng(s))
    for s in range(5)
  ]
  for ids in draws:
    assert all(int(seg * i) <= f <= int(seg * (i + 1)) for i, f in enumerate(ids))
  assert len({tuple(d) for d in draws}) > 1
  # A short clip repeats its last frame; grid times as the release's interpolation.
  assert probe_inputs.segment_frame_ids(3, 5, train=False).tolist() == [0, 1, 2, 2, 2]
  assert probe_inputs.grid_times(np.array([0, 50, 99]), 100).tolist() == [0, 32, 63]


def test_color_jitter_is_the_release_augmentation():
  rng = np.random.default_rng(0)
  patches = rng.integers(0, 256, (5, 588)).astype(np.uint8)
  none = ColorJitter(p_brightness_contrast=0, p_saturation=0, p_hue=0, p_channel_swap=0)
  assert np.array_equal(none(patches, rng), patches)
  swap = ColorJitter(p_brightness_contrast=0, p_saturation=0, p_hue=0, p_channel_swap=1)
  assert np.array_equal(
    swap(patches, rng).reshape(5, 196, 3), patches.reshape(5, 196, 3)[..., ::-1]
  )
  # The defaults: probabilities 0.8 / 0.8 / 0.8 / 0.1; one draw per clip changes it.
  jitter = ColorJitter()
  assert (
    jitter.p_brightness_contrast,
    jitter.p_saturation,
    jitter.p_hue,
    jitter.p_channel_swap,
  ) == (0.8, 0.8, 0.8, 0.1)
  outs = [jitter(patches, np.random.default_rng(s)) for s in range(4)]
  assert all(o.dtype == np.uint8 and o.shape == patches.shape for o in outs)
  assert not np.array_equal(outs[0], outs[1])
  # Saturation 0 leaves grey: all channels equal.
  grey = (
    ColorJitter(
      p_brightness_contrast=0, p_saturation=1, saturation=(0.0, 0.0), p_hue=0, p_channel_swap=0
    )(patches, rng)
    .reshape(-1, 3)
    .astype(int)
  )
  assert np.abs(grey - grey[:, :1]).max() <= 1


@pytest.fixture(scope='module')
def clip_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp('clips')
  return [
    synthetic.make_clip(i, num_frames=16, height=64, width=64).write(folder / f'c{i}.mp4')
    for i in range(3)
  ]


def test_training_draws_differ_and_test_draws_are_the_segment_centres(clip_files):
  clips = [benchmarks.ProbeClip(p, 0) for p in clip_files]
  sampler = probe_inputs.ClipSampler(clips, 'uniform:2')
  epoch1 = sampler.sample(0, train=True, rng=np.random.default_rng([0, 1, 0]))
  epoch2 = sampler.sample(0, train=True, rng=np.random.default_rng([0, 2, 0]))
  assert not np.array_equal(epoch1['patches'], epoch2['patches'])
  tests = [sampler.sample(0, train=False, rng=np.random.default_rng(s)) for s in (0, 1)]
  assert np.array_equal(tests[0]['patches'], tests[1]['patches'])
  centre = probe_inputs.segment_frame_ids(16, 2, train=False)  # frames 3 and 11
  assert centre.tolist() == [3, 11]
  expected_t = probe_inputs.grid_times(centre, 16).tolist()
  assert sorted(set(tests[0]['positions'][:, 0].tolist())) == expected_t
  frames = sampler.frames(0, centre)
  assert np.array_equal(tests[0]['patches'], probe_inputs.frame_patches(frames))


# ------------------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------------------


def test_features_are_recomputed_per_batch_from_fresh_draws(encoder, monkeypatch):
  train, test = FakeSampler([0, 1, 2] * 4), FakeSampler([0, 1, 2] * 2)
  forwards = []
  real = protocol.clip_features

  def spy(enc, samples, batch_size):
    out = real(enc, samples, batch_size)
    forwards.append(out[0])
    return out

  monkeypatch.setattr(protocol, 'clip_features', spy)
  config = protocol.ProtocolConfig(epochs=2, batch_size=4, val_fraction=0.25, eval_batch_size=4)
  protocol.run_protocol(encoder, train, test, config, num_classes=3)
  fit, val = attentive.split_indices(12, 0.25)
  # Every training clip is drawn anew in every epoch (augmented), each batch through the encoder.
  for i in fit:
    assert train.calls.count((int(i), True)) == 2
    first, second = train.drawn[(int(i), True)]
    assert not np.array_equal(first, second)
  assert not any(train.calls.count((int(i), True)) for i in val)
  train_batches = 2 * -(-len(fit) // 4)
  # the validation split (3 clips, one batch, cached after its first pass) and the test split
  # (6 clips, two batches), each once
  eval_batches = 1 + 2
  assert len(forwards) == train_batches + eval_batches


def test_lr_and_epoch_are_chosen_on_validation_never_on_test(encoder):
  labels = [0, 1, 2] * 6
  train = FakeSampler(labels)
  results = []
  for test_labels in ([0, 1, 2] * 3, [1, 2, 0] * 3):  # the second: every test label wrong
    test = FakeSampler(test_labels, content=[0, 1, 2] * 3)
    results.append(protocol.run_protocol(encoder, train, test, CONFIG, num_classes=3))
    # The test split is drawn only after all training and validation of the seed.
    last_train = max(n for n, (_, is_train) in enumerate(train.calls) if is_train)
    assert test.calls and all(not t for _, t in test.calls)
    train.calls.clear()
    assert last_train >= 0
  a, b = (r['runs'][0] for r in results)
  assert (a['lr'], a['epoch'], a['history']) == (b['lr'], b['epoch'], b['history'])
  assert len(a['history']) == 2 * 2  # two learning rates x two epochs, all on validation
  chosen = max(a['history'], key=lambda h: h['val_top1'])
  assert (a['lr'], a['epoch']) == (chosen['lr'], chosen['epoch'])
  assert a['top1'] > 0.9 and b['top1'] < 0.1  # the test labels moved the score, not the choice
  assert a['top5'] == 1.0 >= a['top1']  # three classes: top-5 holds every class


def test_test_split_is_scored_once_after_the_choice(encoder, monkeypatch):
  order = []
  real_call = protocol.ClipScorer.__call__

  def spy(self, params, graphdef):
    order.append('test' if self.sampler is test else 'val')
    return real_call(self, params, graphdef)

  train, test = FakeSampler([0, 1, 2] * 4), FakeSampler([0, 1, 2] * 2)
  monkeypatch.setattr(protocol.ClipScorer, '__call__', spy)
  config = protocol.ProtocolConfig(
    epochs=1,
    batch_size=4,
    learning_rates=(1e-4, 1e-3),
    val_fraction=0.25,
    seeds=(0, 1),
    eval_batch_size=4,
  )
  result = protocol.run_protocol(encoder, train, test, config, num_classes=3)
  assert order == (['val'] * 2 + ['test']) * 2  # per seed: an epoch per lr, then the test
  assert len(result['runs']) == 2 and result['top1_std'] >= 0


def test_probe_head_init_scale_schedule_end_and_top5():
  config = protocol.ProtocolConfig().attentive(1e-4, 0)
  assert (
    config.end_learning_rate,
    config.init_scale,
    config.label_smoothing,
    config.weight_decay,
    config.clip_norm,
  ) == (1e-7, 1e-3, 0.1, 0.0, 5.0)
  assert protocol.ProtocolConfig().learning_rates == (1e-4,)
  from flax import nnx

  probe = attentive.AttentiveProbe(CFG, 400, rngs=nnx.Rngs(0), init_scale=1e-3)
  kernel = np.asarray(probe.classifier.kernel[...])
  assert kernel.std() == pytest.approx(0.02e-3, rel=0.05)
  assert np.all(np.asarray(probe.classifier.bias[...]) == 0)
  schedule = attentive.optimizer(config, 100)  # the last step's learning rate is 1e-7
  import optax

  lr = optax.linear_schedule(config.learning_rate, config.end_learning_rate, 100)
  assert float(lr(100)) == pytest.approx(1e-7) and schedule is not None
  logits = np.array([[0.0, 5, 4, 3, 2, 1, -1], [9, 0, 0, 0, 0, 0, 1]])
  assert attentive.top_k_hits(logits, np.array([0, 6]), 1).tolist() == [False, False]
  assert attentive.top_k_hits(logits, np.array([5, 6]), 5).tolist() == [True, True]
  assert attentive.top_k_hits(logits, np.array([0, 6]), 5).tolist() == [False, True]


def test_linear_probe_is_the_same_for_every_probe_seed():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(60, 16)), rng.integers(0, 3, 60)
  runs = [evaluators.linear_probe(x[:40], y[:40], x[40:], y[40:], seed=s) for s in (0, 1, 2)]
  assert runs[0] == runs[1] == runs[2]


# ------------------------------------------------------------------------------------------------
# Interventions
# ------------------------------------------------------------------------------------------------


def test_shuffled_positions_move_every_token_and_keep_the_budget():
  positions = np.stack(np.unravel_index(np.arange(300), (64, 16, 16)), -1)
  shuffled = probe_inputs.shuffle_positions(positions, np.random.default_rng(0))
  assert shuffled.shape == positions.shape
  assert sorted(map(tuple, shuffled)) == sorted(map(tuple, positions))
  assert not (shuffled == positions).all(-1).any()  # no token keeps its place


def test_static_replacement_swaps_a_share_for_the_most_static_patches():
  rng = np.random.default_rng(0)
  scores = rng.random((4, 16, 16))
  flat = np.argsort(-scores.reshape(-1))[:100]  # a top-100 selection
  selected = np.stack(np.unravel_index(np.sort(flat), scores.shape), -1)
  out = probe_inputs.static_replacement(selected, scores, 0.5, np.random.default_rng(1))
  assert out.shape == selected.shape and len({tuple(p) for p in out}) == 100
  kept = {tuple(p) for p in out} & {tuple(p) for p in selected}
  new = [tuple(p) for p in out if tuple(p) not in kept]
  assert len(kept) == 50 and len(new) == 50
  lowest = np.argsort(scores.reshape(-1), kind='stable')[:50]
  assert sorted(new) == sorted(map(tuple, np.stack(np.unravel_index(lowest, scores.shape), -1)))


def test_codec_interventions_keep_the_budget(clip_files):
  clips = [benchmarks.ProbeClip(p, i) for i, p in enumerate(clip_files[:2])]
  rng = np.random.default_rng
  plain = probe_inputs.ClipSampler(clips, 'codec:256', augment=None)
  base = [plain.sample(i, train=False, rng=rng(0)) for i in range(2)]
  counter = probe_inputs.ClipSampler(clips, 'codec:256+counterfactual_motion', augment=None)
  swapped = counter.sample(0, train=False, rng=rng(0))
  assert np.array_equal(swapped['positions'], base[1]['positions'])  # the other clip's motion
  assert len(swapped['patches']) == 256
  static = probe_inputs.ClipSampler(clips, 'codec:256+static_motion', augment=None)
  out = static.sample(0, train=False, rng=rng(0))
  same = {tuple(p) for p in out['positions']} & {tuple(p) for p in base[0]['positions']}
  assert len(out['positions']) == 256 and len(same) == 128
  shuffled = probe_inputs.ClipSampler(clips, 'codec:256+shuffle_positions', augment=None)
  out = shuffled.sample(0, train=False, rng=rng(0))
  assert np.array_equal(out['patches'], base[0]['patches'])
  assert sorted(map(tuple, out['positions'])) == sorted(map(tuple, base[0]['positions']))
  assert not np.array_equal(out['positions'], base[0]['positions'])


def test_counterfactual_donor_is_the_next_clip_with_another_selection():
  clips = [benchmarks.ProbeClip(f'c{i}', 0) for i in range(4)]
  sampler = probe_inputs.ClipSampler(clips, 'codec:2+counterfactual_motion')
  same, other = np.array([[0, 0, 0], [0, 0, 1]]), np.array([[5, 1, 1], [9, 2, 2]])
  table = {0: same, 1: same, 2: other, 3: same}  # clip 1 shares clip 0's (static fallback)
  sampler.selection = lambda i: probe_inputs.ClipSelection(np.arange(64), table[i], None)
  assert np.array_equal(sampler.donor_selection(0).positions, other)
  assert np.array_equal(sampler.donor_selection(2).positions, same)
  table[2] = same  # nobody differs: the next clip's
  assert np.array_equal(sampler.donor_selection(3).positions, same)


def test_input_modes_parse_and_refuse_bad_ones():
  assert InputMode.parse('codec:2048').tokens == 2048
  assert InputMode.parse('uniform:8').tokens == 2048
  assert InputMode.parse('codec:4096+static_motion').name == 'codec:4096+static_motion'
  for bad in ('codec', 'frames:8', 'uniform:8+static_motion', 'codec:2048+nothing'):
    with pytest.raises(ValueError):
      InputMode.parse(bad)
