"""The trainer: sharded == single-device step, checkpoint/resume, eval counting, bad input."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficientnet_jax import state as state_lib
from efficientnet_jax import steps
from efficientnet_jax.model import architectures
from efficientnet_jax import optim
from efficientnet_jax import sharding
from efficientnet_jax import train
from efficientnet_jax.model import create_model
from tests import smoke_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_model():
  spec = dataclasses.replace(architectures.v1_spec(0.25, 0.25, 32, 0.2), bn_momentum=0.9)
  return create_model(spec, num_classes=10)


def _one_step(mesh, state, batch, model, tx):
  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  step_fn = jax.jit(
      functools.partial(steps.train_step, model=model, tx=tx, ema_decay=0.99,
                        label_smoothing=0.1),
      in_shardings=(replicated, batch_sharding, replicated),
      out_shardings=(replicated, replicated))
  state = jax.device_put(state, replicated)
  batch = jax.device_put(batch, batch_sharding)
  return step_fn(state, batch, jax.device_put(jax.random.key(3), replicated))


def test_sharded_step_equals_single_device_step():
  assert jax.device_count() == 8
  model = _tiny_model()
  tx = optim.make_optimizer(name='rmsprop', learning_rate=optax.constant_schedule(0.05),
                            weight_decay=1e-5, weight_decay_mask=optim.weight_decay_mask)
  state = jax.jit(functools.partial(state_lib.create_train_state, model=model, tx=tx,
                                    image_size=32))(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
           'label': np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]}
  host_state = jax.device_get(state)
  s8, m8 = _one_step(sharding.make_mesh(), host_state, batch, model, tx)
  s1, m1 = _one_step(sharding.make_mesh(jax.devices()[:1]), host_state, batch, model, tx)
  assert s8['params']['stem_conv']['kernel'].sharding.num_devices == 8
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  for tree in ('params', 'batch_stats', 'ema'):
    for a, b in zip(jax.tree.leaves(s8[tree]), jax.tree.leaves(s1[tree])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # BN statistics are over the global batch: they moved away from init, equally on both.
  init_var = host_state['batch_stats']['stem_bn']['var']
  assert not np.allclose(s8['batch_stats']['stem_bn']['var'], init_var)


def test_batch_stats_are_global_batch_statistics():
  model = _tiny_model()
  x = np.random.default_rng(1).normal(size=(16, 32, 32, 3)).astype(np.float32) * 2 + 1
  variables = jax.jit(model.init)(jax.random.key(0), x)
  apply = functools.partial(model.apply, train=True, mutable=['batch_stats'],
                            rngs={'dropout': jax.random.key(1)})
  mesh = sharding.make_mesh()
  sharded = jax.jit(apply, in_shardings=(sharding.replicated(mesh),
                                         sharding.batch_sharding(mesh)))(variables, x)
  single = jax.jit(apply)(variables, x)
  for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(single[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope='module')
def fake_fashion_mnist(tmp_path_factory):
  """40 train / 13 test IDX images in a throwaway dir: the real Fashion-MNIST builder, tiny."""
  return smoke_run.write_fake_data(tmp_path_factory.mktemp('fashion'))


@pytest.fixture(autouse=True)
def _data_dirs(fake_fashion_mnist, monkeypatch):
  monkeypatch.setattr(sys.modules[__name__], '_DATA_ROOT', fake_fashion_mnist)


_DATA_ROOT = None


def _smoke_config(**overrides):
  return smoke_run.smoke_config(_DATA_ROOT, **overrides)


def _params(config, workdir):
  _, state, step = state_lib.load_checkpoint(config, workdir)
  return step, jax.device_get(state)


def test_two_step_run_checkpoints_and_resumes(tmp_path):
  result = train.run(_smoke_config(), str(tmp_path)).eval
  assert result['count'] == 13
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
  records = [l for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert any('"split": "train"' in r and '"images_per_sec"' in r for r in records)
  assert any('"split": "eval"' in r and '"top5"' in r for r in records)
  assert (tmp_path / 'config.json').exists()
  # The same command with a longer schedule resumes at step 2.
  train.run(_smoke_config(train_steps=3), str(tmp_path))
  step, _ = _params(_smoke_config(), str(tmp_path))
  assert step == 3


# Slow (27 s): tests/test_fault_drill.py resumes a killed run and requires the same
# final params; test_two_step_run_checkpoints_and_resumes covers the resume itself.
@pytest.mark.slow
def test_interrupted_run_ends_with_the_same_params(tmp_path):
  train.run(_smoke_config(train_steps=4), str(tmp_path / 'straight'))
  train.run(_smoke_config(train_steps=2), str(tmp_path / 'resumed'))
  train.run(_smoke_config(train_steps=4), str(tmp_path / 'resumed'))
  step_a, a = _params(_smoke_config(), str(tmp_path / 'straight'))
  step_b, b = _params(_smoke_config(), str(tmp_path / 'resumed'))
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_diverged_state_is_never_checkpointed(tmp_path, monkeypatch):
  # The loss is only looked at on log steps; a save between two of them must
  # still refuse a NaN state and keep the last good checkpoint.
  real_step = steps.train_step

  def nan_from_step_2(state, batch, key, **kwargs):
    scale = jnp.where(state['step'] >= 2, jnp.nan, 1.0)
    return real_step(state, {**batch, 'image': batch['image'] * scale}, key, **kwargs)

  monkeypatch.setattr(steps, 'train_step', nan_from_step_2)
  config = _smoke_config(train_steps=5, log_every_steps=100, checkpoint_every_steps=1,
                         eval_every_steps=100)
  with pytest.raises(FloatingPointError,
                     match=r'^non-finite parameters between steps 2 and 3; not saved, '
                           r'the checkpoint at step 2 is kept$'):
    train.run(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
  step, state = _params(_smoke_config(), str(tmp_path))
  assert step == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))


def test_eval_counts_every_example_once(tmp_path):
  # 13 test examples, eval batch 8 over 8 devices: one full and one padded batch.
  result = train.run(_smoke_config(train_steps=1), str(tmp_path)).eval
  assert result['count'] == 13
  assert 0.0 <= result['top1'] <= 1.0


def _untouched(path):
  return not path.exists() or not any(path.iterdir())


@pytest.mark.parametrize('overrides,message', [
    (dict(batch_size=12), r'^batch_size=12 is not divisible by the device count 8'),
    (dict(eval_batch_size=4), r'^eval_batch_size=4 is not divisible by the device count 8'),
    ({'data.augment': 'autoaugmnt'}, r"autoaugmnt"),
    ({'model.name': 'b9'}, r"unknown model 'b9'; valid names: b0"),
    (dict(optimizer='adam'), r"'adam'.*rmsprop"),
    (dict(dtype='fp16'), r"dtype='fp16'; accepted: float32, bfloat16"),
])
def test_bad_config_values_fail_before_touching_the_workdir(tmp_path, overrides, message):
  workdir = tmp_path / 'w'
  with pytest.raises(ValueError, match=message):
    train.run(_smoke_config(**overrides), str(workdir))
  assert _untouched(workdir)


def test_missing_dataset_names_it(tmp_path):
  with pytest.raises(Exception, match='no_such_dataset'):
    train.run(_smoke_config(**{'data.name': 'no_such_dataset'}), str(tmp_path / 'w'))
  assert _untouched(tmp_path / 'w')


def test_workdir_of_another_model_is_refused_and_kept(tmp_path):
  train.run(_smoke_config(train_steps=1), str(tmp_path))
  before = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  config_json = (tmp_path / 'config.json').read_text()
  with pytest.raises(ValueError, match=r'holds a checkpoint \(step 1\) of a different model'):
    train.run(_smoke_config(**{'model.width': 0.5}), str(tmp_path))
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == before
  assert (tmp_path / 'config.json').read_text() == config_json


def _train_cli(*args):
  return subprocess.run([sys.executable, 'train.py', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120)


@pytest.mark.parametrize('flag,message', [
    ('--config.batch_sise=3',
     "error: unknown config field 'batch_sise'; did you mean 'batch_size'?"),
    ('--config.modle.name=b0',
     "error: unknown config field 'modle.name'; did you mean 'model.name'?"),
    ('--config.model.ph=3', "error: unknown config field 'model.ph'; did you mean 'model.phi'?"),
    ('--config.batch_size=abc',
     "error: flag --config.batch_size=abc: invalid literal for int() with base 10: 'abc'"),
])
def test_cli_flag_errors_are_one_line_and_exit_2(tmp_path, flag, message):
  result = _train_cli('--config=configs/demo.py', f'--workdir={tmp_path / "w"}', flag)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [message]
  assert _untouched(tmp_path / 'w')


def test_cli_value_error_is_one_line_and_exit_2(tmp_path):
  result = _train_cli('--config=configs/demo.py', f'--workdir={tmp_path / "w"}',
                      '--config.batch_size=100')
  assert result.returncode == 2
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert errors == ['error: batch_size=100 is not divisible by the device count 8; '
                    'use a multiple of 8']
  assert _untouched(tmp_path / 'w')


def test_evaluate_cli_reads_the_checkpoint_at_another_resolution(tmp_path, capsys):
  from efficientnet_jax import evaluate  # pylint: disable=g-import-not-at-top
  train.run(_smoke_config(train_steps=1), str(tmp_path))
  out = evaluate.evaluate_checkpoint(_smoke_config(), str(tmp_path), image_size=40)
  assert (out['step'], out['image_size'], out['ema']['count'], out['raw']['count']) == (
      1, 40, 13, 13)
  # Without --config the CLI reads the config.json training saved: the same numbers.
  assert evaluate.main([f'--workdir={tmp_path}', '--image_size=40', '--json']) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out


# Slow (70 s in the suite): tests/test_fault_drill.py's SIGTERM case checks the same
# (exit 0, one fresh checkpoint) through train.py with a closed stdout.
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'w'
  args = [sys.executable, 'train.py', '--config=configs/base.py:smoke', f'--workdir={workdir}',
          '--config.data.name=fashion_mnist', '--config.data.eval_split=test',
          f'--config.data.source_dir={_DATA_ROOT / "idx"}',
          f'--config.data.data_dir={_DATA_ROOT / "tfds"}',
          '--config.train_steps=100000', '--config.checkpoint_every_steps=100000',
          '--config.eval_every_steps=100000']
  proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  lines = []
  for line in proc.stdout:  # wait until training is under way
    lines.append(line)
    if line.startswith('step 3/'):
      break
  proc.send_signal(signal.SIGTERM)
  rest, _ = proc.communicate(timeout=120)
  output = ''.join(lines) + rest
  assert proc.returncode == 0, output[-2000:]
  saved = [l for l in output.splitlines() if l.startswith('SIGTERM: saved step')]
  assert len(saved) == 1, output[-2000:]
  step = int(saved[0].split()[3])
  assert step >= 3
  assert str(step) in os.listdir(workdir / 'checkpoints')


def test_two_step_run_under_tfds_mock_data_checkpoints_and_resumes(tmp_path, monkeypatch):
  # A TFDS dataset by name, its examples generated by tfds.testing.mock_data.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from efficientnet_jax import checkpointing  # pylint: disable=g-import-not-at-top
  # mock_data swaps tf.io.gfile for an in-memory filesystem while tfds builds a
  # dataset; an async orbax write in flight at that moment would land there.
  monkeypatch.setattr(checkpointing, 'make_checkpoint_manager', functools.partial(
      checkpointing.make_checkpoint_manager, async_save=False))
  overrides = {'data.name': 'mnist', 'data.eval_split': 'test'}
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.run(_smoke_config(**overrides), str(tmp_path)).eval
    assert result['count'] == 24
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
    train.run(_smoke_config(train_steps=3, **overrides), str(tmp_path))
    step, _ = _params(_smoke_config(**overrides), str(tmp_path))
  assert step == 3
