"""Linen layers: padded convs, depthwise conv, batch norm, squeeze-excite, (Fused-)MBConv."""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientnet_jax.model import dnnl
from efficientnet_jax.model import kernels
from efficientnet_jax.model.architectures import Block

Dtype = Any
PADDINGS = ('same', 'symmetric')


def conv_kernel_init(groups: int = 1) -> Callable:
  """Untruncated normal(0, sqrt(2 / fan_out)) with a group-aware fan_out.

  fan_out = kh * kw * out / groups, as the official code computes it on TF's
  [k, k, C, 1] depthwise kernel. jax's variance_scaling would see the flax
  depthwise kernel (k, k, 1, C) and use k*k*C, making the std sqrt(C) too small.
  """

  def init(key, shape, dtype=jnp.float32):
    kh, kw, _, out = shape
    fan_out = kh * kw * out // groups
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_out)

  return init


def dense_kernel_init(key, shape, dtype=jnp.float32):
  """uniform(+-1/sqrt(num_classes)), the official classifier init."""
  bound = 1.0 / math.sqrt(shape[1])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def conv_padding(size: int, kernel: int, stride: int, mode: str) -> tuple[int, int]:
  """Pads of one spatial dim. 'same' is TF SAME (extra pixel after); 'symmetric' is PyTorch's."""
  if mode == 'same':
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2
  if mode == 'symmetric':
    return (kernel - 1) // 2, (kernel - 1) // 2
  raise ValueError(f'padding={mode!r}; accepted: {", ".join(PADDINGS)}')


def _pads(x, kernel: int, stride: int, mode: str):
  return [conv_padding(x.shape[1], kernel, stride, mode),
          conv_padding(x.shape[2], kernel, stride, mode)]


def conv(x, features: int, kernel: int = 1, stride: int = 1, *, padding: str = 'same',
         dtype: Dtype = jnp.float32, impl: str = 'conv', name: str):
  """A bias-free KxK conv with TF-SAME or symmetric padding and the official init.

  Call it inside a compact method: the conv becomes a submodule called `name`.
  `impl` (see `kernels.resolve_conv_impl`) changes how it is computed, never its
  parameters: the kernel is always `name/kernel` of shape (k, k, in, out).
  """
  pads = _pads(x, kernel, stride, padding)
  impl = kernels.resolve_conv_impl(impl)
  if impl == 'conv':
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=pads, use_bias=False,
                   dtype=dtype, kernel_init=conv_kernel_init(), name=name)(x)
  return MatmulConv(features, kernel, stride, tuple(map(tuple, pads)), dtype, impl, name=name)(x)


class MatmulConv(nn.Module):
  """A bias-free conv written as a matmul, with nn.Conv's parameter ('kernel', (k, k, in, out)).

  XLA:CPU computes the weight gradient of a 1x1 nn.Conv as a convolution with
  an HxW window over transposed copies of the activations, ~3-5x slower than
  the plain (pixels, in)^T @ (pixels, out) product a dot gets. A KxK conv with
  few input channels becomes im2col + dot; other KxK convs stay nn.Conv-like
  (lax.conv_general_dilated) with the same kernel. impl='dnnl' calls oneDNN's
  convolution instead (float32; other dtypes take the matmul path).
  """
  features: int
  kernel: int
  stride: int
  pads: tuple
  dtype: Dtype = jnp.float32
  impl: str = 'matmul'

  @nn.compact
  def __call__(self, x):
    k, c = self.kernel, x.shape[-1]
    kernel = self.param('kernel', conv_kernel_init(), (k, k, c, self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.impl == 'dnnl' and x.dtype == jnp.float32:
      return dnnl.conv(x, kernel, self.stride, self.pads)
    return kernels.matmul_conv(x, kernel, self.stride, self.pads)


class DepthwiseConv(nn.Module):
  """Depthwise KxK conv; the kernel is flax's grouped layout (k, k, 1, C)."""
  kernel: int
  stride: int = 1
  padding: str = 'same'
  impl: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param('kernel', conv_kernel_init(groups=channels),
                        (self.kernel, self.kernel, 1, channels), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    pads = _pads(x, self.kernel, self.stride, self.padding)
    return kernels.depthwise_conv(x, kernel, self.stride, pads,
                                  kernels.resolve_depthwise_impl(self.impl))


def group_average(mean, var):
  """The statistics the running averages take from [groups, C] group statistics: their mean.

  Officially (tensorflow/tpu and google/automl `TpuBatchNormalization`, the
  files cited in kernels.py) the Keras base layer updates `moving_mean` /
  `moving_variance` on every replica with that replica's *group* statistics
  and no all-reduce follows, so the copies of different groups drift apart;
  which value a checkpoint gets is the runtime's business (keras-team/tf-keras
  `tf_keras/layers/normalization/batch_normalization.py` `build`, 6add81a,
  declares them ON_READ / MEAN: read as the mean over replicas). Our state is
  one replicated copy. The moving average is linear in its input, so updating
  it with the mean over groups gives exactly the mean of the per-group copies:
  the MEAN read, the expected value of any one replica's copy (groups are
  exchangeable), and what the official `DistributedBatchNormalization` does
  explicitly (tensorflow/tpu `models/official/efficientnet/utils.py` lines
  244-248 at 7dc921f: a cross-replica mean before `assign_sub`). The variance
  is the mean of the group variances, not the variance of the global batch.
  """
  return jnp.mean(mean, axis=0), jnp.mean(var, axis=0)


def _bn_variables(module: nn.Module, features: tuple[int]):
  """nn.BatchNorm's variables: params 'scale', 'bias'; batch_stats 'mean', 'var' (fp32)."""
  scale = module.param('scale', nn.initializers.ones, features, jnp.float32)
  bias = module.param('bias', nn.initializers.zeros, features, jnp.float32)
  ra_mean = module.variable('batch_stats', 'mean', lambda: jnp.zeros(features, jnp.float32))
  ra_var = module.variable('batch_stats', 'var', lambda: jnp.ones(features, jnp.float32))
  return scale, bias, ra_mean, ra_var


def _update_running(module: nn.Module, ra_mean, ra_var, mean, var, momentum: float):
  """nn.BatchNorm's update of the running averages (none while initializing)."""
  if module.is_initializing():
    return
  mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
  ra_mean.value = momentum * ra_mean.value + (1 - momentum) * mean
  ra_var.value = momentum * ra_var.value + (1 - momentum) * var


class FusedBatchNorm(nn.Module):
  """nn.BatchNorm (same variables, statistics and update), fused in training with the activation.

  Training uses `kernels.bn_act_train`, whose hand-written backward reads x and the
  incoming gradient twice each and recomputes the activation, where autodiff
  of BN-then-activation makes ~2x more passes over activation-sized tensors
  and keeps 3 of them alive for the backward. In inference there is no
  backward to fuse: the module returns the BN output like nn.BatchNorm (so
  captured intermediates mean the same) and `batch_norm_act` activates it.
  With `groups` > 1 training normalises each group of consecutive rows by its
  own statistics (`kernels.grouped_bn_act_train`, the same custom VJP per
  group) and the running averages take their `group_average`.
  """
  momentum: float = 0.99
  epsilon: float = 1e-3
  dtype: Dtype = jnp.float32
  act: str | None = None
  groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Returns act(BN(x)) when `train`, BN(x) otherwise."""
    scale, bias, ra_mean, ra_var = _bn_variables(self, (x.shape[-1],))
    if not train:
      return kernels.bn_forward(x, scale, bias, ra_mean.value, ra_var.value, self.epsilon,
                                self.dtype)
    if self.groups == 1:
      out, mean, var = kernels.bn_act_train(x, scale, bias, self.epsilon, self.act, self.dtype)
    else:
      out, mean, var = kernels.grouped_bn_act_train(x, scale, bias, self.epsilon, self.act,
                                                    self.dtype, self.groups)
      mean, var = group_average(mean, var)
    _update_running(self, ra_mean, ra_var, mean, var, self.momentum)
    return out


class GroupedBatchNorm(nn.Module):
  """Training-mode nn.BatchNorm with per-group statistics (`groups` > 1), same variables.

  Each group of consecutive rows is normalised by its own batch statistics
  (`kernels.grouped_bn_train`, plain JAX: autodiff gives the gradient); the
  running averages take their `group_average`. Inference and `groups` == 1
  use nn.BatchNorm itself (see `batch_norm_act`).
  """
  momentum: float = 0.99
  epsilon: float = 1e-3
  dtype: Dtype = jnp.float32
  groups: int = 2

  @nn.compact
  def __call__(self, x):
    scale, bias, ra_mean, ra_var = _bn_variables(self, (x.shape[-1],))
    out, mean, var = kernels.grouped_bn_train(x, scale, bias, self.epsilon, self.dtype,
                                              self.groups)
    _update_running(self, ra_mean, ra_var, *group_average(mean, var), self.momentum)
    return out


def check_bn_groups(groups) -> int:
  """`groups` if it is an int >= 1 (batch-norm groups), else a ValueError."""
  if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
    raise ValueError(f'bn_groups={groups!r}; accepted: an int >= 1 (1: statistics over the '
                     'whole batch)')
  return groups


def batch_norm_act(x, train: bool, *, momentum: float, epsilon: float, dtype: Dtype,
                   act: str | None, impl: str, name: str, groups: int = 1):
  """BN (submodule `name`, nn.BatchNorm's variables) followed by `act` (None: identity).

  Call it inside a compact method. impl 'flax' is nn.BatchNorm then the
  activation; 'fused' is `FusedBatchNorm`, equal in value and gradient.
  `groups` > 1 splits the batch into that many groups of consecutive rows,
  each normalised by its own statistics in training (the official TPU
  grouped BN, see kernels.py); 1 is the whole batch, exactly as before.
  """
  check_bn_groups(groups)
  if kernels.resolve_bn_impl(impl) == 'flax':
    if train and groups > 1:
      x = GroupedBatchNorm(momentum, epsilon, dtype, groups, name=name)(x)
    else:
      x = nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                       dtype=dtype, name=name)(x)
    return kernels.activate(x, act)
  x = FusedBatchNorm(momentum, epsilon, dtype, act, groups, name=name)(x, train)
  return x if train else kernels.activate(x, act)


class _PoolConv(nn.Module):
  """A 1x1 conv with bias on a pooled [batch, channels] vector, with nn.Conv's parameters.

  Written as a dot: on the 1x1 image a conv's backward makes XLA copy a
  transposed kernel for every SE layer, a dot contracts the kernel as it lies.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, s):
    kernel = self.param('kernel', conv_kernel_init(), (1, 1, s.shape[-1], self.features),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    s, kernel, bias = s.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    return jnp.dot(s, kernel[0, 0]) + bias


class SqueezeExcite(nn.Module):
  """Global pool -> 1x1 reduce (bias) -> act -> 1x1 expand (bias) -> sigmoid gate."""
  se_ch: int
  activation: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2))
    s = _PoolConv(self.se_ch, self.dtype, name='reduce')(s)
    s = kernels.activation_fn(self.activation)(s)
    s = _PoolConv(x.shape[-1], self.dtype, name='expand')(s)
    return x * nn.sigmoid(s)[:, None, None, :]


class MBConv(nn.Module):
  """Inverted residual: [expand 1x1] -> depthwise -> [SE] -> project 1x1 -> [drop-connect + skip].

  A Fused-MBConv (`block.fused`) replaces expand+depthwise by one KxK conv; with
  expand 1 it is a single KxK conv + BN + act and no projection. Fused blocks never have SE.
  """
  block: Block
  activation: str = 'swish'
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  padding: str = 'same'
  depthwise_impl: str = 'auto'
  dtype: Dtype = jnp.float32
  conv_impl: str = 'conv'
  bn_impl: str = 'flax'
  bn_groups: int = 1

  def _bn(self, x, train, name, act=None):
    # Statistics and scale/bias stay fp32 whatever the compute dtype.
    return batch_norm_act(x, train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                          dtype=self.dtype, act=act, impl=self.bn_impl, name=name,
                          groups=self.bn_groups)

  @nn.compact
  def __call__(self, x, train: bool = False, drop_mask=None):
    """`drop_mask` ([B, 1, 1, 1], from `EfficientNet._drop_masks`) replaces the block's own
    stochastic depth, so the network, remat and scanned stages share one draw."""
    b = self.block
    inputs = x
    if b.fused:
      if b.expand != 1:
        x = conv(x, b.expanded_ch, b.kernel, b.stride, padding=self.padding,
                 dtype=self.dtype, impl=self.conv_impl, name='fused_conv')
        x = self._bn(x, train, 'fused_bn', self.activation)
        x = conv(x, b.out_ch, 1, dtype=self.dtype, impl=self.conv_impl, name='project_conv')
        x = self._bn(x, train, 'project_bn')
      else:
        x = conv(x, b.out_ch, b.kernel, b.stride, padding=self.padding,
                 dtype=self.dtype, impl=self.conv_impl, name='fused_conv')
        x = self._bn(x, train, 'fused_bn', self.activation)
    else:
      if b.expand != 1:
        x = conv(x, b.expanded_ch, 1, dtype=self.dtype, impl=self.conv_impl, name='expand_conv')
        x = self._bn(x, train, 'expand_bn', self.activation)
      x = DepthwiseConv(b.kernel, b.stride, self.padding, self.depthwise_impl, self.dtype,
                        name='dw_conv')(x)
      x = self._bn(x, train, 'dw_bn', self.activation)
      if b.se_ch:
        x = SqueezeExcite(b.se_ch, self.activation, self.dtype, name='se')(x)
      x = conv(x, b.out_ch, 1, dtype=self.dtype, impl=self.conv_impl, name='project_conv')
      x = self._bn(x, train, 'project_bn')
    if b.residual:
      if drop_mask is not None:
        x = x * drop_mask
      elif b.drop_rate > 0:
        # Per-sample mask [B,1,1,1] with 1/keep rescale: stochastic depth.
        x = nn.Dropout(b.drop_rate, broadcast_dims=(1, 2, 3), name='drop_connect')(
            x, deterministic=not train)
      x = x + inputs
    return x
