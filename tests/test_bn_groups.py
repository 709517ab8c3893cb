"""Grouped batch-norm statistics (`bn_groups`): the official TPU grouped BN on a 'data' mesh.

The official code (tensorflow/tpu models/official/efficientnet/utils.py and
google/automl efficientnetv2/utils.py, `TpuBatchNormalization._moments`)
averages per-replica moments over a group of replicas; the references below
compute it that way, replica by replica, and the model must agree with it in
value, gradient and running statistics, on 8 simulated CPU devices.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet_jax import sharding
from efficientnet_jax.model import architectures
from efficientnet_jax.model import blocks
from efficientnet_jax.model import create_model
from efficientnet_jax.model import kernels

IMPLS = ('flax', 'fused')
EPS = 1e-3
MOMENTUM = 0.9


def _mesh(num_devices: int):
  return sharding.make_mesh(jax.devices()[:num_devices])


def _sharded(mesh, tree, batch=False):
  """`tree` on `mesh`: split over 'data' along axis 0 (`batch`) or replicated."""
  where = sharding.batch_sharding(mesh) if batch else sharding.replicated(mesh)
  return jax.device_put(tree, where)


def _close(actual, expected, rtol=1e-5):
  """max |actual - expected| <= rtol * max |expected|: fp32 round-off of reordered sums."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = max(float(np.max(np.abs(expected))), 1e-6)
  assert float(np.max(np.abs(actual - expected))) <= rtol * scale


class _BN(nn.Module):
  """One `batch_norm_act` (swish), the unit under test."""
  impl: str
  groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool = True):
    return blocks.batch_norm_act(x, train, momentum=MOMENTUM, epsilon=EPS, dtype=jnp.float32,
                                 act='swish', impl=self.impl, name='bn', groups=self.groups)


class _FlaxBN(nn.Module):
  """nn.BatchNorm then swish: global batch-norm as it was before `bn_groups`."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM, epsilon=EPS,
                     dtype=jnp.float32, name='bn')(x)
    return nn.swish(x)


def _official_bn(x, scale, bias, replicas: int, groups: int):
  """The official maths: per-replica moments averaged over each group of replicas.

  Returns act(BN(x)), the group means and the group variances ([groups, C]).
  """
  per_group = replicas // groups
  out, means, variances = [], [], []
  for rows in jnp.split(x, groups):
    shards = jnp.split(rows, per_group)
    shard_mean = [jnp.mean(s, (0, 1, 2)) for s in shards]
    shard_var = [jnp.var(s, (0, 1, 2)) for s in shards]
    mean = sum(shard_mean) / per_group
    mean_of_square = sum(v + jnp.square(m) for m, v in zip(shard_mean, shard_var)) / per_group
    var = mean_of_square - jnp.square(mean)
    out.append(jax.nn.swish((rows - mean) / jnp.sqrt(var + EPS) * scale + bias))
    means.append(mean)
    variances.append(var)
  return jnp.concatenate(out), jnp.stack(means), jnp.stack(variances)


def _inputs(batch=16, size=5, channels=6):
  x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
  # Per-row offsets so that groups have different statistics.
  x = x * 1.5 + jnp.arange(batch, dtype=jnp.float32)[:, None, None, None] / 4
  weights = jax.random.normal(jax.random.key(1), x.shape)
  return x, weights


def _variables(channels=6):
  return {'params': {'bn': {'scale': jnp.linspace(0.5, 1.5, channels),
                            'bias': jnp.linspace(-0.5, 0.5, channels)}},
          'batch_stats': {'bn': {'mean': jnp.linspace(-0.1, 0.1, channels),
                                 'var': jnp.linspace(0.9, 1.1, channels)}}}


def _train_step(module):
  """jit of (output, new batch_stats, d loss / d (params, x)) for a weighted-sum loss."""

  def step(variables, x, weights):
    def loss(params, x):
      y, updates = module.apply({**variables, 'params': params}, x, True,
                                mutable=['batch_stats'])
      return jnp.sum(y * weights), (y, updates['batch_stats'])

    grads, (y, stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(variables['params'], x)
    return y, stats, grads

  return jax.jit(step)


@pytest.mark.parametrize('groups', [2, 8])
@pytest.mark.parametrize('impl', IMPLS)
def test_grouped_bn_matches_official_maths_in_value_gradient_and_stats(impl, groups):
  mesh = _mesh(8)
  x, weights = _inputs()
  variables = _variables()
  y, stats, (d_params, d_x) = _train_step(_BN(impl, groups))(
      _sharded(mesh, variables), _sharded(mesh, x, True), _sharded(mesh, weights, True))

  scale, bias = variables['params']['bn']['scale'], variables['params']['bn']['bias']

  def ref_loss(x, scale, bias):
    out, mean, var = _official_bn(x, scale, bias, replicas=8, groups=groups)
    return jnp.sum(out * weights), (out, mean, var)

  (ref_dx, ref_dscale, ref_dbias), (ref_y, mean, var) = jax.grad(
      ref_loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
  _close(y, ref_y)
  _close(d_x, ref_dx)
  _close(d_params['bn']['scale'], ref_dscale)
  _close(d_params['bn']['bias'], ref_dbias)
  # Running averages take the mean over groups of the group statistics.
  old = variables['batch_stats']['bn']
  _close(stats['bn']['mean'], MOMENTUM * old['mean'] + (1 - MOMENTUM) * jnp.mean(mean, 0))
  _close(stats['bn']['var'], MOMENTUM * old['var'] + (1 - MOMENTUM) * jnp.mean(var, 0))


@pytest.mark.parametrize('impl', IMPLS)
def test_group_statistics_equal_each_half_alone_on_four_devices(impl):
  x, _ = _inputs()
  scale, bias = _variables()['params']['bn'].values()
  if impl == 'flax':
    grouped = lambda x: kernels.grouped_bn_train(x, scale, bias, EPS, jnp.float32, 2)
    whole = lambda x: kernels.grouped_bn_train(x, scale, bias, EPS, jnp.float32, 1)
  else:
    grouped = lambda x: kernels.grouped_bn_act_train(x, scale, bias, EPS, 'swish',
                                                     jnp.float32, 2)
    whole = lambda x: kernels.bn_act_train(x, scale, bias, EPS, 'swish', jnp.float32)
  out, mean, var = jax.jit(grouped)(_sharded(_mesh(8), x, True))
  assert mean.shape == var.shape == (2, x.shape[-1])
  for g, half in enumerate(jnp.split(x, 2)):
    half_out, half_mean, half_var = jax.jit(whole)(_sharded(_mesh(4), half, True))
    _close(out[g * 8:(g + 1) * 8], half_out)
    _close(mean[g], jnp.reshape(half_mean, -1))
    _close(var[g], jnp.reshape(half_var, -1))


def _tiny_model(impl, groups):
  spec = architectures.get_spec('b0')
  spec = dataclasses.replace(spec, stages=spec.stages[:2])
  # No stochastic depth or dropout: the halves must see the same network.
  return create_model(spec, num_classes=10, bn_impl=impl, bn_groups=groups,
                      drop_connect=0.0, dropout=0.0)


@pytest.mark.parametrize('impl', IMPLS)
def test_two_groups_on_eight_devices_equal_each_half_on_four(impl):
  images = jax.random.normal(jax.random.key(2), (16, 32, 32, 3))
  images = images + jnp.arange(16, dtype=jnp.float32)[:, None, None, None] / 8
  variables = _tiny_model(impl, 1).init(jax.random.key(0), images[:1], train=False)

  def run(model, mesh, x):
    step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
    return step(_sharded(mesh, variables), _sharded(mesh, x, True))

  logits, stats = run(_tiny_model(impl, 2), _mesh(8), images)
  halves = [run(_tiny_model(impl, 1), _mesh(4), half) for half in jnp.split(images, 2)]
  _close(logits[:8], halves[0][0])
  _close(logits[8:], halves[1][0])
  # The moving average is linear: one update with the mean over groups is the
  # mean of the updates each half makes on its own.
  expected = jax.tree.map(lambda a, b: (a + b) / 2, halves[0][1], halves[1][1])
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(stats),
                               jax.tree.leaves(expected)):
    assert np.max(np.abs(np.asarray(got) - np.asarray(want))) <= 1e-5 * max(
        1.0, float(np.max(np.abs(want)))), jax.tree_util.keystr(path)


class _FusedBN(nn.Module):
  """The fused path before `bn_groups`: bn_act_train on the batch, nn.BatchNorm's update."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    c = (x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones, c)
    bias = self.param('bias', nn.initializers.zeros, c)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, c)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, c)
    out, mean, var = kernels.bn_act_train(x, scale, bias, EPS, 'swish', jnp.float32)
    mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
    ra_mean.value = MOMENTUM * ra_mean.value + (1 - MOMENTUM) * mean
    ra_var.value = MOMENTUM * ra_var.value + (1 - MOMENTUM) * var
    return out


class _Wrap(nn.Module):
  """`inner` under the submodule name 'bn', like `_BN`."""
  inner: type

  @nn.compact
  def __call__(self, x, train: bool = True):
    return self.inner(name='bn')(x, train)


@pytest.mark.parametrize('impl', IMPLS)
def test_one_group_is_bit_identical_to_global_batch_norm(impl):
  mesh = _mesh(8)
  x, weights = _inputs()
  args = (_sharded(mesh, _variables()), _sharded(mesh, x, True), _sharded(mesh, weights, True))
  reference = _FlaxBN() if impl == 'flax' else _Wrap(_FusedBN)
  expected = _train_step(reference)(*args)
  got = _train_step(_BN(impl, 1))(*args)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('impl', IMPLS)
def test_inference_ignores_groups(impl):
  x, _ = _inputs()
  variables = _variables()
  grouped = _BN(impl, 2).apply(variables, x, False)
  np.testing.assert_array_equal(np.asarray(grouped),
                                np.asarray(_FlaxBN().apply(variables, x, False)))


def test_batch_not_divisible_by_groups_names_both_numbers():
  x, _ = _inputs(batch=6)
  for impl in IMPLS:
    with pytest.raises(ValueError, match=r'bn_groups=4 does not divide the batch of 6 rows'):
      _BN(impl, 4).apply(_variables(), x, True, mutable=['batch_stats'])


@pytest.mark.parametrize('groups', [0, -2, 1.5, True])
def test_bad_bn_groups_rejected(groups):
  with pytest.raises(ValueError, match='bn_groups='):
    create_model('b0', bn_groups=groups)


def test_the_config_sets_the_models_bn_groups(data_root):
  from efficientnet_jax import experiment  # pylint: disable=g-import-not-at-top
  from tests import smoke_run  # pylint: disable=g-import-not-at-top
  build = lambda replicas, **kw: experiment.build_experiment(
      smoke_run.smoke_config(data_root, **kw), device_count=replicas).model.bn_groups
  assert build(8) == 1  # the default keeps the global batch up to 8 replicas
  assert build(8, bn_group_size=4) == 2
  assert build(8, bn_group_size=1) == 8  # the official V1 rule at <= 8 replicas
  assert build(8, bn_group_size=0) == 1
