"""scripts/profile_step.py's bookkeeping: op classes and exclusive times (no profiling here)."""

from tests.script_loader import load_script


def _script():
  return load_script('profile_step')


def test_jax_ops_are_classified_by_their_name_stack():
  classify = _script().classify_jax_op
  model, grad = 'jit(train_step)/jvp(EfficientNet)', 'jit(train_step)/transpose(jvp(EfficientNet))'
  assert classify(f'{model}/block_3/dw_conv/ffi_call') == 'depthwise conv fwd'
  assert classify(f'{grad}/block_3/dw_conv/while/body/reduce') == 'depthwise conv bwd'
  assert classify(f'{grad}/block_3/expand_conv/dot_general') == '1x1 conv bwd'
  assert classify(f'{model}/block_3/block_3._bn/dw_bn/jit(silu)/mul') == 'BN + activation'
  assert classify(f'{model}/block_3/se/mul') == 'squeeze-excite'
  assert classify(f'{model}/stem_conv/slice') == 'stem, head, loss'
  assert classify('jit(train_step)/jvp(jit(log_softmax))/exp') == 'stem, head, loss'
  rng = classify(f'{model}/EfficientNet._drop_masks/jit(_uniform)')
  assert rng == 'RNG (dropout, drop-connect)'
  assert classify('jit(train_step)/add') == 'optimizer + EMA'
  assert classify('') == 'other'


def test_torch_ops_are_classified_by_name_shapes_and_direction():
  classify = _script().classify_torch_op
  x, pooled = [32, 96, 56, 56], [32, 96, 1, 1]
  assert classify('aten::conv2d', [x, [96, 1, 3, 3]], False) == 'depthwise conv fwd'
  assert classify('aten::convolution_backward', [x, x, [96, 1, 3, 3]], True) == 'depthwise conv bwd'
  assert classify('aten::conv2d', [x, [24, 96, 1, 1]], False) == '1x1 conv fwd'
  assert classify('aten::conv2d', [pooled, [4, 96, 1, 1]], False) == 'squeeze-excite'
  assert classify('aten::conv2d', [[32, 3, 224, 224], [32, 3, 3, 3]], False) == 'stem, head, loss'
  assert classify('aten::batch_norm', [x], False) == 'BN + activation'
  assert classify('aten::silu_', [pooled], False) == 'squeeze-excite'
  assert classify('aten::add_', [x, x], False) == 'other'


def test_exclusive_time_subtracts_nested_events_on_the_same_thread():
  events = [{'pid': 1, 'tid': 1, 'ts': 0.0, 'dur': 10.0, 'name': 'while'},
            {'pid': 1, 'tid': 1, 'ts': 1.0, 'dur': 3.0, 'name': 'body_a'},
            {'pid': 1, 'tid': 1, 'ts': 5.0, 'dur': 4.0, 'name': 'body_b'},
            {'pid': 1, 'tid': 2, 'ts': 2.0, 'dur': 6.0, 'name': 'other_thread'}]
  self_time = {e['name']: t for e, t in _script().exclusive_times(events)}
  assert self_time == {'while': 3.0, 'body_a': 3.0, 'body_b': 4.0, 'other_thread': 6.0}
