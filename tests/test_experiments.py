"""experiments/: the harness, and the smoke preset of every study end to end on fake data."""

import csv
import json
import os

import jax
import pytest

from efficientnet_jax import config_lib
from efficientnet_jax import train
from experiments import harness
from experiments.baselines import study as baselines_study
from experiments.progressive import study as progressive_study
from experiments.scaling_ablation import matching
from experiments.scaling_ablation import presets
from experiments.scaling_ablation import study as scaling_study
from experiments.scaling_ablation import studies
from tests import smoke_run

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
# Resolution, depth and width are discrete: the matched network is the step
# closest to the budget, at most this far off (relative) at each preset.
MACS_TOLERANCE = {'smoke': 0.10, 'small': 0.15, 'imagenet': 0.05}


@pytest.fixture(scope='module')
def data_flags(tmp_path_factory):
  """Flags for every smoke run: 40/13 fake Fashion-MNIST images, one device.

  One device, because each new network's first checkpoint otherwise slices
  every replicated array per simulated device (a compile per slice shape).
  The smoke presets share networks (grid's paper point = table_vs_formula's
  formula_phi1; single_vs_compound's base = progressive's fixed), so the
  persistent compilation cache compiles those once.
  """
  root = smoke_run.write_fake_data(tmp_path_factory.mktemp('fashion'))
  return [f'--set=data.source_dir={root / "idx"}', f'--set=data.data_dir={root / "tfds"}',
          '--num_devices=1']


def _rows(study_dir):
  with open(os.path.join(study_dir, 'results.csv'), encoding='utf-8') as f:
    return list(csv.DictReader(f))


def _check_outputs(study_dir, names, pngs, of=None):
  """Checks results.csv / .md / PNGs hold `names` (finished), out of `of` points in the study."""
  of = len(names) if of is None else of
  rows = _rows(study_dir)
  assert [r['point'] for r in rows] == names
  for row in rows:
    assert int(row['steps']) == 2
    assert 0.0 <= float(row['top1']) <= 1.0 and int(row['macs']) > 0 and int(row['params']) > 0
    assert float(row['train_wall_s']) > 0
  table = open(os.path.join(study_dir, 'results.md'), encoding='utf-8').read()
  assert f'{len(names)} of {of} points finished' in table
  for name in names:
    assert f'| {name} |' in table
  total_min = sum(float(r['train_wall_s']) for r in rows) / 60
  assert (f'CPUs. Training wall time of the {len(names)} finished points: {total_min:.1f} min'
          in table)
  for png in pngs:
    with open(os.path.join(study_dir, png), 'rb') as f:
      assert f.read(8) == PNG_MAGIC, png
    assert f'![{png}]({png})' in table
  return rows


def _subset(all_points: bool, names: list[str], keep: list[str]) -> tuple[list[str], list[str]]:
  """(--points flags, names trained): every point, or the default suite's cheaper `keep`."""
  if all_points:
    return [], names
  return [f'--points={",".join(keep)}'], [n for n in names if n in keep]


# Every point of the three studies below is its own compile (~20 training
# programs in all); the default suite trains two points of each, `make
# test-slow` all of them.
ALL_OR_SUBSET = pytest.mark.parametrize(
    'all_points', [pytest.param(True, marks=pytest.mark.slow, id='all'),
                   pytest.param(False, id='two_points')])


def _no_training(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('a finished point was trained again')
  monkeypatch.setattr(train, 'run', refuse)


# --------------------------------------------------------------------------
# Harness pieces (no training).


def test_shards_partition_the_points():
  points = [harness.Point(f'p{i}', {}) for i in range(7)]
  shards = [harness.select_points(points, shard=(i, 3)) for i in range(3)]
  assert [p.name for p in shards[1]] == ['p1', 'p4']
  assert sorted(p.name for s in shards for p in s) == sorted(p.name for p in points)
  assert [p.name for p in harness.select_points(points, names=['p5', 'p2'])] == ['p2', 'p5']
  with pytest.raises(ValueError, match=r"--points: unknown \['nope'\]"):
    harness.select_points(points, names=['nope'])
  with pytest.raises(ValueError, match=r'^shard=3/3: expected i/n'):
    harness.select_points(points, shard=(3, 3))


def test_overrides_name_unknown_fields():
  config = presets.smoke_config()
  config_lib.set_fields(config, harness.parse_set_flag(['model.width=0.5', 'data.name=x']))
  assert (config.model.width, config.data.name) == (0.5, 'x')
  with pytest.raises(ValueError, match=r"^unknown config field 'model.widht'; did you mean "
                                       r"'model.width'\?$"):
    config_lib.set_fields(config, {'model.widht': 1.0})
  with pytest.raises(ValueError, match=r"^unknown config field 'nope.x'$"):
    config_lib.set_fields(config, {'nope.x': 1.0})


@pytest.mark.parametrize('preset', presets.PRESET_NAMES)
def test_grid_holds_the_paper_point_under_the_constraint(preset):
  p = presets.get_preset(preset)
  grid = studies.grid_coefficients(p)
  assert grid[0] == (1.2, 1.1, 1.15)
  assert len(set(grid)) == len(grid) >= 2
  for a, b, g in grid:
    assert abs(a * b * b * g * g - 2) <= p.grid_tolerance
    assert min(a, b, g) >= 1.0
  point = studies.grid_study(p).points[0]
  assert point.name == 'a1.2_b1.1_g1.15' and point.info['paper'] is True
  assert (point.overrides['model.scaling'], point.overrides['model.alpha']) == ('formula', 1.2)


@pytest.mark.parametrize('preset', presets.PRESET_NAMES)
def test_matched_macs_are_within_tolerance_and_closest(preset):
  p = presets.get_preset(preset)
  b, n = p.base, p.num_classes
  base_macs = matching.macs_of(b, b.width, b.depth, b.resolution, n)
  for budget in p.budgets:
    for family in matching.FAMILIES:
      s = matching.match_budget(b, family, budget, n)
      assert s.macs == matching.macs_of(b, s.width, s.depth, s.resolution, n)
      assert abs(s.macs / base_macs / budget - 1) <= MACS_TOLERANCE[preset], (family, budget)
      if family == 'resolution':  # no neighbouring integer resolution is closer
        for r in (s.resolution - 1, s.resolution + 1):
          other = matching.macs_of(b, b.width, b.depth, r, n)
          assert abs(other - budget * base_macs) >= abs(s.macs - budget * base_macs)
      if family != 'compound':  # the other two dimensions stay at the base's
        changed = [s.width != b.width, s.depth != b.depth, s.resolution != b.resolution]
        assert changed == [family == f for f in ('width', 'depth', 'resolution')]
  with pytest.raises(ValueError, match=r"^family='height'; accepted: depth, width"):
    matching.match_budget(b, 'height', 2.0, n)


def test_table_points_apply_the_released_multiples_to_the_base():
  p = presets.get_preset('small')  # base width 0.25, depth 0.5, 48 px
  over = studies.table_overrides(p.base, 4)  # B4: width 1.4, depth 1.8, 380 px
  assert over['model.width'] == pytest.approx(0.35)
  assert over['model.depth'] == pytest.approx(0.9)
  assert over['model.resolution'] == round(48 * 380 / 224)


# --------------------------------------------------------------------------
# Smoke presets end to end.


def test_grid_smoke_runs_skips_and_resumes(tmp_path, data_flags, monkeypatch, capsys):
  root = str(tmp_path)
  names = [p.name for p in studies.grid_study(presets.get_preset('smoke')).points]
  # An unfinished point: a 1-step run left a checkpoint but no result.
  study = studies.grid_study(presets.get_preset('smoke'))
  first = harness.point_config(study, study.points[0], harness.parse_set_flag(
      [f[len('--set='):] for f in data_flags if f.startswith('--set=')]))
  first.train_steps = 1
  train.run(first, os.path.join(root, 'grid', names[0]), devices=jax.devices()[:1])
  argv = ['--study=grid', '--preset=smoke', f'--root={root}', *data_flags]
  assert scaling_study.main(argv) == 0
  out = capsys.readouterr().out
  assert f'{names[0]}: resuming' in out and f'{names[1]}: training' in out
  rows = _check_outputs(os.path.join(root, 'grid'), names,
                        ['grid_top1_vs_macs.png', 'grid_top1_vs_alpha.png'])
  assert [r['paper'] for r in rows] == ['True', 'False']
  # Everything finished: a second invocation trains nothing and rebuilds the outputs.
  _no_training(monkeypatch)
  os.remove(os.path.join(root, 'grid', 'results.md'))
  published = os.path.join(root, 'published')
  assert scaling_study.main(argv + [f'--publish={published}']) == 0
  assert capsys.readouterr().out.count('finished before') == len(names)
  assert os.path.exists(os.path.join(root, 'grid', 'results.md'))
  # --publish copies exactly what the study generated.
  assert sorted(os.listdir(published)) == [
      'grid_top1_vs_alpha.png', 'grid_top1_vs_macs.png', 'results.csv', 'results.md']
  for name in os.listdir(published):
    with open(os.path.join(published, name), 'rb') as a, \
         open(os.path.join(root, 'grid', name), 'rb') as b:
      assert a.read() == b.read(), name
  # A point whose overrides changed since is refused, not silently reused.
  result_path = os.path.join(root, 'grid', names[1], harness.RESULT_FILE)
  result = json.load(open(result_path, encoding='utf-8'))
  result['overrides']['model.alpha'] = 9.0
  json.dump(result, open(result_path, 'w', encoding='utf-8'))
  assert scaling_study.main(argv) == 2
  assert 'delete the workdir or rename the point' in capsys.readouterr().err


@ALL_OR_SUBSET
def test_single_vs_compound_smoke(tmp_path, data_flags, all_points):
  names = ['base', 'depth_x2', 'width_x2', 'resolution_x2', 'compound_x2']
  points, trained = _subset(all_points, names, ['base', 'compound_x2'])
  argv = ['--study=single_vs_compound', '--preset=smoke', f'--root={tmp_path}', *data_flags,
          *points]
  assert scaling_study.main(argv) == 0
  rows = _check_outputs(tmp_path / 'single_vs_compound', trained, ['top1_vs_macs.png'],
                        of=len(names))
  base_macs = int(rows[0]['macs'])
  for row in rows[1:]:  # MACs counted from the trained config, not the matcher
    achieved = int(row['macs']) / base_macs
    assert achieved == pytest.approx(float(row['achieved']), abs=1e-3)
    assert abs(achieved / float(row['budget']) - 1) <= MACS_TOLERANCE['smoke']


@ALL_OR_SUBSET
def test_table_vs_formula_smoke(tmp_path, data_flags, all_points):
  names = ['table_b1', 'formula_phi1', 'formula_matched_b1']
  points, trained = _subset(all_points, names, ['table_b1', 'formula_matched_b1'])
  argv = ['--study=table_vs_formula', '--preset=smoke', f'--root={tmp_path}', *data_flags,
          *points]
  assert scaling_study.main(argv) == 0
  rows = _check_outputs(tmp_path / 'table_vs_formula', trained, ['table_vs_formula.png'],
                        of=len(names))
  macs = {r['point']: int(r['macs']) for r in rows}
  assert abs(macs['formula_matched_b1'] / macs['table_b1'] - 1) <= MACS_TOLERANCE['smoke']
  if all_points:
    assert macs['formula_phi1'] != macs['table_b1']  # B1 is not alpha, beta, gamma at phi=1


@ALL_OR_SUBSET
def test_baselines_smoke(tmp_path, data_flags, all_points):
  base_model = 'mobilenet_v2'
  names = ['base', 'depth_x2', 'width_x2', 'resolution_x2', 'compound_x2']
  points, trained = _subset(all_points, names, ['base', 'width_x2'])
  argv = ['--preset=smoke', f'--base_model={base_model}', f'--root={tmp_path}', *data_flags,
          *points]
  assert baselines_study.main(argv) == 0
  rows = _check_outputs(tmp_path / f'baselines_{base_model}', trained, ['top1_vs_macs.png'],
                        of=len(names))
  assert all(r['model'].startswith('mobilenet_v2') for r in rows)


# Slow (24 s): the harness it drives is covered by the grid smoke above, and
# progressive training itself by tests/test_progressive.py.
@pytest.mark.slow
def test_progressive_smoke(tmp_path, data_flags):
  argv = ['--preset=smoke', f'--root={tmp_path}', *data_flags]
  assert progressive_study.main(argv) == 0
  study_dir = tmp_path / 'progressive'
  rows = _check_outputs(study_dir, ['fixed', 'progressive', 'progressive_size', 'fixed_small'],
                        ['train_loss.png', 'top1_vs_wall.png'])
  assert len({r['resolution'] for r in rows}) == 1  # all evaluated at the full size
  sizes = {}
  for name in ('fixed', 'progressive', 'fixed_small'):
    records = harness.read_jsonl(str(study_dir / name / 'metrics.jsonl'))
    sizes[name] = [r['image_size'] for r in records if r.get('event') == 'stage_start']
  assert sizes == {'fixed': [16], 'progressive': [12, 16], 'fixed_small': [12]}


def test_publish_refuses_a_study_without_results(tmp_path):
  (tmp_path / 'grid').mkdir()
  with pytest.raises(ValueError, match='has no results.md yet'):
    harness.publish(str(tmp_path / 'grid'), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()
