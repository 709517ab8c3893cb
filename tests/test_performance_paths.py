"""The CPU fast paths compute the same numbers as the plain ones (speed: scripts/benchmark.py).

Every opt-in or platform-picked formulation is checked against the reference
one on tiny inputs: values, gradients and BN statistics to 1e-5 relative.
"""

import dataclasses
import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet_jax import state as state_lib
from efficientnet_jax import steps
from efficientnet_jax.model import architectures
from efficientnet_jax import cpu_tuning
from efficientnet_jax.model import blocks
from efficientnet_jax.model import dnnl
from efficientnet_jax.model import kernels
from efficientnet_jax import optim
from efficientnet_jax.model import remat as remat_lib
from efficientnet_jax.model import create_model, infer, resolve_infer_chunk
from efficientnet_jax.model import stack_block_variables, unstack_block_variables
from tests.script_loader import load_script

RTOL = 1e-5
SLOW = dict(depthwise_impl='grouped', conv_impl='conv', bn_impl='flax')
# (kernel, stride, size, padding): odd and even sizes, both paddings, strides 1 and 2.
DEPTHWISE_CASES = [
    (3, 1, 8, 'same'), (3, 2, 8, 'same'), (3, 2, 9, 'same'), (5, 2, 9, 'same'),
    (5, 1, 7, 'symmetric'), (3, 2, 7, 'symmetric'), (5, 2, 12, 'same'), (5, 2, 6, 'same')]
NEEDS_DNNL = pytest.mark.skipif(not dnnl.available(), reason='`make kernels` did not build oneDNN')


def _tiny(name, stages=3, **changes):
  spec = architectures.get_spec(name)
  return dataclasses.replace(spec, stages=spec.stages[:stages], **changes)


def _assert_close(actual, expected, rtol=RTOL):
  """max |actual - expected| <= rtol * max |expected| over the whole tree, and per leaf 10x looser.

  Float32 round-off scales with the largest values a computation goes
  through, so the tree-wide bound is the 1e-5 relative one. A small leaf
  computed from large ones (a BN bias gradient that sums terms which nearly
  cancel, a BN mean of zero-mean data) carries round-off from those: per leaf
  the bound is 10x rtol against its own scale, or 1e-3 of the tree's largest.
  """
  pairs = [(jax.tree_util.keystr(path), np.asarray(a, np.float64), np.asarray(b, np.float64))
           for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual),
                                   jax.tree.leaves(expected))]
  assert len(pairs) == len(jax.tree.leaves(expected))
  for name, a, b in pairs:
    assert a.shape == b.shape, (name, a.shape, b.shape)
  scale = max(float(np.max(np.abs(b))) for _, _, b in pairs)
  worst = max(float(np.max(np.abs(a - b))) for _, a, b in pairs)
  assert worst <= rtol * scale, f'{worst} > {rtol} * {scale}'
  for name, a, b in pairs:
    leaf_scale = max(float(np.max(np.abs(b))), 1e-3 * scale, 1e-12)
    err = float(np.max(np.abs(a - b)))
    assert err <= 10 * rtol * leaf_scale, f'{name}: {err} > {10 * rtol} * {leaf_scale}'


# ----------------------------------------------------------------------------- depthwise


def _shifted_autodiff(x, kernel, stride, pads):
  """The shifted forward differentiated by JAX (what 'shifted' was before its custom VJP)."""
  return kernels._shifted_forward(kernels._pad_hw(x, pads), kernel, stride)


def _depthwise_inputs(kernel, stride, size, padding):
  """A non-square NHWC input, a (k, k, 1, C) kernel and the pads of one DEPTHWISE_CASES row."""
  x = jax.random.normal(jax.random.key(0), (3, size, size + 1, 5))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, 5))
  pads = [blocks.conv_padding(size, kernel, stride, padding),
          blocks.conv_padding(size + 1, kernel, stride, padding)]
  return x, w, pads


@pytest.mark.parametrize('kernel,stride,size,padding', DEPTHWISE_CASES)
def test_shifted_depthwise_custom_vjp_matches_autodiff_and_grouped(kernel, stride, size, padding):
  x, w, pads = _depthwise_inputs(kernel, stride, size, padding)
  fns = {'custom': lambda x, w: kernels.depthwise_conv(x, w, stride, pads, 'shifted'),
         'autodiff': lambda x, w: _shifted_autodiff(x, w, stride, pads),
         'grouped': lambda x, w: kernels.depthwise_conv(x, w, stride, pads, 'grouped')}
  outs = {k: f(x, w) for k, f in fns.items()}
  np.testing.assert_array_equal(outs['custom'], outs['autodiff'])  # same forward ops
  _assert_close(outs['custom'], outs['grouped'])
  grads = {k: jax.grad(lambda x, w, f=f: jnp.sum(jnp.sin(f(x, w)) * x.sum()), argnums=(0, 1))(x, w)
           for k, f in fns.items()}
  _assert_close(grads['custom'], grads['autodiff'])
  _assert_close(grads['custom'], grads['grouped'])


@NEEDS_DNNL
@pytest.mark.parametrize('kernel,stride,size,padding', DEPTHWISE_CASES)
def test_dnnl_depthwise_matches_grouped(kernel, stride, size, padding):
  x, w, pads = _depthwise_inputs(kernel, stride, size, padding)
  fns = {impl: jax.jit(lambda x, w, impl=impl: kernels.depthwise_conv(x, w, stride, pads, impl))
         for impl in ('dnnl', 'grouped')}
  _assert_close(fns['dnnl'](x, w), fns['grouped'](x, w))
  grads = {k: jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(jnp.sin(f(x, w)) * x.sum()),
                               argnums=(0, 1)))(x, w) for k, f in fns.items()}
  _assert_close(grads['dnnl'], grads['grouped'])
  # oneDNN's optimised kernels serve B0's shapes, not its reference loops.
  for kind in ('fwd', 'bwd_data', 'bwd_weights'):
    info = dnnl.impl_info((32, 56, 56, 144), (3, 3, 1, 144), stride, ((1, 1), (1, 1)), kind)
    assert 'ref' not in info and 'error' not in info, (kind, info)


def test_dnnl_is_refused_with_the_fix_where_it_cannot_run(monkeypatch):
  monkeypatch.setattr(dnnl, 'available', lambda: False)
  with pytest.raises(ValueError, match=r"depthwise='dnnl' needs .*_dnnl_conv.so: run "
                                       r'`make kernels`'):
    kernels.resolve_depthwise_impl('dnnl')
  with pytest.raises(ValueError, match=r"conv_impl='dnnl' needs .*_dnnl_conv.so"):
    kernels.resolve_conv_impl('dnnl')
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  with pytest.raises(ValueError, match="depthwise='dnnl' is a CPU kernel; this backend is gpu"):
    kernels.resolve_depthwise_impl('dnnl')


def test_shifted_depthwise_bfloat16_keeps_dtypes():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (3, 3, 1, 4), jnp.bfloat16)
  dx, dw = jax.grad(lambda x, w: jnp.sum(kernels.depthwise_conv(x, w, 1, [(1, 1)] * 2,
                                                               'shifted').astype(jnp.float32)),
                    argnums=(0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- convs


class _Conv(nn.Module):
  features: int
  kernel: int
  stride: int
  impl: str

  @nn.compact
  def __call__(self, x):
    return blocks.conv(x, self.features, self.kernel, self.stride, impl=self.impl, name='c')


@pytest.mark.parametrize('kernel,stride,channels,size', [
    (1, 1, 6, 5), (3, 2, 3, 9), (3, 2, 3, 8), (3, 1, 4, 7), (3, 2, 12, 9), (5, 2, 10, 11)])
@pytest.mark.parametrize('impl', ['matmul', pytest.param('dnnl', marks=NEEDS_DNNL)])
def test_fast_convs_match_nn_conv(kernel, stride, channels, size, impl):
  x = jax.random.normal(jax.random.key(0), (2, size, size, channels))
  ref, fast = _Conv(7, kernel, stride, 'conv'), _Conv(7, kernel, stride, impl)
  variables = ref.init(jax.random.key(1), x)
  fast_vars = fast.init(jax.random.key(1), x)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), fast_vars, variables))
  _assert_close(fast.apply(variables, x), ref.apply(variables, x))

  def grads(m):
    return jax.grad(lambda v, x: jnp.sum(jnp.sin(m.apply(v, x))), argnums=(0, 1))(variables, x)

  _assert_close(grads(fast), grads(ref))


def test_bad_conv_and_bn_impl_names():
  with pytest.raises(ValueError, match='conv_impl'):
    create_model('b0', conv_impl='winograd')
  with pytest.raises(ValueError, match='bn_impl'):
    create_model('b0', bn_impl='sync')


# ----------------------------------------------------------------------------- batch norm


class _Norm(nn.Module):
  impl: str
  act: str | None
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    return blocks.batch_norm_act(x, train, momentum=0.9, epsilon=1e-3, dtype=self.dtype,
                                 act=self.act, impl=self.impl, name='bn')


@pytest.mark.parametrize('act', ['swish', 'relu6', None])
def test_fused_batch_norm_matches_flax(act):
  x = 3 * jax.random.normal(jax.random.key(0), (4, 5, 5, 6)) + 1
  ref, fast = _Norm('flax', act), _Norm('fused', act)
  variables = ref.init(jax.random.key(1), x, False)
  assert jax.tree.structure(fast.init(jax.random.key(1), x, False)) == jax.tree.structure(
      variables)
  variables = {'params': {'bn': {'scale': jnp.linspace(0.5, 2, 6), 'bias': jnp.linspace(-1, 1, 6)}},
               'batch_stats': {'bn': {'mean': jnp.full(6, 0.3), 'var': jnp.full(6, 2.0)}}}
  _assert_close(fast.apply(variables, x, False), ref.apply(variables, x, False))

  def train(m):
    def loss(params, x):
      out, upd = m.apply({'params': params, 'batch_stats': variables['batch_stats']}, x, True,
                         mutable=['batch_stats'])
      return jnp.sum(jnp.sin(out) * jnp.arange(6)), (out, upd)
    (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables['params'], x)
    return aux, grads

  (out_f, stats_f), grads_f = train(fast)
  (out_r, stats_r), grads_r = train(ref)
  _assert_close(out_f, out_r)
  _assert_close(stats_f, stats_r)
  _assert_close(grads_f, grads_r)


def test_fused_batch_norm_bfloat16_compute():
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 8))
  ref, fast = _Norm('flax', 'swish', jnp.bfloat16), _Norm('fused', 'swish', jnp.bfloat16)
  variables = ref.init(jax.random.key(1), x, False)
  out_f, _ = fast.apply(variables, x, True, mutable=['batch_stats'])
  out_r, _ = ref.apply(variables, x, True, mutable=['batch_stats'])
  assert out_f.dtype == out_r.dtype == jnp.bfloat16
  np.testing.assert_allclose(out_f.astype(jnp.float32), out_r.astype(jnp.float32), atol=2e-2)


# ----------------------------------------------------------------------------- whole models


def _train_outputs(model, variables, x, rng=None):
  """(loss, updated batch_stats, grads) of a training-mode pass."""
  def loss(params):
    out, upd = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                           train=True, mutable=['batch_stats'],
                           rngs={'dropout': rng if rng is not None else jax.random.key(9)})
    return jnp.sum(jnp.sin(out)), upd
  (value, upd), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  return value, upd, grads


@pytest.mark.parametrize('name,fast_kwargs,rtol', [
    ('b0', {}, RTOL), ('lite0', {}, RTOL), ('v2_b0', {}, RTOL),
    # oneDNN's kernels sum in their own order; training-mode BN over 64 values
    # amplifies that round-off to ~1e-5 of the loss.
    pytest.param('b0', {'depthwise_impl': 'dnnl'}, 3 * RTOL, marks=NEEDS_DNNL),
    pytest.param('b0', {'depthwise_impl': 'dnnl', 'conv_impl': 'dnnl'}, 3 * RTOL,
                 marks=NEEDS_DNNL)])
def test_cpu_defaults_match_reference_paths(name, fast_kwargs, rtol):
  # drop_connect and dropout off: the two paths then compute the same function.
  # Batch 4 at 32 px over 3 stages keeps every BN over >= 64 values: with BN over
  # 8 values (batch 2, a 2x2 map) fp32 round-off alone reaches 2e-5 of the gradient.
  spec = _tiny(name, drop_connect=0.0, dropout=0.0)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  ref = create_model(spec, num_classes=10, **SLOW)
  # 'auto' everything: the fast paths on CPU
  fast = create_model(spec, num_classes=10, **fast_kwargs)
  variables = jax.jit(ref.init)(jax.random.key(1), x)
  fast_vars = jax.jit(fast.init)(jax.random.key(1), x)
  # Same parameter tree and the same initial values.
  assert jax.tree.structure(fast_vars) == jax.tree.structure(variables)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), fast_vars, variables))
  _assert_close(jax.jit(fast.apply)(variables, x), jax.jit(ref.apply)(variables, x), rtol)
  loss_f, stats_f, grads_f = _train_outputs(fast, variables, x)
  loss_r, stats_r, grads_r = _train_outputs(ref, variables, x)
  _assert_close(loss_f, loss_r, rtol)
  _assert_close(stats_f, stats_r, rtol)
  _assert_close(grads_f, grads_r, rtol)


def test_cpu_train_opt_level_compiles_the_same_train_step():
  # LLVM -O1 (train.py's CPU default) against XLA's -O3: the same state after two steps.
  spec = _tiny('b0')
  model = create_model(spec, num_classes=10)
  tx = optim.make_optimizer(name='rmsprop', learning_rate=0.01, weight_decay=1e-5,
                            weight_decay_mask=optim.weight_decay_mask, flat=True)
  state = jax.jit(functools.partial(state_lib.create_train_state, model=model, tx=tx, image_size=32,
                                    layout='flat'))(jax.random.key(0))
  batch = {'image': jax.random.normal(jax.random.key(1), (4, 32, 32, 3)),
           'label': jax.nn.one_hot(jnp.arange(4) % 10, 10)}
  step = functools.partial(steps.train_step, model=model, tx=tx, ema_decay=0.99,
                           label_smoothing=0.1)
  options = cpu_tuning.train_compiler_options('cpu')
  assert options == {'xla_backend_optimization_level': cpu_tuning.CPU_TRAIN_OPT_LEVEL}
  assert cpu_tuning.train_compiler_options('gpu') is None
  with pytest.raises(ValueError, match=r'^cpu_train_opt_level=5; accepted: 0, 1, 2 or 3 '):
    cpu_tuning.train_compiler_options('cpu', 5)
  states = []
  for opts in (options, {'xla_backend_optimization_level': 3}):
    jitted, s = jax.jit(step, compiler_options=opts), state
    for i in range(2):
      s, _ = jitted(s, batch, jax.random.key(i))
    states.append(s)
  _assert_close(states[0], states[1])


def test_remat_matches_default():
  spec = _tiny('b0', drop_connect=0.0)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  plain, remat = create_model(spec, num_classes=10), create_model(spec, num_classes=10, remat=True)
  variables = jax.jit(plain.init)(jax.random.key(1), x)
  assert jax.tree.structure(jax.jit(remat.init)(jax.random.key(1), x)) == jax.tree.structure(
      variables)
  np.testing.assert_array_equal(jax.jit(remat.apply)(variables, x),
                                jax.jit(plain.apply)(variables, x))
  for got, want in zip(_train_outputs(remat, variables, x), _train_outputs(plain, variables, x)):
    _assert_close(got, want)


def test_remat_with_drop_mask_matches_plain_block():
  # Stochastic depth on: the recomputation must see the forward pass's mask.
  block = architectures.Block(index=0, stage=0, in_ch=8, out_ch=8, kernel=3, stride=1,
                              expand=4, se_ch=2, fused=False, drop_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 8))
  mask = jnp.asarray([2.0, 0.0, 2.0, 0.0]).reshape(4, 1, 1, 1)  # rate 0.5: dropped or 1/keep

  class Wrapped(nn.Module):
    use_remat: bool

    @nn.compact
    def __call__(self, x):
      mb = blocks.MBConv(block, name='block')
      return remat_lib.remat_call(mb, x, mask) if self.use_remat else mb(x, True, drop_mask=mask)

  variables = Wrapped(False).init(jax.random.key(1), x)

  def outputs(use_remat):
    def loss(params, x):
      out, upd = Wrapped(use_remat).apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, x,
          mutable=['batch_stats'])
      return jnp.sum(jnp.sin(out)), upd
    (value, upd), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        variables['params'], x)
    return value, upd, grads

  for got, want in zip(outputs(True), outputs(False)):
    _assert_close(got, want)


def _train_step_temp_mb(model, x):
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)

  def loss(params, batch_stats, x):
    out, upd = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                           mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)})
    return jnp.sum(out), upd
  compiled = jax.jit(jax.grad(loss, has_aux=True)).lower(
      variables['params'], variables['batch_stats'], x).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def test_remat_cuts_train_step_memory():
  # XLA's buffer assignment, known at compile time: deterministic. Measured
  # 63 -> 23 MB here; nn.remat per block gave no saving on XLA:CPU (remat.py).
  spec = _tiny('b0')
  x = jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.float32)
  plain = _train_step_temp_mb(create_model(spec, num_classes=10), x)
  rematted = _train_step_temp_mb(create_model(spec, num_classes=10, remat=True), x)
  assert rematted < 0.6 * plain, (rematted, plain)


@pytest.mark.parametrize('remat', [False, True])
def test_scan_blocks_matches_default(remat):
  spec = _tiny('b0', stages=4, drop_connect=0.0)  # stage repeats 1, 2, 2, 3
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  plain = create_model(spec, num_classes=10)
  scanned = create_model(spec, num_classes=10, scan_blocks=True, remat=remat)
  variables = jax.jit(plain.init)(jax.random.key(1), x)
  stacked = stack_block_variables(variables, spec)
  scan_init = jax.jit(scanned.init)(jax.random.key(1), x)
  assert jax.tree.structure(scan_init) == jax.tree.structure(stacked)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape, scan_init, stacked))
  # Stage 3 is blocks 5, 6, 7: the first alone, its two repeats scanned.
  assert 'stage_3_repeats' in stacked['params'] and 'block_5' in stacked['params']
  assert 'block_6' not in stacked['params'] and 'block_7' not in stacked['params']
  # The layouts convert both ways without loss.
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                   unstack_block_variables(stacked, spec), variables))
  out, ends = jax.jit(functools.partial(scanned.apply, return_endpoints=True))(stacked, x)
  ref_out, ref_ends = jax.jit(functools.partial(plain.apply, return_endpoints=True))(variables, x)
  _assert_close(out, ref_out)
  _assert_close(ends, ref_ends)
  loss, stats, grads = _train_outputs(scanned, stacked, x)
  ref_loss, ref_stats, ref_grads = _train_outputs(plain, variables, x)
  _assert_close(loss, ref_loss)
  _assert_close(unstack_block_variables(stats, spec), ref_stats)
  _assert_close(unstack_block_variables({'params': grads}, spec)['params'], ref_grads)


def test_scan_blocks_stochastic_depth_drops_whole_samples():
  spec = _tiny('b0', stages=4, drop_connect=0.9)
  x = jax.random.normal(jax.random.key(0), (16, 16, 16, 3))
  model = create_model(spec, num_classes=10, scan_blocks=True, include_top=False)
  variables = jax.jit(model.init)(jax.random.key(1), x)
  run = jax.jit(lambda v, k: model.apply(v, x, train=True, mutable=['batch_stats'],
                                         rngs={'dropout': k})[0])
  a, b = run(variables, jax.random.key(2)), run(variables, jax.random.key(3))
  assert np.all(np.isfinite(a)) and not np.allclose(a, b)  # masks differ with the key
  # Eval mode is deterministic and ignores the rates.
  np.testing.assert_array_equal(jax.jit(model.apply)(variables, x),
                                jax.jit(model.apply)(variables, x))


def test_stochastic_depth_masks_are_one_draw_shared_by_remat_and_scan():
  # One draw for the network: the plain, rematerialised and scanned models see
  # the same masks for the same key, so with stochastic depth on they still
  # compute the same function (scan: up to the stacked layout).
  spec = _tiny('b0', stages=4, drop_connect=0.6)  # stage repeats 1, 2, 2, 3
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  plain = create_model(spec, num_classes=10, dropout=0.0)
  variables = jax.jit(plain.init)(jax.random.key(1), x)

  def train_logits(model, variables):
    return jax.jit(lambda v: model.apply(v, x, train=True, mutable=['batch_stats'],
                                         rngs={'dropout': jax.random.key(2)})[0])(variables)

  want = train_logits(plain, variables)
  assert not np.allclose(want, train_logits(create_model(spec, num_classes=10, dropout=0.0,
                                                         drop_connect=0.0), variables))
  _assert_close(train_logits(create_model(spec, num_classes=10, dropout=0.0, remat=True),
                             variables), want)
  scanned = create_model(spec, num_classes=10, dropout=0.0, scan_blocks=True)
  _assert_close(train_logits(scanned, stack_block_variables(variables, spec)), want)

  blocks = spec.blocks()
  masks = np.asarray(plain.apply(variables, blocks, 4096, method=plain._drop_masks,
                                 rngs={'dropout': jax.random.key(4)}))
  assert masks.shape == (len(blocks), 4096, 1, 1, 1)
  for b, m in zip(blocks, masks[:, :, 0, 0, 0]):
    if not (b.residual and b.drop_rate > 0):
      np.testing.assert_array_equal(m, 1.0)
      continue
    keep = 1.0 - b.drop_rate
    np.testing.assert_allclose(m[m != 0], 1.0 / keep, rtol=1e-6)  # dropped, or scaled by 1/keep
    # The kept fraction is Binomial(4096, keep) / 4096: 5 standard deviations.
    assert abs(np.mean(m > 0) - keep) < 5 * np.sqrt(keep * (1 - keep) / 4096), b.index
  # Blocks draw independently: the kept indicators of two dropping blocks are
  # uncorrelated (5 standard deviations of a correlation over 4096 samples).
  i, j = [b.index for b in blocks if b.residual and b.drop_rate > 0][:2]
  corr = np.corrcoef(masks[i, :, 0, 0, 0] > 0, masks[j, :, 0, 0, 0] > 0)[0, 1]
  assert abs(corr) < 5 / np.sqrt(4096), corr


def test_infer_micro_batches_match_apply():
  spec = _tiny('b0')
  x = jax.random.normal(jax.random.key(0), (6, 16, 16, 3))
  model = create_model(spec, num_classes=10)
  variables = jax.jit(model.init)(jax.random.key(1), x)
  ref = jax.jit(functools.partial(model.apply, return_endpoints=True))(variables, x)
  for chunk in (0, 1, 4, 'auto'):  # 4 does not divide 6: 3-image chunks
    got = jax.jit(lambda v, x, c=chunk: infer(model, v, x, chunk=c, return_endpoints=True))(
        variables, x)
    _assert_close(got, ref)
  assert [resolve_infer_chunk(c, 6) for c in (0, 1, 4, 6, 64)] == [6, 1, 3, 6, 6]
  with pytest.raises(ValueError, match='infer_chunk'):
    resolve_infer_chunk(-1, 6)


# ----------------------------------------------------------------------------- process tuning


def test_tune_malloc_takes_effect_under_glibc():
  # glibc (Linux here and on CI) accepts both mallopt settings; other C
  # libraries make it a no-op that reports False.
  import platform  # pylint: disable=g-import-not-at-top
  expected = platform.libc_ver()[0] == 'glibc'
  assert cpu_tuning.tune_malloc() is expected


_ALLOC_AND_FREE = r"""
import ctypes, sys
from efficientnet_jax import cpu_tuning
if sys.argv[1] == 'tuned':
  assert cpu_tuning.tune_malloc()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
p = libc.malloc(size)
ctypes.memset(p, 1, size)  # a step's buffer, touched
libc.free(p)
print(int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20)  # resident MiB
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')
def test_tuned_malloc_keeps_freed_blocks_resident():
  # Untuned, glibc unmaps a freed 256 MiB block and the next step faults every
  # page in again; tuned, it stays in the heap. (Threads on glibc's per-thread
  # arenas still get such blocks from mmap: see cpu_tuning.py.)
  repo = os.path.dirname(os.path.dirname(__file__))
  resident = {}
  for mode in ('default', 'tuned'):
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
    out = subprocess.run([sys.executable, '-c', _ALLOC_AND_FREE, mode], cwd=repo, env=env,
                         capture_output=True, text=True, check=True).stdout
    resident[mode] = int(out.split()[-1])
  assert resident['default'] < 200, resident
  assert resident['tuned'] >= 256, resident


_STEP_FAULTS = r"""
import resource, sys
from efficientnet_jax import cpu_tuning
cpu_tuning.tune_process() if sys.argv[1] == 'inline' else cpu_tuning.tune_malloc()
import jax, jax.numpy as jnp
x = jnp.ones((1 << 25,), jnp.float32)  # 128 MiB: above glibc's per-thread arena heaps
step = jax.jit(lambda x: (x * 2.0)[::-1] + x)
for _ in range(4):  # the heap reaches its steady state
  step(x).block_until_ready()
faults = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[2])  # the median call's
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')
def test_inline_cpu_dispatch_stops_a_step_from_refaulting_its_buffers():
  # With JAX's async dispatch a worker thread allocates the 128 MiB output, from
  # mmap, and every call faults all of its 32,768 pages in again; run inline
  # (train.py's setting) it comes from the tuned main heap and is reused (a call
  # may still grow the heap once, hence the median call).
  repo = os.path.dirname(os.path.dirname(__file__))
  env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
  env['XLA_FLAGS'] = ''  # one CPU device: the single-device path train.py takes
  faults = {}
  for mode in ('async', 'inline'):
    out = subprocess.run([sys.executable, '-c', _STEP_FAULTS, mode], cwd=repo, env=env,
                         capture_output=True, text=True, check=True).stdout
    faults[mode] = int(out.split()[-1])
  assert faults['async'] >= 30_000, faults
  assert faults['inline'] < 1_000, faults


def _benchmark_module():
  return load_script('benchmark')


def test_benchmark_system_specs_and_ratios():
  bench = _benchmark_module()
  assert bench.parse_system('ours:remat=1,xla=--a=1+--b=2') == (
      'ours', {'remat': '1', 'xla': '--a=1+--b=2'})
  with pytest.raises(ValueError):
    bench.parse_system('caffe')
  assert bench.split_systems('ours,ours:remat=1,bn_impl=flax,keras_tf:threads=1') == [
      'ours', 'ours:remat=1,bn_impl=flax', 'keras_tf:threads=1']
  systems = {'ours': {'train_img_s': 6.0, 'eval_img_s': 30.0},
             'keras_tf': {'train_img_s': 5.0, 'eval_img_s': 40.0},
             'torch': {'skipped': 'ModuleNotFoundError'}}
  assert bench.ratios(systems, ['train', 'eval']) == {
      'ours / keras_tf': {'train': 1.2, 'eval': 0.75}}
  env = bench.worker_env({'xla': '--x=1+--y=2'}, 'tuned', '--z=3')
  assert env['MALLOC_MMAP_MAX_'] == '0' and env['XLA_FLAGS'].endswith('--z=3 --x=1 --y=2')
  assert 'MALLOC_MMAP_MAX_' not in bench.worker_env({'malloc': 'default'}, 'tuned', '')


def test_benchmark_reports_a_worker_killed_between_questions():
  # A worker the kernel kills for memory between two turns is skipped, not a crash.
  bench = _benchmark_module()
  worker = bench.Worker.__new__(bench.Worker)
  worker.proc = subprocess.Popen([sys.executable, '-c', 'import os, signal; '
                                  'os.kill(os.getpid(), signal.SIGKILL)'],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  worker.proc.wait()
  reply = worker.ask({'cmd': 'run'}, timeout=5)
  assert reply == {'error': 'worker exited with code -9 (SIGKILL: out of memory? `--isolate` '
                            'runs one system at a time)'}
