"""The one tf.data input pipeline: train and eval iterators of host-local numpy.

Every source (`sources.py`: Fashion-MNIST, ImageNet, any TFDS name, image
folders) goes through the same per-example code:

  train: decode → random crop (fused with JPEG decoding for JPEG sources) →
         resize → flip → clip and truncate to uint8 → AutoAugment/RandAugment →
         normalise → one-hot → batch (drop remainder) → mixup/cutmix on the
         host batch.
  eval:  decode → `preprocessing.eval_image` (centre crop, resize; fused with
         JPEG decoding) → normalise → batch, padded with mask=False rows so
         nothing is dropped.

The defaults are the official V1 pipeline (tensorflow/tpu efficientnet,
commit 7dc921f): crop='v1', resize='bicubic_tf1', fixed augmentation pixel
constants and the official op quirks; crop='v2', resize='bilinear' is the
V2-S/M/L/XL one (google/automl efficientnetv2, commit 6a54c87). See
`preprocessing.py` and `augment.py`.

Determinism and resume. Train epoch e of process p is shuffled (files and a
`shuffle_buffer` of examples) with a seed derived from (seed, e, p), and the
k-th example of the epoch gets the stateless seed [epoch_seed, k] for its crop,
flip and augmentation; mixup/cutmix at step s uses numpy RNG seeded with
(seed, s, p). A run is therefore a pure function of `seed`, and `start_step`
resumes exactly: it picks epoch start_step // steps_per_epoch and skips the
remaining examples *before* decoding, so skipping costs reading records, not
preprocessing them. An epoch has per_process_examples // batch_size steps.

Multi-process: each process reads a contiguous, near-equal slice of each split
(`tfds.even_splits`), and `batch_size` is per process. Eval pads so every
process yields the same number of batches (collectives never hang) and every
example is seen exactly once across processes.

TF is kept off the accelerator and out of JAX's way: GPUs are hidden from TF,
each tf.data op runs single-threaded on a private thread pool, and autotuning
has a RAM budget.
"""
import dataclasses
import functools
import math
import os
from typing import Iterator

from absl import logging
import numpy as np
import tensorflow as tf

from efficientnet_jax.data import augment as augment_lib
from efficientnet_jax.data import mixing
from efficientnet_jax.data import options
from efficientnet_jax.data import preprocessing
from efficientnet_jax.data import sources
from efficientnet_jax.data.sources import DataSpec


# Fraction of physical RAM tf.data autotuning may use for buffers.
_RAM_BUDGET_FRACTION = 0.25


def _hide_gpus_from_tf() -> None:
  """Keeps TF (tf.data) from grabbing GPU memory that JAX needs."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    # TF's devices are already initialised (e.g. by an eager op).
    if tf.config.list_logical_devices('GPU'):
      logging.warning('TF initialised GPUs before the input pipeline could '
                      'hide them; it may hold accelerator memory.')


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = os.cpu_count() or 1
  # One thread per op: parallelism comes from parallel map calls, and ops do
  # not fan out over every core while the JAX step runs.
  options.threading.max_intra_op_parallelism = 1
  ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  options.autotune.ram_budget = int(ram * _RAM_BUDGET_FRACTION)
  return options


def dataset_info(spec: DataSpec) -> dict:
  """Facts about a dataset.

  Returns:
    {'num_classes', 'num_train', 'num_eval', 'class_names', 'num_skipped'}: the
    counts are of the whole (all-process) train and eval splits; num_skipped
    counts image-folder files that do not decode (0 for TFDS datasets).
  """
  _hide_gpus_from_tf()
  source = sources.make_source(spec)
  return {
      'num_classes': len(source.class_names),
      'num_train': source.num_examples(spec.train_split),
      'num_eval': source.num_examples(spec.eval_split),
      'class_names': list(source.class_names),
      'num_skipped': len(sources.skipped_examples(spec)),
  }


def _decode(image: tf.Tensor, source: sources.Source) -> tf.Tensor:
  """Encoded bytes (or an already decoded tensor) → uint8 [H, W, 3]."""
  if source.image_format != 'decoded':
    image = tf.io.decode_image(image, channels=source.channels or 0,
                               expand_animations=False)
  return preprocessing.to_rgb(image)


def _augment_fn(augment_name: str, image_size: int, *, randaug_layers: int,
                randaug_magnitude: float, pixel_constants: str,
                posterize_quirk: bool, contrast_quirk: bool,
                solarize_quirk: bool):
  """uint8 image, seed → augmented uint8 image; None for 'none'."""
  if augment_name == 'none':
    return None
  translate, cutout = options.pixel_constants(augment_name, image_size,
                                                  pixel_constants)
  if augment_name == 'randaugment':
    return functools.partial(
        augment_lib.randaugment, num_layers=randaug_layers,
        magnitude=randaug_magnitude, translate_const=translate,
        cutout_const=cutout, posterize_quirk=posterize_quirk,
        contrast_quirk=contrast_quirk, solarize_quirk=solarize_quirk)
  # Policy v0 has no Contrast or Cutout.
  return functools.partial(augment_lib.autoaugment, translate_const=translate,
                           posterize_quirk=posterize_quirk,
                           solarize_quirk=solarize_quirk)


def _train_image(image: tf.Tensor, seed: tf.Tensor, source: sources.Source, *,
                 image_size: int, inception_crop: bool, crop: str,
                 crop_padding: int, resize: str, augment_fn) -> tf.Tensor:
  """One training image → float32 [S, S, 3] in 0..255 (not yet normalised)."""
  crop_seed, flip_seed, augment_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  crop_args = dict(crop_padding=crop_padding, crop=crop, resize=resize)
  if inception_crop and source.image_format == 'jpeg':
    image = preprocessing.decode_and_inception_crop_jpeg(
        image, crop_seed, image_size, **crop_args)
  elif inception_crop:
    image = preprocessing.inception_crop(_decode(image, source), crop_seed,
                                         image_size, **crop_args)
  else:  # the whole image (its central square) for tiny images
    image = preprocessing.center_crop(_decode(image, source), image_size,
                                      crop_padding=0, resize=resize)
  image = preprocessing.random_flip(image, flip_seed)
  if augment_fn is not None:
    # Official (both codebases): clip the float resize output, truncate to
    # uint8, augment, cast back to float32.
    image = tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
    image = tf.cast(augment_fn(image, augment_seed), tf.float32)
  return image


def _epoch_seed(seed: int, epoch: int, process_index: int) -> int:
  """A 32-bit seed for one (run seed, epoch, process)."""
  return int(np.random.SeedSequence([seed, epoch, process_index])
             .generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class TrainPreprocessing:
  """How a training example is cropped, resized and augmented; defaults: official V1.

  Attributes:
    augment: 'none', 'autoaugment' (policy v0) or 'randaugment'.
    randaug_layers: RandAugment N.
    randaug_magnitude: RandAugment M on the official 0–10 scale.
    mixup_alpha: mixup Beta parameter; 0 = off.
    cutmix_alpha: cutmix Beta parameter; 0 = off. Both on: half and half.
    inception_crop: False replaces the random crop by the whole (centre
      square of the) image, for tiny images such as 28-px Fashion-MNIST.
    crop: random-crop recipe, 'v1' (tensorflow/tpu) or 'v2' (google/automl
      V2-S..XL); see `preprocessing.py`.
    crop_padding: the eval centre crop's padding, which the 'v1' crop falls
      back to when sampling fails.
    resize: 'bicubic_tf1' (official V1), 'bilinear_tf1' (official
      EfficientNet-Lite), 'bilinear' (official V2-S..XL) or 'bicubic' (TF2
      half-pixel bicubic); see `options.RESIZE_METHODS`.
    aug_pixel_constants: 'fixed' (official translate/cutout pixels at every
      size) or 'scaled' (scaled by size/224 below 224 px).
    posterize_quirk, contrast_quirk, solarize_quirk: the official ops' uint8
      behaviour (see `augment.posterize`, `contrast`, `solarize`).
  """
  augment: str = 'none'
  randaug_layers: int = 2
  randaug_magnitude: float = 10.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  inception_crop: bool = True
  crop: str = 'v1'
  crop_padding: int = 32
  resize: str = 'bicubic_tf1'
  aug_pixel_constants: str = 'fixed'
  posterize_quirk: bool = True
  contrast_quirk: bool = True
  solarize_quirk: bool = True


def make_train_iterator(spec: DataSpec, *, image_size: int, batch_size: int,
                        seed: int, normalization: str, num_classes: int,
                        start_step: int = 0, process_index: int = 0,
                        process_count: int = 1, shuffle_buffer: int = 10_000,
                        process_sharding: str = 'files',
                        **preprocessing_fields) -> Iterator[dict]:
  """Infinite, deterministic iterator of this process's training batches.

  Args:
    spec: the dataset.
    image_size: output side S.
    batch_size: examples per batch *per process*.
    seed: run seed; fixes shuffling, crops, flips, augmentation and mixing.
    normalization: 'v1', 'v2' or 'lite' (see `preprocessing.normalize`).
    num_classes: one-hot width (≥ the dataset's class count).
    start_step: batches already consumed; the iterator resumes after them.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    shuffle_buffer: examples in the shuffle buffer.
    process_sharding: 'files' (each process shuffles and reads its own
      `even_splits` slice: scalable, the default) or 'batch' (every process
      walks the same seeded global order and keeps its rows of each global
      batch; the global batch is the same whatever the process count, as
      long as mixup/cutmix are off. Every process reads every record.)
    **preprocessing_fields: `TrainPreprocessing` fields (crop, resize, augmentation).

  Returns:
    Iterator of {'image': float32 [B, S, S, 3] normalised,
    'label': float32 [B, num_classes] one-hot, mixed when mixup/cutmix is on}.

  Raises:
    ValueError: unknown augment/normalization/dataset, or too few examples.
    FileNotFoundError: the data is not prepared or installed.
  """
  p = TrainPreprocessing(**preprocessing_fields)
  _check_names(p.augment, normalization, crop=p.crop, resize=p.resize,
               aug_pixel_constants=p.aug_pixel_constants)
  augment_fn = _augment_fn(
      p.augment, image_size, randaug_layers=p.randaug_layers,
      randaug_magnitude=p.randaug_magnitude, pixel_constants=p.aug_pixel_constants,
      posterize_quirk=p.posterize_quirk, contrast_quirk=p.contrast_quirk,
      solarize_quirk=p.solarize_quirk)
  _hide_gpus_from_tf()
  source = sources.make_source(spec)
  if num_classes < len(source.class_names):
    raise ValueError(f'num_classes={num_classes} but dataset {spec.name!r} has '
                     f'{len(source.class_names)} classes.')
  if process_sharding not in options.PROCESS_SHARDINGS:
    raise ValueError(f'data.process_sharding={process_sharding!r}; accepted: '
                     f'{", ".join(options.PROCESS_SHARDINGS)}')
  order = _ReadOrder(spec.train_split, batch_size, process_index, process_count,
                     by_batch=process_sharding == 'batch' and process_count > 1,
                     seed=seed, shuffle_buffer=shuffle_buffer)
  steps_per_epoch = order.steps_per_epoch(source)

  # One tf.function for every epoch: it is traced once, not once per epoch.
  @tf.function
  def example_fn(example_seed, image, label):
    image = _train_image(image, example_seed, source, image_size=image_size,
                         inception_crop=p.inception_crop, crop=p.crop,
                         crop_padding=p.crop_padding, resize=p.resize,
                         augment_fn=augment_fn)
    return (preprocessing.normalize(image, normalization),
            tf.one_hot(label, num_classes, dtype=tf.float32))

  def batches():
    epoch, skip = divmod(start_step, steps_per_epoch)
    step = start_step
    while True:
      for images, labels in order.epoch(source, example_fn, epoch, skip).as_numpy_iterator():
        if p.mixup_alpha or p.cutmix_alpha:
          rng = np.random.default_rng([seed, step, process_index])
          images, labels = mixing.mix_batch(
              images, labels, mixup_alpha=p.mixup_alpha,
              cutmix_alpha=p.cutmix_alpha, rng=rng)
        yield {'image': images, 'label': labels}
        step += 1
      epoch, skip = epoch + 1, 0

  return batches()


@dataclasses.dataclass(frozen=True)
class _ReadOrder:
  """Which training examples this process reads, in which order, epoch by epoch.

  'files' (by_batch False): each process shuffles and reads its own
  `even_splits` slice. 'batch': every process walks one seeded global order
  and keeps rows [p*B, (p+1)*B) of each global batch, decoding only those.
  """
  split: str
  batch_size: int  # per process
  process_index: int
  process_count: int
  by_batch: bool
  seed: int
  shuffle_buffer: int

  def steps_per_epoch(self, source: sources.Source) -> int:
    if self.by_batch:
      global_batch = self.batch_size * self.process_count
      per_process = (source.num_examples(self.split, 0, 1, True) // global_batch
                     * self.batch_size)
    else:
      per_process = source.num_examples(self.split, self.process_index,
                                        self.process_count, True)
    if per_process < self.batch_size:
      raise ValueError(f'Per-process batch {self.batch_size} is larger than this '
                       f"process's {per_process} training examples.")
    return per_process // self.batch_size

  def epoch(self, source: sources.Source, example_fn, epoch: int,
            skip_batches: int) -> tf.data.Dataset:
    """One epoch's batches, after `skip_batches` (examples keep their seeds)."""
    if self.by_batch:
      global_batch = self.batch_size * self.process_count
      epoch_seed = _epoch_seed(self.seed, epoch, 0)
      ds = source.examples(self.split, 0, 1, True, shuffle_seed=epoch_seed)
      ds = ds.shuffle(self.shuffle_buffer, seed=epoch_seed).enumerate()
      ds = ds.skip(skip_batches * global_batch)
      # Keep this process's rows before decoding: the others' cost a record read.
      ds = ds.filter(lambda i, ex: (i % global_batch) // self.batch_size
                     == self.process_index)
    else:
      epoch_seed = _epoch_seed(self.seed, epoch, self.process_index)
      ds = source.examples(self.split, self.process_index, self.process_count, True,
                           shuffle_seed=epoch_seed)
      ds = ds.shuffle(self.shuffle_buffer, seed=epoch_seed).enumerate()
      # Skip before decoding, after enumerate: resumed examples keep their seeds.
      ds = ds.skip(skip_batches * self.batch_size)
    epoch_key = tf.constant(epoch_seed, tf.int64)
    ds = ds.map(lambda i, ex: example_fn(tf.stack([epoch_key, i]), *ex),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(self.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options())


def make_eval_iterator(spec: DataSpec, *, image_size: int, batch_size: int,
                       normalization: str, crop_padding: int = 32,
                       process_index: int = 0, process_count: int = 1,
                       crop: str = 'v1',
                       resize: str = 'bicubic_tf1') -> Iterator[dict]:
  """One pass over this process's part of the eval split.

  Every process yields the same number of batches, ceil(max part / batch): the
  last real batch is padded and missing batches are all padding, with
  mask=False on padded rows. Across processes every example appears exactly
  once with mask=True.

  Args:
    spec: the dataset (its `eval_split` is read).
    image_size: output side S.
    batch_size: examples per batch per process.
    normalization: 'v1', 'v2' or 'lite'.
    crop_padding: centre crop side = S/(S+crop_padding)·short side; 0 keeps
      the whole short side.
    process_index: this process.
    process_count: number of processes.
    crop: 'v1' (centre crop at every size) or 'v2' (google/automl: centre
      crop below 320 px, the whole image squashed to the square from 320 px).
    resize: one of `options.RESIZE_METHODS` (see make_train_iterator).

  Returns:
    Iterator of {'image': float32 [B, S, S, 3], 'label': int32 [B],
    'mask': bool [B]}.
  """
  _check_names('none', normalization, crop=crop, resize=resize)
  _hide_gpus_from_tf()
  source = sources.make_source(spec)
  counts = [source.num_examples(spec.eval_split, p, process_count, False)
            for p in range(process_count)]
  num_batches = max(math.ceil(c / batch_size) for c in counts)
  padding = num_batches * batch_size - counts[process_index]

  def example_fn(image, label):
    crop_args = dict(crop=crop, crop_padding=crop_padding, resize=resize)
    if source.image_format == 'jpeg':
      image = preprocessing.decode_and_center_crop_jpeg(image, image_size,
                                                        **crop_args)
    else:
      image = preprocessing.eval_image(_decode(image, source), image_size,
                                       **crop_args)
    return {'image': preprocessing.normalize(image, normalization),
            'label': tf.cast(label, tf.int32), 'mask': tf.constant(True)}

  ds = source.examples(spec.eval_split, process_index, process_count, False,
                       shuffle_seed=None)
  ds = ds.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE)
  pad = tf.data.Dataset.from_tensors({
      'image': tf.zeros([image_size, image_size, 3], tf.float32),
      'label': tf.constant(0, tf.int32), 'mask': tf.constant(False)})
  ds = ds.concatenate(pad.repeat(padding))
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(_options())
  return iter(ds.as_numpy_iterator())


def _check_names(augment_name: str, normalization: str, *, crop: str,
                 resize: str, aug_pixel_constants: str = 'fixed') -> None:
  options.check_augment_name(augment_name)
  preprocessing.check_choice('aug_pixel_constants', aug_pixel_constants,
                             options.PIXEL_CONSTANT_MODES)
  preprocessing.check_normalization(normalization)
  preprocessing.check_choice('crop', crop, options.CROPS)
  preprocessing.check_choice('resize', resize, options.RESIZE_METHODS)
