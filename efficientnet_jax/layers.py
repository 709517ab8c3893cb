"""Linen building blocks: padded convs, depthwise kernels, squeeze-excite, MBConv, Fused-MBConv."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientnet_jax.architectures import Block

Dtype = Any
PADDINGS = ('same', 'symmetric')
DEPTHWISE_IMPLS = ('auto', 'grouped', 'shifted')
CONV_IMPLS = ('auto', 'conv', 'matmul')
BN_IMPLS = ('auto', 'flax', 'fused')


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
  `impl` (see `resolve_conv_impl`) changes how it is computed, never its
  parameters: the kernel is always `name/kernel` of shape (k, k, in, out).
  """
  pads = _pads(x, kernel, stride, padding)
  if resolve_conv_impl(impl) == 'conv':
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=pads, use_bias=False,
                   dtype=dtype, kernel_init=conv_kernel_init(), name=name)(x)
  return MatmulConv(features, kernel, stride, tuple(map(tuple, pads)), dtype, name=name)(x)


def _resolve_impl(field: str, impl: str, accepted: tuple[str, ...], *, cpu: str,
                  native: str) -> str:
  """Validates `impl`; 'auto' becomes `cpu` on XLA:CPU and `native` on GPU/TPU."""
  if impl not in accepted:
    raise ValueError(f'{field}={impl!r}; accepted: {", ".join(accepted)}')
  if impl == 'auto':
    return cpu if jax.default_backend() == 'cpu' else native
  return impl


def resolve_conv_impl(impl: str) -> str:
  """'auto' picks 'matmul' on CPU (see `MatmulConv`), the native conv elsewhere."""
  return _resolve_impl('conv_impl', impl, CONV_IMPLS, cpu='matmul', native='conv')


@jax.custom_vjp
def _pixel_matmul(x, w):
  """(..., in) @ (in, out): a 1x1 conv over every pixel."""
  return jnp.dot(x, w)


def _pixel_matmul_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _pixel_matmul_bwd(residuals, g):
  x, w = residuals
  # The barrier stops XLA fusing the BN/activation backward that produced g into
  # the transposed copy the weight-gradient dot wants: that fused loop walks g
  # column-wise and ran ~10x slower than computing g, then transposing it.
  g = jax.lax.optimization_barrier(g)
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dw = jnp.dot(x2.T, g2, preferred_element_type=jnp.float32).astype(w.dtype)
  return jnp.dot(g, w.T).astype(x.dtype), dw


_pixel_matmul.defvjp(_pixel_matmul_fwd, _pixel_matmul_bwd)


# MatmulConv gathers the k*k taps of a KxK conv into channels (im2col) only
# while that stays cheap: the stem (3 input channels) gains ~3x on XLA:CPU; a
# wide input would multiply the activation memory by k*k.
IM2COL_MAX_CHANNELS = 8


class MatmulConv(nn.Module):
  """A bias-free conv written as a matmul, with nn.Conv's parameter ('kernel', (k, k, in, out)).

  XLA:CPU computes the weight gradient of a 1x1 nn.Conv as a convolution with
  an HxW window over transposed copies of the activations, ~3-5x slower than
  the plain (pixels, in)^T @ (pixels, out) product a dot gets. A KxK conv with
  few input channels becomes im2col + dot; other KxK convs stay nn.Conv-like
  (lax.conv_general_dilated) with the same kernel.
  """
  features: int
  kernel: int
  stride: int
  pads: tuple
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s, c = self.kernel, self.stride, x.shape[-1]
    kernel = self.param('kernel', conv_kernel_init(), (k, k, c, self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if k == 1 and s == 1 and not any(p for pad in self.pads for p in pad):
      return _pixel_matmul(x, kernel[0, 0])
    if c <= IM2COL_MAX_CHANNELS:
      x = jnp.pad(x, ((0, 0), self.pads[0], self.pads[1], (0, 0)))
      out_h = (x.shape[1] - k) // s + 1
      out_w = (x.shape[2] - k) // s + 1
      # (i, j, c) order along channels = the row order of the reshaped HWIO kernel.
      patches = jnp.concatenate([_tap(x, i, j, s, out_h, out_w)
                                 for i in range(k) for j in range(k)], axis=-1)
      return _pixel_matmul(patches, kernel.reshape(k * k * c, self.features))
    return jax.lax.conv_general_dilated(x, kernel, (s, s), self.pads,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def resolve_depthwise_impl(impl: str) -> str:
  """'auto' picks shifted multiply-adds on CPU (XLA:CPU grouped convs are slow), grouped elsewhere."""
  return _resolve_impl('depthwise', impl, DEPTHWISE_IMPLS, cpu='shifted', native='grouped')


def _pad_hw(x, pads):
  return jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))


def _shifted_forward(x, kernel, stride: int):
  """sum over the k*k taps of a strided slice of the (padded) `x` times that tap's weights."""
  k = kernel.shape[0]
  out_h = (x.shape[1] - k) // stride + 1
  out_w = (x.shape[2] - k) // stride + 1
  out = None
  for i in range(k):
    for j in range(k):
      term = _tap(x, i, j, stride, out_h, out_w) * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _tap(x, i: int, j: int, stride: int, out_h: int, out_w: int):
  """The padded input seen by kernel tap (i, j): x[:, i + stride*h, j + stride*w, :]."""
  return jax.lax.slice(x, (0, i, j, 0),
                       (x.shape[0], i + (out_h - 1) * stride + 1,
                        j + (out_w - 1) * stride + 1, x.shape[3]),
                       (1, stride, stride, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted(x, kernel, stride: int, pads):
  return _shifted_forward(_pad_hw(x, pads), kernel, stride)


def _shifted_fwd(x, kernel, stride, pads):
  # Keep only the padded x and the kernel: autodiff of the forward would save
  # all k*k strided taps (k*k times the block's widest activation). The padded
  # x, not x: the weight gradient reads it again, and padding twice cost a
  # kernel and a pass over the activation per block.
  x_pad = _pad_hw(x, pads)
  return _shifted_forward(x_pad, kernel, stride), (x_pad, kernel)


def _shifted_bwd(stride, pads, residuals, g):
  x_pad, kernel = residuals
  k = kernel.shape[0]
  (top, bottom), (left, right) = pads
  in_h, in_w = x_pad.shape[1] - top - bottom, x_pad.shape[2] - left - right
  out_h, out_w = g.shape[1], g.shape[2]
  # d/dx is a stride-1 depthwise conv of g, dilated by the stride and padded so
  # that the flipped kernel lands every tap back on the input pixel it read.
  lo_h, lo_w = k - 1 - top, k - 1 - left
  hi_h = in_h + k - 1 - lo_h - ((out_h - 1) * stride + 1)
  hi_w = in_w + k - 1 - lo_w - ((out_w - 1) * stride + 1)
  g_pad = jax.lax.pad(g, jnp.zeros((), g.dtype),
                      ((0, 0, 0), (lo_h, hi_h, stride - 1), (lo_w, hi_w, stride - 1), (0, 0, 0)))
  dx = _shifted_forward(g_pad, kernel[::-1, ::-1], 1)
  # d/dkernel[i, j] = sum over batch and pixels of tap(i, j) * g, summed over
  # chunks of 2 images (a loop) so a chunk's taps stay in cache. Measured on
  # XLA:CPU for B0's layers at batch 32, this is ~3x faster than k*k batched
  # reductions, and chunks of 2 beat 1, 4 and 8.
  chunk = 2 if x_pad.shape[0] % 2 == 0 else 1

  def one_chunk(n, acc):
    # Sliced from x_pad itself (not a reshaped copy), so XLA pads x once.
    xb = jax.lax.dynamic_slice_in_dim(x_pad, n * chunk, chunk)
    gb = jax.lax.dynamic_slice_in_dim(g, n * chunk, chunk)
    products = tuple(_tap(xb, i, j, stride, out_h, out_w) * gb for i in range(k) for j in range(k))
    if stride == 1:
      # One variadic reduce: a single pass accumulates all k*k sums (XLA
      # otherwise copies each tap out before reducing it).
      sums = jax.lax.reduce(products, tuple(jnp.zeros((), p.dtype) for p in products),
                            lambda a, b: tuple(u + v for u, v in zip(a, b)), (0, 1, 2))
    else:  # strided taps make the variadic loop ~3x slower than separate reduces
      sums = [jnp.sum(p, axis=(0, 1, 2)) for p in products]
    return acc + jnp.stack(sums).astype(acc.dtype)

  acc = jnp.zeros((k * k, x_pad.shape[-1]), jnp.promote_types(x_pad.dtype, jnp.float32))
  dk = jax.lax.fori_loop(0, x_pad.shape[0] // chunk, one_chunk, acc)
  return dx.astype(x_pad.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_shifted.defvjp(_shifted_fwd, _shifted_bwd)


def depthwise_conv(x, kernel, stride: int, pads, impl: str):
  """Depthwise conv of NHWC `x` with a (k, k, 1, C) kernel.

  'grouped' is conv_general_dilated with feature_group_count=C; 'shifted'
  writes it as k*k strided slices times per-channel weights, with a hand
  written backward pass (see `_shifted_bwd`); XLA:CPU runs it several times
  faster than the grouped conv, forward and backward, with equal values.
  """
  if impl == 'grouped':
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=x.shape[-1])
  pads = tuple(tuple(int(p) for p in pad) for pad in pads)  # hashable: a static argument
  return _shifted(x, kernel, stride, pads)


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
    return depthwise_conv(x, kernel, self.stride, pads, resolve_depthwise_impl(self.impl))


def activation_fn(name: str) -> Callable:
  if name == 'swish':
    return nn.swish  # x * sigmoid(x), no trainable beta
  if name == 'relu6':
    return nn.relu6
  raise ValueError(f"activation={name!r}; accepted: swish, relu6")


def _activate(z, act: str | None):
  return z if act is None else activation_fn(act)(z)


def _activation_grad(z, act: str | None):
  """d act(z) / dz, elementwise, in z's dtype."""
  if act is None:
    return jnp.ones_like(z)
  if act == 'swish':
    s = jax.nn.sigmoid(z)
    return s * (1 + z * (1 - s))
  if act == 'relu6':
    return ((z > 0) & (z < 6)).astype(z.dtype)
  raise ValueError(f"activation={act!r}; accepted: swish, relu6")


def _batch_stats(x32, axes):
  # flax's use_fast_variance: E[x^2] - E[x]^2 in one pass, clipped at 0.
  mean = jnp.mean(x32, axes)
  var = jnp.maximum(0.0, jnp.mean(jax.lax.square(x32), axes) - jax.lax.square(mean))
  return mean, var


def _bn_forward(x, scale, bias, mean, var, epsilon, dtype):
  """flax.linen's _normalize, operation for operation: ((x - mean) * (rsqrt(var + eps) * scale) + bias)."""
  mul = jax.lax.rsqrt(var + epsilon) * scale
  return jnp.asarray((x - mean) * mul + bias, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bn_act_train(x, scale, bias, epsilon: float, act: str | None, dtype):
  """Training-mode BN with batch statistics, then `act`: (out, batch mean, batch var)."""
  return _bn_act_train_fwd(x, scale, bias, epsilon, act, dtype)[0]


def _bn_act_train_fwd(x, scale, bias, epsilon, act, dtype):
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean, var = _batch_stats(x32, axes)
  out = _activate(_bn_forward(x, scale, bias, mean, var, epsilon, dtype), act)
  # Only x and per-channel vectors are kept: autodiff would also keep the
  # normalised and the activated tensors, two more activation-sized buffers.
  return (out, mean, var), (x, scale, bias, mean, var)


def _bn_act_train_bwd(epsilon, act, dtype, residuals, cotangents):
  x, scale, bias, mean, var = residuals
  g, g_mean, g_var = cotangents
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  x32 = x.astype(mean.dtype)
  rstd = jax.lax.rsqrt(var + epsilon)
  # Recompute the pre-activation rather than store it (one extra FMA + exp per
  # element), from x plus a zero that depends on g: the recomputation then
  # differs from the forward's, so XLA cannot merge the two (merged, the
  # forward writes its sigmoid out and keeps it alive until here; see remat.py).
  x_late = x + (g.reshape(-1)[0] * 0).astype(x.dtype)
  z = _bn_forward(x_late, scale, bias, mean, var, epsilon, dtype)
  dz = g.astype(mean.dtype) * _activation_grad(z, act).astype(mean.dtype)
  centered = x32 - mean
  d_bias = jnp.sum(dz, axes)
  # sum(dz * centered) taken as sum(dz * x) - mean * sum(dz): XLA:CPU's library
  # reductions take a product into the reduce but not a broadcast subtract, so
  # the direct form writes `centered` out as one more activation-sized tensor.
  # (In fp32 the difference loses about log10(|mean| / std) digits of d_scale;
  # tests/test_performance_paths.py holds it to flax's BN gradient at 1e-5.)
  d_scale = (jnp.sum(dz * x32, axes) - mean * d_bias) * rstd
  # The usual BN backward, plus the (normally zero) cotangents of the batch statistics.
  dx = (scale * rstd) * (dz - d_bias / n - centered * (rstd * d_scale / n))
  dx = dx + g_mean / n + centered * (2.0 * g_var / n)
  return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


_bn_act_train.defvjp(_bn_act_train_fwd, _bn_act_train_bwd)


class FusedBatchNorm(nn.Module):
  """nn.BatchNorm (same variables, statistics and update), fused in training with the activation after it.

  Training uses `_bn_act_train`, whose hand-written backward reads x and the
  incoming gradient twice each and recomputes the activation, where autodiff
  of BN-then-activation makes ~2x more passes over activation-sized tensors
  and keeps 3 of them alive for the backward. In inference there is no
  backward to fuse: the module returns the BN output like nn.BatchNorm (so
  captured intermediates mean the same) and `batch_norm_act` activates it.
  """
  momentum: float = 0.99
  epsilon: float = 1e-3
  dtype: Dtype = jnp.float32
  act: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Returns act(BN(x)) when `train`, BN(x) otherwise."""
    features = (x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(features, jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones(features, jnp.float32))
    if not train:
      return _bn_forward(x, scale, bias, ra_mean.value, ra_var.value, self.epsilon, self.dtype)
    out, mean, var = _bn_act_train(x, scale, bias, self.epsilon, self.act, self.dtype)
    if not self.is_initializing():
      mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return out


def resolve_bn_impl(impl: str) -> str:
  """'auto' picks the fused BN + activation on CPU, flax's nn.BatchNorm elsewhere."""
  return _resolve_impl('bn_impl', impl, BN_IMPLS, cpu='fused', native='flax')


def batch_norm_act(x, train: bool, *, momentum: float, epsilon: float, dtype: Dtype,
                   act: str | None, impl: str, name: str):
  """BN (submodule `name`, nn.BatchNorm's variables) followed by `act` (None: identity).

  Call it inside a compact method. impl 'flax' is nn.BatchNorm then the
  activation; 'fused' is `FusedBatchNorm`, equal in value and gradient.
  """
  if resolve_bn_impl(impl) == 'flax':
    x = nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                     dtype=dtype, name=name)(x)
    return _activate(x, act)
  x = FusedBatchNorm(momentum, epsilon, dtype, act, name=name)(x, train)
  return x if train else _activate(x, act)


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
    s = activation_fn(self.activation)(s)
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

  def _bn(self, x, train, name, act=None):
    # Statistics and scale/bias stay fp32 whatever the compute dtype.
    return batch_norm_act(x, train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                          dtype=self.dtype, act=act, impl=self.bn_impl, name=name)

  @nn.compact
  def __call__(self, x, train: bool = False, drop_rate=None, drop_mask=None):
    """`drop_rate` (a traced scalar) replaces block.drop_rate: scanned repeats differ only in it.
    `drop_mask` ([B, 1, 1, 1], see remat.drop_mask) replaces the block's own stochastic depth."""
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
      elif drop_rate is not None:
        # block.drop_rate > 0 says statically whether stochastic depth is on at all.
        if train and b.drop_rate > 0:
          x = _drop_connect(x, drop_rate, self.make_rng('dropout'))
      elif b.drop_rate > 0:
        # Per-sample mask [B,1,1,1] with 1/keep rescale: stochastic depth.
        x = nn.Dropout(b.drop_rate, broadcast_dims=(1, 2, 3), name='drop_connect')(
            x, deterministic=not train)
      x = x + inputs
    return x
