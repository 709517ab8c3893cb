"""Pieces of the training loop that `train.run` wires together.

* `StagePreparer` gets a stage ready on a worker thread: its tf.data pipeline
  (and first batch) and its train step, compiled ahead of time with
  `jit(...).lower(...).compile()`, while the previous stage trains. Switching
  stages then costs a dictionary lookup instead of a compile (XLA compiles one
  program per input shape; pitfalls.md §2 "Progressive resizing recompiles").
* `TrainLogger` brings metrics to the host one step late, so logging never
  blocks dispatch, and raises on a non-finite loss.
* `Preemption` turns SIGTERM into a flag the loop checks between steps.
* `best_effort_console` keeps a closed stdout (`train.py ... | head`) from
  stopping training.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import signal
import sys
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


def _configured_cache_dir() -> str | None:
  return jax.config.jax_compilation_cache_dir


def enable_compilation_cache(config, workdir: str) -> str | None:
  """Turns on JAX's persistent compilation cache so a restart skips compiling.

  `config.compilation_cache_dir`: '' = `<workdir>/compile_cache` unless JAX
  already has a cache directory (JAX_COMPILATION_CACHE_DIR, tests); 'none' =
  off. Must run before the process compiles anything: JAX decides once whether
  the cache is used. Returns the directory in use.
  """
  directory = config.get('compilation_cache_dir', '')
  if directory == 'none':  # also off when JAX_COMPILATION_CACHE_DIR names one
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  current = _configured_cache_dir()
  if not directory and current:
    return current
  directory = directory or os.path.join(workdir, 'compile_cache')
  jax.config.update('jax_compilation_cache_dir', directory)
  return directory


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


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class TrainLogger:
  """Train metrics of log steps, fetched one step late so logging never blocks dispatch."""

  def __init__(self, writer, *, plan: StagePlan, schedule, log_every: int, start_step: int):
    self._writer = writer
    self._plan = plan
    self._schedule = schedule
    self._log_every = log_every
    self._pending = None  # (step, metrics, time, batch_size)
    self._last_step, self._last_time = start_step, time.time()

  @property
  def last_logged_step(self) -> int:
    return self._last_step

  def after_step(self, step: int, metrics: dict, batch_size: int) -> None:
    """Writes the previous log step's metrics, then holds this step's if it is one."""
    self.flush()
    if step % self._log_every == 0 or step == self._plan.total_steps:
      self._pending = (step, metrics, time.time(), batch_size)

  def flush(self) -> None:
    if self._pending is None:
      return
    step, metrics, now, batch_size = self._pending
    self._pending = None
    metrics = jax.device_get(metrics)
    loss = float(metrics['loss'])
    if not math.isfinite(loss):
      raise FloatingPointError(f'non-finite training loss {loss} between steps '
                               f'{self._last_step} and {step}; the checkpoints saved so far '
                               f'were checked finite and are kept')
    seconds = max(now - self._last_time, 1e-9)
    steps = step - self._last_step
    record = {'step': step, 'split': 'train', 'epoch': self._plan.epoch_at(step),
              'loss': loss, 'top1': float(metrics['top1']),
              'lr': float(self._schedule(step - 1)),
              'images_per_sec': steps * batch_size / seconds}
    self._writer.write(record)
    total = self._plan.total_steps
    eta = (total - step) * seconds / max(steps, 1)
    print(f'step {step}/{total} epoch {record["epoch"]:.2f} loss {loss:.4f} '
          f'top1 {record["top1"]:.3f} lr {record["lr"]:.5f} '
          f'{record["images_per_sec"]:.1f} img/s ETA {_format_eta(eta)}', flush=True)
    self._last_step, self._last_time = step, now


class _BestEffortStream:
  """A console stream whose write failures (closed pipe, EIO) drop the text instead of raising."""

  def __init__(self, stream):
    self._stream = stream
    self.broken = False

  def write(self, text):
    if not self.broken:
      try:
        return self._stream.write(text)
      except OSError:  # BrokenPipeError, EIO of a vanished terminal
        self._break()
    return len(text)

  def flush(self):
    if not self.broken:
      try:
        self._stream.flush()
      except OSError:
        self._break()

  def _break(self):
    self.broken = True
    # The wrapped stream still holds the unwritten text, and Python flushes it
    # again at exit (exit status 120 if that fails): point its fd at /dev/null.
    try:
      devnull = os.open(os.devnull, os.O_WRONLY)
      os.dup2(devnull, self._stream.fileno())
      os.close(devnull)
    except (OSError, ValueError, AttributeError):
      pass

  def __getattr__(self, name):
    return getattr(self._stream, name)


def best_effort_console() -> None:
  """Makes sys.stdout / sys.stderr best-effort, for processes that train (train.py's main).

  Progress lines are a courtesy: when the reader of a pipe goes away, `print`
  would raise BrokenPipeError out of the loop (leaving a half-written async
  save behind, and a SIGTERM unanswered). Checkpoints and metrics.jsonl are
  the record; the console is not.
  """
  for name in ('stdout', 'stderr'):
    stream = getattr(sys, name)
    if stream is not None and not isinstance(stream, _BestEffortStream):
      setattr(sys, name, _BestEffortStream(stream))


class Preemption:
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
