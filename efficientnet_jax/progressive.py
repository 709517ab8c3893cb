"""Progressive learning (EfficientNetV2): the stage plan a training run walks.

Image size and regularisation (RandAugment magnitude, mixup/cutmix alpha,
dropout) grow together from stage to stage. The plan is pure data computed
from the config: `build_plan` turns `config.progressive` into `Stage`s, each
with its step range, image size, batch size and augmentation strength. The
train loop builds one input pipeline and one train step per stage
(`train_loop.py`); a run without progressive learning is a one-stage plan.

Two presets pick the interpolation rule and the numbers (V2-S/M/L/XL; the
'official' preset also V2-B0..B3):

* 'paper' (arXiv:2104.00298, Table 6): every value linear from its min in
  the first stage to its max in the last, e.g. V2-S sizes 128, 185, 243, 300.
* 'official' (google/automl `efficientnetv2/main.py`): stage s trains at
  int(base + (train - base)·(s+1)/N), so the first stage is *not* the base
  (V2-S: 171, 214, 257, 300); RandAugment and mixup = cutmix by linspace;
  dropout is not scheduled (the code deletes its dropout list) and stays the
  model's. The code applies this to every `efficientnetv2-*` config, B0-B3
  included (`effnetv2_configs.py` `train=dict(isize=..., stages=4,
  sched=True)`): V2-B0 trains at 144, 160, 176, 192. B0-B3 augment with
  AutoAugment, which ignores the RandAugment magnitudes, and have mixup 0.

Any field set in the config (>= 0, sizes > 0) overrides the preset's number;
models without preset numbers (the Fashion-MNIST demo) set them all.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

PRESETS = ('paper', 'official')
FIELDS = ('image_size', 'randaug_magnitude', 'mixup_alpha', 'cutmix_alpha', 'dropout')

_MODEL = None  # preset dropout entry meaning "the model's own rate, held fixed"

# (min, max) per field: paper Table 6 (arXiv:2104.00298; no cutmix in the paper;
# XL is not in the table and reuses L) and google/automl
# efficientnetv2/effnetv2_configs.py efficientnetv2_params (6a54c87) with
# hparams.py's ibase=128 (mixup = cutmix alpha).
PRESET_VALUES = {
    'paper': {
        'v2_s': dict(image_size=(128, 300), randaug_magnitude=(5, 15),
                     mixup_alpha=(0, 0), cutmix_alpha=(0, 0), dropout=(0.1, 0.3)),
        'v2_m': dict(image_size=(128, 380), randaug_magnitude=(5, 20),
                     mixup_alpha=(0, 0.2), cutmix_alpha=(0, 0), dropout=(0.1, 0.4)),
        'v2_l': dict(image_size=(128, 380), randaug_magnitude=(5, 25),
                     mixup_alpha=(0, 0.4), cutmix_alpha=(0, 0), dropout=(0.1, 0.5)),
        'v2_xl': dict(image_size=(128, 380), randaug_magnitude=(5, 25),
                      mixup_alpha=(0, 0.4), cutmix_alpha=(0, 0), dropout=(0.1, 0.5)),
    },
    'official': {
        'v2_s': dict(image_size=(128, 300), randaug_magnitude=(5, 10),
                     mixup_alpha=(0, 0), cutmix_alpha=(0, 0), dropout=(_MODEL, _MODEL)),
        'v2_m': dict(image_size=(128, 384), randaug_magnitude=(5, 15),
                     mixup_alpha=(0, 0.2), cutmix_alpha=(0, 0.2), dropout=(_MODEL, _MODEL)),
        'v2_l': dict(image_size=(128, 384), randaug_magnitude=(5, 20),
                     mixup_alpha=(0, 0.5), cutmix_alpha=(0, 0.5), dropout=(_MODEL, _MODEL)),
        'v2_xl': dict(image_size=(128, 384), randaug_magnitude=(5, 20),
                      mixup_alpha=(0, 0.5), cutmix_alpha=(0, 0.5), dropout=(_MODEL, _MODEL)),
        # google/automl efficientnetv2/effnetv2_configs.py lines 203-210 and 227
        # (6a54c87): train sizes 192/192/208/240 from ibase 128, augmentation
        # 'effnetv1_autoaug' (its RandAugment list linspace(5, 0) is unused: 0 here)
        # and mixup = cutmix 0.
        **{name: dict(image_size=(128, size), randaug_magnitude=(0, 0), mixup_alpha=(0, 0),
                      cutmix_alpha=(0, 0), dropout=(_MODEL, _MODEL))
           for name, size in (('v2_b0', 192), ('v2_b1', 192), ('v2_b2', 208),
                              ('v2_b3', 240))},
    },
}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: steps [start_step, end_step) at one image size and regularisation.

  Attributes:
    index: 0-based stage number.
    start_step: first global optimizer step of the stage.
    end_step: one past its last step.
    start_epoch: training epochs completed when the stage starts.
    steps_per_epoch: optimizer steps per epoch at this stage's batch size.
    image_size: training image side.
    batch_size: global batch size.
    randaug_magnitude: RandAugment M (used when data.augment is 'randaugment').
    mixup_alpha: mixup Beta parameter (0 = off).
    cutmix_alpha: cutmix Beta parameter (0 = off).
    dropout: head dropout, or None for the model's own rate.
    data_offset: input-iterator step minus global step. 0 unless batch sizes
      vary: the iterator counts batches of this stage's size, from the epoch
      where the stage starts.
  """
  index: int
  start_step: int
  end_step: int
  start_epoch: float
  steps_per_epoch: int
  image_size: int
  batch_size: int
  randaug_magnitude: float
  mixup_alpha: float
  cutmix_alpha: float
  dropout: float | None
  data_offset: int = 0

  @property
  def num_steps(self) -> int:
    return self.end_step - self.start_step

  @property
  def compile_key(self) -> tuple:
    """What the train step is compiled for: input shape and the static dropout rate."""
    return (self.image_size, self.batch_size, self.dropout)

  def data_step(self, step: int) -> int:
    """The `start_step` to give the input iterator to resume this stage at `step`."""
    return step + self.data_offset

  def summary(self) -> dict:
    return {'stage': self.index, 'image_size': self.image_size,
            'batch_size': self.batch_size, 'start_step': self.start_step,
            'end_step': self.end_step, 'randaug_magnitude': self.randaug_magnitude,
            'mixup_alpha': self.mixup_alpha, 'cutmix_alpha': self.cutmix_alpha,
            'dropout': self.dropout}


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """The stages of a run, in order, covering steps [0, total_steps)."""
  stages: tuple[Stage, ...]
  preset: str = ''  # '' for a plain (one-stage) run

  @property
  def total_steps(self) -> int:
    return self.stages[-1].end_step

  @property
  def progressive(self) -> bool:
    return bool(self.preset)

  def stage_at(self, step: int) -> Stage:
    """The stage that trains `step` (the last stage for step >= total_steps)."""
    for stage in self.stages:
      if step < stage.end_step:
        return stage
    return self.stages[-1]

  def epoch_at(self, step: int) -> float:
    stage = self.stage_at(step)
    return stage.start_epoch + (step - stage.start_step) / stage.steps_per_epoch

  def batch_sizes_vary(self) -> bool:
    return len({s.batch_size for s in self.stages}) > 1


def stage_values(rule: str, num_stages: int, low: float, high: float, *,
                 image_size: bool = False) -> list[float]:
  """Per-stage values of one field from `low` (min) to `high` (max).

  Args:
    rule: 'paper' (linear from low in the first stage to high in the last) or
      'official' (the same, except image sizes: int(low + (high-low)·(s+1)/N),
      where low is the base size no stage trains at).
    num_stages: N >= 1. One stage trains at `high`.
    low: the min value.
    high: the max value.
    image_size: round to whole pixels (paper: nearest; official: truncation,
      as the official code's int()).

  Returns:
    N values.
  """
  if num_stages == 1:
    values = [float(high)]
  elif image_size and rule == 'official':
    return [int(low + (high - low) * (s + 1) / num_stages) for s in range(num_stages)]
  else:
    values = [low + (high - low) * s / (num_stages - 1) for s in range(num_stages)]
  if image_size:
    return [int(math.floor(v + 0.5)) for v in values]
  return [round(float(v), 10) for v in values]  # no 0.30000000000000004 in the logs


def resolve_ranges(cfg, *, model_name: str, model_dropout: float) -> dict[str, tuple]:
  """(min, max) of every field: the config's where set, else the preset's.

  Args:
    cfg: the `config.progressive` section.
    model_name: `config.model.name` (which preset numbers apply).
    model_dropout: the model's head dropout (the official preset holds it).

  Raises:
    ValueError: a field unset without preset numbers, a size not positive, a
      negative value, a dropout >= 1 or a min above its max (one line naming
      the field).
  """
  table = PRESET_VALUES[cfg.preset].get(model_name, {})
  ranges = {}
  for field in FIELDS:
    pair = []
    for end in ('min', 'max'):
      name = f'{field}_{end}'
      value = cfg[name]
      if value != -1 and (value <= 0 if field == 'image_size' else value < 0):
        raise ValueError(f'progressive.{name}={value:g} must be '
                         f'{"positive" if field == "image_size" else ">= 0"} '
                         "(or -1: the preset's number)")
      if value == -1:  # unset: the preset's number
        if field not in table:
          raise ValueError(f'progressive.{name} is unset and model {model_name!r} has no '
                           f'{cfg.preset!r} preset numbers; set it')
        value = table[field][end == 'max']
        value = model_dropout if value is _MODEL else value
      pair.append(int(value) if field == 'image_size' else float(value))
    low, high = pair
    if field == 'dropout' and high >= 1:
      raise ValueError(f'progressive.dropout_max={high:g} must be below 1')
    if low > high:
      raise ValueError(f'progressive.{field}_min={low:g} is above '
                       f'progressive.{field}_max={high:g}')
    ranges[field] = (low, high)
  return ranges


def _check_boundaries(cfg, total_epochs: float, steps_per_epoch: int,
                      total_steps: int) -> list[float] | None:
  """The end epoch of each stage, or None for an equal split of the steps."""
  boundaries = [float(b) for b in cfg.boundaries or ()]
  if not boundaries:
    return None
  text = f'progressive.boundaries={tuple(cfg.boundaries)}'
  if len(boundaries) != cfg.num_stages:
    raise ValueError(f'{text} has {len(boundaries)} entries for '
                     f'progressive.num_stages={cfg.num_stages}; give the end epoch of each stage')
  if boundaries[0] <= 0 or any(b <= a for a, b in zip(boundaries, boundaries[1:])):
    raise ValueError(f'{text} must be positive and increasing (the end epoch of each stage)')
  if round(boundaries[-1] * steps_per_epoch) != total_steps:
    raise ValueError(f'{text} ends at epoch {boundaries[-1]:g} but training runs '
                     f'{total_epochs:g} epochs; the last boundary must equal the training length')
  return boundaries


def _adapted_batch_sizes(sizes: Sequence[int], batch_size: int, *, multiple: int,
                         max_batch_size: int, num_train: int) -> list[int]:
  """Batch ∝ 1/pixels (constant memory per step), a multiple of `multiple`.

  `batch_size` is the batch at the largest stage size; smaller images get
  batch·(largest/size)², rounded down to a multiple of the device count and
  capped by `max_batch_size` and by the training set.
  """
  cap = max_batch_size if max_batch_size > 0 else num_train
  cap = max(multiple, min(cap, num_train) // multiple * multiple)
  largest = max(sizes)
  return [max(multiple, min(cap, int(batch_size * (largest / s) ** 2) // multiple * multiple))
          for s in sizes]


def build_plan(config, *, model_name: str, model_dropout: float, image_size: int,
               num_train: int, steps_per_epoch: int, total_steps: int,
               device_count: int) -> StagePlan:
  """The run's stages from the config.

  Args:
    config: the full config (reads `progressive`, `batch_size`, `data`).
    model_name: `config.model.name` (selects preset numbers).
    model_dropout: the model's head dropout.
    image_size: the training size of a plain run.
    num_train: training examples (all processes).
    steps_per_epoch: steps per epoch at `config.batch_size`.
    total_steps: the run's length at `config.batch_size`.
    device_count: every stage's global batch must be a multiple of it.

  Returns:
    The plan; a one-stage plan equal to the plain recipe when
    `progressive.preset` is ''.

  Raises:
    ValueError: an invalid `progressive` field (one line naming it).
  """
  data = config.data
  cfg = config.progressive
  if not cfg.preset:
    return StagePlan((Stage(
        0, 0, total_steps, 0.0, steps_per_epoch, image_size, config.batch_size,
        float(data.randaug_magnitude), float(data.mixup_alpha), float(data.cutmix_alpha),
        None),))
  if cfg.preset not in PRESETS:
    raise ValueError(f"progressive.preset={cfg.preset!r}; accepted: '' (off), "
                     f'{", ".join(PRESETS)}')
  if cfg.num_stages < 1:
    raise ValueError(f'progressive.num_stages={cfg.num_stages} must be at least 1')
  ranges = resolve_ranges(cfg, model_name=model_name, model_dropout=model_dropout)
  values = {f: stage_values(cfg.preset, cfg.num_stages, *ranges[f],
                            image_size=f == 'image_size') for f in FIELDS}
  if data.augment != 'randaugment' and ranges['randaug_magnitude'][1] > 0:
    raise ValueError(f'progressive.randaug_magnitude_max={ranges["randaug_magnitude"][1]:g} '
                     f"has no effect with data.augment={data.augment!r}; use 'randaugment' "
                     'or set the magnitudes to 0')
  total_epochs = total_steps / steps_per_epoch
  ends = _check_boundaries(cfg, total_epochs, steps_per_epoch, total_steps)

  if cfg.adapt_batch_size:
    batches = _adapted_batch_sizes(values['image_size'], config.batch_size,
                                   multiple=device_count, max_batch_size=cfg.max_batch_size,
                                   num_train=num_train)
  else:
    batches = [config.batch_size] * cfg.num_stages
  if ends is None:
    ends = [total_epochs * (k + 1) / cfg.num_stages for k in range(cfg.num_stages)]

  same_grid = all(b == config.batch_size for b in batches)
  stages, start, start_epoch = [], 0, 0.0
  for k in range(cfg.num_stages):
    if same_grid:
      # The step grid of a plain run: the input iterator's step is the global
      # step, and an equal split ends stage k where the official code does,
      # at int((k+1)/N · train_steps).
      spe, offset = steps_per_epoch, 0
      end = (round(ends[k] * spe) if cfg.boundaries
             else total_steps * (k + 1) // cfg.num_stages)
    else:
      # Batch sizes vary: the stage covers its epochs in batches of its own
      # size, and its iterator starts at the epoch position the run has reached.
      spe = num_train // batches[k]
      first = round(start_epoch * spe)
      offset = first - start
      end = start + round(ends[k] * spe) - first
    if end <= start:
      raise ValueError(f'progressive.num_stages={cfg.num_stages} leaves stage {k} without '
                       f'training steps ({total_steps} steps in all); use fewer stages')
    stages.append(Stage(
        k, start, end, start_epoch, spe, values['image_size'][k], batches[k],
        values['randaug_magnitude'][k], values['mixup_alpha'][k], values['cutmix_alpha'][k],
        values['dropout'][k], offset))
    start_epoch += (end - start) / spe
    start = end
  return StagePlan(tuple(stages), cfg.preset)


def staged_schedule(plan: StagePlan, make_schedule: Callable[[int, int], Callable]):
  """A learning-rate schedule over global steps when batch sizes vary by stage.

  Within stage k the LR is `make_schedule(batch_k, steps_per_epoch_k)` at the
  stage's own step count, so warmup, decay and the linear scaling rule
  (peak ∝ batch) follow epochs, not steps.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  pieces = [(s.start_step, s.data_offset, make_schedule(s.batch_size, s.steps_per_epoch))
            for s in plan.stages]

  def schedule(step):
    step = jnp.asarray(step)
    lr = pieces[0][2](step + pieces[0][1])
    for start, offset, fn in pieces[1:]:
      lr = jnp.where(step >= start, fn(step + offset), lr)
    return lr

  return schedule
