"""Preprocessing ops, each run eagerly and inside tf.data.map."""
import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from efficientnet_jax.data import preprocessing


def eager_and_mapped(fn, *args):
  """fn(*args) eagerly and inside Dataset.map; both results as numpy."""
  eager = fn(*[tf.constant(a) for a in args])
  mapped = next(iter(tf.data.Dataset.from_tensors(tuple(args)).map(fn)))
  return np.asarray(eager), np.asarray(mapped)


def random_image(height, width, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


@pytest.mark.parametrize('name,expected', [
    ('v1', [(100 - 0.485 * 255) / (0.229 * 255),
            (100 - 0.456 * 255) / (0.224 * 255),
            (100 - 0.406 * 255) / (0.225 * 255)]),
    ('v2', [(100 - 128) / 128] * 3),
    ('lite', [(100 - 127) / 128] * 3),
])
def test_normalize_constant_image_gives_analytic_value(name, expected):
  image = np.full((4, 5, 3), 100, np.uint8)
  for out in eager_and_mapped(lambda x: preprocessing.normalize(x, name), image):
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape),
                               rtol=1e-6)


def test_normalize_v2_range_and_unknown_name():
  out = preprocessing.normalize(tf.constant([[[0, 255, 128]]], tf.uint8), 'v2')
  np.testing.assert_allclose(out, [[[-1.0, 127 / 128, 0.0]]])
  with pytest.raises(ValueError, match="'v3'.*'v1', 'v2', 'lite'"):
    preprocessing.normalize(tf.zeros([1, 1, 3]), 'v3')


def test_grey_becomes_three_equal_channels():
  grey = random_image(6, 7, channels=1)
  for out in eager_and_mapped(preprocessing.to_rgb, grey):
    assert out.shape == (6, 7, 3)
    for c in range(3):
      np.testing.assert_array_equal(out[..., c], grey[..., 0])
  rgba = random_image(3, 3, channels=4)
  np.testing.assert_array_equal(preprocessing.to_rgb(tf.constant(rgba)),
                                rgba[..., :3])


def test_center_crop_window_is_the_v1_formula():
  # size 224, padding 32: side = int(224/256 * 300) = 262,
  # offsets ((300-262)+1)//2 = 19 and ((400-262)+1)//2 = 69.
  window = preprocessing.center_crop_window(300, 400, 224, 32)
  assert window.numpy().tolist() == [19, 69, 262, 262]
  # Padding 0 keeps the whole short side.
  assert preprocessing.center_crop_window(28, 28, 32, 0).numpy().tolist() == [
      0, 0, 28, 28]


def test_center_crop_eager_equals_mapped_and_resizes():
  image = random_image(40, 60)
  eager, mapped = eager_and_mapped(
      lambda x: preprocessing.center_crop(x, 16, crop_padding=32), image)
  assert eager.shape == (16, 16, 3) and eager.dtype == np.float32
  np.testing.assert_allclose(eager, mapped, atol=1e-4)
  # Same-size crop and resize is the identity (bicubic at the sample points).
  same = preprocessing.center_crop(tf.constant(image[:20, :20]), 20,
                                   crop_padding=0)
  np.testing.assert_allclose(same, image[:20, :20], atol=1e-3)


def test_inception_crop_is_a_pure_function_of_the_seed():
  image = random_image(50, 70)
  seed = np.array([3, 4], np.int64)
  crop = lambda x, s: preprocessing.inception_crop(x, s, 24)
  eager, mapped = eager_and_mapped(crop, image, seed)
  assert eager.shape == (24, 24, 3)
  np.testing.assert_allclose(eager, mapped, atol=1e-4)
  again = crop(tf.constant(image), tf.constant(seed))
  np.testing.assert_array_equal(eager, again)
  windows = {tuple(preprocessing.inception_crop_window(
      50, 70, tf.constant([0, i]), 24).numpy()) for i in range(20)}
  assert len(windows) > 10  # different seeds give different crops
  for y, x, h, w in windows:
    assert 0 <= y and y + h <= 50 and 0 <= x and x + w <= 70
    assert 0.08 * 50 * 70 * 0.9 <= h * w  # area_range lower bound (± rounding)


def test_inception_crop_falls_back_to_the_centre_crop():
  # Only the whole image satisfies area 1.0: TF returns it, and the official
  # code then uses the eval centre crop.
  window = preprocessing.inception_crop_window(
      50, 70, tf.constant([1, 2]), 24, crop_padding=32, area_range=(1.0, 1.0))
  expected = preprocessing.center_crop_window(50, 70, 24, 32)
  np.testing.assert_array_equal(window, expected)


def test_fused_jpeg_crop_matches_decode_then_crop():
  image = random_image(48, 64)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=95)
  jpeg = buffer.getvalue()
  decoded = tf.io.decode_jpeg(jpeg, channels=3)
  seed = tf.constant([5, 6], tf.int64)
  np.testing.assert_allclose(
      preprocessing.decode_and_inception_crop_jpeg(tf.constant(jpeg), seed, 20),
      preprocessing.inception_crop(decoded, seed, 20), atol=1e-3)
  fused, mapped = eager_and_mapped(
      lambda b: preprocessing.decode_and_center_crop_jpeg(b, 20), jpeg)
  np.testing.assert_allclose(fused, preprocessing.center_crop(decoded, 20),
                             atol=1e-3)
  np.testing.assert_allclose(fused, mapped, atol=1e-4)


def test_flip_is_stateless():
  image = random_image(4, 5)
  flips = []
  for i in range(16):
    seed = np.array([7, i], np.int64)
    eager, mapped = eager_and_mapped(preprocessing.random_flip, image, seed)
    np.testing.assert_array_equal(eager, mapped)
    assert (np.array_equal(eager, image) or
            np.array_equal(eager, image[:, ::-1]))
    flips.append(not np.array_equal(eager, image))
  assert 0 < sum(flips) < 16
