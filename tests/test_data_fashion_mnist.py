"""The offline Fashion-MNIST builder, on tiny fake IDX files (and real labels)."""
import gzip
import os

import numpy as np
import pytest

from efficientnet_jax.data import fashion_mnist
from tests.smoke_run import fake_image_value
from tests.smoke_run import write_idx
from tests.smoke_run import write_fake_fashion_mnist

REAL_DIR = fashion_mnist.DEFAULT_SOURCE_DIR


def test_builder_prepares_offline_from_fake_files(tmp_path):
  source = write_fake_fashion_mnist(tmp_path / 'idx')
  builder = fashion_mnist.FashionMnistDebian(data_dir=str(tmp_path / 'tfds'),
                                             source_dir=source)
  builder.download_and_prepare()

  info = builder.info
  assert info.splits['train'].num_examples == 20
  assert info.splits['test'].num_examples == 10
  assert info.features['label'].names == list(fashion_mnist.CLASS_NAMES)
  assert info.features['image'].shape == (28, 28, 1)
  examples = list(builder.as_dataset(split='test').as_numpy_iterator())
  got = sorted((int(ex['image'][0, 0, 0]), int(ex['label'])) for ex in examples)
  assert got == [(fake_image_value('test', i), i % 10) for i in range(10)]
  assert all(ex['image'].dtype == np.uint8 for ex in examples)
  assert all(ex['image'].shape == (28, 28, 1) for ex in examples)


def test_source_dir_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv(fashion_mnist.SOURCE_DIR_ENV, str(tmp_path))
  assert fashion_mnist.resolve_source_dir() == str(tmp_path)
  assert fashion_mnist.resolve_source_dir('/explicit') == '/explicit'
  monkeypatch.delenv(fashion_mnist.SOURCE_DIR_ENV)
  assert fashion_mnist.resolve_source_dir() == REAL_DIR


def test_missing_file_names_it_and_the_package(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    fashion_mnist.load_split('train', str(tmp_path))
  assert 'train-images-idx3-ubyte.gz' in str(e.value)
  assert 'apt-get install dataset-fashion-mnist' in str(e.value)


def test_bad_magic_and_bad_length_name_the_file(tmp_path):
  path = str(tmp_path / 'labels.gz')
  write_idx(path, 2051, np.zeros(3))  # image magic on a label file
  with pytest.raises(ValueError, match='labels.gz.*magic 2051.*2049'):
    fashion_mnist.read_labels(path)
  with gzip.open(path, 'wb') as f:
    f.write(np.array([2049, 5], '>u4').tobytes() + b'\0\0')  # 2 of 5 labels
  with pytest.raises(ValueError, match='labels.gz'):
    fashion_mnist.read_labels(path)
  with open(path, 'wb') as f:
    f.write(b'not gzip at all')
  with pytest.raises(ValueError, match='labels.gz'):
    fashion_mnist.read_labels(path)


@pytest.mark.skipif(not os.path.exists(REAL_DIR),
                    reason='Debian dataset-fashion-mnist is not installed')
def test_real_files_first_labels_match_upstream():
  train = fashion_mnist.read_labels(
      os.path.join(REAL_DIR, 'train-labels-idx1-ubyte.gz'))
  test = fashion_mnist.read_labels(
      os.path.join(REAL_DIR, 't10k-labels-idx1-ubyte.gz'))
  assert train.shape == (60000,) and test.shape == (10000,)
  assert train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
  assert test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
  assert np.bincount(train).tolist() == [6000] * 10
