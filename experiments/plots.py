"""The studies' PNG plots (matplotlib, Agg backend: no display on cluster nodes)."""

from __future__ import annotations

import textwrap
from typing import Any

PERCENT = ('top1', 'raw_top1', 'top5')  # stored as fractions, plotted in %


def plot_groups(rows: list[dict], *, x: str, y: str, group: str, path: str, title: str,
                xlabel: str = '', ylabel: str = '', logx: bool = False,
                label: str = '', lines: bool = True) -> str:
  """One line per value of `group` (sorted by x); `label` annotates each point.

  lines=False draws markers only, for groups that are not a series (grid points).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  groups: dict[Any, list[dict]] = {}
  for row in rows:
    if row.get(x) is not None and row.get(y) is not None:
      groups.setdefault(row.get(group, ''), []).append(row)
  for key, members in groups.items():
    members = sorted(members, key=lambda r: r[x])
    xs = [r[x] for r in members]
    ys = [100 * r[y] if y in PERCENT else r[y] for r in members]
    ax.plot(xs, ys, marker='o', linestyle='-' if lines else 'none', label=str(key))
    if label:
      for r, xv, yv in zip(members, xs, ys):
        ax.annotate(str(r.get(label, '')), (xv, yv), fontsize=7,
                    textcoords='offset points', xytext=(3, 3))
  if logx:
    ax.set_xscale('log')
  ax.set_xlabel(xlabel or x)
  ax.set_ylabel(ylabel or (f'{y} (%)' if y in PERCENT else y))
  ax.set_title('\n'.join(textwrap.wrap(title, 70)), fontsize=9)
  ax.grid(True, alpha=0.3)
  if len(groups) > 1 or any(k not in ('', None) for k in groups):
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
