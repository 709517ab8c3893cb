"""Confidence intervals and generated verdicts for the studies' seeds.

One seed of a short run says little: on the small preset the same network has
scored 80 % and 71 % from rounding differences alone. So every study runs each
point with several seeds and reports the mean with a 95 % Student-t interval,
and each comparison (compound vs width, progressive vs fixed, ...) as the
difference with its interval, paired by seed: seed k of both points starts
from the same initialisation and reads the same data order, so the paired
differences cancel much of that noise. A verdict is then stated only when the
interval excludes 0.

Pure functions over floats (no TensorFlow or JAX): the t quantile comes from
scipy.stats (pinned in requirements.txt), imported on first use.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

MINUS = '\u2212'  # typographic minus sign in the generated text


@dataclasses.dataclass(frozen=True)
class Summary:
  """Mean of n values with the sample std (ddof=1) and a Student-t interval.

  std, low, high and half_width are None for n = 1 (no spread to estimate).
  """
  mean: float
  std: float | None
  n: int
  low: float | None
  high: float | None
  half_width: float | None
  confidence: float = 0.95


@dataclasses.dataclass(frozen=True)
class Difference:
  """mean(a) - mean(b) with its interval; low/high are None when it cannot be computed.

  paired=True: n is the number of seeds both points have. paired=False (Welch):
  n and n_b are the seeds of a and of b. mean is None when there is no value.
  """
  mean: float | None
  low: float | None
  high: float | None
  n: int
  paired: bool = True
  excludes_zero: bool = False
  n_b: int | None = None
  confidence: float = 0.95


def t_quantile(p: float, df: float) -> float:
  """The p quantile of Student's t with df degrees of freedom (df may be fractional)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top  (slow import, first use only)
  return float(stats.t.ppf(p, df))


def _half_width(se: float, df: float, confidence: float) -> float:
  return t_quantile(0.5 + confidence / 2, df) * se if se > 0 else 0.0


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Summary:
  """Mean, sample std and the t interval mean ± t(1 - (1 - c)/2, n - 1) * std / sqrt(n)."""
  values = [float(v) for v in values]
  n = len(values)
  if n == 0:
    raise ValueError('mean_ci: no values')
  mean = math.fsum(values) / n
  if n == 1:
    return Summary(mean, None, 1, None, None, None, confidence)
  std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
  half = _half_width(std / math.sqrt(n), n - 1, confidence)
  return Summary(mean, std, n, mean - half, mean + half, half, confidence)


def _welch(a: list[float], b: list[float], confidence: float) -> Difference:
  """Unpaired difference, Welch-Satterthwaite degrees of freedom."""
  sa, sb = mean_ci(a, confidence), mean_ci(b, confidence)
  mean = sa.mean - sb.mean
  if sa.n < 2 or sb.n < 2:
    return Difference(mean, None, None, sa.n, False, False, sb.n, confidence)
  va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
  se = math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1)) if se > 0 else 1.0
  half = _half_width(se, df, confidence)
  low, high = mean - half, mean + half
  return Difference(mean, low, high, sa.n, False, low > 0 or high < 0, sb.n, confidence)


def paired_difference(a_by_seed: Mapping[int, float], b_by_seed: Mapping[int, float], *,
                      paired: bool = True, confidence: float = 0.95) -> Difference:
  """a - b over seeds: paired t on the per-seed differences (seeds in both), or Welch.

  paired=False compares all of a's values with all of b's (Welch's unequal
  variances t interval), for runs whose seeds do not correspond.
  """
  if not paired:
    a, b = list(a_by_seed.values()), list(b_by_seed.values())
    if not a or not b:
      return Difference(None, None, None, len(a), False, False, len(b), confidence)
    return _welch(a, b, confidence)
  common = sorted(set(a_by_seed) & set(b_by_seed))
  if not common:
    return Difference(None, None, None, 0, True, False, None, confidence)
  s = mean_ci([a_by_seed[k] - b_by_seed[k] for k in common], confidence)
  excludes = s.low is not None and (s.low > 0 or s.high < 0)
  return Difference(s.mean, s.low, s.high, s.n, True, excludes, None, confidence)


# --------------------------------------------------------------------------
# Text.


def signed(value: float, digits: int = 2) -> str:
  """'+1.23' / '−0.80' (typographic minus); zero is '+0.00'."""
  text = f'{abs(value):.{digits}f}'
  return (MINUS if value < 0 and float(text) != 0 else '+') + text


def format_ci(summary: Summary, digits: int = 2, scale: float = 1.0) -> str:
  """'86.95 – 88.21' (scaled, e.g. 100 for %), or '—' when n = 1."""
  if summary.low is None:
    return '—'
  low, high = (f'{v * scale:.{digits}f}'.replace('-', MINUS) for v in (summary.low, summary.high))
  return f'{low} – {high}'


def _sample(diff: Difference) -> str:
  if diff.paired:
    return f'paired over {diff.n} seed{"s" if diff.n != 1 else ""}'
  return f'unpaired (Welch), {diff.n} vs {diff.n_b} seeds'


def verdict_line(name_a: str, name_b: str, diff: Difference, metric_label: str, *,
                 unit: str = 'points', digits: int = 2, lower_is_better: bool = False) -> str:
  """One sentence: the difference a − b, its interval, and what it supports.

  e.g. 'compound_x2 − width_x2: +1.23 points of raw top-1 (95 % CI +0.40 to
  +2.06, paired over 3 seeds): compound_x2 is better'.
  """
  head = f'{name_a} {MINUS} {name_b}'
  if diff.mean is None:
    return f'{head}: no seed has a value ({metric_label}) for both, so no comparison'
  value = f'{signed(diff.mean, digits)} {unit} of {metric_label}'
  level = f'{100 * diff.confidence:g} %'
  if diff.low is None:
    return (f'{head}: {value} ({_sample(diff)}): the {level} interval cannot be computed '
            'from one seed')
  ci = (f'{level} CI {signed(diff.low, digits)} to {signed(diff.high, digits)}, '
        f'{_sample(diff)}')
  if not diff.excludes_zero:
    return f'{head}: {value} ({ci}): no significant difference at {level}'
  a_higher = diff.mean > 0
  winner = name_a if a_higher != lower_is_better else name_b
  return f'{head}: {value} ({ci}): {winner} is better' + (' (lower)' if lower_is_better else '')
