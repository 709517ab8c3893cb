"""Tests for efficientnet_jax.optim against TF1 and the official recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficientnet_jax import optim

# --------------------------------------------------------------------------
# RMSProp + coupled L2 against TF1's RMSPropOptimizer.
# --------------------------------------------------------------------------

_NUM_STEPS = 10


def _rmsprop_problem(seed=0):
  """A tiny two-module param dict, per-step gradients and a changing LR."""
  rng = np.random.default_rng(seed)
  init = {
      'conv': {'kernel': rng.normal(size=(3, 4))},
      'bn': {'scale': 1.0 + 0.1 * rng.normal(size=(4,))},
  }
  grads = [{
      'conv': {'kernel': rng.normal(size=(3, 4))},
      'bn': {'scale': rng.normal(size=(4,))},
  } for _ in range(_NUM_STEPS)]
  # A different LR at every step catches an LR applied outside the momentum
  # buffer: with a constant LR both placements give the same trajectory.
  lrs = rng.uniform(0.01, 0.2, size=_NUM_STEPS)
  return init, grads, lrs


def _tf1_rmsprop(init, grads, lrs, weight_decay):
  """Runs tf.compat.v1.train.RMSPropOptimizer in float64 graph mode.

  The loss is sum(g * v) + wd * l2_loss(conv kernel), so the gradient TF sees
  is g + wd * v on the kernel (the official coupled L2, which skips BN
  variables) and g on the BN scale.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  v1 = tf.compat.v1
  with tf.Graph().as_default():
    variables = {
        'kernel': v1.Variable(init['conv']['kernel'], dtype=tf.float64),
        'scale': v1.Variable(init['bn']['scale'], dtype=tf.float64),
    }
    grad_in = {k: v1.placeholder(tf.float64, v.shape) for k, v in
               variables.items()}
    lr_in = v1.placeholder(tf.float64, [])
    loss = tf.add_n([tf.reduce_sum(grad_in[k] * v)
                     for k, v in variables.items()])
    loss += weight_decay * tf.nn.l2_loss(variables['kernel'])
    opt = v1.train.RMSPropOptimizer(lr_in, decay=0.9, momentum=0.9,
                                    epsilon=1e-3)
    train_op = opt.minimize(loss)
    with v1.Session() as sess:
      sess.run(v1.global_variables_initializer())
      for g, lr in zip(grads, lrs):
        sess.run(train_op, {lr_in: lr, grad_in['kernel']: g['conv']['kernel'],
                            grad_in['scale']: g['bn']['scale']})
      out = sess.run(variables)
  return {'conv': {'kernel': out['kernel']}, 'bn': {'scale': out['scale']}}


def _run_optax(tx, init, grads):
  params = jax.tree.map(jnp.asarray, init)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, updates)
  return jax.tree.map(np.asarray, params)


def _f32(x):
  return float(np.float32(x))


def _max_rel_diff(a, b):
  diffs = jax.tree.map(lambda x, y: np.max(np.abs(x - y) / np.abs(y)), a, b)
  return max(jax.tree.leaves(diffs))


@pytest.mark.parametrize('weight_decay', [0.0, 0.1])
def test_rmsprop_matches_tf1_with_changing_lr(weight_decay):
  init, grads, lrs = _rmsprop_problem()
  expected = _tf1_rmsprop(init, grads, lrs, weight_decay)

  # float64 on both sides, so any mismatch is a semantic one, not round-off.
  with jax.enable_x64(True):
    lr_table = jnp.asarray(lrs)

    def run(**hyperparams):
      tx = optim.make_optimizer(
          name='rmsprop', learning_rate=lambda count: lr_table[count],
          weight_decay=weight_decay,
          weight_decay_mask=optim.weight_decay_mask(init), **hyperparams)
      return _run_optax(tx, init, grads)

    got = run()  # The defaults the training configs use.
    # TF1 turns decay, momentum and epsilon into float32 tensors before
    # casting them to the variable's float64, so with those rounded values
    # the two agree to float64 round-off instead of float32's.
    got_f32_hyperparams = run(momentum=_f32(0.9), rmsprop_decay=_f32(0.9),
                              rmsprop_eps=_f32(1e-3))
    # Negative controls: optax's default RMSProp (ms0=0, eps=1e-8, no
    # momentum) and an LR applied after the momentum must be far from TF1,
    # or this comparison could not fail.
    default_rmsprop = _run_optax(
        optax.rmsprop(lambda count: lr_table[count]), init, grads)
    lr_after_momentum = _run_optax(
        optax.chain(
            optax.add_decayed_weights(
                weight_decay, mask=optim.weight_decay_mask(init)),
            optax.scale_by_rms(0.9, 1e-3, initial_scale=1.0),
            optax.trace(0.9),
            optax.scale_by_learning_rate(lambda count: lr_table[count])),
        init, grads)

  assert got['conv']['kernel'].dtype == np.float64
  # The parameters moved, so matching TF is not matching the init.
  assert _max_rel_diff(init, expected) > 1e-2
  # Rounding 0.9 and 1e-3 to float32 moves the result by ~2e-7 (relative).
  assert _max_rel_diff(got, expected) <= 1e-6
  assert _max_rel_diff(got_f32_hyperparams, expected) <= 1e-12
  assert _max_rel_diff(default_rmsprop, expected) > 1e-2
  assert _max_rel_diff(lr_after_momentum, expected) > 1e-2


def test_coupled_l2_changes_the_result():
  # The wd=0.1 TF run differs from wd=0, so the parametrised test above does
  # check the decay term (and its BN exclusion) rather than passing either way.
  init, grads, lrs = _rmsprop_problem()
  no_decay = _tf1_rmsprop(init, grads, lrs, 0.0)
  decay = _tf1_rmsprop(init, grads, lrs, 0.1)
  assert _max_rel_diff(decay['conv'], no_decay['conv']) > 1e-3
  np.testing.assert_array_equal(decay['bn']['scale'], no_decay['bn']['scale'])


@pytest.mark.parametrize('name', ['sgd', 'adamw', 'rmsprop'])
def test_weight_decay_respects_mask(name):
  params = {'conv': {'kernel': jnp.ones((2, 2))},
            'bn': {'scale': jnp.ones((2,)), 'bias': jnp.ones((2,))}}
  tx = optim.make_optimizer(
      name=name, learning_rate=0.1, weight_decay=0.5,
      weight_decay_mask=optim.weight_decay_mask(params))
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # With zero gradients only the decay term moves anything.
  assert np.all(np.asarray(updates['conv']['kernel']) < 0)
  np.testing.assert_array_equal(updates['bn']['scale'], 0.0)
  np.testing.assert_array_equal(updates['bn']['bias'], 0.0)


def test_unknown_optimizer_raises():
  with pytest.raises(ValueError, match=r"'adam'.*rmsprop"):
    optim.make_optimizer(name='adam', learning_rate=0.1, weight_decay=0.0,
                         weight_decay_mask=None)


# --------------------------------------------------------------------------
# Learning-rate schedules.
# --------------------------------------------------------------------------

# 100 steps/epoch: W = 500, D = 240, so warmup ends inside the third period.
_SPE = 100
_W = 500
_D = 240


def _paper_schedule(**kwargs):
  return optim.learning_rate_schedule(
      base_lr=0.016, global_batch_size=4096, steps_per_epoch=_SPE, **kwargs)


def test_peak_lr_follows_linear_scaling_rule():
  for batch, peak in [(4096, 0.256), (2048, 0.128), (256, 0.016)]:
    lr = optim.learning_rate_schedule(
        base_lr=0.016, global_batch_size=batch, steps_per_epoch=_SPE,
        schedule='constant')
    np.testing.assert_allclose(lr(_W), peak, rtol=1e-6)


def test_exponential_warmup_is_linear_from_zero():
  lr = _paper_schedule()
  assert float(lr(0)) == 0.0
  for step in [1, 100, 250, 499]:
    np.testing.assert_allclose(lr(step), 0.256 * step / _W, rtol=1e-6)


def test_exponential_decay_counts_from_step_zero():
  lr = _paper_schedule()
  peak = 0.256
  # floor(500 / 240) = 2 periods have passed when warmup ends: the LR jumps to
  # 0.97**2 = 0.9409 of the peak and never equals the peak.
  np.testing.assert_allclose(lr(_W), 0.9409 * peak, rtol=1e-6)
  # Staircase edges: the LR drops exactly at multiples of D.
  for k in [3, 4, 10]:
    np.testing.assert_allclose(lr(k * _D - 1), peak * 0.97**(k - 1),
                               rtol=1e-6)
    np.testing.assert_allclose(lr(k * _D), peak * 0.97**k, rtol=1e-6)
  # optax's warmup schedule starts its staircase after warmup, so it is not
  # this schedule (pitfall O2).
  optax_lr = optax.warmup_exponential_decay_schedule(
      0.0, peak, _W, _D, 0.97, staircase=True)
  assert abs(float(optax_lr(_W)) - float(lr(_W))) > 1e-3


def test_paper_schedule_at_imagenet_scale():
  spe = 1281167 // 4096  # 312 steps/epoch at the paper's batch.
  lr = optim.learning_rate_schedule(
      base_lr=0.016, global_batch_size=4096, steps_per_epoch=spe)
  w, d = int(5 * spe), int(2.4 * spe)
  np.testing.assert_allclose(lr(w), 0.256 * 0.97**(w // d), rtol=1e-6)
  np.testing.assert_allclose(lr(w), 0.9409 * 0.256, rtol=1e-6)


def test_schedule_is_jittable_and_vectorised():
  lr = _paper_schedule()
  steps = jnp.array([0, 250, _W, 3 * _D, 10 * _D], jnp.int32)
  eager = np.array([float(lr(int(s))) for s in steps])
  np.testing.assert_allclose(jax.jit(lr)(steps), eager, rtol=1e-6)
  assert jax.jit(lr)(steps).dtype == jnp.float32


def test_cosine_endpoints():
  total = 4000
  lr = _paper_schedule(schedule='cosine', total_steps=total)
  peak = 0.256
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(
      lr(_W), 0.5 * peak * (1 + np.cos(np.pi * _W / total)), rtol=1e-6)
  np.testing.assert_allclose(lr(total // 2), peak / 2, rtol=1e-6)
  np.testing.assert_allclose(lr(total), 0.0, atol=1e-9)
  # With a floor the LR ends at min_lr and stays there past total_steps.
  floored = _paper_schedule(schedule='cosine', total_steps=total, min_lr=1e-3)
  for step in [total - 1, total, total + 500]:
    np.testing.assert_allclose(floored(step), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(floored(total // 2), peak / 2, rtol=1e-6)


def test_constant_and_no_warmup():
  lr = _paper_schedule(schedule='constant', warmup_epochs=0.0)
  np.testing.assert_allclose([lr(0), lr(1), lr(10**6)], 0.256, rtol=1e-6)


def test_schedule_errors():
  with pytest.raises(ValueError, match=r"'linear'.*exponential"):
    _paper_schedule(schedule='linear')
  with pytest.raises(ValueError, match='total_steps'):
    _paper_schedule(schedule='cosine')


# --------------------------------------------------------------------------
# EMA.
# --------------------------------------------------------------------------


def test_ema_decay_warmup_values():
  got = [float(optim.ema_decay(t, 0.9999)) for t in [0, 1, 10, 89990, 10**6]]
  np.testing.assert_allclose(got, [0.1, 2 / 11, 0.55, 0.9999, 0.9999],
                             rtol=1e-6)
  # Below 89,990 the warmup term is still the smaller one.
  assert float(optim.ema_decay(80000, 0.9999)) < 0.9999


def test_ema_of_constant_params_is_constant():
  tree = {'params': {'w': jnp.linspace(-3.0, 3.0, 7)},
          'batch_stats': {'bn': {'var': jnp.full((3,), 0.25)}}}
  update = jax.jit(optim.update_ema, static_argnums=3)
  ema = tree
  for step in range(50):
    ema = update(ema, tree, jnp.int32(step), 0.9999)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ema, tree)


def test_ema_covers_batch_stats():
  ema = {'params': {'k': jnp.zeros((2,))},
         'batch_stats': {'bn': {'mean': jnp.zeros((2,)),
                                'var': jnp.ones((2,))}}}
  new = {'params': {'k': jnp.ones((2,))},
         'batch_stats': {'bn': {'mean': jnp.full((2,), 2.0),
                                'var': jnp.full((2,), 3.0)}}}
  out = optim.update_ema(ema, new, 0, 0.9999)  # decay 0.1 at step 0.
  np.testing.assert_allclose(out['params']['k'], 0.9, rtol=1e-6)
  np.testing.assert_allclose(out['batch_stats']['bn']['mean'], 1.8, rtol=1e-6)
  np.testing.assert_allclose(out['batch_stats']['bn']['var'], 0.1 + 2.7,
                             rtol=1e-6)


# --------------------------------------------------------------------------
# Weight-decay masks.
# --------------------------------------------------------------------------


def _fake_params():
  bn = {'scale': 1.0, 'bias': 0.0}
  return {
      'stem_conv': {'kernel': 0.0},
      'stem_bn': dict(bn),
      'blocks_0': {
          'dw_conv': {'kernel': 0.0},
          'dw_bn': dict(bn),
          'se': {'reduce': {'kernel': 0.0, 'bias': 0.0},
                 'expand': {'kernel': 0.0, 'bias': 0.0}},
          'project_conv': {'kernel': 0.0},
          'project_bn': dict(bn),
      },
      'blocks_1': {
          'expand_conv': {'kernel': 0.0},
          'expand_bn': dict(bn),
          'BatchNorm_0': dict(bn),  # flax's automatic name.
          'subnet': {'kernel': 0.0},  # contains "bn" but is not BatchNorm.
      },
      'head_conv': {'kernel': 0.0},
      'head_bn': dict(bn),
      'bn': dict(bn),
      'head': {'kernel': 0.0, 'bias': 0.0},
  }


def _decayed_paths(mask):
  flat, _ = jax.tree_util.tree_flatten_with_path(mask)
  for _, value in flat:
    assert isinstance(value, bool)
  return {'/'.join(k.key for k in path) for path, value in flat if value}


_V2_DECAYED = {
    'stem_conv/kernel',
    'blocks_0/dw_conv/kernel',
    'blocks_0/se/reduce/kernel',
    'blocks_0/se/expand/kernel',
    'blocks_0/project_conv/kernel',
    'blocks_1/expand_conv/kernel',
    'blocks_1/subnet/kernel',
    'head_conv/kernel',
    'head/kernel',
}


def test_weight_decay_mask_v1_decays_all_but_batchnorm():
  mask = optim.weight_decay_mask(_fake_params())
  assert jax.tree.structure(mask) == jax.tree.structure(_fake_params())
  assert _decayed_paths(mask) == _V2_DECAYED | {
      'blocks_0/se/reduce/bias', 'blocks_0/se/expand/bias', 'head/bias'}


def test_weight_decay_mask_v2_also_skips_biases():
  mask = optim.weight_decay_mask(_fake_params(),
                                 exclude_bias_and_bn_scale=True)
  assert _decayed_paths(mask) == _V2_DECAYED


# --------------------------------------------------------------------------
# Loss.
# --------------------------------------------------------------------------


def test_label_smoothing_mixes_ce_with_uniform_term():
  rng = np.random.default_rng(1)
  batch, classes = 6, 10
  logits = rng.normal(scale=3.0, size=(batch, classes))
  labels = rng.integers(0, classes, size=batch)
  onehot = np.eye(classes)[labels]

  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -log_softmax[np.arange(batch), labels]
  uniform = -log_softmax.mean(-1)
  expected = np.mean(0.9 * ce + 0.1 * uniform)

  got = optim.cross_entropy_loss(jnp.asarray(logits, jnp.float32),
                                 jnp.asarray(onehot, jnp.float32), 0.1)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(
      optim.cross_entropy_loss(jnp.asarray(logits, jnp.float32),
                               jnp.asarray(onehot, jnp.float32), 0.0),
      ce.mean(), rtol=1e-5)


def test_loss_is_float32_for_bf16_logits():
  logits = jnp.ones((2, 5), jnp.bfloat16)
  labels = jax.nn.one_hot(jnp.array([0, 3]), 5, dtype=jnp.bfloat16)
  loss = optim.cross_entropy_loss(logits, labels, 0.1)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(loss, np.log(5.0), rtol=1e-6)
