"""Every config loads, is locked-compatible, names its command, and builds its network."""

import glob
import importlib
import os

import pytest

from efficientnet_jax.model import architectures
from efficientnet_jax import optim
from efficientnet_jax.model import scaling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
                 if not p.endswith('__init__.py'))


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_and_documents_its_command(name):
  module = importlib.import_module(f'configs.{name}')
  assert f'configs/{name}.py' in module.__doc__ or name == 'base'
  config = module.get_config()
  spec = architectures.spec_from_config(config.model)
  assert spec.resolution > 0
  assert config.batch_size % 8 == 0 and config.eval_batch_size % 8 == 0
  smoke = module.get_config('smoke')
  assert smoke.train_steps > 0


@pytest.mark.parametrize('phi', range(8))
def test_b_configs_follow_the_official_table(phi):
  config = importlib.import_module(f'configs.b{phi}').get_config()
  spec = architectures.spec_from_config(config.model)
  width, depth, resolution, dropout = scaling.OFFICIAL_V1_TABLE[f'b{phi}']
  assert (spec.width, spec.depth, spec.resolution, spec.dropout) == (
      width, depth, resolution, dropout)
  assert spec == architectures.get_spec(f'b{phi}')


def test_base_is_the_official_v1_recipe():
  config = importlib.import_module('configs.base').get_config()
  assert (config.optimizer, config.rmsprop_decay, config.momentum, config.rmsprop_eps) == (
      'rmsprop', 0.9, 0.9, 1e-3)
  assert (config.weight_decay, config.label_smoothing, config.ema_decay) == (1e-5, 0.1, 0.9999)
  assert (config.warmup_epochs, config.lr_decay_epochs, config.lr_decay_rate) == (5, 2.4, 0.97)
  assert config.model.drop_connect == 0.2
  schedule = optim.learning_rate_schedule(
      base_lr=config.base_lr, global_batch_size=config.batch_size, steps_per_epoch=100)
  assert float(schedule(10**6 * 0 + 500)) == pytest.approx(0.256 * 0.97**2)


def test_model_overrides_reach_the_spec():
  config = importlib.import_module('configs.base').get_config()
  config.model.name = 'v2_b0'
  config.model.bn_momentum = 0.97
  config.model.bn_epsilon = 1e-5
  config.model.width = 0.5
  spec = architectures.spec_from_config(config.model)
  assert (spec.bn_momentum, spec.bn_epsilon, spec.width, spec.family) == (0.97, 1e-5, 0.5, 'v2')
  assert spec.name.startswith('v2_b0[')
