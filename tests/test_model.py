"""Architecture numbers against the official figures (tensorflow/tpu, google/automl, Keras)."""

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientnet_jax.model import architectures
from efficientnet_jax.model import blocks
from efficientnet_jax.model import kernels
from efficientnet_jax import model_table
from efficientnet_jax.model import scaling
from efficientnet_jax.model.architectures import Block
from efficientnet_jax.model import create_model

OFFICIAL_PARAMS = {
    'b0': 5_288_548, 'b1': 7_794_184, 'b2': 9_109_994, 'b3': 12_233_232,
    'b4': 19_341_616, 'b5': 30_389_784, 'b6': 43_040_704, 'b7': 66_347_960,
    'b8': 87_413_142, 'l2': 480_309_308, 'lite0': 4_652_008, 'lite1': 5_416_680,
    'lite2': 6_092_072, 'lite3': 8_197_096, 'lite4': 13_006_568, 'v2_s': 21_458_488,
    'v2_m': 54_139_356, 'v2_l': 118_515_272, 'v2_xl': 208_119_808, 'v2_b0': 7_139_704,
    'v2_b1': 8_141_052, 'v2_b2': 10_096_086, 'v2_b3': 14_358_406,
}
# Paper Table 2 (V1) and the automl README (V2, at eval size), multiply-adds.
PAPER_MACS = {'b0': 0.39e9, 'b1': 0.70e9, 'b2': 1.0e9, 'b3': 1.8e9, 'b4': 4.2e9,
              'b5': 9.9e9, 'b6': 19e9, 'b7': 37e9, 'v2_s': 8.4e9, 'v2_m': 24.7e9,
              'v2_l': 56.3e9, 'v2_b0': 0.72e9, 'v2_b1': 1.2e9, 'v2_b2': 1.7e9,
              'v2_b3': 3.0e9}


def _tiny(name):
  """The named variant cut to its first three stages: same family settings, cheap to compile."""
  spec = architectures.get_spec(name)
  return dataclasses.replace(spec, stages=spec.stages[:3])


def _abstract_variables(model, size=32):
  return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, size, size, 3))),
                        jax.random.key(0))


@pytest.mark.parametrize('name', sorted(OFFICIAL_PARAMS))
def test_parameter_count_is_official(name):
  # Written out here, independently of model_table's copy.
  assert model_table.count_params(architectures.get_spec(name)) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize('name', sorted(PAPER_MACS))
def test_macs_within_5_percent_of_paper(name):
  spec = architectures.get_spec(name)
  macs = model_table.count_macs(spec, spec.eval_resolution)
  assert abs(macs / PAPER_MACS[name] - 1) < 0.05, macs


def test_b0_macs_exact_value():
  # 0.386 G multiply-adds at 224 is the commonly quoted exact B0 figure.
  assert model_table.count_macs(architectures.get_spec('b0'), 224) == pytest.approx(
      0.3858e9, rel=1e-3)


@pytest.mark.parametrize('name,size', [('b0', 64), ('v2_b0', 64), ('lite0', 64), ('b3', 96)])
def test_macs_agree_with_xla_cost_analysis(name, size):
  # XLA counts 2 flops per multiply-add, skips padded taps and also counts the
  # elementwise work (BN, swish, SE gate): expect flops/2 a few % above our count.
  model = create_model(name, depthwise_impl='grouped')
  variables = _abstract_variables(model, size)
  compiled = jax.jit(lambda v, x: model.apply(v, x)).lower(
      variables, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).compile()
  xla_macs = compiled.cost_analysis()['flops'] / 2
  ratio = xla_macs / model_table.count_macs(architectures.get_spec(name), size)
  assert 0.97 < ratio < 1.05, ratio


def test_stage_resolutions_b0_224():
  model = create_model('b0')
  variables = _abstract_variables(model, 224)
  _, inter = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=['intermediates']),
      variables, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  inter = inter['intermediates']
  stem = inter['stem_bn']['__call__'][0].shape[1]
  blocks = architectures.get_spec('b0').blocks()
  last_of_stage = {b.stage: b.index for b in blocks}
  stage_res = [inter[f'block_{last_of_stage[s]}']['__call__'][0].shape[1] for s in range(7)]
  assert [stem] + stage_res == [112, 112, 56, 28, 14, 14, 7, 7]


def test_endpoints_at_strides_2_to_32():
  model = create_model('b0')
  variables = _abstract_variables(model, 224)
  _, endpoints = jax.eval_shape(lambda v, x: model.apply(v, x, return_endpoints=True),
                                variables, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  got = [(endpoints[f'reduction_{i}'].shape[1], endpoints[f'reduction_{i}'].shape[3])
         for i in range(1, 6)]
  assert got == [(112, 16), (56, 24), (28, 40), (14, 112), (7, 320)]


def test_se_width_from_block_input_b0():
  blocks = architectures.get_spec('b0').blocks()
  expected = [8, 4, 6, 6, 10, 10, 20, 20, 20, 28, 28, 28, 48, 48, 48, 48]
  assert [b.se_ch for b in blocks] == expected
  params = _abstract_variables(create_model('b0'))['params']
  assert [params[f'block_{i}']['se']['reduce']['kernel'].shape[-1] for i in range(16)] == expected


def test_residual_blocks_b0():
  blocks = architectures.get_spec('b0').blocks()
  residual = [b.index for b in blocks if b.residual]
  first_of_stage = {min(b.index for b in blocks if b.stage == s) for s in range(7)}
  assert len(residual) == 9
  assert set(residual) == set(range(16)) - first_of_stage


@pytest.mark.parametrize('name,stem,head', [('b0', 32, 1280), ('b3', 40, 1536), ('b7', 64, 2560),
                                            ('l2', 136, 5504), ('lite4', 32, 1280),
                                            ('v2_s', 24, 1280), ('v2_b3', 40, 1536)])
def test_stem_and_head_widths(name, stem, head):
  spec = architectures.get_spec(name)
  assert (spec.stem_ch, spec.head_features) == (stem, head)


def test_rounding_rules():
  assert scaling.round_filters(16, 1.2) == 24  # V1 10 % rule (B3 stage 1)
  assert scaling.round_filters(16, 1.2, ten_percent_rule=False) == 16  # V2
  assert scaling.round_repeats(3, 1.1) == 4
  assert [b.out_ch for b in architectures.get_spec('v2_b3').blocks()][0] == 16


@pytest.mark.parametrize('name,n', [('b0', 16), ('b1', 23), ('b2', 23), ('b3', 26), ('b4', 32),
                                    ('b5', 39), ('b6', 45), ('b7', 55), ('b8', 61), ('l2', 88)])
def test_stochastic_depth_rates_over_rounded_block_count(name, n):
  blocks = architectures.get_spec(name).blocks()
  assert len(blocks) == n
  np.testing.assert_allclose([b.drop_rate for b in blocks], [0.2 * i / n for i in range(n)])
  assert max(b.drop_rate for b in blocks) < 0.2


def test_b0_drop_rates_and_last_block():
  rates = [b.drop_rate for b in architectures.get_spec('b0').blocks()]
  assert rates[1] == pytest.approx(0.0125) and rates[-1] == pytest.approx(0.1875)


def test_fused_blocks_have_no_se_and_mbconv_blocks_do():
  spec = architectures.get_spec('v2_s')
  params = _abstract_variables(create_model(spec))['params']
  for b in spec.blocks():
    assert ('se' in params[f'block_{b.index}']) == (not b.fused), b
    assert 'project_conv' in params[f'block_{b.index}'] or (b.fused and b.expand == 1)
  assert sum(b.fused for b in spec.blocks()) == 10


def test_lite_has_relu6_and_no_se():
  spec = architectures.get_spec('lite0')
  assert spec.activation == 'relu6'
  assert all(b.se_ch == 0 for b in spec.blocks())
  assert spec.stage_repeats()[0] == 1 and spec.stage_repeats()[-1] == 1
  assert architectures.get_spec('lite4').stage_repeats() == (1, 4, 4, 6, 6, 8, 1)


def _residual_block(drop_rate):
  return Block(index=3, stage=1, in_ch=8, out_ch=8, kernel=3, stride=1, expand=2, se_ch=2,
               fused=False, drop_rate=drop_rate)


def test_stochastic_depth_is_per_sample_and_identity_at_eval():
  x = jax.random.normal(jax.random.key(1), (64, 6, 6, 8))
  dropped = blocks.MBConv(_residual_block(0.5))
  variables = dropped.init(jax.random.key(0), x)
  kept = blocks.MBConv(_residual_block(0.0))
  branch, _ = kept.apply(variables, x, train=True, mutable=['batch_stats'])
  branch = branch - x
  out, _ = dropped.apply(variables, x, train=True, mutable=['batch_stats'],
                         rngs={'dropout': jax.random.key(2)})
  delta = out - x
  per_sample_zero = jnp.all(jnp.abs(delta) < 1e-6, axis=(1, 2, 3))
  per_sample_scaled = jnp.all(jnp.abs(delta - 2.0 * branch) < 1e-4, axis=(1, 2, 3))
  assert bool(jnp.all(per_sample_zero ^ per_sample_scaled))  # whole samples dropped
  assert 10 < int(per_sample_zero.sum()) < 54
  # Identity (no drop, no rescale) at eval.
  np.testing.assert_allclose(dropped.apply(variables, x), kept.apply(variables, x), atol=1e-6)


def test_non_residual_block_is_deterministic_in_training():
  block = Block(index=5, stage=2, in_ch=8, out_ch=16, kernel=3, stride=2, expand=2, se_ch=2,
                fused=False, drop_rate=0.5)
  x = jax.random.normal(jax.random.key(1), (4, 6, 6, 8))
  module = blocks.MBConv(block)
  variables = module.init(jax.random.key(0), x)
  outs = [module.apply(variables, x, train=True, mutable=['batch_stats'],
                       rngs={'dropout': jax.random.key(i)})[0] for i in range(2)]
  np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize('name,momentum', [('b0', 0.99), ('v2_b0', 0.9), ('lite0', 0.99)])
def test_batchnorm_momentum_and_epsilon(name, momentum):
  model = create_model(_tiny(name), num_classes=10)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3)) * 3 + 1
  # Jitted: eager flax init/apply of a whole model costs tens of seconds on 2 cores.
  variables = jax.jit(model.init)(jax.random.key(1), x)
  _, updated = jax.jit(functools.partial(
      model.apply, train=True, mutable=['batch_stats'], capture_intermediates=True))(
          variables, x, rngs={'dropout': jax.random.key(2)})
  stem = updated['intermediates']['stem_conv']['__call__'][0]
  batch_mean = stem.mean(axis=(0, 1, 2))
  # ra <- m * ra + (1 - m) * batch, from ra = 0.
  np.testing.assert_allclose(updated['batch_stats']['stem_bn']['mean'],
                             (1 - momentum) * batch_mean, rtol=1e-4, atol=1e-7)
  # Inference output uses eps 1e-3 (flax's default is 1e-5).
  bn_out = jax.jit(functools.partial(model.apply, capture_intermediates=True,
                                     mutable=['intermediates']))(variables, x)
  bn_out = bn_out[1]['intermediates']['stem_bn']['__call__'][0]
  expected = stem / np.sqrt(1.0 + 1e-3)  # mean 0, var 1, scale 1, bias 0 at init
  np.testing.assert_allclose(bn_out, expected, rtol=1e-5, atol=1e-6)


def test_initializer_std_is_official():
  variables = jax.jit(create_model('b0').init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = variables['params']
  dw = params['block_15']['dw_conv']['kernel']  # (3, 3, 1, 1152)
  assert dw.shape == (3, 3, 1, 1152)
  assert float(jnp.std(dw)) == pytest.approx(np.sqrt(2 / 9), rel=0.05)
  proj = params['block_15']['project_conv']['kernel']  # (1, 1, 1152, 320)
  assert float(jnp.std(proj)) == pytest.approx(np.sqrt(2 / 320), rel=0.05)
  dense = params['classifier']['kernel']
  assert float(jnp.max(jnp.abs(dense))) <= 1 / np.sqrt(1000)
  assert float(jnp.std(dense)) == pytest.approx(1 / np.sqrt(1000) / np.sqrt(3), rel=0.05)


def test_same_padding_matches_tf():
  assert blocks.conv_padding(224, 3, 2, 'same') == (0, 1)
  assert blocks.conv_padding(112, 5, 2, 'same') == (1, 2)
  assert blocks.conv_padding(225, 3, 2, 'same') == (1, 1)
  assert blocks.conv_padding(224, 3, 1, 'same') == (1, 1)
  assert blocks.conv_padding(224, 3, 2, 'symmetric') == (1, 1)
  x = jax.random.normal(jax.random.key(0), (1, 10, 10, 2))
  k = jax.random.normal(jax.random.key(1), (3, 3, 2, 4))
  dn = ('NHWC', 'HWIO', 'NHWC')
  same = jax.lax.conv_general_dilated(x, k, (2, 2), 'SAME', dimension_numbers=dn)
  ours = jax.lax.conv_general_dilated(x, k, (2, 2), [(0, 1), (0, 1)], dimension_numbers=dn)
  sym = jax.lax.conv_general_dilated(x, k, (2, 2), [(1, 1), (1, 1)], dimension_numbers=dn)
  np.testing.assert_allclose(same, ours, atol=1e-6)
  assert not np.allclose(same, sym, atol=1e-3)


@pytest.mark.parametrize('kernel,stride,size,padding', [
    (3, 1, 8, 'same'), (3, 2, 8, 'same'), (5, 2, 9, 'same'), (5, 1, 7, 'symmetric'),
    (3, 2, 7, 'symmetric'), (5, 2, 12, 'same')])
def test_depthwise_impls_agree_in_value_and_gradient(kernel, stride, size, padding):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 6))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, 6))
  pads = [blocks.conv_padding(size, kernel, stride, padding)] * 2

  def loss(impl):
    return lambda x, w: jnp.sum(jnp.sin(kernels.depthwise_conv(x, w, stride, pads, impl)))

  out_g = kernels.depthwise_conv(x, w, stride, pads, 'grouped')
  out_s = kernels.depthwise_conv(x, w, stride, pads, 'shifted')
  np.testing.assert_allclose(out_s, out_g, atol=1e-5)
  grads_g = jax.grad(loss('grouped'), argnums=(0, 1))(x, w)
  grads_s = jax.grad(loss('shifted'), argnums=(0, 1))(x, w)
  for gs, gg in zip(grads_s, grads_g):
    # The two re-associate a 9- or 25-term float32 sum, so round-off scales with
    # the gradient's magnitude: compare relative to the largest entry.
    scale = max(1.0, float(jnp.max(jnp.abs(gg))))
    assert float(jnp.max(jnp.abs(gs - gg))) <= 1e-5 * scale


def test_depthwise_impls_agree_on_a_whole_model():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  grouped = create_model(_tiny('b0'), num_classes=10, depthwise_impl='grouped')
  shifted = create_model(_tiny('b0'), num_classes=10, depthwise_impl='shifted')
  variables = jax.jit(grouped.init)(jax.random.key(1), x)
  np.testing.assert_allclose(jax.jit(shifted.apply)(variables, x),
                             jax.jit(grouped.apply)(variables, x), atol=1e-5)


_AUTO_IMPLS = """
from efficientnet_jax.model import dnnl, kernels
import jax
print(jax.device_count(), dnnl.available(), kernels.resolve_depthwise_impl('auto'),
      kernels.resolve_conv_impl('auto'))
"""


def test_auto_kernels_on_cpu_are_onednn_on_one_device_else_pure_jax():
  # The tests' 8 simulated devices: the pure-JAX kernels (oneDNN's FFI call has
  # no sharding rule).
  assert jax.device_count() > 1
  assert kernels.resolve_depthwise_impl('auto') == 'shifted'
  assert kernels.resolve_conv_impl('auto') == 'matmul'
  # One device, as train.py on a CPU host: oneDNN where `make kernels` built it.
  env = dict(os.environ, XLA_FLAGS='')
  out = subprocess.run([sys.executable, '-c', _AUTO_IMPLS], env=env, check=True, text=True,
                       capture_output=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  devices, built, depthwise, conv = out.stdout.split()
  assert devices == '1'
  assert (depthwise, conv) == (('dnnl', 'dnnl') if built == 'True' else ('shifted', 'matmul'))


def test_bf16_compute_keeps_params_stats_and_logits_fp32():
  model = create_model(_tiny('v2_b0'), num_classes=10, dtype=jnp.bfloat16)
  x = jnp.ones((2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  logits, updated = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, x, rngs={'dropout': jax.random.key(1)})
  assert logits.dtype == jnp.float32
  for leaf in jax.tree.leaves((variables['params'], updated['batch_stats'])):
    assert leaf.dtype == jnp.float32


def test_include_top_false_returns_pooled_features():
  model = create_model('b0', include_top=False)
  out = jax.eval_shape(lambda k, x: model.init_with_output(k, x)[0], jax.random.key(0),
                       jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert out.shape == (2, 1280)


def test_table_is_default_and_formula_is_opt_in():
  for phi in range(8):
    c = scaling.compound_coefficients(phi)
    assert (c.width, c.depth, c.resolution, c.dropout) == scaling.OFFICIAL_V1_TABLE[f'b{phi}']
  f = scaling.compound_coefficients(2, scaling='formula')
  assert (f.depth, f.width, f.resolution) == (pytest.approx(1.44), pytest.approx(1.21), 296)
  # The released B1 does not follow the formula.
  assert scaling.compound_coefficients(1).depth != scaling.compound_coefficients(
      1, scaling='formula').depth
  assert architectures.compound_spec(4) == architectures.get_spec('b4')


def test_formula_allows_any_constraint_and_reports_compute():
  c = scaling.compound_coefficients(1, scaling='formula', alpha=2.0, beta=1.0, gamma=1.0)
  assert c.compute_multiple == pytest.approx(2.0)
  c = scaling.compound_coefficients(1, scaling='formula', alpha=1.0, beta=1.5, gamma=1.5)
  assert c.compute_multiple == pytest.approx(1.5**2 * (round(224 * 1.5) / 224)**2)


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(ValueError, match=r"unknown model 'b9'; valid names: b0, b1.*lite0.*v2_s"):
    architectures.get_spec('b9')


@pytest.mark.parametrize('field,value', [('phi', -1), ('alpha', 0), ('beta', -1.1),
                                         ('gamma', 'x'), ('alpha', True), ('gamma', float('nan'))])
def test_bad_scaling_numbers_name_the_field(field, value):
  kwargs = dict(phi=1, scaling='formula')
  kwargs[field] = value
  with pytest.raises(ValueError, match=rf'^{field} must be'):
    scaling.compound_coefficients(**kwargs)


def test_table_mode_rejects_non_integer_phi_and_unknown_scaling():
  with pytest.raises(ValueError, match=r"phi=1.5 has no entry.*scaling='formula'"):
    scaling.compound_coefficients(1.5)
  with pytest.raises(ValueError, match=r"scaling='tabel'; accepted: table, formula"):
    scaling.compound_coefficients(1, scaling='tabel')


def test_bad_padding_and_depthwise_names():
  with pytest.raises(ValueError, match="padding='valid'; accepted: same, symmetric"):
    create_model('b0', padding='valid')
  with pytest.raises(ValueError, match="depthwise='fast'; accepted: auto, grouped, shifted"):
    create_model('b0', depthwise_impl='fast')


def test_model_table_cli_json(capsys):
  assert model_table.main(['--json', '--models', 'b0', 'v2_s']) == 0
  import json
  rows = json.loads(capsys.readouterr().out)
  assert [(r['model'], r['resolution'], r['params']) for r in rows] == [
      ('b0', 224, 5_288_548), ('v2_s', 384, 21_458_488)]
  assert all(r['macs'] > 0 for r in rows)


def test_model_table_cli_bad_name(capsys):
  assert model_table.main(['--models', 'b9']) == 2
  assert "unknown model 'b9'" in capsys.readouterr().err
