"""The input pipeline's options and the official constants behind them, without TensorFlow.

The TF ops (`preprocessing.py`, `augment.py`, `input_pipeline.py`) and the
TF-free readers of a config (`config_lib.check`, the `--dry_run` recipe,
inference's `predict.normalize`) share these definitions.
"""

# The three normalisations as (mean, std) in 0..255 units.
# v1: ImageNet mean/std ×255 (tensorflow/tpu efficientnet `MEAN_RGB`,
# `STDDEV_RGB`). v2: (x−128)/128 → [−1, 1] (google/automl efficientnetv2
# preprocessing.py). lite: (x−127)/128 (official EfficientNet-Lite MEAN/STD).
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    'v1': ((0.485 * 255, 0.456 * 255, 0.406 * 255),
           (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    'v2': ((128.0, 128.0, 128.0), (128.0, 128.0, 128.0)),
    'lite': ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
}

# 'bicubic_tf1' TF1 resize_bicubic (tensorflow/tpu efficientnet); 'bilinear_tf1'
# TF1 bilinear (EfficientNet-Lite, tensorflow/tpu efficientnet main.py);
# 'bilinear' tf.image.resize (google/automl efficientnetv2); 'bicubic' TF2 half-pixel.
RESIZE_METHODS = ('bicubic_tf1', 'bilinear', 'bicubic', 'bilinear_tf1')

# `sample_distorted_bounding_box` arguments of the official train crops, and
# what each does when sampling fails (TF then returns the whole image).
TRAIN_CROPS = {
    # tensorflow/tpu efficientnet preprocessing.py `_decode_and_random_crop`
    # (commit 7dc921f): the whole image as the one box; failure → eval crop.
    'v1': dict(min_object_covered=0.1,
               aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
               area_range=(0.08, 1.0), max_attempts=10, whole_image_box=True,
               fallback_to_eval_crop=True),
    # google/automl efficientnetv2/preprocessing.py `preprocess_for_train`
    # (commit 6a54c87): no boxes (tf.zeros([0, 0, 4])); aspect ratio and
    # attempts are the op's defaults; failure keeps the whole image.
    'v2': dict(min_object_covered=0.0, aspect_ratio_range=(0.75, 1.33),
               area_range=(0.05, 1.0), max_attempts=100, whole_image_box=False,
               fallback_to_eval_crop=False),
}
CROPS = tuple(TRAIN_CROPS)
# google/automl efficientnetv2/preprocessing.py `preprocess_for_eval`: no
# centre crop from this eval size up.
V2_EVAL_CROP_BELOW = 320

AUGMENT_NAMES = ('none', 'autoaugment', 'randaugment')
# How translate/cutout pixel constants depend on the image size.
PIXEL_CONSTANT_MODES = ('fixed', 'scaled')
# Official pixel constants (`distort_image_with_randaugment` /
# `distort_image_with_autoaugment`, tensorflow/tpu efficientnet autoaugment.py
# lines 669-670 and 694-695 at 7dc921f), tuned for 224-px images.
RANDAUGMENT_TRANSLATE, RANDAUGMENT_CUTOUT = 100.0, 40.0
AUTOAUGMENT_TRANSLATE, AUTOAUGMENT_CUTOUT = 250.0, 100.0
_REFERENCE_SIZE = 224

# How processes split the data: 'files' = each reads its own slice (scalable);
# 'batch' = all walk one global order and keep their rows of each batch.
PROCESS_SHARDINGS = ('files', 'batch')


def check_augment_name(name: str) -> str:
  """Returns `name` if it is an augmentation this package implements.

  Raises:
    ValueError: naming the value and the accepted names.
  """
  if name not in AUGMENT_NAMES:
    raise ValueError(f'Unknown augmentation {name!r}; expected one of '
                     f'{AUGMENT_NAMES}.')
  return name


def pixel_constants(name: str, image_size: int,
                    mode: str = 'fixed') -> tuple[float, float]:
  """(translate_const, cutout_const) for `name` at `image_size`.

  Args:
    name: 'autoaugment' (official 250, 100) or 'randaugment' (100, 40).
    image_size: side of the augmented image.
    mode: 'fixed' (official: the same pixels at every size) or 'scaled'
      (scaled by image_size/224 below 224 px, so a 32-px image is not
      translated or cut out of existence).

  Raises:
    ValueError: unknown name or mode.
  """
  if mode not in PIXEL_CONSTANT_MODES:
    raise ValueError(f'data.aug_pixel_constants={mode!r}; accepted: '
                     f'{", ".join(PIXEL_CONSTANT_MODES)}')
  if check_augment_name(name) == 'autoaugment':
    translate, cutout_size = AUTOAUGMENT_TRANSLATE, AUTOAUGMENT_CUTOUT
  else:
    translate, cutout_size = RANDAUGMENT_TRANSLATE, RANDAUGMENT_CUTOUT
  scale = 1.0 if mode == 'fixed' else min(1.0, image_size / _REFERENCE_SIZE)
  return translate * scale, cutout_size * scale
