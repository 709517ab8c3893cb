"""Progressive learning: preset schedules, staged runs, compile counts, mid-stage resume."""

import collections
import importlib
import json
import re
import math
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from configs import base
from efficientnet_jax import runtime
from efficientnet_jax import state as state_lib
from efficientnet_jax import steps
from efficientnet_jax.model import architectures
from efficientnet_jax import checkpointing
from efficientnet_jax import config_lib
from efficientnet_jax import progressive
from efficientnet_jax import train
from tests import smoke_run

IMAGENET_TRAIN = 1_281_167


def _plan(name, preset, device_count=8, **progressive_overrides):
  config = importlib.import_module(f'configs.{name}').get_config(preset)
  for key, value in progressive_overrides.items():
    config.progressive[key] = value
  spec = architectures.spec_from_config(config.model)
  steps_per_epoch = IMAGENET_TRAIN // config.batch_size
  return progressive.build_plan(
      config, model_name=name, model_dropout=spec.dropout, image_size=spec.resolution,
      num_train=IMAGENET_TRAIN, steps_per_epoch=steps_per_epoch,
      total_steps=math.ceil(config.num_epochs * steps_per_epoch), device_count=device_count)


def _values(plan):
  return {f: [getattr(s, f) for s in plan.stages] for f in progressive.FIELDS}


# What google/automl efficientnetv2 main.py's stage loop runs (stages=4, ibase=128).
OFFICIAL = {
    'v2_s': dict(image_size=[171, 214, 257, 300], randaug_magnitude=[5, 20 / 3, 25 / 3, 10],
                 mixup_alpha=[0, 0, 0, 0], dropout=[0.2] * 4),
    'v2_m': dict(image_size=[192, 256, 320, 384], randaug_magnitude=[5, 25 / 3, 35 / 3, 15],
                 mixup_alpha=[0, 0.2 / 3, 0.4 / 3, 0.2], dropout=[0.3] * 4),
    'v2_l': dict(image_size=[192, 256, 320, 384], randaug_magnitude=[5, 10, 15, 20],
                 mixup_alpha=[0, 0.5 / 3, 1 / 3, 0.5], dropout=[0.4] * 4),
}
# Paper Table 6: linear from min (first stage) to max (last stage).
PAPER = {
    'v2_s': dict(image_size=[128, 185, 243, 300], randaug_magnitude=[5, 25 / 3, 35 / 3, 15],
                 mixup_alpha=[0, 0, 0, 0], dropout=[0.1, 0.5 / 3, 0.7 / 3, 0.3]),
    'v2_m': dict(image_size=[128, 212, 296, 380], randaug_magnitude=[5, 10, 15, 20],
                 mixup_alpha=[0, 0.2 / 3, 0.4 / 3, 0.2], dropout=[0.1, 0.2, 0.3, 0.4]),
    'v2_l': dict(image_size=[128, 212, 296, 380], randaug_magnitude=[5, 35 / 3, 55 / 3, 25],
                 mixup_alpha=[0, 0.4 / 3, 0.8 / 3, 0.4], dropout=[0.1, 0.7 / 3, 1.1 / 3, 0.5]),
}


@pytest.mark.parametrize('preset,table', [('official', OFFICIAL), ('paper', PAPER)])
@pytest.mark.parametrize('name', ['v2_s', 'v2_m', 'v2_l'])
def test_preset_schedules_match_the_published_numbers(name, preset, table):
  plan = _plan(name, preset)
  got = _values(plan)
  assert got['image_size'] == table[name]['image_size']
  for field in ('randaug_magnitude', 'mixup_alpha', 'dropout'):
    np.testing.assert_allclose(got[field], table[name][field], atol=1e-9, err_msg=field)
  # The official code mixes with cutmix = mixup; the paper has no cutmix.
  expected_cutmix = got['mixup_alpha'] if preset == 'official' else [0.0] * 4
  np.testing.assert_allclose(got['cutmix_alpha'], expected_cutmix, atol=1e-9)
  # Four equal stages of about 87 epochs, as TF1 main.py: int((s+1)/4 * train_steps).
  total = plan.total_steps
  assert [s.end_step for s in plan.stages] == [total * (k + 1) // 4 for k in range(4)]
  assert [s.start_step for s in plan.stages[1:]] == [s.end_step for s in plan.stages[:-1]]
  assert plan.epoch_at(plan.stages[2].start_step) == pytest.approx(175, abs=0.01)


def test_v2_configs_follow_the_official_recipe():
  for name in ('v2_s', 'v2_m', 'v2_l', 'v2_xl'):
    config = importlib.import_module(f'configs.{name}').get_config()
    spec = architectures.spec_from_config(config.model)
    assert (spec.family, spec.bn_momentum, spec.bn_epsilon) == ('v2', 0.9, 1e-3)
    assert (config.base_lr, config.batch_size, config.num_epochs) == (0.016, 4096, 350)
    assert (config.data.augment, config.data.randaug_layers) == ('randaugment', 2)
    assert config.progressive.preset == 'official'
    assert _plan(name, None).stages[-1].image_size == spec.resolution
  assert importlib.import_module('configs.v2_xl').get_config().model.name == 'v2_xl'
  evals = {}
  for b in range(4):
    config = importlib.import_module(f'configs.v2_b{b}').get_config()
    spec = architectures.spec_from_config(config.model)
    evals[b] = spec.eval_resolution
    assert (config.data.augment, config.progressive.preset) == ('autoaugment', 'official')
    assert spec.normalization == 'v1' and config.data.crop_padding == 32
  assert evals == {0: 224, 1: 240, 2: 260, 3: 300}


# google/automl efficientnetv2 (6a54c87): effnetv2_configs.py lines 203-210 (train
# sizes 192, 192, 208, 240) and 227 (stages=4, sched=True for every efficientnetv2-*),
# main.py line 474: int(ibase + (train - ibase)·(s+1)/4) with hparams.py ibase=128.
V2_B_SIZES = {'v2_b0': [144, 160, 176, 192], 'v2_b1': [144, 160, 176, 192],
              'v2_b2': [148, 168, 188, 208], 'v2_b3': [156, 184, 212, 240]}


@pytest.mark.parametrize('name', sorted(V2_B_SIZES))
def test_v2_b_configs_train_at_the_official_progressive_sizes(name):
  plan = _plan(name, None)
  got = _values(plan)
  assert got['image_size'] == V2_B_SIZES[name]
  # AutoAugment: no RandAugment magnitude to grow; mixup = cutmix 0; dropout held.
  spec = architectures.get_spec(name)
  assert got['randaug_magnitude'] == got['mixup_alpha'] == got['cutmix_alpha'] == [0.0] * 4
  assert got['dropout'] == [spec.dropout] * 4
  total = plan.total_steps
  assert [s.end_step for s in plan.stages] == [total * (k + 1) // 4 for k in range(4)]


@pytest.mark.parametrize('device_count', [1, 8, 32, 256])
@pytest.mark.parametrize('name', ['v2_s', 'v2_l'])
def test_adapted_batch_sizes_stay_multiples_of_the_device_count(name, device_count):
  plan = _plan(name, 'official', device_count, adapt_batch_size=True, max_batch_size=10_000)
  batches = [s.batch_size for s in plan.stages]
  assert all(b % device_count == 0 for b in batches)
  assert batches[-1] == 4096 and batches == sorted(batches, reverse=True)
  assert max(batches) <= 10_000
  # Each stage still covers its quarter of the 350 epochs.
  for stage in plan.stages:
    epochs = stage.num_steps / stage.steps_per_epoch
    assert epochs == pytest.approx(87.5, abs=0.05)
  assert plan.epoch_at(plan.total_steps) == pytest.approx(350, abs=0.05)


def test_adapted_learning_rate_follows_the_stage_batch():
  plan = _plan('v2_s', 'official', adapt_batch_size=True)
  lr = progressive.staged_schedule(
      plan, lambda batch, spe: (lambda step: 0.016 * batch / 256 + 0 * step))
  for stage in plan.stages:
    assert float(lr(stage.start_step)) == pytest.approx(0.016 * stage.batch_size / 256)
    assert float(lr(stage.end_step - 1)) == pytest.approx(0.016 * stage.batch_size / 256)


# ---------------------------------------------------------------------------
# Runs on a fake Fashion-MNIST (40 train / 13 test images, 5 steps per epoch).


def _config(data_root, **overrides):
  """A smoke run in 4 paper-rule stages at 31, 31, 32, 32 px (two train programs).

  Augmentation grows each stage (RandAugment 1, 2, 3, 4; mixup 0 .. 0.3) while
  dropout stays 0.2, so the runs share their compiled steps through the
  persistent cache.
  """
  config = smoke_run.smoke_config(data_root)
  config.data.augment = 'randaugment'
  config.train_steps = 8
  config.checkpoint_every_steps = 1000
  p = config.progressive
  p.preset = 'paper'
  p.image_size_min, p.image_size_max = 31, 32
  p.randaug_magnitude_min, p.randaug_magnitude_max = 1.0, 4.0
  p.mixup_alpha_min, p.mixup_alpha_max = 0.0, 0.3
  p.cutmix_alpha_min, p.cutmix_alpha_max = 0.0, 0.0
  p.dropout_min, p.dropout_max = 0.2, 0.2
  return config_lib.set_fields(config, overrides)


# Where augmentation is not under test: cheaper pipelines to build.
_NO_AUGMENT = {'data.augment': 'none', 'progressive.randaug_magnitude_min': 0.0,
               'progressive.randaug_magnitude_max': 0.0}


def _records(workdir, event='stage_start'):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [r for r in map(json.loads, lines) if r.get('event') == event]


def _params(config, workdir):
  _, state, step = state_lib.load_checkpoint(config, str(workdir))
  return step, jax.device_get(state)


def _count_traces(monkeypatch):
  """Counts how often the train and eval steps are traced (= compiled)."""
  traces = collections.Counter()
  real_train, real_eval = steps.train_step, steps.eval_step

  def counted_train(state, batch, key, **kwargs):
    traces['train', batch['image'].shape[:3], kwargs['model'].dropout] += 1
    return real_train(state, batch, key, **kwargs)

  def counted_eval(variables, batch, **kwargs):
    traces['eval', batch['image'].shape[:3]] += 1
    return real_eval(variables, batch, **kwargs)

  monkeypatch.setattr(steps, 'train_step', counted_train)
  monkeypatch.setattr(steps, 'eval_step', counted_eval)
  return traces


@pytest.mark.parametrize('aot', [True, False])
def test_one_compile_per_distinct_stage_shape_plus_eval(data_root, tmp_path, monkeypatch, aot,
                                                        capsys):
  traces = _count_traces(monkeypatch)
  # Sizes 31, 31.33, 31.67, 32 round to 31, 31, 32, 32: two shapes for four stages.
  config = _config(data_root, **_NO_AUGMENT, train_steps=4,
                   **{'progressive.aot_compile': aot})
  result = train.run(config, str(tmp_path)).eval
  assert result['count'] == 13
  starts = _records(tmp_path)
  assert [(r['stage'], r['image_size'], r['step']) for r in starts] == [
      (0, 31, 0), (1, 31, 1), (2, 32, 2), (3, 32, 3)]
  assert all(r['aot_compile'] == aot and r['stall_s'] >= 0 for r in starts)
  # One console line per stage: its values and what starting it cost.
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('stage ')]
  assert [line.split(';')[0] for line in lines] == [
      f'stage {i + 1}/4 starts at step {i}: {size} px, batch 8, dropout 0.2, mixup {mixup}, '
      'cutmix 0, RandAugment 0'
      for i, (size, mixup) in enumerate(zip((31, 31, 32, 32), (0, 0.1, 0.2, 0.3)))]
  assert all(re.search(r'; stall \d+\.\d\d s \(.*data \d+\.\d s\)$', line) for line in lines)
  assert dict(traces) == {('train', (8, 31, 31), 0.2): 1, ('train', (8, 32, 32), 0.2): 1,
                          ('eval', (8, 32, 32)): 1}


def test_stage_values_reach_the_pipeline_and_a_resume_inside_stage_3_continues_it(
    data_root, tmp_path):
  config = _config(data_root)
  train.run(config, str(tmp_path / 'straight'))
  starts = _records(tmp_path / 'straight')
  assert [(r['stage'], r['image_size'], r['start_step'], r['end_step']) for r in starts] == [
      (0, 31, 0, 2), (1, 31, 2, 4), (2, 32, 4, 6), (3, 32, 6, 8)]
  assert [r['randaug_magnitude'] for r in starts] == [1, 2, 3, 4]
  np.testing.assert_allclose([r['mixup_alpha'] for r in starts], [0, 0.1, 0.2, 0.3])
  evals = [r for r in map(json.loads, (tmp_path / 'straight/metrics.jsonl').read_text()
                          .splitlines()) if r.get('split') == 'eval']
  assert {r['image_size'] for r in evals} == {32}  # the model's eval size, every time
  manager = checkpointing.make_checkpoint_manager(str(tmp_path / 'straight'), async_save=False)
  meta = checkpointing.read_meta(manager, 5)
  assert (meta['stage'], meta['image_size']) == (2, 32)  # where a resume at step 5 goes on

  # A run that stopped after saving step 5, the middle of stage 3 (index 2, steps
  # 4..5): the straight run's step-5 checkpoint alone in a fresh workdir.
  shutil.copytree(tmp_path / 'straight' / 'checkpoints' / '5',
                  tmp_path / 'resumed' / 'checkpoints' / '5')
  train.run(config, str(tmp_path / 'resumed'))
  resumed = _records(tmp_path / 'resumed')
  assert [(r['stage'], r['image_size'], r['step'], r['resumed']) for r in resumed] == [
      (2, 32, 5, True), (3, 32, 6, False)]
  assert (resumed[0]['randaug_magnitude'], resumed[0]['mixup_alpha']) == (3, 0.2)
  # Same batches, augmentation and mixing from step 5 on: the same parameters as
  # the straight run, bit for bit.
  step_a, a = _params(config, tmp_path / 'straight')
  step_b, b = _params(config, tmp_path / 'resumed')
  assert step_a == step_b == 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_adapted_batches_and_growing_dropout_reach_each_stage(data_root, tmp_path,
                                                              monkeypatch):
  traces = _count_traces(monkeypatch)
  # 16 px gets 8 * (32/16)**2 = 32 images a step, 32 px the configured 8.
  config = _config(data_root, **_NO_AUGMENT, **{
      'progressive.num_stages': 2, 'progressive.image_size_min': 16,
      'progressive.dropout_min': 0.1, 'progressive.dropout_max': 0.3,
      'progressive.adapt_batch_size': True, 'train_steps': 10})
  train.run(config, str(tmp_path))
  starts = _records(tmp_path)
  assert [(r['image_size'], r['batch_size'], r['dropout']) for r in starts] == [
      (16, 32, 0.1), (32, 8, 0.3)]
  assert all(r['batch_size'] % jax.device_count() == 0 for r in starts)
  # One epoch each: 40 // 32 = 1 step, then 40 // 8 = 5 steps.
  assert [(r['start_step'], r['end_step']) for r in starts] == [(0, 1), (1, 6)]
  assert dict(traces) == {('train', (32, 16, 16), 0.1): 1, ('train', (8, 32, 32), 0.3): 1,
                          ('eval', (8, 32, 32)): 1}
  step, _ = _params(config, tmp_path)
  assert step == 6


def _untouched(path):
  return not path.exists() or not any(path.iterdir())


@pytest.mark.parametrize('overrides,message', [
    ({'progressive.boundaries': (0.4, 0.8, 1.2, 1.4)},
     r'^progressive\.boundaries=\(0\.4, 0\.8, 1\.2, 1\.4\) ends at epoch 1\.4 but training '
     r'runs 1\.6 epochs'),
    ({'progressive.boundaries': (0.8, 1.6)}, r'^progressive\.boundaries=.* has 2 entries'),
    ({'progressive.boundaries': (0.8, 0.4, 1.2, 1.6)},
     r'^progressive\.boundaries=.* must be positive and increasing'),
    ({'progressive.randaug_magnitude_min': 5.0},
     r'^progressive\.randaug_magnitude_min=5 is above progressive\.randaug_magnitude_max=4$'),
    ({'progressive.image_size_min': 40},
     r'^progressive\.image_size_min=40 is above progressive\.image_size_max=32$'),
    ({'progressive.image_size_min': 0}, r'^progressive\.image_size_min=0 must be positive'),
    ({'progressive.image_size_max': 0},
     r"^progressive\.image_size_max=0 must be positive \(or -1: the preset's number\)$"),
    ({'progressive.image_size_min': -3}, r'^progressive\.image_size_min=-3 must be positive'),
    ({'progressive.mixup_alpha_min': -0.5}, r'^progressive\.mixup_alpha_min=-0\.5 must be >= 0'),
    ({'progressive.dropout_max': 1.0}, r'^progressive\.dropout_max=1 must be below 1$'),
    ({'progressive.num_stages': 0}, r'^progressive\.num_stages=0 must be at least 1$'),
    ({'progressive.num_stages': 9}, r'^progressive\.num_stages=9 leaves stage 0 without'),
    ({'progressive.preset': 'fast'}, r"^progressive\.preset='fast'; accepted: '' \(off\), "
                                     r'paper, official$'),
    ({'progressive.mixup_alpha_max': -1.0},
     r"^progressive\.mixup_alpha_max is unset and model '' has no 'paper' preset numbers"),
    ({'data.augment': 'autoaugment'},
     r"^progressive\.randaug_magnitude_max=4 has no effect with data\.augment='autoaugment'"),
])
def test_bad_progressive_config_is_one_line_naming_the_field(data_root, tmp_path, overrides,
                                                              message):
  workdir = tmp_path / 'w'
  with pytest.raises(ValueError, match=message) as error:
    train.run(_config(data_root, **overrides), str(workdir))
  assert '\n' not in str(error.value)
  assert _untouched(workdir)


def test_cli_progressive_override_errors_are_one_line(data_root, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/demo_progressive.py',
       f'--workdir={tmp_path / "w"}', '--config.progressive.image_size_min=1000',
       f'--config.data.source_dir={data_root / "idx"}',
       f'--config.data.data_dir={data_root / "tfds"}', '--config.batch_size=8'],
      cwd=repo, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  top = importlib.import_module('configs.demo_progressive').get_config().model.resolution
  assert errors == ['error: progressive.image_size_min=1000 is above '
                    f'progressive.image_size_max={top}']
  assert _untouched(tmp_path / 'w')


def test_compilation_cache_defaults_to_the_workdir(tmp_path, monkeypatch):
  config = base.get_config()
  updates = []
  monkeypatch.setattr(jax.config, 'update', lambda *args: updates.append(args))
  # The tests' cache directory (conftest.py) is kept.
  assert runtime.enable_compilation_cache(config, str(tmp_path)) == (
      jax.config.jax_compilation_cache_dir)
  monkeypatch.setattr(runtime, '_configured_cache_dir', lambda: None)
  assert runtime.enable_compilation_cache(config, str(tmp_path)) == str(
      tmp_path / 'compile_cache')
  config.compilation_cache_dir = str(tmp_path / 'shared')
  assert runtime.enable_compilation_cache(config, str(tmp_path)) == str(tmp_path / 'shared')
  config.compilation_cache_dir = 'none'
  assert runtime.enable_compilation_cache(config, str(tmp_path)) is None
  assert updates == [('jax_compilation_cache_dir', str(tmp_path / 'compile_cache')),
                     ('jax_compilation_cache_dir', str(tmp_path / 'shared')),
                     ('jax_enable_compilation_cache', False)]
