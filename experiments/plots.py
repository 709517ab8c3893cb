"""The studies' PNG plots (matplotlib, Agg backend: no display on cluster nodes).

Rows come one per (point, seed); a plotted point is the mean over its seeds
with a 95 % Student-t error bar (`experiments/stats.py`), so a gap between
two markers can be read against their noise.
"""

from __future__ import annotations

import textwrap
from typing import Any, Sequence

from experiments import stats

PERCENT = ('top1', 'raw_top1', 'top5')  # stored as fractions, plotted in %


def aggregate(rows: list[dict], *, x: str, y: str, group: str,
              by: Sequence[str] = ('point',)) -> dict[Any, list[dict]]:
  """Rows with equal `group` and `by` values (the seeds of a point) -> one plotted point.

  Returns group -> [{'x', 'y', 'xerr', 'yerr', 'n', 'row'}] sorted by x: the
  means of x and y (y in % for top-1s), their 95 % CI half-widths (0 where
  n = 1 or all seeds agree) and the first row (for labels).
  """
  cells: dict[tuple, list[dict]] = {}
  for row in rows:
    if row.get(x) is not None and row.get(y) is not None:
      key = (row.get(group, ''), *(row.get(k) for k in by))
      cells.setdefault(key, []).append(row)
  scale = 100 if y in PERCENT else 1
  groups: dict[Any, list[dict]] = {}
  for key, members in cells.items():
    sx = stats.mean_ci([float(r[x]) for r in members])
    sy = stats.mean_ci([scale * float(r[y]) for r in members])
    groups.setdefault(key[0], []).append({
        'x': sx.mean, 'y': sy.mean, 'xerr': sx.half_width or 0.0,
        'yerr': sy.half_width or 0.0, 'n': sy.n, 'row': members[0]})
  return {k: sorted(v, key=lambda p: p['x']) for k, v in groups.items()}


def plot_groups(rows: list[dict], *, x: str, y: str, group: str, path: str, title: str,
                xlabel: str = '', ylabel: str = '', logx: bool = False,
                label: str = '', lines: bool = True, by: Sequence[str] = ('point',),
                errors: bool = True, hline: float | None = None) -> str:
  """One series per value of `group`: per-point means over seeds, 95 % CI error bars.

  `by` names what identifies a plotted point within a group (('point', 'step')
  for curves); `label` annotates each point; lines=False draws markers only,
  for groups that are not a series (grid points); errors=False omits the bars
  (dense curves); `hline` draws a horizontal reference (a target accuracy).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  groups = aggregate(rows, x=x, y=y, group=group, by=by)
  for key, points in groups.items():
    xs, ys = [p['x'] for p in points], [p['y'] for p in points]
    xerr = [p['xerr'] for p in points] if errors and any(p['xerr'] for p in points) else None
    yerr = [p['yerr'] for p in points] if errors and any(p['yerr'] for p in points) else None
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker='o', capsize=3,
                linestyle='-' if lines else 'none', label=str(key))
    if label:
      for p in points:
        ax.annotate(str(p['row'].get(label, '')), (p['x'], p['y']), fontsize=7,
                    textcoords='offset points', xytext=(3, 3))
  if hline is not None:
    ax.axhline(hline, color='grey', linestyle=':', linewidth=1)
  if logx:
    ax.set_xscale('log')
  ax.set_xlabel(xlabel or x)
  ax.set_ylabel(ylabel or (f'{y} (%)' if y in PERCENT else y))
  n = max((p['n'] for points in groups.values() for p in points), default=1)
  note = f' (mean of up to {n} seeds, 95 % CI bars)' if errors and n > 1 else ''
  ax.set_title('\n'.join(textwrap.wrap(title + note, 70)), fontsize=9)
  ax.grid(True, alpha=0.3)
  if len(groups) > 1 or any(k not in ('', None) for k in groups):
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
