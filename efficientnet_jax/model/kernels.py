"""XLA:CPU fast paths as pure functions with hand-written backward passes.

Each computes exactly what a plain JAX formulation computes (tests hold them to
it): a 1x1 conv as a dot, the depthwise conv as shifted multiply-adds, and
training-mode batch norm fused with the activation after it (also per group of
rows, the official TPU grouped statistics: `grouped_bn_act_train`, with
`grouped_bn_train` its plain autodiff twin). The linen modules
that own the parameters live in `blocks.py`; 'auto' picks these on CPU only.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientnet_jax.model import dnnl

DEPTHWISE_IMPLS = ('auto', 'grouped', 'shifted', 'dnnl')
CONV_IMPLS = ('auto', 'conv', 'matmul', 'dnnl')
BN_IMPLS = ('auto', 'flax', 'fused')


def _resolve_impl(field: str, impl: str, accepted: tuple[str, ...], *, cpu: str,
                  native: str) -> str:
  """Validates `impl`; 'auto' becomes `cpu` on XLA:CPU and `native` on GPU/TPU."""
  if impl not in accepted:
    raise ValueError(f'{field}={impl!r}; accepted: {", ".join(accepted)}')
  if impl == 'auto':
    return cpu if jax.default_backend() == 'cpu' else native
  return impl


def _dnnl_or(fallback: str) -> str:
  """'dnnl' where `auto` may use it, else `fallback` (a pure-JAX formulation).

  oneDNN serves one CPU device: its `jax.ffi` call has no sharding rule, so
  under a multi-device sharding XLA would gather its operands onto every
  device. Without `make kernels` the pure-JAX path runs.
  """
  return 'dnnl' if dnnl.available() and jax.device_count() == 1 else fallback


def resolve_conv_impl(impl: str) -> str:
  """'auto' on CPU: oneDNN's conv on one device when built, else 'matmul' (`MatmulConv`).

  Elsewhere the native conv. 'dnnl' (oneDNN through `jax.ffi`, CPU, float32)
  needs the library `make kernels` builds.
  """
  resolved = _resolve_impl('conv_impl', impl, CONV_IMPLS, cpu='auto', native='conv')
  return _check_dnnl('conv_impl', _dnnl_or('matmul') if resolved == 'auto' else resolved)


def resolve_depthwise_impl(impl: str) -> str:
  """'auto' on CPU: oneDNN on one device when built, else shifted multiply-adds.

  (XLA:CPU's grouped convs are slow.) Elsewhere the grouped conv. 'dnnl'
  (oneDNN through `jax.ffi`, CPU, float32) needs the library `make kernels` builds.
  """
  resolved = _resolve_impl('depthwise', impl, DEPTHWISE_IMPLS, cpu='auto', native='grouped')
  return _check_dnnl('depthwise', _dnnl_or('shifted') if resolved == 'auto' else resolved)


def _check_dnnl(field: str, impl: str) -> str:
  if impl == 'dnnl' and jax.default_backend() != 'cpu':
    raise ValueError(f"{field}='dnnl' is a CPU kernel; this backend is "
                     f"{jax.default_backend()}: use 'auto'")
  if impl == 'dnnl' and not dnnl.available():
    raise ValueError(f"{field}='dnnl' needs {dnnl.LIBRARY}: run `make kernels` (g++ and "
                     "Debian's libdnnl-dev), or use 'auto'")
  return impl


def resolve_bn_impl(impl: str) -> str:
  """'auto' picks the fused BN + activation on CPU, flax's nn.BatchNorm elsewhere."""
  return _resolve_impl('bn_impl', impl, BN_IMPLS, cpu='fused', native='flax')


@jax.custom_vjp
def pixel_matmul(x, w):
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


pixel_matmul.defvjp(_pixel_matmul_fwd, _pixel_matmul_bwd)


# MatmulConv gathers the k*k taps of a KxK conv into channels (im2col) only
# while that stays cheap: the stem (3 input channels) gains ~3x on XLA:CPU; a
# wide input would multiply the activation memory by k*k.
IM2COL_MAX_CHANNELS = 8


def matmul_conv(x, kernel, stride: int, pads):
  """The conv of NHWC `x` with an HWIO `kernel`, as a dot where XLA:CPU runs that faster.

  A 1x1 conv is a dot over pixels (`pixel_matmul`); a KxK conv with few input
  channels becomes im2col + dot; other KxK convs stay lax.conv_general_dilated.
  """
  k, s, c = kernel.shape[0], stride, x.shape[-1]
  features = kernel.shape[-1]
  if k == 1 and s == 1 and not any(p for pad in pads for p in pad):
    return pixel_matmul(x, kernel[0, 0])
  if c <= IM2COL_MAX_CHANNELS:
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h = (x.shape[1] - k) // s + 1
    out_w = (x.shape[2] - k) // s + 1
    # (i, j, c) order along channels = the row order of the reshaped HWIO kernel.
    patches = jnp.concatenate([_tap(x, i, j, s, out_h, out_w)
                               for i in range(k) for j in range(k)], axis=-1)
    return pixel_matmul(patches, kernel.reshape(k * k * c, features))
  return jax.lax.conv_general_dilated(x, kernel, (s, s), pads,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


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
  'dnnl' calls oneDNN's primitives (`dnnl.py`) for float32; other dtypes take
  the shifted path.
  """
  pads_static = tuple(tuple(int(p) for p in pad) for pad in pads)
  if impl == 'dnnl' and x.dtype == jnp.float32 and kernel.dtype == jnp.float32:
    return dnnl.conv(x, kernel, stride, pads_static)
  if impl == 'grouped':
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=x.shape[-1])
  return _shifted(x, kernel, stride, pads_static)  # hashable pads: a static argument


def activation_fn(name: str) -> Callable:
  if name == 'swish':
    return nn.swish  # x * sigmoid(x), no trainable beta
  if name == 'relu6':
    return nn.relu6
  raise ValueError(f"activation={name!r}; accepted: swish, relu6")


def activate(z, act: str | None):
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


def batch_stats(x32, axes):
  # flax's use_fast_variance: E[x^2] - E[x]^2 in one pass, clipped at 0.
  mean = jnp.mean(x32, axes)
  var = jnp.maximum(0.0, jnp.mean(jax.lax.square(x32), axes) - jax.lax.square(mean))
  return mean, var


def bn_forward(x, scale, bias, mean, var, epsilon, dtype):
  """flax.linen's _normalize, op for op: (x - mean) * (rsqrt(var + eps) * scale) + bias."""
  mul = jax.lax.rsqrt(var + epsilon) * scale
  return jnp.asarray((x - mean) * mul + bias, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def bn_act_train(x, scale, bias, epsilon: float, act: str | None, dtype):
  """Training-mode BN with batch statistics, then `act`: (out, batch mean, batch var)."""
  return _bn_act_train_fwd(x, scale, bias, epsilon, act, dtype)[0]


def _bn_act_train_fwd(x, scale, bias, epsilon, act, dtype):
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean, var = batch_stats(x32, axes)
  out = activate(bn_forward(x, scale, bias, mean, var, epsilon, dtype), act)
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
  z = bn_forward(x_late, scale, bias, mean, var, epsilon, dtype)
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


bn_act_train.defvjp(_bn_act_train_fwd, _bn_act_train_bwd)


# Grouped batch statistics, as the official TPU training computes them:
# tensorflow/tpu models/official/efficientnet/utils.py (7dc921f)
# `TpuBatchNormalization._moments` lines 142-166 and google/automl
# efficientnetv2/utils.py (6a54c87) `TpuBatchNormalization._moments` lines
# 183-202. Each replica takes its shard's mean m_r and variance v_r; a group
# of replicas then shares
#   group mean     = avg_r m_r
#   group variance = avg_r (v_r + m_r^2) - (group mean)^2      (E[x^2] - E[x]^2).
# Every replica holds the same number of rows, so avg_r m_r is the mean of the
# group's rows and avg_r (v_r + m_r^2) their mean square: the formula is
# `batch_stats` (flax's fast variance) over the group's rows, which is what we
# compute. The one difference is flax's clip of a round-off-negative variance
# at 0, kept so that a single group equals the global statistics exactly.


def split_groups(x, groups: int):
  """[B, ...] -> [groups, B // groups, ...]: consecutive rows form a group.

  Under the trainer's P('data') batch sharding replica r holds rows
  [r * b, (r + 1) * b) of the global batch, so a group of consecutive rows is
  a group of consecutive replicas, as in the official `group_assignment`.

  Raises:
    ValueError: `groups` does not divide the batch.
  """
  batch = x.shape[0]
  if batch % groups:
    raise ValueError(f'bn_groups={groups} does not divide the batch of {batch} rows: every '
                     f'batch-norm group needs the same number of rows (use a multiple of '
                     f'{groups})')
  return x.reshape((groups, batch // groups) + x.shape[1:])


def grouped_bn_train(x, scale, bias, epsilon: float, dtype, groups: int):
  """Training-mode BN where each group of rows uses its own batch statistics.

  Plain JAX (autodiff differentiates it), nn.BatchNorm's operations on each
  group: statistics in at least fp32, then `bn_forward`.

  Returns:
    (out like x, mean [groups, C], var [groups, C]).
  """
  xg = split_groups(x, groups)
  axes = tuple(range(1, xg.ndim - 1))
  mean, var = batch_stats(xg.astype(jnp.promote_types(x.dtype, jnp.float32)), axes)
  # [groups, 1, ..., 1, C]: one statistic per group, broadcast over its rows.
  shape = (groups,) + (1,) * len(axes) + (x.shape[-1],)
  out = bn_forward(xg, scale, bias, mean.reshape(shape), var.reshape(shape), epsilon, dtype)
  return out.reshape(x.shape), mean, var


def grouped_bn_act_train(x, scale, bias, epsilon: float, act: str | None, dtype, groups: int):
  """`bn_act_train` on each group of rows: (out like x, mean [groups, C], var [groups, C]).

  A vmap of the custom VJP over the groups: JAX batches its hand-written
  forward and backward rules, so each group keeps the fused backward (and its
  memory saving), and sums the per-group scale / bias cotangents because
  scale and bias are not mapped.
  """
  fn = lambda xg: bn_act_train(xg, scale, bias, epsilon, act, dtype)
  out, mean, var = jax.vmap(fn)(split_groups(x, groups))
  return out.reshape(x.shape), mean, var
