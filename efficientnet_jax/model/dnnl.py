"""oneDNN's depthwise convolution on CPU, called from XLA through `jax.ffi`.

`make kernels` compiles `dnnl_depthwise.cc` against Debian's `libdnnl-dev` into
`_dnnl_depthwise.so` beside this file; without it `available()` is False and
the model keeps its pure-JAX paths. float32 only (bfloat16 takes the JAX path).
The forward and both backward passes are oneDNN primitives (`brdgmm_dw` /
`jit_dw` on AVX-512 machines); `impl_info` names the one serving a shape.
"""

from __future__ import annotations

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_dnnl_depthwise.so')
_TARGETS = {'fwd': 'DnnlDepthwiseFwd', 'bwd_data': 'DnnlDepthwiseBwdData',
            'bwd_weights': 'DnnlDepthwiseBwdWeights'}


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
    jax.ffi.register_ffi_target(f'efficientnet_dnnl_dw_{name}',
                                jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  lib.DnnlDepthwiseImplInfo.restype = ctypes.c_char_p
  lib.DnnlDepthwiseImplInfo.argtypes = [ctypes.c_int64] * 10 + [ctypes.c_int]
  return lib


def available() -> bool:
  return _library() is not None


def impl_info(x_shape, k: int, stride: int, pads, kind: str = 'fwd') -> str:
  """oneDNN's implementation for this shape, e.g. 'jit_dw:avx512_core'."""
  (top, bottom), (left, right) = pads
  n, h, w, c = x_shape
  return _library().DnnlDepthwiseImplInfo(
      n, h, w, c, k, stride, top, bottom, left, right, list(_TARGETS).index(kind)).decode()


def _call(kind: str, out_shape, a, b, stride: int, pads):
  (top, bottom), (left, right) = pads
  return jax.ffi.ffi_call(f'efficientnet_dnnl_dw_{kind}',
                          jax.ShapeDtypeStruct(out_shape, jnp.float32))(
      a, b, stride=np.int64(stride), pad_top=np.int64(top), pad_bottom=np.int64(bottom),
      pad_left=np.int64(left), pad_right=np.int64(right))


def _out_shape(x_shape, k: int, stride: int, pads):
  (top, bottom), (left, right) = pads
  n, h, w, c = x_shape
  return (n, (h + top + bottom - k) // stride + 1, (w + left + right - k) // stride + 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x, kernel, stride: int, pads):
  """NHWC float32 `x` with a (k, k, 1, C) kernel; `pads` = ((top, bottom), (left, right))."""
  return _call('fwd', _out_shape(x.shape, kernel.shape[0], stride, pads), x, kernel, stride, pads)


def _fwd(x, kernel, stride, pads):
  return depthwise_conv(x, kernel, stride, pads), (x, kernel)


def _bwd(stride, pads, residuals, g):
  x, kernel = residuals
  g = g.astype(jnp.float32)
  dx = _call('bwd_data', x.shape, g, kernel, stride, pads)
  dk = _call('bwd_weights', kernel.shape, x, g, stride, pads)
  return dx, dk


depthwise_conv.defvjp(_fwd, _bwd)
