"""Named dataset splits (presets) and split sizes known without reading any data.

`config.data.train_split` / `eval_split` take a plain TFDS split string
('train', 'validation', 'train[:95%]') or, for imagenet2012, a preset:

| preset | TFDS slice | examples | official counterpart |
|---|---|---|---|
| `minival` | `train[:25021]` | 25,021 | train TFRecord shards [0:20) |
| `train_minus_minival` | `train[25021:]` | 1,256,146 | train shards [20:) |
| `validation` | `validation` | 50,000 | the val* shards ('eval') |

The official EfficientNetV2 code (google/automl `efficientnetv2/datasets.py`
`ImageNetInput.cfg.splits`, lines 83-90 at 6a54c87) trains on 'train' (shards
[20:), counted as 1,256,144), selects models on 'minival' (shards [0:20),
25,021) and reports on 'eval' (50,000). Its two constants add up to
1,281,165, two fewer than the 1,281,167 training images (its 'trainval'
count), so the disjoint slices here hold 25,021 + 1,256,146.

TFDS's imagenet2012 is not stored in the order of the official TFRecord shards
(tensorflow/tpu `tools/datasets/imagenet_to_gcs.py`), so `minival` holds other
images than the official minival: the same size, a different draw.

This module is pure Python (no TensorFlow), so the dry run (`recipe.py`) can
count examples without importing TF or touching the data; `data/sources.py`
maps presets to TFDS slices with `tfds_split`.
"""

from __future__ import annotations

import dataclasses

IMAGENET_TRAIN = 1_281_167
IMAGENET_VALIDATION = 50_000
# google/automl efficientnetv2/datasets.py line 86 (6a54c87): minival num_images.
IMAGENET_MINIVAL = 25_021
# google/automl efficientnetv2/datasets.py line 85 (6a54c87): train num_images.
OFFICIAL_IMAGENET_TRAIN_MINUS_MINIVAL = 1_256_144


@dataclasses.dataclass(frozen=True)
class SplitPreset:
  """A named split: what TFDS reads and how many examples it holds."""
  name: str
  tfds_split: str
  num_examples: int
  official: str  # the upstream split it stands for


PRESETS = {
    'imagenet2012': {
        'minival': SplitPreset(
            'minival', f'train[:{IMAGENET_MINIVAL}]', IMAGENET_MINIVAL,
            "google/automl efficientnetv2 'minival': train shards [0:20), 25,021"),
        'train_minus_minival': SplitPreset(
            'train_minus_minival', f'train[{IMAGENET_MINIVAL}:]',
            IMAGENET_TRAIN - IMAGENET_MINIVAL,
            "google/automl efficientnetv2 'train': train shards [20:), counted 1,256,144"),
        'validation': SplitPreset(
            'validation', 'validation', IMAGENET_VALIDATION,
            "google/automl efficientnetv2 'eval' / tensorflow/tpu eval: val*, 50,000"),
    },
}

# Sizes of plain TFDS splits, so that a dry run counts them without reading.
KNOWN_SIZES = {
    'imagenet2012': {'train': IMAGENET_TRAIN, 'validation': IMAGENET_VALIDATION},
    'fashion_mnist': {'train': 60_000, 'test': 10_000},
}
NUM_CLASSES = {'imagenet2012': 1000, 'fashion_mnist': 10}


def preset(dataset: str, split: str) -> SplitPreset | None:
  """The preset `split` names for `dataset`, or None for a plain TFDS split."""
  return PRESETS.get(dataset, {}).get(split)


def tfds_split(dataset: str, split: str) -> str:
  """The TFDS split string to read for `split` (a preset or a plain split)."""
  named = preset(dataset, split)
  return named.tfds_split if named else split


def num_examples(dataset: str, split: str) -> int:
  """Examples in `split` of `dataset`, from the presets and known sizes alone.

  Raises:
    ValueError: a split whose size is not known without reading the data (a
      sliced split, another dataset, an image folder).
  """
  named = preset(dataset, split)
  if named:
    return named.num_examples
  known = KNOWN_SIZES.get(dataset, {})
  if split in known:
    return known[split]
  names = sorted(set(known) | set(PRESETS.get(dataset, {})))
  raise ValueError(f'the size of split {split!r} of dataset {dataset!r} is not known without '
                   f'reading the data; known splits: {", ".join(names) or "none"}')
