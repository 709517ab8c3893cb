"""The EfficientNet linen module (V1, Lite, V2) and `create_model`."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from efficientnet_jax import architectures
from efficientnet_jax import layers
from efficientnet_jax.architectures import ModelSpec

Dtype = Any
ENDPOINT_STRIDES = (2, 4, 8, 16, 32)


class EfficientNet(nn.Module):
  """EfficientNet classifier / backbone.

  Attributes:
    spec: the architecture (see `architectures.get_spec` / `compound_spec`).
    num_classes: classifier outputs.
    include_top: False returns the pooled features instead of logits.
    dtype: compute dtype (e.g. bfloat16); params, BN statistics and logits stay fp32.
    padding: 'same' (TF, for TF-trained weights) or 'symmetric' (PyTorch-trained weights).
    depthwise_impl: 'auto', 'grouped' or 'shifted' (see layers.depthwise_conv).
    dropout: head dropout; None uses spec.dropout (progressive learning overrides it).
  """
  spec: ModelSpec
  num_classes: int = 1000
  include_top: bool = True
  dtype: Dtype = jnp.float32
  padding: str = 'same'
  depthwise_impl: str = 'auto'
  dropout: float | None = None

  def _bn(self, x, train, name):
    return nn.BatchNorm(use_running_average=not train, momentum=self.spec.bn_momentum,
                        epsilon=self.spec.bn_epsilon, dtype=self.dtype, name=name)(x)

  @nn.compact
  def __call__(self, x, train: bool = False, return_endpoints: bool = False):
    """Args: x, NHWC images already normalised. Returns logits (or pooled features),
    and with `return_endpoints` also a dict of feature maps: 'stem',
    'reduction_1'..'reduction_5' (strides 2..32, the official endpoints), 'head'."""
    spec = self.spec
    act = layers.activation_fn(spec.activation)
    endpoints = {}
    x = x.astype(self.dtype)
    x = layers.conv(x, spec.stem_ch, 3, 2, padding=self.padding, dtype=self.dtype,
                    name='stem_conv')
    x = act(self._bn(x, train, 'stem_bn'))
    endpoints['stem'] = x
    blocks = spec.blocks()
    reduction = 0
    for block in blocks:
      x = layers.MBConv(block, spec.activation, spec.bn_momentum, spec.bn_epsilon,
                        self.padding, self.depthwise_impl, self.dtype,
                        name=f'block_{block.index}')(x, train)
      # An endpoint is the last block before a stride change (or the last block).
      nxt = block.index + 1
      if nxt == len(blocks) or blocks[nxt].stride > 1:
        reduction += 1
        endpoints[f'reduction_{reduction}'] = x
    x = layers.conv(x, spec.head_features, 1, dtype=self.dtype, name='head_conv')
    x = act(self._bn(x, train, 'head_bn'))
    endpoints['head'] = x
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.include_top:
      rate = spec.dropout if self.dropout is None else self.dropout
      if rate > 0:
        x = nn.Dropout(rate, name='head_dropout')(x, deterministic=not train)
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=layers.dense_kernel_init,
                   name='classifier')(x)
    x = x.astype(jnp.float32)
    return (x, endpoints) if return_endpoints else x


def create_model(name_or_spec: str | ModelSpec, *, drop_connect: float | None = None,
                 **kwargs) -> EfficientNet:
  """Builds the module for a named variant ('b4', 'v2_s', 'lite0', ...) or a ModelSpec.

  Args:
    name_or_spec: a name from `architectures.MODEL_NAMES` or a ModelSpec.
    drop_connect: overrides the stochastic-depth base rate (0.2 by default).
    **kwargs: EfficientNet attributes (num_classes, dtype, padding, ...).
  """
  spec = (architectures.get_spec(name_or_spec) if isinstance(name_or_spec, str)
          else name_or_spec)
  if drop_connect is not None:
    spec = dataclasses.replace(spec, drop_connect=drop_connect)
  if kwargs.get('padding', 'same') not in layers.PADDINGS:
    raise ValueError(f'padding={kwargs["padding"]!r}; accepted: {", ".join(layers.PADDINGS)}')
  layers.resolve_depthwise_impl(kwargs.get('depthwise_impl', 'auto'))  # validates
  return EfficientNet(spec, **kwargs)
