"""MobileNetV2, the scaling baseline (paper Table 3), against Keras and the published figures.

Official figures: keras.applications.MobileNetV2 (1000 classes) has 3,504,872
trainable parameters at width 1.0 and 6,108,776 at 1.4. Its `count_params()`
(3,538,984 / 6,156,712) also counts the BN moving statistics, which our
counts, like the official EfficientNet ones, leave out. The MobileNetV2 paper
(arXiv:1801.04381) gives 300M multiply-adds at 1.0 and 585M at 1.4 (224 px).
"""

import jax
import keras
import numpy as np
import pytest

from configs import base as base_config
from efficientnet_jax.model import architectures
from efficientnet_jax import model_table
from efficientnet_jax.model import create_model
from efficientnet_jax.weights import keras as keras_import
from efficientnet_jax.weights.report import ImportReport, finish, match_variables, variable_template
from tests.keras_helpers import ATOL, MIN_LOGIT_STD
from tests.keras_helpers import randomize as _randomize

# name -> (Keras alpha, trainable params, total params incl. BN statistics, paper MACs)
OFFICIAL = {
    'mobilenet_v2': (1.0, 3_504_872, 3_538_984, 300e6),
    'mobilenet_v2_140': (1.4, 6_108_776, 6_156_712, 585e6),
}


def _keras_model(alpha: float, resolution: int = 224) -> keras.Model:
  return keras.applications.MobileNetV2(input_shape=(resolution, resolution, 3), alpha=alpha,
                                        weights=None, classifier_activation=None)


def test_architecture():
  spec = architectures.get_spec('mobilenet_v2')
  blocks = spec.blocks()
  assert (spec.family, spec.activation, spec.stem_ch, spec.head_features) == (
      'mobilenet_v2', 'relu6', 32, 1280)
  assert len(blocks) == 17 and all(b.se_ch == 0 and b.kernel == 3 for b in blocks)
  assert [b.expand for b in blocks] == [1] + [6] * 16
  assert [b.stride for b in blocks if b.stride > 1] == [2, 2, 2, 2]
  assert [b.out_ch for b in blocks][::4] == [16, 32, 64, 96, 320]
  assert sum(b.residual for b in blocks) == 10  # Keras: block_{2,4,5,7,8,9,11,12,14,15}_add
  # The head keeps 1280 at widths <= 1 (MobileNetV2 paper, Keras); 1.4 scales it.
  narrow = architectures.mobilenet_v2_spec(0.5)
  assert (narrow.stem_ch, narrow.head_features) == (16, 1280)
  assert architectures.get_spec('mobilenet_v2_140').head_features == 1792
  # Depth scaling: repeats ceil(d * n), as for every other family.
  assert architectures.mobilenet_v2_spec(1.0, 1.5).stage_repeats() == (2, 3, 5, 6, 5, 5, 2)


@pytest.mark.parametrize('name', sorted(OFFICIAL))
def test_params_and_macs_match_keras_and_the_paper(name):
  alpha, trainable, total, paper_macs = OFFICIAL[name]
  spec = architectures.get_spec(name)
  ours = model_table.count_params(spec)
  assert ours == trainable
  stats = jax.eval_shape(lambda k: create_model(spec).init(k, np.zeros((1, 32, 32, 3))),
                         jax.random.key(0))['batch_stats']
  assert ours + sum(int(np.prod(s.shape)) for s in jax.tree.leaves(stats)) == total
  model = _keras_model(alpha, 96)  # the variables do not depend on the input size
  assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == ours
  assert model.count_params() == total
  _import(model, create_model(spec))  # every layer by name, strict about shapes
  assert abs(model_table.count_macs(spec) / paper_macs - 1) < 0.01
  row, = model_table.table_rows([spec])
  assert (row['params_diff'], row['model']) == (0, name)


def test_config_name_reaches_it():
  config = base_config.get_config()
  config.model.name = 'mobilenet_v2'
  config.model.width = 1.4
  spec = architectures.spec_from_config(config.model)
  assert spec.family == 'mobilenet_v2' and spec.head_features == 1792
  assert model_table.count_params(spec) == OFFICIAL['mobilenet_v2_140'][1]


# Keras' MobileNetV2 layer names for our modules (block 0 is Keras' "expanded_conv").
_KERAS_TOP = {'stem_conv': 'Conv1', 'stem_bn': 'bn_Conv1', 'head_conv': 'Conv_1',
              'head_bn': 'Conv_1_bn', 'classifier': 'predictions'}
_KERAS_BLOCK = {'expand_conv': 'expand', 'expand_bn': 'expand_BN', 'dw_conv': 'depthwise',
                'dw_bn': 'depthwise_BN', 'project_conv': 'project', 'project_bn': 'project_BN'}
_BN_LEAVES = {'scale': 'gamma', 'bias': 'beta', 'mean': 'moving_mean', 'var': 'moving_variance'}


def _keras_key(path):
  modules, leaf = path[1:-1], path[-1]
  if modules[0].startswith('block_'):
    index = int(modules[0][len('block_'):])
    layer = ('expanded_conv' if index == 0 else f'block_{index}') + '_' + _KERAS_BLOCK[modules[1]]
  else:
    layer = _KERAS_TOP[modules[0]]
  return f'{layer}/{_BN_LEAVES[leaf] if modules[-1].endswith("_bn") else leaf}'


def _import(keras_model, model):
  """Keras MobileNetV2 variables -> ours, through the shared importer helpers."""
  weights, _ = keras_import.keras_weights(keras_model)
  report = ImportReport(source='Keras')
  transpose = lambda path, v: v.transpose(0, 1, 3, 2) if path[-2] == 'dw_conv' else v
  filled, used = match_variables(variable_template(model), weights, _keras_key, transpose, report)
  report.unexpected = sorted(set(weights) - used)
  return finish(filled, report, what='Keras MobileNetV2', allow_partial=False,
                base_variables=None)


def test_logit_parity_with_keras():
  # 96 px (small, to stay fast) still puts every stride-2 layer through Keras'
  # correct_pad + 'valid', which equals TF SAME, our default padding, for 3x3.
  resolution = 96
  keras.utils.set_random_seed(0)
  keras_model = _keras_model(1.0, resolution)
  # Keras MobileNetV2 has no preprocessing layers: both see [-1, 1] inputs.
  images = np.random.default_rng(1).uniform(-1, 1, (2, resolution, resolution, 3))
  images = images.astype(np.float32)
  _randomize(keras_model, images, seed=0)
  model = create_model('mobilenet_v2')
  variables = _import(keras_model, model)
  expected = keras.ops.convert_to_numpy(keras_model(images, training=False))
  got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
  assert expected.std() > MIN_LOGIT_STD
  diff = float(np.max(np.abs(got - expected)))
  print(f'mobilenet_v2@{resolution}: max|dlogit| {diff:.2e}, logit std {expected.std():.3f}')
  assert diff <= ATOL, f'max |dlogit| {diff:.3g} > {ATOL}'
