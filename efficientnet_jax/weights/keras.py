"""Imports `keras.applications` EfficientNet weights into our flax variables.

Covers V1 B0–B7 and V2 B0–B3/S/M/L as Keras 3 builds them. The source is a
Keras model object, a `.keras` file, a full-model `.h5` file, or a weights-only
`.h5` / `.weights.h5` file (loaded into `keras_model_for(name)`).

Variables are matched by Keras layer name, never by position:

| ours (flax path)                  | Keras layer                               |
|-----------------------------------|-------------------------------------------|
| stem_conv, stem_bn                | stem_conv, stem_bn                        |
| block_{i}/expand_conv, expand_bn  | block{s}{r}_expand_conv, _expand_bn       |
| block_{i}/dw_conv, dw_bn          | block{s}{r}_dwconv (V1) / _dwconv2 (V2), _bn |
| block_{i}/se/reduce, se/expand    | block{s}{r}_se_reduce, _se_expand         |
| block_{i}/project_conv, project_bn| block{s}{r}_project_conv, _project_bn     |
| fused, expand≠1: fused_conv/_bn   | block{s}{r}_expand_conv, _expand_bn       |
| fused, expand=1: fused_conv/_bn   | block{s}{r}_project_conv, _project_bn     |
| head_conv, head_bn, classifier    | top_conv, top_bn, predictions             |

`i` is our global block index; Keras names the same block by its 1-based stage
`s` and a letter `r` for the repeat within the stage (block2b = stage 2,
second repeat). BatchNorm gamma/beta/moving_mean/moving_variance become
scale/bias (params) and mean/var (batch_stats). Keras stores depthwise kernels
as (k, k, C, 1); ours are flax's grouped layout (k, k, 1, C).

Input normalisation. Keras EfficientNets normalise inside the model; ours takes
already-normalised input (`ModelSpec.normalization`, applied by
`data/preprocessing.py`). The Keras layers before `stem_conv` therefore have no
counterpart in our variables and are skipped (listed in
`ImportReport.preprocessing`). With x the 0..255 RGB input and ImageNet
mean = (0.485, 0.456, 0.406), std = (0.229, 0.224, 0.225):

- V1 B0–B7, weights='imagenet': Rescaling(1/255), Normalization, Rescaling(1/√std);
  computes (x/255 − mean)/std; ours 'v1'.
- V1 B0–B7, weights=None or a file: Rescaling(1/255), Normalization with its
  stored state; see below.
- V2 B0–B3: Rescaling(1/255), Normalization(mean, std²); computes
  (x/255 − mean)/std; ours 'v1'.
- V2 S/M/L: Rescaling(1/128, offset=−1); computes x/128 − 1; ours 'v2'.
- include_preprocessing=False (V2): none; computes x.

Our 'v1' is (x − 255·mean)/(255·std) = (x/255 − mean)/std and 'v2' is
(x − 128)/128 = x/128 − 1, so the ImageNet weights of every listed Keras model
are used with our spec's own normalisation. The V1 ImageNet `.h5` files store
std (not std²) as the Normalization variance, so the Normalization layer alone
gives (x/255 − mean)/√std; Keras appends Rescaling(1/√std) only when built
with weights='imagenet' (tensorflow/tensorflow#49930). A V1 model built with
weights=None has an un-adapted Normalization (mean 0, variance 1: x/255), and
one that loads a file afterwards keeps the file's uncorrected state. Neither
changes what the imported conv/BN weights expect, which is our 'v1'.
`keras_input_normalization` measures what a given Keras model actually does,
and `preprocessing_model` returns it as a Keras sub-model, so a parity test
can feed our model exactly the tensor that Keras' first conv sees.

Padding. Keras V1 pads stride-2 convs with `correct_pad` + 'valid' and V2
uses 'same'; both equal TF SAME, our default `padding='same'`, for every
static input size. (A V1 Keras model built with input_shape=(None, None, 3)
assumes even sizes and pads (0, 1) for 3x3 even on odd inputs, where TF SAME
and we pad (1, 1); the weights are the same, only that Keras graph differs.)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import flax.traverse_util
import keras
import numpy as np

from efficientnet_jax.data import options
from efficientnet_jax.model import architectures
from efficientnet_jax.model.architectures import Block, ModelSpec
from efficientnet_jax.model import EfficientNet, create_model
from efficientnet_jax.weights.report import (ImportReport, Missing, finish,
                                             match_variables, natural_key, variable_template)

# Our variant name -> keras.applications constructor.
KERAS_APPLICATIONS: dict[str, str] = {
    **{f'b{i}': f'EfficientNetB{i}' for i in range(8)},
    **{f'v2_b{i}': f'EfficientNetV2B{i}' for i in range(4)},
    'v2_s': 'EfficientNetV2S',
    'v2_m': 'EfficientNetV2M',
    'v2_l': 'EfficientNetV2L',
}

# The default Keras model names (`Model.name`), used to infer our variant.
_KERAS_MODEL_NAMES: dict[str, str] = {
    **{f'efficientnetb{i}': f'b{i}' for i in range(8)},
    **{f'efficientnetv2-b{i}': f'v2_b{i}' for i in range(4)},
    'efficientnetv2-s': 'v2_s',
    'efficientnetv2-m': 'v2_m',
    'efficientnetv2-l': 'v2_l',
}

# Our input normalisations as (mean, std) in 0..255 units, and the identity.
_OUR_NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    **options.NORMALIZATIONS, 'identity': ((0.0,) * 3, (1.0,) * 3)}

# Layer types that make up Keras' built-in input preprocessing.
_PREPROCESSING_LAYERS = (keras.layers.Rescaling, keras.layers.Normalization)
# The first layers after the preprocessing (V1 pads before its stem conv).
_STEM_LAYERS = ('stem_conv_pad', 'stem_conv')

_TOP_LEVEL = {'stem_conv': 'stem_conv', 'stem_bn': 'stem_bn', 'head_conv': 'top_conv',
              'head_bn': 'top_bn', 'classifier': 'predictions'}
_BN_LEAVES = {'scale': 'gamma', 'bias': 'beta', 'mean': 'moving_mean',
              'var': 'moving_variance'}


def keras_model_for(name: str, *, resolution: int | None = None, include_top: bool = True,
                    classes: int = 1000, classifier_activation: str | None = None,
                    **kwargs: Any) -> keras.Model:
  """Builds the `keras.applications` EfficientNet matching our variant `name`.

  Args:
    name: our variant name ('b0'..'b7', 'v2_b0'..'v2_b3', 'v2_s', 'v2_m', 'v2_l';
      'efficientnet-b0' style aliases work too).
    resolution: square input size; None keeps Keras' default size for the model.
    include_top: keep the classifier ('predictions').
    classes: classifier outputs.
    classifier_activation: None (the default here) returns logits, which is
      what our model returns; Keras' own default is 'softmax'.
    **kwargs: forwarded to the constructor (e.g. include_preprocessing for V2).
      `weights` defaults to None: nothing is downloaded unless asked for.

  Returns:
    The uncompiled Keras model.
  """
  key = architectures.get_spec(name).name
  if key not in KERAS_APPLICATIONS:
    raise ValueError(f'keras.applications has no EfficientNet {name!r}; available: '
                     f'{", ".join(KERAS_APPLICATIONS)}')
  kwargs.setdefault('weights', None)
  if resolution is not None:
    kwargs['input_shape'] = (resolution, resolution, 3)
  constructor = getattr(keras.applications, KERAS_APPLICATIONS[key])
  return constructor(include_top=include_top, classes=classes,
                     classifier_activation=classifier_activation, **kwargs)


def our_name_for(keras_model: keras.Model) -> str | None:
  """Our variant name for a Keras model with its default name, else None."""
  return _KERAS_MODEL_NAMES.get(keras_model.name)


def _is_full_model_h5(path: str) -> bool:
  import h5py  # keras depends on h5py; only needed for this check
  with h5py.File(path, 'r') as f:
    return 'model_config' in f.attrs


def load_keras_model(path: str | os.PathLike, name: str | None = None,
                     **keras_kwargs: Any) -> keras.Model:
  """Loads a Keras EfficientNet from a file.

  Args:
    path: a `.keras` file or a full-model `.h5`, loaded as they are; or a
      weights-only `.h5` / `.weights.h5` (e.g. the released keras.applications
      files), loaded into `keras_model_for(name, **keras_kwargs)`.
    name: our variant name; needed only for weights-only files.
    **keras_kwargs: forwarded to `keras_model_for` for weights-only files
      (e.g. include_top=False for a notop file).

  Returns:
    The Keras model.
  """
  path = os.fspath(path)
  if path.endswith('.keras'):
    return keras.models.load_model(path, compile=False)
  if path.endswith(('.h5', '.hdf5')):
    if not path.endswith('.weights.h5') and _is_full_model_h5(path):
      return keras.models.load_model(path, compile=False)
    if name is None:
      raise ValueError(f'{path} holds weights only; pass the variant name (e.g. '
                       f"name='b0') so the matching Keras model can be built.")
    model = keras_model_for(name, **keras_kwargs)
    model.load_weights(path)
    return model
  raise ValueError(f'{path}: expected a .keras, .h5 or .weights.h5 file.')


def _leaf_layers(model: keras.Model):
  """All non-model layers, descending into nested models (a user's wrapper)."""
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      yield from _leaf_layers(layer)
    else:
      yield layer


def keras_weights(keras_model: keras.Model) -> tuple[dict[str, np.ndarray], list[str]]:
  """The model's variables as {'layer_name/variable': array}.

  Returns:
    (weights, preprocessing): the variables of every layer except the
    Rescaling/Normalization input preprocessing, and the keys of those skipped.
  """
  weights, preprocessing = {}, []
  for layer in _leaf_layers(keras_model):
    for variable in layer.weights:
      key = f'{layer.name}/{variable.name}'
      if isinstance(layer, _PREPROCESSING_LAYERS):
        preprocessing.append(key)
        continue
      if key in weights:
        raise ValueError(f'Keras variable {key!r} occurs twice; layer names must be unique.')
      # Variable.numpy(): np.array() on a TF variable warns under numpy 2.
      weights[key] = np.asarray(variable.numpy())
  return weights, preprocessing


def preprocessing_model(keras_model: keras.Model) -> keras.Model:
  """The Keras sub-model from the input to the output of its last preprocessing layer.

  Its output is exactly what Keras' stem conv sees (before V1's stem padding),
  i.e. what our model must be fed. A model without preprocessing layers
  (V2 with include_preprocessing=False) gives an identity model.
  """
  last = None
  for layer in keras_model.layers:
    if layer.name in _STEM_LAYERS:
      break
    if isinstance(layer, _PREPROCESSING_LAYERS):
      last = layer
  inputs = keras_model.input
  outputs = keras.layers.Identity()(inputs) if last is None else last.output
  return keras.Model(inputs, outputs, name=f'{keras_model.name}_preprocessing')


@dataclasses.dataclass(frozen=True)
class KerasNormalization:
  """The per-channel affine map y = scale·x + offset of a Keras model's preprocessing.

  Attributes:
    scale: (3,) multipliers for 0..255 input.
    offset: (3,) additive terms.
    matches: the name of our normalisation it equals ('v1', 'v2', 'lite',
      'identity'), or None.
  """
  scale: np.ndarray
  offset: np.ndarray
  matches: str | None

  def __str__(self) -> str:
    mean = np.round(-self.offset / self.scale, 3) + 0.0  # + 0.0 turns -0.0 into 0.0
    std = np.round(1.0 / self.scale, 3)
    what = f"our '{self.matches}'" if self.matches else 'none of ours'
    return f'(x - {mean.tolist()}) / {std.tolist()} [{what}]'


def keras_input_normalization(keras_model: keras.Model) -> KerasNormalization:
  """Measures the affine input normalisation Keras applies before its stem conv.

  Probes `preprocessing_model` with an all-0 and an all-255 image, so it reports
  what the layers actually compute with their current state (for example the
  un-adapted Normalization of a V1 model built with weights=None).
  """
  pre = preprocessing_model(keras_model)
  height, width = (d or 1 for d in keras_model.input.shape[1:3])
  probe = np.zeros((2, height, width, 3), np.float32)
  probe[1] = 255.0
  out = keras.ops.convert_to_numpy(pre(probe, training=False)).astype(np.float64)
  offset = out[0, 0, 0]
  scale = (out[1, 0, 0] - offset) / 255.0
  matches = None
  for name, (mean, std) in _OUR_NORMALIZATIONS.items():
    ours_scale = 1.0 / np.asarray(std)
    ours_offset = -np.asarray(mean) / np.asarray(std)
    if (np.allclose(scale, ours_scale, rtol=1e-5, atol=1e-7)
        and np.allclose(offset, ours_offset, rtol=1e-5, atol=1e-6)):
      matches = name
      break
  return KerasNormalization(scale, offset, matches)


def _missing_group(item: Missing) -> str:
  """'block_1 (Keras block1b_*)': missing variables come in whole blocks."""
  module = item.ours.split('/')[1]
  layer = item.source.split('/')[0] if item.source else None
  if module.startswith('block_') and layer:
    layer = layer[:layer.index('_') + 1] + '*'  # 'block1b_*'
  return f'{module} (Keras {layer or "-"})'


def _keras_block_prefixes(blocks: tuple[Block, ...]) -> list[str]:
  """Keras' name prefix for each of our blocks: 'block{stage+1}{letter}_'."""
  prefixes, seen = [], {}
  for block in blocks:
    repeat = seen.get(block.stage, 0)
    seen[block.stage] = repeat + 1
    prefixes.append(f'block{block.stage + 1}{chr(ord("a") + repeat)}_')
  return prefixes


def _block_layer(block: Block, submodule: str, family: str) -> str | None:
  """Keras' layer suffix for one of our block submodules ('se/reduce', 'dw_bn', ...)."""
  if not block.fused:
    table = {'expand_conv': 'expand_conv', 'expand_bn': 'expand_bn',
             # Keras V2 renamed the MBConv depthwise conv.
             'dw_conv': 'dwconv2' if family == 'v2' else 'dwconv', 'dw_bn': 'bn',
             'se/reduce': 'se_reduce', 'se/expand': 'se_expand',
             'project_conv': 'project_conv', 'project_bn': 'project_bn'}
  elif block.expand != 1:
    table = {'fused_conv': 'expand_conv', 'fused_bn': 'expand_bn',
             'project_conv': 'project_conv', 'project_bn': 'project_bn'}
  else:
    # Keras calls the single KxK conv of an expand-1 fused block its project conv.
    table = {'fused_conv': 'project_conv', 'fused_bn': 'project_bn'}
  return table.get(submodule)


def _keras_key(path: tuple[str, ...], spec: ModelSpec, blocks: tuple[Block, ...],
               prefixes: list[str]) -> str | None:
  """The Keras variable key for one of our variable paths (collection first)."""
  modules, leaf = path[1:-1], path[-1]
  if not modules:
    return None
  top = modules[0]
  if top in _TOP_LEVEL and len(modules) == 1:
    layer = _TOP_LEVEL[top]
  elif top.startswith('block_'):
    index = int(top[len('block_'):])
    if index >= len(blocks):
      return None
    suffix = _block_layer(blocks[index], '/'.join(modules[1:]), spec.family)
    if suffix is None:
      return None
    layer = prefixes[index] + suffix
  else:
    return None
  if modules[-1].endswith('_bn'):
    if leaf not in _BN_LEAVES:
      return None
    leaf = _BN_LEAVES[leaf]
  return f'{layer}/{leaf}'


def _resolve_target(target: str | ModelSpec | EfficientNet | None,
                    keras_model: keras.Model) -> EfficientNet:
  if isinstance(target, EfficientNet):
    return target
  if target is None:
    target = our_name_for(keras_model)
    if target is None:
      raise ValueError(f'cannot tell our variant from the Keras model name '
                       f'{keras_model.name!r}; pass target= (e.g. "b0").')
  # Match the Keras head: its class count, or no classifier at all.
  head = next((l for l in _leaf_layers(keras_model) if l.name == 'predictions'), None)
  if head is None:
    return create_model(target, include_top=False)
  return create_model(target, num_classes=int(head.units))


def _variable_template(module: EfficientNet) -> dict[str, Any]:
  """Nested shapes and dtypes of the module's variables, without computing any values."""
  return flax.traverse_util.unflatten_dict(variable_template(module))


def import_keras(source: keras.Model | str | os.PathLike,
                 target: str | ModelSpec | EfficientNet | None = None, *,
                 allow_partial: bool = False,
                 base_variables: Mapping[str, Any] | None = None,
                 ) -> tuple[dict[str, Any], ImportReport]:
  """Converts Keras EfficientNet weights into our {'params', 'batch_stats'}.

  Args:
    source: a Keras model, or a file path (see `load_keras_model`; a
      weights-only file needs `target` as a name or module).
    target: our module, a ModelSpec or a variant name. None infers the variant
      from the Keras model name. For a name or spec, the classifier follows the
      Keras model (its class count, or none when Keras has no 'predictions').
    allow_partial: return what matched instead of raising when variables are
      missing, unexpected or of another shape.
    base_variables: variables of the target model (e.g. a fresh `init`); the
      imported values overwrite them, so a partial import is still complete.
      Without it a partial import returns only the filled variables.

  Returns:
    (variables, report): nested dicts of float32 numpy arrays with our tree
    layout, and an `ImportReport`. The variables expect inputs normalised as
    the module docstring describes (our `spec.normalization`), not raw pixels.

  Raises:
    ValueError: if anything is missing, unexpected or mis-shaped and not
      `allow_partial`; the message lists them.
  """
  if isinstance(source, keras.Model):
    keras_model = source
  else:
    spec = target.spec if isinstance(target, EfficientNet) else target
    keras_model = load_keras_model(
        source, name=spec.name if isinstance(spec, ModelSpec) else spec)
  module = _resolve_target(target, keras_model)
  spec = module.spec
  blocks = spec.blocks()
  prefixes = _keras_block_prefixes(blocks)

  weights, preprocessing = keras_weights(keras_model)
  report = ImportReport(preprocessing=preprocessing, source='Keras',
                        missing_group=_missing_group, spec=spec,
                        model_kwargs={'num_classes': module.num_classes,
                                      'include_top': module.include_top})

  def transform(path, value):
    if path[-2] == 'dw_conv' and value.ndim == 4:
      return value.transpose(0, 1, 3, 2)  # Keras (k, k, C, 1) -> flax (k, k, 1, C)
    return value

  template = variable_template(module)
  filled, used = match_variables(
      template, weights, lambda path: _keras_key(path, spec, blocks, prefixes), transform,
      report)
  report.unexpected = sorted(set(weights) - used, key=natural_key)

  report.normalization = keras_input_normalization(keras_model)
  if report.normalization.matches != spec.normalization:
    report.notes.append(
        f'Keras preprocesses inputs as {report.normalization}; these weights are used '
        f"with our '{spec.normalization}' normalisation on the input (module docstring).")
  epsilons = {float(l.epsilon) for l in _leaf_layers(keras_model)
              if isinstance(l, keras.layers.BatchNormalization)}
  if epsilons and epsilons != {spec.bn_epsilon}:
    report.notes.append(f'Keras BatchNorm epsilon {sorted(epsilons)} differs from ours '
                        f'{spec.bn_epsilon}.')

  variables = finish(filled, report,
                     what=f'Keras model {keras_model.name!r} does not match our {spec.name!r}',
                     allow_partial=allow_partial, base_variables=base_variables)
  return variables, report
