"""`DataSpec`: what a dataset is, independent of augmentation (no TensorFlow import)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What a dataset is, independent of augmentation.

  Attributes:
    name: 'fashion_mnist', 'imagenet2012', any TFDS name, or 'folder'.
    data_dir: TFDS data_dir (prepared data / builder cache); None = TFDS default.
    manual_dir: imagenet2012 manual dir holding the ILSVRC2012 tars; None =
      `<data_dir>/downloads/manual`.
    folder: root of an image folder when name == 'folder'.
    source_dir: Fashion-MNIST IDX directory override.
    train_split: split (or TFDS slice such as 'train[:95%]') to train on;
      imagenet2012 also takes the presets of `efficientnet_jax/data/splits.py`
      ('train_minus_minival', 'minival', 'validation').
    eval_split: split to evaluate on (fashion_mnist: 'test'; imagenet2012:
      'validation', or the 'minival' preset).
  """
  name: str
  data_dir: str | None = None
  manual_dir: str | None = None
  folder: str | None = None
  source_dir: str | None = None
  train_split: str = 'train'
  eval_split: str = 'test'
