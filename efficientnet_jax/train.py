"""Training: the train state, the jitted train/eval steps, and `run(config, workdir)`.

`run` reads top to bottom: mesh -> data -> model -> optimizer -> restore or
sharded init -> loop over stages (log, eval, checkpoint) -> final eval. The
steps are top-level pure functions with their static parts bound by
functools.partial, so tests call them directly.

Every run walks a stage plan (`progressive.py`): one stage for a plain run,
several for EfficientNetV2 progressive learning. Each stage has its own input
pipeline (image size, RandAugment, mixup/cutmix) and its own train step (its
image shape and dropout); the next stage is prepared and compiled on a worker
thread while the current one trains (`train_loop.StagePreparer`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp

from efficientnet_jax.model import architectures
from efficientnet_jax import checkpointing
from efficientnet_jax import finetune
from efficientnet_jax import config_checks
from efficientnet_jax import cpu_tuning
from efficientnet_jax import optim
from efficientnet_jax import progressive
from efficientnet_jax import sharding
from efficientnet_jax import state_layout
from efficientnet_jax import train_loop
from efficientnet_jax.data import augment
from efficientnet_jax.data import input_pipeline
from efficientnet_jax.data.sources import DataSpec
from efficientnet_jax.metric_writer import MetricWriter
from efficientnet_jax.model import EfficientNet, create_model

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def create_train_state(key, *, model: EfficientNet, tx, image_size: int,
                       layout: str = 'per_leaf') -> dict:
  """Params, BN statistics, optimizer state, EMA (of params and BN stats) and step.

  `layout` ('per_leaf' or 'flat', state_layout.py) is the EMA's; `tx` must be
  made for the same one (`optim.make_optimizer(flat=...)`).
  """
  variables = model.init({'params': key}, jnp.zeros((1, image_size, image_size, 3)),
                         train=False)
  params, batch_stats = variables['params'], variables['batch_stats']
  return dict(params=params, batch_stats=batch_stats, opt_state=tx.init(params),
              ema=state_layout.init_ema(params, batch_stats, layout),
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
  ema = optim.update_ema(state['ema'], state_layout.ema_target(params, batch_stats, state['ema']),
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
  plan: progressive.StagePlan
  layout: str  # of the optimizer state and EMA: 'flat' or 'per_leaf' (state_layout.py)
  make_tx: Any  # flat: bool -> the optimizer for that layout (`tx` is this run's)


def data_spec_from_config(cfg) -> DataSpec:
  return DataSpec(name=cfg.name, data_dir=cfg.data_dir or None,
                  manual_dir=cfg.manual_dir or None, folder=cfg.folder or None,
                  source_dir=cfg.source_dir or None, train_split=cfg.train_split,
                  eval_split=cfg.eval_split)


def build_experiment(config, device_count: int | None = None) -> Experiment:
  """Validates the config and builds model, data spec, stage plan and optimizer.

  No side effects. `device_count` (default: all devices) is what every stage's
  global batch must be a multiple of.
  """
  config_checks.check_config(config)
  spec = architectures.spec_from_config(config.model)
  data = data_spec_from_config(config.data)
  info = input_pipeline.dataset_info(data)
  num_classes = config.num_classes if config.num_classes > 0 else info['num_classes']
  model = create_model(spec, num_classes=num_classes, dtype=DTYPES[config.dtype],
                       padding=config.model.padding, depthwise_impl=config.model.depthwise,
                       remat=config.model.remat, scan_blocks=config.model.scan_blocks)
  image_size = config.image_size if config.image_size > 0 else spec.resolution
  eval_image_size = (config.eval_image_size if config.eval_image_size > 0
                     else spec.eval_resolution)
  steps_per_epoch = info['num_train'] // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'batch_size={config.batch_size} exceeds the {info["num_train"]} '
                     'training examples')
  total_steps = (config.train_steps if config.train_steps > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  augment.check_augment_name(config.data.augment)
  plan = progressive.build_plan(
      config, model_name=config.model.name, model_dropout=spec.dropout,
      image_size=image_size, num_train=info['num_train'], steps_per_epoch=steps_per_epoch,
      total_steps=total_steps, device_count=device_count or jax.device_count())

  def make_schedule(batch_size, epoch_steps):
    return optim.learning_rate_schedule(
        base_lr=config.base_lr, global_batch_size=batch_size, steps_per_epoch=epoch_steps,
        schedule=config.lr_schedule, warmup_epochs=config.warmup_epochs,
        decay_epochs=config.lr_decay_epochs, decay_rate=config.lr_decay_rate,
        total_steps=round(total_steps / steps_per_epoch * epoch_steps))

  if plan.batch_sizes_vary():  # warmup and decay follow epochs; peak LR ∝ stage batch
    schedule = progressive.staged_schedule(plan, make_schedule)
  else:
    schedule = make_schedule(config.batch_size, steps_per_epoch)
  exclude = spec.family == 'v2'  # V2 excludes biases and BN from decay, V1 only BN
  freeze_blocks = config.get('freeze_blocks', 0)
  if freeze_blocks:  # stem + first K blocks get zero updates (finetune.py)
    shapes = jax.eval_shape(
        lambda key: model.init(key, jnp.zeros((1, image_size, image_size, 3)), train=False),
        jax.random.key(0))
    frozen = finetune.freeze_mask(shapes['params'], spec, freeze_blocks)

  def make_tx(flat: bool):
    tx = optim.make_optimizer(
        name=config.optimizer, learning_rate=schedule, weight_decay=config.weight_decay,
        weight_decay_mask=functools.partial(optim.weight_decay_mask,
                                            exclude_bias_and_bn_scale=exclude),
        momentum=config.momentum, rmsprop_decay=config.rmsprop_decay,
        rmsprop_eps=config.rmsprop_eps, flat=flat)
    return finetune.freeze(tx, frozen) if freeze_blocks else tx

  layout = state_layout.resolve(config.get('state_layout', 'auto'),
                                sharding=config.get('sharding', 'replicate'),
                                mesh_model=config.get('mesh_model', 1))
  return Experiment(spec, model, data, num_classes, image_size, eval_image_size,
                    steps_per_epoch, plan.total_steps, schedule, make_tx(layout == 'flat'),
                    plan, layout, make_tx)


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


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _stage_meta(meta: dict, plan: progressive.StagePlan, step: int) -> dict:
  """Checkpoint meta: the architecture plus the stage a resume at `step` continues."""
  stage = plan.stage_at(step)
  return {**meta, 'stage': stage.index, 'image_size': stage.image_size}


def state_init_fn(exp: Experiment, layout: str):
  """key -> the experiment's fresh train state, in `layout` ('flat' or 'per_leaf')."""
  tx = exp.tx if layout == exp.layout else exp.make_tx(layout == 'flat')
  return functools.partial(create_train_state, model=exp.model, tx=tx,
                           image_size=exp.image_size, layout=layout)


def abstract_state(exp: Experiment, layout: str, mesh, mode: str):
  """The train state's shapes in `layout`, each with its sharding on `mesh` under `mode`."""
  abstract = jax.eval_shape(state_init_fn(exp, layout), jax.random.key(0))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, sharding.state_shardings(abstract, mesh, mode))


def restore_state(manager, step: int, exp: Experiment, abstract, mesh, mode: str):
  """(state, meta) of checkpoint `step`, in this run's layout and shardings (`abstract`).

  A checkpoint saved in the other state layout (another sharding mode) is read
  in its own layout and converted on device (`state_layout.relayout`).
  """
  saved = checkpointing.read_meta(manager, step).get('state_layout',
                                                     state_layout.SAVED_BEFORE_LAYOUTS)
  if saved == exp.layout:
    return checkpointing.restore(manager, abstract, step)
  if saved not in state_layout.LAYOUTS:
    raise ValueError(f'checkpoint step {step} has state_layout={saved!r}; this code knows '
                     f'{", ".join(state_layout.LAYOUTS[1:])}')
  state, meta = checkpointing.restore(manager, abstract_state(exp, saved, mesh, mode), step)
  convert = jax.jit(lambda s: state_layout.relayout(s, abstract),
                    out_shardings=jax.tree.map(lambda a: a.sharding, abstract))
  return convert(state), meta


def run(config, workdir: str, devices=None) -> dict:
  """Trains (or resumes) the configured model in `workdir`; returns the final eval metrics.

  `devices` (default: all) spans the mesh; a checkpoint saved on another
  device count or sharding mode restores onto this one.
  """
  workdir = os.path.abspath(workdir)
  config_checks.check_config(config)  # before the device checks: 'eval_batch_size=0; ...'
  mesh = sharding.make_mesh(devices, model=config.get('mesh_model', 1))
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, field='eval_batch_size')
  exp = build_experiment(config, device_count=mesh.shape['data'])  # the batch splits over `data`
  plan = exp.plan
  for stage in plan.stages:  # adapted per-stage batches are multiples of the data-axis size
    sharding.check_batch_size(stage.batch_size, mesh, field=f'stage {stage.index} batch_size')
  replicated = sharding.replicated(mesh)
  batch_sharding = sharding.batch_sharding(mesh)

  manager = checkpointing.make_checkpoint_manager(
      workdir, max_to_keep=config.keep_checkpoints,
      save_interval_steps=config.checkpoint_every_steps)
  check_workdir_matches(manager, exp, workdir)
  cache_dir = train_loop.enable_compilation_cache(config, workdir)
  # A cache this run creates inside the workdir is removed again if the resume
  # fails: a refused workdir is left exactly as it was.
  new_cache = (cache_dir is not None and cache_dir.startswith(workdir + os.sep)
               and not os.path.exists(cache_dir))
  meta = {**_architecture_meta(exp), 'state_layout': exp.layout}

  # Made by every process as replicated global arrays (a device_put of a local
  # key cannot target other hosts' devices).
  init_key, train_key = jax.jit(
      lambda: tuple(jax.random.split(jax.random.key(config.seed))),
      out_shardings=replicated)()
  init_fn = state_init_fn(exp, exp.layout)
  # Placed by the sharding rules from shapes alone: the state is created on its
  # shards, never whole on one device first.
  mode = config.get('sharding', 'replicate')
  abstract = abstract_state(exp, exp.layout, mesh, mode)
  state_sharding = jax.tree.map(lambda a: a.sharding, abstract)
  variables_sharding = {'params': state_sharding['params'],
                        'batch_stats': state_sharding['batch_stats']}

  def make_step(stage):
    # Dropout is a static attribute of the linen module, so each rate is its own
    # program; the params tree is the same for every stage.
    model = exp.model if stage.dropout is None else exp.model.clone(dropout=stage.dropout)
    return jax.jit(
        functools.partial(train_step, model=model, tx=exp.tx, ema_decay=config.ema_decay,
                          label_smoothing=config.label_smoothing),
        in_shardings=(state_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated), donate_argnums=0,
        compiler_options=cpu_tuning.train_compiler_options(
            mesh.devices.flat[0].platform,
            config.get('cpu_train_opt_level', cpu_tuning.CPU_TRAIN_OPT_LEVEL)))

  def make_batches(stage, begin_step):
    return input_pipeline.make_train_iterator(
        exp.data, image_size=stage.image_size,
        batch_size=stage.batch_size // jax.process_count(), seed=config.seed,
        normalization=exp.spec.normalization, augment=config.data.augment,
        randaug_layers=config.data.randaug_layers,
        randaug_magnitude=stage.randaug_magnitude, mixup_alpha=stage.mixup_alpha,
        cutmix_alpha=stage.cutmix_alpha, num_classes=exp.num_classes,
        start_step=stage.data_step(begin_step), process_index=jax.process_index(),
        process_count=jax.process_count(), shuffle_buffer=config.data.shuffle_buffer,
        inception_crop=config.data.inception_crop,
        process_sharding=config.data.get('process_sharding', 'files'))

  aot = bool(config.get('progressive', {}).get('aot_compile', True))
  preparer = train_loop.StagePreparer(
      make_batches=make_batches, make_step=make_step, batch_sharding=batch_sharding,
      abstract_state=abstract,
      abstract_key=jax.ShapeDtypeStruct(train_key.shape, train_key.dtype, sharding=replicated),
      aot_compile=aot)
  eval_jit = jax.jit(functools.partial(eval_step, model=exp.model),
                     in_shardings=(variables_sharding, batch_sharding),
                     out_shardings=replicated)
  start_step = checkpointing.latest_step(manager)
  if start_step is not None:
    try:
      state, saved = restore_state(manager, start_step, exp, abstract, mesh, mode)
    except Exception:
      if new_cache:
        shutil.rmtree(cache_dir, ignore_errors=True)
      raise
    stage = plan.stage_at(start_step)
    print(f'resumed from {workdir}/checkpoints at step {start_step} (stage {stage.index}, '
          f'{stage.image_size}px)', flush=True)
    if 'stage' in saved and saved['stage'] != stage.index:
      print(f'note: the checkpoint was saved for stage {saved["stage"]}; this config\'s '
            f'schedule puts step {start_step} in stage {stage.index}', flush=True)
  else:
    start_step = 0
    state = jax.jit(init_fn, out_shardings=state_sharding)(init_key)
    if config.get('init_from', ''):  # fine-tuning: pretrained backbone, fresh head
      source, pretrained, _ = finetune.load_pretrained(
          config.init_from, config.get('init_from_model', '') or None,
          config=config.get('init_from_config', '') or None)
      if (source.padding, source.spec.bn_epsilon) != (exp.model.padding, exp.spec.bn_epsilon):
        print(f'note: {config.init_from} was trained with padding={source.padding!r}, '
              f'bn_epsilon={source.spec.bn_epsilon}; this config uses '
              f'{exp.model.padding!r}, {exp.spec.bn_epsilon}', flush=True)
      state, report = finetune.init_state_from(
          jax.device_get(state), pretrained, tx=exp.tx,
          spec=exp.spec if exp.model.scan_blocks else None)
      state = jax.device_put(state, state_sharding)
      print(f'initialised from {config.init_from}:\n{report.summary()}', flush=True)

  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  writer = MetricWriter(workdir)
  logger = train_loop.TrainLogger(writer, plan=plan, schedule=exp.schedule,
                                  log_every=config.log_every_steps, start_step=start_step)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else exp.steps_per_epoch
  sizes = '->'.join(str(s.image_size) for s in plan.stages)
  print(f'training {exp.spec.name} ({exp.num_classes} classes) at {sizes}px '
        f'({len(plan.stages)} stage{"s" * (len(plan.stages) > 1)}), batch {config.batch_size} '
        f'on {mesh.devices.size} devices (mesh {dict(mesh.shape)}), '
        f'steps {start_step}->{exp.total_steps} ({exp.steps_per_epoch}/epoch)', flush=True)

  def do_eval(step, state):
    nonlocal eval_fn
    if not callable(eval_fn):  # the ahead-of-time compile's Future
      eval_fn = eval_fn.result()
    results = evaluate(eval_fn, {'ema': state_layout.ema_variables(state), 'raw': {
        'params': state['params'], 'batch_stats': state['batch_stats']}}, exp, config, mesh)
    record = {'step': step, 'split': 'eval', 'epoch': plan.epoch_at(step),
              'image_size': exp.eval_image_size}
    for name, r in results.items():
      prefix = '' if name == 'ema' else 'raw_'
      record.update({f'{prefix}{k}': v for k, v in r.items()})
    writer.write(record)
    print(f'eval step {step}: top1 {record["top1"]:.4f} top5 {record["top5"]:.4f} (EMA), '
          f'raw top1 {record["raw_top1"]:.4f}, {record["count"]} examples', flush=True)
    return record

  finite_at = start_step  # the last step whose params were checked finite

  def save_checkpoint(step, state, **kwargs):
    # The loss is checked at log steps only, one step late, so a save between
    # two log steps checks the params themselves: a diverged state never
    # replaces the last good checkpoint.
    nonlocal finite_at
    logger.flush()
    if not bool(_all_finite(state['params'])):
      checkpointing.wait(manager)  # the save in flight holds the last good state
      raise FloatingPointError(
          f'non-finite parameters between steps {max(finite_at, logger.last_logged_step)} '
          f'and {step}; not saved, the checkpoint at step '
          f'{checkpointing.latest_step(manager)} is kept')
    finite_at = step
    checkpointing.save(manager, step, state, meta=_stage_meta(meta, plan, step), **kwargs)

  last_eval, eval_fn = None, eval_jit
  step = start_step
  stage_end_time = time.perf_counter()  # a first stage's stall counts from here
  with preparer, train_loop.Preemption() as preemption:
    if step < plan.total_steps:
      next_stage = preparer.submit(plan.stage_at(step), step)
    if preparer.aot_compile:  # queued after the first stage: needed only at the first eval
      eval_fn = preparer.compile(
          eval_jit, {'params': abstract['params'], 'batch_stats': abstract['batch_stats']},
          train_loop.abstract_eval_batch(config.eval_batch_size, exp.eval_image_size,
                                         batch_sharding))
    try:
      while step < plan.total_steps:
        prepared = next_stage.result()
        stage = prepared.stage
        if stage.index + 1 < len(plan.stages):  # compile the next stage while this one trains
          following = plan.stages[stage.index + 1]
          next_stage = preparer.submit(following, following.start_step)
        batch, batches = prepared.first_batch, prepared.batches
        while step < stage.end_step:
          if preemption.requested:
            save_checkpoint(step, state, force=True)
            checkpointing.wait(manager)
            print(f'SIGTERM: saved step {step} and stopped', flush=True)
            writer.close()
            return {'preempted_at': step}
          if batch is None:
            batch = sharding.to_global(next(batches), batch_sharding)
          state, metrics = prepared.step_fn(state, batch, train_key)
          batch = None
          if step == prepared.begin_step:
            # Wall time from the previous stage's last step to this stage's first
            # dispatch: pipeline hand-over plus any compile left to do.
            writer.write(train_loop.stage_start_record(
                prepared, plan=plan, stall_s=time.perf_counter() - stage_end_time,
                aot_compile=preparer.aot_compile))
          step += 1
          logger.after_step(step, metrics, stage.batch_size)
          if step % eval_every == 0 or step == plan.total_steps:
            logger.flush()
            last_eval = do_eval(step, state)
            save_checkpoint(step, state, metrics={'eval/top1': last_eval['top1']}, force=True)
          elif step % config.checkpoint_every_steps == 0:
            save_checkpoint(step, state)
        batches.close()  # frees this stage's tf.data buffers
        jax.block_until_ready(state['step'])
        stage_end_time = time.perf_counter()
    except FloatingPointError:
      # A diverged run stops here; an async save still in flight holds a
      # state checked finite, so it is finished, not abandoned.
      checkpointing.wait(manager)
      raise
    logger.flush()
    checkpointing.wait(manager)
    if last_eval is None:
      last_eval = do_eval(step, state)
  writer.close()
  return last_eval


def load_checkpoint(config, workdir: str, step: int | None = None, mesh=None):
  """(experiment, state, step) of a workdir's newest (or given) checkpoint, placed on `mesh`.

  Laid out by the config's `sharding` / `mesh_model` rules on `mesh` (default:
  all devices), so a model that only fits sharded also loads sharded.
  """
  mesh = mesh or sharding.make_mesh(model=config.get('mesh_model', 1))
  exp = build_experiment(config)
  manager = checkpointing.make_checkpoint_manager(os.path.abspath(workdir), async_save=False)
  step = checkpointing.latest_step(manager) if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {os.path.abspath(workdir)}/checkpoints')
  check_workdir_matches(manager, exp, workdir)
  mode = config.get('sharding', 'replicate')
  state, _ = restore_state(manager, step, exp, abstract_state(exp, exp.layout, mesh, mode),
                           mesh, mode)
  return exp, state, step
