"""The prediction CLI: class names, preprocessing, real Lite0 ImageNet predictions, errors."""

import dataclasses
import json

import jax
import numpy as np
from PIL import Image

from efficientnet_jax import config_lib
from efficientnet_jax import eval_presets
from efficientnet_jax.data import preprocessing
from efficientnet_jax.model import architectures
from efficientnet_jax.weights import load as weights_load
from efficientnet_jax import state as state_lib
from efficientnet_jax import predict
from efficientnet_jax import state_layout
from efficientnet_jax.weights import pytorch
from efficientnet_jax.weights.safetensors_format import save_safetensors
from tests.weights_helpers import CAT_CLASSES, ESPRESSO



def test_class_name_anchors():
  names = predict.imagenet_classes()
  assert len(names) == 1000
  assert {i: names[i] for i in (0, 1, 281, 282, 285, 967, 999)} == {
      0: 'tench', 1: 'goldfish', 281: 'tabby', 282: 'tiger cat', 285: 'Egyptian cat',
      967: 'espresso', 999: 'toilet tissue'}
  assert predict.class_name(0, 1001) == 'background'
  assert predict.class_name(282, 1001) == 'tabby'
  assert predict.class_name(3, 10) == 'class 3'


def test_load_image_is_the_eval_preprocessing_of_training(tmp_path):
  # A 300x450 (h x w) image whose columns are marked: the crop must be the centre.
  image = np.zeros((300, 450, 3), np.uint8)
  image[:, :, 0] = np.linspace(0, 255, 450).astype(np.uint8)[None, :]
  image[:, :, 1] = 128
  Image.fromarray(image).save(tmp_path / 'wide.png')
  Image.fromarray(image[:, :, 1]).convert('L').save(tmp_path / 'grey.png')
  b3 = architectures.get_spec('b3')
  prep = eval_presets.eval_preprocessing(b3, 'tf')  # 300 px: crop 300/332, TF1 bicubic
  assert (prep.image_size, prep.crop, prep.crop_padding, prep.resize) == (
      300, 'v1', 32, 'bicubic_tf1')
  crop = predict.load_image(tmp_path / 'wide.png', prep)
  assert crop.shape == (300, 300, 3) and crop.dtype == np.float32
  # One definition with training's eval (data/preprocessing.py eval_image): the
  # side is int(300 / 332 * 300) = 271 columns from (450 - 271 + 1) // 2 = 90.
  expected = preprocessing.eval_image(image, 300, crop='v1', crop_padding=32,
                                      resize='bicubic_tf1').numpy()
  np.testing.assert_array_equal(crop, expected)
  assert abs(crop[:, 0, 0].mean() - 255 * 90 / 449) < 3
  np.testing.assert_allclose(crop[..., 1], 128, atol=1)
  small = dataclasses.replace(prep, image_size=64)
  assert predict.load_image(tmp_path / 'grey.png', small).shape == (64, 64, 3)
  np.testing.assert_allclose(predict.normalize(np.full((1, 3), 255.0), 'lite'), 1.0)


def test_real_lite0_predictions_json(photos, capsys):
  status = predict.main(['--weights=lite0', '--json', photos['chelsea'], photos['coffee']])
  captured = capsys.readouterr()
  assert status == 0, captured.err
  results = json.loads(captured.out)
  assert [r['image'] for r in results] == [photos['chelsea'], photos['coffee']]
  for result in results:
    assert len(result['top5']) == 5
    probs = [item['prob'] for item in result['top5']]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert set(result['top5'][0]) == {'label', 'index', 'prob'}
  cat, coffee = results[0]['top5'][0], results[1]['top5'][0]
  print(f"chelsea: {cat['label']} {cat['prob']:.3f}; coffee: {coffee['label']} "
        f"{coffee['prob']:.3f}")
  assert cat['index'] in CAT_CLASSES
  assert sum(i['prob'] for i in results[0]['top5'] if i['index'] in CAT_CLASSES) > 0.5
  assert coffee['index'] == ESPRESSO and coffee['label'] == 'espresso'
  assert coffee['prob'] > 0.5


def test_corrupt_image_is_named_and_others_still_reported(photos, capsys):
  status = predict.main(['--weights=lite0', photos['corrupt'], photos['coffee']])
  captured = capsys.readouterr()
  assert status == 1
  errors = captured.err.strip().splitlines()
  assert len(errors) == 1 and photos['corrupt'] in errors[0] and errors[0].startswith('error:')
  assert captured.out.splitlines()[0] == photos['coffee']
  assert 'espresso (967)' in captured.out.splitlines()[1]


def test_weights_file_needs_model_and_matches_builtin(photos, tmp_path, capsys):
  state = pytorch.load_state_dict(
      weights_load.builtin_weights_path('lite0'))  # pylint: disable=protected-access
  path = str(tmp_path / 'lite0.safetensors')
  save_safetensors(path, state)
  assert predict.main([f'--weights={path}', photos['coffee']]) == 2
  assert '--model' in capsys.readouterr().err
  assert predict.main([f'--weights={path}', '--model=lite0', '--json', photos['coffee']]) == 0
  from_file = json.loads(capsys.readouterr().out)
  assert predict.main(['--weights=lite0', '--json', photos['coffee']]) == 0
  builtin = json.loads(capsys.readouterr().out)
  assert from_file == builtin


def test_unknown_weights_exit_2(capsys):
  assert predict.main(['--weights=/nonexistent/weights.pth', 'x.png']) == 2
  assert 'nonexistent' in capsys.readouterr().err


_WORKDIR_CONFIG = '''
from configs import base


def get_config(arg=None):
  config = base.get_config('smoke')
  config.data.name = 'fashion_mnist'
  config.data.eval_split = 'test'
  config.data.source_dir = {source!r}
  config.data.data_dir = {data_dir!r}
  return config
'''


def test_weights_from_a_training_workdir(tmp_path, capsys):
  from efficientnet_jax import train  # pylint: disable=g-import-not-at-top
  from tests.smoke_run import write_fake_fashion_mnist  # pylint: disable=g-import-not-at-top
  source = write_fake_fashion_mnist(tmp_path / 'idx')
  config_file = tmp_path / 'smoke_config.py'
  config_file.write_text(_WORKDIR_CONFIG.format(source=source, data_dir=str(tmp_path / 'tfds')))
  config = config_lib.load(str(config_file))
  workdir = str(tmp_path / 'run')
  train.run(config, workdir)
  image = str(tmp_path / 'garment.png')
  Image.fromarray(np.full((28, 28), 200, np.uint8)).save(image)
  capsys.readouterr()

  assert predict.main([f'--weights={workdir}', image]) == 2
  assert 'pass the --config' in capsys.readouterr().err
  assert predict.main([f'--weights={workdir}', f'--config={config_file}', '--json', image]) == 0
  captured = capsys.readouterr()
  assert 'step 2 (EMA weights)' in captured.err
  top = json.loads(captured.out)[0]['top5']
  assert len(top) == 5 and top[0]['label'] == f'class {top[0]["index"]}'
  # The same numbers as applying the checkpoint's EMA variables directly.
  _, state, step = state_lib.load_checkpoint(config, workdir)
  module, variables, _ = weights_load.load_weights(workdir, config=str(config_file))
  assert step == 2 and module.num_classes == 10
  prep = eval_presets.from_config(config, module.spec)
  x = predict.normalize(predict.load_image(image, prep)[None], module.spec.normalization)
  expected = np.asarray(jax.nn.softmax(module.apply(state_layout.ema_variables(state), x,
                                                    train=False)))[0]
  np.testing.assert_allclose([i['prob'] for i in top],
                             expected[[i['index'] for i in top]], atol=1e-5)
  # --step and --raw pick another checkpoint's raw weights.
  assert predict.main([f'--weights={workdir}', f'--config={config_file}', '--step=1',
                       '--raw', image]) == 0
  assert 'step 1 (raw weights)' in capsys.readouterr().err
