"""Metrics to the workdir (metrics.jsonl and TensorBoard events) and the console's progress lines.

`TrainLogger` brings train metrics to the host one step late, so logging never
blocks dispatch, and raises on a non-finite loss.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax

from efficientnet_jax.progressive import StagePlan


class MetricWriter:
  """Writes on process 0 only; other processes get a no-op writer."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))
    except Exception:  # TensorBoard is optional; metrics.jsonl is the record.
      self._tb = None

  def write(self, record: dict) -> None:
    """record: {'step': int, 'split': 'train'|'eval', ...scalars} or an event record.

    Eval records get `time` (unix seconds when written), so the wall time to an
    accuracy can be read back (experiments/harness.py's eval_curve).
    """
    if not self.enabled:
      return
    clean = {k: (float(v) if hasattr(v, 'dtype') or isinstance(v, float) else v)
             for k, v in record.items()}
    if clean.get('split') == 'eval':
      clean.setdefault('time', round(time.time(), 3))
    self._jsonl.write(json.dumps(clean) + '\n')
    self._jsonl.flush()
    if self._tb is not None and 'split' in clean:
      with self._tb.as_default(step=int(clean['step'])):
        for k, v in clean.items():
          if (k not in ('step', 'split', 'time') and isinstance(v, (int, float))
              and math.isfinite(v)):
            self._tf.summary.scalar(f'{clean["split"]}/{k}', v)
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


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
