"""Per-example image preprocessing in TF ops (V1 TPU recipe, `recipe.md` §2).

Every function here works eagerly and inside `tf.data.Dataset.map`, and every
random choice is *stateless*: it is a pure function of an explicit `seed`
(an int32/int64 tensor of shape [2]), so the same seed always gives the same
crop and flip, whatever thread or process runs it.

Train: inception crop (official V1 `sample_distorted_bounding_box` settings,
falling back to the eval centre crop when sampling fails) → bicubic resize →
random horizontal flip. Eval: centre crop of side size/(size+crop_padding)·min(h,w)
→ bicubic resize. Both come in two flavours: on a decoded image, and fused with
JPEG decoding (`tf.image.decode_and_crop_jpeg`) so ImageNet decodes only the crop.

Resizing uses TF2 `tf.image.resize(method='bicubic')` (half-pixel centres,
no antialiasing). The TF1 TPU code used the legacy `resize_bicubic` without
half-pixel centres; the two differ by a sub-pixel shift.
"""
from typing import Sequence

import tensorflow as tf

# The three normalisations of `recipe.md` §2, as (mean, std) in 0..255 units.
# v1: ImageNet mean/std ×255 (TPU V1 model_fn). v2: (x−128)/128 → [−1, 1]
# (AutoML V2). lite: (x−127)/128 (official EfficientNet-Lite MEAN/STD).
_NORMALIZATIONS = {
    'v1': ((0.485 * 255, 0.456 * 255, 0.406 * 255),
           (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    'v2': ((128.0, 128.0, 128.0), (128.0, 128.0, 128.0)),
    'lite': ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
}
NORMALIZATIONS = tuple(_NORMALIZATIONS)

# Official V1 inception-crop settings (TPU `preprocessing._decode_and_random_crop`).
_MIN_OBJECT_COVERED = 0.1
_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
_AREA_RANGE = (0.08, 1.0)
_MAX_ATTEMPTS = 10


def check_normalization(normalization: str) -> str:
  """Returns `normalization` if known.

  Raises:
    ValueError: naming the value and the accepted names.
  """
  if normalization not in _NORMALIZATIONS:
    raise ValueError(f'Unknown normalization {normalization!r}; expected one of '
                     f'{NORMALIZATIONS}.')
  return normalization


def normalize(image: tf.Tensor, normalization: str) -> tf.Tensor:
  """Maps pixels in 0..255 to model input: (x − mean) / std per channel.

  Args:
    image: [..., 3] image in 0..255 (any real or integer dtype).
    normalization: 'v1' (ImageNet mean/std ×255), 'v2' ((x−128)/128) or 'lite'
      ((x−127)/128).

  Returns:
    float32 tensor of the same shape.
  """
  mean, std = _NORMALIZATIONS[check_normalization(normalization)]
  image = tf.cast(image, tf.float32)
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def to_rgb(image: tf.Tensor) -> tf.Tensor:
  """Makes a [H, W, C] image 3-channel: grey is repeated, alpha is dropped."""
  channels = image.shape[-1]
  if channels == 3:
    return image
  if channels == 1:
    return tf.image.grayscale_to_rgb(image)
  if channels == 4:
    return image[..., :3]
  # Unknown static channel count (e.g. `decode_image(channels=0)`).
  image = tf.cond(tf.shape(image)[-1] == 1,
                  lambda: tf.tile(image, [1, 1, 3]), lambda: image[..., :3])
  return tf.ensure_shape(image, [None, None, 3])


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Bicubic resize of a [H, W, 3] image to float32 [size, size, 3]."""
  image = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size],
                          method=tf.image.ResizeMethod.BICUBIC)
  return tf.ensure_shape(image, [image_size, image_size, 3])


def center_crop_window(height: tf.Tensor, width: tf.Tensor, image_size: int,
                       crop_padding: int = 32) -> tf.Tensor:
  """The V1 eval crop window [offset_y, offset_x, side, side] (int32).

  side = int(size / (size + crop_padding) · min(h, w)), offset ((h − side) + 1) // 2,
  exactly as TPU `_decode_and_center_crop` (before commit 22d5cab), so at
  crop_padding=32 B0 (224) keeps 87.5% of the short side.
  """
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  fraction = image_size / (image_size + crop_padding)
  side = tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32),
                 tf.int32)
  side = tf.maximum(side, 1)  # a 1-px image must still yield a crop
  return tf.stack([((height - side) + 1) // 2, ((width - side) + 1) // 2, side,
                   side])


def inception_crop_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor,
                          image_size: int, crop_padding: int = 32,
                          area_range: Sequence[float] = _AREA_RANGE) -> tf.Tensor:
  """Samples the V1 train crop window [offset_y, offset_x, h, w] (int32).

  `stateless_sample_distorted_bounding_box` with the official settings
  (min_object_covered 0.1, aspect ratio 3/4..4/3, area 0.08..1, 10 attempts,
  whole image as the only box). When all attempts fail TF returns the whole
  image; the official code then uses the eval centre crop, and so do we.
  """
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.stack([height, width, 3]),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32),
      seed=seed,
      min_object_covered=_MIN_OBJECT_COVERED,
      aspect_ratio_range=_ASPECT_RATIO_RANGE,
      area_range=tuple(area_range),
      max_attempts=_MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True)
  sampled = tf.stack([begin[0], begin[1], size[0], size[1]])
  # The official test is "at least 3 of (h, w, c) equal the image's". Comparing
  # only h and w also catches grey JPEGs (c=1 in the header, 3 after decoding),
  # for which the official test never fires.
  failed = tf.logical_and(tf.equal(size[0], height), tf.equal(size[1], width))
  return tf.cond(
      failed,
      lambda: center_crop_window(height, width, image_size, crop_padding),
      lambda: sampled)


def _crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  return tf.slice(image, tf.stack([window[0], window[1], 0]),
                  tf.stack([window[2], window[3], -1]))


def inception_crop(image: tf.Tensor, seed: tf.Tensor, image_size: int, *,
                   crop_padding: int = 32) -> tf.Tensor:
  """Random V1 inception crop of a decoded [H, W, 3] image, bicubic-resized.

  Args:
    image: decoded [H, W, 3] image (uint8 or float, 0..255).
    seed: int32/int64 [2] stateless seed.
    image_size: output side.
    crop_padding: centre-crop padding used by the fallback.

  Returns:
    float32 [image_size, image_size, 3].
  """
  shape = tf.shape(image)
  window = inception_crop_window(shape[0], shape[1], seed, image_size,
                                 crop_padding)
  return resize(_crop(image, window), image_size)


def center_crop(image: tf.Tensor, image_size: int, *,
                crop_padding: int = 32) -> tf.Tensor:
  """V1 eval centre crop of a decoded [H, W, 3] image, bicubic-resized (float32)."""
  shape = tf.shape(image)
  window = center_crop_window(shape[0], shape[1], image_size, crop_padding)
  return resize(_crop(image, window), image_size)


def decode_and_inception_crop_jpeg(image_bytes: tf.Tensor, seed: tf.Tensor,
                                   image_size: int, *,
                                   crop_padding: int = 32) -> tf.Tensor:
  """`inception_crop` fused with JPEG decoding: only the crop is decoded."""
  shape = tf.image.extract_jpeg_shape(image_bytes)
  window = inception_crop_window(shape[0], shape[1], seed, image_size,
                                 crop_padding)
  return resize(tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3),
                image_size)


def decode_and_center_crop_jpeg(image_bytes: tf.Tensor, image_size: int, *,
                                crop_padding: int = 32) -> tf.Tensor:
  """`center_crop` fused with JPEG decoding: only the crop is decoded."""
  shape = tf.image.extract_jpeg_shape(image_bytes)
  window = center_crop_window(shape[0], shape[1], image_size, crop_padding)
  return resize(tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3),
                image_size)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Stateless random left-right flip with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)
