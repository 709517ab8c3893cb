"""Official TF checkpoint import (tensorflow/tpu V1/Lite, google/automl V2 naming).

Checkpoints are written with `tf.raw_ops.SaveV2` (what `tf.compat.v1.train.Saver`
writes: a name-based V2 checkpoint) under the official variable names, which
`to_official` spells out from the two repositories' layer-creation order,
independently of the importer's numbering code.
"""

import numpy as np
import pytest
import tensorflow as tf

from efficientnet_jax.model import create_model
from efficientnet_jax.weights import tf_checkpoint
from tests import weights_helpers as helpers

EMA = '/ExponentialMovingAverage'

# Per block kind: our submodule -> official layer inside blocks_<i>/ (bn = the BN base name).
_MBCONV_EXPAND = {'expand_conv': 'conv2d', 'expand_bn': '{bn}', 'dw_conv': 'depthwise_conv2d',
                  'dw_bn': '{bn}_1', 'project_conv': 'conv2d_1', 'project_bn': '{bn}_2'}
_MBCONV_NO_EXPAND = {'dw_conv': 'depthwise_conv2d', 'dw_bn': '{bn}', 'project_conv': 'conv2d',
                     'project_bn': '{bn}_1'}
_FUSED_EXPAND = {'fused_conv': 'conv2d', 'fused_bn': '{bn}', 'project_conv': 'conv2d_1',
                 'project_bn': '{bn}_1'}
_FUSED_NO_EXPAND = {'fused_conv': 'conv2d', 'fused_bn': '{bn}'}
_BN = {'scale': 'gamma', 'bias': 'beta', 'mean': 'moving_mean', 'var': 'moving_variance'}


def to_official(variables, spec, model_name, bn='tpu_batch_normalization'):
  """{official variable name: array} for our variables."""
  p, s, out = variables['params'], variables['batch_stats'], {}

  def put_bn(layer, params, stats):
    for ours in ('scale', 'bias'):
      out[f'{layer}/{_BN[ours]}'] = params[ours]
    for ours in ('mean', 'var'):
      out[f'{layer}/{_BN[ours]}'] = stats[ours]

  out[f'{model_name}/stem/conv2d/kernel'] = p['stem_conv']['kernel']
  put_bn(f'{model_name}/stem/{bn}', p['stem_bn'], s['stem_bn'])
  for b in spec.blocks():
    bp, bs, scope = p[f'block_{b.index}'], s[f'block_{b.index}'], f'{model_name}/blocks_{b.index}'
    if b.fused:
      table = _FUSED_EXPAND if b.expand != 1 else _FUSED_NO_EXPAND
    else:
      table = _MBCONV_EXPAND if b.expand != 1 else _MBCONV_NO_EXPAND
    for ours, layer in table.items():
      layer = f'{scope}/{layer.format(bn=bn)}'
      if ours.endswith('_bn'):
        put_bn(layer, bp[ours], bs[ours])
      elif ours == 'dw_conv':
        out[f'{layer}/depthwise_kernel'] = np.asarray(bp[ours]['kernel']).transpose(0, 1, 3, 2)
      else:
        out[f'{layer}/kernel'] = bp[ours]['kernel']
    if b.se_ch:
      for ours, layer in (('reduce', 'se/conv2d'), ('expand', 'se/conv2d_1')):
        out[f'{scope}/{layer}/kernel'] = bp['se'][ours]['kernel']
        out[f'{scope}/{layer}/bias'] = bp['se'][ours]['bias']
  out[f'{model_name}/head/conv2d/kernel'] = p['head_conv']['kernel']
  put_bn(f'{model_name}/head/{bn}', p['head_bn'], s['head_bn'])
  out[f'{model_name}/head/dense/kernel'] = p['classifier']['kernel']
  out[f'{model_name}/head/dense/bias'] = p['classifier']['bias']
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def save_checkpoint(prefix, tensors):
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[''] * len(names),
                    tensors=[tf.constant(tensors[n]) for n in names])
  return str(prefix)


def _shifted(variables, delta):
  return {c: _map(tree, lambda v: v + delta) for c, tree in variables.items()}


def _map(tree, fn):
  return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


@pytest.mark.parametrize('spec,model_name', [
    (helpers.B0_SMALL, 'efficientnet-b0'),
    (helpers.V2_SMALL, 'efficientnetv2-b0'),
], ids=['v1_b0', 'v2_b0'])
def test_round_trip_takes_ema_shadows(tmp_path, spec, model_name):
  module = create_model(spec, num_classes=10)
  ema = helpers.random_variables(module, seed=1)
  raw = _shifted(ema, 0.25)  # what training left in the raw variables
  tensors = to_official(raw, spec, model_name)
  tensors.update({k + EMA: v for k, v in to_official(ema, spec, model_name).items()})
  tensors['global_step'] = np.array(1000, np.float32)
  tensors[f'{model_name}/head/dense/kernel/RMSProp'] = tensors[f'{model_name}/head/dense/kernel']
  prefix = save_checkpoint(tmp_path / 'model.ckpt-1000', tensors)

  imported, report = tf_checkpoint.import_tf_checkpoint(prefix, module)
  assert report.ok
  assert sorted(report.ema) == sorted(report.loaded)  # every variable has a shadow
  assert 'global_step' in report.ignored
  assert f'{model_name}/head/dense/kernel/RMSProp' in report.ignored
  assert f'{model_name}/stem/conv2d/kernel' in report.ignored  # raw value behind the shadow
  helpers.assert_same_variables(imported, ema)
  helpers.assert_logit_parity(module, imported, ema)

  raw_imported, raw_report = tf_checkpoint.import_tf_checkpoint(prefix, module, use_ema=False)
  assert raw_report.ok and not raw_report.ema
  helpers.assert_same_variables(raw_imported, raw)


def test_full_lite0_infers_variant_and_mixes_ema(tmp_path):
  module = create_model('lite0')
  variables = helpers.random_variables(module, seed=2)
  tensors = to_official(variables, module.spec, 'efficientnet-lite0')
  # Only some variables have shadows (e.g. a checkpoint from an EMA-less warm-up).
  shadowed = [k for k in tensors if '/blocks_3/' in k]
  tensors.update({k + EMA: tensors[k] + 1.0 for k in shadowed})
  prefix = save_checkpoint(tmp_path / 'lite0', tensors)
  imported, report = tf_checkpoint.import_tf_checkpoint(prefix)
  assert report.ok and report.spec.name == 'lite0'
  assert report.model_kwargs == {'num_classes': 1000, 'include_top': True, 'padding': 'same'}
  assert len(report.ema) == len(shadowed)
  assert all(path.split('/')[1] == 'block_3' for path in report.ema)
  expected = {c: {**tree, 'block_3': _map(tree['block_3'], lambda v: v + 1.0)}
              for c, tree in variables.items()}
  helpers.assert_same_variables(imported, expected)


def test_v2_s_and_plain_batch_normalization_names(tmp_path):
  module = create_model('v2_s', num_classes=5)
  variables = helpers.random_variables(module, seed=3)
  tensors = to_official(variables, module.spec, 'efficientnetv2-s', bn='batch_normalization')
  imported, report = tf_checkpoint.import_tf_checkpoint(tensors)  # a {name: array} source
  assert report.ok and report.spec.name == 'v2_s' and report.model_kwargs['num_classes'] == 5
  assert any('no ExponentialMovingAverage' in n for n in report.notes)
  helpers.assert_same_variables(imported, variables)


def test_mismatches_are_reported_and_refused():
  module = create_model(helpers.B0_SMALL, num_classes=10)
  tensors = to_official(helpers.random_variables(module, seed=4), helpers.B0_SMALL,
                        'efficientnet-b0')
  del tensors['efficientnet-b0/blocks_1/se/conv2d_1/bias']
  tensors['efficientnet-b0/blocks_1/conv2d_2/kernel'] = np.zeros((1, 1, 2, 2), np.float32)
  with pytest.raises(ValueError, match='blocks_1/se/conv2d_1/bias') as error:
    tf_checkpoint.import_tf_checkpoint(tensors, module)
  assert 'blocks_1/conv2d_2/kernel' in str(error.value)
  _, report = tf_checkpoint.import_tf_checkpoint(tensors, module, allow_partial=True)
  assert [m.ours for m in report.missing] == ['params/block_1/se/expand/bias']
  assert report.unexpected == ['efficientnet-b0/blocks_1/conv2d_2/kernel']


def test_not_an_efficientnet_checkpoint(tmp_path):
  prefix = save_checkpoint(tmp_path / 'other', {'dense/kernel': np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match='stem/conv2d/kernel'):
    tf_checkpoint.import_tf_checkpoint(prefix)


def test_official_model_names_map_to_ours():
  assert [tf_checkpoint.our_name_for(n) for n in (
      'efficientnet-b0', 'efficientnet-b7', 'efficientnet-lite4', 'efficientnetv2-s',
      'efficientnetv2-b3', 'efficientnetv2-xl')] == ['b0', 'b7', 'lite4', 'v2_s', 'v2_b3',
                                                     'v2_xl']
