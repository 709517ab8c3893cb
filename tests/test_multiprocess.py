"""2 processes x 4 CPU devices (jax.distributed on 127.0.0.1) train like 1 process x 8."""

import os
import socket
import subprocess
import sys

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
