"""Image embeddings: pooled EfficientNet features for a folder or a TFDS split.

  python -m efficientnet_jax.embed --weights=lite0 --folder=photos/ --out=feats.npy
  python -m efficientnet_jax.embed --weights=lite0 --tfds=fashion_mnist:test --limit=500 \\
      --out=fmnist.npy --endpoints

Writes
  OUT (.npy)          float32 [N, C]: the global-average-pooled output of the
                      head conv, i.e. the classifier's input (1280 for Lite0).
  OUT.json            {'paths': [...], 'labels': [...], 'class_names': [...], ...}:
                      row i of OUT is paths[i] (a file, or 'name:split[i]'),
                      labels[i] its class index (-1 for unlabelled files).
  OUT_endpoints.npz   with --endpoints: 'stem', 'reduction_1'..'reduction_5',
                      'head' (the official multi-scale endpoints, strides 2..32),
                      each mean-pooled to [N, C_i], or with --raw_endpoints the
                      feature maps [N, H_i, W_i, C_i] (large: stem of a 224 px
                      Lite0 is 112 x 112 x 32 floats per image).

Images get predict.py's preprocessing (the eval preprocessing the weights
were measured with, `eval_presets.for_weights`, and the variant's normalisation).
`--folder` takes every image under
the directory (recursively, sorted); a first-level subdirectory name is the
label. Unreadable files are reported on stderr and skipped. Features are not
L2-normalised: do that before cosine similarity (see the README example).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from efficientnet_jax import eval_presets
from efficientnet_jax import predict
from efficientnet_jax.eval_presets import EvalPreprocessing
from efficientnet_jax.model import EfficientNet
from efficientnet_jax.weights import load as weights_load

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
ENDPOINTS = ('stem', 'reduction_1', 'reduction_2', 'reduction_3', 'reduction_4',
             'reduction_5', 'head')


def list_folder(root: str) -> tuple[list[str], list[int], list[str]]:
  """(paths, labels, class_names): images under root, sorted; label = first subdirectory."""
  if not os.path.isdir(root):
    raise ValueError(f'--folder={root!r}: not a directory')
  classes = sorted(e for e in os.listdir(root)
                   if not e.startswith('.') and os.path.isdir(os.path.join(root, e)))
  paths, labels = [], []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
    rel = os.path.relpath(directory, root)
    label = -1 if rel == '.' else classes.index(rel.split(os.sep)[0])
    for name in sorted(files):
      if name.lower().endswith(IMAGE_SUFFIXES):
        paths.append(os.path.join(directory, name))
        labels.append(label)
  if not paths:
    raise ValueError(f'--folder={root!r}: no images ({", ".join(IMAGE_SUFFIXES)})')
  return paths, labels, classes


def folder_images(paths: Sequence[str], prep: EvalPreprocessing
                  ) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
  """(index, image or None, error) per path."""
  for i, path in enumerate(paths):
    try:
      yield i, predict.load_image(path, prep), None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      yield i, None, f'{type(e).__name__}: {e}'


def tfds_examples(name_split: str, *, data_dir: str | None = None,
                  source_dir: str | None = None, limit: int | None = None,
                  ) -> tuple[Iterator[tuple[np.ndarray, int]], int, list[str]]:
  """(iterator of (uint8 image, label), count, class_names) for 'name:split'."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from efficientnet_jax.data import sources  # pylint: disable=g-import-not-at-top
  from efficientnet_jax.data.sources import DataSpec  # pylint: disable=g-import-not-at-top
  name, sep, split = name_split.partition(':')
  if not sep or not name or not split:
    raise ValueError(f'--tfds={name_split!r}: expected NAME:SPLIT, e.g. fashion_mnist:test')
  source = sources.make_source(DataSpec(name=name, data_dir=data_dir or None,
                                        source_dir=source_dir or None))
  count = source.num_examples(split)
  ds = source.examples(split, 0, 1, False, None)
  if limit:
    ds, count = ds.take(limit), min(count, limit)

  def decode(image, label):
    if image.dtype == tf.string:
      image = tf.io.decode_image(image, channels=3, expand_animations=False)
    return image, label

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  return ((np.asarray(image), int(label)) for image, label in ds.as_numpy_iterator()), \
      count, list(source.class_names)


def make_features_fn(module: EfficientNet, endpoints: bool, raw: bool):
  """Jitted (variables, images) -> {'features': [b, C], endpoint: pooled or raw}."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  @jax.jit
  def features(variables, images):
    _, maps = module.apply(variables, images, train=False, return_endpoints=True)
    out = {'features': jnp.mean(maps['head'].astype(jnp.float32), axis=(1, 2))}
    if endpoints:
      for name in ENDPOINTS:
        value = maps[name].astype(jnp.float32)
        out[name] = value if raw else jnp.mean(value, axis=(1, 2))
    return out

  return features


def embed(images: Iterator[tuple[np.ndarray | None, Any]], count: int,
          module: EfficientNet, variables: dict[str, Any], *, image_size: int | None = None,
          batch_size: int = 32, endpoints: bool = False, raw: bool = False,
          progress: bool = True) -> dict[str, np.ndarray]:
  """Features of preprocessed float32 [size, size, 3] 0..255 images (None = skip).

  Returns {'features': [n, C], endpoint...: ...} over the images that were not None.
  `progress` prints 'embedded i/count images' to stderr after each batch.
  """
  size = image_size or module.spec.eval_resolution
  fn = make_features_fn(module, endpoints, raw)
  chunks: dict[str, list[np.ndarray]] = {}
  batch: list[np.ndarray] = []
  done, start = 0, time.perf_counter()

  def flush():
    nonlocal done
    real = len(batch)
    # Pad to a full batch: one compilation for every call.
    stack = np.stack(batch + [np.zeros((size, size, 3), np.float32)] * (batch_size - real))
    out = fn(variables, predict.normalize(stack, module.spec.normalization))
    for key, value in out.items():
      chunks.setdefault(key, []).append(np.asarray(value)[:real])
    done += real
    batch.clear()
    if progress:
      rate = done / max(time.perf_counter() - start, 1e-9)
      print(f'embedded {done}/{count} images ({rate:.1f} images/s)', file=sys.stderr,
            flush=True)

  for image in images:
    if image is None:
      continue
    if image.shape != (size, size, 3):
      raise ValueError(f'expected a preprocessed ({size}, {size}, 3) image, got {image.shape}')
    batch.append(image)
    if len(batch) == batch_size:
      flush()
  if batch:
    flush()
  if not chunks:
    raise ValueError('no readable images to embed')
  return {key: np.concatenate(value) for key, value in chunks.items()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m efficientnet_jax.embed',
                                   description=__doc__.split('\n')[0])
  weights_load.add_weights_args(parser)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--folder', help='a directory of images (subdirectories = labels)')
  source.add_argument('--tfds', help='NAME:SPLIT of a prepared TFDS dataset (or '
                                     'fashion_mnist:train|test, built offline)')
  parser.add_argument('--data_dir', default=None, help='--tfds: the TFDS data_dir')
  parser.add_argument('--source_dir', default=None,
                      help='--tfds=fashion_mnist: directory of the IDX files')
  parser.add_argument('--limit', type=int, default=None, help='--tfds: the first N examples')
  parser.add_argument('--out', required=True, help='output .npy of pooled features')
  parser.add_argument('--endpoints', action='store_true',
                      help='also write OUT_endpoints.npz of the multi-scale endpoints')
  parser.add_argument('--raw_endpoints', action='store_true',
                      help='with --endpoints: feature maps instead of pooled vectors')
  parser.add_argument('--image_size', type=int, default=None,
                      help="crop size; default the variant's eval resolution")
  parser.add_argument('--batch_size', type=int, default=32)
  args = parser.parse_args(argv)
  if not args.out.endswith('.npy'):
    parser.error(f'--out={args.out!r}: must end in .npy')
  if args.raw_endpoints and not args.endpoints:
    parser.error('--raw_endpoints needs --endpoints')
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """CLI; exit status 0, 1 when some images were unreadable, 2 on bad arguments."""
  args = parse_args(argv)
  errors = []
  try:
    module, variables, notes = weights_load.load_weights_from_args(args)
    for note in notes:
      print(f'note: {note}', file=sys.stderr)
    prep = eval_presets.for_weights(module.spec, args.weights, args.origin, config=args.config,
                                    image_size=args.image_size)
    size = prep.image_size
    if args.folder:
      paths, labels, class_names = list_folder(args.folder)
      count = len(paths)
      kept = []

      def images():
        for i, image, error in folder_images(paths, prep):
          if error:
            errors.append((paths[i], error))
          else:
            kept.append(i)
          yield image
    else:
      examples, count, class_names = tfds_examples(
          args.tfds, data_dir=args.data_dir, source_dir=args.source_dir, limit=args.limit)
      paths, labels, kept = [], [], []

      def images():
        for i, (image, label) in enumerate(examples):
          paths.append(f'{args.tfds}[{i}]')
          labels.append(label)
          kept.append(i)
          yield predict.preprocess(image, prep)

    out = embed(images(), count, module, variables, image_size=size,
                batch_size=args.batch_size, endpoints=args.endpoints, raw=args.raw_endpoints)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for path, message in errors:
    print(f'error: cannot read image {path!r}: {message}', file=sys.stderr)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.save(args.out, out.pop('features'))
  stem = args.out[:-len('.npy')]
  meta = {'paths': [paths[i] for i in kept], 'labels': [labels[i] for i in kept],
          'class_names': class_names, 'model': module.spec.name, 'image_size': size,
          'weights': args.weights, 'features': 'mean-pooled head (classifier input)'}
  with open(stem + '.json', 'w') as f:
    json.dump(meta, f, indent=1)
  written = [args.out, stem + '.json']
  if args.endpoints:
    np.savez(stem + '_endpoints.npz', **out)
    written.append(stem + '_endpoints.npz')
  print(f'wrote {", ".join(written)} ({len(kept)} images)', file=sys.stderr)
  return 1 if errors else 0


if __name__ == '__main__':
  sys.exit(main())
