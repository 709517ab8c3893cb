"""AutoAugment/RandAugment ops at M=0 and max (pitfall P5)."""
import functools

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import tensorflow as tf

from efficientnet_jax.data import augment
from efficientnet_jax.data import options

SEED = tf.constant([11, 12], tf.int64)


def image32(seed=0, low=0, high=256):
  rng = np.random.default_rng(seed)
  return rng.integers(low, high, (32, 32, 3), dtype=np.uint8)


def run(op, image, level, **kwargs):
  out = op(tf.constant(image), level, SEED, **kwargs)
  assert out.dtype == tf.uint8 and out.shape == image.shape
  return out.numpy()


@pytest.mark.parametrize('op', [
    augment.rotate, augment.shear_x, augment.shear_y, augment.translate_x,
    augment.translate_y, augment.cutout, augment.solarize_add
])
def test_ops_at_zero_magnitude_are_identity(op):
  image = image32()
  np.testing.assert_array_equal(run(op, image, 0.0), image)


@pytest.mark.parametrize('op', [
    augment.color, augment.contrast, augment.brightness, augment.sharpness
])
def test_enhance_ops_are_identity_at_factor_one(op):
  # factor = 0.1 + 1.8·L/10 is 1.0 (no change) at L = 5.
  image = image32()
  np.testing.assert_array_equal(run(op, image, 5.0), image)


def test_official_quirks_at_zero_magnitude():
  # Solarize's threshold int(256·0/10) = 0 inverts every pixel. Posterize at
  # 0 bits: the official uint8 shift by 8 is clamped to 7 and keeps the top
  # bit (this test asserted black before posterize_quirk existed); black
  # with the quirk off. tests/test_data_official_ops.py pins both against TF.
  image = image32()
  np.testing.assert_array_equal(run(augment.posterize, image, 0.0),
                                image & 128)
  np.testing.assert_array_equal(run(augment.posterize, image, 0.0, quirk=False),
                                0)
  np.testing.assert_array_equal(run(augment.solarize, image, 0.0), 255 - image)


def test_ops_at_max_magnitude():
  image = image32()
  assert np.all(run(augment.posterize, image, 10.0) % 16 == 0)  # 4 bits kept
  # Threshold 256: official (uint8, mod 256 = 0) inverts all; off, none.
  np.testing.assert_array_equal(run(augment.solarize, image, 10.0), 255 - image)
  np.testing.assert_array_equal(run(augment.solarize, image, 10.0, quirk=False),
                                image)
  added = run(augment.solarize_add, image, 10.0)
  low = image < 128
  np.testing.assert_array_equal(added[low],
                                np.minimum(image[low].astype(int) + 110, 255))
  np.testing.assert_array_equal(added[~low], image[~low])
  # Translation is in pixels: 100 px at M=10 moves a 32-px image out of frame.
  np.testing.assert_array_equal(run(augment.translate_x, image, 10.0), 128)
  shifted = run(augment.translate_x, image, 10.0, translate_const=5.0)
  assert (np.array_equal(shifted[:, :-5], image[:, 5:]) or
          np.array_equal(shifted[:, 5:], image[:, :-5]))
  # Cutout at M=10 greys a (2·4)² square when its centre is inside the image.
  cut = run(augment.cutout, image, 10.0, cutout_const=4.0)
  changed = np.any(cut != image, axis=-1)
  assert 0 < changed.sum() <= 64 and np.all(cut[changed] == 128)
  # 30° rotation: centre pixel stays, corners are filled with grey.
  rotated = run(augment.rotate, image, 10.0)
  assert np.all(rotated[0, 0] == 128) and np.all(rotated[-1, -1] == 128)
  assert not np.array_equal(run(augment.shear_x, image, 10.0), image)
  assert not np.array_equal(run(augment.shear_y, image, 10.0), image)


@pytest.mark.parametrize('op,pil_fn', [
    (augment.equalize, ImageOps.equalize),
    (augment.auto_contrast, ImageOps.autocontrast),
    (augment.invert, ImageOps.invert),
])
def test_histogram_ops_match_pil(op, pil_fn):
  image = image32(low=40, high=180)
  expected = np.asarray(pil_fn(Image.fromarray(image)))
  np.testing.assert_array_equal(run(op, image, 0.0), expected)


@pytest.mark.parametrize('op,enhancer', [
    (augment.color, ImageEnhance.Color),
    # PIL's Contrast uses the mean grey, i.e. the op without the official
    # pixel_count/256 quirk (tests/test_data_official_ops.py pins the quirk).
    (functools.partial(augment.contrast, quirk=False), ImageEnhance.Contrast),
    (augment.brightness, ImageEnhance.Brightness),
    (augment.sharpness, ImageEnhance.Sharpness),
])
@pytest.mark.parametrize('level', [0.0, 10.0])
def test_enhance_ops_match_pil_within_rounding(op, enhancer, level):
  image = image32(low=40, high=180)
  factor = 0.1 + 1.8 * level / 10
  expected = np.asarray(enhancer(Image.fromarray(image)).enhance(factor))
  diff = np.abs(run(op, image, level).astype(int) - expected)
  assert diff.max() <= 1  # the official code truncates where PIL rounds


@pytest.mark.parametrize('policy', ['randaugment', 'autoaugment'])
def test_policies_are_deterministic_eagerly_and_in_map(policy):
  fn = (lambda x, s: augment.randaugment(x, s, num_layers=2, magnitude=9.0)
        ) if policy == 'randaugment' else augment.autoaugment
  images = np.stack([image32(i) for i in range(6)])
  seeds = np.stack([[3, i] for i in range(6)]).astype(np.int64)
  eager = np.stack([fn(tf.constant(x), tf.constant(s))
                    for x, s in zip(images, seeds)])
  mapped = np.stack(list(tf.data.Dataset.from_tensor_slices(
      (images, seeds)).map(fn).as_numpy_iterator()))
  assert eager.dtype == np.uint8 and eager.shape == images.shape
  np.testing.assert_array_equal(eager, mapped)
  assert not np.array_equal(eager, images)


def test_unknown_augment_name():
  with pytest.raises(ValueError) as e:
    options.check_augment_name('randaug')
  for name in ("'randaug'", "'none'", "'autoaugment'", "'randaugment'"):
    assert name in str(e.value)


def test_pixel_constants_fixed_by_default_scaled_on_request():
  # 'fixed' (official, the default) at every size; 'scaled' (the demos, and
  # what this test asserted before the default became official) below 224.
  assert options.pixel_constants('randaugment', 224) == (100.0, 40.0)
  assert options.pixel_constants('randaugment', 600) == (100.0, 40.0)
  assert options.pixel_constants('autoaugment', 380) == (250.0, 100.0)
  assert options.pixel_constants('randaugment', 112) == (100.0, 40.0)
  assert options.pixel_constants('randaugment', 112, 'scaled') == (50.0, 20.0)
  assert options.pixel_constants('autoaugment', 600, 'scaled') == (250.0, 100.0)
  with pytest.raises(ValueError, match="data.aug_pixel_constants='x'; "
                     'accepted: fixed, scaled'):
    options.pixel_constants('randaugment', 224, 'x')
