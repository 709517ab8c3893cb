"""The training config: load it from a file, set dotted fields, check it once.

`check` runs before anything is built or written, so a bad value fails in
milliseconds with one line naming the field and what is accepted, instead of
as a NaN, a silent fallback or a traceback from deep in XLA, tf.data or orbax
an hour later. Each list of accepted values belongs to the module that uses
it; checks that need the model or the data (batch versus dataset size, device
divisibility, progressive stages) stay where that knowledge is.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import difflib
import importlib.util
import json
import os

from efficientnet_jax import checkpointing
from efficientnet_jax import cpu_tuning
from efficientnet_jax import experiment
from efficientnet_jax import optim
from efficientnet_jax import sharding
from efficientnet_jax import state_layout
from efficientnet_jax.data import options
from efficientnet_jax.model import blocks
from efficientnet_jax.model import kernels


def load(spec: str):
  """`path/to/config.py[:arg]` -> the ConfigDict its get_config(arg) returns.

  The convention of ml_collections' --config flag, without absl flags, so the
  argparse CLIs take a training config too.
  """
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'--config={spec!r}: no such file {path!r}')
  module_spec = importlib.util.spec_from_file_location('_efficientnet_config', path)
  config_module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(config_module)
  return config_module.get_config(arg or None)


def saved_path(workdir: str) -> str:
  """Where `save` writes a run's config: `<workdir>/config.json`."""
  return os.path.join(workdir, 'config.json')


def save(config, workdir: str) -> None:
  """Writes the run's config as JSON (for `load_saved`, and for people reading the workdir)."""
  with open(saved_path(workdir), 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))


def load_saved(workdir: str):
  """The ConfigDict `save` wrote in `workdir` (train.py saves it when it starts).

  JSON has no tuples, so lists are read back as tuples, the configs' sequence type.
  """
  path = saved_path(workdir)
  if not os.path.isfile(path):
    raise ValueError(f'{workdir} has no config.json (train.py saves one when it starts); '
                     'pass the --config it was trained with')
  import ml_collections  # pylint: disable=g-import-not-at-top  (not in every runtime image)
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(_lists_to_tuples(json.load(f)))


def _lists_to_tuples(value):
  if isinstance(value, dict):
    return {key: _lists_to_tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_lists_to_tuples(item) for item in value)
  return value


def unknown_field_message(config, key: str) -> str:
  """'unknown config field 'batch_sise'; did you mean 'batch_size'?' for a dotted key."""
  *path, leaf = key.split('.')
  node, known = config, []
  for part in path:
    if part not in node or not hasattr(node[part], 'keys'):
      break
    node, known = node[part], known + [part]
  else:
    names = list(node.keys())
    close = difflib.get_close_matches(leaf, names, n=1)
    hint = f"; did you mean '{'.'.join(known + close)}'?" if close else ''
    return f"unknown config field '{key}'{hint}"
  names = [k for k in node.keys() if hasattr(node[k], 'keys')]
  close = difflib.get_close_matches(path[len(known)], names, n=1)
  rest = path[len(known) + 1:] + [leaf]
  hint = f"; did you mean '{'.'.join(known + close + rest)}'?" if close else ''
  return f"unknown config field '{key}'{hint}"


def set_fields(config, overrides: Mapping[str, Any]):
  """Sets dotted fields in place, e.g. {'data.augment': 'none'}.

  An unknown field is an error naming it (and the closest known one).
  """
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for part in path:
      if part not in node:
        raise ValueError(unknown_field_message(config, key))
      node = node[part]
    if leaf not in node:
      raise ValueError(unknown_field_message(config, key))
    node[leaf] = value
  return config


def _fail(field: str, value, accepted: str):
  raise ValueError(f'{field}={value!r}; accepted: {accepted}')


def _number(field: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    _fail(field, value, 'a finite number')
  return value


def _positive(config, field: str, *, default: float | None = None) -> None:
  """> 0, or exactly `default` (the sentinel meaning 'not set')."""
  value = _number(field, _get(config, field))
  if value > 0 or (default is not None and value == default):
    return
  _fail(field, value, '> 0' + (f', or {default:g} (default)' if default is not None else ''))


def _at_least(config, field: str, low: float, *, default: float | None = None) -> None:
  value = _number(field, _get(config, field))
  if value >= low or (default is not None and value == default):
    return
  _fail(field, value, f'>= {low:g}' + (f', or {default:g} (default)' if default is not None
                                        else ''))


def _unit_interval(config, field: str) -> None:
  """[0, 1): decays, smoothing and momenta (1 would freeze or flatten everything)."""
  value = _number(field, _get(config, field))
  if not 0 <= value < 1:
    _fail(field, value, 'a number in [0, 1)')


def _one_of(config, field: str, accepted) -> None:
  value = _get(config, field)
  if value not in accepted:
    _fail(field, value, ', '.join(accepted))


def _get(config, field: str):
  node = config
  for part in field.split('.'):
    node = node[part]
  return node


def check(config) -> None:
  """Raises ValueError('field=value; accepted: ...') for the first out-of-range field."""
  _check_model_and_optimizer(config)
  _check_data(config)
  _check_loop(config)


def _check_model_and_optimizer(config) -> None:
  _one_of(config, 'dtype', tuple(experiment.DTYPES))
  _one_of(config, 'model.padding', blocks.PADDINGS)
  _one_of(config, 'model.depthwise', kernels.DEPTHWISE_IMPLS)
  _one_of(config, 'model.conv', kernels.CONV_IMPLS)
  for field in ('model.width', 'model.depth', 'model.resolution'):
    _positive(config, field, default=-1)
  _one_of(config, 'optimizer', optim.OPTIMIZERS)
  _one_of(config, 'lr_schedule', optim.SCHEDULES)
  _positive(config, 'base_lr')
  _at_least(config, 'warmup_epochs', 0)
  _at_least(config, 'weight_decay', 0)
  _unit_interval(config, 'label_smoothing')
  _unit_interval(config, 'ema_decay')
  _unit_interval(config, 'momentum')
  _unit_interval(config, 'rmsprop_decay')
  _positive(config, 'rmsprop_eps')
  _at_least(config, 'freeze_blocks', 0)
  bn_group_size = _get(config, 'bn_group_size')
  if isinstance(bn_group_size, bool) or not isinstance(bn_group_size, int) or bn_group_size < -1:
    _fail('bn_group_size', bn_group_size,
          'replicas per BN group (a positive integer), 0 (global batch) or -1 (official rule)')


def _check_data(config) -> None:
  _one_of(config, 'data.augment', options.AUGMENT_NAMES)
  # The official-parity switches of the input ops (data/preprocessing, augment).
  _one_of(config, 'data.crop', options.CROPS)
  _one_of(config, 'data.resize', options.RESIZE_METHODS)
  _one_of(config, 'data.aug_pixel_constants', options.PIXEL_CONSTANT_MODES)
  for field in ('data.posterize_quirk', 'data.contrast_quirk', 'data.solarize_quirk'):
    if not isinstance(_get(config, field), bool):
      _fail(field, _get(config, field), 'True, False')
  if config.data.name == 'folder' and not config.data.folder:
    _fail('data.folder', config.data.folder,
          "the root directory of the image folders (data.name='folder')")
  _at_least(config, 'data.randaug_layers', 0)
  _at_least(config, 'data.randaug_magnitude', 0)
  _at_least(config, 'data.mixup_alpha', 0)
  _at_least(config, 'data.cutmix_alpha', 0)
  _at_least(config, 'data.crop_padding', 0)
  _positive(config, 'data.shuffle_buffer')
  _one_of(config, 'data.process_sharding', options.PROCESS_SHARDINGS)


def _check_loop(config) -> None:
  _positive(config, 'batch_size')
  _positive(config, 'eval_batch_size')
  _positive(config, 'train_steps', default=-1)
  if _get(config, 'train_steps') == -1:  # the length comes from num_epochs
    _positive(config, 'num_epochs')
  _positive(config, 'num_classes', default=-1)
  _positive(config, 'image_size', default=-1)
  _positive(config, 'eval_image_size', default=-1)
  _positive(config, 'log_every_steps')
  _positive(config, 'eval_every_steps', default=-1)
  _positive(config, 'checkpoint_every_steps')
  _positive(config, 'keep_checkpoints')
  _one_of(config, 'corrupt_checkpoint', checkpointing.ON_CORRUPT)
  _at_least(config, 'peer_failure_timeout_s', 1)  # JAX takes whole seconds
  _one_of(config, 'sharding', sharding.MODES)
  # 'flat' with a sharded state is refused by state_layout.resolve
  _one_of(config, 'state_layout', state_layout.LAYOUTS)
  # the check the train step's compile would make, up front
  cpu_tuning.train_compiler_options('cpu', _get(config, 'cpu_train_opt_level'))
  value = _get(config, 'mesh_model')  # dividing the device count: sharding.make_mesh
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    _fail('mesh_model', value, 'a positive integer dividing the device count')
