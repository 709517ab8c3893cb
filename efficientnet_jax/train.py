"""Training: the train state, the jitted train/eval steps, and `run(config, workdir)`.

`run` reads top to bottom: mesh -> data -> model -> optimizer -> restore or
sharded init -> loop (log, eval, checkpoint) -> final eval. The steps are
top-level pure functions with their static parts bound by functools.partial,
so tests call them directly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp

from efficientnet_jax import architectures
from efficientnet_jax import checkpointing
from efficientnet_jax import optim
from efficientnet_jax import sharding
from efficientnet_jax.data import augment
from efficientnet_jax.data import input_pipeline
from efficientnet_jax.data.sources import DataSpec
from efficientnet_jax.metric_writer import MetricWriter
from efficientnet_jax.model import EfficientNet, create_model

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def create_train_state(key, *, model: EfficientNet, tx, image_size: int) -> dict:
  """Params, BN statistics, optimizer state, EMA (of params and BN stats) and step."""
  variables = model.init({'params': key}, jnp.zeros((1, image_size, image_size, 3)),
                         train=False)
  params, batch_stats = variables['params'], variables['batch_stats']
  return dict(params=params, batch_stats=batch_stats, opt_state=tx.init(params),
              ema=dict(params=params, batch_stats=batch_stats),
              step=jnp.zeros((), jnp.int32))


def train_step(state: dict, batch: dict, key, *, model: EfficientNet, tx,
               ema_decay: float, label_smoothing: float):
  """One optimizer step: (state, batch, key) -> (state, metrics). Jitted by the caller.

  batch['label'] holds (possibly mixed) one-hot targets. The coupled L2 weight
  decay lives in `tx`, so the reported loss is the cross-entropy alone.
  """
  key = jax.random.fold_in(key, state['step'])  # per-step RNG; nothing to checkpoint

  def loss_fn(params):
    logits, updated = model.apply(
        {'params': params, 'batch_stats': state['batch_stats']}, batch['image'],
        train=True, mutable=['batch_stats'], rngs={'dropout': key})
    loss = optim.cross_entropy_loss(logits, batch['label'], label_smoothing)
    return loss, (updated['batch_stats'], logits)

  (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = jax.tree.map(lambda p, u: p + u, state['params'], updates)
  step = state['step'] + 1
  ema = optim.update_ema(state['ema'], {'params': params, 'batch_stats': batch_stats},
                         step, ema_decay)
  top1 = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch['label'], -1))
  new_state = dict(params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema,
                   step=step)
  return new_state, {'loss': loss, 'top1': top1}


def eval_step(variables: dict, batch: dict, *, model: EfficientNet) -> dict:
  """Sums over the real (mask=True) rows: loss, top-1 and top-5 hits, count."""
  logits = model.apply(variables, batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  labels = batch['label']
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  loss = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  top5 = jnp.any(jax.lax.top_k(logits, min(5, logits.shape[-1]))[1] == labels[:, None], -1)
  return {'loss': jnp.sum(loss * mask),
          'top1': jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
          'top5': jnp.sum(top5 * mask),
          'count': jnp.sum(mask)}


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


def data_spec_from_config(cfg) -> DataSpec:
  return DataSpec(name=cfg.name, data_dir=cfg.data_dir or None,
                  manual_dir=cfg.manual_dir or None, folder=cfg.folder or None,
                  source_dir=cfg.source_dir or None, train_split=cfg.train_split,
                  eval_split=cfg.eval_split)


def build_experiment(config) -> Experiment:
  """Validates the config and builds model, data spec and optimizer (no side effects)."""
  if config.dtype not in DTYPES:
    raise ValueError(f'dtype={config.dtype!r}; accepted: {", ".join(DTYPES)}')
  spec = architectures.spec_from_config(config.model)
  data = data_spec_from_config(config.data)
  info = input_pipeline.dataset_info(data)
  num_classes = config.num_classes if config.num_classes > 0 else info['num_classes']
  model = create_model(spec, num_classes=num_classes, dtype=DTYPES[config.dtype],
                       padding=config.model.padding, depthwise_impl=config.model.depthwise)
  image_size = config.image_size if config.image_size > 0 else spec.resolution
  eval_image_size = (config.eval_image_size if config.eval_image_size > 0
                     else spec.eval_resolution)
  steps_per_epoch = info['num_train'] // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'batch_size={config.batch_size} exceeds the {info["num_train"]} '
                     'training examples')
  total_steps = (config.train_steps if config.train_steps > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  schedule = optim.learning_rate_schedule(
      base_lr=config.base_lr, global_batch_size=config.batch_size,
      steps_per_epoch=steps_per_epoch, schedule=config.lr_schedule,
      warmup_epochs=config.warmup_epochs, decay_epochs=config.lr_decay_epochs,
      decay_rate=config.lr_decay_rate, total_steps=total_steps)
  exclude = spec.family == 'v2'  # V2 excludes biases and BN from decay, V1 only BN
  tx = optim.make_optimizer(
      name=config.optimizer, learning_rate=schedule, weight_decay=config.weight_decay,
      weight_decay_mask=functools.partial(optim.weight_decay_mask,
                                          exclude_bias_and_bn_scale=exclude),
      momentum=config.momentum, rmsprop_decay=config.rmsprop_decay,
      rmsprop_eps=config.rmsprop_eps)
  augment.check_augment_name(config.data.augment)
  return Experiment(spec, model, data, num_classes, image_size, eval_image_size,
                    steps_per_epoch, total_steps, schedule, tx)


def _architecture_meta(exp: Experiment) -> dict:
  return {'model': exp.spec.name, 'num_classes': exp.num_classes,
          'blocks': len(exp.spec.blocks()), 'width': exp.spec.width, 'depth': exp.spec.depth}


def check_workdir_matches(manager, exp: Experiment, workdir: str) -> None:
  """Refuses to resume a checkpoint of another network (before anything is written)."""
  step = checkpointing.latest_step(manager)
  if step is None:
    return
  saved = checkpointing.read_meta(manager, step)
  want = _architecture_meta(exp)
  diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
  if diff:
    detail = ', '.join(f'{k}: checkpoint {a!r} vs config {b!r}' for k, (a, b) in diff.items())
    raise ValueError(f'workdir {workdir} holds a checkpoint (step {step}) of a different '
                     f'model ({detail}); use another --workdir')


def evaluate(eval_fn, variables_by_name: dict, exp: Experiment, config, mesh) -> dict:
  """Top-1/top-5/loss over the whole eval split for each variable set (EMA, raw)."""
  totals = {name: None for name in variables_by_name}
  batches = input_pipeline.make_eval_iterator(
      exp.data, image_size=exp.eval_image_size,
      batch_size=config.eval_batch_size // jax.process_count(),
      normalization=exp.spec.normalization, crop_padding=config.data.crop_padding,
      process_index=jax.process_index(), process_count=jax.process_count())
  batch_sharding = sharding.batch_sharding(mesh)
  for host_batch in batches:
    batch = sharding.to_global(host_batch, batch_sharding)
    for name, variables in variables_by_name.items():
      sums = eval_fn(variables, batch)
      totals[name] = sums if totals[name] is None else jax.tree.map(
          jnp.add, totals[name], sums)
  out = {}
  for name, sums in totals.items():
    sums = jax.device_get(sums)
    count = max(float(sums['count']), 1.0)
    out[name] = {'loss': float(sums['loss']) / count, 'top1': float(sums['top1']) / count,
                 'top5': float(sums['top5']) / count, 'count': int(sums['count'])}
  return out


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some test runners)
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def run(config, workdir: str) -> dict:
  """Trains (or resumes) the configured model in `workdir`; returns the final eval metrics."""
  workdir = os.path.abspath(workdir)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, field='eval_batch_size')
  exp = build_experiment(config)
  replicated = sharding.replicated(mesh)
  batch_sharding = sharding.batch_sharding(mesh)

  manager = checkpointing.make_checkpoint_manager(
      workdir, max_to_keep=config.keep_checkpoints,
      save_interval_steps=config.checkpoint_every_steps)
  check_workdir_matches(manager, exp, workdir)
  meta = _architecture_meta(exp)

  key = jax.random.key(config.seed)
  init_key, train_key = jax.random.split(key)
  init_fn = functools.partial(create_train_state, model=exp.model, tx=exp.tx,
                              image_size=exp.image_size)
  abstract = jax.eval_shape(init_fn, init_key)
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
  start_step = checkpointing.latest_step(manager)
  if start_step is not None:
    state, _ = checkpointing.restore(manager, abstract, start_step)
    print(f'resumed from {workdir}/checkpoints at step {start_step}', flush=True)
  else:
    start_step = 0
    state = jax.jit(init_fn, out_shardings=replicated)(init_key)

  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  writer = MetricWriter(workdir)

  step_fn = jax.jit(
      functools.partial(train_step, model=exp.model, tx=exp.tx, ema_decay=config.ema_decay,
                        label_smoothing=config.label_smoothing),
      in_shardings=(replicated, batch_sharding, replicated),
      out_shardings=(replicated, replicated), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model=exp.model),
                    in_shardings=(replicated, batch_sharding), out_shardings=replicated)
  train_key = jax.device_put(train_key, replicated)

  process_batch = config.batch_size // jax.process_count()
  train_batches = input_pipeline.make_train_iterator(
      exp.data, image_size=exp.image_size, batch_size=process_batch, seed=config.seed,
      normalization=exp.spec.normalization, augment=config.data.augment,
      randaug_layers=config.data.randaug_layers,
      randaug_magnitude=config.data.randaug_magnitude, mixup_alpha=config.data.mixup_alpha,
      cutmix_alpha=config.data.cutmix_alpha, num_classes=exp.num_classes,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count(), shuffle_buffer=config.data.shuffle_buffer,
      inception_crop=config.data.inception_crop)

  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else exp.steps_per_epoch
  print(f'training {exp.spec.name} ({exp.num_classes} classes) at {exp.image_size}px, '
        f'batch {config.batch_size} on {jax.device_count()} devices, steps '
        f'{start_step}->{exp.total_steps} ({exp.steps_per_epoch}/epoch)', flush=True)

  def do_eval(step, state):
    results = evaluate(eval_fn, {'ema': state['ema'], 'raw': {
        'params': state['params'], 'batch_stats': state['batch_stats']}}, exp, config, mesh)
    record = {'step': step, 'split': 'eval', 'epoch': step / exp.steps_per_epoch,
              'image_size': exp.eval_image_size}
    for name, r in results.items():
      prefix = '' if name == 'ema' else 'raw_'
      record.update({f'{prefix}{k}': v for k, v in r.items()})
    writer.write(record)
    print(f'eval step {step}: top1 {record["top1"]:.4f} top5 {record["top5"]:.4f} (EMA), '
          f'raw top1 {record["raw_top1"]:.4f}, {record["count"]} examples', flush=True)
    return record

  last_eval = None
  pending = None  # (step, metrics) fetched one step late so logging never blocks dispatch
  last_log_step, last_log_time = start_step, time.time()
  step = start_step
  with _Preemption() as preemption:
    while step < exp.total_steps:
      if preemption.requested:
        checkpointing.save(manager, step, state, meta=meta, force=True)
        checkpointing.wait(manager)
        print(f'SIGTERM: saved step {step} and stopped', flush=True)
        writer.close()
        return {'preempted_at': step}
      batch = sharding.to_global(next(train_batches), batch_sharding)
      state, metrics = step_fn(state, batch, train_key)
      step += 1
      if pending is not None:
        _log_train(writer, pending, exp, config, last_log_step, last_log_time)
        last_log_step, last_log_time = pending[0], pending[2]
        pending = None
      if step % config.log_every_steps == 0 or step == exp.total_steps:
        pending = (step, metrics, time.time())
      if step % eval_every == 0 or step == exp.total_steps:
        if pending is not None:
          _log_train(writer, pending, exp, config, last_log_step, last_log_time)
          last_log_step, last_log_time, pending = pending[0], pending[2], None
        last_eval = do_eval(step, state)
        checkpointing.save(manager, step, state, meta=meta,
                           metrics={'eval/top1': last_eval['top1']}, force=True)
      elif step % config.checkpoint_every_steps == 0:
        checkpointing.save(manager, step, state, meta=meta)
  if pending is not None:
    _log_train(writer, pending, exp, config, last_log_step, last_log_time)
  checkpointing.wait(manager)
  if last_eval is None:
    last_eval = do_eval(step, state)
  writer.close()
  return last_eval


def _log_train(writer, pending, exp, config, last_step, last_time):
  step, metrics, now = pending
  metrics = jax.device_get(metrics)
  loss = float(metrics['loss'])
  if not math.isfinite(loss):
    raise FloatingPointError(f'non-finite training loss {loss} between steps {last_step} and '
                             f'{step}; the last checkpoint before step {last_step} is kept')
  images_per_sec = (step - last_step) * config.batch_size / max(now - last_time, 1e-9)
  record = {'step': step, 'split': 'train', 'epoch': step / exp.steps_per_epoch,
            'loss': loss, 'top1': float(metrics['top1']),
            'lr': float(exp.schedule(step - 1)), 'images_per_sec': images_per_sec}
  writer.write(record)
  eta = (exp.total_steps - step) * config.batch_size / max(images_per_sec, 1e-9)
  print(f'step {step}/{exp.total_steps} epoch {record["epoch"]:.2f} loss {loss:.4f} '
        f'top1 {record["top1"]:.3f} lr {record["lr"]:.5f} {images_per_sec:.1f} img/s '
        f'ETA {_format_eta(eta)}', flush=True)


def load_checkpoint(config, workdir: str, step: int | None = None, mesh=None):
  """(experiment, state, step) of a workdir's newest (or given) checkpoint, placed on `mesh`."""
  mesh = mesh or sharding.make_mesh()
  exp = build_experiment(config)
  manager = checkpointing.make_checkpoint_manager(os.path.abspath(workdir), async_save=False)
  step = checkpointing.latest_step(manager) if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {os.path.abspath(workdir)}/checkpoints')
  check_workdir_matches(manager, exp, workdir)
  replicated = sharding.replicated(mesh)
  init_fn = functools.partial(create_train_state, model=exp.model, tx=exp.tx,
                              image_size=exp.image_size)
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
      jax.eval_shape(init_fn, jax.random.key(0)))
  state, _ = checkpointing.restore(manager, abstract, step)
  return exp, state, step
