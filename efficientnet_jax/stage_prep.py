"""Gets training stages ready on a worker thread while the current one trains.

`StagePreparer` builds a stage's tf.data pipeline (and first batch) and its
train step, compiled ahead of time with `jit(...).lower(...).compile()`.
Switching stages then costs a dictionary lookup instead of a compile (XLA
compiles one program per input shape, so progressive resizing would otherwise
stall at every stage boundary).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from efficientnet_jax import sharding
from efficientnet_jax.progressive import Stage, StagePlan


@dataclasses.dataclass
class PreparedStage:
  """A stage ready to train from `begin_step`."""
  stage: Stage
  begin_step: int
  batches: Iterator[dict]  # host batches after `first_batch`
  first_batch: dict  # global (sharded) arrays
  step_fn: Callable  # (state, batch, key) -> (state, metrics)
  data_s: float  # building the pipeline and reading the first batch
  compile_s: float  # compiling the step; 0 when reused or left to the first call
  stall_from: float = 0.0  # perf_counter when the loop started waiting for this stage


class StagePreparer:
  """Builds stages' pipelines and train steps on one background thread.

  One worker keeps the preparations in order and leaves the other cores to
  the running stage. Compiled steps are cached by `Stage.compile_key`, so a
  shape is compiled once however many stages share it.
  """

  def __init__(self, *, make_batches: Callable[[Stage, int], Iterator[dict]],
               make_step: Callable[[Stage], Any], batch_sharding, abstract_state,
               abstract_key, aot_compile: bool):
    """Args:
      make_batches: (stage, begin_step) -> iterator of host batches.
      make_step: stage -> its `jax.jit`-wrapped train step.
      batch_sharding: where the batch goes.
      abstract_state: ShapeDtypeStructs (with shardings) of the train state.
      abstract_key: ShapeDtypeStruct of the train RNG key.
      aot_compile: compile on the worker; False leaves compiling to the first
        call, inside the loop (the naive behaviour, for comparison).
    """
    self._make_batches = make_batches
    self._make_step = make_step
    self._batch_sharding = batch_sharding
    self._abstract = (abstract_state, abstract_key)
    self.aot_compile = aot_compile
    self._steps: dict[tuple, Callable] = {}  # written by the worker thread only
    self._executor = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix='stage-prep')

  def submit(self, stage: Stage, begin_step: int) -> concurrent.futures.Future:
    """Starts preparing `stage` to train from `begin_step`; a Future of PreparedStage."""
    return self._executor.submit(self._prepare, stage, begin_step)

  def compile(self, jitted, *abstract_args) -> concurrent.futures.Future:
    """Compiles any other jitted function (the eval step) on the worker."""
    return self._executor.submit(lambda: jitted.lower(*abstract_args).compile())

  def _prepare(self, stage: Stage, begin_step: int) -> PreparedStage:
    start = time.perf_counter()
    batches = self._make_batches(stage, begin_step)
    first = sharding.to_global(next(batches), self._batch_sharding)
    data_s = time.perf_counter() - start
    step_fn, compile_s = self._steps.get(stage.compile_key), 0.0
    if step_fn is None:
      step_fn = self._make_step(stage)
      if self.aot_compile:
        start = time.perf_counter()
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                          for k, v in first.items()}
        step_fn = step_fn.lower(self._abstract[0], abstract_batch,
                                self._abstract[1]).compile()
        compile_s = time.perf_counter() - start
      self._steps[stage.compile_key] = step_fn
    return PreparedStage(stage, begin_step, batches, first, step_fn, data_s, compile_s)

  def close(self, wait: bool = False) -> None:
    """Drops queued work; by default does not wait for a compile in flight."""
    self._executor.shutdown(wait=wait, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def abstract_eval_batch(batch_size: int, image_size: int, batch_sharding) -> dict:
  """The eval batch `input_pipeline.make_eval_iterator` yields, as ShapeDtypeStructs."""
  b, s = batch_size, image_size
  return {'image': jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32, sharding=batch_sharding),
          'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding),
          'mask': jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=batch_sharding)}


def stage_start_record(prepared: PreparedStage, *, plan: StagePlan, stall_s: float,
                       aot_compile: bool) -> dict:
  """The metrics.jsonl event logged when a stage starts (or resumes).

  `stall_s` is the wall time from the previous stage's last step (finished,
  after its eval and checkpoint) to this stage's first step being dispatched;
  for the first stage of a process, from the start of the loop. `compile_s`
  and `data_s` are what preparing the stage took, on the worker thread when
  compiled ahead of time; `compile_s` is 0 for a shape compiled before or, with
  `aot_compile` off, left to the first call (then it is inside `stall_s`).
  """
  stage = prepared.stage
  return {'event': 'stage_start', **stage.summary(), 'step': prepared.begin_step,
          'num_stages': len(plan.stages), 'resumed': prepared.begin_step > stage.start_step,
          'epoch': plan.epoch_at(prepared.begin_step), 'stall_s': stall_s,
          'compile_s': prepared.compile_s, 'data_s': prepared.data_s,
          'aot_compile': aot_compile}


def stage_start_line(record: dict) -> str:
  """The console line of a stage_start record: what the stage trains and what starting it cost."""
  verb = 'resumes' if record['resumed'] else 'starts'
  ahead = (f'compiled {record["compile_s"]:.1f} s ahead, ' if record['aot_compile']
           and record['compile_s'] else '')
  return (f'stage {record["stage"] + 1}/{record["num_stages"]} {verb} at step '
          f'{record["step"]}: {record["image_size"]} px, batch {record["batch_size"]}, '
          f'dropout {record["dropout"]:.3g}, mixup {record["mixup_alpha"]:.3g}, cutmix '
          f'{record["cutmix_alpha"]:.3g}, RandAugment {record["randaug_magnitude"]:.3g}; '
          f'stall {record["stall_s"]:.2f} s ({ahead}data {record["data_s"]:.1f} s)')
