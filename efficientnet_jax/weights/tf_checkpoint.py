"""Imports official TF EfficientNet checkpoints (tensorflow/tpu V1/Lite, google/automl V2).

Both repositories save name-based checkpoints (`model.ckpt-*`) whose variable
names come from TF1 variable scopes: `<model>/stem/...`, `<model>/blocks_<i>/...`
and `<model>/head/...`, with `<model>` = 'efficientnet-b0', 'efficientnet-lite0',
'efficientnetv2-s', 'efficientnetv2-b0', ... Inside a scope, unnamed layers of
one type are numbered in the order they are *called*: `conv2d`, `conv2d_1`,
... and `tpu_batch_normalization`, `tpu_batch_normalization_1`, ...
(tensorflow/tpu `efficientnet_model.py` gets this from TF1 default layer names;
google/automl `effnetv2_model.py` names its layers explicitly with the same
counters). SE layers live in their own `se` scope and restart the count. So:

| block (ours)                 | conv2d          | conv2d_1     | BN _0 / _1 / _2              |
|------------------------------|-----------------|--------------|------------------------------|
| MBConv, expand != 1          | expand_conv     | project_conv | expand_bn, dw_bn, project_bn |
| MBConv, expand == 1          | project_conv    | -            | dw_bn, project_bn            |
| Fused, expand != 1 (V2)      | fused_conv      | project_conv | fused_bn, project_bn         |
| Fused, expand == 1 (V2)      | fused_conv      | -            | fused_bn                     |

plus `depthwise_conv2d/depthwise_kernel` (dw_conv; TF's (k, k, C, 1) becomes
our (k, k, 1, C)) and `se/conv2d` (reduce), `se/conv2d_1` (expand), each with
kernel and bias. Stem and head: `stem/conv2d`, `stem/<bn>`, `head/conv2d`,
`head/<bn>`, `head/dense/{kernel,bias}`. BN variables are gamma, beta,
moving_mean, moving_variance; `<bn>` is `tpu_batch_normalization` in the
released checkpoints (`batch_normalization` / `sync_batch_normalization`
are accepted too).

EMA: the released checkpoints also hold `<var>/ExponentialMovingAverage`
shadows (BN moving statistics included), which are the weights the papers
evaluate. They are taken whenever present (`use_ema=True`) and listed in
`report.ema`. Optimizer slots (RMSProp, Momentum, ...) and `global_step` are
ignored. TF2 object-based checkpoints (keys with `.ATTRIBUTES`) are not
handled: load those into `keras.py`'s models instead.

These weights are TF-trained: padding 'same', BN eps 1e-3 (our defaults).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from efficientnet_jax.model import architectures
from efficientnet_jax.model.architectures import Block, ModelSpec
from efficientnet_jax.model import EfficientNet, create_model
from efficientnet_jax.weights import report as report_lib
from efficientnet_jax.weights.report import ImportReport

EMA_SUFFIX = '/ExponentialMovingAverage'
BN_NAMES = ('tpu_batch_normalization', 'batch_normalization', 'sync_batch_normalization')
_BN_LEAVES = {'scale': 'gamma', 'bias': 'beta', 'mean': 'moving_mean',
              'var': 'moving_variance'}
# Optimizer slot variables end in one of these (e.g. .../kernel/RMSProp_1).
_SLOT_RE = re.compile(r'/(RMSProp|Momentum|Adam|LARS|ExponentialMovingAverage)(_\d+)?$')
_STEM_RE = re.compile(r'^(.+)/stem/conv2d/kernel$')


def our_name_for(model_name: str) -> str:
  """Our variant for an official model scope: 'efficientnetv2-s' -> 'v2_s'."""
  name = model_name.lower()
  match = re.fullmatch(r'efficientnetv2-(.+)', name)
  if match:
    return architectures.get_spec(f'v2_{match.group(1)}').name
  return architectures.get_spec(name).name  # 'efficientnet-b0' / '-lite0'


def _numbered(base: str, index: int) -> str:
  return base if index == 0 else f'{base}_{index}'


def block_layers(block: Block, bn: str) -> dict[str, str]:
  """Our block submodule -> the official layer name inside `blocks_<i>/`."""
  if block.fused:
    order = ['fused', 'project'] if block.expand != 1 else ['fused']
  else:
    order = (['expand'] if block.expand != 1 else []) + ['dw', 'project']
  layers, convs, bns = {}, 0, 0
  for part in order:  # call order fixes the numbering
    if part == 'dw':
      layers['dw_conv'] = 'depthwise_conv2d'
    else:
      layers[f'{part}_conv'] = _numbered('conv2d', convs)
      convs += 1
    layers[f'{part}_bn'] = _numbered(bn, bns)
    bns += 1
  if block.se_ch:
    layers['se/reduce'], layers['se/expand'] = 'se/conv2d', 'se/conv2d_1'
  return layers


def tf_key(path: tuple[str, ...], blocks: tuple[Block, ...], prefix: str,
           bn: str) -> str | None:
  """The checkpoint variable name for one of our flat variable paths."""
  modules, leaf = path[1:-1], path[-1]
  if not modules:
    return None
  top = {'stem_conv': 'stem/conv2d', 'stem_bn': f'stem/{bn}', 'head_conv': 'head/conv2d',
         'head_bn': f'head/{bn}', 'classifier': 'head/dense'}
  if len(modules) == 1 and modules[0] in top:
    layer = top[modules[0]]
  elif modules[0].startswith('block_'):
    index = int(modules[0][len('block_'):])
    if index >= len(blocks):
      return None
    name = block_layers(blocks[index], bn).get('/'.join(modules[1:]))
    if name is None:
      return None
    layer = f'blocks_{index}/{name}'
  else:
    return None
  if modules[-1].endswith('_bn'):
    if leaf not in _BN_LEAVES:
      return None
    leaf = _BN_LEAVES[leaf]
  elif modules[-1] == 'dw_conv':
    leaf = 'depthwise_kernel'
  return f'{prefix}/{layer}/{leaf}'


def _model_prefix(names) -> str:
  prefixes = sorted({m.group(1) for n in names if (m := _STEM_RE.match(n))})
  if len(prefixes) != 1:
    if any('.ATTRIBUTES' in n for n in names):
      raise ValueError('this is a TF2 object-based checkpoint; only name-based '
                       '(tensorflow/tpu, google/automl) checkpoints are supported')
    raise ValueError(f'expected exactly one "<model>/stem/conv2d/kernel" variable, '
                     f'found model scopes {prefixes}')
  return prefixes[0]


def _resolve_target(target, prefix: str, classes: int | None):
  if isinstance(target, EfficientNet):
    return target
  if target is None:
    target = our_name_for(prefix.rsplit('/', 1)[-1])
  if classes is None:
    return create_model(target, include_top=False)
  return create_model(target, num_classes=classes)


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every variable of a TF checkpoint (a prefix, or a directory with a `checkpoint` file)."""
  import tensorflow as tf  # heavy; only this importer needs it
  reader = tf.train.load_checkpoint(os.fspath(path))
  return {name: np.asarray(reader.get_tensor(name))
          for name in reader.get_variable_to_shape_map()}


def import_tf_checkpoint(source: str | os.PathLike | Mapping[str, np.ndarray],
                         target: str | ModelSpec | EfficientNet | None = None, *,
                         use_ema: bool = True, allow_partial: bool = False,
                         base_variables: Mapping[str, Any] | None = None,
                         ) -> tuple[dict[str, Any], ImportReport]:
  """Converts an official TF checkpoint into our {'params', 'batch_stats'}.

  Args:
    source: a checkpoint prefix or directory, or {variable name: array}.
    target: our module, a ModelSpec or a variant name; None infers the variant
      from the checkpoint's model scope ('efficientnet-b0' -> 'b0'). For a
      name or spec the classifier follows `head/dense` (or is dropped).
    use_ema: take `<var>/ExponentialMovingAverage` shadows where present.
    allow_partial: return what matched instead of raising.
    base_variables: variables of the target that the imported values overwrite.

  Returns:
    (variables, report), as `pytorch.import_torch`; `report.ema` lists our
    variables that came from EMA shadows.

  Raises:
    ValueError: anything missing, unexpected or mis-shaped (unless
      `allow_partial`), or no single model scope in the checkpoint.
  """
  names = (dict(source) if isinstance(source, Mapping) else read_checkpoint(source))
  prefix = _model_prefix(names)
  bn = next((b for b in BN_NAMES if f'{prefix}/stem/{b}/gamma' in names), BN_NAMES[0])
  head = names.get(f'{prefix}/head/dense/kernel')
  module = _resolve_target(target, prefix, None if head is None else int(head.shape[-1]))
  spec = module.spec
  report = ImportReport(spec=spec, model_kwargs={
      'num_classes': module.num_classes, 'include_top': module.include_top,
      'padding': 'same'})
  if module.padding != 'same':
    report.notes.append("TF-trained weights expect padding='same', the given module has "
                        f"'{module.padding}'.")

  blocks = spec.blocks()
  template = report_lib.variable_template(module)
  shadows = {}

  def source_key(path):
    key = tf_key(path, blocks, prefix, bn)
    if key is not None and use_ema and key + EMA_SUFFIX in names:
      shadows[key] = '/'.join(path)
      return key + EMA_SUFFIX
    return key

  def to_ours(path, value):
    if path[-2] == 'dw_conv' and value.ndim == 4:
      return value.transpose(0, 1, 3, 2)  # TF (k, k, C, 1) -> flax (k, k, 1, C)
    return value

  filled, used = report_lib.match_variables(template, names, source_key, to_ours, report)
  loaded = set(report.loaded)
  report.ema = [ours for ours in shadows.values() if ours in loaded]
  for name in sorted(names, key=report_lib.natural_key):
    if name in used:
      continue
    if not name.startswith(prefix + '/') or _SLOT_RE.search(name):
      report.ignored.append(name)  # global_step, optimizer slots, unused EMA shadows
    elif name + EMA_SUFFIX in used:
      report.ignored.append(name)  # the raw variable behind a shadow we took
    else:
      report.unexpected.append(name)
  if use_ema and not report.ema:
    report.notes.append('no ExponentialMovingAverage shadows found; raw weights used.')
  variables = report_lib.finish(
      filled, report, what=f'TF checkpoint {prefix!r} does not match our {spec.name!r}',
      allow_partial=allow_partial, base_variables=base_variables)
  return variables, report
