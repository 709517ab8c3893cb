"""What a run derives from its (checked) config before it touches a workdir.

`build_experiment` turns a config into the model, the data spec, the stage
plan and the optimizer, with no side effects: `train.run`, `state.load_checkpoint`
and the tools that inspect a run all build the same `Experiment`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from efficientnet_jax import bn_groups
from efficientnet_jax import finetune
from efficientnet_jax import optim
from efficientnet_jax import progressive
from efficientnet_jax import state_layout
from efficientnet_jax.data.spec import DataSpec
from efficientnet_jax.model import architectures
from efficientnet_jax.model import EfficientNet, create_model

# config.dtype -> compute dtype; params, BN statistics and the loss stay fp32.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass
class Experiment:
  """Everything `run` derives from the config before touching the workdir."""
  spec: architectures.ModelSpec
  model: EfficientNet
  data: DataSpec
  num_classes: int
  image_size: int
  eval_image_size: int
  steps_per_epoch: int
  total_steps: int
  schedule: Any
  tx: Any
  plan: progressive.StagePlan
  layout: str  # of the optimizer state and EMA: 'flat' or 'per_leaf' (state_layout.py)
  make_tx: Any  # flat: bool -> the optimizer for that layout (`tx` is this run's)
  frozen_batch_stats: Any  # bool tree like batch_stats (True: kept fixed), or None


def data_spec_from_config(cfg) -> DataSpec:
  return DataSpec(name=cfg.name, data_dir=cfg.data_dir or None,
                  manual_dir=cfg.manual_dir or None, folder=cfg.folder or None,
                  source_dir=cfg.source_dir or None, train_split=cfg.train_split,
                  eval_split=cfg.eval_split)


def build_experiment(config, device_count: int | None = None) -> Experiment:
  """Builds model, data spec, stage plan and optimizer of a checked config.

  No side effects; the config must have passed `config_lib.check`.
  `device_count` (default: all devices) is the data-parallel replica count:
  every stage's global batch is a multiple of it, and BN statistics groups
  (`bn_groups.py`) are made of its replicas. Reads the dataset's sizes (tfds metadata, no images).
  """
  from efficientnet_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  spec = architectures.spec_from_config(config.model)
  data = data_spec_from_config(config.data)
  info = input_pipeline.dataset_info(data)
  num_classes = config.num_classes if config.num_classes > 0 else info['num_classes']
  replicas = device_count or jax.device_count()
  for field in ('depthwise', 'conv'):
    if config.model[field] == 'dnnl' and replicas > 1:  # 'auto' makes the same choice
      raise ValueError(f"model.{field}='dnnl' serves one CPU device (its jax.ffi call has no "
                       f"sharding rule) and this run has {replicas}; accepted here: auto, "
                       "or the pure-JAX kernels")
  model = create_model(spec, num_classes=num_classes, dtype=DTYPES[config.dtype],
                       padding=config.model.padding, depthwise_impl=config.model.depthwise,
                       conv_impl=config.model.conv,
                       remat=config.model.remat, scan_blocks=config.model.scan_blocks,
                       bn_groups=bn_groups.bn_group_count(config.bn_group_size, spec.family,
                                                          replicas))
  image_size = config.image_size if config.image_size > 0 else spec.resolution
  eval_image_size = (config.eval_image_size if config.eval_image_size > 0
                     else spec.eval_resolution)
  steps_per_epoch = info['num_train'] // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'batch_size={config.batch_size} exceeds the {info["num_train"]} '
                     'training examples')
  total_steps = (config.train_steps if config.train_steps > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  plan = progressive.build_plan(
      config, model_name=config.model.name, model_dropout=spec.dropout,
      image_size=image_size, num_train=info['num_train'], steps_per_epoch=steps_per_epoch,
      total_steps=total_steps, device_count=replicas)
  schedule = make_schedule(config, plan, steps_per_epoch, total_steps)
  frozen = _frozen_masks(config, model, spec, image_size)
  make_tx = functools.partial(_make_tx, config, schedule, frozen and frozen['params'],
                              exclude_bias=spec.family == 'v2')
  layout = state_layout.resolve(config.state_layout, sharding=config.sharding,
                                mesh_model=config.mesh_model)
  return Experiment(spec, model, data, num_classes, image_size, eval_image_size,
                    steps_per_epoch, plan.total_steps, schedule, make_tx(layout == 'flat'),
                    plan, layout, make_tx, frozen and frozen['batch_stats'])


def make_schedule(config, plan: progressive.StagePlan, steps_per_epoch: int, total_steps: int):
  """The LR schedule; with per-stage batches, warmup and decay follow epochs."""

  def for_batch(batch_size, epoch_steps):
    return optim.learning_rate_schedule(
        base_lr=config.base_lr, global_batch_size=batch_size, steps_per_epoch=epoch_steps,
        schedule=config.lr_schedule, warmup_epochs=config.warmup_epochs,
        decay_epochs=config.lr_decay_epochs, decay_rate=config.lr_decay_rate,
        total_steps=round(total_steps / steps_per_epoch * epoch_steps))

  if plan.batch_sizes_vary():  # peak LR ∝ each stage's batch
    return progressive.staged_schedule(plan, for_batch)
  return for_batch(config.batch_size, steps_per_epoch)


def _frozen_masks(config, model: EfficientNet, spec, image_size: int) -> dict | None:
  """{'params', 'batch_stats'} bool trees of the stem + first `freeze_blocks` blocks."""
  if not config.freeze_blocks:
    return None
  shapes = jax.eval_shape(
      lambda key: model.init(key, jnp.zeros((1, image_size, image_size, 3)), train=False),
      jax.random.key(0))
  return {name: finetune.freeze_mask(shapes[name], spec, config.freeze_blocks)
          for name in ('params', 'batch_stats')}


def _make_tx(config, schedule, frozen_params, flat: bool, *, exclude_bias: bool):
  """The configured optimizer for one state layout; frozen leaves get zero updates."""
  tx = optim.make_optimizer(
      name=config.optimizer, learning_rate=schedule, weight_decay=config.weight_decay,
      # V2 excludes biases and BN from decay, V1 only BN
      weight_decay_mask=functools.partial(optim.weight_decay_mask,
                                          exclude_bias_and_bn_scale=exclude_bias),
      momentum=config.momentum, rmsprop_decay=config.rmsprop_decay,
      rmsprop_eps=config.rmsprop_eps, flat=flat)
  return finetune.freeze(tx, frozen_params) if frozen_params is not None else tx
