"""Range checks of the training config, before anything is built or written.

`build_experiment` (and so `train.run`) calls `check_config` first, so a bad
value fails in milliseconds with one line naming the field and what is
accepted, instead of as a NaN, a silent fallback or a traceback from deep in
XLA, tf.data or orbax an hour later. Checks that need the model or the data
(batch versus dataset size, device divisibility, progressive stages) stay
where that knowledge is.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from efficientnet_jax.model import blocks
from efficientnet_jax.model import kernels
from efficientnet_jax import optim
from efficientnet_jax import cpu_tuning
from efficientnet_jax import state_layout
from efficientnet_jax.data import augment

DTYPES = ('float32', 'bfloat16')
SHARDINGS = ('replicate', 'fsdp')
PROCESS_SHARDINGS = ('files', 'batch')


def set_fields(config, overrides: Mapping[str, Any]):
  """Sets dotted fields in place, e.g. {'data.augment': 'none'}; an unknown field is an error naming it."""
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for i, part in enumerate(path):
      if part not in node:
        raise ValueError(f'override {key!r}: config has no field {".".join(path[:i + 1])!r}')
      node = node[part]
    if leaf not in node:
      raise ValueError(f'override {key!r}: config has no field {key!r}')
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


def _has(config, field: str) -> bool:
  node = config
  for part in field.split('.'):
    if part not in node:
      return False
    node = node[part]
  return True


def check_config(config) -> None:
  """Raises ValueError('field=value; accepted: ...') for the first out-of-range field."""
  _one_of(config, 'dtype', DTYPES)
  _one_of(config, 'model.padding', blocks.PADDINGS)
  _one_of(config, 'model.depthwise', kernels.DEPTHWISE_IMPLS)
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
  _positive(config, 'batch_size')
  _positive(config, 'eval_batch_size')
  _positive(config, 'train_steps', default=-1)
  if _get(config, 'train_steps') == -1:  # the length comes from num_epochs
    _positive(config, 'num_epochs')
  _positive(config, 'num_classes', default=-1)
  _positive(config, 'image_size', default=-1)
  _positive(config, 'eval_image_size', default=-1)

  _one_of(config, 'data.augment', augment.AUGMENT_NAMES)
  if config.data.name == 'folder' and not config.data.folder:
    _fail('data.folder', config.data.folder,
          "the root directory of the image folders (data.name='folder')")
  _at_least(config, 'data.randaug_layers', 0)
  _at_least(config, 'data.randaug_magnitude', 0)
  _at_least(config, 'data.mixup_alpha', 0)
  _at_least(config, 'data.cutmix_alpha', 0)
  _at_least(config, 'data.crop_padding', 0)
  _positive(config, 'data.shuffle_buffer')
  if _has(config, 'data.process_sharding'):
    _one_of(config, 'data.process_sharding', PROCESS_SHARDINGS)

  _positive(config, 'log_every_steps')
  _positive(config, 'eval_every_steps', default=-1)
  _positive(config, 'checkpoint_every_steps')
  _positive(config, 'keep_checkpoints')
  if _has(config, 'sharding'):
    _one_of(config, 'sharding', SHARDINGS)
  if _has(config, 'state_layout'):  # 'flat' with a sharded state: state_layout.resolve
    _one_of(config, 'state_layout', state_layout.LAYOUTS)
  if _has(config, 'cpu_train_opt_level'):  # the check train.py's step would make, up front
    cpu_tuning.train_compiler_options('cpu', _get(config, 'cpu_train_opt_level'))
  if _has(config, 'mesh_model'):  # dividing the device count: sharding.make_mesh
    value = _get(config, 'mesh_model')
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      _fail('mesh_model', value, 'a positive integer dividing the device count')
