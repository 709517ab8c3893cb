"""The EfficientNet linen module (V1, Lite, V2) and `create_model`."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientnet_jax.model import architectures
from efficientnet_jax.model import blocks as blocks_lib
from efficientnet_jax.model import kernels
from efficientnet_jax.model import remat as remat_lib
from efficientnet_jax.model.architectures import ModelSpec

Dtype = Any


class EfficientNet(nn.Module):
  """EfficientNet classifier / backbone.

  Attributes:
    spec: the architecture (see `architectures.get_spec` / `compound_spec`).
    num_classes: classifier outputs.
    include_top: False returns the pooled features instead of logits.
    dtype: compute dtype (e.g. bfloat16); params, BN statistics and logits stay fp32.
    padding: 'same' (TF, for TF-trained weights) or 'symmetric' (PyTorch-trained weights).
    depthwise_impl: 'auto', 'grouped' or 'shifted' (see kernels.depthwise_conv).
    conv_impl: 'auto', 'conv' or 'matmul' (see blocks.MatmulConv); never changes
      the parameters.
    bn_impl: 'auto', 'flax' or 'fused' (BN + activation with a hand-written
      backward, see blocks.FusedBatchNorm); same variables either way.
    dropout: head dropout; None uses spec.dropout (progressive learning overrides it).
    remat: recompute each block's activations in the backward pass (see
      `remat.py`; `nn.remat` inside scanned stages): less memory for ~1 extra
      forward pass. Same parameters; stochastic depth draws different (equally
      distributed) masks.
    scan_blocks: run the repeats of each stage (every block after its first,
      which share shapes) as one `nn.scan`, so XLA compiles one body per stage
      instead of one per block. Their parameters are then stacked under
      `stage_{s}_repeats/block` (see `stack_block_variables`), and stochastic
      depth draws different (equally distributed) masks.
    bn_groups: how many groups of consecutive rows the (global) batch is split
      into for training-mode batch-norm statistics, each group normalised by
      its own mean / variance (the official TPU grouped BN; see
      `blocks.batch_norm_act`). With the batch sharded P('data') a group is
      data_replicas // bn_groups consecutive replicas, so set it to
      data_replicas // group_size. 1: statistics over the whole global batch.
      The batch must divide by it; inference never depends on it.
  """
  spec: ModelSpec
  num_classes: int = 1000
  include_top: bool = True
  dtype: Dtype = jnp.float32
  padding: str = 'same'
  depthwise_impl: str = 'auto'
  dropout: float | None = None
  conv_impl: str = 'auto'
  bn_impl: str = 'auto'
  remat: bool = False
  scan_blocks: bool = False
  bn_groups: int = 1

  def _bn(self, x, train, name, act=None):
    return blocks_lib.batch_norm_act(x, train, momentum=self.spec.bn_momentum,
                                 epsilon=self.spec.bn_epsilon, dtype=self.dtype, act=act,
                                 impl=self.bn_impl, name=name, groups=self.bn_groups)

  def _block_kwargs(self) -> dict:
    spec = self.spec
    return dict(activation=spec.activation, bn_momentum=spec.bn_momentum,
                bn_epsilon=spec.bn_epsilon, padding=self.padding,
                depthwise_impl=self.depthwise_impl, dtype=self.dtype,
                conv_impl=self.conv_impl, bn_impl=self.bn_impl, bn_groups=self.bn_groups)

  @nn.compact
  def __call__(self, x, train: bool = False, return_endpoints: bool = False):
    """Args: x, NHWC images already normalised. Returns logits (or pooled features),
    and with `return_endpoints` also a dict of feature maps: 'stem',
    'reduction_1'..'reduction_5' (strides 2..32, the official endpoints), 'head'."""
    spec = self.spec
    endpoints = {}
    x = x.astype(self.dtype)
    x = blocks_lib.conv(x, spec.stem_ch, 3, 2, padding=self.padding, dtype=self.dtype,
                    impl=self.conv_impl, name='stem_conv')
    x = self._bn(x, train, 'stem_bn', spec.activation)
    endpoints['stem'] = x
    blocks = spec.blocks()
    masks = self._drop_masks(blocks, x.shape[0]) if train else None
    reduction = 0
    for stage, run in _stage_runs(blocks, self.scan_blocks):
      first, last = run[0].index, run[-1].index
      if len(run) == 1:
        block = blocks_lib.MBConv(run[0], **self._block_kwargs(), name=f'block_{first}')
        mask = None if masks is None or not _drops(run[0]) else masks[first]
        if self.remat and train:
          x = remat_lib.remat_call(block, x, mask)
        else:
          x = block(x, train, drop_mask=mask)
      else:
        x = _ScanRepeats(run[0], len(run), train, self.remat,
                         tuple(sorted(self._block_kwargs().items())),
                         name=f'stage_{stage}_repeats')(
            x, None if masks is None or not _drops(run[0]) else masks[first:last + 1])
      # An endpoint is the last block before a stride change (or the last block).
      nxt = last + 1
      if nxt == len(blocks) or blocks[nxt].stride > 1:
        reduction += 1
        endpoints[f'reduction_{reduction}'] = x
    x = blocks_lib.conv(x, spec.head_features, 1, dtype=self.dtype, impl=self.conv_impl,
                    name='head_conv')
    x = self._bn(x, train, 'head_bn', spec.activation)
    endpoints['head'] = x
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.include_top:
      rate = spec.dropout if self.dropout is None else self.dropout
      if rate > 0:
        x = nn.Dropout(rate, name='head_dropout')(x, deterministic=not train)
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=blocks_lib.dense_kernel_init,
                   name='classifier')(x)
    x = x.astype(jnp.float32)
    return (x, endpoints) if return_endpoints else x

  def _drop_masks(self, blocks, batch: int):
    """Every block's stochastic-depth multiplier, [num_blocks, B, 1, 1, 1], from one draw.

    One uniform draw for the whole network instead of a key and a Bernoulli
    draw per block: on XLA:CPU each draw is its own handful of threefry kernels
    (a while loop each), and compile time follows the kernel count. A block's rows are
    0 w.p. its drop rate, else 1 / (1 - rate), as `nn.Dropout(rate,
    broadcast_dims=(1, 2, 3))` would draw them. Drawn outside the blocks, so a
    rematerialised block (remat.py) and a scanned stage see the same masks.
    Returns None when no block drops.
    """
    if not any(_drops(b) for b in blocks):
      return None
    keep = jnp.asarray([1.0 - b.drop_rate if _drops(b) else 1.0 for b in blocks], jnp.float32)
    u = jax.random.uniform(self.make_rng('dropout'), (len(blocks), batch))
    masks = jnp.where(u < keep[:, None], 1.0 / keep[:, None], 0.0).astype(self.dtype)
    return masks[:, :, None, None, None]


def _drops(block) -> bool:
  """Whether stochastic depth applies to `block` (a residual block with a rate > 0)."""
  return block.residual and block.drop_rate > 0


def _stage_runs(blocks, scan: bool) -> list[tuple[int, list]]:
  """(stage, blocks) runs in order: every block alone, or with `scan` a stage's repeats together.

  A stage's first block changes stride and width, so it always runs alone; the
  rest of the stage (same shapes in and out) forms one run.
  """
  runs = []  # (stage, blocks, scannable)
  for b in blocks:
    first = b.index == 0 or blocks[b.index - 1].stage != b.stage
    if not scan or first:
      runs.append((b.stage, [b], False))
    elif not runs[-1][2]:
      runs.append((b.stage, [b], True))
    else:
      runs[-1][1].append(b)
  return [(stage, run) for stage, run, _ in runs]


class _RepeatBody(nn.Module):
  """One repeat of a stage as an nn.scan body: carry x, per-step drop rate."""
  block: architectures.Block
  train: bool
  block_kwargs: Any

  @nn.compact
  def __call__(self, x, drop_mask):
    return blocks_lib.MBConv(self.block, **dict(self.block_kwargs), name='block')(
        x, self.train, drop_mask=drop_mask), None


class _ScanRepeats(nn.Module):
  """`length` identical blocks (a stage's repeats) as one nn.scan; parameters stacked on axis 0."""
  block: architectures.Block
  length: int
  train: bool
  remat: bool
  block_kwargs: Any

  @nn.compact
  def __call__(self, x, drop_masks):
    """`drop_masks`: [length, B, 1, 1, 1] (EfficientNet._drop_masks), or None: no drops."""
    body = nn.remat(_RepeatBody) if self.remat else _RepeatBody
    scan = nn.scan(body, variable_axes={'params': 0, 'batch_stats': 0},
                   split_rngs={'params': True}, in_axes=0, length=self.length)
    x, _ = scan(self.block, self.train, self.block_kwargs, name='scan')(x, drop_masks)
    return x


def _scanned_runs(spec: ModelSpec) -> list[tuple[int, list[int]]]:
  """(stage, block indices) of every scanned run of `spec`."""
  return [(stage, [b.index for b in run]) for stage, run in _stage_runs(spec.blocks(), True)
          if len(run) > 1]


def stack_block_variables(variables: dict, spec: ModelSpec) -> dict:
  """Default layout (block_0 .. block_N) -> the `scan_blocks=True` layout (same values)."""
  out = {}
  for collection, tree in variables.items():
    tree = dict(tree)
    for stage, indices in _scanned_runs(spec):
      parts = [tree.pop(f'block_{i}') for i in indices if f'block_{i}' in tree]
      if parts:
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *parts)
        tree[f'stage_{stage}_repeats'] = {'scan': {'block': stacked}}
    out[collection] = tree
  return out


def unstack_block_variables(variables: dict, spec: ModelSpec) -> dict:
  """The `scan_blocks=True` layout -> the default one (inverse of `stack_block_variables`)."""
  out = {}
  for collection, tree in variables.items():
    tree = dict(tree)
    for stage, indices in _scanned_runs(spec):
      stacked = tree.pop(f'stage_{stage}_repeats', None)
      if stacked is None:
        continue
      for n, i in enumerate(indices):
        tree[f'block_{i}'] = jax.tree.map(lambda leaf, n=n: leaf[n], stacked['scan']['block'])
    out[collection] = tree
  return out


# Images per inference micro-batch that 'auto' picks on CPU. XLA:CPU runs a
# layer over the whole batch before the next one starts, so at batch 64 and
# 224 px every activation (up to 300 MB for B0's expanded 112x112 maps) goes
# out to DRAM and back; a few images at a time keep it smaller, while too few
# leave each conv call too little work. B0, 224 px, batch 64 on the 2-core
# AVX-512 Xeon (2026-12-05, oneDNN kernels, one interleaved run of
# scripts/benchmark.py `--modes eval` with `ours:infer_chunk=N`): 115 img/s at
# 4, 137-154 at 8, 154-162 at 16, 156 at 32, 133 at the whole batch.
CPU_INFER_CHUNK = 16


def resolve_infer_chunk(chunk: int | str, batch: int) -> int:
  """Images per micro-batch: `chunk` ('auto': CPU_INFER_CHUNK on CPU, the whole batch
  elsewhere; 0: the whole batch), lowered to the largest divisor of `batch`."""
  if chunk == 'auto':
    chunk = CPU_INFER_CHUNK if jax.default_backend() == 'cpu' else 0
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
    raise ValueError(f'infer_chunk={chunk!r}; accepted: \'auto\' or an int >= 0 (0: whole batch)')
  if chunk == 0 or chunk >= batch:
    return batch
  return max(d for d in range(1, chunk + 1) if batch % d == 0)


def infer(model: EfficientNet, variables: dict, images, *, chunk: int | str = 'auto', **kwargs):
  """`model.apply(variables, images, train=False, **kwargs)`, run in micro-batches.

  Inference treats every image on its own (BN uses its running statistics), so
  a `lax.map` over chunks of `chunk` images returns the same outputs (up to
  fp32 round-off in reductions) while each chunk's activations stay in cache.
  Any output pytree (logits, endpoints) is reassembled along the batch axis.
  """
  batch = images.shape[0]
  chunk = resolve_infer_chunk(chunk, batch)
  apply = lambda x: model.apply(variables, x, train=False, **kwargs)
  if chunk == batch:
    return apply(images)
  out = jax.lax.map(apply, images.reshape((batch // chunk, chunk) + images.shape[1:]))
  return jax.tree.map(lambda a: a.reshape((batch,) + a.shape[2:]), out)


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
  if kwargs.get('padding', 'same') not in blocks_lib.PADDINGS:
    raise ValueError(f'padding={kwargs["padding"]!r}; accepted: {", ".join(blocks_lib.PADDINGS)}')
  kernels.resolve_depthwise_impl(kwargs.get('depthwise_impl', 'auto'))  # validates
  kernels.resolve_conv_impl(kwargs.get('conv_impl', 'auto'))
  kernels.resolve_bn_impl(kwargs.get('bn_impl', 'auto'))
  blocks_lib.check_bn_groups(kwargs.get('bn_groups', 1))
  return EfficientNet(spec, **kwargs)
