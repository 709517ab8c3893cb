"""A tiny training run for tests: fake Fashion-MNIST IDX files and a smoke config over them."""

from configs import base
from efficientnet_jax import config_checks
from tests.test_data_fashion_mnist import write_fake_fashion_mnist


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
  return config_checks.set_fields(config, overrides)
