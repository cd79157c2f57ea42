"""Probes of a frozen encoder (ove_jax.evaluators) and the probe tool (tools/probe.py)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data_pipeline import builtin, precompute, transforms
from ove_jax import evaluators
from ove_jax.evaluators import attentive as attentive_lib
from ove_jax.models import EncoderConfig, create_encoder
from ove_jax_tools import probe as probe_tool

CFG = EncoderConfig.preset('tiny')


def _token_set(n, num_classes, seed, *, length=32, random_labels=False):
  """Tokens [n, length, 128] of noise where two random tokens carry the class's prototype: the
  class is in a few tokens only, so a probe must find them (or average them in)."""
  rng = np.random.default_rng(seed)
  prototypes = np.random.default_rng(1234).normal(size=(num_classes, CFG.width))
  labels = rng.integers(0, num_classes, n)
  tokens = rng.normal(size=(n, length, CFG.width))
  where = rng.integers(0, length, (n, 2))
  tokens[np.arange(n)[:, None], where] += prototypes[labels][:, None]
  if random_labels:
    labels = rng.integers(0, num_classes, n)
  # Ragged lengths: the last quarter of the samples is shorter, the rest padding (masked out).
  mask = np.ones((n, length), bool)
  mask[3 * n // 4 :, length - 4 :] = False
  tokens[~mask] = 0
  return tokens.astype(np.float32), mask, labels


@pytest.mark.parametrize('random_labels', [False, True])
def test_probes_learn_separable_features_and_stay_near_chance_on_random_labels(random_labels):
  k = 5
  train = _token_set(240, k, 0, random_labels=random_labels)
  test = _token_set(100, k, 1, random_labels=random_labels)
  # docs/spec.md §6's settings (lr 1e-4, 30 epochs for a small set), not tuned for the test.
  result = evaluators.train_attentive(
    *train, *test, CFG, config=evaluators.AttentiveConfig(epochs=30)
  )
  pooled = [tokens.sum(1) / mask.sum(1, keepdims=True) for tokens, mask, _ in (train, test)]
  linear = evaluators.linear_probe(pooled[0], train[2], pooled[1], test[2])
  knn = evaluators.knn_probe(pooled[0], train[2], pooled[1], test[2])
  top1 = {'attentive': result['top1_best'], 'linear': linear['top1'], 'knn': knn['top1']}
  if random_labels:
    assert max(top1.values()) < 0.45, top1  # chance is 0.2
  else:
    assert min(top1.values()) > 0.9, top1
    assert result['history'][-1]['loss'] < result['history'][0]['loss']
  assert len(result['history']) == result['epochs'] == 30
  # The epoch is chosen on the validation split held out of the training features (the first
  # reaching the best validation top-1), and the test figure reported is that epoch's.
  val = [h['val_top1'] for h in result['history']]
  assert result['best_epoch'] == int(np.argmax(val)) + 1 and result['num_val'] == 24
  assert result['top1_best'] == result['history'][result['best_epoch'] - 1]['top1']
  assert result['top1_last'] == result['history'][-1]['top1']
  assert linear['C'] in linear['C_search']  # chosen by the cross-validated grid


def test_attentive_probe_trains_with_spec_settings(monkeypatch):
  defaults = evaluators.AttentiveConfig()
  assert (
    defaults.learning_rate,
    defaults.weight_decay,
    defaults.label_smoothing,
    defaults.clip_norm,
    defaults.epochs,
  ) == (1e-4, 0.0, 0.1, 5.0, 10)

  # The optimiser train_attentive actually builds: clip 5, then AdamW with weight decay 0 and a
  # learning rate decaying linearly from 1e-4 to the release's 1e-7 over the run's steps.
  seen = {}
  real_adamw, real_clip = optax.adamw, optax.clip_by_global_norm

  def adamw(learning_rate, **kwargs):
    seen['schedule'], seen['adamw'] = learning_rate, kwargs
    return real_adamw(learning_rate, **kwargs)

  def clip(max_norm):
    seen['clip'] = max_norm
    return real_clip(max_norm)

  monkeypatch.setattr(optax, 'adamw', adamw)
  monkeypatch.setattr(optax, 'clip_by_global_norm', clip)
  train, test = _token_set(20, 3, 0, length=8), _token_set(8, 3, 1, length=8)
  result = evaluators.train_attentive(
    *train, *test, CFG, config=evaluators.AttentiveConfig(epochs=3, batch_size=8)
  )
  steps = 3 * 3  # ceil(18 / 8) steps per epoch (2 of the 20 held out for validation)
  assert seen['clip'] == 5.0
  assert seen['adamw']['weight_decay'] == 0.0
  assert float(seen['schedule'](0)) == pytest.approx(1e-4)
  assert float(seen['schedule'](steps // 2)) < 1e-4
  assert float(seen['schedule'](steps)) == pytest.approx(1e-7, rel=1e-4)
  assert result['settings']['label_smoothing'] == 0.1

  # Label smoothing 0.1 over K classes: the target is 0.9 + 0.1 / K on the label, 0.1 / K off it.
  logits = jnp.asarray([[2.0, -1.0, 0.5, 0.0]])
  log_p = np.asarray(jax.nn.log_softmax(logits))
  expected = -(0.9 + 0.1 / 4) * log_p[0, 2] - sum(0.1 / 4 * log_p[0, j] for j in (0, 1, 3))
  got = attentive_lib.smoothed_cross_entropy(logits, jnp.asarray([2]), 0.1)
  assert float(got[0]) == pytest.approx(expected, rel=1e-5)


def test_run_probes_makes_class_ids_contiguous():
  # Label ids 40..42 (as the builtin data's shape labels) train the same probes as 0..2.
  def features(seed, offset):
    tokens, mask, labels = _token_set(24, 3, seed, length=8)
    return evaluators.Features(tokens, mask, tokens.mean(1), labels + offset)

  config = evaluators.AttentiveConfig(epochs=2, batch_size=8)
  low = evaluators.run_probes(features(0, 0), features(1, 0), CFG, attentive=config)
  high = evaluators.run_probes(features(0, 40), features(1, 40), CFG, attentive=config)
  for probe in evaluators.PROBES:
    assert high[probe]['top1'] == low[probe]['top1']
  assert high['attentive']['runs'][0]['history'] == low['attentive']['runs'][0]['history']


def test_knn_settings_reach_the_probe_as_one_config():
  """One test sample next to a lone class-0 neighbour (cosine 1) and three class-1 ones (0.9,
  0.9, 0.8): k=1 and the weighted vote at T=0.07 find class 0, a majority of 4 and the weighted
  vote at T=1 find class 1, so each KnnConfig field, passed down from run_probes, decides."""
  train = evaluators.Features(
    None, None, np.array([[1, 0], [0.9, 0.44], [0.9, -0.44], [0.8, 0.6]]), np.array([0, 1, 1, 1])
  )
  test = evaluators.Features(None, None, np.array([[1.0, 0.0]]), np.array([0]))

  def top1(**settings):
    knn = evaluators.KnnConfig(**settings)
    result = evaluators.run_probes(train, test, CFG, probes=('knn',), knn=knn)['knn']
    assert result['runs'][0]['k'] == min(knn.k, 4) and result['runs'][0]['vote'] == knn.vote
    return result['top1']

  assert top1() == top1(k=1) == top1(k=4) == 1.0  # the default: k=20 (capped), weighted, 0.07
  assert top1(k=4, vote='majority') == top1(k=4, temperature=1.0) == 0.0
  assert evaluators.KnnConfig() == evaluators.KnnConfig(k=20, vote='weighted', temperature=0.07)
  for bad, message in (
    ({'k': 0}, 'KnnConfig(k=0): must be >= 1'),
    ({'vote': 'mean'}, "KnnConfig(vote='mean'): choose one of"),
    ({'temperature': 0.0}, 'KnnConfig(temperature=0.0): must be > 0'),
  ):
    with pytest.raises(ValueError, match=re.escape(message)):
      evaluators.KnnConfig(**bad)


def test_extract_packs_rows_without_changing_features():
  encoder = create_encoder(CFG, seed=0)
  rng = np.random.default_rng(0)
  lengths = (50, 100, 30, 70, 20)
  samples = [
    {
      'patches': rng.integers(0, 256, (n, 588), dtype=np.uint8),
      'positions': rng.integers(0, 16, (n, 3)).astype(np.int32),
      'label': i % 3,
    }
    for i, n in enumerate(lengths)
  ]
  one = evaluators.extract(encoder, samples, batch_size=2)
  packed = evaluators.extract(encoder, samples, batch_size=2, num_segments=3)
  assert one.tokens_NxLxC.shape == (5, 100, CFG.width)
  np.testing.assert_array_equal(one.mask_NxL.sum(1), lengths)
  np.testing.assert_array_equal(one.labels_N, [0, 1, 2, 0, 1])
  assert not one.tokens_NxLxC[~one.mask_NxL].any()
  np.testing.assert_allclose(packed.tokens_NxLxC, one.tokens_NxLxC, atol=1e-5)
  np.testing.assert_allclose(packed.pooled_NxC, one.pooled_NxC, atol=1e-5)
  # The same as the encoder on the one sample alone, CLIP-normalised on the host.
  out = encoder(
    jnp.asarray(transforms.normalise(samples[1]['patches']))[None],
    jnp.asarray(samples[1]['positions'])[None],
  )
  np.testing.assert_allclose(one.pooled_NxC[1], out['pooled'][0, 0], atol=1e-5)
  np.testing.assert_allclose(one.tokens_NxLxC[1], out['last_hidden_state'][0], atol=1e-5)


@pytest.fixture(scope='module')
def builtin_data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('probe_builtin'))
  made = builtin.ensure(root, clips=8, images=1, budget=512, progress=False)
  records = [r for path in made['video_source'].split(',') for r in precompute.read_shard(path)]
  return root, records


def test_codec_and_uniform_samples_spend_the_same_token_budget(builtin_data):
  _, records = builtin_data
  budget = 512
  codec = evaluators.video_samples(records, 'codec')
  uniform = evaluators.video_samples(records, 'uniform', num_frames=budget // 256)
  assert len(codec) == len(uniform) == len(records)
  for record, c, u in zip(records, codec, uniform):
    assert len(c['patches']) == len(u['patches']) == budget
    assert c['label'] == u['label'] == int(record['labels'][0])
    np.testing.assert_array_equal(c['positions'], record['positions'])  # 64-frame timeline
    # Two whole frames, one from each half of the clip, every patch of the 16 x 16 grid.
    times = np.unique(u['positions'][:, 0])
    assert len(times) == 2 and times[0] < 32 <= times[1]
    for t in times:
      hw = u['positions'][u['positions'][:, 0] == t, 1:]
      assert len({tuple(p) for p in hw}) == 256
  assert evaluators.video_samples(records[:1], label_index=1)[0]['label'] == records[0]['labels'][1]
  with pytest.raises(ValueError, match='label_index 5'):
    evaluators.video_samples(records[:1], label_index=5)


def test_probe_tool_runs_both_modes_and_writes_results(builtin_data, tmp_path, capsys):
  root, records = builtin_data
  out = str(tmp_path / 'results.json')
  assert (
    probe_tool.main(
      [
        '--checkpoint',
        'random:tiny',
        '--builtin',
        root,
        '--epochs',
        '3',
        '--seeds',
        '0,1',
        '--out',
        out,
      ]
    )
    == 0
  )
  printed = capsys.readouterr().out
  with open(out) as f:
    results = json.load(f)
  assert set(results['modes']) == {'codec', 'uniform'}
  assert results['num_train'] + results['num_test'] == len(records)
  assert results['num_frames'] == 2 and results['seeds'] == [0, 1]
  for mode, entry in results['modes'].items():
    assert entry['tokens_per_sample'] == 512
    for probe in ('attentive', 'linear', 'knn'):
      assert 0.0 <= entry[probe]['top1'] <= 1.0
      assert f'{mode:8}    512  {probe:9}' in printed
    assert len(entry['attentive']['runs']) == 2 and len(entry['linear']['runs']) == 2
    assert len(entry['attentive']['runs'][0]['history']) == 3


@pytest.mark.parametrize(
  'args, message',
  [
    (['--checkpoint', 'random:nope'], '--checkpoint random:nope: unknown preset'),
    (['--checkpoint', '/nonexistent/run'], '--checkpoint /nonexistent/run: no such directory'),
    (['--probes', 'attentive,svm'], '--probes'),
    (['--test-fraction', '1.5'], '--test-fraction 1.5'),
    (['--label-index', '7'], '--label-index 7'),
  ],
)
def test_probe_tool_rejects_bad_input(builtin_data, capsys, args, message):
  root, _ = builtin_data
  base = {'--checkpoint': 'random:tiny', '--builtin': root}
  base.update(dict(zip(args[::2], args[1::2])))
  argv = [x for kv in base.items() for x in kv]
  assert probe_tool.main(argv) == 2
  assert message in capsys.readouterr().err


def test_probe_tool_names_records_that_match_nothing(tmp_path, capsys, monkeypatch):
  def no_load(*args, **kwargs):
    raise AssertionError('the encoder was loaded before the records were checked')

  monkeypatch.setattr(probe_tool, 'load_encoder', no_load)
  pattern = str(tmp_path / 'none-*')
  assert probe_tool.main(['--checkpoint', 'random:tiny', '--records', pattern]) == 2
  assert f'--records {pattern!r}: no file matches' in capsys.readouterr().err
  missing = str(tmp_path / 'no_run')
  assert probe_tool.main(['--checkpoint', missing, '--records', pattern]) == 2
  assert f'--checkpoint {missing}: no such directory' in capsys.readouterr().err


def test_probe_labels_are_named_and_a_bad_name_lists_the_names(builtin_data, capsys):
  from ove_jax import probes

  root, records = builtin_data
  assert probes.label_index('texture', probes.BUILTIN_LABELS) == 3
  assert probes.label_index('2', probes.BUILTIN_LABELS) == 2
  assert probes.label_names(records) == ('label0', 'label1', 'label2', 'label3')
  with pytest.raises(probes.ProbeError, match='give 4 different names'):
    probes.label_names(records, ['a', 'b'])
  # The built-in data's slot named texture holds the object's texture, offset by a constant.
  textures = probes.record_labels(records, probes.label_index('texture', probes.BUILTIN_LABELS))
  assert (
    len({t - builtin.video_attributes(r['labels'])['texture'] for t, r in zip(textures, records)})
    == 1
  )
  assert (
    probe_tool.main(['--checkpoint', 'random:tiny', '--builtin', root, '--label', 'colour']) == 2
  )
  assert (
    "--label colour: the records' labels are fine, shape, direction, texture"
    in capsys.readouterr().err
  )


def test_probe_tool_checks_out_before_any_probe(tmp_path, monkeypatch, capsys):
  # Checked first: no encoder is loaded and no probe runs for results that could not be saved.
  def no_work(*args, **kwargs):
    raise AssertionError('the encoder was loaded before --out was checked')

  monkeypatch.setattr(probe_tool, 'load_encoder', no_work)
  (tmp_path / 'afile').write_text('')
  for out, message in (
    (tmp_path, f'--out: {tmp_path}: a folder; give the path of a file'),
    (tmp_path / 'afile' / 'r.json', f'its folder {tmp_path / "afile"} cannot be made'),
  ):
    argv = ['--checkpoint', 'random:tiny', '--builtin', str(tmp_path / 'b'), '--out', str(out)]
    with pytest.raises(SystemExit) as exit_:
      probe_tool.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
  # A missing folder is made when the results are written, as the bench tools' --json.
  argv = ['--checkpoint', 'random:tiny', '--builtin', str(tmp_path / 'b')]
  assert probe_tool.build_parser().parse_args([*argv, '--out', str(tmp_path / 'new' / 'r.json')])
