"""experiments/stats.py: the intervals against scipy.stats and by hand, and the verdict text."""

import math

import pytest

from experiments import stats

scipy_stats = pytest.importorskip('scipy.stats')

SAMPLES = [[1.0, 2.0, 3.0], [80.1, 79.4, 81.3, 80.0], [0.5, 0.5000001], [3.0, -1.0, 7.5, 2.25, 0.0]]


@pytest.mark.parametrize('values', SAMPLES)
@pytest.mark.parametrize('confidence', [0.95, 0.9])
def test_mean_ci_is_scipy_t_interval(values, confidence):
  s = stats.mean_ci(values, confidence)
  n = len(values)
  low, high = scipy_stats.t.interval(confidence, n - 1, loc=sum(values) / n,
                                     scale=scipy_stats.sem(values))
  assert s.n == n and s.confidence == confidence
  assert s.mean == pytest.approx(sum(values) / n)
  assert s.std == pytest.approx(float(scipy_stats.tstd(values)))  # ddof=1
  assert (s.low, s.high) == (pytest.approx(low), pytest.approx(high))
  assert s.half_width == pytest.approx((high - low) / 2)


def test_mean_ci_by_hand_and_edge_cases():
  s = stats.mean_ci([1.0, 2.0, 3.0])  # mean 2, std 1, t(0.975, 2) = 4.302653
  assert (s.mean, s.std) == (2.0, 1.0)
  assert s.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
  one = stats.mean_ci([0.7])
  assert (one.mean, one.n, one.std, one.low, one.high, one.half_width) == (
      0.7, 1, None, None, None, None)
  same = stats.mean_ci([0.5, 0.5, 0.5])  # no spread: a zero-width interval
  assert (same.low, same.high, same.half_width) == (0.5, 0.5, 0.0)
  with pytest.raises(ValueError, match='no values'):
    stats.mean_ci([])
  assert stats.t_quantile(0.975, 10) == pytest.approx(2.228139, rel=1e-6)
  assert stats.format_ci(s, 2, 100) == '−48.41 – 448.41'
  assert stats.format_ci(one) == '—'


def test_paired_difference_is_ttest_rel_on_the_common_seeds():
  a = {0: 81.0, 1: 82.5, 2: 80.2, 3: 83.0}
  b = {0: 80.1, 1: 81.0, 2: 80.0, 5: 70.0}  # seed 3 only in a, 5 only in b
  d = stats.paired_difference(a, b)
  ci = scipy_stats.ttest_rel([a[k] for k in (0, 1, 2)],
                             [b[k] for k in (0, 1, 2)]).confidence_interval(0.95)
  assert (d.n, d.paired, d.n_b) == (3, True, None)
  assert d.mean == pytest.approx((0.9 + 1.5 + 0.2) / 3)
  assert (d.low, d.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
  assert d.excludes_zero == (ci.low > 0 or ci.high < 0)
  one = stats.paired_difference({0: 1.0, 1: 2.0}, {1: 1.5})
  assert (one.mean, one.n, one.low, one.high, one.excludes_zero) == (0.5, 1, None, None, False)
  none = stats.paired_difference({0: 1.0}, {1: 1.0})
  assert (none.mean, none.n) == (None, 0)


def test_unpaired_difference_is_welch():
  a = {0: 81.0, 1: 82.5, 2: 80.2, 3: 83.0}
  b = {0: 78.1, 1: 79.0, 5: 78.0}
  d = stats.paired_difference(a, b, paired=False)
  ci = scipy_stats.ttest_ind(list(a.values()), list(b.values()),
                             equal_var=False).confidence_interval(0.95)
  assert (d.n, d.n_b, d.paired) == (4, 3, False)
  assert d.mean == pytest.approx(sum(a.values()) / 4 - sum(b.values()) / 3)
  assert (d.low, d.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
  assert d.excludes_zero  # about 3 points apart, spreads under 1.5
  assert stats.paired_difference({0: 1.0}, b, paired=False).low is None


def test_verdicts_where_the_interval_does_and_does_not_exclude_zero():
  # Synthetic: compound beats width by 4, 5 and 6 points on seeds 0-2.
  compound, width = {0: 84.0, 1: 85.0, 2: 86.0}, {0: 80.0, 1: 80.0, 2: 80.0}
  d = stats.paired_difference(compound, width)
  assert d.excludes_zero
  assert stats.verdict_line('compound_x2', 'width_x2', d, 'raw top-1') == (
      'compound_x2 − width_x2: +5.00 points of raw top-1 (95 % CI +2.52 to +7.48, paired '
      'over 3 seeds): compound_x2 is better')
  # Reversed, the other point wins.
  assert stats.verdict_line('width_x2', 'compound_x2', stats.paired_difference(
      width, compound), 'raw top-1').endswith('(95 % CI −7.48 to −2.52, paired over 3 '
                                              'seeds): compound_x2 is better')
  # Differences +3, −2, +1: mean 0.67, std 2.52, half-width 4.303 * 2.52 / sqrt(3) = 6.25.
  noisy = stats.paired_difference({0: 83.0, 1: 78.0, 2: 81.0}, width)
  assert not noisy.excludes_zero
  assert stats.verdict_line('compound_x2', 'width_x2', noisy, 'raw top-1') == (
      'compound_x2 − width_x2: +0.67 points of raw top-1 (95 % CI −5.58 to +6.92, paired '
      'over 3 seeds): no significant difference at 95 %')
  one = stats.paired_difference({0: 84.0}, width)
  assert stats.verdict_line('a', 'b', one, 'EMA top-1') == (
      'a − b: +4.00 points of EMA top-1 (paired over 1 seed): the 95 % interval cannot be '
      'computed from one seed')
  assert stats.verdict_line('a', 'b', stats.paired_difference({}, width), 'EMA top-1') == (
      'a − b: no seed has a value (EMA top-1) for both, so no comparison')


def test_verdict_where_lower_is_better():
  faster = stats.paired_difference({0: 80.0, 1: 86.0, 2: 83.0}, {0: 100.0, 1: 110.0, 2: 104.0})
  assert stats.verdict_line('progressive', 'fixed', faster, 'wall time to EMA top-1 ≥ 90 %',
                            unit='s', digits=1, lower_is_better=True) == (
      'progressive − fixed: −21.7 s of wall time to EMA top-1 ≥ 90 % (95 % CI −26.8 to '
      '−16.5, paired over 3 seeds): progressive is better (lower)')
  welch = stats.paired_difference({0: 1.0, 1: 2.0}, {0: 5.0, 1: 6.5, 2: 5.5}, paired=False)
  assert 'unpaired (Welch), 2 vs 3 seeds): a is better (lower)' in stats.verdict_line(
      'a', 'b', welch, 't', unit='s', lower_is_better=True)


def test_signed():
  assert [stats.signed(v) for v in (1.234, -0.8, 0.0, -0.001)] == [
      '+1.23', '−0.80', '+0.00', '+0.00']
  assert stats.signed(-12.34, 1) == '−12.3'
