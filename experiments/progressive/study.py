"""Progressive learning (EfficientNetV2) against fixed-size training, at equal steps.

    python -m experiments.progressive.study --preset=small --root=runs/experiments
    python -m experiments.progressive.study --preset=small --target_top1=0.88 --collect_only

Points (same network, batch, LR schedule and number of steps; evaluated at
the full size):
  fixed               every step at the full size, dropout fixed, no mixup
  progressive         4 stages, size min -> full, mixup 0 -> 0.1, dropout
                      0.05 -> 0.15 (paper rule)
  progressive_size    the same sizes, regularisation held at the fixed run's,
                      to separate the size schedule from the regularisation one
  fixed_small         every step at the smallest stage size, evaluated at the
                      full size (the train/test resolution discrepancy)

Each point runs with the preset's seeds. The paper's claim is speed at equal or
better accuracy, so besides the final accuracy (paired by seed against
`fixed`) the study reports the training wall time at which each run's EMA
top-1 first reached `--target_top1` (its eval curve, `harness.eval_curve`)
and the whole run's training wall time, each with its mean and 95 % interval
per point and a paired verdict on the difference. Only evals can show the
crossing: set `eval_every_steps` (or `--set=eval_every_steps=N`) finer than an
epoch for a finer clock.
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments import harness
from experiments import plots
from experiments.scaling_ablation import presets

PRESET_NAMES = ('smoke', 'small')
# Per preset: the smallest stage size, the full size, the epochs and the steps
# between evals (None: one per epoch); the network and the recipe are the scaling studies'
# (experiments/scaling_ablation/presets.py).
_SCHEDULES = {
    'smoke': (12, 16, None, None),  # used for testing only: 2 steps, one per stage
    # The base network at 96 px, its smallest stage at 72 px: every stage keeps
    # a 3x3 final map. (At 30 -> 48 px the first stages trained on a 1x1 map,
    # so they measured a broken setting rather than the method.) An eval every
    # half epoch (468 steps of 128 per epoch of the 60,000 Fashion-MNIST
    # images): the time-to-target clock ticks twice per epoch.
    'small': (72, 96, 3.0, 234),
}
# Networks downsample by 32 (a stride-2 stem and four stride-2 stages, SAME
# padding); below a 3x3 final map the late stages see no spatial structure.
TOTAL_STRIDE = 32
MIN_FINAL_MAP = 3
# EMA top-1 whose wall time the study reports (--target_top1 overrides). The
# smoke target is 0: every eval of a 2-step run on fake data reaches it.
_TARGETS = {'smoke': 0.0, 'small': 0.88}


def final_map(size: int) -> int:
  """Side of the last feature map of a `size` px input (ceil at every stride 2)."""
  return -(-size // TOTAL_STRIDE)


# The method against fixed-size training; then what each of its parts does:
# growing the size alone, growing regularisation on top, training small throughout.
COMPARISONS = [('progressive', 'fixed'), ('progressive_size', 'fixed'),
               ('progressive', 'progressive_size'), ('fixed_small', 'fixed')]


def _progressive(min_size: int, full: int, *, num_stages: int, regularise: bool) -> dict:
  over = {'progressive.preset': 'paper', 'progressive.num_stages': num_stages,
          'progressive.image_size_min': min_size, 'progressive.image_size_max': full,
          'progressive.randaug_magnitude_min': 0.0, 'progressive.randaug_magnitude_max': 0.0,
          'progressive.cutmix_alpha_min': 0.0, 'progressive.cutmix_alpha_max': 0.0}
  if regularise:  # the paper's direction: weak regularisation on small images
    over.update({'progressive.mixup_alpha_min': 0.0, 'progressive.mixup_alpha_max': 0.1,
                 'progressive.dropout_min': 0.05, 'progressive.dropout_max': 0.15})
  else:  # held at the fixed run's values
    over.update({'progressive.mixup_alpha_min': 0.0, 'progressive.mixup_alpha_max': 0.0,
                 'progressive.dropout_min': 0.1, 'progressive.dropout_max': 0.1})
  return over


def time_to_target_metric(target: float) -> harness.Metric:
  """Per run: the training wall time of its first eval with EMA top-1 >= target."""
  if not 0.0 <= target <= 1.0:
    raise ValueError(f'--target_top1={target}: expected a fraction in [0, 1]')
  return harness.Metric(
      key='time_to_target_s', label=f'wall time to EMA top-1 \u2265 {100 * target:g} %',
      value=lambda row: harness.time_to_target(row.get('evals', []), target),
      unit='s', digits=1, lower_is_better=True)


# The paper's other half of the claim: the whole run's cost at equal epochs.
TRAIN_TIME_METRIC = harness.Metric(
    key='train_wall_s', label='training wall time of the whole run',
    value=lambda row: float(row['train_wall_s']), unit='s', digits=1, lower_is_better=True)


def _plot(rows: list[dict], study_dir: str, preset: str, metric: str,
          target: float) -> list[str]:
  """Training loss by step, eval top-1 by wall time (with the target), final top-1 vs time."""
  curves, evals = [], []
  for row in rows:
    workdir = harness.run_dir(study_dir, row['point'], row['seed'])
    curves += [{'step': r['step'], 'loss': r['loss'], 'point': row['point']}
               for r in harness.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
               if r.get('split') == 'train']
    evals += [{**e, 'point': row['point']} for e in row.get('evals', [])
              if e.get('wall_s') is not None]
  paths = [plots.plot_groups(
      curves, x='step', y='loss', group='point', by=('point', 'step'), errors=False,
      path=os.path.join(study_dir, 'train_loss.png'),
      title='training loss, mean over seeds (progressive stages switch size)',
      ylabel='train loss')]
  paths.append(plots.plot_groups(
      evals, x='wall_s', y='top1', group='point', by=('point', 'step'), hline=100 * target,
      path=os.path.join(study_dir, 'top1_vs_time.png'),
      title=f'EMA test top-1 at each eval vs training wall time; dotted: the target '
            f'{100 * target:g} % ({preset})', xlabel='train wall time (s)'))
  paths.append(plots.plot_groups(
      rows, x='train_wall_s', y=metric, group='point',
      path=os.path.join(study_dir, 'top1_vs_wall.png'),
      title=f'final test top-1 vs training wall time ({preset})',
      xlabel='train wall time (s)'))
  return paths


def make_study(preset: str, target_top1: float | None = None) -> harness.Study:
  if preset not in _SCHEDULES:
    raise ValueError(f'--preset={preset!r}; accepted: {", ".join(PRESET_NAMES)}')
  p = presets.get_preset(preset)
  target = _TARGETS[preset] if target_top1 is None else target_top1
  time_metric = time_to_target_metric(target)
  min_size, full, epochs, eval_every = _SCHEDULES[preset]
  if preset != 'smoke' and final_map(min_size) < MIN_FINAL_MAP:
    raise ValueError(f'{preset}: a {min_size} px stage leaves a {final_map(min_size)} px '
                     f'final map; the smallest stage needs >= {MIN_FINAL_MAP}')
  stages = 2 if preset == 'smoke' else 4

  def base():
    from efficientnet_jax import config_lib  # pylint: disable=g-import-not-at-top  (TensorFlow)
    config = p.config_fn()
    config_lib.set_fields(config, p.base.overrides())
    config.model.dropout = 0.1  # the fixed runs' rate; progressive_size holds it
    config.data.mixup_alpha = 0.0
    if epochs is not None:
      config.num_epochs = epochs
    if eval_every is not None:
      config.eval_every_steps = eval_every
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

  return harness.Study(
      name='progressive', base_config=base, points=points,
      info_columns=('schedule', 'train_sizes'),
      plot_fn=lambda rows, d: _plot(rows, d, preset, p.plot_metric, target),
      title=f'Progressive learning vs fixed-size training at equal steps ({preset} preset)',
      seeds=p.seeds, metric=p.plot_metric, comparisons=COMPARISONS,
      extra_metrics=(time_metric, TRAIN_TIME_METRIC))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='small', help=', '.join(PRESET_NAMES))
  parser.add_argument('--target_top1', type=float, default=None, metavar='FRACTION',
                      help='EMA top-1 (e.g. 0.85) whose training wall time is reported; '
                           f'default per preset: {_TARGETS}')
  harness.add_flags(parser)
  args = parser.parse_args(argv)
  return harness.main_for(lambda: make_study(args.preset, args.target_top1), args)


if __name__ == '__main__':
  sys.exit(main())
