"""Offline Fashion-MNIST as a TFDS builder over Debian's IDX files.

Debian's `dataset-fashion-mnist` package installs the full 60k/10k dataset as
gzip'd big-endian IDX files (`data.md` §2). `FashionMnistDebian` turns them
into a normal prepared TFDS dataset (tfrecords + dataset_info.json) with no
download step, so the rest of the input pipeline reads it like any tfds name:

  builder = FashionMnistDebian(data_dir='/tmp/tfds')  # source: see below
  builder.download_and_prepare()                        # offline, a few seconds
  ds = builder.as_dataset(split='train')

The IDX directory is, in order of precedence: the `source_dir` argument, the
`FASHION_MNIST_DIR` environment variable, `/usr/share/datasets/fashion-mnist`.
The prepared copy is keyed by `data_dir` only: prepare different sources into
different `data_dir`s.
"""
import gzip
import io
import os

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

DEFAULT_SOURCE_DIR = '/usr/share/datasets/fashion-mnist'
SOURCE_DIR_ENV = 'FASHION_MNIST_DIR'
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
               'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
# split -> (images file, labels file), the upstream names Debian keeps.
FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
_SIDE = 28
_INSTALL_HINT = ('Install it with `apt-get install dataset-fashion-mnist` or '
                 f'point {SOURCE_DIR_ENV} (or source_dir) at a directory holding '
                 'the four IDX .gz files.')


def resolve_source_dir(source_dir: str | None = None) -> str:
  """The IDX directory: `source_dir`, else $FASHION_MNIST_DIR, else Debian's."""
  return source_dir or os.environ.get(SOURCE_DIR_ENV) or DEFAULT_SOURCE_DIR


def _read_idx(path: str, magic: int, num_dims: int) -> np.ndarray:
  """Reads one gzip'd big-endian IDX file, checking its header.

  Raises:
    FileNotFoundError: the file is missing (the message names it).
    ValueError: the header or length is wrong (the message names the file).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'Fashion-MNIST file {path} does not exist. '
                            f'{_INSTALL_HINT}')
  try:
    with gzip.open(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f'Fashion-MNIST file {path} is not a readable gzip file '
                     f'({e}). {_INSTALL_HINT}') from e
  header_size = 4 * (1 + num_dims)
  if len(data) < header_size:
    raise ValueError(f'Fashion-MNIST file {path} is too short for an IDX '
                     f'header. {_INSTALL_HINT}')
  header = np.frombuffer(data, '>u4', count=1 + num_dims)
  if header[0] != magic:
    raise ValueError(f'Fashion-MNIST file {path} has IDX magic {header[0]}, '
                     f'expected {magic}. {_INSTALL_HINT}')
  shape = tuple(int(d) for d in header[1:])
  if len(data) != header_size + int(np.prod(shape)):
    raise ValueError(f'Fashion-MNIST file {path} holds '
                     f'{len(data) - header_size} bytes of data; its header '
                     f'{shape} needs {int(np.prod(shape))}. {_INSTALL_HINT}')
  return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)


def read_labels(path: str) -> np.ndarray:
  """uint8 [N] labels from an IDX1 file (magic 2049)."""
  return _read_idx(path, _LABELS_MAGIC, 1)


def read_images(path: str) -> np.ndarray:
  """uint8 [N, 28, 28] images from an IDX3 file (magic 2051)."""
  images = _read_idx(path, _IMAGES_MAGIC, 3)
  if images.shape[1:] != (_SIDE, _SIDE):
    raise ValueError(f'Fashion-MNIST file {path} holds {images.shape[1:]} '
                     f'images, expected ({_SIDE}, {_SIDE}).')
  return images


def load_split(split: str, source_dir: str | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels uint8 [N]) of 'train' or 'test'."""
  directory = resolve_source_dir(source_dir)
  images_file, labels_file = FILES[split]
  images = read_images(os.path.join(directory, images_file))
  labels = read_labels(os.path.join(directory, labels_file))
  if len(images) != len(labels):
    raise ValueError(f'Fashion-MNIST {split} in {directory}: {len(images)} '
                     f'images but {len(labels)} labels.')
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise ValueError(f'Fashion-MNIST {split} in {directory}: label '
                     f'{labels.max()} is out of range 0..9.')
  return images, labels


class FashionMnistDebian(tfds.core.GeneratorBasedBuilder,
                         skip_registration=True):
  """Fashion-MNIST (Zalando, MIT licence) prepared from local IDX files.

  Not registered with TFDS (construct it directly), so it never clashes with
  TFDS's own downloading `fashion_mnist` builder.
  """

  name = 'fashion_mnist_debian'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Built from Debian dataset-fashion-mnist IDX files.'}

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    """Args: source_dir: IDX directory (see module docstring); **kwargs: tfds."""
    self._source_dir = resolve_source_dir(source_dir)
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls) -> None:
    # Nothing is downloaded, so there are no URL checksums to look up; tfds's
    # lookup would also import `importlib_resources`, which is not a pinned dep.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Fashion-MNIST from the Debian dataset-fashion-mnist IDX '
        'files: 28x28 grey images of 10 clothing classes.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(_SIDE, _SIDE, 1)),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download: the files are local
    # Read (and validate) both splits before writing anything.
    return {
        split: self._generate_examples(*load_split(split, self._source_dir))
        for split in FILES
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {'image': _encode_png(image), 'label': int(label)}


def _encode_png(image: np.ndarray) -> bytes:
  # Encoding with PIL here is ~2x faster than tfds's per-example TF graph,
  # which dominates the prepare time; the bytes are the same kind of grey PNG.
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, format='PNG', compress_level=3)
  return buffer.getvalue()
