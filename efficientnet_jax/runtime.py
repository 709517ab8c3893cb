"""What a training process needs from its runtime: SIGTERM, a fragile console, a compile cache.

* `Preemption` turns SIGTERM into a flag the loop checks between steps.
* `best_effort_console` keeps a closed stdout (`train.py ... | head`) from
  stopping training.
* `enable_compilation_cache` lets a restarted run skip compiling.
"""

from __future__ import annotations

import os
import signal
import sys

import jax


def _configured_cache_dir() -> str | None:
  return jax.config.jax_compilation_cache_dir


def enable_compilation_cache(config, workdir: str) -> str | None:
  """Turns on JAX's persistent compilation cache so a restart skips compiling.

  `config.compilation_cache_dir`: '' = `<workdir>/compile_cache` unless JAX
  already has a cache directory (JAX_COMPILATION_CACHE_DIR, tests); 'none' =
  off. Must run before the process compiles anything: JAX decides once whether
  the cache is used. Returns the directory in use.
  """
  directory = config.compilation_cache_dir
  if directory == 'none':  # also off when JAX_COMPILATION_CACHE_DIR names one
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  current = _configured_cache_dir()
  if not directory and current:
    return current
  directory = directory or os.path.join(workdir, 'compile_cache')
  jax.config.update('jax_compilation_cache_dir', directory)
  return directory


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
  """SIGTERM stops the loop at a step boundary, where it saves a checkpoint and exits cleanly.

  One process: a Python signal handler sets a flag. Several processes: JAX's
  preemption notifier (installed by `jax.distributed.initialize`) owns SIGTERM,
  and `stop_at` is JAX's sync point, true at the same step on every process
  once any of them got the signal; a Python handler would replace the
  notifier's and leave the others training into a collective without it.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multiprocess = jax.process_count() > 1

  def __enter__(self):
    if self._multiprocess:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some test runners)
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True
    # An outer Python handler (a driver running several trainings, e.g. the
    # experiments harness) hears it too: a SIGTERM that lands after the last
    # step, when this loop no longer stops, must still stop the driver.
    if callable(self._previous):
      self._previous(signum, frame)

  def stop_at(self, step: int) -> bool:
    """Whether to save and stop before `step`; called at every step, in order, on every process."""
    if self._multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
