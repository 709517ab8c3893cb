"""RandAugment and AutoAugment (policy v0) in TF ops, on uint8 images.

Op for op the official `autoaugment.py` of tensorflow/tpu
`models/official/efficientnet` (commit 7dc921f) and google/automl
`efficientnetv2` (commit 6a54c87; the same ops, with tensorflow_addons in place
of tf.contrib.image), official quirks included by default.

Magnitude scale: every op takes a `level` on a 0–10 scale (`_MAX_LEVEL`);
level/10 scales the op's maximum below, computed in float64 as the official
Python arithmetic does. RandAugment applies one shared magnitude M to every op,
so M=10 is each op's maximum and larger M (the README's M=17 for B5, M=28 for
B7) extrapolates past it. AutoAugment v0 fixes a level per op in its policy.

| op | argument at level L | L=10 |
|---|---|---|
| Rotate | ±30·L/10 degrees | ±30° |
| ShearX/Y | ±0.3·L/10 (shear factor) | ±0.3 |
| TranslateX/Y | ±translate_const·L/10 **pixels** (RA 100, AA 250) | ±100 px |
| Cutout | square of side 2·int(cutout_const·L/10) pixels (RA 40, AA 100) | 80 px |
| Color, Contrast, Brightness, Sharpness | PIL enhance factor 0.1 + 1.8·L/10 (1 = identity) | 1.9 |
| Posterize | keep int(4·L/10) bits (quirk below) | 4 bits |
| Solarize | invert pixels ≥ int(256·L/10) (quirk below) | all (quirk) |
| SolarizeAdd | add int(110·L/10) to pixels < 128 | +110 |
| AutoContrast, Equalize, Invert | no argument | |

Pixel constants are in pixels of the augmented (already resized) image and,
as in the official code, the same at every image size (`pixel_constants`
mode 'fixed'); mode 'scaled' shrinks them by size/224 below 224 px, for
tiny-image demos. Signed arguments are negated with probability 1/2. Empty
pixels after a geometric op are filled with 128.

Official quirks, each reproduced by default and switchable off:
* posterize_quirk: the official `tf.bitwise` shift by the Python int
  `8 - bits` on a uint8 image converts the shift to uint8 (mod 256), and TF's
  shift kernel clamps it to 7 (tensorflow `core/kernels/cwise_ops.h`,
  `right_shift_op`). So 0 bits (L < 2.5) and ≥ 9 bits (L ≥ 22.5) keep the top
  bit (pixels in {0, 128}). Off: 0 bits is black, ≥ 8 bits the identity.
* solarize_quirk: the threshold int(256·L/10) is compared with a uint8 image,
  so it becomes uint8 too (mod 256): L=10 (threshold 256 → 0) inverts every
  pixel, as L=0 does. Off: thresholds ≥ 256 invert nothing.
* contrast_quirk: Contrast blends towards sum(histogram)/256 = pixel_count/256
  (clipped to 255, truncated), not towards the mean grey level. Off: the mean
  grey level, rounded as PIL does.

All randomness is stateless (explicit [2] seeds), so a seed fixes the result.
"""
import functools
import math
from typing import Callable, Sequence

import tensorflow as tf

from efficientnet_jax.data.options import AUTOAUGMENT_TRANSLATE
from efficientnet_jax.data.options import RANDAUGMENT_CUTOUT
from efficientnet_jax.data.options import RANDAUGMENT_TRANSLATE

_MAX_LEVEL = 10.0
_FILL = 128  # grey for pixels that a geometric op leaves empty (official)


# --------------------------------------------------------------------------
# Helpers.

Level = tf.Tensor | float


def _scaled(level: Level, maximum: float) -> tf.Tensor:
  """(level/10)·maximum in float64, as the official Python arithmetic.

  Computing it in float32 can land one ulp off (and `int()` then one lower).
  """
  return tf.cast(level, tf.float64) / _MAX_LEVEL * maximum


def _float_arg(level: Level, maximum: float) -> tf.Tensor:
  """(level/10)·maximum as the float32 the official graph receives."""
  return tf.cast(_scaled(level, maximum), tf.float32)


def _int_arg(level: Level, maximum: float) -> tf.Tensor:
  """int((level/10)·maximum) as int32, truncating like the official `int()`."""
  return tf.cast(tf.floor(_scaled(level, maximum)), tf.int32)


def _random_sign(value: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """`value` or `-value` with probability 1/2 each."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return tf.where(flip, -value, value)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: Level) -> tf.Tensor:
  """PIL ImageEnhance: degenerate + factor·(image − degenerate), clipped to uint8.

  Truncates towards zero like the official `tf.cast` (PIL rounds).
  """
  degenerate = tf.cast(degenerate, tf.float32)
  out = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _transform(image: tf.Tensor, matrix: Sequence[tf.Tensor]) -> tf.Tensor:
  """Projective transform (output pixel → input pixel), nearest, grey fill."""
  transforms = tf.reshape(
      tf.stack([tf.cast(m, tf.float32) for m in matrix]), [1, 8])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transforms,
      output_shape=tf.shape(image)[:2], fill_value=float(_FILL),
      interpolation='NEAREST', fill_mode='CONSTANT')
  return tf.reshape(out[0], tf.shape(image))


# --------------------------------------------------------------------------
# Ops: op(image uint8 [H, W, 3], level on the 0–10 scale (float or scalar
# tensor), seed [2]) -> uint8 [H, W, 3].


def auto_contrast(image: tf.Tensor, level: Level, seed: tf.Tensor) -> tf.Tensor:
  """Stretches each channel to the full 0..255 range (PIL autocontrast)."""
  del level, seed
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  # A flat channel has no range to stretch: leave it unchanged.
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(hi > lo, -lo * scale, 0.0)
  return tf.cast(tf.clip_by_value(x * scale + offset, 0.0, 255.0), tf.uint8)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  channel = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(tf.reshape(channel, [-1]), minlength=256,
                          maxlength=256)
  # PIL: step = (pixels − count of the brightest level present) // 255.
  step = (tf.reduce_sum(hist) - hist[tf.reduce_max(channel)]) // 255
  safe_step = tf.maximum(step, 1)
  lut = (tf.cumsum(hist) + safe_step // 2) // safe_step
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
  return tf.where(step == 0, channel, tf.gather(lut, channel))


def equalize(image: tf.Tensor, level: Level, seed: tf.Tensor) -> tf.Tensor:
  """Per-channel histogram equalisation (PIL `ImageOps.equalize`)."""
  del level, seed
  channels = [_equalize_channel(image[..., c]) for c in range(3)]
  return tf.cast(tf.stack(channels, -1), tf.uint8)


def invert(image: tf.Tensor, level: Level, seed: tf.Tensor) -> tf.Tensor:
  """255 − x."""
  del level, seed
  return 255 - image


def rotate(image: tf.Tensor, level: Level, seed: tf.Tensor) -> tf.Tensor:
  """Rotates about the centre by ±30·level/10 degrees."""
  radians = _random_sign(_float_arg(level, 30.0), seed) * (math.pi / 180.0)
  height = tf.cast(tf.shape(image)[0], tf.float32) - 1.0
  width = tf.cast(tf.shape(image)[1], tf.float32) - 1.0
  cos, sin = tf.cos(radians), tf.sin(radians)
  # Rotation about the image centre: offsets keep the centre pixel fixed.
  x_offset = (width - (cos * width - sin * height)) / 2.0
  y_offset = (height - (sin * width + cos * height)) / 2.0
  return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])


def posterize(image: tf.Tensor, level: Level, seed: tf.Tensor, *,
              quirk: bool = True) -> tf.Tensor:
  """Keeps the top int(4·level/10) bits of every pixel.

  Args:
    image: uint8 [H, W, 3].
    level: 0–10 scale (or beyond).
    seed: unused.
    quirk: True (official): the shift 8 − bits is taken mod 256 and clamped
      to 7, as `tf.bitwise` on uint8 does, so 0 bits and ≥ 9 bits keep the
      top bit. False: bits clamped to 0..8 (0 = black, 8 = identity).

  Returns:
    uint8 [H, W, 3].
  """
  del seed
  bits = _int_arg(level, 4)
  if quirk:
    # Official: right_shift(image, 8 - bits) with a Python int on uint8.
    shift = tf.minimum(tf.math.floormod(8 - bits, 256), 7)
  else:
    shift = 8 - tf.clip_by_value(bits, 0, 8)
  # In int32 every shift 0..8 is defined; the result stays within 0..255.
  x = tf.bitwise.left_shift(
      tf.bitwise.right_shift(tf.cast(image, tf.int32), shift), shift)
  return tf.cast(x, tf.uint8)


def solarize(image: tf.Tensor, level: Level, seed: tf.Tensor, *,
             quirk: bool = True) -> tf.Tensor:
  """Inverts pixels ≥ int(256·level/10).

  Args:
    image: uint8 [H, W, 3].
    level: 0–10 scale (or beyond).
    seed: unused.
    quirk: True (official): the threshold is compared with a uint8 image, so
      it is taken mod 256 (level 10 inverts everything). False: thresholds
      ≥ 256 invert nothing.

  Returns:
    uint8 [H, W, 3].
  """
  del seed
  threshold = _int_arg(level, 256)
  if quirk:
    threshold = tf.math.floormod(threshold, 256)
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image: tf.Tensor, level: Level, seed: tf.Tensor) -> tf.Tensor:
  """Adds int(110·level/10) to pixels below 128, clipped to 255."""
  del seed
  added = tf.clip_by_value(tf.cast(image, tf.int32) + _int_arg(level, 110), 0,
                           255)
  return tf.where(image < 128, tf.cast(added, tf.uint8), image)


def _enhance_factor(level: Level) -> tf.Tensor:
  return tf.cast(_scaled(level, 1.8) + 0.1, tf.float32)


def color(image: tf.Tensor, level: Level, seed: tf.Tensor) -> tf.Tensor:
  """PIL Color (saturation) with factor 0.1 + 1.8·level/10."""
  del seed
  grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
  return _blend(grey, image, _enhance_factor(level))


def contrast(image: tf.Tensor, level: Level, seed: tf.Tensor, *,
             quirk: bool = True) -> tf.Tensor:
  """PIL-like Contrast with factor 0.1 + 1.8·level/10.

  Args:
    image: uint8 [H, W, 3].
    level: 0–10 scale (or beyond).
    seed: unused.
    quirk: True (official): blends with the constant grey
      uint8(min(pixel_count/256, 255)), what the official
      sum(histogram)/256 computes. False: with the mean grey level, rounded
      as PIL does.

  Returns:
    uint8 [H, W, 3].
  """
  del seed
  grey = tf.cast(tf.image.rgb_to_grayscale(image), tf.float32)
  if quirk:
    # sum(histogram_fixed_width(grey, [0, 255], 256)) is the pixel count.
    count = tf.cast(tf.size(grey), tf.float32)
    mean = tf.floor(tf.clip_by_value(count / 256.0, 0.0, 255.0))
  else:
    mean = tf.floor(tf.reduce_mean(grey) + 0.5)  # PIL rounds the mean
  return _blend(tf.fill(tf.shape(image), mean), image, _enhance_factor(level))


def brightness(image: tf.Tensor, level: Level, seed: tf.Tensor) -> tf.Tensor:
  """PIL Brightness (blend with black), factor 0.1 + 1.8·level/10."""
  del seed
  return _blend(tf.zeros_like(image), image, _enhance_factor(level))


def sharpness(image: tf.Tensor, level: Level, seed: tf.Tensor) -> tf.Tensor:
  """PIL Sharpness: blends with a 3×3 smoothed copy (border pixels kept)."""
  del seed
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(
      tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.cast(tf.clip_by_value(smooth, 0.0, 255.0), tf.uint8)
  # PIL's filter leaves the 1-px border untouched.
  inner = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
  smooth = tf.where(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
  return _blend(smooth, image, _enhance_factor(level))


def shear_x(image: tf.Tensor, level: Level, seed: tf.Tensor) -> tf.Tensor:
  """Shears along x by a factor ±0.3·level/10."""
  shear = _random_sign(_float_arg(level, 0.3), seed)
  return _transform(image, [1.0, shear, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image: tf.Tensor, level: Level, seed: tf.Tensor) -> tf.Tensor:
  """Shears along y by a factor ±0.3·level/10."""
  shear = _random_sign(_float_arg(level, 0.3), seed)
  return _transform(image, [1.0, 0.0, 0.0, shear, 1.0, 0.0, 0.0, 0.0])


def translate_x(image: tf.Tensor, level: Level, seed: tf.Tensor, *,
                translate_const: float = RANDAUGMENT_TRANSLATE) -> tf.Tensor:
  """Shifts along x by ±translate_const·level/10 pixels."""
  pixels = _random_sign(_float_arg(level, translate_const), seed)
  return _transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image: tf.Tensor, level: Level, seed: tf.Tensor, *,
                translate_const: float = RANDAUGMENT_TRANSLATE) -> tf.Tensor:
  """Shifts along y by ±translate_const·level/10 pixels."""
  pixels = _random_sign(_float_arg(level, translate_const), seed)
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0])


def cutout(image: tf.Tensor, level: Level, seed: tf.Tensor, *,
           cutout_const: float = RANDAUGMENT_CUTOUT) -> tf.Tensor:
  """Greys a square of half-side int(cutout_const·level/10) at a random centre."""
  pad = _int_arg(level, cutout_const)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  cy = tf.random.stateless_uniform([], seed_y, 0, height, tf.int32)
  cx = tf.random.stateless_uniform([], seed_x, 0, width, tf.int32)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = ((rows >= cy - pad) & (rows < cy + pad) & (cols >= cx - pad) &
            (cols < cx + pad))
  return tf.where(inside[..., None], tf.constant(_FILL, image.dtype), image)


# --------------------------------------------------------------------------
# Policies.

Op = Callable[[tf.Tensor, Level, tf.Tensor], tf.Tensor]


def _apply_one_of(ops: Sequence[Op], index: tf.Tensor, image: tf.Tensor,
                  level: Level, seed: tf.Tensor) -> tf.Tensor:
  """ops[index](image, level, seed), one graph branch per op."""
  out = tf.switch_case(
      index, [functools.partial(op, image, level, seed) for op in ops])
  return tf.ensure_shape(out, image.shape)


def _randaugment_ops(translate_const: float, cutout_const: float, *,
                     posterize_quirk: bool, contrast_quirk: bool,
                     solarize_quirk: bool) -> list[Op]:
  # The official RandAugment op list, in its order (`available_ops` of
  # `distort_image_with_randaugment`, tensorflow/tpu efficientnet
  # autoaugment.py, commit 7dc921f).
  return [
      auto_contrast, equalize, invert, rotate,
      functools.partial(posterize, quirk=posterize_quirk),
      functools.partial(solarize, quirk=solarize_quirk), color,
      functools.partial(contrast, quirk=contrast_quirk),
      brightness, sharpness, shear_x, shear_y,
      functools.partial(translate_x, translate_const=translate_const),
      functools.partial(translate_y, translate_const=translate_const),
      functools.partial(cutout, cutout_const=cutout_const), solarize_add
  ]


def randaugment(image: tf.Tensor, seed: tf.Tensor, *, num_layers: int = 2,
                magnitude: float = 10.0,
                translate_const: float = RANDAUGMENT_TRANSLATE,
                cutout_const: float = RANDAUGMENT_CUTOUT,
                posterize_quirk: bool = True, contrast_quirk: bool = True,
                solarize_quirk: bool = True) -> tf.Tensor:
  """RandAugment: `num_layers` ops drawn uniformly from 16, each at `magnitude`.

  As the official code, a drawn op is always applied (no per-op probability).

  Args:
    image: uint8 [H, W, 3].
    seed: int32/int64 [2] stateless seed.
    num_layers: N, ops applied in sequence.
    magnitude: M on the 0–10 scale of the module docstring.
    translate_const: pixels of translation at M=10.
    cutout_const: cutout half-side in pixels at M=10.
    posterize_quirk: see `posterize` (True = official).
    contrast_quirk: see `contrast` (True = official).
    solarize_quirk: see `solarize` (True = official).

  Returns:
    uint8 [H, W, 3].
  """
  ops = _randaugment_ops(translate_const, cutout_const,
                         posterize_quirk=posterize_quirk,
                         contrast_quirk=contrast_quirk,
                         solarize_quirk=solarize_quirk)
  for layer_seed in tf.unstack(
      tf.random.experimental.stateless_split(seed, num_layers)):
    choice_seed, op_seed = tf.unstack(
        tf.random.experimental.stateless_split(layer_seed, 2))
    index = tf.random.stateless_uniform([], choice_seed, 0, len(ops), tf.int32)
    image = _apply_one_of(ops, index, image, float(magnitude), op_seed)
  return image


def policy_v0(translate_const: float = AUTOAUGMENT_TRANSLATE, *,
              posterize_quirk: bool = True, solarize_quirk: bool = True
             ) -> list[list[tuple[Op, float, float]]]:
  """The AutoAugment paper's ImageNet policy (official `policy_v0`).

  25 sub-policies of two (op, probability, level) steps each. It has no
  Contrast or Cutout, so only the translate constant and the posterize and
  solarize quirks matter.
  """
  ty = functools.partial(translate_y, translate_const=translate_const)
  # One object per op: `autoaugment` tables the distinct ops by identity.
  post = functools.partial(posterize, quirk=posterize_quirk)
  sol = functools.partial(solarize, quirk=solarize_quirk)
  return [
      [(equalize, 0.8, 1), (shear_y, 0.8, 4)],
      [(color, 0.4, 9), (equalize, 0.6, 3)],
      [(color, 0.4, 1), (rotate, 0.6, 8)],
      [(sol, 0.8, 3), (equalize, 0.4, 7)],
      [(sol, 0.4, 2), (sol, 0.6, 2)],
      [(color, 0.2, 0), (equalize, 0.8, 8)],
      [(equalize, 0.4, 8), (solarize_add, 0.8, 3)],
      [(shear_x, 0.2, 9), (rotate, 0.6, 8)],
      [(color, 0.6, 1), (equalize, 1.0, 2)],
      [(invert, 0.4, 9), (rotate, 0.6, 0)],
      [(equalize, 1.0, 9), (shear_y, 0.6, 3)],
      [(color, 0.4, 7), (equalize, 0.6, 0)],
      [(post, 0.4, 6), (auto_contrast, 0.4, 7)],
      [(sol, 0.6, 8), (color, 0.6, 9)],
      [(sol, 0.2, 4), (rotate, 0.8, 9)],
      [(rotate, 1.0, 7), (ty, 0.8, 9)],
      [(shear_x, 0.0, 0), (sol, 0.8, 4)],
      [(shear_y, 0.8, 0), (color, 0.6, 4)],
      [(color, 1.0, 0), (rotate, 0.6, 2)],
      [(equalize, 0.8, 4), (equalize, 0.0, 8)],
      [(equalize, 1.0, 4), (auto_contrast, 0.6, 2)],
      [(shear_y, 0.4, 7), (solarize_add, 0.6, 7)],
      [(post, 0.8, 2), (sol, 0.6, 10)],
      [(sol, 0.6, 8), (equalize, 0.6, 1)],
      [(color, 0.8, 6), (rotate, 0.4, 5)],
  ]


def autoaugment(image: tf.Tensor, seed: tf.Tensor, *,
                translate_const: float = AUTOAUGMENT_TRANSLATE,
                posterize_quirk: bool = True,
                solarize_quirk: bool = True) -> tf.Tensor:
  """AutoAugment v0: one random sub-policy; each step fires with its probability.

  Args:
    image: uint8 [H, W, 3].
    seed: int32/int64 [2] stateless seed.
    translate_const: pixels of translation at level 10 (official 250).
    posterize_quirk: see `posterize` (True = official).
    solarize_quirk: see `solarize` (True = official).

  Returns:
    uint8 [H, W, 3].
  """
  policy = policy_v0(translate_const, posterize_quirk=posterize_quirk,
                     solarize_quirk=solarize_quirk)
  # The policy as lookup tables over its distinct ops: two op switches in the
  # graph instead of 25 sub-policy branches, which is ~10x faster to trace.
  ops = list(dict.fromkeys(op for sub in policy for op, _, _ in sub))
  op_table = tf.constant([[ops.index(op) for op, _, _ in sub] for sub in policy])
  prob_table = tf.constant([[p for _, p, _ in sub] for sub in policy],
                           tf.float32)
  level_table = tf.constant([[l for _, _, l in sub] for sub in policy],
                            tf.float32)
  choice_seed, steps_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  index = tf.random.stateless_uniform([], choice_seed, 0, len(policy), tf.int32)
  step_seeds = tf.unstack(tf.random.experimental.stateless_split(steps_seed, 2))
  for step, step_seed in enumerate(step_seeds):
    prob_seed, op_seed = tf.unstack(
        tf.random.experimental.stateless_split(step_seed, 2))
    fire = tf.random.stateless_uniform([], prob_seed) < prob_table[index, step]
    image = tf.cond(
        fire,
        functools.partial(_apply_one_of, ops, op_table[index, step], image,
                          level_table[index, step], op_seed),
        functools.partial(tf.identity, image))
  return image
