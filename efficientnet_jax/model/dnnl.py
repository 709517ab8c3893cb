"""oneDNN's convolutions on CPU, called from XLA through `jax.ffi`.

`make kernels` compiles `dnnl_conv.cc` against Debian's `libdnnl-dev` into
`_dnnl_conv.so` beside this file; without it `available()` is False and the
model keeps its pure-JAX paths. `'auto'` uses these kernels on one CPU device
(`kernels.resolve_depthwise_impl`). float32 only (bfloat16 takes the JAX path).
`conv` takes an HWIO kernel: (k, k, 1, C) is a depthwise conv, (k, k, Cin,
Cout) an ordinary one. The forward and both backward passes are oneDNN
primitives (`brdgmm_dw` / `jit_dw` for depthwise convs on AVX-512 machines);
`impl_info` names the one serving a shape.
"""

from __future__ import annotations

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_dnnl_conv.so')
_TARGETS = {'fwd': 'DnnlConvFwd', 'bwd_data': 'DnnlConvBwdData',
            'bwd_weights': 'DnnlConvBwdWeights'}


@functools.cache
def _library() -> ctypes.CDLL | None:
  """The loaded library with its FFI targets registered, or None if it is not built."""
  if not os.path.exists(LIBRARY):
    return None
  try:
    lib = ctypes.CDLL(LIBRARY)
  except OSError:  # built here, copied to a machine without libdnnl
    return None
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(f'efficientnet_dnnl_conv_{name}',
                                jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  lib.DnnlConvImplInfo.restype = ctypes.c_char_p
  lib.DnnlConvImplInfo.argtypes = [ctypes.c_int64] * 12 + [ctypes.c_int]
  return lib


def available() -> bool:
  return _library() is not None


def impl_info(x_shape, kernel_shape, stride: int, pads, kind: str = 'fwd') -> str:
  """oneDNN's implementation for this conv, e.g. 'jit_dw:avx512_core'."""
  (top, bottom), (left, right) = pads
  n, h, w, c = x_shape
  k, _, per_group, out = kernel_shape
  return _library().DnnlConvImplInfo(
      n, h, w, c, out, k, stride, top, bottom, left, right, c // per_group,
      list(_TARGETS).index(kind)).decode()


def _call(kind: str, out_shape, a, b, stride: int, pads):
  (top, bottom), (left, right) = pads
  return jax.ffi.ffi_call(f'efficientnet_dnnl_conv_{kind}',
                          jax.ShapeDtypeStruct(out_shape, jnp.float32))(
      a, b, stride=np.int64(stride), pad_top=np.int64(top), pad_bottom=np.int64(bottom),
      pad_left=np.int64(left), pad_right=np.int64(right))


def _out_shape(x_shape, kernel_shape, stride: int, pads):
  (top, bottom), (left, right) = pads
  n, h, w, _ = x_shape
  k, out = kernel_shape[0], kernel_shape[3]
  return (n, (h + top + bottom - k) // stride + 1, (w + left + right - k) // stride + 1, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, kernel, stride: int, pads):
  """NHWC float32 `x`, HWIO kernel ((k, k, 1, C): depthwise); pads ((top, bot), (left, right))."""
  return _call('fwd', _out_shape(x.shape, kernel.shape, stride, pads), x, kernel, stride, pads)


def _fwd(x, kernel, stride, pads):
  return conv(x, kernel, stride, pads), (x, kernel)


def _bwd(stride, pads, residuals, g):
  x, kernel = residuals
  g = g.astype(jnp.float32)
  dx = _call('bwd_data', x.shape, g, kernel, stride, pads)
  dk = _call('bwd_weights', kernel.shape, x, g, stride, pads)
  return dx, dk


conv.defvjp(_fwd, _bwd)
