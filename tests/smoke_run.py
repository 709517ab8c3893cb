"""Shared test helpers: fake Fashion-MNIST IDX files, a smoke config on them, workdir snapshots."""

import gzip
import os

import numpy as np

from configs import base
from efficientnet_jax import config_lib
from efficientnet_jax.data import fashion_mnist


def write_idx(path, magic, array):
  header = np.array([magic, *array.shape], '>u4').tobytes()
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def fake_image_value(split: str, index: int) -> int:
  """The constant pixel value of fake image `index` (distinct per split)."""
  return 5 + 7 * index + (0 if split == 'train' else 3)


def write_fake_fashion_mnist(directory, num_train=20, num_test=10):
  """Writes the 4 IDX .gz files; image i is constant fake_image_value(i), label i % 10."""
  os.makedirs(directory, exist_ok=True)
  for split, count in (('train', num_train), ('test', num_test)):
    images_file, labels_file = fashion_mnist.FILES[split]
    values = np.array([fake_image_value(split, i) for i in range(count)])
    images = np.broadcast_to(values[:, None, None], (count, 28, 28))
    write_idx(os.path.join(directory, images_file), 2051, images)
    write_idx(os.path.join(directory, labels_file), 2049,
               np.arange(count) % 10)
  return str(directory)


def write_fake_data(root):
  """40 train / 13 test IDX images under root/idx; the tfds builder prepares into root/tfds."""
  write_fake_fashion_mnist(root / 'idx', num_train=40, num_test=13)
  return root


def smoke_config(data_root, **overrides):
  """configs/base.py:smoke on the fake Fashion-MNIST in `data_root`, then `overrides`."""
  config = base.get_config('smoke')
  config.data.name = 'fashion_mnist'
  config.data.eval_split = 'test'
  config.data.source_dir = str(data_root / 'idx')
  config.data.data_dir = str(data_root / 'tfds')
  return config_lib.set_fields(config, overrides)


def snapshot(path):
  """(relative path, size, mtime) of everything under `path`; [] when absent."""
  if not path.exists():
    return []
  out = []
  for dirpath, dirnames, filenames in os.walk(path):
    for name in sorted(dirnames + filenames):
      p = os.path.join(dirpath, name)
      st = os.stat(p)
      out.append((os.path.relpath(p, path), st.st_size, st.st_mtime_ns))
  return sorted(out)
