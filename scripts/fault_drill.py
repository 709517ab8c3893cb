"""Fault drill: trains a tiny model for real and injects the faults a cluster job meets.

    python scripts/fault_drill.py --trials=20 [--json] [--workdir=DIR] [--seed=0]
    python scripts/fault_drill.py --multiprocess --trials=10 [--json]  # 2 jax.distributed processes

Every training run is `train.py` in a child process on a small image folder (sklearn's
8x8 digits as PNGs plus planted garbage / truncated files). Faults that must happen inside
the trainer (a NaN, a full disk) are injected by this script re-running itself as the child
(`--child=nan|disk_full`) with a monkeypatch installed before `train.py`'s `main`: the
library has no fault-injection hooks.

  kill -9     N trials (kills): a run is killed at a random moment of its training loop
              (checkpoints every step, so many kills land inside an async save), its
              resume is killed again, --kills_per_run times, and the last resume runs to
              the end. Every finalized checkpoint left by a kill must restore; each resume
              must start from the newest of them (lost_steps); the final state must be
              bit-equal to an uninterrupted reference run.
  SIGTERM     with stdout a closed pipe: exit 0 and a fresh, restorable checkpoint at the
              step reached; no half-written save left behind; no hang.
  NaN         from a given step the images are NaN: non-zero exit, a one-line message
              naming the step range, the last good checkpoint kept and restorable.
  disk full   the rename that commits one step's save raises ENOSPC: the run stops with
              an error naming the step, the previous checkpoint restores intact.
  truncated   a data file of the newest checkpoint is cut in half: the resume must not
              silently lose or use it (refuse naming it, or fall back with a warning);
              following the advice, the run finishes equal to the reference.
  bad images  garbage, truncated and empty image files are skipped and counted
              (dataset_info()['num_skipped']) and training completes.

With --jobs=2 (default) the single faults run on a thread beside the kill trials.
Progress goes to stderr; the summary table (or with --json one JSON object) to stdout.
Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_TIMEOUT_S = 300  # a run that takes longer than this is reported as hung

# ---------------------------------------------------------------------------
# Child mode: `train.py`'s main with one fault patched in.


def _child_main(fault: str, at_step: int, train_argv: list[str]) -> None:
  os.chdir(REPO)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from efficientnet_jax import steps  # pylint: disable=g-import-not-at-top

  if fault == 'nan':
    real_step = steps.train_step

    def nan_step(state, batch, key, **kwargs):
      # The step that takes the state past `at_step` (and every later one)
      # sees NaN images, so its loss and everything after are NaN.
      scale = jnp.where(state['step'] >= at_step, jnp.nan, 1.0)
      return real_step(state, {**batch, 'image': batch['image'] * scale}, key, **kwargs)

    steps.train_step = nan_step  # looked up when `run` builds the jitted step
  elif fault == 'disk_full':
    real_rename = os.rename
    tmp_name = f'{at_step}.orbax-checkpoint-tmp'

    def full_disk_rename(src, dst, *args, **kwargs):
      # Orbax commits a save by renaming <step>.orbax-checkpoint-tmp to <step>.
      if os.path.basename(os.fspath(src).rstrip('/')) == tmp_name:
        raise OSError(errno.ENOSPC, 'No space left on device (simulated by fault_drill)')
      return real_rename(src, dst, *args, **kwargs)

    os.rename = full_disk_rename
  else:
    raise SystemExit(f'--child={fault}; accepted: nan, disk_full')
  import runpy  # pylint: disable=g-import-not-at-top
  sys.argv = ['train.py', *train_argv]
  runpy.run_path(os.path.join(REPO, 'train.py'), run_name='__main__')  # the repo's train.py


# ---------------------------------------------------------------------------
# The drill's data and config.


def make_image_folder(root: str) -> dict:
  """train/ and test/ of 10 digit classes as PNGs, plus planted bad files; returns counts."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = (digits.images * (255.0 / 16.0)).astype(np.uint8)
  per_split = {'train': 4, 'test': 1}
  taken = {c: 0 for c in range(10)}
  counts = {'good_train': 0, 'good_test': 0}
  good_png = None
  for split, per_class in per_split.items():
    for c in range(10):
      os.makedirs(os.path.join(root, split, str(c)), exist_ok=True)
      chosen = np.flatnonzero(digits.target == c)[taken[c]:taken[c] + per_class]
      taken[c] += per_class
      for i in chosen:
        path = os.path.join(root, split, str(c), f'{i:04d}.png')
        Image.fromarray(np.kron(images[i], np.ones((2, 2), np.uint8))).save(path)
        counts[f'good_{split}'] += 1
        good_png = path
  with open(good_png, 'rb') as f:
    png = f.read()
  rng = np.random.default_rng(0)
  bad = {  # path -> bytes; none of these decodes
      'train/0/garbage.png': rng.integers(0, 256, 300, dtype=np.uint8).tobytes(),
      'train/1/garbage.jpg': b'\xff\xd8\xff\xe0' + rng.integers(0, 256, 200, np.uint8).tobytes(),
      'train/2/truncated.png': png[:len(png) // 2],
      'train/3/empty.jpeg': b'',
      'test/4/truncated.png': png[:40],
  }
  for rel, data in bad.items():
    with open(os.path.join(root, rel), 'wb') as f:
      f.write(data)
  counts['bad'] = len(bad)
  counts['bad_files'] = sorted(bad)
  return counts


def drill_overrides(data_dir: str, cache_dir: str, steps: int, **extra) -> dict:
  """Dotted config fields over configs/base.py:smoke (a 0.25x0.25 net at 32 px, batch 8)."""
  fields = {
      'data.name': 'folder', 'data.folder': data_dir, 'data.train_split': 'train',
      'data.eval_split': 'test', 'train_steps': steps, 'checkpoint_every_steps': 1,
      'keep_checkpoints': 3, 'eval_every_steps': 100_000, 'log_every_steps': 1,
      'compilation_cache_dir': cache_dir,
  }
  fields.update(extra)
  return fields


def train_argv(workdir: str, fields: dict) -> list[str]:
  return ['--config=configs/base.py:smoke', f'--workdir={workdir}',
          *(f'--config.{k}={v}' for k, v in fields.items())]


def config_from(fields: dict):
  from configs import base  # pylint: disable=g-import-not-at-top
  from efficientnet_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.set_fields(base.get_config('smoke'), fields)


# ---------------------------------------------------------------------------
# Running children.


class Child:
  """A training process whose stdout lines are collected (with times) by a thread."""

  def __init__(self, argv: list[str], log_path: str, env: dict, read_stdout: bool = True):
    self.log_path = log_path
    self._err = open(log_path + '.stderr', 'w', encoding='utf-8')
    self.start = time.monotonic()
    self.start_wall = time.time()
    self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=self._err, text=True, bufsize=1)
    self.lines: list[tuple[float, str]] = []
    self._cond = threading.Condition()
    self._thread = None
    if read_stdout:
      self._thread = threading.Thread(target=self._read, daemon=True)
      self._thread.start()

  def _read(self):
    with open(self.log_path + '.stdout', 'w', encoding='utf-8') as log:
      for line in self.proc.stdout:
        log.write(line)
        with self._cond:
          self.lines.append((time.monotonic(), line.rstrip('\n')))
          self._cond.notify_all()
    with self._cond:
      self.lines.append((time.monotonic(), None))  # EOF
      self._cond.notify_all()

  def wait_for_line(self, prefix: str, timeout: float) -> float | None:
    """Time at which a stdout line starting with `prefix` appeared; None at EOF/timeout."""
    deadline = time.monotonic() + timeout
    with self._cond:
      while True:
        for t, line in self.lines:
          if line is None:
            return None
          if line.startswith(prefix):
            return t
        left = deadline - time.monotonic()
        if left <= 0:
          return None
        self._cond.wait(left)

  def finish(self, timeout: float = CHILD_TIMEOUT_S) -> tuple[int | None, bool]:
    """(exit code, hung): a child still running after `timeout` is killed and reported hung."""
    hung = False
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      hung = True
      self.proc.kill()
      self.proc.wait()
    if self._thread is not None:
      self._thread.join(timeout=10)
    self._err.close()
    return self.proc.returncode, hung

  def stdout_lines(self) -> list[str]:
    return [line for _, line in self.lines if line is not None]

  def stderr_text(self) -> str:
    with open(self.log_path + '.stderr', encoding='utf-8', errors='replace') as f:
      return f.read()


def last_step_line(lines: list[str]) -> int:
  """The highest `step N/T` progress line (the logger prints a step one step late)."""
  steps = [int(l.split()[1].split('/')[0]) for l in lines if l.startswith('step ')]
  return max(steps, default=0)


def resumed_step(lines: list[str]) -> int:
  for line in lines:
    if line.startswith('resumed from '):
      return int(line.split(' at step ')[1].split()[0])
  return 0


def checkpoint_dirs(workdir: str) -> tuple[list[int], list[str]]:
  """(finalized steps, names of half-written *.orbax-checkpoint-tmp dirs) on disk."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return [], []
  names = os.listdir(directory)
  return (sorted(int(n) for n in names if n.isdigit()),
          sorted(n for n in names if n.endswith('.orbax-checkpoint-tmp')))


def error_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.startswith('error:')]


# ---------------------------------------------------------------------------
# Restoring checkpoints in this process.


class Inspector:
  """Restores checkpoints of the drill's model onto one device and compares them."""

  def __init__(self, fields: dict):
    import jax  # pylint: disable=g-import-not-at-top
    from efficientnet_jax import checkpointing  # pylint: disable=g-import-not-at-top
    from efficientnet_jax import experiment  # pylint: disable=g-import-not-at-top
    from efficientnet_jax import state  # pylint: disable=g-import-not-at-top
    self._jax, self._ckpt = jax, checkpointing
    self._lock = threading.Lock()
    from efficientnet_jax import sharding  # pylint: disable=g-import-not-at-top
    exp = experiment.build_experiment(config_from(fields), device_count=1)
    self._abstract = state.abstract_state(exp, exp.layout,
                                            sharding.make_mesh(jax.devices()[:1]), 'replicate')

  def restore(self, workdir: str, step: int):
    """The state at `step` as numpy arrays; raises on a damaged checkpoint."""
    with self._lock:  # the single faults run on another thread
      manager = self._ckpt.make_checkpoint_manager(workdir, async_save=False)
      try:
        state, _ = self._ckpt.restore(manager, self._abstract, step)
        return self._jax.device_get(state)
      finally:
        manager.close()

  def check_all(self, workdir: str) -> dict:
    """Restores every finalized step on disk: {step: None or the error's first line}."""
    steps, _ = checkpoint_dirs(workdir)
    out = {}
    for step in steps:
      try:
        self.restore(workdir, step)
        out[step] = None
      except Exception as e:  # pylint: disable=broad-except
        out[step] = f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'
    return out

  def equal(self, a, b) -> bool:
    """Bit-equality of two restored states (same tree, dtypes, shapes and bytes)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    la, ta = self._jax.tree.flatten(a)
    lb, tb = self._jax.tree.flatten(b)
    return ta == tb and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).shape == np.asarray(y).shape
        and np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))

  def finite(self, state) -> bool:
    import numpy as np  # pylint: disable=g-import-not-at-top
    return all(bool(np.all(np.isfinite(x))) for x in self._jax.tree.leaves(state['params']))


# ---------------------------------------------------------------------------
# The drill.


class Drill:

  def __init__(self, args):
    self.args = args
    self.root = os.path.abspath(args.workdir)
    os.makedirs(self.root, exist_ok=True)
    self.logs = os.path.join(self.root, 'logs')
    os.makedirs(self.logs, exist_ok=True)
    self.data_dir = os.path.join(self.root, 'images')
    self.cache_dir = os.path.abspath(args.compile_cache or os.path.join(self.root, 'compile_cache'))
    self.env = dict(os.environ)
    self.env.update({
        'XLA_FLAGS': f'--xla_force_host_platform_device_count={args.devices}',
        'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': '', 'TF_CPP_MIN_LOG_LEVEL': '2',
        # Cache every compiled program, however quick, so restarts load them all.
        'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
        'PYTHONUNBUFFERED': '1',
    })
    self.rng = random.Random(args.seed)
    self.failures: list[str] = []

  def log(self, msg: str) -> None:
    print(f'[fault_drill +{time.monotonic() - self.t0:6.1f}s] {msg}', file=sys.stderr, flush=True)

  def check(self, ok: bool, what: str) -> bool:
    if not ok:
      self.failures.append(what)
      self.log(f'FAIL: {what}')
    return ok

  def fields(self, **extra) -> dict:
    return drill_overrides(self.data_dir, self.cache_dir, self.args.steps, **extra)

  def train(self, name: str, workdir: str, fields: dict, child: tuple[str, int] | None = None,
            read_stdout: bool = True) -> Child:
    argv = train_argv(workdir, fields)
    if child is None:
      cmd = [sys.executable, 'train.py', *argv]
    else:
      cmd = [sys.executable, os.path.abspath(__file__), f'--child={child[0]}',
             f'--child_step={child[1]}', '--', *argv]
    return Child(cmd, os.path.join(self.logs, name), self.env, read_stdout=read_stdout)

  # -- reference --------------------------------------------------------------

  def reference(self) -> dict:
    workdir = os.path.join(self.root, 'reference')
    shutil.rmtree(workdir, ignore_errors=True)
    child = self.train('reference', workdir, self.fields())
    loop_start = child.wait_for_line('training ', CHILD_TIMEOUT_S)
    rc, hung = child.finish()
    end = time.monotonic()
    ok = self.check(rc == 0 and not hung and loop_start is not None,
                    f'reference run failed (exit {rc}, hung {hung}); see {child.log_path}.*')
    if not ok:
      raise SystemExit(self.summary_and_exit())
    steps, _ = checkpoint_dirs(workdir)
    self.reference_state = self.inspector.restore(workdir, self.args.steps)
    self.reference_dir = workdir
    self.loop_s = end - loop_start
    times = [t for t, line in child.lines if line and line.startswith('step ')]
    gaps = sorted(b - a for a, b in zip(times[1:], times[2:]))  # the first step compiles
    self.step_s = gaps[len(gaps) // 2] if gaps else self.loop_s / self.args.steps
    out = {'wall_s': round(end - child.start, 1), 'startup_s': round(loop_start - child.start, 1),
           'loop_s': round(self.loop_s, 1), 'median_step_s': round(self.step_s, 3),
           'checkpoints_kept': steps}
    self.log(f'reference: {out}')
    return out

  # -- kill -9 ----------------------------------------------------------------

  def kill_chain(self, c: int, first: int, kills: int) -> list[dict]:
    """Trials first..first+kills-1 in one workdir: each resume but the last is killed again.

    A kill therefore lands in a fresh run or in a resumed one (restore, data
    fast-forward, first steps); after the last kill the run is resumed to the
    end and its final state compared with the reference.
    """
    workdir = os.path.join(self.root, f'kill_chain_{c:02d}')
    shutil.rmtree(workdir, ignore_errors=True)
    fields = self.fields()
    trials, resume_failures, start, k = [], 0, 0, first
    child = self.train(f'kill_{k:02d}', workdir, fields)
    while True:
      # A random step from where this process starts, then a random moment within
      # about two steps' time: the kill lands in a train step, a progress line or
      # an async save (there is one every step), or in the start-up.
      target = self.rng.randrange(start, self.args.steps)
      delay = self.rng.uniform(0.0, 2.0 * self.step_s)
      seen = child.wait_for_line(f'step {target}/' if target > start else 'training ',
                                 CHILD_TIMEOUT_S)
      if seen is not None:
        time.sleep(max(0.0, seen + delay - time.monotonic()))
      killed = child.proc.poll() is None
      if killed:
        child.proc.send_signal(signal.SIGKILL)
      rc, hung = child.finish()
      if not killed and (rc != 0 or hung):
        resume_failures += 1
      progress = max(last_step_line(child.stdout_lines()), start)
      steps, tmp = checkpoint_dirs(workdir)
      # A half-written save of this process (older ones are left by earlier kills).
      tmp = [n for n in tmp if os.path.getmtime(
          os.path.join(workdir, 'checkpoints', n)) >= child.start_wall]
      restore_errors = {s: e for s, e in self.inspector.check_all(workdir).items() if e}
      last = k == first + kills - 1
      child = self.train(f'kill_{k:02d}_resume', workdir, fields)
      resumed = child.wait_for_line('resumed from ', CHILD_TIMEOUT_S)
      lines = child.stdout_lines()
      now_from = resumed_step(lines) if resumed is not None else 0
      trials.append({
          'trial': k, 'chain': c, 'kill_after_step_line': target, 'kill_delay_s': round(delay, 2),
          'killed': killed, 'last_logged_step': progress, 'checkpoints_on_disk': steps,
          'save_in_flight': bool(tmp), 'corrupt': sorted(restore_errors),
          'resumed_from': now_from, 'lost_steps': max(0, max(steps, default=0) - now_from),
          # Steps trained before the kill beyond the resume point; a lower bound, as
          # the progress line of a step is printed after the next step is dispatched.
          'recomputed_steps': max(0, progress - now_from), 'resume_failures': 0,
      })
      if restore_errors:
        self.log(f'trial {k}: corrupt checkpoints {restore_errors}')
      t = trials[-1]
      self.log(f'trial {k}/{self.args.trials}: killed {t["kill_delay_s"]}s after '
               f'{"step line " + str(target) if target > start else "start of the loop"} '
               f'(logged {t["last_logged_step"]}, on disk {t["checkpoints_on_disk"]}'
               f'{", save in flight" if t["save_in_flight"] else ""}) -> resumed from '
               f'{t["resumed_from"]}, lost {t["lost_steps"]}, recomputed '
               f'{t["recomputed_steps"]}')
      if last or now_from >= self.args.steps:  # the next chain takes the kills left
        break
      k, start = k + 1, now_from
    # The last resume runs to the end (and, were it to fail, is retried twice).
    for attempt in range(3):
      rc, hung = child.finish()
      if rc == 0 and not hung:
        break
      resume_failures += 1
      self.log(f'chain {c}: resume failed (exit {rc}, hung {hung}): '
               f'{error_lines(child.stderr_text())[-1:] or child.stderr_text()[-300:]}')
      child = self.train(f'kill_{k:02d}_retry{attempt}', workdir, fields)
    equal = False
    try:
      equal = self.inspector.equal(self.inspector.restore(workdir, self.args.steps),
                                   self.reference_state)
    except Exception as e:  # pylint: disable=broad-except
      self.log(f'chain {c}: final checkpoint does not restore: {e}')
    for t in trials:
      t['final_equal'] = equal
    trials[-1]['resume_failures'] = resume_failures
    self.log(f'chain {c}: final state bit-equal to the reference: {equal}')
    return trials

  def kill_trials(self) -> dict:
    trials, c = [], 0
    while len(trials) < self.args.trials:
      c += 1
      kills = min(self.args.kills_per_run, self.args.trials - len(trials))
      trials += self.kill_chain(c, len(trials) + 1, kills)
    out = {
        'trials': len(trials),
        'lost_steps': sum(t['lost_steps'] for t in trials),
        'recomputed_steps': sum(t['recomputed_steps'] for t in trials),
        'max_recomputed_steps': max((t['recomputed_steps'] for t in trials), default=0),
        'corrupt_checkpoints': sum(len(t['corrupt']) + t['resume_failures'] for t in trials),
        'final_params_equal': all(t['final_equal'] for t in trials),
        'kills_with_save_in_flight': sum(t['save_in_flight'] for t in trials),
        'kills_after_finish': sum(not t['killed'] for t in trials),
        'runs_to_the_end': c,
        'kill_trials': trials,
    }
    self.check(out['lost_steps'] == 0, f'kill -9: {out["lost_steps"]} checkpointed steps lost')
    self.check(out['corrupt_checkpoints'] == 0,
               f'kill -9: {out["corrupt_checkpoints"]} corrupt checkpoints / failed resumes')
    self.check(out['final_params_equal'], 'kill -9: a resumed run ended with other params')
    return out

  # -- SIGTERM ----------------------------------------------------------------

  def sigterm(self) -> dict:
    """SIGTERM after stdout was closed by the reader (e.g. `train.py ... | head`)."""
    workdir = os.path.join(self.root, 'sigterm')
    shutil.rmtree(workdir, ignore_errors=True)
    fields = self.fields(train_steps=100_000, checkpoint_every_steps=100_000)
    child = self.train('sigterm', workdir, fields, read_stdout=False)
    seen, lines = 0, []
    watchdog = threading.Timer(CHILD_TIMEOUT_S, child.proc.kill)
    watchdog.start()
    for line in child.proc.stdout:  # read until training is under way
      lines.append(line)
      if line.startswith('step '):
        seen = int(line.split()[1].split('/')[0])
        if seen >= 3:
          break
    watchdog.cancel()
    child.proc.stdout.close()  # the reader goes away: the child's next print hits EPIPE
    time.sleep(0.5)  # let it train (and print) a little into the closed pipe
    child.proc.send_signal(signal.SIGTERM)
    rc, hung = child.finish(timeout=120)
    steps, tmp = checkpoint_dirs(workdir)
    restore_errors = {s: e for s, e in self.inspector.check_all(workdir).items() if e}
    stderr = child.stderr_text()
    out = {'stdout': 'closed pipe', 'exit_code': rc, 'hung': hung, 'last_logged_step': seen,
           'checkpoints': steps, 'tmp_dirs_left': tmp, 'corrupt': sorted(restore_errors),
           'error': (error_lines(stderr) or [''])[-1][:300]}
    out['ok'] = (rc == 0 and not hung and len(steps) == 1 and steps[0] >= seen and not tmp
                 and not restore_errors)
    self.check(out['ok'], f'SIGTERM with stdout closed: {out}; see {child.log_path}.*')
    return out

  # -- NaN --------------------------------------------------------------------

  def nan(self) -> dict:
    workdir = os.path.join(self.root, 'nan')
    shutil.rmtree(workdir, ignore_errors=True)
    at = self.args.steps // 2
    child = self.train('nan', workdir, self.fields(), child=('nan', at))
    rc, hung = child.finish()
    stderr = child.stderr_text()
    messages = [l for l in stderr.splitlines() if 'non-finite' in l]
    message = messages[-1] if messages else ''
    steps, tmp = checkpoint_dirs(workdir)
    restored = {}
    for step in steps:
      try:
        restored[step] = self.inspector.finite(self.inspector.restore(workdir, step))
      except Exception as e:  # pylint: disable=broad-except
        restored[step] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
    good = [s for s, finite in restored.items() if finite is True]
    last_good = max(good, default=None)
    # Steps 1..at are finite; step at+1 is the first NaN step.
    out = {'nan_from_step': at + 1, 'exit_code': rc, 'hung': hung, 'message': message[:300],
           'one_line_error': bool(error_lines(stderr)) and 'non-finite' in error_lines(stderr)[-1],
           'checkpoints': steps, 'finite_by_step': {str(s): v for s, v in restored.items()},
           'last_good_checkpoint': last_good,
           'newest_checkpoint_finite': bool(steps) and restored.get(max(steps)) is True}
    names_range = f'between steps {at}' in message or f'steps {at} and {at + 1}' in message
    out['ok'] = (rc not in (0, None) and not hung and bool(message) and names_range
                 and last_good == at)
    self.check(out['ok'], f'NaN: {out}; see {child.log_path}.*')
    return out

  # -- full disk --------------------------------------------------------------

  def disk_full(self) -> dict:
    workdir = os.path.join(self.root, 'disk_full')
    shutil.rmtree(workdir, ignore_errors=True)
    at = self.args.steps // 2
    child = self.train('disk_full', workdir, self.fields(), child=('disk_full', at))
    rc, hung = child.finish()
    stderr = child.stderr_text()
    errors = error_lines(stderr)
    steps, tmp = checkpoint_dirs(workdir)
    restore_errors = {s: e for s, e in self.inspector.check_all(workdir).items() if e}
    previous_equal = None
    if at - 1 in steps and at - 1 not in restore_errors:
      previous_equal = self.inspector.finite(self.inspector.restore(workdir, at - 1))
    out = {'failed_save_step': at, 'exit_code': rc, 'hung': hung,
           'error': (errors or [''])[-1][:300], 'checkpoints': steps, 'tmp_dirs_left': tmp,
           'corrupt': sorted(restore_errors), 'previous_checkpoint_restores': previous_equal}
    out['ok'] = (rc not in (0, None) and not hung and bool(errors) and f'step {at}' in errors[-1]
                 and 'No space left' in errors[-1] and at - 1 in steps and at not in steps
                 and not restore_errors and previous_equal is True)
    self.check(out['ok'], f'full disk: {out}; see {child.log_path}.*')
    return out

  # -- truncated checkpoint ---------------------------------------------------

  def truncated_checkpoint(self) -> dict:
    workdir = os.path.join(self.root, 'truncated')
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(self.reference_dir, workdir, ignore=shutil.ignore_patterns('compile_cache'))
    last = self.args.steps
    step_dir = os.path.join(workdir, 'checkpoints', str(last))
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, 'state'))
             for f in fs]
    target = max(files, key=os.path.getsize)  # the array data
    os.truncate(target, os.path.getsize(target) // 2)
    fields = self.fields()
    child = self.train('truncated', workdir, fields)
    rc, hung = child.finish()
    stderr = child.stderr_text()
    lines = child.stdout_lines()
    errors = error_lines(stderr)
    steps, _ = checkpoint_dirs(workdir)
    out = {'truncated_file': os.path.relpath(target, workdir), 'exit_code': rc, 'hung': hung,
           'error': (errors or [''])[-1], 'resumed_from': resumed_step(lines)}
    if rc == 0:
      # Fell back on its own: it must say so and end equal to the reference.
      out['behaviour'] = 'fallback'
      warned = f'{last}' in stderr and 'corrupt' in stderr
      final = self.inspector.restore(workdir, last)
      out['final_equal'] = self.inspector.equal(final, self.reference_state)
      out['ok'] = warned and out['final_equal'] and out['resumed_from'] < last
    else:
      # Refused: one line naming the step and directory; what it says to do must work.
      out['behaviour'] = 'refused'
      named = bool(errors) and f'step {last}' in errors[-1] and step_dir in errors[-1]
      out['names_bad_checkpoint'] = named
      kept = os.path.isdir(step_dir) and steps == checkpoint_dirs(self.reference_dir)[0]
      out['nothing_deleted'] = kept
      # Follow the advice: move the bad step aside and run the same command again.
      os.rename(step_dir, step_dir + '.corrupt')
      again = self.train('truncated_after_move', workdir, fields)
      rc2, hung2 = again.finish()
      out['after_moving_it_aside'] = {'exit_code': rc2, 'hung': hung2,
                                      'resumed_from': resumed_step(again.stdout_lines())}
      equal = False
      if rc2 == 0:
        equal = self.inspector.equal(self.inspector.restore(workdir, last), self.reference_state)
      out['final_equal'] = equal
      out['ok'] = named and kept and 'mv ' in errors[-1] and equal and not hung
    self.check(out['ok'], f'truncated checkpoint: {out}; see {child.log_path}.*')
    return out

  # -- bad images -------------------------------------------------------------

  def bad_images(self, planted: dict, reference: dict) -> dict:
    from efficientnet_jax import experiment  # pylint: disable=g-import-not-at-top
    from efficientnet_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    spec = experiment.data_spec_from_config(config_from(self.fields()).data)
    info = input_pipeline.dataset_info(spec)
    out = {'planted_bad_files': planted['bad'], 'num_skipped': info['num_skipped'],
           'num_train': info['num_train'], 'num_eval': info['num_eval'],
           'good_train': planted['good_train'], 'good_eval': planted['good_test'],
           'training_completed': bool(reference)}
    out['ok'] = (info['num_skipped'] == planted['bad']
                 and info['num_train'] == planted['good_train']
                 and info['num_eval'] == planted['good_test'] and out['training_completed'])
    self.check(out['ok'], f'bad images: {out}')
    return out

  # -- all --------------------------------------------------------------------

  def run(self) -> dict:
    self.t0 = time.monotonic()
    shutil.rmtree(self.data_dir, ignore_errors=True)
    planted = make_image_folder(self.data_dir)
    if self.args.multiprocess:
      return self.run_multiprocess()
    self.log(f'image folder {self.data_dir}: {planted["good_train"]} + {planted["good_test"]} '
             f'good, {planted["bad"]} bad files; devices {self.args.devices}, '
             f'{self.args.steps} steps, checkpoint every step')
    self.inspector = Inspector(self.fields())
    self.result = {'trials': 0}
    reference = self.reference()
    others = threading.Thread(target=self.single_faults, daemon=True)
    if self.args.jobs > 1:
      others.start()
    self.result.update(self.kill_trials())
    if self.args.jobs > 1:
      others.join()
    else:
      self.single_faults()
    self.result['bad_images'] = self.bad_images(planted, reference)
    self.result['reference'] = reference
    return self.summary_and_exit()

  def run_multiprocess(self) -> int:
    import fault_drill_multiprocess  # pylint: disable=g-import-not-at-top
    self.result = {'multiprocess': fault_drill_multiprocess.MultiDrill(self).run()}
    return self.summary_and_exit()

  def single_faults(self) -> None:
    for name, fn in (('sigterm', self.sigterm), ('nan', self.nan), ('disk_full', self.disk_full),
                     ('truncated_checkpoint', self.truncated_checkpoint)):
      self.log(f'{name} ...')
      try:
        self.result[name] = fn()
      except Exception as e:  # pylint: disable=broad-except
        self.check(False, f'{name}: the drill itself failed: {type(e).__name__}: {e}')
        self.result[name] = {'ok': False, 'drill_error': f'{type(e).__name__}: {e}'}
      self.log(f'{name}: {self.result[name]}')

  def summary_and_exit(self) -> int:
    result = getattr(self, 'result', {})
    result['wall_s'] = round(time.monotonic() - self.t0, 1)
    result['failures'] = self.failures
    result['ok'] = not self.failures
    table = format_table(result)
    if self.args.json:
      print(table, file=sys.stderr)
      print(json.dumps(result, indent=1, default=str))
    else:
      print(table)
    return 0 if result['ok'] else 1


def format_table(r: dict) -> str:
  def mark(ok):
    return 'ok  ' if ok else 'FAIL'
  rows = []
  if r.get('trials'):
    rows.append((mark(r['lost_steps'] == 0 and r['corrupt_checkpoints'] == 0
                      and r['final_params_equal']),
                 f'kill -9 x{r["trials"]}',
                 f'lost steps {r["lost_steps"]}, corrupt checkpoints {r["corrupt_checkpoints"]}, '
                 f'final state bit-equal {r["final_params_equal"]}, recomputed steps '
                 f'{r["recomputed_steps"]} (max {r["max_recomputed_steps"]}/trial), '
                 f'{r["kills_with_save_in_flight"]} kills during a save'))
  if 'sigterm' in r:
    s = r['sigterm']
    rows.append((mark(s['ok']), 'SIGTERM, stdout closed',
                 f'exit {s["exit_code"]}, hung {s["hung"]}, checkpoints {s["checkpoints"]} '
                 f'(step >= {s["last_logged_step"]}), tmp dirs left {len(s["tmp_dirs_left"])}'))
  if 'nan' in r:
    s = r['nan']
    rows.append((mark(s['ok']), 'NaN loss',
                 f'exit {s["exit_code"]}: "{s["message"][:110]}"; last good checkpoint '
                 f'{s["last_good_checkpoint"]}, newest finite {s["newest_checkpoint_finite"]}'))
  if 'disk_full' in r:
    s = r['disk_full']
    rows.append((mark(s['ok']), 'full disk in a save',
                 f'exit {s["exit_code"]}: "{s["error"][:110]}"; checkpoints {s["checkpoints"]}, '
                 f'previous restores {s["previous_checkpoint_restores"]}'))
  if 'truncated_checkpoint' in r:
    s = r['truncated_checkpoint']
    rows.append((mark(s['ok']), 'truncated checkpoint',
                 f'{s["behaviour"]}: "{s["error"][:140]}"; final state equal {s["final_equal"]}'))
  if 'bad_images' in r:
    s = r['bad_images']
    rows.append((mark(s['ok']), 'bad image files',
                 f'{s["num_skipped"]}/{s["planted_bad_files"]} skipped and counted, '
                 f'{s["num_train"]} train images used, training completed '
                 f'{s["training_completed"]}'))
  if 'multiprocess' in r:
    import fault_drill_multiprocess  # pylint: disable=g-import-not-at-top
    rows += fault_drill_multiprocess.format_rows(r['multiprocess'])
  width = max((len(name) for _, name, _ in rows), default=10)
  lines = [f'{"":4}  {"fault":{width}}  outcome']
  lines += [f'{ok}  {name:{width}}  {detail}' for ok, name, detail in rows]
  verdict = ('all checks passed' if r.get('ok')
             else 'FAILED: ' + '; '.join(x[:200] for x in r.get('failures', [])))
  lines.append(f'wall {r.get("wall_s")} s; {verdict}')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--trials', type=int, default=20, help='kill -9 trials (default 20)')
  parser.add_argument('--seed', type=int, default=0, help='seed of the random kill times')
  parser.add_argument('--workdir', default=None, help='where to work (default: a temp dir)')
  parser.add_argument('--json', action='store_true', help='print one JSON object to stdout')
  parser.add_argument('--steps', type=int, default=12, help='training steps of each run')
  parser.add_argument('--devices', type=int, default=2, help='simulated CPU devices')
  parser.add_argument('--kills_per_run', type=int, default=2,
                      help='kills before a run may finish: each resume but the last is '
                           'killed again (default 2)')
  parser.add_argument('--compile_cache', default=None,
                      help='JAX compilation cache (default <workdir>/compile_cache)')
  parser.add_argument('--jobs', type=int, default=2,
                      help='2: the single faults run beside the kill trials (default 2)')
  parser.add_argument('--multiprocess', action='store_true',
                      help='run the 2-process faults instead (scripts/fault_drill_multiprocess.py):'
                           ' --trials kills of one of two jax.distributed processes, SIGTERM to '
                           'all and to one, corrupt checkpoint files')
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--child_step', type=int, default=0, help=argparse.SUPPRESS)
  args, rest = parser.parse_known_args(argv)
  if args.child:
    _child_main(args.child, args.child_step, [a for a in rest if a != '--'])
    return 0
  if args.trials < 0:
    parser.error(f'--trials={args.trials}; accepted: >= 0')
  if args.kills_per_run < 1:
    parser.error(f'--kills_per_run={args.kills_per_run}; accepted: >= 1')
  if args.steps < 4:
    parser.error(f'--steps={args.steps}; accepted: >= 4')
  if args.multiprocess:
    args.devices = 4  # the drill's own restores see one process's devices
  if args.devices < 1 or 8 % args.devices:
    parser.error(f'--devices={args.devices}; accepted: 1, 2, 4 or 8 (batch 8)')
  temp = None
  if args.workdir is None:
    temp = tempfile.mkdtemp(prefix='fault_drill_')
    args.workdir = temp
  # This process restores checkpoints too: the same device count as the children.
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ['JAX_PLATFORMS'] = 'cpu'
  try:
    return Drill(args).run()
  finally:
    if temp is not None:
      shutil.rmtree(temp, ignore_errors=True)


if __name__ == '__main__':
  sys.exit(main())
