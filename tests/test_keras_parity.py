"""Logit parity with keras.applications EfficientNets .

Each parity case builds the Keras model with weights=None, makes every BN and
bias non-trivial (see `keras_helpers.randomize`), imports it by layer name into our model
and compares fp32 logits in inference mode on the same uint8-range input.
Our model is fed Keras' own preprocessing output (`preprocessing_model`), so
the comparison starts at the stem conv.

Resolutions: V1 at `spec.resolution` (= Keras' default size). V2 in the
default suite: V2-S at its *train* resolution 300, which puts odd sizes (75,
19) through the stride-2 SAME padding that 384 never reaches, and V2-B0 at
its eval resolution 224. The slow suite runs every V2 at `spec.eval_resolution`
(Keras' default size), so V2-S is checked at both.
"""

import jax
import keras
import numpy as np
import pytest

from tests import keras_helpers
from tests.keras_helpers import ATOL, MIN_LOGIT_STD

from efficientnet_jax.model import architectures
from efficientnet_jax.model import create_model
from efficientnet_jax.weights import keras as keras_import
from efficientnet_jax.weights import report as report_lib

BATCH = 2


def _assert_parity(name: str, resolution: int) -> None:
  keras.utils.set_random_seed(0)  # Keras' kernel init: the same draw in any test order
  keras_model = keras_import.keras_model_for(name, resolution=resolution)
  images = np.random.default_rng(1).uniform(
      0, 255, (BATCH, resolution, resolution, 3)).astype(np.float32)
  keras_helpers.randomize(keras_model, images, seed=0)
  variances = np.concatenate([
      l.moving_variance.numpy() for l in keras_model.layers
      if isinstance(l, keras.layers.BatchNormalization)])
  assert np.mean(np.abs(variances - 1.0) > 0.1) > 0.5, 'BN statistics near the defaults'

  variables, report = keras_import.import_keras(keras_model)  # strict: raises on mismatch
  assert report.ok and not report.missing

  expected = keras.ops.convert_to_numpy(keras_model(images, training=False))
  inputs = keras.ops.convert_to_numpy(
      keras_import.preprocessing_model(keras_model)(images, training=False))
  model = create_model(name)  # depthwise_impl 'auto'
  got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, inputs))

  assert got.shape == expected.shape == (BATCH, 1000)
  assert got.dtype == np.float32
  assert expected.std() > MIN_LOGIT_STD
  diff = float(np.max(np.abs(got - expected)))
  print(f'{name}@{resolution}: max|dlogit| {diff:.2e}, logit std {expected.std():.3f}')
  assert diff <= ATOL, f'{name}@{resolution}: max |dlogit| {diff:.3g} > {ATOL}'


DEFAULT_CASES = [('b0', 224), ('b3', 300), ('v2_s', 300), ('v2_b0', 224)]


@pytest.mark.parametrize('name,resolution', DEFAULT_CASES)
def test_logit_parity(name, resolution):
  _assert_parity(name, resolution)


def _slow_cases():
  cases = []
  for name in keras_import.KERAS_APPLICATIONS:
    spec = architectures.get_spec(name)
    cases.append((name, spec.eval_resolution if spec.family == 'v2' else spec.resolution))
  return cases


@pytest.mark.slow
@pytest.mark.parametrize('name,resolution', _slow_cases())
def test_logit_parity_all_variants(name, resolution):
  _assert_parity(name, resolution)


# --------------------------------------------------------------------------
# Mismatches, partial imports, files and preprocessing (no forward passes).
# --------------------------------------------------------------------------


@pytest.fixture(scope='module')
def keras_b0():
  # 64 px: the variables do not depend on the input size, and building is cheaper.
  model = keras_import.keras_model_for('b0', resolution=64)
  rng = np.random.default_rng(2)
  for layer in model.layers:
    if isinstance(layer, keras.layers.Normalization):
      continue  # preprocessing: not imported
    for variable in layer.weights:
      value = rng.normal(size=variable.shape)
      if variable.name == 'moving_variance':
        value = np.abs(value) + 0.1
      variable.assign(value.astype(np.float32))
  return model


def _zeros_like_template(name: str, **kwargs):
  template = keras_import._variable_template(create_model(name, **kwargs))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)


def test_wrong_depth_raises_with_missing(keras_b0):
  # B1 = B0 widths at depth 1.1: 7 more blocks, all missing; nothing unused.
  with pytest.raises(ValueError, match='missing') as info:
    keras_import.import_keras(keras_b0, 'b1')
  message = str(info.value)
  # Stage 1 of B1 has two blocks (block1a, block1b); Keras B0 has no block1b.
  assert "'b1'" in message and 'block_1 (Keras block1b_*): 14 variables' in message
  assert 'block_22 (Keras block7b_*)' in message
  assert 'unexpected' not in message and 'shape mismatches' not in message


def test_wrong_width_raises_with_shapes(keras_b0):
  # B2 is 1.1x wider: the same layer names with other shapes.
  with pytest.raises(ValueError, match=r'shape mismatches \(ours <- Keras\)'):
    keras_import.import_keras(keras_b0, 'b2')
  _, report = keras_import.import_keras(keras_b0, 'b2', allow_partial=True)
  head = report_lib.ShapeMismatch('params/head_conv/kernel', 'top_conv/kernel',
                                    (1, 1, 352, 1408), (1, 1, 320, 1280))
  assert head in report.shape_mismatches
  assert str(head) == ('params/head_conv/kernel (1, 1, 352, 1408) <- '
                       'top_conv/kernel (1, 1, 320, 1280)')


def test_extra_keras_weights_raise_as_unexpected(keras_b0):
  # Lite0 is B0 without squeeze-excite: every Keras SE weight is left over.
  with pytest.raises(ValueError, match='unexpected') as info:
    keras_import.import_keras(keras_b0, 'lite0')
  assert 'block1a_se_reduce/kernel' in str(info.value)


def test_allow_partial(keras_b0):
  variables, report = keras_import.import_keras(keras_b0, 'b1', allow_partial=True)
  assert not report.ok
  assert not report.unexpected and not report.shape_mismatches
  missing = [m.ours for m in report.missing]
  assert 'params/block_22/project_conv/kernel' in missing
  assert 'batch_stats/block_22/project_bn/mean' in missing
  # Only what matched comes back: B1's block_1 (block1b) is absent, block_2 is block2a.
  assert 'block_1' not in variables['params'] and 'block_22' not in variables['params']
  np.testing.assert_array_equal(variables['params']['block_2']['expand_conv']['kernel'],
                                keras_b0.get_layer('block2a_expand_conv').kernel.numpy())
  np.testing.assert_array_equal(variables['params']['stem_conv']['kernel'],
                                keras_b0.get_layer('stem_conv').kernel.numpy())
  assert len(report.loaded) == len(keras_import.keras_weights(keras_b0)[0])

  # With base variables the result is complete: imported values over the base.
  base = _zeros_like_template('b1')
  full, _ = keras_import.import_keras(keras_b0, 'b1', allow_partial=True,
                                      base_variables=base)
  assert jax.tree.structure(full) == jax.tree.structure(base)
  assert not np.any(full['params']['block_22']['project_conv']['kernel'])
  np.testing.assert_array_equal(full['batch_stats']['head_bn']['var'],
                                keras_b0.get_layer('top_bn').moving_variance.numpy())


def test_mapping_details(keras_b0):
  variables, report = keras_import.import_keras(keras_b0)  # variant inferred: b0
  params, stats = variables['params'], variables['batch_stats']
  dw = keras_b0.get_layer('block2b_dwconv').kernel.numpy()  # (3, 3, 144, 1)
  np.testing.assert_array_equal(params['block_2']['dw_conv']['kernel'], dw.transpose(0, 1, 3, 2))
  bn = keras_b0.get_layer('block6d_project_bn')  # stage 6, 4th repeat = block 14
  np.testing.assert_array_equal(params['block_14']['project_bn']['scale'], bn.gamma.numpy())
  np.testing.assert_array_equal(params['block_14']['project_bn']['bias'], bn.beta.numpy())
  np.testing.assert_array_equal(stats['block_14']['project_bn']['mean'],
                                bn.moving_mean.numpy())
  np.testing.assert_array_equal(params['block_3']['se']['expand']['bias'],
                                keras_b0.get_layer('block3a_se_expand').bias.numpy())
  np.testing.assert_array_equal(params['classifier']['kernel'],
                                keras_b0.get_layer('predictions').kernel.numpy())
  # Keras' preprocessing layers have generated names ('normalization_3').
  norm = next(l for l in keras_b0.layers if isinstance(l, keras.layers.Normalization))
  assert report.preprocessing == [f'{norm.name}/{v}' for v in ('mean', 'variance', 'count')]
  # An un-adapted V1 Normalization computes x/255, which is none of ours.
  assert report.normalization.matches is None and report.notes


def test_fused_block_mapping():
  model = keras_import.keras_model_for('v2_b0', resolution=64)
  variables, _ = keras_import.import_keras(model)
  params = variables['params']
  # Expand-1 fused block: Keras' single 3x3 conv is its "project_conv".
  np.testing.assert_array_equal(params['block_0']['fused_conv']['kernel'],
                                model.get_layer('block1a_project_conv').kernel.numpy())
  # Expanding fused block: 3x3 expand_conv, then a 1x1 project_conv.
  np.testing.assert_array_equal(params['block_1']['fused_conv']['kernel'],
                                model.get_layer('block2a_expand_conv').kernel.numpy())
  assert params['block_1']['project_conv']['kernel'].shape == (1, 1, 64, 32)


def test_file_sources(keras_b0, tmp_path):
  expected, _ = keras_import.import_keras(keras_b0)
  keras_b0.save(tmp_path / 'b0.keras')
  keras_b0.save_weights(tmp_path / 'b0.weights.h5')
  loaded, _ = keras_import.import_keras(tmp_path / 'b0.keras')
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)
  # A weights-only file needs the variant (and the matching input size is free).
  with pytest.raises(ValueError, match='weights only'):
    keras_import.import_keras(tmp_path / 'b0.weights.h5')
  loaded, _ = keras_import.import_keras(tmp_path / 'b0.weights.h5', 'b0')
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)


def test_input_normalization_equivalence():
  v1 = keras_import.keras_model_for('b0', resolution=32)
  # What weights='imagenet' sets up: Normalization(mean, variance=std) from the
  # .h5 file, then Rescaling(1/sqrt(std)) (tensorflow/tensorflow#49930).
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  norm = next(l for l in v1.layers if isinstance(l, keras.layers.Normalization))
  norm.adapt_mean.assign(mean)
  norm.adapt_variance.assign(std)
  norm.finalize_state()
  fixed = keras.layers.Rescaling(1.0 / np.sqrt(std))(norm.output)
  imagenet_v1 = keras.Model(v1.input, fixed)
  assert keras_import.keras_input_normalization(imagenet_v1).matches == 'v1'
  # Without the fix, the file's state alone gives (x/255 - mean)/sqrt(std).
  assert keras_import.keras_input_normalization(v1).matches is None

  for name, expected in [('v2_b0', 'v1'), ('v2_s', 'v2')]:
    model = keras_import.keras_model_for(name, resolution=32)
    assert keras_import.keras_input_normalization(model).matches == expected
    assert architectures.get_spec(name).normalization == expected
  bare = keras_import.keras_model_for('v2_s', resolution=32, include_preprocessing=False)
  assert keras_import.keras_input_normalization(bare).matches == 'identity'
