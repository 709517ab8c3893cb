"""The resolved training recipe of a config, for `python train.py --dry_run [--json]`.

`describe(config, device_count)` builds everything a run derives from the
config that needs neither data nor a compile (the network spec, the parameter
shapes, the stage plan, the learning-rate schedule, the weight-decay mask, the
batch-norm groups) and returns it as one JSON-able dict; `format_text` prints
it for people. Split sizes come from `data/splits.py`, not from reading TFDS, and
nothing here imports TensorFlow or touches the workdir, so a dry run takes
seconds and shows the whole recipe before an hour of data preparation or
compilation.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from efficientnet_jax import bn_groups
from efficientnet_jax import config_lib
from efficientnet_jax import experiment
from efficientnet_jax import model_table
from efficientnet_jax import optim
from efficientnet_jax import progressive
from efficientnet_jax.data import options
from efficientnet_jax.data import splits
from efficientnet_jax.model import architectures
from efficientnet_jax.model import create_model


def _augmentation(data, stage: progressive.Stage) -> dict:
  """What the stage's augmentation applies, with its pixel constants at the stage's size."""
  name = data.augment
  out: dict[str, Any] = {'name': name}
  if name == 'none':
    return out
  if name == 'autoaugment':
    out.update(policy='v0', magnitude=None)  # each op has its level in the policy table
  else:
    out.update(layers=int(data.randaug_layers), magnitude=stage.randaug_magnitude)
  translate, cutout = options.pixel_constants(name, stage.image_size, data.aug_pixel_constants)
  out.update(pixel_constants=data.aug_pixel_constants, translate_const=translate,
             cutout_const=cutout)
  # Official-bug switches (posterize_quirk, contrast_quirk, ...; data/augment.py).
  out.update(sorted((k, v) for k, v in data.items() if k.endswith('_quirk')))
  return out


def _eval_crop(data, size: int) -> dict:
  """The eval centre crop at `size`: config.data.crop 'v1' always, 'v2' only below 320 px."""
  if data.crop == 'v2' and size >= options.V2_EVAL_CROP_BELOW:
    return {'kind': 'none', 'rule': data.crop, 'note': 'whole image resized (squashed)'}
  padding = int(data.crop_padding)
  return {'kind': 'centre', 'rule': data.crop, 'crop_padding': padding,
          'fraction': size / (size + padding)}


def _train_crop(data) -> dict:
  if data.inception_crop:
    crop = options.TRAIN_CROPS[data.crop]
    on_failure = 'eval centre crop' if crop['fallback_to_eval_crop'] else 'whole image'
    return {'kind': 'inception', 'rule': data.crop, 'on_failure': on_failure,
            **{k: crop[k] for k in ('area_range', 'aspect_ratio_range', 'min_object_covered',
                                    'max_attempts')}}
  return {'kind': 'none', 'note': 'whole image resized'}


def _split(dataset: str, split: str) -> dict:
  named = splits.preset(dataset, split)
  return {'name': split, 'tfds_split': splits.tfds_split(dataset, split),
          'num_examples': splits.num_examples(dataset, split),
          'official': named.official if named else None}


def _param_shapes(spec, num_classes: int):
  model = create_model(spec, num_classes=num_classes)
  return jax.eval_shape(
      lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False),
      jax.random.key(0))['params']


def _decay_mask_summary(params, family: str) -> dict:
  """Counts of decayed and excluded params, and which kinds the rule excludes."""
  exclude = family == 'v2'  # as experiment.build_experiment: V2 skips biases too
  mask = optim.weight_decay_mask(params, exclude_bias_and_bn_scale=exclude)
  not_bn = optim.weight_decay_mask(params)  # the V1 rule excludes exactly the BN leaves
  counts = {'decayed_leaves': 0, 'decayed_params': 0, 'excluded_leaves': 0,
            'excluded_params': 0}
  kinds: dict[str, int] = {}

  def visit(path, leaf, keep, outside_bn):
    size = int(np.prod(leaf.shape))
    side = 'decayed' if keep else 'excluded'
    counts[f'{side}_leaves'] += 1
    counts[f'{side}_params'] += size
    if not keep:
      name = str(getattr(path[-1], 'key', path[-1]))
      kind = name if outside_bn else f'bn_{name}'
      kinds[kind] = kinds.get(kind, 0) + size

  jax.tree_util.tree_map_with_path(visit, params, mask, not_bn)
  rule = ('V2 (google/automl): no decay on .*(bias|gamma|beta).*' if exclude
          else 'V1 (tensorflow/tpu): no decay on batch_normalization variables')
  return {'rule': rule, **counts, 'excluded_kinds': dict(sorted(kinds.items()))}


def _schedule_summary(config, schedule, steps_per_epoch: int, total_steps: int) -> dict:
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  points = sorted({0, max(warmup_steps - 1, 0), warmup_steps, total_steps - 1})
  lrs = [float(v) for v in jax.device_get(schedule(jnp.asarray(points)))]
  out = {'name': config.lr_schedule, 'base_lr_per_256': config.base_lr,
         'peak_lr': config.base_lr * config.batch_size / 256,
         'warmup_epochs': config.warmup_epochs, 'warmup_steps': warmup_steps,
         'lr_at_step': {str(p): lr for p, lr in zip(points, lrs)}}
  if config.lr_schedule == 'exponential':
    out.update(decay_epochs=config.lr_decay_epochs, decay_rate=config.lr_decay_rate,
               decay_steps=int(config.lr_decay_epochs * steps_per_epoch))
  return out


def _stage(config, stage: progressive.Stage, spec, replicas: int, group: int) -> dict:
  if stage.batch_size % replicas:
    raise ValueError(f'stage {stage.index} batch_size={stage.batch_size} is not a multiple '
                     f'of the {replicas} data-parallel devices')
  data = config.data
  return {
      'index': stage.index, 'start_step': stage.start_step, 'end_step': stage.end_step,
      'steps': stage.num_steps, 'start_epoch': stage.start_epoch,
      'epochs': stage.num_steps / stage.steps_per_epoch, 'image_size': stage.image_size,
      'batch_size': stage.batch_size, 'peak_lr': config.base_lr * stage.batch_size / 256,
      'augment': _augmentation(data, stage), 'mixup_alpha': stage.mixup_alpha,
      'cutmix_alpha': stage.cutmix_alpha,
      'dropout': spec.dropout if stage.dropout is None else stage.dropout,
      'resize': data.resize, 'crop': _train_crop(data),
      'bn_examples_per_group': stage.batch_size // replicas * group,
  }


def describe(config, device_count: int) -> dict:
  """The resolved recipe of `config` on `device_count` devices, as a JSON-able dict.

  Args:
    config: a training config (configs/*.py).
    device_count: devices the run would use; the batch splits over
      device_count // mesh_model data-parallel replicas.

  Returns:
    Keys: model, devices, splits, batch_size, steps_per_epoch, total_steps,
    num_epochs, progressive, stages (one dict per stage, each with
    image_size, batch_size, peak_lr, augment, mixup/cutmix, dropout, resize,
    crop), eval, optimizer, schedule, weight_decay_mask, ema, bn.

  Raises:
    ValueError: anything the run would refuse that is known without data
      (an unknown model, split size, progressive field, batch divisibility).
  """
  spec = architectures.spec_from_config(config.model)
  dataset = config.data.name
  train_split = _split(dataset, config.data.train_split)
  eval_split = _split(dataset, config.data.eval_split)
  num_classes = (config.num_classes if config.num_classes > 0
                 else splits.NUM_CLASSES.get(dataset, 0))
  if num_classes <= 0:
    raise ValueError(f'num_classes={config.num_classes}: set it (dataset {dataset!r} has no '
                     'class count known without reading the data)')
  num_train = train_split['num_examples']
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'batch_size={config.batch_size} exceeds the {num_train} training examples')
  total_steps = (config.train_steps if config.train_steps > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  mesh_model = config.mesh_model
  if mesh_model < 1 or device_count % mesh_model:
    raise ValueError(f'mesh_model={mesh_model}; accepted: a divisor of the device count '
                     f'{device_count}')
  replicas = device_count // mesh_model
  image_size = config.image_size if config.image_size > 0 else spec.resolution
  plan = progressive.build_plan(
      config, model_name=config.model.name, model_dropout=spec.dropout,
      image_size=image_size, num_train=num_train, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps, device_count=replicas)
  group = bn_groups.resolve_bn_group_size(config.bn_group_size, spec.family, replicas)
  # The run's own schedule (experiment.build_experiment), not a copy of it.
  schedule = experiment.make_schedule(
      config, plan, steps_per_epoch, total_steps)
  params = _param_shapes(spec, num_classes)
  return {
      'model': _model(config, spec, params, num_classes, plan),
      'devices': {'device_count': device_count, 'mesh_model': mesh_model,
                  'data_parallel_replicas': replicas},
      'splits': {'dataset': dataset, 'train': train_split, 'eval': eval_split},
      'batch_size': config.batch_size, 'steps_per_epoch': steps_per_epoch,
      'total_steps': plan.total_steps, 'num_epochs': plan.epoch_at(plan.total_steps),
      'progressive': {'preset': plan.preset, 'num_stages': len(plan.stages)},
      'stages': [_stage(config, s, spec, replicas, group) for s in plan.stages],
      'eval': _eval(config, spec),
      'optimizer': _optimizer(config),
      'schedule': _schedule_summary(config, schedule, steps_per_epoch, plan.total_steps),
      'weight_decay_mask': _decay_mask_summary(params, spec.family),
      'ema': {'decay': config.ema_decay, 'warmup': 'min(decay, (1 + step) / (10 + step))',
              'averages': 'params and batch_stats'},
      'bn': {'momentum': spec.bn_momentum, 'epsilon': spec.bn_epsilon,
             'group_size_config': config.bn_group_size, 'group_size': group,
             'num_groups': replicas // group, 'replicas': replicas},
  }


def _model(config, spec, params, num_classes: int, plan: progressive.StagePlan) -> dict:
  final = plan.stages[-1].image_size
  return {
      'name': spec.name, 'family': spec.family, 'phi': config.model.phi,
      'width': spec.width, 'depth': spec.depth, 'resolution': spec.resolution,
      'eval_resolution': spec.eval_resolution, 'dropout': spec.dropout,
      'drop_connect': spec.drop_connect, 'activation': spec.activation,
      'normalization': spec.normalization, 'num_classes': num_classes,
      'dtype': config.dtype, 'init_from': config.init_from,
      'params': int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params))),
      'macs_train': model_table.count_macs(spec, final, num_classes),
      'macs_eval': model_table.count_macs(spec, _eval_size(config, spec), num_classes),
  }


def _eval_size(config, spec) -> int:
  return config.eval_image_size if config.eval_image_size > 0 else spec.eval_resolution


def _eval(config, spec) -> dict:
  size = _eval_size(config, spec)
  return {'image_size': size, 'batch_size': config.eval_batch_size,
          'crop': _eval_crop(config.data, size), 'resize': config.data.resize,
          'normalization': spec.normalization, 'weights': 'EMA and raw'}


def _optimizer(config) -> dict:
  out = {'name': config.optimizer, 'momentum': config.momentum,
         'weight_decay': config.weight_decay, 'label_smoothing': config.label_smoothing,
         'freeze_blocks': config.freeze_blocks}
  if config.optimizer == 'rmsprop':
    out.update(rmsprop_decay=config.rmsprop_decay, rmsprop_eps=config.rmsprop_eps,
               semantics='TF1: ms starts at 1, eps inside the sqrt, coupled L2')
  return out


def _augment_text(aug: dict) -> str:
  if aug['name'] == 'none':
    return 'no augmentation'
  head = ('autoaugment policy v0' if aug['name'] == 'autoaugment'
          else f'randaugment N={aug["layers"]} M={aug["magnitude"]:g}')
  quirks = ''.join(f', {k}={v}' for k, v in aug.items() if k.endswith('_quirk'))
  return (f'{head} (translate {aug["translate_const"]:g} px, cutout {aug["cutout_const"]:g} px, '
          f'{aug["pixel_constants"]}{quirks})')


def _crop_text(crop: dict) -> str:
  if crop['kind'] == 'inception':
    (low, high), (a, b) = crop['area_range'], crop['aspect_ratio_range']
    return (f'{crop["rule"]} inception crop (area {low:g}-{high:g}, aspect {a:.4g}-{b:.4g}, '
            f'min_object_covered {crop["min_object_covered"]:g})')
  if crop['kind'] == 'centre':
    return (f'centre crop size/(size+{crop["crop_padding"]}) = {crop["fraction"]:.4f} of the '
            f'short side ({crop["rule"]})')
  return crop['note']


def _stage_text(s: dict) -> str:
  return (f'  stage {s["index"]}: steps {s["start_step"]}-{s["end_step"]} '
          f'({s["epochs"]:.2f} epochs) at {s["image_size"]} px, batch {s["batch_size"]}, '
          f'peak LR {s["peak_lr"]:.4g}, {_augment_text(s["augment"])}, '
          f'mixup {s["mixup_alpha"]:.4g}, cutmix {s["cutmix_alpha"]:.4g}, '
          f'dropout {s["dropout"]:g}, resize {s["resize"]}, {_crop_text(s["crop"])}, '
          f'BN over {s["bn_examples_per_group"]} examples')


def _split_text(split: dict) -> str:
  via = f' = {split["tfds_split"]}' if split['tfds_split'] != split['name'] else ''
  return f'{split["name"]}{via} ({split["num_examples"]:,})'


def format_text(desc: dict) -> str:
  """`describe`'s dict as a page of text, one topic a line (stages one a line)."""
  m, sched, wd, bn = desc['model'], desc['schedule'], desc['weight_decay_mask'], desc['bn']
  ev, opt, sp = desc['eval'], desc['optimizer'], desc['splits']
  lines = [
      f'model      {m["name"]} ({m["family"]}, phi {m["phi"]:g}): width {m["width"]:g}, '
      f'depth {m["depth"]:g}, resolution {m["resolution"]} (eval {m["eval_resolution"]}), '
      f'dropout {m["dropout"]:g}, drop_connect {m["drop_connect"]:g}, {m["activation"]}, '
      f'inputs {m["normalization"]}, {m["dtype"]}',
      f'           {m["params"]:,} params, {m["macs_train"] / 1e9:.3f} GMACs at the last '
      f'train size, {m["macs_eval"] / 1e9:.3f} at eval; {m["num_classes"]} classes'
      + (f'; initialised from {m["init_from"]}' if m['init_from'] else ''),
      f'devices    {desc["devices"]["device_count"]} ({desc["devices"]["data_parallel_replicas"]}'
      f' data-parallel, mesh_model {desc["devices"]["mesh_model"]})',
      f'splits     {sp["dataset"]}: train {_split_text(sp["train"])}, '
      f'eval {_split_text(sp["eval"])}',
      f'batch      global {desc["batch_size"]}, {desc["steps_per_epoch"]} steps/epoch, '
      f'{desc["total_steps"]:,} steps = {desc["num_epochs"]:.2f} epochs',
      f'stages     {len(desc["stages"])} (progressive preset '
      f'{desc["progressive"]["preset"] or "off"})',
      *[_stage_text(s) for s in desc['stages']],
      f'eval       {ev["image_size"]} px, {_crop_text(ev["crop"])}, resize {ev["resize"]}, '
      f'batch {ev["batch_size"]}, {ev["weights"]} weights',
      f'optimizer  {opt["name"]} momentum {opt["momentum"]:g}'
      + (f', decay {opt["rmsprop_decay"]:g}, eps {opt["rmsprop_eps"]:g} ({opt["semantics"]})'
         if opt['name'] == 'rmsprop' else '')
      + f', weight decay {opt["weight_decay"]:g}, label smoothing {opt["label_smoothing"]:g}',
      f'schedule   {sched["name"]}: {sched["base_lr_per_256"]:g} per 256 -> peak '
      f'{sched["peak_lr"]:.4g}, warmup {sched["warmup_epochs"]:g} epochs '
      f'({sched["warmup_steps"]} steps)'
      + (f', x{sched["decay_rate"]:g} every {sched["decay_epochs"]:g} epochs '
         f'({sched["decay_steps"]} steps)' if 'decay_steps' in sched else '')
      + '; LR at step ' + ', '.join(f'{k}: {v:.4g}' for k, v in sched['lr_at_step'].items()),
      f'wd mask    {wd["rule"]}: {wd["decayed_params"]:,} params decayed '
      f'({wd["decayed_leaves"]} arrays), {wd["excluded_params"]:,} excluded '
      f'({wd["excluded_leaves"]} arrays: '
      + ', '.join(f'{k} {v:,}' for k, v in wd['excluded_kinds'].items()) + ')',
      f'ema        decay {desc["ema"]["decay"]:g}, warmed up as {desc["ema"]["warmup"]}, '
      f'over {desc["ema"]["averages"]}',
      f'bn         momentum {bn["momentum"]:g}, eps {bn["epsilon"]:g}, statistics over groups '
      f'of {bn["group_size"]} replica(s) ({bn["num_groups"]} groups; bn_group_size='
      f'{bn["group_size_config"]})',
  ]
  return '\n'.join(lines)


def dry_run(config, *, as_json: bool = False, device_count: int | None = None) -> int:
  """Prints the recipe (text, or one JSON object) and returns the exit status.

  Reads no data, compiles nothing and creates no files. `device_count`
  defaults to the devices this process sees.

  Returns:
    0, or 2 after printing `error: ...` to stderr for a config the run would
    refuse.
  """
  logging.set_verbosity(logging.WARNING)  # jax's backend probing logs at INFO
  try:
    config_lib.check(config)
    desc = describe(config, device_count or jax.device_count())
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(desc, indent=1) if as_json else format_text(desc), flush=True)
  return 0
