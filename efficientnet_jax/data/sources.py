"""Where examples come from: TFDS builders and image folders.

A source turns a `DataSpec` into per-process `tf.data` datasets of
(encoded image bytes, int label) and knows each split's size, without any
preprocessing. `input_pipeline.py` does the rest, identically for every source.

* `'fashion_mnist'`: the offline builder over Debian's IDX files
  (`fashion_mnist.FashionMnistDebian`), prepared into `data_dir` on first use.
* `'imagenet2012'`: TFDS's builder; manual download, prepared once by
  `scripts/prepare_imagenet.sh` (never implicitly: it takes hours). Besides
  TFDS split strings it takes the split presets `train_minus_minival`,
  `minival` and `validation` (`efficientnet_jax/data/splits.py`, TF-free so that
  the dry run counts them without importing TF).
* any other name: a TFDS image-classification dataset already prepared in
  `data_dir`. Nothing is downloaded at run time.
* `'folder'`: `folder/<class>/*.jpg|png` (classes sorted), or
  `folder/<split>/<class>/…` when `folder/<train_split>` exists. Files that do not
  decode are found by a one-off decode scan, skipped and reported by
  `skipped_examples(spec)` and `dataset_info(spec)['num_skipped']`.
"""
import dataclasses
import functools
import os
from typing import Protocol

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from efficientnet_jax.data import splits
from efficientnet_jax.data import fashion_mnist
from efficientnet_jax.data.spec import DataSpec

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


class Source(Protocol):
  """The interface `input_pipeline` needs from a dataset."""

  class_names: tuple[str, ...]
  # 'jpeg' (crop fused with decoding), 'encoded' (any format tf.io.decode_image
  # reads) or 'decoded' (uint8 [H, W, C] tensors).
  image_format: str
  channels: int | None  # channels stored per image, None = unknown

  def num_examples(self, split: str, process_index: int, process_count: int,
                   drop_remainder: bool) -> int:
    ...

  def examples(self, split: str, process_index: int, process_count: int,
               drop_remainder: bool, shuffle_seed: int | None
              ) -> tf.data.Dataset:
    """(image, label int64) pairs of this process's part of `split`."""
    ...


# --------------------------------------------------------------------------
# TFDS.


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A prepared TFDS image-classification dataset."""
  builder: tfds.core.DatasetBuilder
  class_names: tuple[str, ...]
  image_format: str
  channels: int | None
  image_key: str
  label_key: str

  def _dataset(self, split: str, process_index: int, process_count: int,
               drop_remainder: bool, shuffle_seed: int | None):
    # A preset ('train_minus_minival', 'minival', ...) names a TFDS slice.
    split = splits.tfds_split(self.builder.name, split)
    if process_count > 1:
      # Contiguous, near-equal slices (tfds.split_for_jax_process does the same
      # with jax's process index; we take the index explicitly so tests and
      # tools can ask for any process's slice).
      split = tfds.even_splits(split, process_count,
                               drop_remainder=drop_remainder)[process_index]
    decoders = None
    if self.image_format != 'decoded':
      decoders = {self.image_key: tfds.decode.SkipDecoding()}
    try:
      return self.builder.as_dataset(
          split=split, decoders=decoders, shuffle_files=shuffle_seed is not None,
          read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed,
                                      try_autocache=False))
    except AssertionError as e:  # what tfds raises for unprepared data
      raise FileNotFoundError(
          f'TFDS dataset {self.builder.name!r} is not prepared in '
          f'{self.builder.data_dir}. This pipeline never downloads: run `tfds '
          f'build {self.builder.name} --data_dir=<data_dir>` where the network '
          'is available, then pass that data_dir.') from e
    except (KeyError, ValueError) as e:
      known = ', '.join(self.builder.info.splits) or 'unknown'
      raise ValueError(f'Bad split {split!r} for TFDS dataset '
                       f'{self.builder.name!r} (splits: {known}): {e}') from e

  def num_examples(self, split: str, process_index: int = 0,
                   process_count: int = 1, drop_remainder: bool = False) -> int:
    ds = self._dataset(split, process_index, process_count, drop_remainder,
                       None)
    count = int(ds.cardinality())
    if count < 0:
      raise ValueError(f'TFDS dataset {self.builder.name!r} split {split!r} has '
                       'unknown size.')
    return count

  def examples(self, split: str, process_index: int, process_count: int,
               drop_remainder: bool, shuffle_seed: int | None
              ) -> tf.data.Dataset:
    ds = self._dataset(split, process_index, process_count, drop_remainder,
                       shuffle_seed)
    return ds.map(lambda ex: (ex[self.image_key], ex[self.label_key]),
                  num_parallel_calls=tf.data.AUTOTUNE)


def _tfds_source(builder: tfds.core.DatasetBuilder) -> TfdsSource:
  """Reads the feature layout of an image-classification builder."""
  image_key, label_key = builder.info.supervised_keys or ('image', 'label')
  features = builder.info.features
  image, label = features[image_key], features[label_key]
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f'TFDS dataset {builder.name!r}: feature {label_key!r} is '
                     'not a ClassLabel; only image classification is supported.')
  if isinstance(image, tfds.features.Image):
    image_format = 'jpeg' if image.encoding_format == 'jpeg' else 'encoded'
  else:
    image_format = 'decoded'
  return TfdsSource(builder=builder, class_names=tuple(label.names),
                    image_format=image_format, channels=image.shape[-1],
                    image_key=image_key, label_key=label_key)


def _fashion_mnist_builder(spec: DataSpec) -> tfds.core.DatasetBuilder:
  builder = fashion_mnist.FashionMnistDebian(data_dir=spec.data_dir,
                                             source_dir=spec.source_dir)
  if not builder.is_prepared():
    logging.info('Preparing Fashion-MNIST from %s into %s (offline).',
                 fashion_mnist.resolve_source_dir(spec.source_dir),
                 builder.data_dir)
    builder.download_and_prepare()
  return builder


def _imagenet_builder(spec: DataSpec) -> tfds.core.DatasetBuilder:
  builder = tfds.builder('imagenet2012', data_dir=spec.data_dir)
  if builder.is_prepared():
    return builder
  data_root = os.path.dirname(os.path.dirname(builder.data_dir))
  manual_dir = spec.manual_dir or os.path.join(data_root, 'downloads', 'manual')
  missing = [t for t in IMAGENET_TARS
             if not os.path.exists(os.path.join(manual_dir, t))]
  if missing:
    where = ' and '.join(os.path.join(manual_dir, t) for t in IMAGENET_TARS)
    problem = (f'it needs a manual download: put {where} there (missing: '
               f'{", ".join(missing)}; get them from https://image-net.org)')
  else:
    problem = f'the tars are in {manual_dir} but have not been prepared'
  raise FileNotFoundError(
      f'ImageNet (imagenet2012) is not prepared in {builder.data_dir}: '
      f'{problem}. Then run `scripts/prepare_imagenet.sh {manual_dir} '
      f'{data_root}` once (tfds build; hours) and pass data_dir={data_root}.')


def _named_tfds_builder(spec: DataSpec) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(spec.name, data_dir=spec.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f'Unknown dataset {spec.name!r}: it is not a TFDS dataset. Use '
        "'fashion_mnist', 'imagenet2012', 'folder' or a TFDS image-"
        'classification name.') from e


# --------------------------------------------------------------------------
# Image folders.


@dataclasses.dataclass(frozen=True)
class ImageFolderIndex:
  """The decodable images under a `<root>/<class>/*` tree."""
  root: str
  paths: tuple[str, ...]
  labels: tuple[int, ...]
  skipped: tuple[str, ...]  # image files that failed to decode


def _list_images(root: str, class_names: tuple[str, ...]
                ) -> tuple[tuple[str, int], ...]:
  listing = []
  for label, name in enumerate(class_names):
    class_dir = os.path.join(root, name)
    if not os.path.isdir(class_dir):
      continue  # an eval split may lack a class
    for entry in sorted(os.listdir(class_dir)):
      if entry.lower().endswith(IMAGE_EXTENSIONS) and not entry.startswith('.'):
        listing.append((os.path.join(class_dir, entry), label))
  return tuple(listing)


def _decodes(paths: tuple[str, ...]) -> np.ndarray:
  """Which files decode as images (bool per path), using tf.data in parallel."""
  ds = tf.data.Dataset.from_tensor_slices(list(paths) or [''])
  ds = ds.take(len(paths)).enumerate().map(
      lambda i, path: (i, tf.shape(tf.io.decode_image(
          tf.io.read_file(path), channels=3, expand_animations=False))),
      num_parallel_calls=tf.data.AUTOTUNE)
  ok = np.zeros(len(paths), bool)
  for index, shape in ds.ignore_errors().as_numpy_iterator():
    ok[index] = shape[0] > 0 and shape[1] > 0
  return ok


@functools.lru_cache(maxsize=16)
def _scan(root: str, class_names: tuple[str, ...],
          stamp: tuple[tuple[str, int, int], ...]) -> ImageFolderIndex:
  # Memoised on (path, size, mtime) of every file, so the decode scan runs
  # once per folder state rather than once per dataset_info/iterator call.
  del stamp
  listing = _list_images(root, class_names)
  ok = _decodes(tuple(p for p, _ in listing))
  skipped = tuple(p for (p, _), good in zip(listing, ok) if not good)
  for path in skipped:
    logging.warning('Skipping %s: it does not decode as an image.', path)
  kept = [item for item, good in zip(listing, ok) if good]
  return ImageFolderIndex(root=root, paths=tuple(p for p, _ in kept),
                          labels=tuple(label for _, label in kept),
                          skipped=skipped)


def scan_image_folder(root: str,
                      class_names: tuple[str, ...] | None = None
                     ) -> ImageFolderIndex:
  """Lists `root/<class>/*` images, dropping files that do not decode.

  Args:
    root: directory whose subdirectories are classes.
    class_names: label order; None = the sorted subdirectory names.

  Returns:
    The index; `skipped` lists the corrupt or truncated files.
  """
  if class_names is None:
    class_names = folder_classes(root)
  listing = _list_images(root, class_names)
  stamp = tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns)
                for p, _ in listing)
  return _scan(os.path.abspath(root), tuple(class_names), stamp)


def folder_classes(root: str) -> tuple[str, ...]:
  """Sorted names of the non-hidden subdirectories of `root`."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Image folder {root} does not exist.')
  names = tuple(sorted(e for e in os.listdir(root)
                       if not e.startswith('.') and
                       os.path.isdir(os.path.join(root, e))))
  if not names:
    raise FileNotFoundError(f'Image folder {root} has no class subdirectories.')
  return names


def _even_slice(count: int, index: int, parts: int,
                drop_remainder: bool) -> slice:
  """Process `index`'s contiguous share of `count` items (as tfds.even_splits)."""
  if drop_remainder:
    size = count // parts
    return slice(index * size, (index + 1) * size)
  return slice(index * count // parts, (index + 1) * count // parts)


@dataclasses.dataclass(frozen=True)
class FolderSource:
  """An image folder, one subfolder per class."""
  root: str
  split_roots: tuple[tuple[str, str], ...]  # (split, directory)
  class_names: tuple[str, ...]
  image_format: str = 'encoded'
  channels: int | None = 3

  def index(self, split: str) -> ImageFolderIndex:
    return scan_image_folder(dict(self.split_roots)[split], self.class_names)

  def num_examples(self, split: str, process_index: int = 0,
                   process_count: int = 1, drop_remainder: bool = False) -> int:
    count = len(self.index(split).paths)
    part = _even_slice(count, process_index, process_count, drop_remainder)
    return part.stop - part.start

  def examples(self, split: str, process_index: int, process_count: int,
               drop_remainder: bool, shuffle_seed: int | None
              ) -> tf.data.Dataset:
    index = self.index(split)
    part = _even_slice(len(index.paths), process_index, process_count,
                       drop_remainder)
    paths = np.array(index.paths[part], dtype=object)
    labels = np.array(index.labels[part], dtype=np.int64)
    if shuffle_seed is not None:  # a full permutation: the list is in memory
      order = np.random.default_rng(shuffle_seed).permutation(len(paths))
      paths, labels = paths[order], labels[order]
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths.astype(str), tf.string), labels))
    return ds.map(lambda path, label: (tf.io.read_file(path), label),
                  num_parallel_calls=tf.data.AUTOTUNE)


def _folder_source(spec: DataSpec) -> FolderSource:
  if not spec.folder:
    raise ValueError("DataSpec(name='folder') needs folder=<root directory>.")
  root = spec.folder
  splits = (spec.train_split, spec.eval_split)
  has_split_dirs = [os.path.isdir(os.path.join(root, s)) for s in splits]
  if any(has_split_dirs):
    if not all(has_split_dirs):
      missing = [s for s, has in zip(splits, has_split_dirs) if not has]
      raise FileNotFoundError(
          f'Image folder {root} has split subfolders but none named '
          f'{missing}; set DataSpec.train_split/eval_split to its subfolders.')
    split_roots = tuple((s, os.path.join(root, s)) for s in splits)
  else:
    logging.warning('Image folder %s has no %s/ and %s/ subfolders: training '
                    'and evaluating on the same images.', root, *splits)
    split_roots = tuple((s, root) for s in splits)
  class_names = folder_classes(split_roots[0][1])
  return FolderSource(root=root, split_roots=split_roots,
                      class_names=class_names)


# --------------------------------------------------------------------------


def make_source(spec: DataSpec) -> Source:
  """The source for `spec`.

  Raises:
    ValueError: unknown dataset name or bad folder spec.
    FileNotFoundError: data that must be prepared or installed is missing (the
      message says how to get it).
  """
  if spec.name == 'folder':
    return _folder_source(spec)
  if spec.name == 'fashion_mnist':
    return _tfds_source(_fashion_mnist_builder(spec))
  if spec.name == 'imagenet2012':
    return _tfds_source(_imagenet_builder(spec))
  return _tfds_source(_named_tfds_builder(spec))


def skipped_examples(spec: DataSpec) -> tuple[str, ...]:
  """Image files skipped because they do not decode (image folders only).

  TFDS datasets are validated when prepared, so this is empty for them.
  """
  source = make_source(spec)
  if not isinstance(source, FolderSource):
    return ()
  skipped = []
  for _, directory in dict(source.split_roots).items():
    skipped.extend(scan_image_folder(directory, source.class_names).skipped)
  return tuple(dict.fromkeys(skipped))  # same root for both splits: dedupe
