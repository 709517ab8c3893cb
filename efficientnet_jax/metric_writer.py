"""Metrics to the workdir: metrics.jsonl (one JSON object per record) and TensorBoard events."""

from __future__ import annotations

import json
import math
import os

import jax


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
    """record: {'step': int, 'split': 'train'|'eval', ...scalars} or an event record."""
    if not self.enabled:
      return
    clean = {k: (float(v) if hasattr(v, 'dtype') or isinstance(v, float) else v)
             for k, v in record.items()}
    self._jsonl.write(json.dumps(clean) + '\n')
    self._jsonl.flush()
    if self._tb is not None and 'split' in clean:
      with self._tb.as_default(step=int(clean['step'])):
        for k, v in clean.items():
          if k not in ('step', 'split') and isinstance(v, (int, float)) and math.isfinite(v):
            self._tf.summary.scalar(f'{clean["split"]}/{k}', v)
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
