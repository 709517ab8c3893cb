"""Training: `run(config, workdir)` trains (or resumes) a model in a workdir.

`run` reads top to bottom: check the config -> mesh, experiment, checkpoint
manager -> restore or sharded init -> for each stage: its loop -> final eval.
The parts it wires are small and named: `_Checkpointer` (saves only finite
states), `_Evaluator` (EMA and raw weights over the eval split),
`_train_stage` (one stage's steps, with eval, checkpoints and preemption), and
`stage_prep.StagePreparer` (the next stage's pipeline and compiled step, made
on a worker thread while the current stage trains).

Every run walks a stage plan (`progressive.py`): one stage for a plain run,
several for EfficientNetV2 progressive learning. The jitted computations are
`steps.train_step` / `steps.eval_step`; the train state is `state.py`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time

import jax

from efficientnet_jax import checkpointing
from efficientnet_jax import config_lib
from efficientnet_jax import cpu_tuning
from efficientnet_jax import data
from efficientnet_jax import distributed
from efficientnet_jax import evaluate
from efficientnet_jax import finetune
from efficientnet_jax import runtime
from efficientnet_jax import sharding
from efficientnet_jax import stage_prep
from efficientnet_jax import state as state_lib
from efficientnet_jax import state_layout
from efficientnet_jax import steps
from efficientnet_jax.experiment import Experiment, build_experiment
from efficientnet_jax.metric_writer import MetricWriter, TrainLogger
from efficientnet_jax.weights import load as weights_load


@dataclasses.dataclass
class RunResult:
  """How `run` ended.

  Attributes:
    step: the last step trained (and saved).
    preempted: SIGTERM stopped the run after saving `step`; relaunch to resume.
    eval: the last eval record (EMA 'top1', 'top5', 'loss', 'count' and the
      raw weights' 'raw_*'); None when preempted before any eval.
  """
  step: int
  preempted: bool
  eval: dict | None


@dataclasses.dataclass
class _Setup:
  """What `run` derives before touching the state: devices, experiment, shardings."""
  exp: Experiment
  mesh: jax.sharding.Mesh
  manager: checkpointing.CheckpointManager
  abstract: dict  # the train state's ShapeDtypeStructs, with shardings
  init_key: jax.Array
  train_key: jax.Array

  @property
  def state_sharding(self):
    return jax.tree.map(lambda a: a.sharding, self.abstract)


def run(config, workdir: str, devices=None) -> RunResult:
  """Trains (or resumes) the configured model in `workdir`.

  `devices` (default: all) spans the mesh; a checkpoint saved on another
  device count or sharding mode restores onto this one.
  """
  workdir = os.path.abspath(workdir)
  config_lib.check(config)  # before the device checks: 'eval_batch_size=0; ...'
  setup = _setup(config, workdir, devices)
  state, start_step = _init_or_restore(setup, config, workdir)
  exp, plan = setup.exp, setup.exp.plan
  if jax.process_index() == 0:
    config_lib.save(config, workdir)
  writer = MetricWriter(workdir)
  logger = TrainLogger(writer, plan=plan, schedule=exp.schedule,
                       log_every=config.log_every_steps, start_step=start_step)
  checkpointer = _Checkpointer(setup.manager, logger, exp, start_step)
  evaluator = _Evaluator(setup, config, writer)
  _announce(setup, config, start_step)
  step, last_eval = start_step, None
  with _make_preparer(setup, config) as preparer, runtime.Preemption() as preemption:
    evaluator.compile_ahead(preparer)
    try:
      loop = _Loop(setup, config, logger, checkpointer, evaluator, preemption, writer)
      for prepared in _prepared_stages(preparer, plan, step):
        state, step, last_eval, preempted = _train_stage(loop, prepared, state, step,
                                                         last_eval)
        if preempted:
          writer.close()
          return RunResult(step, True, last_eval)
    except FloatingPointError:
      # A diverged run stops here; an async save still in flight holds a state
      # checked finite, so it is finished, not abandoned.
      checkpointing.wait(setup.manager)
      raise
    logger.flush()
    checkpointing.wait(setup.manager)
    if last_eval is None:
      last_eval = evaluator(step, state)
  writer.close()
  return RunResult(step, False, last_eval)


def _setup(config, workdir: str, devices) -> _Setup:
  mesh = sharding.make_mesh(devices, model=config.mesh_model)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, field='eval_batch_size')
  exp = build_experiment(config, device_count=mesh.shape['data'])  # the batch splits over `data`
  for stage in exp.plan.stages:  # adapted per-stage batches are multiples of the data-axis size
    sharding.check_batch_size(stage.batch_size, mesh, field=f'stage {stage.index} batch_size')
  manager = checkpointing.make_checkpoint_manager(
      workdir, max_to_keep=config.keep_checkpoints,
      save_interval_steps=config.checkpoint_every_steps)
  state_lib.check_workdir_matches(manager, exp, workdir)
  # Made by every process as replicated global arrays (a device_put of a local
  # key cannot target other hosts' devices).
  init_key, train_key = jax.jit(
      lambda: tuple(jax.random.split(jax.random.key(config.seed))),
      out_shardings=sharding.replicated(mesh))()
  # Placed by the sharding rules from shapes alone: the state is created on its
  # shards, never whole on one device first.
  abstract = state_lib.abstract_state(exp, exp.layout, mesh, config.sharding)
  return _Setup(exp, mesh, manager, abstract, init_key, train_key)


def _init_or_restore(setup: _Setup, config, workdir: str) -> tuple[dict, int]:
  """The newest checkpoint's state, or a fresh (possibly pretrained) one; and its step."""
  cache_dir = runtime.enable_compilation_cache(config, workdir)
  # A cache this run creates inside the workdir is removed again if the resume
  # fails: a refused workdir is left exactly as it was.
  new_cache = (cache_dir is not None and cache_dir.startswith(workdir + os.sep)
               and not os.path.exists(cache_dir))
  exp = setup.exp
  start_step = distributed.agreed_step(checkpointing.latest_step(setup.manager))
  if start_step is None:
    state = jax.jit(state_lib.state_init_fn(exp, exp.layout),
                    out_shardings=setup.state_sharding)(setup.init_key)
    if config.init_from:  # fine-tuning: pretrained backbone, fresh head
      state = _init_from_pretrained(state, setup, config)
    return state, 0
  try:
    state, saved = state_lib.restore_state(setup.manager, start_step, exp, setup.abstract,
                                           setup.mesh, config.sharding,
                                           fallback=config.corrupt_checkpoint == 'fallback')
  except Exception:
    if new_cache:
      shutil.rmtree(cache_dir, ignore_errors=True)
    raise
  newest, start_step = start_step, int(jax.device_get(state['step']))
  if start_step != newest:
    print(f'note: checkpoint step {newest} is corrupt (see the warning above); resuming from '
          f'step {start_step}, the newest intact one', flush=True)
  stage = exp.plan.stage_at(start_step)
  print(f'resumed from {workdir}/checkpoints at step {start_step} (stage {stage.index}, '
        f'{stage.image_size}px)', flush=True)
  if 'stage' in saved and saved['stage'] != stage.index:
    print(f'note: the checkpoint was saved for stage {saved["stage"]}; this config\'s '
          f'schedule puts step {start_step} in stage {stage.index}', flush=True)
  return state, start_step


def _init_from_pretrained(state: dict, setup: _Setup, config) -> dict:
  exp = setup.exp
  source, pretrained, _ = weights_load.load_weights(
      config.init_from, config.init_from_model or None,
      config=config.init_from_config or None)
  if (source.padding, source.spec.bn_epsilon) != (exp.model.padding, exp.spec.bn_epsilon):
    print(f'note: {config.init_from} was trained with padding={source.padding!r}, '
          f'bn_epsilon={source.spec.bn_epsilon}; this config uses '
          f'{exp.model.padding!r}, {exp.spec.bn_epsilon}', flush=True)
  state, report = finetune.init_state_from(
      jax.device_get(state), pretrained, tx=exp.tx,
      spec=exp.spec if exp.model.scan_blocks else None)
  print(f'initialised from {config.init_from}:\n{report.summary()}', flush=True)
  return jax.device_put(state, setup.state_sharding)


def _announce(setup: _Setup, config, start_step: int) -> None:
  exp, plan, mesh = setup.exp, setup.exp.plan, setup.mesh
  sizes = '->'.join(str(s.image_size) for s in plan.stages)
  print(f'training {exp.spec.name} ({exp.num_classes} classes) at {sizes}px '
        f'({len(plan.stages)} stage{"s" * (len(plan.stages) > 1)}), batch {config.batch_size} '
        f'on {mesh.devices.size} devices (mesh {dict(mesh.shape)}), '
        f'steps {start_step}->{exp.total_steps} ({exp.steps_per_epoch}/epoch)', flush=True)


def _make_step(stage, *, setup: _Setup, config):
  """The stage's jitted train step (not yet compiled)."""
  exp, mesh = setup.exp, setup.mesh
  # Dropout is a static attribute of the linen module, so each rate is its own
  # program; the params tree is the same for every stage.
  model = exp.model if stage.dropout is None else exp.model.clone(dropout=stage.dropout)
  replicated = sharding.replicated(mesh)
  return jax.jit(
      functools.partial(steps.train_step, model=model, tx=exp.tx, ema_decay=config.ema_decay,
                        label_smoothing=config.label_smoothing,
                        frozen_batch_stats=exp.frozen_batch_stats),
      in_shardings=(setup.state_sharding, sharding.batch_sharding(mesh), replicated),
      out_shardings=(setup.state_sharding, replicated), donate_argnums=0,
      compiler_options=cpu_tuning.train_compiler_options(mesh.devices.flat[0].platform,
                                                         config.cpu_train_opt_level))


def _make_batches(stage, begin_step: int, *, exp: Experiment, config):
  """The stage's host batches from `begin_step` (this process's rows)."""
  return data.make_train_iterator(
      exp.data, image_size=stage.image_size,
      batch_size=stage.batch_size // jax.process_count(), seed=config.seed,
      normalization=exp.spec.normalization, augment=config.data.augment,
      randaug_layers=config.data.randaug_layers,
      randaug_magnitude=stage.randaug_magnitude, mixup_alpha=stage.mixup_alpha,
      cutmix_alpha=stage.cutmix_alpha, num_classes=exp.num_classes,
      start_step=stage.data_step(begin_step), process_index=jax.process_index(),
      process_count=jax.process_count(), shuffle_buffer=config.data.shuffle_buffer,
      inception_crop=config.data.inception_crop, crop=config.data.crop,
      crop_padding=config.data.crop_padding, resize=config.data.resize,
      aug_pixel_constants=config.data.aug_pixel_constants,
      posterize_quirk=config.data.posterize_quirk, contrast_quirk=config.data.contrast_quirk,
      solarize_quirk=config.data.solarize_quirk, process_sharding=config.data.process_sharding)


def _make_preparer(setup: _Setup, config) -> stage_prep.StagePreparer:
  return stage_prep.StagePreparer(
      make_batches=functools.partial(_make_batches, exp=setup.exp, config=config),
      make_step=functools.partial(_make_step, setup=setup, config=config),
      batch_sharding=sharding.batch_sharding(setup.mesh), abstract_state=setup.abstract,
      abstract_key=jax.ShapeDtypeStruct(setup.train_key.shape, setup.train_key.dtype,
                                        sharding=sharding.replicated(setup.mesh)),
      aot_compile=config.progressive.aot_compile)


def _prepared_stages(preparer: stage_prep.StagePreparer, plan, step: int):
  """Yields each remaining stage ready to train, queueing the next one's preparation first.

  The consumer asks for the next stage as soon as one ends, so `stall_from` is
  that stage's end (for the first stage, the loop's start).
  """
  if step >= plan.total_steps:
    return
  following = preparer.submit(plan.stage_at(step), step)
  while following is not None:
    # A stage's stall counts from here: the previous stage's end, or the loop's start.
    waited_from = time.perf_counter()
    prepared = dataclasses.replace(following.result(), stall_from=waited_from)
    index = prepared.stage.index + 1
    following = (preparer.submit(plan.stages[index], plan.stages[index].start_step)
                 if index < len(plan.stages) else None)
    yield prepared


@dataclasses.dataclass
class _Loop:
  """The parts every stage's loop uses."""
  setup: _Setup
  config: object
  logger: TrainLogger
  checkpointer: _Checkpointer
  evaluator: _Evaluator
  preemption: runtime.Preemption
  writer: MetricWriter


def _train_stage(loop: _Loop, prepared, state, step: int, last_eval):
  """Trains one stage to its end; returns (state, step, last eval, preempted)."""
  setup, config, logger = loop.setup, loop.config, loop.logger
  checkpointer, evaluator = loop.checkpointer, loop.evaluator
  stage, plan = prepared.stage, setup.exp.plan
  batch_sharding = sharding.batch_sharding(setup.mesh)
  eval_every = (config.eval_every_steps if config.eval_every_steps > 0
                else setup.exp.steps_per_epoch)
  batch, batches = prepared.first_batch, prepared.batches
  while step < stage.end_step:
    if loop.preemption.stop_at(step):
      checkpointer.save(step, state, force=True)
      checkpointing.wait(setup.manager)
      print(f'SIGTERM: saved step {step} and stopped', flush=True)
      return state, step, last_eval, True
    if batch is None:
      batch = sharding.to_global(next(batches), batch_sharding)
    state, metrics = prepared.step_fn(state, batch, setup.train_key)
    batch = None
    if step == prepared.begin_step:
      # Wall time from the previous stage's last step to this stage's first
      # dispatch: pipeline hand-over plus any compile left to do.
      record = stage_prep.stage_start_record(
          prepared, plan=plan, stall_s=time.perf_counter() - prepared.stall_from,
          aot_compile=config.progressive.aot_compile)
      loop.writer.write(record)
      if len(plan.stages) > 1 and jax.process_index() == 0:
        print(stage_prep.stage_start_line(record), flush=True)
    step += 1
    logger.after_step(step, metrics, stage.batch_size)
    if step % eval_every == 0 or step == plan.total_steps:
      logger.flush()
      last_eval = evaluator(step, state)
      checkpointer.save(step, state, metrics={'eval/top1': last_eval['top1']}, force=True)
    elif step % config.checkpoint_every_steps == 0:
      checkpointer.save(step, state)
  batches.close()  # frees this stage's tf.data buffers
  jax.block_until_ready(state['step'])  # the next stage's stall counts from here
  return state, step, last_eval, False


class _Checkpointer:
  """Saves only finite states, so a diverged run never replaces the last good checkpoint."""

  def __init__(self, manager, logger: TrainLogger, exp: Experiment, start_step: int):
    self._manager, self._logger, self._plan = manager, logger, exp.plan
    self._meta = {**state_lib.architecture_meta(exp), 'state_layout': exp.layout}
    self._finite_at = start_step  # the last step whose params were checked finite

  def save(self, step: int, state: dict, **kwargs) -> None:
    # The loss is checked at log steps only, one step late, so a save between
    # two log steps checks the params themselves.
    self._logger.flush()
    if not bool(steps.all_finite(state['params'])):
      checkpointing.wait(self._manager)  # the save in flight holds the last good state
      raise FloatingPointError(
          f'non-finite parameters between steps '
          f'{max(self._finite_at, self._logger.last_logged_step)} and {step}; not saved, the '
          f'checkpoint at step {checkpointing.latest_step(self._manager)} is kept')
    self._finite_at = step
    stage = self._plan.stage_at(step)  # the stage a resume at `step` continues
    meta = {**self._meta, 'stage': stage.index, 'image_size': stage.image_size}
    checkpointing.save(self._manager, step, state, meta=meta, **kwargs)


class _Evaluator:
  """EMA and raw top-1/top-5/loss over the eval split, logged and printed."""

  def __init__(self, setup: _Setup, config, writer: MetricWriter):
    self._setup, self._config, self._writer = setup, config, writer
    abstract = setup.abstract
    self._abstract_variables = {'params': abstract['params'],
                                'batch_stats': abstract['batch_stats']}
    self._eval_fn = jax.jit(
        functools.partial(steps.eval_step, model=setup.exp.model),
        in_shardings=(jax.tree.map(lambda a: a.sharding, self._abstract_variables),
                      sharding.batch_sharding(setup.mesh)),
        out_shardings=sharding.replicated(setup.mesh))

  def compile_ahead(self, preparer: stage_prep.StagePreparer) -> None:
    """Queues the eval step's compile after the first stage's: needed only at the first eval."""
    if preparer.aot_compile:
      self._eval_fn = preparer.compile(
          self._eval_fn, self._abstract_variables,
          stage_prep.abstract_eval_batch(self._config.eval_batch_size,
                                         self._setup.exp.eval_image_size,
                                         sharding.batch_sharding(self._setup.mesh)))

  def __call__(self, step: int, state: dict) -> dict:
    if not callable(self._eval_fn):  # the ahead-of-time compile's Future
      self._eval_fn = self._eval_fn.result()
    exp = self._setup.exp
    results = evaluate.evaluate_split(
        self._eval_fn, {'ema': state_layout.ema_variables(state),
                        'raw': state_lib.raw_variables(state)},
        exp, self._config, self._setup.mesh)
    record = {'step': step, 'split': 'eval', 'epoch': exp.plan.epoch_at(step),
              'image_size': exp.eval_image_size}
    for name, r in results.items():
      prefix = '' if name == 'ema' else 'raw_'
      record.update({f'{prefix}{k}': v for k, v in r.items()})
    self._writer.write(record)
    print(f'eval step {step}: top1 {record["top1"]:.4f} top5 {record["top5"]:.4f} (EMA), '
          f'raw top1 {record["raw_top1"]:.4f}, {record["count"]} examples', flush=True)
    return record
