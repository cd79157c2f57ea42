"""The optimiser of docs/spec.md §5: schedules, clipping per parameter group, weight-decay masks."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ove_jax import optim

BASE = dict(
  lr=1.0,
  warmup=10,
  decay='linear',
  end_lr_fraction=0.0,
  b1=0.9,
  b2=0.999,
  eps=1e-8,
  weight_decay=0.0,
  weight_decay_mask='all',
  clip_norm=5.0,
)


@pytest.mark.parametrize('decay', ['linear', 'cosine', 'constant'])
def test_warmup_then_decay(decay):
  lr = optim.schedule({**BASE, 'decay': decay, 'end_lr_fraction': 0.1}, total_steps=110)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10)], [0.0, 0.5, 1.0], atol=1e-6)
  end = float(lr(110))
  assert end == pytest.approx({'linear': 0.1, 'cosine': 0.1, 'constant': 1.0}[decay], abs=1e-6)
  if decay == 'linear':
    assert float(lr(60)) == pytest.approx(0.55, abs=1e-6)
  # A fraction < 1 is a share of the steps.
  assert optim.warmup_steps({**BASE, 'warmup': 0.1}, 1000) == 100


def test_each_group_is_clipped_on_its_own():
  grads = {
    'encoder': {'w': jnp.full((4,), 10.0)},  # norm 20: clipped to 5
    'heads': {
      'video': jnp.full((4,), 1.0),  # norm 2: untouched
      'image': jnp.full((16,), 100.0),
    },
  }  # norm 400: clipped to 5
  tx = optim.clip_by_group_norm(5.0)
  out, _ = tx.update(grads, tx.init(grads))
  norms = {g: float(n) for g, n in optim.group_norms(out).items()}
  assert norms == pytest.approx({'encoder': 5.0, 'heads/video': 2.0, 'heads/image': 5.0})
  # A global clip would have scaled the small head down too.
  global_out, _ = optax.clip_by_global_norm(5.0).update(grads, None)
  assert float(optim.group_norms(global_out)['heads/video']) < 0.1


def test_weight_decay_masks():
  params = {'encoder': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}}
  zeros = {'encoder': {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros((2,))}}
  for mask, bias_decays in (('all', True), ('matrices', False)):
    tx, _ = optim.make(
      {**BASE, 'warmup': 0, 'weight_decay': 0.5, 'weight_decay_mask': mask, 'decay': 'constant'},
      total_steps=10,
    )
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(updates['encoder']['kernel'][0, 0]) == pytest.approx(-0.5)
    assert (float(updates['encoder']['bias'][0]) != 0.0) == bias_decays
  with pytest.raises(ValueError, match='weight_decay_mask'):
    optim.decay_mask('norms')


def test_matrices_mask_discounts_the_layers_axis_of_scanned_blocks():
  # Stacked (scanned) blocks carry a leading layers axis: a stacked bias is 2-D but not a matrix.
  params = {
    'blocks': {
      'mlp': {'fc1': {'kernel': jnp.ones((3, 4, 5)), 'bias': jnp.ones((3, 5))}},
      'norm1': {'scale': jnp.ones((3, 4))},
    },
    'patch': {'kernel': jnp.ones((4, 4))},
    'ln': {'bias': jnp.ones(4)},
  }
  mask = optim.decay_mask('matrices')(params)
  assert mask['blocks']['mlp']['fc1'] == {'kernel': True, 'bias': False}
  assert mask['blocks']['norm1']['scale'] is False
  assert mask['patch']['kernel'] is True and mask['ln']['bias'] is False
