"""Single-dimension vs compound scaling of a non-EfficientNet baseline (paper Table 3 idea).

    python -m experiments.baselines.study --preset=small --root=runs/experiments

The scaling_ablation single_vs_compound study with MobileNetV2
(`config.model.name='mobilenet_v2'`) as the base network instead of the
EfficientNet-B0 block table: the same preset recipe, budgets and MACs
matching, seeds and verdicts (compound against each single dimension at each
budget, paired by seed). `--base_model=efficientnet` runs the B0 table instead
(the same study as scaling_ablation's, under another name), e.g. where the
MobileNetV2 spec is not available.
"""

from __future__ import annotations

import argparse
import sys

from experiments import harness
from experiments.scaling_ablation import presets
from experiments.scaling_ablation import studies

PRESET_NAMES = ('smoke', 'small')
BASE_MODELS = {'mobilenet_v2': 'mobilenet_v2', 'efficientnet': ''}  # flag -> model.name


def make_study(preset_name: str, base_model: str = 'mobilenet_v2') -> harness.Study:
  if preset_name not in PRESET_NAMES:
    raise ValueError(f'--preset={preset_name!r}; accepted: {", ".join(PRESET_NAMES)}')
  if base_model not in BASE_MODELS:
    raise ValueError(f'--base_model={base_model!r}; accepted: {", ".join(BASE_MODELS)}')
  preset = presets.get_preset(preset_name)
  b = preset.base  # the same multipliers and resolution as the EfficientNet base
  base = presets.BaseNet(BASE_MODELS[base_model], b.width, b.depth, b.resolution)
  return studies.single_vs_compound_study(preset, base=base, name=f'baselines_{base_model}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='small', help=', '.join(PRESET_NAMES))
  parser.add_argument('--base_model', default='mobilenet_v2', help=', '.join(BASE_MODELS))
  harness.add_flags(parser)
  args = parser.parse_args(argv)
  return harness.main_for(lambda: make_study(args.preset, args.base_model), args)


if __name__ == '__main__':
  sys.exit(main())
