"""The 2-D `data x model` mesh (config.mesh_model) on 8 simulated devices.

A 4x2 step equals the 1-D replicated step, the state per device shrinks by the
model axis (x the data axis under FSDP), a 2-D checkpoint restores onto 1-D
meshes and back, and bad mesh_model values fail in one line.
"""

import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from efficientnet_jax import state as state_lib
from efficientnet_jax import steps
from efficientnet_jax.model import architectures
from efficientnet_jax import evaluate
from efficientnet_jax import optim
from efficientnet_jax import sharding
from efficientnet_jax import state_layout
from efficientnet_jax import train
from efficientnet_jax.model import create_model
from tests import state_compare
from tests.smoke_run import smoke_config as _config
from tests.smoke_run import snapshot as _snapshot


def _tx():
  return optim.make_optimizer(name='rmsprop', learning_rate=optax.constant_schedule(0.05),
                              weight_decay=1e-5, weight_decay_mask=optim.weight_decay_mask)


def _ideal_ratio(model, tx, image_size, data, model_axis, fsdp):
  """Replicated / 2-D bytes per device of params + optimizer state, from shapes alone."""
  init_fn = functools.partial(state_lib.create_train_state, model=model, tx=tx,
                              image_size=image_size)
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  full = sharded = 0
  for a in jax.tree.leaves((abstract['params'], abstract['opt_state'])):
    n = a.size * a.dtype.itemsize
    spec = sharding.mesh2d_spec(tuple(a.shape), data, model_axis, fsdp=fsdp)
    split = 1
    for axes in spec:
      for axis in (axes if isinstance(axes, tuple) else (axes,)):
        split *= {'data': data, 'model': model_axis, None: 1}[axis]
    full += n
    sharded += n // split
  return full / sharded


def test_mesh2d_spec_rules():
  spec = functools.partial(sharding.mesh2d_spec, data_size=4, model_size_=2)
  # Conv / dense kernels: output channels over `model`, under FSDP inputs over `data`.
  assert spec((3, 3, 64, 128), fsdp=False) == P(None, None, None, 'model')
  assert spec((3, 3, 64, 128), fsdp=True) == P(None, None, 'data', 'model')
  assert spec((1280, 1000), fsdp=True) == P('data', 'model')
  # Depthwise (kh, kw, 1, C): no second large dim, so C splits over both axes.
  assert spec((5, 5, 1, 1024), fsdp=True) == P(None, None, None, ('model', 'data'))
  # The last dim indivisible by `model`: the largest divisible one takes it.
  assert spec((1, 1, 1280, 1001), fsdp=False) == P(None, None, 'model', None)
  assert spec((128,), fsdp=True) == P()  # small: replicated
  assert spec((4099, 3), fsdp=True) == P()  # nothing divisible
  # model axis 1: exactly the 1-D rules.
  for shape in ((3, 3, 64, 128), (1, 1, 1280, 12), (128,), (4099, 3)):
    assert sharding.mesh2d_spec(shape, 8, 1, fsdp=True) == sharding.fsdp_spec(shape, 8)
    assert sharding.mesh2d_spec(shape, 8, 1, fsdp=False) == P()


def test_make_mesh_shapes():
  assert dict(sharding.make_mesh().shape) == {'data': 8}
  assert dict(sharding.make_mesh(model=2).shape) == {'data': 4, 'model': 2}
  assert dict(sharding.make_mesh(jax.devices()[:4], model=4).shape) == {'data': 1, 'model': 4}
  with pytest.raises(ValueError, match=r'^mesh_model=3; accepted: a divisor of the device '
                                       r'count 8 \(1, 2, 4, 8\)$'):
    sharding.make_mesh(model=3)
  sharding.check_batch_size(12, sharding.make_mesh(model=2))  # 12 = 3 x data axis 4
  with pytest.raises(ValueError, match=r'^batch_size=12 is not divisible by the device count 8'):
    sharding.check_batch_size(12, sharding.make_mesh())


def test_2d_step_equals_replicated_step_and_divides_state_bytes():
  assert jax.device_count() == 8
  # test_fsdp's model, optimizer and batch. The reference is the 1-D replicated
  # step on 4 devices, the same 4-way batch split as the `data` axis, so the
  # comparison sees what the `model` axis changes.
  spec = dataclasses.replace(architectures.v1_spec(1.0, 0.25, 32, 0.2), bn_momentum=0.9)
  model, tx = create_model(spec, num_classes=16), _tx()
  init_fn = functools.partial(state_lib.create_train_state, model=model, tx=tx, image_size=32)
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
           'label': np.eye(16, dtype=np.float32)[rng.integers(0, 16, 16)]}
  states, metrics, bytes_ = {}, {}, {}
  # (name, mesh_model, sharding, take a step): 4x2 'replicate' is only measured
  # (its step is 4x2 FSDP's program less the `data` gathers).
  for name, devices, model_axis, mode, step_it in (
      ('1d', 4, 1, 'replicate', True), ('1d 8', 8, 1, 'replicate', False),
      ('4x2', 8, 2, 'replicate', False), ('4x2 fsdp', 8, 2, 'fsdp', True)):
    mesh = sharding.make_mesh(jax.devices()[:devices], model=model_axis)
    shardings = sharding.state_shardings(abstract, mesh, mode)
    state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(0))
    bytes_[name] = sharding.bytes_per_device((state['params'], state['opt_state']))
    if not step_it:
      continue
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, ema_decay=0.99,
                                     label_smoothing=0.1),
                   in_shardings=(shardings, batch_sharding, replicated),
                   out_shardings=(shardings, replicated))
    new_state, m = step(state, jax.device_put(batch, batch_sharding),
                        jax.device_put(jax.random.key(3), replicated))
    kernel = new_state['params']['head_conv']['kernel']  # split after the step, not gathered
    assert kernel.addressable_shards[0].data.size * (8 if model_axis > 1 else 1) == kernel.size
    states[name], metrics[name] = jax.device_get(new_state), jax.device_get(m)
  ratios = {name: bytes_['1d'] / bytes_[name] for name in ('1d 8', '4x2', '4x2 fsdp')}
  print(f'per-device params+opt bytes: {bytes_}; 1-D replicated / 2-D: {ratios}')
  assert ratios['4x2'] == pytest.approx(_ideal_ratio(model, tx, 32, 4, 2, False), rel=0.02)
  assert ratios['4x2 fsdp'] == pytest.approx(_ideal_ratio(model, tx, 32, 4, 2, True), rel=0.02)
  assert ratios['1d 8'] == 1 and ratios['4x2'] > 1.8 and ratios['4x2 fsdp'] > 6.5
  np.testing.assert_allclose(metrics['4x2 fsdp']['loss'], metrics['1d']['loss'], rtol=1e-5)
  # The optimizer state holds the gradient itself: its sums over the batch and
  # 16x16 positions cancel heavily, and fp32 rounding in another order moves it
  # by up to 2e-5 of its scale (as much between 1-D on 4 and on 8 devices).
  worst = state_compare.assert_states_close(states['4x2 fsdp'], states['1d'],
                                            bounds={'opt_state': 3e-5})
  print('largest |4x2 fsdp - 1d| / max|1d| per group: ' + state_compare.describe(worst))
  assert not np.allclose(states['1d']['batch_stats']['stem_bn']['var'], 1.0)  # BN moved


def test_b7_ratio_from_shapes():
  model, tx = create_model(architectures.get_spec('b7'), num_classes=1000), _tx()
  ratios = {(data, model_axis, fsdp): _ideal_ratio(model, tx, 64, data, model_axis, fsdp)
            for data, model_axis, fsdp in ((4, 2, False), (4, 2, True), (2, 4, True))}
  print(f'B7 per-device params+opt bytes, replicated / (data, model, fsdp): {ratios}')
  assert ratios[(4, 2, False)] > 1.95  # output channels over `model` alone
  assert ratios[(4, 2, True)] > 7.5 and ratios[(2, 4, True)] > 7.5


def test_restore_2d_onto_1d_and_back(data_root, tmp_path):
  devices, workdir = jax.devices(), str(tmp_path / 'w')
  config_2d = _config(data_root, train_steps=2, sharding='fsdp', mesh_model=2)
  train.run(config_2d, workdir)  # 2 steps on a 4x2 FSDP mesh
  # The step-2 checkpoint read onto its own layout and onto one device: the same bits.
  # One device replicates, so it holds the state flat (state_layout.py); cut
  # back into per-leaf arrays it is the 2-D checkpoint exactly.
  _, on_2d, _ = state_lib.load_checkpoint(config_2d, workdir, step=2)
  assert on_2d['params']['head_conv']['kernel'].sharding.spec == P(None, None, 'data', 'model')
  _, on_1, _ = state_lib.load_checkpoint(_config(data_root), workdir, step=2,
                                     mesh=sharding.make_mesh(devices[:1]))
  assert on_1['ema'].ndim == 1
  per_leaf = jax.jit(lambda s: state_layout.relayout(s, jax.eval_shape(lambda: on_2d)))(on_1)
  flat_2d = jax.tree_util.tree_leaves_with_path(jax.device_get(on_2d))
  for (path, x), y in zip(flat_2d, jax.tree.leaves(jax.device_get(per_leaf))):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  # One more step on 1 device, then back: evaluate.py on a 2x4 mesh repeats its eval.
  result = train.run(_config(data_root, train_steps=3), workdir, devices=devices[:1]).eval
  assert result['count'] == 13
  again = evaluate.evaluate_checkpoint(_config(data_root, mesh_model=4), workdir)
  assert again['step'] == 3
  for key in ('top1', 'top5', 'count'):
    assert again['ema'][key] == result[key]
  np.testing.assert_allclose(again['ema']['loss'], result['loss'], rtol=1e-5)


@pytest.mark.parametrize('overrides,message', [
    (dict(mesh_model=0), r"^mesh_model=0; accepted: a positive integer dividing the device "
                         r"count$"),
    (dict(mesh_model=-2), r"^mesh_model=-2; accepted: a positive integer dividing the "
                          r"device count$"),
    (dict(mesh_model=True), r"^mesh_model=True; accepted: a positive integer dividing the "
                            r"device count$"),
    (dict(mesh_model=3), r"^mesh_model=3; accepted: a divisor of the device count 8 "
                         r"\(1, 2, 4, 8\)$"),
    (dict(mesh_model=16), r"^mesh_model=16; accepted: a divisor of the device count 8 "
                          r"\(1, 2, 4, 8\)$"),
    (dict(mesh_model=2, batch_size=6),
     r"^batch_size=6 is not divisible by the data-axis size 4 \(8 devices / mesh_model=2\); "
     r"use a multiple of 4$"),
    (dict(mesh_model=4, eval_batch_size=3),
     r"^eval_batch_size=3 is not divisible by the data-axis size 2 \(8 devices / "
     r"mesh_model=4\); use a multiple of 2$"),
])
def test_bad_mesh_model_is_one_line_naming_the_field(data_root, tmp_path, overrides,
                                                     message):
  workdir = tmp_path / 'w'
  with pytest.raises(ValueError, match=message) as error:
    train.run(_config(data_root, **overrides), str(workdir))
  assert '\n' not in str(error.value)
  assert _snapshot(workdir) == []
