"""Scales a base network along one dimension (or all, compound) to a multiply-add budget.

The model counter (`model_table.count_macs`) is the judge: for a budget of k
times the base's multiply-adds, bisection finds the depth, width, resolution
or compound phi whose network comes closest. Depth (block counts are
ceil(depth * repeats)), width (channels round to multiples of 8) and
resolution (integer pixels) are discrete, so MACs are a step function of the
multiplier: the result is the closer of the two steps around the budget, and
its *achieved* MACs are reported beside the budget.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from configs import base as base_config
from efficientnet_jax.model import architectures
from efficientnet_jax import model_table
from efficientnet_jax.model import scaling
from experiments.scaling_ablation.presets import BaseNet

FAMILIES = ('depth', 'width', 'resolution', 'compound')


@dataclasses.dataclass(frozen=True)
class Scaled:
  """A network scaled from a base: its multipliers and what it costs."""
  width: float
  depth: float
  resolution: int
  macs: int
  phi: float | None = None  # compound coefficient (compound family only)


def macs_of(base: BaseNet, width: float, depth: float, resolution: int,
            num_classes: int) -> int:
  """Multiply-adds of `base`'s block table at (width, depth, resolution)."""
  cfg = base_config.get_config().model
  for key, value in base.overrides(width, depth, resolution).items():
    cfg[key.split('.', 1)[1]] = value
  spec = architectures.spec_from_config(cfg)
  return model_table.count_macs(spec, resolution, num_classes=num_classes)


def compound(base: BaseNet, phi: float, alpha: float = scaling.ALPHA,
             beta: float = scaling.BETA, gamma: float = scaling.GAMMA) -> tuple:
  """(width, depth, resolution) of the base scaled by alpha**phi, beta**phi, gamma**phi.

  The formula of `scaling.compound_coefficients`, applied relative to the
  base's own multipliers (the formula itself scales relative to B0 = 1.0).
  """
  c = scaling.compound_coefficients(phi, scaling='formula', alpha=alpha, beta=beta,
                                    gamma=gamma, base_resolution=base.resolution)
  return base.width * c.width, base.depth * c.depth, c.resolution


def _bisect(macs_fn: Callable[[float], int], lo: float, hi: float, target: float, *,
            integer: bool, iterations: int = 60) -> tuple[float, float]:
  """(below, above): the largest x with macs < target and the smallest with macs >= target."""
  if macs_fn(lo) >= target:
    return lo, lo
  for _ in range(40):  # grow hi until it reaches the budget
    if macs_fn(hi) >= target:
      break
    lo, hi = hi, hi * 2
  else:
    raise ValueError(f'no multiplier up to {hi:g} reaches {target:.4g} multiply-adds')
  for _ in range(iterations):
    if integer and hi - lo <= 1:
      break
    mid = (lo + hi) // 2 if integer else (lo + hi) / 2
    if macs_fn(mid) >= target:
      hi = mid
    else:
      lo = mid
  return lo, hi


def _closest(macs_fn, lo: float, hi: float, target: float, *, integer: bool,
             digits: int = 4) -> tuple[float, int]:
  """The multiplier (rounded to `digits` without leaving its step) closest to target."""
  below, above = _bisect(macs_fn, lo, hi, target, integer=integer)
  if not integer:  # round outwards: the rounded value stays on the same step
    scale = 10**digits
    below, above = math.floor(below * scale) / scale, math.ceil(above * scale) / scale
  below_macs, above_macs = macs_fn(below), macs_fn(above)
  if abs(math.log(below_macs / target)) < abs(math.log(above_macs / target)):
    return below, below_macs
  return above, above_macs


def match_budget(base: BaseNet, family: str, budget: float, num_classes: int, *,
                 alpha: float = scaling.ALPHA, beta: float = scaling.BETA,
                 gamma: float = scaling.GAMMA) -> Scaled:
  """The `family`-scaled base network closest to `budget` x the base's multiply-adds.

  Raises:
    ValueError: for an unknown family or a budget below 1.
  """
  if family not in FAMILIES:
    raise ValueError(f'family={family!r}; accepted: {", ".join(FAMILIES)}')
  if not budget >= 1:
    raise ValueError(f'budget={budget!r}; accepted: a multiple >= 1 of the base MACs')
  w0, d0, r0 = base.width, base.depth, base.resolution
  target = budget * macs_of(base, w0, d0, r0, num_classes)
  count = lambda w, d, r: macs_of(base, w, d, r, num_classes)  # noqa: E731
  if family == 'depth':
    depth, macs = _closest(lambda d: count(w0, d, r0), d0, 2 * d0, target, integer=False)
    return Scaled(w0, depth, r0, macs)
  if family == 'width':
    width, macs = _closest(lambda w: count(w, d0, r0), w0, 2 * w0, target, integer=False)
    return Scaled(width, d0, r0, macs)
  if family == 'resolution':
    res, macs = _closest(lambda r: count(w0, d0, int(r)), r0, 2 * r0, target, integer=True)
    return Scaled(w0, d0, int(res), macs)

  def compound_macs(phi):
    return count(*compound(base, phi, alpha, beta, gamma))
  phi, macs = _closest(compound_macs, 0.0, 1.0, target, integer=False)
  width, depth, res = compound(base, phi, alpha, beta, gamma)
  return Scaled(width, depth, res, macs, phi=phi)
