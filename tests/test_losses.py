"""Partial FC: the maths of docs/spec.md §4 in numpy, the sharded loss against the plain one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from ove_jax import losses

MESHES = {'2x4': (2, 4, 1), '2x2x2': (2, 2, 2)}


def make_mesh(shape):
  return jax.make_mesh(shape, ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3)


def numpy_cosface(e, labels_B, centres, cfg):
  """Per-sample loss over all classes, written straight from docs/spec.md §4 (sample_rate 1)."""
  e = e / np.linalg.norm(e, axis=1, keepdims=True)
  w = centres[: cfg.num_classes]
  w = w / np.linalg.norm(w, axis=1, keepdims=True)
  cos = np.clip(e @ w.T, -1, 1)
  onehot = np.eye(cfg.num_classes, dtype=bool)[labels_B]
  logits = cfg.scale * np.where(
    onehot, cos - cfg.margin, np.where(cos > cfg.filter_threshold, 0.0, cos)
  )
  top = logits.max(axis=1, keepdims=True)
  return np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0] - logits[onehot]


def problem(cfg, batch=16, width=32, num_labels=3, seed=0, close=False):
  rng = np.random.default_rng(seed)
  centres = np.asarray(losses.init_centres(jax.random.key(seed), cfg, width))
  labels = rng.integers(0, cfg.num_classes, (batch, num_labels)).astype(np.int32)
  e = rng.normal(size=(batch, width)).astype(np.float32)
  if close:  # embeddings near their first label's centre: large cosines, the filter matters
    e = centres[labels[:, 0]] * 50 + 0.3 * e
  valid = np.ones(batch, bool)
  valid[-3:] = False
  ids = np.arange(batch, dtype=np.int32) * 7 + 3
  return e, valid, labels, ids, centres


@pytest.mark.parametrize('close', [False, True])
def test_full_softmax_matches_numpy_spec(close):
  cfg = losses.PartialFCConfig(num_classes=50, sample_rate=1.0, num_slots=1, sampling_blocks=4)
  e, valid, labels, ids, centres = problem(cfg, num_labels=1, close=close)
  out = losses.reference_loss(e, valid, labels, ids, centres, 5, cfg)
  want = numpy_cosface(e[valid], labels[valid, 0], centres, cfg).mean()
  np.testing.assert_allclose(float(out['loss']), want, rtol=1e-5)
  assert int(out['dropped']) == 0
  cos = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (
    centres[:50] / np.linalg.norm(centres[:50], axis=1, keepdims=True)
  ).T
  acc = (cos.argmax(1) == labels[:, 0])[valid].mean()
  np.testing.assert_allclose(float(out['accuracy']), acc)


def test_sampling_keeps_every_positive_and_the_quota():
  cfg = losses.PartialFCConfig(num_classes=1000, sample_rate=0.1, num_slots=2, sampling_blocks=8)
  e, valid, labels, ids, centres = problem(cfg, batch=32)
  # The loss over the sampled subset is smaller than over all classes (fewer negatives) but
  # never loses a target: dropped is 0 with 32 positives over 8 blocks of 13 kept classes.
  out = losses.reference_loss(e, valid, labels, ids, centres, 1, cfg)
  assert int(out['dropped']) == 0
  full = losses.reference_loss(
    e,
    valid,
    labels,
    ids,
    centres,
    1,
    losses.PartialFCConfig(num_classes=1000, sample_rate=1.0, num_slots=2, sampling_blocks=8),
  )
  assert float(out['loss']) < float(full['loss'])
  # Different steps draw different negatives; the same step the same ones.
  again = losses.reference_loss(e, valid, labels, ids, centres, 1, cfg)
  other = losses.reference_loss(e, valid, labels, ids, centres, 2, cfg)
  assert float(again['loss']) == float(out['loss'])
  assert float(other['loss']) != float(out['loss'])


def test_positives_beyond_the_quota_are_counted_not_hidden():
  # One block keeps 1 class per slot and no headroom; of the distinct positives only one fits.
  cfg = losses.PartialFCConfig(
    num_classes=20, sample_rate=0.01, num_slots=1, sampling_blocks=1, positive_headroom=0.0
  )
  e, valid, labels, ids, centres = problem(cfg, num_labels=1)
  y = labels[valid, 0]
  assert len(set(y.tolist())) > 1
  dropped = {
    int(losses.reference_loss(e, valid, labels, ids, centres, step, cfg)['dropped'])
    for step in range(12)
  }
  # Exactly the samples of every other class are left out, whichever class is kept ...
  possible = {int((y != c).sum()) for c in set(y.tolist())}
  assert dropped <= possible
  # ... and which class is kept changes with the step (not always the lowest id).
  assert len(dropped) > 1


def test_slot_choice_follows_the_sample_not_its_row():
  cfg = losses.PartialFCConfig(num_classes=100, num_slots=3)
  labels = jnp.asarray(np.arange(40).reshape(4, 10), jnp.int32)
  ids = jnp.asarray([5, 9, 11, 2], jnp.int32)
  slots = losses.choose_slots(labels, ids, 7, cfg)
  perm = np.asarray([2, 0, 3, 1])
  slots_perm = losses.choose_slots(labels[perm], ids[perm], 7, cfg)
  np.testing.assert_array_equal(np.asarray(slots)[:, perm], np.asarray(slots_perm))
  s = np.asarray(slots)
  for b in range(4):  # without replacement, from the sample's own labels
    assert len(set(s[:, b])) == 3 and set(s[:, b]) <= set(range(10 * b, 10 * b + 10))


@pytest.mark.parametrize('mesh_name', sorted(MESHES))
def test_sharded_loss_and_gradients_equal_plain(mesh_name):
  cfg = losses.PartialFCConfig(
    num_classes=203, sample_rate=0.3, num_slots=3, sampling_blocks=8, filter_threshold=0.2
  )
  e, valid, labels, ids, centres = problem(cfg, batch=16, close=True)

  def total(fn, e, centres):
    out = fn(e, valid, labels, ids, centres, 11, cfg)
    return out['loss'], out

  plain = jax.jit(
    jax.value_and_grad(
      lambda e, c: total(losses.reference_loss, e, c), argnums=(0, 1), has_aux=True
    )
  )
  (loss0, aux0), (ge0, gc0) = plain(e, centres)
  mesh = make_mesh(MESHES[mesh_name])
  with jax.set_mesh(mesh):
    e_s = jax.device_put(e, jax.sharding.PartitionSpec(('data', 'fsdp')))
    c_s = jax.device_put(centres, jax.sharding.PartitionSpec(('data', 'fsdp', 'tensor')))
    sharded = jax.jit(
      jax.value_and_grad(
        lambda e, c: total(losses.partial_fc_loss, e, c), argnums=(0, 1), has_aux=True
      )
    )
    (loss1, aux1), (ge1, gc1) = sharded(e_s, c_s)
    # No device holds the whole centre matrix or its gradient.
    assert gc1.sharding.shard_shape(gc1.shape)[0] == cfg.padded_classes // 8
  np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6)
  assert float(aux1['accuracy']) == float(aux0['accuracy'])
  assert int(aux1['dropped']) == int(aux0['dropped']) == 0
  for got, want in ((ge1, ge0), (gc1, gc0)):  # summation order differs: relative to the scale
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6 * np.abs(want).max(), rtol=1e-5)
  assert np.abs(np.asarray(gc0)).sum() > 0


@pytest.mark.parametrize('headroom, kept', [(0.0, 52), (1.0, 64)])
def test_sharded_step_holds_no_batch_by_classes_buffer(headroom, kept):
  cfg = losses.PartialFCConfig(
    num_classes=4096, sample_rate=0.1, num_slots=2, sampling_blocks=8, positive_headroom=headroom
  )
  assert cfg.block_capacity(64) == kept
  e, valid, labels, ids, centres = problem(cfg, batch=64, width=16)
  mesh = make_mesh((2, 4, 1))
  with jax.set_mesh(mesh):
    fn = jax.jit(
      jax.grad(
        lambda e, c: losses.partial_fc_loss(e, valid, labels, ids, c, 0, cfg)['loss'],
        argnums=(0, 1),
      )
    )
    text = fn.lower(e, centres).compile().as_text()
  # Per device: 64 x 52 kept classes per slot (64 with the headroom: the batch caps it). A
  # [64, 4096] (or [64, 512] local) buffer would mean logits over every class.
  assert 'f32[64,4096]' not in text and 'f32[64,512]' not in text
  assert f'f32[64,{kept}]' in text or f'f32[2,64,{kept}]' in text


def test_config_errors_name_the_fix():
  with pytest.raises(ValueError, match='sample_rate'):
    losses.PartialFCConfig(num_classes=10, sample_rate=0)
  cfg = losses.PartialFCConfig(num_classes=10, sampling_blocks=6)
  with pytest.raises(ValueError, match=r'heads\.video\.sampling_blocks=8'):
    cfg.check_devices(8, 'video')
  with pytest.raises(ValueError, match='centres'):
    losses.reference_loss(
      np.zeros((4, 8), np.float32),
      np.ones(4, bool),
      np.zeros((4, 2), np.int32),
      np.arange(4, dtype=np.int32),
      np.zeros((10, 8), np.float32),
      0,
      cfg,
    )


# ------------------------------------------------------------------------------------------------
# Overflowing blocks keep every positive, as the release's Partial FC
# ------------------------------------------------------------------------------------------------


def release_subset(positives, keys, k):
  """The release's per-rank Partial FC sampling (training/fused_partial_fc_v2_multi_res.py,
  `PartialFC_V2.sample`), transcribed: with room for them, the positives plus the top of a
  uniform random ordering up to k classes; without, exactly the positives. `keys` stands in
  for its torch.rand draw (the same uniform order our hash gives), indices local to the block."""
  positives = np.unique(positives)
  if k - positives.size >= 0:
    perm = keys.astype(np.float64) / 2.0**30  # uniform in [0, 1)
    perm[positives] = 2.0
    return np.sort(np.argsort(-perm, kind='stable')[:k])
  return positives


def release_loss(e, labels_JxB, centres, cfg, step, micro=0):
  """Mean over slots of the mean over the batch of the CosFace softmax over each slot's subset
  (docs/spec.md §4), the subset drawn block by block with `release_subset`."""
  e = e.astype(np.float64)
  e = e / np.linalg.norm(e, axis=1, keepdims=True)
  w_all = centres.astype(np.float64)
  w_all = w_all / np.linalg.norm(w_all, axis=1, keepdims=True)
  bs, k = cfg.block_size, cfg.block_samples
  per_slot = []
  for j, y in enumerate(labels_JxB):
    keys = np.asarray(losses.class_keys(cfg, step, micro, j, np.arange(cfg.padded_classes)))
    subset = []
    for block in range(cfg.sampling_blocks):
      lo = block * bs
      here = y[(y >= lo) & (y < lo + bs)] - lo
      subset.append(lo + release_subset(here, keys[lo : lo + bs], k))
    subset = np.concatenate(subset)
    assert np.isin(y, subset).all()
    cos = np.clip(e @ w_all[subset].T, -1, 1)
    onehot = subset[None, :] == y[:, None]
    logits = cfg.scale * np.where(
      onehot, cos - cfg.margin, np.where(cos > cfg.filter_threshold, 0.0, cos)
    )
    top = logits.max(axis=1, keepdims=True)
    loss = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0] - logits[onehot]
    per_slot.append(loss.mean())
  return float(np.mean(per_slot))


def ocr_problem(batch=48, num_labels=100, num_classes=4000, width=32, seed=0):
  """OCR-like labels: a frequency-ordered vocabulary (id = frequency rank), 100 words a sample
  drawn Zipf-like, so the frequent words crowd the first class blocks."""
  rng = np.random.default_rng(seed)
  ranks = np.arange(1, num_classes + 1, dtype=np.float64)
  p = 1.0 / ranks
  labels = np.stack(
    [rng.choice(num_classes, num_labels, replace=False, p=p / p.sum()) for _ in range(batch)]
  ).astype(np.int32)
  e = rng.normal(size=(batch, width)).astype(np.float32)
  return e, labels


def test_frequency_ordered_labels_keep_every_positive_as_the_release():
  base = dict(num_classes=4000, sample_rate=0.05, num_slots=8, sampling_blocks=8)
  before = losses.PartialFCConfig(**base, positive_headroom=0.0)  # the quota only, as before
  cfg = losses.PartialFCConfig(**base, positive_headroom=2.0)
  e, labels = ocr_problem()
  b = e.shape[0]
  valid, ids = np.ones(b, bool), np.arange(b, dtype=np.int32)
  centres = np.asarray(losses.init_centres(jax.random.key(1), cfg, e.shape[1]))
  step = 3
  y_JxB = np.asarray(losses.choose_slots(jnp.asarray(labels), jnp.asarray(ids), step, cfg))
  first_block = y_JxB < cfg.block_size
  distinct = max(len(set(y[m].tolist())) for y, m in zip(y_JxB, first_block))
  assert distinct > cfg.block_samples == 25  # block 0 overflows its quota in some slot

  old = losses.reference_loss(e, valid, labels, ids, centres, step, before)
  assert int(old['dropped']) > 0  # the quota alone loses positives ...
  new = losses.reference_loss(e, valid, labels, ids, centres, step, cfg)
  assert int(new['dropped']) == 0  # ... the headroom keeps all of them
  np.testing.assert_allclose(
    float(new['loss']), release_loss(e, y_JxB, centres, cfg, step), rtol=1e-5
  )
  # Sharded over 8 devices (one block each): the same loss and the same count.
  with jax.set_mesh(make_mesh((2, 2, 2))):
    sharded = jax.jit(lambda e, c: losses.partial_fc_loss(e, valid, labels, ids, c, step, cfg))(
      e, centres
    )
  np.testing.assert_allclose(float(sharded['loss']), float(new['loss']), rtol=1e-6)
  assert int(sharded['dropped']) == 0


def test_past_the_headroom_positives_are_counted():
  base = dict(num_classes=4000, sample_rate=0.05, num_slots=8, sampling_blocks=8)
  e, labels = ocr_problem()
  b = e.shape[0]
  valid, ids = np.ones(b, bool), np.arange(b, dtype=np.int32)
  centres = np.asarray(
    losses.init_centres(jax.random.key(1), losses.PartialFCConfig(**base), e.shape[1])
  )
  dropped = [
    int(
      losses.reference_loss(
        e, valid, labels, ids, centres, 3, losses.PartialFCConfig(**base, positive_headroom=h)
      )['dropped']
    )
    for h in (0.0, 0.2, 0.6, 2.0)
  ]
  assert dropped[0] > dropped[1] > 0 and dropped[-1] == 0
  assert dropped == sorted(dropped, reverse=True)
  assert losses.PartialFCConfig(**base).block_capacity(b) == 48  # the batch caps the headroom
  assert losses.PartialFCConfig(**base).block_capacity(8) == 25  # small batch: no headroom
  with pytest.raises(ValueError, match='positive_headroom'):
    losses.PartialFCConfig(**base, positive_headroom=-1)
