"""The one tf.data input pipeline: train and eval iterators of host-local numpy.

Every source (`sources.py`: Fashion-MNIST, ImageNet, any TFDS name, image
folders) goes through the same per-example code:

  train: decode → inception crop (fused with JPEG decoding for JPEG sources) →
         bicubic resize → flip → AutoAugment/RandAugment on uint8 → normalise →
         one-hot → batch (drop remainder) → mixup/cutmix on the host batch.
  eval:  decode → centre crop size/(size+crop_padding) → bicubic → normalise →
         batch, padded with mask=False rows so nothing is dropped.

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
import math
import os
from typing import Iterator

from absl import logging
import numpy as np
import tensorflow as tf

from efficientnet_jax.data import augment as augment_lib
from efficientnet_jax.data import mixing
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


def _train_image(image: tf.Tensor, seed: tf.Tensor, source: sources.Source, *,
                 image_size: int, inception_crop: bool, augment_name: str,
                 randaug_layers: int, randaug_magnitude: float) -> tf.Tensor:
  """One training image → float32 [S, S, 3] in 0..255 (not yet normalised)."""
  crop_seed, flip_seed, augment_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  if inception_crop and source.image_format == 'jpeg':
    image = preprocessing.decode_and_inception_crop_jpeg(image, crop_seed,
                                                         image_size)
  elif inception_crop:
    image = preprocessing.inception_crop(_decode(image, source), crop_seed,
                                         image_size)
  else:  # the whole image (its central square) for tiny images
    image = preprocessing.center_crop(_decode(image, source), image_size,
                                      crop_padding=0)
  image = preprocessing.random_flip(image, flip_seed)
  if augment_name != 'none':
    # Augmentations work on uint8, as in the official code.
    image = tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
    translate, cutout = augment_lib.pixel_constants(augment_name, image_size)
    if augment_name == 'randaugment':
      image = augment_lib.randaugment(
          image, augment_seed, num_layers=randaug_layers,
          magnitude=randaug_magnitude, translate_const=translate,
          cutout_const=cutout)
    else:
      image = augment_lib.autoaugment(image, augment_seed,
                                      translate_const=translate)
    image = tf.cast(image, tf.float32)
  return image


def _epoch_seed(seed: int, epoch: int, process_index: int) -> int:
  """A 32-bit seed for one (run seed, epoch, process)."""
  return int(np.random.SeedSequence([seed, epoch, process_index])
             .generate_state(1)[0])


def make_train_iterator(spec: DataSpec, *, image_size: int, batch_size: int,
                        seed: int, normalization: str, augment: str = 'none',
                        randaug_layers: int = 2, randaug_magnitude: float = 10.,
                        mixup_alpha: float = 0., cutmix_alpha: float = 0.,
                        num_classes: int, start_step: int = 0,
                        process_index: int = 0, process_count: int = 1,
                        shuffle_buffer: int = 10_000,
                        inception_crop: bool = True,
                        process_sharding: str = 'files') -> Iterator[dict]:
  """Infinite, deterministic iterator of this process's training batches.

  Args:
    spec: the dataset.
    image_size: output side S.
    batch_size: examples per batch *per process*.
    seed: run seed; fixes shuffling, crops, flips, augmentation and mixing.
    normalization: 'v1', 'v2' or 'lite' (see `preprocessing.normalize`).
    augment: 'none', 'autoaugment' (policy v0) or 'randaugment'.
    randaug_layers: RandAugment N.
    randaug_magnitude: RandAugment M on the official 0–10 scale.
    mixup_alpha: mixup Beta parameter; 0 = off.
    cutmix_alpha: cutmix Beta parameter; 0 = off. Both on: half and half.
    num_classes: one-hot width (≥ the dataset's class count).
    start_step: batches already consumed; the iterator resumes after them.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    shuffle_buffer: examples in the shuffle buffer.
    inception_crop: False replaces the random crop by the whole (centre
      square of the) image, for tiny images such as 28-px Fashion-MNIST.
    process_sharding: 'files' (each process shuffles and reads its own
      `even_splits` slice: scalable, the default) or 'batch' (every process
      walks the same seeded global order and keeps its rows of each global
      batch, decoding only those; per-example seeds come from the global
      index, so the global batch is the same whatever the process count, as
      long as mixup/cutmix are off. Every process reads every record.)

  Returns:
    Iterator of {'image': float32 [B, S, S, 3] normalised,
    'label': float32 [B, num_classes] one-hot, mixed when mixup/cutmix is on}.

  Raises:
    ValueError: unknown augment/normalization/dataset, or too few examples.
    FileNotFoundError: the data is not prepared or installed.
  """
  augment_name = augment  # the public keyword name; the module is augment_lib
  _check_names(augment_name, normalization)
  _hide_gpus_from_tf()
  source = sources.make_source(spec)
  if num_classes < len(source.class_names):
    raise ValueError(f'num_classes={num_classes} but dataset {spec.name!r} has '
                     f'{len(source.class_names)} classes.')
  if process_sharding not in ('files', 'batch'):
    raise ValueError(f'data.process_sharding={process_sharding!r}; accepted: files, batch')
  by_batch = process_sharding == 'batch' and process_count > 1
  if by_batch:  # one global order; this process keeps rows [p*B, (p+1)*B) of each batch
    global_batch = batch_size * process_count
    steps_per_epoch = source.num_examples(spec.train_split, 0, 1, True) // global_batch
    per_process = steps_per_epoch * batch_size
  else:
    per_process = source.num_examples(spec.train_split, process_index,
                                      process_count, True)
  steps_per_epoch = per_process // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'Per-process batch {batch_size} is larger than this '
                     f"process's {per_process} training examples.")

  # One tf.function for every epoch: it is traced once, not once per epoch.
  @tf.function
  def example_fn(example_seed, image, label):
    image = _train_image(image, example_seed, source, image_size=image_size,
                         inception_crop=inception_crop,
                         augment_name=augment_name,
                         randaug_layers=randaug_layers,
                         randaug_magnitude=randaug_magnitude)
    return (preprocessing.normalize(image, normalization),
            tf.one_hot(label, num_classes, dtype=tf.float32))

  def epoch_dataset(epoch: int, skip_batches: int) -> tf.data.Dataset:
    if by_batch:
      epoch_seed = _epoch_seed(seed, epoch, 0)
      ds = source.examples(spec.train_split, 0, 1, True, shuffle_seed=epoch_seed)
      ds = ds.shuffle(shuffle_buffer, seed=epoch_seed).enumerate()
      ds = ds.skip(skip_batches * global_batch)
      # Keep this process's rows before decoding: the others' cost a record read.
      ds = ds.filter(lambda i, ex: (i % global_batch) // batch_size == process_index)
    else:
      epoch_seed = _epoch_seed(seed, epoch, process_index)
      ds = source.examples(spec.train_split, process_index, process_count, True,
                           shuffle_seed=epoch_seed)
      ds = ds.shuffle(shuffle_buffer, seed=epoch_seed).enumerate()
      # Skip before decoding, after enumerate: resumed examples keep their seeds.
      ds = ds.skip(skip_batches * batch_size)
    epoch_key = tf.constant(epoch_seed, tf.int64)
    ds = ds.map(lambda i, ex: example_fn(tf.stack([epoch_key, i]), *ex),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options())

  def batches():
    epoch, skip = divmod(start_step, steps_per_epoch)
    step = start_step
    while True:
      for images, labels in epoch_dataset(epoch, skip).as_numpy_iterator():
        if mixup_alpha or cutmix_alpha:
          rng = np.random.default_rng([seed, step, process_index])
          images, labels = mixing.mix_batch(
              images, labels, mixup_alpha=mixup_alpha,
              cutmix_alpha=cutmix_alpha, rng=rng)
        yield {'image': images, 'label': labels}
        step += 1
      epoch, skip = epoch + 1, 0

  return batches()


def make_eval_iterator(spec: DataSpec, *, image_size: int, batch_size: int,
                       normalization: str, crop_padding: int = 32,
                       process_index: int = 0,
                       process_count: int = 1) -> Iterator[dict]:
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

  Returns:
    Iterator of {'image': float32 [B, S, S, 3], 'label': int32 [B],
    'mask': bool [B]}.
  """
  _check_names('none', normalization)
  _hide_gpus_from_tf()
  source = sources.make_source(spec)
  counts = [source.num_examples(spec.eval_split, p, process_count, False)
            for p in range(process_count)]
  num_batches = max(math.ceil(c / batch_size) for c in counts)
  padding = num_batches * batch_size - counts[process_index]

  def example_fn(image, label):
    if source.image_format == 'jpeg':
      image = preprocessing.decode_and_center_crop_jpeg(
          image, image_size, crop_padding=crop_padding)
    else:
      image = preprocessing.center_crop(_decode(image, source), image_size,
                                        crop_padding=crop_padding)
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


def _check_names(augment_name: str, normalization: str) -> None:
  augment_lib.check_augment_name(augment_name)
  preprocessing.check_normalization(normalization)
