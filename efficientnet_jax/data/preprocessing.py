"""Per-example image preprocessing in TF ops, op for op the official code.

Every function here works eagerly and inside `tf.data.Dataset.map`, and every
random choice is *stateless*: it is a pure function of an explicit `seed`
(an int32/int64 tensor of shape [2]), so the same seed always gives the same
crop and flip, whatever thread or process runs it.

Two official crop recipes (`options.CROPS`):

* 'v1': tensorflow/tpu `models/official/efficientnet/preprocessing.py`
  (commit 7dc921f), which google/automl `efficientnetv2/preprocess_legacy.py`
  (commit 6a54c87) repeats for V2-B0..B3. Train: `sample_distorted_bounding_box`
  (min_object_covered 0.1, aspect ratio 3/4..4/3, area 0.08..1, 10 attempts);
  when sampling fails, the eval crop. Eval: centre crop of side
  int(size/(size+crop_padding)·min(h, w)) at offsets ((h − side) + 1) // 2.
  (tensorflow/tpu since commit 22d5cab sets crop_padding = round(size/7), 32 at
  224 px; the legacy V2 code keeps 32 at every size; here it is an argument.)
* 'v2': google/automl `efficientnetv2/preprocessing.py` (commit 6a54c87), the
  V2-S/M/L/XL pipeline. Train: `sample_distorted_bounding_box` with
  min_object_covered 0, area 0.05..1 and the op's defaults (aspect ratio
  0.75..1.33, 100 attempts); when sampling fails, the whole image. Eval below
  320 px: centre crop of side int(size/(size+crop_padding)·min(h, w)) at
  offsets (h − side) // 2; at 320 px and above no crop: the whole image is
  resized (squashed) to the square.

Resizing (`options.RESIZE_METHODS`): 'bicubic_tf1' is TF1 `resize_bicubic`
(align_corners=False, half_pixel_centers=False, cubic coefficient −0.75), the
V1 and legacy V2 default; 'bilinear_tf1' is TF1 `tf.image.resize(...,
BILINEAR)` (no half-pixel centres), what tensorflow/tpu `main.py` passes for
EfficientNet-Lite (whose 'v1' train crop still falls back to 'bicubic_tf1',
as the official fallback ignores `resize_method`); 'bilinear' is TF2
`tf.image.resize`'s default (half-pixel centres, no antialiasing), the V2
pipeline's; 'bicubic' is TF2 bicubic (half-pixel centres, Keys' −0.5).
Outputs are float32 and not clipped, as in the official code (augmentation
clips and truncates to uint8 later).

Train: crop → resize → random horizontal flip. Eval: `eval_image`, the one
definition (predict.py may call it on a decoded image), or its fused-JPEG twin
`decode_and_center_crop_jpeg`, which decodes only the crop.
"""
from typing import Sequence

import tensorflow as tf

from efficientnet_jax.data import options



def check_choice(field: str, value: str, accepted: Sequence[str]) -> str:
  """Returns `value` if in `accepted`, else ValueError naming data.<field>."""
  if value not in accepted:
    raise ValueError(f'data.{field}={value!r}; accepted: {", ".join(accepted)}')
  return value


def check_normalization(normalization: str) -> str:
  """Returns `normalization` if known.

  Raises:
    ValueError: naming the value and the accepted names.
  """
  if normalization not in options.NORMALIZATIONS:
    raise ValueError(f'Unknown normalization {normalization!r}; expected one of '
                     f'{tuple(options.NORMALIZATIONS)}.')
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
  mean, std = options.NORMALIZATIONS[check_normalization(normalization)]
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


def resize_image(image: tf.Tensor, image_size: int,
                 method: str = 'bicubic_tf1') -> tf.Tensor:
  """Resizes a [H, W, 3] image to float32 [size, size, 3] (not clipped).

  Args:
    image: uint8 or float image in 0..255.
    image_size: output side.
    method: one of `options.RESIZE_METHODS` (module docstring).

  Raises:
    ValueError: unknown method.
  """
  size = [image_size, image_size]
  if check_choice('resize', method, options.RESIZE_METHODS) == 'bicubic_tf1':
    # The official V1 `_resize_image` default, `tf.image.resize_bicubic` in
    # `tensorflow.compat.v1`, on the uint8 crop.
    out = tf.compat.v1.image.resize_bicubic(
        image[None], size, align_corners=False, half_pixel_centers=False)[0]
  elif method == 'bilinear':
    out = tf.image.resize(image, size)  # automl V2: `tf.image.resize` default
  elif method == 'bilinear_tf1':
    # tensorflow/tpu `_resize_image` with BILINEAR: compat.v1 `tf.image.resize`.
    out = tf.compat.v1.image.resize_bilinear(
        image[None], size, align_corners=False, half_pixel_centers=False)[0]
  else:
    out = tf.image.resize(tf.cast(image, tf.float32), size,
                          method=tf.image.ResizeMethod.BICUBIC)
  return tf.ensure_shape(tf.cast(out, tf.float32), [image_size, image_size, 3])


def center_crop_window(height: tf.Tensor, width: tf.Tensor, image_size: int,
                       crop_padding: int = 32, crop: str = 'v1') -> tf.Tensor:
  """The eval crop window [offset_y, offset_x, crop_h, crop_w] (int32).

  side = int(size / (size + crop_padding) · min(h, w)); 'v1' offsets are
  ((h − side) + 1) // 2 (tensorflow/tpu `_decode_and_center_crop`), 'v2'
  offsets (h − side) // 2 and, at sizes ≥ 320, the whole image (google/automl
  efficientnetv2 `preprocess_for_eval`). At crop_padding=32, 224 px keeps
  87.5% of the short side.
  """
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  v2 = check_choice('crop', crop, options.CROPS) == 'v2'
  if v2 and image_size >= options.V2_EVAL_CROP_BELOW:
    return tf.stack([0, 0, height, width])
  fraction = image_size / (image_size + crop_padding)
  side = tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32),
                 tf.int32)
  side = tf.maximum(side, 1)  # a 1-px image must still yield a crop
  round_up = 0 if v2 else 1
  return tf.stack([(height - side + round_up) // 2,
                   (width - side + round_up) // 2, side, side])


def inception_crop_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor,
                          image_size: int, crop_padding: int = 32,
                          area_range: Sequence[float] | None = None,
                          crop: str = 'v1') -> tf.Tensor:
  """Samples the train crop window [offset_y, offset_x, h, w] (int32).

  `stateless_sample_distorted_bounding_box` with the official arguments of
  `crop` (module docstring; `area_range` overrides the area). When all
  attempts fail TF returns the whole image; 'v1' then uses the eval centre
  crop (with `crop_padding`) as the official code does, 'v2' keeps the whole
  image.
  """
  return _train_window(height, width, seed, image_size, crop_padding,
                       area_range, crop)[0]


def _train_window(height, width, seed, image_size, crop_padding, area_range,
                  crop) -> tuple[tf.Tensor, tf.Tensor]:
  """(`inception_crop_window`, whether it is the 'v1' fallback)."""
  params = options.TRAIN_CROPS[check_choice('crop', crop, options.CROPS)]
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  boxes = (tf.constant([[[0.0, 0.0, 1.0, 1.0]]]) if params['whole_image_box']
           else tf.zeros([0, 0, 4], tf.float32))
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.stack([height, width, 3]), bounding_boxes=boxes, seed=seed,
      min_object_covered=params['min_object_covered'],
      aspect_ratio_range=params['aspect_ratio_range'],
      area_range=tuple(area_range or params['area_range']),
      max_attempts=params['max_attempts'],
      use_image_if_no_bounding_boxes=True)
  sampled = tf.stack([begin[0], begin[1], size[0], size[1]])
  if not params['fallback_to_eval_crop']:
    return sampled, tf.constant(False)
  # The official test is "at least 3 of (h, w, c) equal the image's". Comparing
  # only h and w also catches grey JPEGs (c=1 in the header, 3 after decoding),
  # for which the official test never fires.
  failed = tf.logical_and(tf.equal(size[0], height), tf.equal(size[1], width))
  window = tf.cond(
      failed,
      lambda: center_crop_window(height, width, image_size, crop_padding),
      lambda: sampled)
  return window, failed


def _train_resize(image: tf.Tensor, fell_back: tf.Tensor, image_size: int,
                  resize: str) -> tf.Tensor:
  """Resizes a train crop; the 'v1' fallback crop always with 'bicubic_tf1'.

  tensorflow/tpu `_decode_and_random_crop` calls `_decode_and_center_crop`
  without its `resize_method`, so e.g. Lite's bilinear never reaches it.
  """
  if resize == 'bicubic_tf1':
    return resize_image(image, image_size, resize)
  return tf.cond(fell_back,
                 lambda: resize_image(image, image_size, 'bicubic_tf1'),
                 lambda: resize_image(image, image_size, resize))


def _crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  return tf.slice(image, tf.stack([window[0], window[1], 0]),
                  tf.stack([window[2], window[3], -1]))


def inception_crop(image: tf.Tensor, seed: tf.Tensor, image_size: int, *,
                   crop_padding: int = 32, crop: str = 'v1',
                   resize: str = 'bicubic_tf1') -> tf.Tensor:
  """Random train crop of a decoded [H, W, 3] image, resized.

  Args:
    image: decoded [H, W, 3] image (uint8 or float, 0..255).
    seed: int32/int64 [2] stateless seed.
    image_size: output side.
    crop_padding: centre-crop padding used by the 'v1' fallback.
    crop: 'v1' or 'v2' (module docstring).
    resize: one of `options.RESIZE_METHODS`.

  Returns:
    float32 [image_size, image_size, 3].
  """
  shape = tf.shape(image)
  window, fell_back = _train_window(shape[0], shape[1], seed, image_size,
                                    crop_padding, None, crop)
  return _train_resize(_crop(image, window), fell_back, image_size, resize)


def eval_image(image, image_size: int, *, crop: str = 'v1',
               crop_padding: int = 32,
               resize: str = 'bicubic_tf1') -> tf.Tensor:
  """The eval preprocessing of a decoded image: centre crop, then resize.

  The one definition of eval preprocessing (the input pipeline's eval and its
  fused-JPEG path use the same window and resize); works eagerly, e.g. on a
  numpy array from PIL, and inside tf.data.

  Args:
    image: uint8 [H, W, C] (C = 1, 3 or 4; grey is repeated, alpha dropped).
    image_size: output side.
    crop: 'v1' (tensorflow/tpu efficientnet) or 'v2' (google/automl V2-S..XL,
      no crop at ≥ 320 px).
    crop_padding: the crop keeps size/(size+crop_padding) of the short side.
    resize: one of `options.RESIZE_METHODS`.

  Returns:
    float32 [image_size, image_size, 3] in 0..255 (un-normalised; bicubic
    may overshoot slightly, as in the official code).
  """
  image = to_rgb(tf.convert_to_tensor(image))
  shape = tf.shape(image)
  window = center_crop_window(shape[0], shape[1], image_size, crop_padding,
                              crop)
  return resize_image(_crop(image, window), image_size, resize)


def center_crop(image: tf.Tensor, image_size: int, *, crop_padding: int = 32,
                resize: str = 'bicubic_tf1') -> tf.Tensor:
  """'v1' `eval_image` (the train path's crop when inception_crop is off)."""
  return eval_image(image, image_size, crop='v1', crop_padding=crop_padding,
                    resize=resize)


def decode_and_inception_crop_jpeg(image_bytes: tf.Tensor, seed: tf.Tensor,
                                   image_size: int, *, crop_padding: int = 32,
                                   crop: str = 'v1',
                                   resize: str = 'bicubic_tf1'
                                   ) -> tf.Tensor:
  """`inception_crop` fused with JPEG decoding: only the crop is decoded."""
  shape = tf.image.extract_jpeg_shape(image_bytes)
  window, fell_back = _train_window(shape[0], shape[1], seed, image_size,
                                    crop_padding, None, crop)
  return _train_resize(
      tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3),
      fell_back, image_size, resize)


def decode_and_center_crop_jpeg(image_bytes: tf.Tensor, image_size: int, *,
                                crop: str = 'v1', crop_padding: int = 32,
                                resize: str = 'bicubic_tf1'
                                ) -> tf.Tensor:
  """`eval_image` fused with JPEG decoding: only the crop is decoded."""
  shape = tf.image.extract_jpeg_shape(image_bytes)
  window = center_crop_window(shape[0], shape[1], image_size, crop_padding,
                              crop)
  return resize_image(
      tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3),
      image_size, resize)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Stateless random left-right flip with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)
