"""Exports a model with its weights: TF SavedModel (jax2tf), TFLite, or serialized StableHLO.

  python -m efficientnet_jax.export --weights=lite0 --format=savedmodel --out=exports/lite0
  python -m efficientnet_jax.export --weights=lite0 --format=tflite --out=exports/lite0_tflite
  python -m efficientnet_jax.export --weights=w.pth --model=b0 --format=stablehlo --out=exports/b0
  python -m efficientnet_jax.export --weights=runs/demo --config=configs/demo.py \
      --format=savedmodel ...

`--weights` is resolved exactly as in predict.py ('lite0', a weights file, or a
training workdir with `--config`).

SavedModel. The model is converted with jax2tf (native serialization: the
graph holds the StableHLO of our model with its weights as constants, so the
numbers are XLA's, not a TF re-implementation) and wrapped in two signatures:

  serving_default(images: uint8 [batch, H, W, 3] RGB)
      -> {'logits': float32 [batch, classes], 'probabilities': float32 [...]}
      does predict.py's preprocessing, the same TF ops (`eval_presets` picks the
      crop and resize the weights were measured with; `data.preprocessing.
      eval_image` applies them), then the variant's normalisation (Lite:
      (x - 127) / 128). H and W are any size, or fixed with --input_size.
  cropped(images: uint8 [batch, size, size, 3]) -> {'logits', 'probabilities'}
      for images already resized and cropped: normalisation + network.
  logits(normalized: float32 [batch, size, size, 3]) -> {'logits'}
      the bare network, for parity checks against JAX.

The batch dimension is symbolic in both (jax2tf shape polymorphism).
serving_default and predict.py run the same preprocessing ops; the network
agrees with JAX to float32 rounding (tests check <= 1e-4 on the logits).

TFLite converts the SavedModel's `cropped` signature (model.tflite next to
savedmodel/): TFLite has no bicubic resize (TF's ScaleAndTranslate), so a
TFLite caller resizes and crops itself, as on-device pipelines do. If the
converter of the installed TF rejects the graph, the command exits 2 naming
the converter's error (use the SavedModel or StableHLO instead).

StableHLO. `jax.export` serializes the jitted network (normalised float32
input, symbolic batch) to `model.stablehlo` (bytes for
`jax.export.deserialize(...).call(x)`) plus `model.json` giving the input
shape/dtype, normalisation and class count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from efficientnet_jax import eval_presets  # noqa: E402
from efficientnet_jax.data import options  # noqa: E402
from efficientnet_jax.eval_presets import EvalPreprocessing  # noqa: E402
from efficientnet_jax.model import EfficientNet
from efficientnet_jax.weights import load as weights_load  # noqa: E402

FORMATS = ('savedmodel', 'tflite', 'stablehlo')


def _network_fn(module: EfficientNet, variables: dict[str, Any]):
  """normalised float32 NHWC -> float32 logits, weights closed over (become constants)."""
  variables = {'params': variables['params'], 'batch_stats': variables['batch_stats']}

  def network(images):
    return module.apply(variables, images, train=False)

  return network


def tf_preprocess(images, prep: EvalPreprocessing):
  """predict.load_image + normalize in TF, for a uint8 [b, H, W, 3] batch."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from efficientnet_jax.data import preprocessing  # pylint: disable=g-import-not-at-top
  size = prep.image_size
  images = tf.map_fn(
      lambda image: preprocessing.eval_image(image, size, crop=prep.crop,
                                             crop_padding=prep.crop_padding, resize=prep.resize),
      images, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
  mean, std = options.NORMALIZATIONS[prep.normalization]
  return (images - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def build_tf_module(module: EfficientNet, variables: dict[str, Any], *,
                    prep: EvalPreprocessing | None = None, input_size: int | None = None):
  """A tf.Module with the signatures of the module docstring.

  `prep` (default: the official eval preprocessing of the variant's TF-trained
  weights) is what the uint8 `serving` signature applies.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  prep = prep or eval_presets.eval_preprocessing(module.spec, 'tf')
  size, normalization = prep.image_size, prep.normalization
  network = jax2tf.convert(_network_fn(module, variables), with_gradient=False,
                           polymorphic_shapes=['(b, ...)'])
  tf_module = tf.Module()
  side = input_size or None

  @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32,
                                               name='normalized')], autograph=False)
  def logits(normalized):
    return {'logits': network(normalized)}

  @tf.function(input_signature=[tf.TensorSpec([None, side, side, 3], tf.uint8,
                                               name='images')], autograph=False)
  def serving(images):
    out = network(tf_preprocess(images, prep))
    return {'logits': out, 'probabilities': tf.nn.softmax(out, axis=-1)}

  @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8,
                                               name='images')], autograph=False)
  def cropped(images):
    mean, std = options.NORMALIZATIONS[normalization]
    x = (tf.cast(images, tf.float32) - tf.constant(mean)) / tf.constant(std)
    out = network(x)
    return {'logits': out, 'probabilities': tf.nn.softmax(out, axis=-1)}

  tf_module.logits = logits
  tf_module.serving = serving
  tf_module.cropped = cropped
  return tf_module


def export_savedmodel(module: EfficientNet, variables: dict[str, Any], out: str, *,
                      prep: EvalPreprocessing | None = None, input_size: int | None = None
                      ) -> str:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf_module = build_tf_module(module, variables, prep=prep, input_size=input_size)
  tf.saved_model.save(tf_module, out, signatures={
      'serving_default': tf_module.serving.get_concrete_function(),
      'logits': tf_module.logits.get_concrete_function(),
      'cropped': tf_module.cropped.get_concrete_function()})
  return out


def export_tflite(savedmodel_dir: str, out_file: str) -> str:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  converter = tf.lite.TFLiteConverter.from_saved_model(savedmodel_dir,
                                                       signature_keys=['cropped'])
  try:
    data = converter.convert()
  except Exception as e:  # pylint: disable=broad-except  # the converter raises many types
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(
        '--format=tflite: the TFLite converter cannot convert the jax2tf SavedModel on this '
        f'TF build ({type(e).__name__}: {first[:300]}); use --format=savedmodel or '
        '--format=stablehlo') from e
  with open(out_file, 'wb') as f:
    f.write(data)
  return out_file


def export_stablehlo(module: EfficientNet, variables: dict[str, Any], out: str, *,
                     image_size: int | None = None) -> tuple[str, str]:
  """Writes out/model.stablehlo and out/model.json; returns their paths."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  size = image_size or module.spec.eval_resolution
  batch, = jax.export.symbolic_shape('b')
  shape = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  exported = jax.export.export(jax.jit(_network_fn(module, variables)))(shape)
  os.makedirs(out, exist_ok=True)
  model_path = os.path.join(out, 'model.stablehlo')
  with open(model_path, 'wb') as f:
    f.write(exported.serialize())
  meta = {'input_shape': ['batch', size, size, 3], 'input_dtype': 'float32',
          'input': f'RGB normalised with {module.spec.normalization!r}: '
                   '(x - mean) / std of 0..255 pixels',
          'mean': options.NORMALIZATIONS[module.spec.normalization][0],
          'std': options.NORMALIZATIONS[module.spec.normalization][1],
          'output': 'logits', 'num_classes': module.num_classes,
          'model': module.spec.name, 'platforms': list(exported.platforms),
          'load': 'jax.export.deserialize(bytearray(open(path, "rb").read())).call(x)'}
  meta_path = os.path.join(out, 'model.json')
  with open(meta_path, 'w') as f:
    json.dump(meta, f, indent=1)
  return model_path, meta_path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m efficientnet_jax.export',
                                   description=__doc__.split('\n')[0])
  weights_load.add_weights_args(parser)
  parser.add_argument('--format', choices=FORMATS, default='savedmodel')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--image_size', type=int, default=None,
                      help="network input size; default the variant's eval resolution")
  parser.add_argument('--input_size', type=int, default=None,
                      help='SavedModel: fix the uint8 input to this H = W (default any size)')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    module, variables, notes = weights_load.load_weights_from_args(args)
    for note in notes:
      print(f'note: {note}', file=sys.stderr)
    prep = eval_presets.for_weights(module.spec, args.weights, args.origin, config=args.config,
                                    image_size=args.image_size)
    if args.format == 'stablehlo':
      paths = export_stablehlo(module, variables, args.out, image_size=args.image_size)
    else:
      saved = args.out if args.format == 'savedmodel' else os.path.join(args.out, 'savedmodel')
      paths = [export_savedmodel(module, variables, saved, prep=prep,
                                 input_size=args.input_size)]
      if args.format == 'tflite':
        paths.append(export_tflite(saved, os.path.join(args.out, 'model.tflite')))
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for path in paths:
    print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
