"""Compound scaling: phi -> (width, depth, resolution), and channel / repeat rounding.

The released EfficientNet-B1..B7 were *not* produced by the paper's formula
d = alpha**phi, w = beta**phi, r = base * gamma**phi: their coefficients are a
hand-tuned table (tensorflow/tpu `efficientnet_builder.efficientnet_params`).
Both live here side by side; the table is the default and the formula is an
explicit opt-in, so an ablation never silently changes the released models.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

# (width, depth, resolution, dropout) of the released V1 models.
OFFICIAL_V1_TABLE: dict[str, tuple[float, float, int, float]] = {
    'b0': (1.0, 1.0, 224, 0.2),
    'b1': (1.0, 1.1, 240, 0.2),
    'b2': (1.1, 1.2, 260, 0.3),
    'b3': (1.2, 1.4, 300, 0.3),
    'b4': (1.4, 1.8, 380, 0.4),
    'b5': (1.6, 2.2, 456, 0.4),
    'b6': (1.8, 2.6, 528, 0.5),
    'b7': (2.0, 3.1, 600, 0.5),
    'b8': (2.2, 3.6, 672, 0.5),
    'l2': (4.3, 5.3, 800, 0.5),
}

# The paper's grid-searched coefficients (alpha * beta**2 * gamma**2 = 1.92 ~ 2).
ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15
BASE_RESOLUTION = 224
SCALING_MODES = ('table', 'formula')


@dataclasses.dataclass(frozen=True)
class Coefficients:
  """Scaling coefficients of one network relative to its base (B0)."""
  width: float
  depth: float
  resolution: int
  dropout: float
  # FLOPs multiple the coefficients imply, (depth * width**2 * (r/base)**2).
  compute_multiple: float


def _check_number(field: str, value, *, allow_zero: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f'{field} must be a number, got {value!r}')
  if value < 0 or (value == 0 and not allow_zero) or math.isnan(value):
    accepted = 'a number >= 0' if allow_zero else 'a positive number'
    raise ValueError(f'{field} must be {accepted}, got {value!r}')
  return float(value)


def formula_dropout(phi: float) -> float:
  """Head dropout for formula-scaled models: 0.2 at phi=0 rising 0.05 per phi to 0.5.

  The released table steps 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5 for B0..B7;
  this is the straight line through the same end points.
  """
  return min(0.5, 0.2 + 0.05 * phi)


def compound_coefficients(phi: float,
                          *,
                          scaling: str = 'table',
                          alpha: float = ALPHA,
                          beta: float = BETA,
                          gamma: float = GAMMA,
                          base_resolution: int = BASE_RESOLUTION,
                          dropout: float | None = None) -> Coefficients:
  """Returns (width, depth, resolution, dropout) for compound coefficient phi.

  Args:
    phi: the compound coefficient. In 'table' mode an integer 0..8 (B0..B8).
    scaling: 'table' (the released, hand-tuned values) or 'formula'
      (depth = alpha**phi, width = beta**phi, resolution = base * gamma**phi).
    alpha, beta, gamma: per-dimension bases of the formula. alpha*beta**2*gamma**2
      far from 2 is allowed (ablations need it); `compute_multiple` reports it.
    base_resolution: resolution of the phi=0 network.
    dropout: head dropout; None uses the table value or `formula_dropout(phi)`.

  Raises:
    ValueError: naming the field, for a non-positive or non-numeric input.
  """
  phi = _check_number('phi', phi, allow_zero=True)
  alpha = _check_number('alpha', alpha)
  beta = _check_number('beta', beta)
  gamma = _check_number('gamma', gamma)
  base_resolution = int(_check_number('base_resolution', base_resolution))
  if scaling == 'table':
    if phi != int(phi) or not 0 <= phi <= 8:
      raise ValueError(f"phi={phi!r} has no entry in the official table (integers 0..8); "
                       "use scaling='formula' for other values")
    width, depth, resolution, table_dropout = OFFICIAL_V1_TABLE[f'b{int(phi)}']
    dropout = table_dropout if dropout is None else dropout
  elif scaling == 'formula':
    depth, width = alpha**phi, beta**phi
    resolution = int(round(base_resolution * gamma**phi))
    dropout = formula_dropout(phi) if dropout is None else dropout
  else:
    raise ValueError(f'scaling={scaling!r}; accepted: {", ".join(SCALING_MODES)}')
  dropout = _check_number('dropout', dropout, allow_zero=True)
  multiple = depth * width**2 * (resolution / base_resolution)**2
  return Coefficients(width, depth, resolution, dropout, multiple)


def round_filters(filters: int, width: float | None, *, divisor: int = 8,
                  ten_percent_rule: bool = True) -> int:
  """Scales a channel count by `width` and rounds it to a multiple of `divisor`.

  V1 adds `divisor` when rounding lost more than 10 % (`ten_percent_rule`, which
  turns B3's 16*1.2=19.2 into 24); V2 has no such rule (its B3 keeps 16).
  """
  if width is None:
    return filters
  scaled = filters * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if ten_percent_rule and rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def round_repeats(repeats: int, depth: float | None) -> int:
  """Scales a stage's block count by `depth`, rounding up (official `ceil`)."""
  if depth is None:
    return repeats
  return int(math.ceil(depth * repeats))
