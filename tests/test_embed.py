"""The embedding CLI: pooled features, endpoints and the path/label list, on a tiny model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from efficientnet_jax import embed
from efficientnet_jax import eval_presets
from efficientnet_jax import predict
from efficientnet_jax.weights import load as weights_load
from efficientnet_jax.model.architectures import v1_spec
from efficientnet_jax.model import create_model
from tests.smoke_run import write_fake_fashion_mnist

SIZE = 32


@pytest.fixture(scope='module')
def tiny():
  module = create_model(v1_spec(0.25, 0.25, SIZE, 0.2, name='tiny'), num_classes=5)
  variables = module.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
  return module, jax.device_get(variables)


@pytest.fixture()
def folder(tmp_path):
  rng = np.random.default_rng(0)
  for label in ('cats', 'dogs'):
    (tmp_path / 'imgs' / label).mkdir(parents=True)
    for i in range(3):
      image = rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)
      Image.fromarray(image).save(tmp_path / 'imgs' / label / f'{i}.png')
  (tmp_path / 'imgs' / 'dogs' / 'broken.jpg').write_bytes(b'not an image')
  (tmp_path / 'imgs' / 'notes.txt').write_text('ignored')
  return tmp_path / 'imgs'


def test_embed_matches_model_features(tiny, folder):
  module, variables = tiny
  paths, labels, classes = embed.list_folder(str(folder))
  assert classes == ['cats', 'dogs'] and labels == [0, 0, 0, 1, 1, 1, 1]
  prep = eval_presets.eval_preprocessing(module.spec, 'tf', image_size=SIZE)
  images = [predict.load_image(p, prep) for p in paths if not p.endswith('broken.jpg')]
  out = embed.embed(iter(images), len(images), module, variables, batch_size=4,
                    endpoints=True, progress=False)
  assert out['features'].shape == (6, module.spec.head_features)
  # The pooled features are the classifier's input: applying it gives the logits.
  logits = module.apply(variables, predict.normalize(np.stack(images), 'v1'), train=False)
  classifier = variables['params']['classifier']
  np.testing.assert_allclose(out['features'] @ classifier['kernel'] + classifier['bias'],
                             logits, atol=1e-4, rtol=1e-4)
  assert set(out) == {'features', *embed.ENDPOINTS}
  np.testing.assert_allclose(out['head'], out['features'])
  assert out['stem'].shape == (6, module.spec.stem_ch)


def test_cli_folder(tiny, folder, tmp_path, capsys, monkeypatch):
  module, variables = tiny
  # The weight loaders have their own tests (test_predict, test_weights_*);
  # here the CLI gets the tiny module.
  monkeypatch.setattr(weights_load, 'load_weights_from_args', lambda args: (module, variables, []))
  out = tmp_path / 'out' / 'feats.npy'
  status = embed.main([f'--folder={folder}', f'--out={out}', '--endpoints',
                       '--raw_endpoints', '--batch_size=4'])
  err = capsys.readouterr().err
  assert status == 1 and 'broken.jpg' in err  # one unreadable image: reported, skipped
  assert 'embedded 6/7 images' in err
  features = np.load(out)
  meta = json.loads((tmp_path / 'out' / 'feats.json').read_text())
  assert features.shape == (6, module.spec.head_features) and features.dtype == np.float32
  assert len(meta['paths']) == 6 and meta['labels'] == [0, 0, 0, 1, 1, 1]
  assert meta['class_names'] == ['cats', 'dogs']
  endpoints = np.load(tmp_path / 'out' / 'feats_endpoints.npz')
  assert endpoints['stem'].shape == (6, SIZE // 2, SIZE // 2, module.spec.stem_ch)
  assert endpoints['reduction_5'].shape[1:3] == (1, 1)


def test_cli_tfds_fashion_mnist(tiny, tmp_path, capsys, monkeypatch):
  module, variables = tiny
  source = write_fake_fashion_mnist(tmp_path / 'idx', num_train=4, num_test=10)
  monkeypatch.setattr(weights_load, 'load_weights_from_args', lambda args: (module, variables, []))
  out = tmp_path / 'fm.npy'
  status = embed.main(['--tfds=fashion_mnist:test', f'--data_dir={tmp_path / "tfds"}',
                       f'--source_dir={source}', '--limit=6', f'--out={out}',
                       '--batch_size=4'])
  assert status == 0, capsys.readouterr().err
  meta = json.loads((tmp_path / 'fm.json').read_text())
  assert np.load(out).shape == (6, module.spec.head_features)
  # Labels are i % 10 of 10 images; TFDS stores them in its own (shuffled) order.
  assert len(set(meta['labels'])) == 6 and set(meta['labels']) <= set(range(10))
  assert meta['paths'][0] == 'fashion_mnist:test[0]' and len(meta['class_names']) == 10


def test_cli_errors(tmp_path, capsys):
  with pytest.raises(SystemExit):
    embed.main([f'--folder={tmp_path}', '--out=x.txt'])
  assert embed.main(['--weights=nope.pth', '--model=b0', f'--folder={tmp_path}',
                     f'--out={tmp_path / "f.npy"}']) == 2
  assert 'nope.pth' in capsys.readouterr().err
