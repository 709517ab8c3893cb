"""2 processes x 4 CPU devices (jax.distributed on 127.0.0.1) train like 1 process x 8."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from efficientnet_jax import state as state_lib
from tests.smoke_run import smoke_config as _config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _flags(data_root, workdir):
  return ['--config=configs/base.py:smoke', f'--workdir={workdir}',
          '--config.data.name=fashion_mnist', '--config.data.eval_split=test',
          f'--config.data.source_dir={data_root / "idx"}',
          f'--config.data.data_dir={data_root / "tfds"}',
          f'--config.train_steps={STEPS}', '--config.data.process_sharding=batch',
          '--config.compilation_cache_dir=none']


def test_two_processes_match_one_process(data_root, tmp_path):
  # Both sides run as fresh `train.py` processes with the same environment, so
  # nothing a test before this one left in this process (JAX's compilation
  # cache, config) can make them differ.
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  reference = tmp_path / 'one'
  one = subprocess.run(
      [sys.executable, 'train.py', *_flags(data_root, reference)], cwd=REPO,
      env=dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=8'),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
  assert one.returncode == 0, one.stdout[-3000:]

  workdir = tmp_path / 'two'
  env = dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, 'train.py', *_flags(data_root, workdir),
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    outputs.append(out)
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]
  assert f"on 8 devices (mesh {{'data': 8}}), steps 0->{STEPS}" in outputs[0]
  # Eval saw every one of the 13 test examples exactly once across the processes.
  assert 'eval step 3:' in outputs[0] and '13 examples' in outputs[0]

  _, a, step_a = state_lib.load_checkpoint(_config(data_root), str(reference))
  _, b, step_b = state_lib.load_checkpoint(_config(data_root), str(workdir))
  assert step_a == step_b == STEPS
  a, b = jax.device_get(a), jax.device_get(b)
  for tree in ('params', 'batch_stats', 'ema'):
    flat_a = jax.tree_util.tree_leaves_with_path(a[tree])
    flat_b = jax.tree_util.tree_leaves_with_path(b[tree])
    for (path, x), (_, y) in zip(flat_a, flat_b):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6,
                                 err_msg=f'{tree}{jax.tree_util.keystr(path)}')


def _launch_pair(data_root, workdir, log_dir, name, steps):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1',
             XLA_FLAGS='--xla_force_host_platform_device_count=4', PYTHONUNBUFFERED='1',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  flags = [f if not f.startswith('--config.train_steps=') else f'--config.train_steps={steps}'
           for f in _flags(data_root, workdir)]
  flags = [f for f in flags if not f.startswith('--config.compilation_cache_dir')]
  flags += [f'--config.compilation_cache_dir={log_dir / "cache"}',
            '--config.checkpoint_every_steps=2', '--config.peer_failure_timeout_s=5']
  port = _free_port()
  procs, logs = [], []
  for i in range(2):
    out = log_dir / f'{name}.p{i}.out'
    logs.append(out)
    with open(out, 'w') as f:  # the child keeps its own descriptor
      procs.append(subprocess.Popen(
          [sys.executable, 'train.py', *flags, f'--coordinator_address=127.0.0.1:{port}',
           '--num_processes=2', f'--process_id={i}'],
          cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True))
  return procs, logs


def _wait_for(log, text, procs, timeout=300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if text in log.read_text(errors='replace'):
      return
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.2)
  for p in procs:
    p.kill()
  raise AssertionError(f'{text!r} not in {log}:\n{log.read_text(errors="replace")[-3000:]}')


def test_sigterm_to_one_process_and_a_lost_process(data_root, tmp_path):
  # SIGTERM to process 1 only: JAX's preemption sync point stops both at the
  # same step, both save it (one checkpoint) and exit 0.
  from efficientnet_jax import experiment  # pylint: disable=g-import-not-at-top
  from efficientnet_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  # Prepared here: two processes building one tfds directory at once collide.
  input_pipeline.dataset_info(experiment.data_spec_from_config(_config(data_root).data))
  workdir = tmp_path / 'run'
  procs, logs = _launch_pair(data_root, workdir, tmp_path, 'sigterm', steps=200)
  _wait_for(logs[0], 'step 3/', procs)
  procs[1].send_signal(signal.SIGTERM)
  codes = [p.wait(timeout=300) for p in procs]
  texts = [log.read_text(errors='replace') for log in logs]
  assert codes == [0, 0], texts[0][-2000:] + texts[1][-2000:]
  saved = [re.search(r'SIGTERM: saved step (\d+)', t) for t in texts]
  assert all(saved), texts
  step = int(saved[0].group(1))
  assert int(saved[1].group(1)) == step >= 3
  assert str(step) in os.listdir(workdir / 'checkpoints')

  # The relaunch resumes there; kill -9 of process 1 makes process 0 stop within
  # peer_failure_timeout_s (+ slack) with one line naming it, exit 75.
  procs, logs = _launch_pair(data_root, workdir, tmp_path, 'kill', steps=200)
  _wait_for(logs[0], f'at step {step} ', procs)
  _wait_for(logs[0], f'step {step + 2}/', procs)
  procs[1].kill()
  killed = time.monotonic()
  code = procs[0].wait(timeout=120)
  waited = time.monotonic() - killed
  text = logs[0].read_text(errors='replace')
  assert code == 75, text[-3000:]
  assert waited < 5 + 10, waited
  lines = [l for l in text.splitlines() if l.startswith('error:')]
  assert lines and 'process 1 of 2 stopped' in lines[-1], text[-3000:]
  assert not [n for n in os.listdir(workdir / 'checkpoints') if n.endswith('.corrupt')]
