"""Progressive learning (EfficientNetV2) against fixed-size training, at equal steps.

    python -m experiments.progressive.study --preset=small --root=runs/experiments

Points (same network, batch, LR schedule and number of steps; evaluated at
the full size):
  fixed               every step at the full size, dropout fixed, no mixup
  progressive         configs/demo_progressive.py: 4 stages, size min -> full,
                      mixup 0 -> 0.1, dropout 0.05 -> 0.15 (paper rule)
  progressive_size    the same sizes, regularisation held at the fixed run's,
                      to separate the size schedule from the regularisation one
  fixed_small         every step at the smallest stage size, evaluated at the
                      full size (the train/test resolution discrepancy)
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments import harness
from experiments import plots
from experiments.scaling_ablation import presets

PRESET_NAMES = ('smoke', 'small')
# Smallest stage size and epochs per preset; the network, its full size and the
# recipe are the scaling studies' (experiments/scaling_ablation/presets.py).
_SCHEDULES = {
    'smoke': (12, None),  # used for testing only: 2 steps, one per stage, 12 -> 16 px
    'small': (30, 1.0),  # 1 epoch of Fashion-MNIST, 4 stages 30 -> 48 px (as demo_progressive)
}


def _progressive(min_size: int, full: int, *, num_stages: int, regularise: bool) -> dict:
  over = {'progressive.preset': 'paper', 'progressive.num_stages': num_stages,
          'progressive.image_size_min': min_size, 'progressive.image_size_max': full,
          'progressive.randaug_magnitude_min': 0.0, 'progressive.randaug_magnitude_max': 0.0,
          'progressive.cutmix_alpha_min': 0.0, 'progressive.cutmix_alpha_max': 0.0}
  if regularise:  # configs/demo_progressive.py's ranges
    over.update({'progressive.mixup_alpha_min': 0.0, 'progressive.mixup_alpha_max': 0.1,
                 'progressive.dropout_min': 0.05, 'progressive.dropout_max': 0.15})
  else:  # held at the fixed run's values
    over.update({'progressive.mixup_alpha_min': 0.0, 'progressive.mixup_alpha_max': 0.0,
                 'progressive.dropout_min': 0.1, 'progressive.dropout_max': 0.1})
  return over


def make_study(preset: str) -> harness.Study:
  if preset not in _SCHEDULES:
    raise ValueError(f'--preset={preset!r}; accepted: {", ".join(PRESET_NAMES)}')
  p = presets.get_preset(preset)
  min_size, epochs = _SCHEDULES[preset]
  full = p.base.resolution
  stages = 2 if preset == 'smoke' else 4

  def base():
    from efficientnet_jax import config_lib  # pylint: disable=g-import-not-at-top  (TensorFlow)
    config = p.config_fn()
    config_lib.set_fields(config, p.base.overrides())
    config.model.dropout = 0.1  # the fixed runs' rate; progressive_size holds it
    config.data.mixup_alpha = 0.0
    if epochs is not None:
      config.num_epochs = epochs
    return config

  fixed = {'model.resolution': full}
  points = [
      harness.Point('fixed', fixed, {'schedule': 'fixed', 'train_sizes': f'{full}'}),
      harness.Point('progressive', {**fixed, **_progressive(
          min_size, full, num_stages=stages, regularise=True)},
                    {'schedule': 'progressive', 'train_sizes': f'{min_size}->{full}'}),
      harness.Point('progressive_size', {**fixed, **_progressive(
          min_size, full, num_stages=stages, regularise=False)},
                    {'schedule': 'progressive (size only)',
                     'train_sizes': f'{min_size}->{full}'}),
      harness.Point('fixed_small', {**fixed, 'image_size': min_size},
                    {'schedule': 'fixed small', 'train_sizes': f'{min_size}'}),
  ]

  def plot(rows, study_dir):
    curves = []
    for row in rows:
      records = harness.read_jsonl(os.path.join(study_dir, row['point'], 'metrics.jsonl'))
      curves += [{'step': r['step'], 'loss': r['loss'], 'point': row['point']}
                 for r in records if r.get('split') == 'train']
    paths = [plots.plot_groups(
        curves, x='step', y='loss', group='point',
        path=os.path.join(study_dir, 'train_loss.png'),
        title='training loss (progressive stages switch size)', ylabel='train loss')]
    paths.append(plots.plot_groups(
        rows, x='train_wall_s', y=p.plot_metric, group='point',
        path=os.path.join(study_dir, 'top1_vs_wall.png'),
        title=f'final test top-1 vs training wall time ({preset})',
        xlabel='train wall time (s)'))
    return paths

  return harness.Study(
      name='progressive', base_config=base, points=points,
      info_columns=('schedule', 'train_sizes'), plot_fn=plot,
      title=f'Progressive learning vs fixed-size training at equal steps ({preset} preset)')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='small', help=', '.join(PRESET_NAMES))
  harness.add_flags(parser)
  args = parser.parse_args(argv)
  return harness.main_for(lambda: make_study(args.preset), args)


if __name__ == '__main__':
  sys.exit(main())
