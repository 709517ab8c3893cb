"""The input ops against the official TF code, op for op.

Oracles: TensorFlow itself where the official op is a TF op (tf.bitwise on
uint8, the TF1 `resize_bicubic`, `tf.image.resize`, the bounding-box sampler
with the official arguments), and the official formulas transcribed from
tensorflow/tpu `models/official/efficientnet/autoaugment.py` and
`preprocessing.py` (commit 7dc921f) and google/automl `efficientnetv2/
preprocessing.py`, `preprocess_legacy.py`, `datasets.py` (commit 6a54c87).
"""
import io
import math

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from efficientnet_jax.data import augment
from efficientnet_jax.data import options
from efficientnet_jax.data import input_pipeline
from efficientnet_jax.data import mixing
from efficientnet_jax.data import preprocessing

SEED = tf.constant([5, 8], tf.int64)


def random_image(height, width, seed=0, low=0, high=256):
  rng = np.random.default_rng(seed)
  return rng.integers(low, high, (height, width, 3), dtype=np.uint8)


def ours(op, image, level, seed=SEED, **kwargs):
  return op(tf.constant(image), level, seed, **kwargs).numpy()


# ---------------------------------------------------------------------------
# The official ops, transcribed (tf.to_float → tf.cast; contrib/tfa image
# transforms → ImageProjectiveTransformV2, nearest, zero fill, as wrap/unwrap
# expects). Arguments are the official Python numbers of `level_to_arg`.


def official_blend(image1, image2, factor):
  if factor == 0.0:
    return tf.convert_to_tensor(image1)
  if factor == 1.0:
    return tf.convert_to_tensor(image2)
  image1 = tf.cast(image1, tf.float32)
  image2 = tf.cast(image2, tf.float32)
  temp = image1 + factor * (image2 - image1)
  if 0.0 < factor < 1.0:
    return tf.cast(temp, tf.uint8)
  return tf.cast(tf.clip_by_value(temp, 0.0, 255.0), tf.uint8)


def official_posterize(image, bits):
  shift = 8 - bits
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def official_solarize(image, threshold):
  return tf.where(image < threshold, image, 255 - image)


def official_solarize_add(image, addition):
  added = tf.cast(image, tf.int64) + addition
  added = tf.cast(tf.clip_by_value(added, 0, 255), tf.uint8)
  return tf.where(image < 128, added, image)


def official_color(image, factor):
  degenerate = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
  return official_blend(degenerate, image, factor)


def official_contrast(image, factor):
  degenerate = tf.cast(tf.image.rgb_to_grayscale(image), tf.int32)
  hist = tf.histogram_fixed_width(degenerate, [0, 255], nbins=256)
  mean = tf.reduce_sum(tf.cast(hist, tf.float32)) / 256.0
  degenerate = tf.ones_like(degenerate, dtype=tf.float32) * mean
  degenerate = tf.clip_by_value(degenerate, 0.0, 255.0)
  degenerate = tf.image.grayscale_to_rgb(tf.cast(degenerate, tf.uint8))
  return official_blend(degenerate, image, factor)


def official_brightness(image, factor):
  return official_blend(tf.zeros_like(image), image, factor)


def official_sharpness(image, factor):
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=tf.float32,
                       shape=[3, 3, 1, 1]) / 13.
  kernel = tf.tile(kernel, [1, 1, 3, 1])
  degenerate = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], padding='VALID')
  degenerate = tf.squeeze(tf.cast(tf.clip_by_value(degenerate, 0.0, 255.0),
                                  tf.uint8), [0])
  mask = tf.pad(tf.ones_like(degenerate), [[1, 1], [1, 1], [0, 0]])
  padded = tf.pad(degenerate, [[1, 1], [1, 1], [0, 0]])
  result = tf.where(tf.equal(mask, 1), padded, image)
  return official_blend(result, image, factor)


def official_autocontrast(image):
  def scale_channel(im):
    lo = tf.cast(tf.reduce_min(im), tf.float32)
    hi = tf.cast(tf.reduce_max(im), tf.float32)

    def scale_values(im):
      scale = 255.0 / (hi - lo)
      im = tf.cast(im, tf.float32) * scale + (-lo * scale)
      return tf.cast(tf.clip_by_value(im, 0.0, 255.0), tf.uint8)
    return tf.cond(hi > lo, lambda: scale_values(im), lambda: im)
  return tf.stack([scale_channel(image[:, :, c]) for c in range(3)], 2)


def official_equalize(image):
  def scale_channel(im, c):
    im = tf.cast(im[:, :, c], tf.int32)
    histo = tf.histogram_fixed_width(im, [0, 255], nbins=256)
    nonzero = tf.where(tf.not_equal(histo, 0))
    nonzero_histo = tf.reshape(tf.gather(histo, nonzero), [-1])
    step = (tf.reduce_sum(nonzero_histo) - nonzero_histo[-1]) // 255

    def build_lut(histo, step):
      lut = (tf.cumsum(histo) + (step // 2)) // step
      lut = tf.concat([[0], lut[:-1]], 0)
      return tf.clip_by_value(lut, 0, 255)
    result = tf.cond(tf.equal(step, 0), lambda: im,
                     lambda: tf.gather(build_lut(histo, step), im))
    return tf.cast(result, tf.uint8)
  return tf.stack([scale_channel(image, c) for c in range(3)], 2)


def official_invert(image):
  return 255 - tf.convert_to_tensor(image)


def _official_transform(image, transform):
  """contrib/tfa `transform(wrap(image), ...)` then `unwrap(..., [128] * 3)`."""
  shape = tf.shape(image)
  wrapped = tf.concat([image, tf.ones([shape[0], shape[1], 1], image.dtype)], 2)
  out = tf.raw_ops.ImageProjectiveTransformV2(
      images=wrapped[None], transforms=tf.reshape(
          tf.cast(tf.stack(transform), tf.float32), [1, 8]),
      output_shape=shape[:2], interpolation='NEAREST', fill_mode='CONSTANT')[0]
  flat = tf.reshape(out, [-1, 4])
  replace = tf.constant([128, 128, 128, 1], image.dtype)
  flat = tf.where(tf.equal(flat[:, 3:], 0), replace, flat)
  return tf.reshape(flat, tf.shape(out))[:, :, :3]


def official_rotate(image, degrees):
  radians = tf.constant(degrees, tf.float32) * (math.pi / 180.0)
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  cos, sin = tf.cos(radians), tf.sin(radians)  # angles_to_projective_transforms
  x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
  y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
  return _official_transform(image, [cos, -sin, x_offset, sin, cos, y_offset,
                                     0.0, 0.0])


def official_shear_x(image, level):
  level = tf.constant(level, tf.float32)
  return _official_transform(image, [1., level, 0., 0., 1., 0., 0., 0.])


def official_shear_y(image, level):
  level = tf.constant(level, tf.float32)
  return _official_transform(image, [1., 0., 0., level, 1., 0., 0., 0.])


def official_translate_x(image, pixels):
  # translate(wrap(image), [-pixels, 0]) → transform [1, 0, -dx, 0, 1, -dy, 0, 0]
  dx = -tf.constant(pixels, tf.float32)
  return _official_transform(image, [1., 0., -dx, 0., 1., 0., 0., 0.])


def official_translate_y(image, pixels):
  dy = -tf.constant(pixels, tf.float32)
  return _official_transform(image, [1., 0., 0., 0., 1., -dy, 0., 0.])


def enhance_arg(level):
  return (level / 10.) * 1.8 + 0.1


# ---------------------------------------------------------------------------
# Posterize and Solarize: TF's own uint8 arithmetic is the oracle.


@pytest.mark.parametrize('level', [0.0, 1.0, 2.5, 5.0, 7.5, 10.0, 22.5, 28.0])
def test_posterize_is_tf_bitwise_on_uint8(level):
  # bits int(4·L/10) = 0..4 for L in 0..10; 9 and 11 at the B7-style M=22.5, 28.
  image = random_image(16, 16)
  bits = int((level / 10.) * 4)
  expected = official_posterize(tf.constant(image), bits).numpy()
  np.testing.assert_array_equal(ours(augment.posterize, image, level), expected)
  if bits == 0:  # the quirk: TF clamps the shift by 8 to 7, the top bit stays
    np.testing.assert_array_equal(expected, image & 128)


def test_posterize_without_the_quirk():
  image = random_image(16, 16)
  np.testing.assert_array_equal(
      ours(augment.posterize, image, 0.0, quirk=False), 0)
  np.testing.assert_array_equal(
      ours(augment.posterize, image, 28.0, quirk=False), image)  # 8 bits kept
  np.testing.assert_array_equal(
      ours(augment.posterize, image, 5.0, quirk=False), image & 0b11000000)


@pytest.mark.parametrize('level', [0.0, 3.0, 8.0, 10.0, 15.0, 28.0])
def test_solarize_is_the_official_uint8_comparison(level):
  # A Python int threshold against a uint8 image becomes uint8 (mod 256):
  # 256 (L=10) inverts everything, 384 (L=15) pixels >= 128.
  image = random_image(16, 16)
  threshold = int((level / 10.) * 256)
  expected = official_solarize(tf.constant(image), threshold).numpy()
  np.testing.assert_array_equal(ours(augment.solarize, image, level), expected)
  off = ours(augment.solarize, image, level, quirk=False)
  np.testing.assert_array_equal(
      off, np.where(image.astype(int) < threshold, image, 255 - image))


# ---------------------------------------------------------------------------
# The other ops at magnitude 0 and 10 (and the RandAugment M=28 of B7).


@pytest.mark.parametrize('level', [0.0, 10.0])
@pytest.mark.parametrize('op,official', [
    (augment.color, official_color),
    (augment.contrast, official_contrast),
    (augment.brightness, official_brightness),
    (augment.sharpness, official_sharpness),
])
def test_enhance_ops_equal_the_official_formulas(op, official, level):
  image = random_image(32, 32)
  expected = official(tf.constant(image), enhance_arg(level)).numpy()
  np.testing.assert_array_equal(ours(op, image, level), expected)


@pytest.mark.parametrize('size,grey', [(128, 64), (320, 255)])
def test_contrast_quirk_blends_with_pixel_count_over_256(size, grey):
  # sum(histogram)/256 = size²/256 (64 at 128 px), clipped to 255 (320 px).
  image = random_image(size, size, seed=2)
  level = 10.0
  expected = official_contrast(tf.constant(image), enhance_arg(level)).numpy()
  got = ours(augment.contrast, image, level)
  np.testing.assert_array_equal(got, expected)
  factor = np.float32(enhance_arg(level))
  formula = np.clip(grey + factor * (image.astype(np.float32) - grey), 0, 255)
  np.testing.assert_array_equal(got, formula.astype(np.uint8))
  # Off: the mean grey level, which differs here.
  assert not np.array_equal(ours(augment.contrast, image, level, quirk=False),
                            got)


@pytest.mark.parametrize('level', [0.0, 10.0, 28.0])
def test_solarize_add_equals_the_official_formula(level):
  image = random_image(32, 32)
  expected = official_solarize_add(tf.constant(image),
                                   int((level / 10.) * 110)).numpy()
  np.testing.assert_array_equal(ours(augment.solarize_add, image, level),
                                expected)


@pytest.mark.parametrize('op,official', [
    (augment.auto_contrast, official_autocontrast),
    (augment.equalize, official_equalize),
    (augment.invert, official_invert),
])
def test_argument_free_ops_equal_the_official_code(op, official):
  for image in (random_image(32, 32), random_image(32, 32, 1, 30, 200),
                np.full((8, 8, 3), 77, np.uint8)):
    np.testing.assert_array_equal(ours(op, image, 0.0),
                                  official(tf.constant(image)).numpy())


@pytest.mark.parametrize('level', [0.0, 10.0])
@pytest.mark.parametrize('op,official,maximum', [
    (augment.rotate, official_rotate, 30.),
    (augment.shear_x, official_shear_x, 0.3),
    (augment.shear_y, official_shear_y, 0.3),
    (augment.translate_x, official_translate_x, 100.),
    (augment.translate_y, official_translate_y, 100.),
])
def test_geometric_ops_equal_the_official_transforms(op, official, maximum,
                                                     level):
  # Official: the argument (level/10)·max, negated with probability 1/2.
  image = random_image(128, 128, seed=3)
  arg = (level / 10.) * maximum
  signs = set()
  for i in range(6):
    got = ours(op, image, level, seed=tf.constant([1, i], tf.int64))
    matches = [s for s in (1, -1)
               if np.array_equal(got, official(tf.constant(image),
                                               s * arg).numpy())]
    assert matches, f'seed {i}: neither +{arg} nor -{arg}'
    signs.update(matches)
  if level:
    assert signs == {1, -1}


def test_translate_and_cutout_pixels_are_fixed_at_128_px():
  # Official constants at every size: RandAugment translate 100 px, cutout
  # side 2·40; AutoAugment translate 250. 'scaled' is the demos' opt-in.
  assert options.pixel_constants('randaugment', 128) == (100.0, 40.0)
  assert options.pixel_constants('autoaugment', 128) == (250.0, 100.0)
  image = random_image(128, 128, seed=4, low=0, high=120)  # no 128 pixels
  shifted = ours(augment.translate_x, image, 10.0, translate_const=100.0)
  grey = np.all(shifted == 128, axis=-1)
  assert grey.sum(axis=1).tolist() == [100] * 128  # 28 columns survive
  interior = 0
  for i in range(24):
    cut = ours(augment.cutout, image, 10.0, seed=tf.constant([2, i], tf.int64),
               cutout_const=40.0)
    rows, cols = np.nonzero(np.all(cut == 128, axis=-1))
    height = rows.max() - rows.min() + 1
    width = cols.max() - cols.min() + 1
    assert len(rows) == height * width  # one rectangle
    # Official: rows [max(0, cy − 40), min(128, cy + 40)), likewise columns.
    assert height <= 80 and width <= 80
    assert height == 80 or rows.min() == 0 or rows.max() == 127
    assert width == 80 or cols.min() == 0 or cols.max() == 127
    interior += height == width == 80
  assert interior > 0


def test_pipeline_passes_the_fixed_constants(monkeypatch):
  got = {}
  real = augment.randaugment

  def spy(image, seed, **kwargs):
    got.update(kwargs)
    return real(image, seed, **kwargs)
  monkeypatch.setattr(augment, 'randaugment', spy)
  fn = input_pipeline._augment_fn(  # pylint: disable=protected-access
      'randaugment', 128, randaug_layers=2, randaug_magnitude=9.0,
      pixel_constants='fixed', posterize_quirk=True, contrast_quirk=True,
      solarize_quirk=True)
  fn(tf.constant(random_image(128, 128)), SEED)
  assert (got['translate_const'], got['cutout_const']) == (100.0, 40.0)
  assert got['posterize_quirk'] and got['contrast_quirk']


# ---------------------------------------------------------------------------
# Resize kernels: the official TF calls are the oracle.


def legacy_bicubic_matrix(in_size, out_size):
  """TF1 resize_bicubic as a matrix: no half-pixel centres, a = −0.75,
  1024-entry coefficient table, edge indices clamped (not renormalised)."""
  a = -0.75

  def kernel(d):
    d = abs(d)
    if d <= 1:
      return ((a + 2) * d - (a + 3)) * d * d + 1
    return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a if d < 2 else 0.0
  matrix = np.zeros((out_size, in_size))
  for o in range(out_size):
    x = o * (in_size / out_size)
    i = math.floor(x)
    t = round((x - i) * 1024) / 1024
    for j, d in zip(range(i - 1, i + 3), (1 + t, t, 1 - t, 2 - t)):
      matrix[o, min(max(j, 0), in_size - 1)] += kernel(d)
  return matrix


@pytest.mark.parametrize('shape,size', [((37, 53), 24), ((20, 14), 33)])
def test_bicubic_tf1_is_tf1_resize_bicubic(shape, size):
  image = random_image(*shape, seed=5)
  got = preprocessing.resize_image(tf.constant(image), size, 'bicubic_tf1')
  official = tf.compat.v1.image.resize_bicubic([image], [size, size])[0]
  np.testing.assert_array_equal(got, official)
  wy = legacy_bicubic_matrix(shape[0], size)
  wx = legacy_bicubic_matrix(shape[1], size)
  reference = np.einsum('oh,hwc,pw->opc', wy, image.astype(np.float64), wx)
  np.testing.assert_allclose(got, reference, atol=2e-3)
  tf2 = preprocessing.resize_image(tf.constant(image), size, 'bicubic')
  assert np.abs(np.asarray(tf2) - np.asarray(got)).max() > 1.0  # other kernel


def test_bilinear_is_the_tf2_resize_default():
  image = random_image(37, 53, seed=6)
  got = preprocessing.resize_image(tf.constant(image), 24, 'bilinear')
  np.testing.assert_array_equal(got, tf.image.resize(image, [24, 24]))
  with pytest.raises(ValueError, match="data.resize='area'; accepted: "
                     'bicubic_tf1, bilinear, bicubic, bilinear_tf1'):
    preprocessing.resize_image(tf.constant(image), 24, 'area')


def test_bilinear_tf1_is_the_official_lite_resize():
  # tensorflow/tpu `_resize_image(image, size, BILINEAR)` under compat.v1.
  image = random_image(37, 53, seed=6)
  got = preprocessing.resize_image(tf.constant(image), 24, 'bilinear_tf1')
  official = tf.compat.v1.image.resize([image], [24, 24],
                                       tf.image.ResizeMethod.BILINEAR)[0]
  np.testing.assert_array_equal(got, official)
  assert np.abs(np.asarray(got) - tf.image.resize(image, [24, 24])).max() > 1


def test_v1_fallback_crop_is_bicubic_whatever_the_resize():
  # tensorflow/tpu `_decode_and_random_crop`: the fallback
  # `_decode_and_center_crop(image_bytes, image_size)` gets no resize_method.
  seed = tf.constant([3, 1], tf.int64)
  thin = random_image(12, 400, seed=7)  # no 3/4..4/3 crop of >= 8% exists
  got = preprocessing.inception_crop(tf.constant(thin), seed, 24,
                                     crop_padding=0, resize='bilinear_tf1')
  crop = thin[:, 194:206]  # the 12x12 centre square
  expected = preprocessing.resize_image(crop, 24, 'bicubic_tf1')
  np.testing.assert_array_equal(got, expected)
  assert not np.array_equal(
      got, preprocessing.resize_image(crop, 24, 'bilinear_tf1'))
  image = random_image(50, 70, seed=7)  # sampling succeeds: bilinear
  window = preprocessing.inception_crop_window(50, 70, seed, 24)
  assert window.numpy().tolist()[2:] != [50, 70]
  got = preprocessing.inception_crop(tf.constant(image), seed, 24,
                                     resize='bilinear_tf1')
  expected = preprocessing.resize_image(
      preprocessing._crop(image, window), 24, 'bilinear_tf1')  # pylint: disable=protected-access
  np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------------------
# Crops.


@pytest.mark.parametrize('height,width', [(50, 70), (34, 400)])
def test_train_crop_arguments_are_the_official_ones(height, width):
  # At 34x400 the V1 sampler often fails, so its 10 attempts matter.
  v1, v2 = [], []
  for i in range(30):
    seed = tf.constant([7, i], tf.int64)
    # tensorflow/tpu `_decode_and_random_crop` / `distorted_bounding_box_crop`.
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        [height, width, 3], tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed, min_object_covered=0.1, aspect_ratio_range=(3. / 4, 4. / 3.),
        area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    window = preprocessing.inception_crop_window(height, width, seed, 24,
                                                 crop='v1')
    if size[0] == height and size[1] == width:  # failed: the eval centre crop
      expected = preprocessing.center_crop_window(height, width, 24, 32)
    else:
      expected = [begin[0], begin[1], size[0], size[1]]
    v1.append(window.numpy().tolist())
    np.testing.assert_array_equal(window, expected)
    # google/automl `preprocess_for_train`: the op's other defaults.
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        [height, width, 3], tf.zeros([0, 0, 4], tf.float32), seed,
        area_range=(0.05, 1.0), min_object_covered=0,
        use_image_if_no_bounding_boxes=True)
    window = preprocessing.inception_crop_window(height, width, seed, 24,
                                                 crop='v2')
    v2.append(window.numpy().tolist())
    np.testing.assert_array_equal(window, [begin[0], begin[1], size[0],
                                           size[1]])
  assert v1 != v2


def test_v2_train_crop_keeps_the_whole_image_when_sampling_fails():
  seed = tf.constant([1, 2], tf.int64)
  whole = preprocessing.inception_crop_window(50, 70, seed, 24,
                                              area_range=(1.0, 1.0), crop='v2')
  np.testing.assert_array_equal(whole, [0, 0, 50, 70])
  centre = preprocessing.inception_crop_window(50, 70, seed, 24,
                                               area_range=(1.0, 1.0))
  np.testing.assert_array_equal(centre,
                                preprocessing.center_crop_window(50, 70, 24))


def official_v2_eval(image, image_size):
  """google/automl efficientnetv2/preprocessing.py `preprocess_for_eval`."""
  if image_size < 320:
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    ratio = image_size / (image_size + 32)
    crop_size = tf.cast(
        (ratio * tf.cast(tf.minimum(height, width), tf.float32)), tf.int32)
    y, x = (height - crop_size) // 2, (width - crop_size) // 2
    image = tf.image.crop_to_bounding_box(image, y, x, crop_size, crop_size)
  return tf.image.resize(image, [image_size, image_size])


@pytest.mark.parametrize('size', [224, 319, 320, 384])
def test_v2_eval_crops_below_320_and_squashes_from_320(size):
  image = random_image(41, 66, seed=8)  # odd margins: (h − side) // 2 matters
  got = preprocessing.eval_image(image, size, crop='v2', crop_padding=32,
                                 resize='bilinear')
  assert got.dtype == tf.float32 and got.shape == (size, size, 3)
  np.testing.assert_allclose(got, official_v2_eval(tf.constant(image), size),
                             atol=1e-4)
  window = preprocessing.center_crop_window(41, 66, size, 32, 'v2')
  if size >= 320:
    np.testing.assert_array_equal(window, [0, 0, 41, 66])
  else:
    side = int(size / (size + 32) * 41)
    np.testing.assert_array_equal(window, [(41 - side) // 2, (66 - side) // 2,
                                           side, side])


def official_v1_eval(image_bytes, image_size, crop_padding=32):
  """`_decode_and_center_crop`, then `resize_bicubic`.

  Padding 32 as google/automl preprocess_legacy.py; tensorflow/tpu since
  commit 22d5cab uses round(size/7), which is also 32 at 224 px.
  """
  shape = tf.image.extract_jpeg_shape(image_bytes)
  side = tf.cast(((image_size / (image_size + crop_padding)) *
                  tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)),
                 tf.int32)
  window = tf.stack([((shape[0] - side) + 1) // 2,
                     ((shape[1] - side) + 1) // 2, side, side])
  image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
  return tf.compat.v1.image.resize_bicubic([image], [image_size,
                                                     image_size])[0]


def test_v1_eval_is_the_official_centre_crop_and_tf1_bicubic():
  buffer = io.BytesIO()
  Image.fromarray(random_image(45, 62, seed=9)).save(buffer, format='JPEG')
  jpeg = tf.constant(buffer.getvalue())
  expected = official_v1_eval(jpeg, 24)
  fused = preprocessing.decode_and_center_crop_jpeg(jpeg, 24)
  np.testing.assert_array_equal(fused, expected)
  decoded = tf.io.decode_jpeg(jpeg, channels=3).numpy()
  np.testing.assert_allclose(preprocessing.eval_image(decoded, 24), expected,
                             atol=1e-3)  # the decoders agree to rounding
  assert preprocessing.eval_image(decoded[..., :1], 24).shape == (24, 24, 3)


# ---------------------------------------------------------------------------
# CutMix.


def official_cutmix_weight(masks):
  """google/automl `cutmix`: reduce_sum(mask) / size(mask) over the batch."""
  masks = tf.constant(masks[..., None], tf.float32)
  return float(tf.reduce_sum(masks) / tf.cast(tf.size(masks), tf.float32))


@pytest.mark.parametrize('mixup_alpha', [0.0, 0.4])
def test_cutmix_label_weight_is_the_batch_mean_box_area(mixup_alpha):
  batch, size = 8, 12
  images = np.broadcast_to(np.arange(batch, dtype=np.float32)[:, None, None,
                                                              None],
                           (batch, size, size, 3)).copy()
  labels = np.eye(batch, dtype=np.float32)
  mixed, soft = mixing.mix_batch(images, labels, mixup_alpha=mixup_alpha,
                                  cutmix_alpha=1.0,
                                  rng=np.random.default_rng(3))
  # With mixup too, the second half (B // 2 on) is cutmixed within itself.
  first = batch // 2 if mixup_alpha else 0
  part = np.arange(first, batch)
  partners = part[::-1]
  masks = np.stack([mixed[i, ..., 0] == j for i, j in zip(part, partners)])
  weight = official_cutmix_weight(masks)
  assert len({m.mean() for m in masks}) > 1  # boxes differ, weights do not
  for i, j in zip(part, partners):
    np.testing.assert_allclose(soft[i, j], weight, rtol=1e-6)
    np.testing.assert_allclose(soft[i, i], 1 - weight, rtol=1e-6)


# ---------------------------------------------------------------------------
# Policies and pipeline options.


def test_quirks_reach_the_policies():
  image = random_image(32, 32)
  for i in range(40):
    seed = tf.constant([9, i], tf.int64)
    official = augment.randaugment(tf.constant(image), seed, num_layers=1,
                                   magnitude=0.0).numpy()
    off = augment.randaugment(tf.constant(image), seed, num_layers=1,
                              magnitude=0.0, posterize_quirk=False).numpy()
    if not np.array_equal(official, off):  # posterize was drawn
      np.testing.assert_array_equal(official, image & 128)
      np.testing.assert_array_equal(off, 0)
      return
  pytest.fail('posterize never drawn in 40 seeds')


def test_pipeline_rejects_unknown_options(tmp_path):
  from efficientnet_jax import data  # pylint: disable=g-import-not-at-top
  spec = data.DataSpec('folder', folder=str(tmp_path))
  for kwargs, message in (
      (dict(crop='v3'), "data.crop='v3'; accepted: v1, v2"),
      (dict(resize='nearest'), "data.resize='nearest'"),
      (dict(aug_pixel_constants='tiny'),
       "data.aug_pixel_constants='tiny'; accepted: fixed, scaled")):
    with pytest.raises(ValueError, match=message):
      data.make_train_iterator(spec, image_size=8, batch_size=2, seed=0,
                               normalization='v1', num_classes=2, **kwargs)
  with pytest.raises(ValueError, match="data.crop='v3'"):
    data.make_eval_iterator(spec, image_size=8, batch_size=2,
                            normalization='v1', crop='v3')


@pytest.mark.parametrize('size', [12, 320])
def test_eval_pipeline_is_eval_image_with_the_v2_options(tmp_path, size):
  from efficientnet_jax import data  # pylint: disable=g-import-not-at-top
  (tmp_path / 'only').mkdir()
  arrays = [random_image(30 + 5 * i, 41, seed=i) for i in range(3)]
  for i, array in enumerate(arrays):
    Image.fromarray(array).save(tmp_path / 'only' / f'{i}.png')
  spec = data.DataSpec('folder', folder=str(tmp_path))
  batch = next(data.make_eval_iterator(
      spec, image_size=size, batch_size=3, normalization='v2', crop='v2',
      resize='bilinear'))
  for array, image in zip(arrays, batch['image']):
    expected = preprocessing.normalize(preprocessing.eval_image(
        array, size, crop='v2', crop_padding=32, resize='bilinear'), 'v2')
    np.testing.assert_allclose(image, expected, atol=1e-5)
  train = next(data.make_train_iterator(
      spec, image_size=size, batch_size=2, seed=0, normalization='v2',
      num_classes=1, augment='randaugment', crop='v2', resize='bilinear'))
  assert train['image'].shape == (2, size, size, 3)
