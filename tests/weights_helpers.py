"""Shared pieces of the weight-import tests: small specs, random variables, jitted logits."""

from __future__ import annotations

import dataclasses
import functools

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from efficientnet_jax.model import architectures
from efficientnet_jax.model.architectures import ModelSpec

RESOLUTION = 32  # five stride-2 stages: 32 -> 1
BATCH = 2
ATOL = 1e-4
# ImageNet classes the real weights must give scikit-image's photos.
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def small_spec(name: str, depth: float) -> ModelSpec:
  """A named variant with fewer blocks (every block kind and a repeat > 0 remain)."""
  spec = architectures.get_spec(name)
  return dataclasses.replace(spec, depth=depth, name=f'{spec.name}[depth={depth:g}]')


# b0 at depth 0.3: repeats 1,1,1,1,1,2,1 (DS+SE stage 0, IR+SE, a second repeat).
B0_SMALL = small_spec('b0', 0.3)
# v2_b0 at depth 0.5: repeats 1,1,1,2,3,4 (CN fused e1, ER fused, IR+SE).
V2_SMALL = small_spec('v2_b0', 0.5)


def random_variables(module, seed: int) -> dict:
  """Random variables in init()'s tree, with every BN statistic and bias non-trivial.

  Drawn with numpy from `eval_shape` (an eager or jitted `init` costs 10-40 s of
  compilation on a busy 2-core machine). Kernels follow the official He-normal
  fan-out init, so activations stay O(1) through the net.
  """
  shapes = jax.eval_shape(
      lambda key: module.init(key, jnp.zeros((1, RESOLUTION, RESOLUTION, 3)), train=False),
      jax.random.key(0))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in flax.traverse_util.flatten_dict(shapes).items():
    shape = tuple(leaf.shape)
    if path[-1] == 'kernel' and len(shape) == 4:
      kh, kw, _, out = shape
      fan_out = kh * kw * (1 if 'dw_conv' in path else out)
      value = rng.normal(0.0, np.sqrt(2.0 / fan_out), shape)
    elif path[-1] == 'kernel':
      value = rng.uniform(-1.0, 1.0, shape) / np.sqrt(shape[1])
    elif path[-1] == 'scale':
      value = rng.uniform(0.5, 1.5, shape)
    elif path[-1] in ('bias', 'mean'):
      value = rng.normal(0.0, 0.3, shape)
    elif path[-1] == 'var':
      value = rng.uniform(0.5, 2.0, shape)
    else:
      raise ValueError(f'unexpected variable {path}')
    flat[path] = value.astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat)


@functools.cache
def _logits_fn(module):
  return jax.jit(lambda variables, x: module.apply(variables, x, train=False))


def logits(module, variables) -> np.ndarray:
  """fp32 logits of a fixed random batch (one compilation per module)."""
  images = np.random.default_rng(7).normal(
      0, 1, (BATCH, RESOLUTION, RESOLUTION, 3)).astype(np.float32)
  return np.asarray(_logits_fn(module)(variables, images))


def assert_same_variables(got: dict, expected: dict) -> None:
  got_flat = flax.traverse_util.flatten_dict(got)
  expected_flat = flax.traverse_util.flatten_dict(expected)
  assert set(got_flat) == set(expected_flat)
  for path, value in expected_flat.items():
    np.testing.assert_array_equal(np.asarray(got_flat[path]), np.asarray(value),
                                  err_msg='/'.join(path))


def assert_logit_parity(module, got: dict, expected: dict) -> None:
  want = logits(module, expected)
  have = logits(module, got)
  assert want.std() > 1e-2, 'logits too flat for the tolerance to mean anything'
  diff = float(np.max(np.abs(have - want)))
  assert diff <= ATOL, f'max |dlogit| {diff:.3g} > {ATOL}'
