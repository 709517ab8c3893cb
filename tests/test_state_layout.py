"""The flat and per-leaf state layouts hold the same values and train the same way."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficientnet_jax import experiment
from efficientnet_jax import state as state_lib
from efficientnet_jax import steps
from efficientnet_jax.model import architectures
from efficientnet_jax import checkpointing
from efficientnet_jax import optim
from efficientnet_jax import state_layout
from efficientnet_jax.model import create_model
from tests import smoke_run
from tests import state_compare


def _tree(key):
  keys = jax.random.split(key, 4)
  return {'block_0': {'kernel': jax.random.normal(keys[0], (3, 3, 4, 8)),
                      'bn': {'scale': jax.random.normal(keys[1], (8,)),
                             'bias': jax.random.normal(keys[2], (8,))}},
          'classifier': {'kernel': jax.random.normal(keys[3], (8, 5))}}


def test_resolve_picks_flat_only_for_a_replicated_1d_state():
  assert state_layout.resolve('auto', sharding='replicate', mesh_model=1) == 'flat'
  assert state_layout.resolve('auto', sharding='fsdp', mesh_model=1) == 'per_leaf'
  assert state_layout.resolve('auto', sharding='replicate', mesh_model=2) == 'per_leaf'
  assert state_layout.resolve('per_leaf', sharding='replicate', mesh_model=1) == 'per_leaf'
  with pytest.raises(ValueError, match=r"state_layout='flat' needs sharding='replicate'.*'fsdp'"):
    state_layout.resolve('flat', sharding='fsdp', mesh_model=1)
  with pytest.raises(ValueError, match=r"state_layout='flatt'; accepted: auto, flat, per_leaf"):
    state_layout.resolve('flatt', sharding='replicate', mesh_model=1)


def test_ravel_unravel_round_trip():
  tree = _tree(jax.random.key(0))
  vector = state_layout.ravel(tree)
  assert vector.shape == (sum(x.size for x in jax.tree.leaves(tree)),)
  back = state_layout.unravel(vector, tree)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError):  # too short for the tree (restore checks shapes before)
    state_layout.unravel(vector[1:], tree)


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_flat_optimizer_gives_the_per_leaf_updates(name):
  # Same gradients in, the same updates out, step after step (decay mask included).
  params = _tree(jax.random.key(1))
  txs = {flat: optim.make_optimizer(name=name, learning_rate=0.01, weight_decay=1e-2,
                                    weight_decay_mask=optim.weight_decay_mask, flat=flat)
         for flat in (False, True)}
  states = {flat: tx.init(params) for flat, tx in txs.items()}
  for step in range(4):
    grads = _tree(jax.random.key(10 + step))
    updates = {}
    for flat, tx in txs.items():
      updates[flat], states[flat] = jax.jit(tx.update)(grads, states[flat], params)
    for a, b in zip(jax.tree.leaves(updates[True]), jax.tree.leaves(updates[False])):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    params = jax.tree.map(jnp.add, params, updates[False])
  # The flat state is the per-leaf one, concatenated.
  flat_abstract = jax.eval_shape(lambda: states[True])
  converted = state_layout.relayout(states[False], flat_abstract)
  for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(states[True])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_flat_state_keeps_the_structure_checkpoints_were_saved_with():
  # Before the decay moved onto the vector, 'flat' was chain(decay, optax.flatten(rmsprop)).
  params = _tree(jax.random.key(1))
  tx = optim.make_optimizer(name='rmsprop', learning_rate=0.01, weight_decay=1e-2,
                            weight_decay_mask=optim.weight_decay_mask, flat=True)
  before = optax.chain(
      optax.add_decayed_weights(1e-2, mask=optim.weight_decay_mask),
      optax.flatten(optax.rmsprop(0.01, decay=0.9, eps=1e-3, initial_scale=1.0,
                                  eps_in_sqrt=True, momentum=0.9)))
  ours, theirs = tx.init(params), before.init(params)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    assert a.shape == b.shape


def _tiny_model():
  spec = architectures.get_spec('b0')
  return create_model(dataclasses.replace(spec, stages=spec.stages[:3]), num_classes=10)


def _train(model, layout, num_steps=3):
  tx = optim.make_optimizer(name='rmsprop', learning_rate=0.05, weight_decay=1e-3,
                            weight_decay_mask=optim.weight_decay_mask, flat=layout == 'flat')
  state = jax.jit(functools.partial(state_lib.create_train_state, model=model, tx=tx,
                                    image_size=32, layout=layout))(jax.random.key(0))
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, ema_decay=0.9,
                                   label_smoothing=0.1))
  for i in range(num_steps):
    batch = {'image': jax.random.normal(jax.random.key(10 + i), (8, 32, 32, 3)),
             'label': jax.nn.one_hot(jnp.arange(8) % 10, 10)}
    state, _ = step(state, batch, jax.random.key(i))
  return state


def test_flat_train_state_trains_like_per_leaf_and_converts_both_ways():
  model = _tiny_model()
  per_leaf, flat = _train(model, 'per_leaf'), _train(model, 'flat')
  assert flat['ema'].ndim == 1 and isinstance(per_leaf['ema'], dict)
  assert jax.tree.structure(state_layout.ema_variables(flat)) == jax.tree.structure(
      per_leaf['ema'])
  to_flat = jax.jit(lambda s: state_layout.relayout(s, jax.eval_shape(lambda: flat)))(per_leaf)
  to_leaf = jax.jit(lambda s: state_layout.relayout(s, jax.eval_shape(lambda: per_leaf)))(flat)
  assert jax.tree.structure(to_flat) == jax.tree.structure(flat)
  assert jax.tree.structure(to_leaf) == jax.tree.structure(per_leaf)
  worst = state_compare.assert_states_close(jax.device_get(to_flat), jax.device_get(flat))
  print('largest |per_leaf - flat| / max|flat| per group: ' + state_compare.describe(worst))
  state_compare.assert_states_close(jax.device_get(to_leaf), jax.device_get(per_leaf))
  # A round trip is exact.
  back = jax.jit(lambda s: state_layout.relayout(s, jax.eval_shape(lambda: per_leaf)))(to_flat)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(per_leaf)):
    np.testing.assert_array_equal(a, b)


def test_relayout_refuses_another_models_state():
  model = _tiny_model()
  state = _train(model, 'per_leaf', num_steps=0)
  other = jax.eval_shape(lambda: {**state, 'ema': state_layout.ravel(
      {'params': {'x': jnp.zeros(7)}, 'batch_stats': {}})})
  with pytest.raises(ValueError, match='cannot convert the state between layouts'):
    state_layout.relayout(state, other)


def test_a_checkpoint_without_a_layout_restores_as_per_leaf(tmp_path):
  # Checkpoints written before layouts existed hold per-leaf states and no
  # `state_layout` in their meta; the default (flat) config loads them.
  data_root = smoke_run.write_fake_data(tmp_path / 'data')
  config = smoke_run.smoke_config(data_root)
  exp = experiment.build_experiment(config)
  assert exp.layout == 'flat'
  init = functools.partial(state_lib.create_train_state, model=exp.model, tx=exp.make_tx(False),
                           image_size=exp.image_size, layout='per_leaf')
  state = jax.jit(init)(jax.random.key(0))
  manager = checkpointing.make_checkpoint_manager(str(tmp_path / 'run'), async_save=False)
  checkpointing.save(manager, 5, state, meta=state_lib.architecture_meta(exp), force=True)
  checkpointing.close(manager)
  _, restored, step = state_lib.load_checkpoint(config, str(tmp_path / 'run'))
  assert step == 5 and restored['ema'].ndim == 1
  ema = state_layout.ema_variables(restored)
  for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(state['ema'])):
    np.testing.assert_array_equal(a, b)
