"""The three scaling studies as lists of harness points: grid, single_vs_compound, table_vs_formula.

* grid: the paper's step 1, (alpha, beta, gamma) at phi = 1 under
  alpha * beta**2 * gamma**2 ~= 2.
* single_vs_compound: depth-only, width-only, resolution-only and compound
  scaling at matched multiply-add budgets (paper Fig. 3 / Fig. 8).
* table_vs_formula: the released B1..B4 coefficients against
  alpha**phi, beta**phi, gamma**phi, nominal and at the table's budget.

Each function takes a preset and returns a `harness.Study` with the preset's
seeds and the comparisons its verdicts answer (paired by seed, see
`harness.study_verdicts`); `study.py` is the command line.
"""

from __future__ import annotations

import os

from efficientnet_jax.model import scaling
from experiments import harness
from experiments import plots
from experiments.scaling_ablation import matching
from experiments.scaling_ablation.presets import BaseNet, Preset

STUDY_NAMES = ('grid', 'single_vs_compound', 'table_vs_formula')
PAPER_COEFFICIENTS = (scaling.ALPHA, scaling.BETA, scaling.GAMMA)


def _r(value: float) -> float:
  return round(float(value), 4)


def formula_overrides(base: BaseNet, phi: float, alpha: float, beta: float,
                      gamma: float) -> dict:
  """config.model for the base scaled by the formula at phi.

  The formula fields (scaling='formula', phi, alpha, beta, gamma,
  base_resolution) record the coefficients in the point's config; the explicit
  width / depth / resolution apply them relative to the base network, which
  need not be B0 (for a B0 base at its resolution they equal what the formula
  alone gives).
  """
  width, depth, resolution = matching.compound(base, phi, alpha, beta, gamma)
  return {**base.overrides(width, depth, resolution), 'model.scaling': 'formula',
          'model.phi': float(phi), 'model.alpha': float(alpha), 'model.beta': float(beta),
          'model.gamma': float(gamma), 'model.base_resolution': base.resolution}


# --------------------------------------------------------------------------
# 1. Grid search at phi = 1.


def grid_coefficients(preset: Preset) -> list[tuple[float, float, float]]:
  """(alpha, beta, gamma) of the grid with |alpha*beta^2*gamma^2 - 2| <= tolerance.

  alpha, beta, gamma >= 1 (no dimension shrinks). The paper's (1.2, 1.1, 1.15)
  comes first, whether or not the grid holds it; with `grid_max_points`, the
  rest are those closest to the constraint (ties: in grid order).
  """
  candidates = []
  for a in preset.grid_alphas:
    for b in preset.grid_betas:
      for g in preset.grid_gammas:
        product = a * b * b * g * g
        if abs(product - 2) <= preset.grid_tolerance and (a, b, g) != PAPER_COEFFICIENTS:
          candidates.append((abs(product - 2), (a, b, g)))
  candidates.sort(key=lambda c: c[0])  # stable: grid order among ties
  chosen = [PAPER_COEFFICIENTS] + [abg for _, abg in candidates]
  if preset.grid_max_points:
    chosen = chosen[:preset.grid_max_points]
  return chosen


def grid_study(preset: Preset) -> harness.Study:
  points = []
  for a, b, g in grid_coefficients(preset):
    over = formula_overrides(preset.base, 1.0, a, b, g)
    info = {'alpha': a, 'beta': b, 'gamma': g, 'constraint': _r(a * b * b * g * g),
            'paper': (a, b, g) == PAPER_COEFFICIENTS}
    points.append(harness.Point(f'a{a:g}_b{b:g}_g{g:g}', over, info))

  def plot(rows, study_dir):
    for row in rows:
      row['label'] = f'{row["alpha"]:g},{row["beta"]:g},{row["gamma"]:g}'
      row['kind'] = "the paper's (1.2, 1.1, 1.15)" if row['paper'] else 'other grid points'
      row['beta_gamma'] = f'{row["beta"]:g},{row["gamma"]:g}'
    return [plots.plot_groups(
        rows, x='macs', y=preset.plot_metric, group='kind', label='label', lines=False,
        path=os.path.join(study_dir, 'grid_top1_vs_macs.png'),
        title=f'phi=1 grid over (alpha, beta, gamma), {preset.name}; labels: alpha,beta,gamma',
        xlabel='multiply-adds'),
            plots.plot_groups(
                rows, x='alpha', y=preset.plot_metric, group='kind', label='beta_gamma',
                lines=False, path=os.path.join(study_dir, 'grid_top1_vs_alpha.png'),
                title='top-1 by alpha (labels: beta,gamma)', xlabel='alpha')]

  paper = points[0].name  # grid_coefficients puts the paper's first
  return harness.Study(
      name='grid', base_config=preset.config_fn, points=points,
      info_columns=('alpha', 'beta', 'gamma', 'constraint', 'paper'), plot_fn=plot,
      title=f'Step 1 grid search at phi = 1 ({preset.name} preset)',
      seeds=preset.seeds, metric=preset.plot_metric,
      comparisons=[(paper, p.name) for p in points[1:]])


# --------------------------------------------------------------------------
# 2. Single-dimension vs compound scaling at matched budgets.


def single_vs_compound_points(base: BaseNet, budgets, num_classes: int) -> list[harness.Point]:
  """The base network, then each family at each budget (matched by the MACs counter)."""
  base_macs = matching.macs_of(base, base.width, base.depth, base.resolution, num_classes)
  points = [harness.Point('base', base.overrides(), {
      'family': 'base', 'budget': 1.0, 'achieved': 1.0})]
  for budget in budgets:
    for family in matching.FAMILIES:
      s = matching.match_budget(base, family, budget, num_classes)
      over = (formula_overrides(base, s.phi, *PAPER_COEFFICIENTS) if family == 'compound'
              else base.overrides(s.width, s.depth, s.resolution))
      info = {'family': family, 'budget': budget, 'achieved': _r(s.macs / base_macs),
              'phi': '' if s.phi is None else s.phi}
      points.append(harness.Point(f'{family}_x{budget:g}', over, info))
  return points


def plot_families(rows: list[dict], study_dir: str, title: str,
                  metric: str = 'top1') -> list[str]:
  """Top-1 against MACs, one line per family, each starting at the base network."""
  base = [r for r in rows if r['family'] == 'base']
  lines = [{**r, 'line': r['family']} for r in rows if r['family'] != 'base']
  for family in matching.FAMILIES:
    lines += [{**r, 'line': family} for r in base]
  return [plots.plot_groups(lines, x='macs', y=metric, group='line', logx=True,
                              path=os.path.join(study_dir, 'top1_vs_macs.png'),
                              title=title, xlabel='multiply-adds (achieved)')]


def single_vs_compound_comparisons(budgets) -> list[tuple[str, str]]:
  """At each budget: compound against depth-, width- and resolution-only."""
  return [(f'compound_x{b:g}', f'{family}_x{b:g}') for b in budgets
          for family in matching.FAMILIES if family != 'compound']


def single_vs_compound_study(preset: Preset, *, base: BaseNet | None = None,
                             name: str = 'single_vs_compound', title: str = '') -> harness.Study:
  """Also the baselines study's engine: `base` replaces the preset's base network."""
  base = base or preset.base
  points = single_vs_compound_points(base, preset.budgets, preset.num_classes)
  label = base.model or 'EfficientNet-B0 table'
  title = title or (f'Single-dimension vs compound scaling of {label} '
                    f'(w{base.width:g}/d{base.depth:g}/{base.resolution}px), {preset.name}')
  return harness.Study(
      name=name, base_config=preset.config_fn, points=points,
      info_columns=('family', 'budget', 'achieved', 'phi'),
      plot_fn=lambda rows, d: plot_families(rows, d, title, preset.plot_metric), title=title,
      seeds=preset.seeds, metric=preset.plot_metric,
      comparisons=single_vs_compound_comparisons(preset.budgets))


# --------------------------------------------------------------------------
# 3. The released table against the formula.


def table_overrides(base: BaseNet, phi: int) -> dict:
  """The released B{phi} width/depth/resolution multiples, applied to the base network."""
  width, depth, resolution, _ = scaling.OFFICIAL_V1_TABLE[f'b{phi}']
  ratio = resolution / scaling.OFFICIAL_V1_TABLE['b0'][2]
  return base.overrides(base.width * width, base.depth * depth,
                        int(round(base.resolution * ratio)))


def table_vs_formula_study(preset: Preset) -> harness.Study:
  """Per phi: the table, the formula at the same phi, and the formula at the table's MACs."""
  base, n = preset.base, preset.num_classes
  base_macs = matching.macs_of(base, base.width, base.depth, base.resolution, n)
  points = []
  for phi in preset.phis:
    table = table_overrides(base, phi)
    table_macs = matching.macs_of(base, table['model.width'], table['model.depth'],
                                  table['model.resolution'], n)
    points.append(harness.Point(f'table_b{phi}', table, {
        'scaling': 'table', 'phi': phi, 'achieved': _r(table_macs / base_macs)}))
    formula = formula_overrides(base, phi, *PAPER_COEFFICIENTS)
    formula_macs = matching.macs_of(base, formula['model.width'], formula['model.depth'],
                                    formula['model.resolution'], n)
    points.append(harness.Point(f'formula_phi{phi}', formula, {
        'scaling': 'formula', 'phi': phi, 'achieved': _r(formula_macs / base_macs)}))
    # The formula's phi that costs what the table's B{phi} costs: equal budgets.
    matched = matching.match_budget(base, 'compound', table_macs / base_macs, n)
    points.append(harness.Point(
        f'formula_matched_b{phi}', formula_overrides(base, matched.phi, *PAPER_COEFFICIENTS),
        {'scaling': 'formula_matched', 'phi': matched.phi,
         'achieved': _r(matched.macs / base_macs)}))

  def plot(rows, study_dir):
    return [plots.plot_groups(
        rows, x='macs', y=preset.plot_metric, group='scaling', label='phi', logx=True,
        path=os.path.join(study_dir, 'table_vs_formula.png'),
        title=f'Released B1-B{max(preset.phis)} table vs alpha^phi, beta^phi, gamma^phi '
              f'({preset.name})', xlabel='multiply-adds')]

  # The table against the formula at its budget (equal MACs), then at its phi.
  comparisons = [pair for phi in preset.phis for pair in (
      (f'table_b{phi}', f'formula_matched_b{phi}'), (f'table_b{phi}', f'formula_phi{phi}'))]
  return harness.Study(
      name='table_vs_formula', base_config=preset.config_fn, points=points,
      info_columns=('scaling', 'phi', 'achieved'), plot_fn=plot,
      title=f'Released table vs formula coefficients ({preset.name} preset)',
      seeds=preset.seeds, metric=preset.plot_metric, comparisons=comparisons)


def make_study(name: str, preset: Preset) -> harness.Study:
  builders = {'grid': grid_study, 'single_vs_compound': single_vs_compound_study,
              'table_vs_formula': table_vs_formula_study}
  if name not in builders:
    raise ValueError(f'--study={name!r}; accepted: {", ".join(STUDY_NAMES)}')
  return builders[name](preset)
