"""experiments/: the harness (seeds, shards, summaries, verdicts), and every study's smoke preset.

The harness's bookkeeping runs against a fake `run_point` (no training); the
smoke presets train 2-step runs on fake Fashion-MNIST end to end.
"""

import csv
import dataclasses
import json
import os
import shutil
import signal

import jax
import pytest

from efficientnet_jax import config_lib
from efficientnet_jax import train
from experiments import harness
from experiments import plots
from experiments import stats
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


def _check_outputs(study_dir, names, pngs, of=None, seeds=1):
  """Checks results.csv / .md / PNGs hold `names` x `seeds` (finished), of `of` points."""
  of = len(names) if of is None else of
  rows = _rows(study_dir)
  assert [(r['point'], int(r['seed'])) for r in rows] == [
      (n, k) for n in names for k in range(seeds)]
  for row in rows:
    assert int(row['steps']) == 2
    assert 0.0 <= float(row['top1']) <= 1.0 and int(row['macs']) > 0 and int(row['params']) > 0
    assert float(row['train_wall_s']) > 0
  table = open(os.path.join(study_dir, 'results.md'), encoding='utf-8').read()
  assert f'{len(rows)} of {of * seeds} runs finished: {of} points × {seeds} seed' in table
  for name in names:
    assert f'| {name} |' in table
  total_min = sum(float(r['train_wall_s']) for r in rows) / 60
  assert (f'CPUs. Training wall time of the {len(rows)} finished runs: {total_min:.1f} min'
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
    raise AssertionError('a finished run was trained again')
  monkeypatch.setattr(train, 'run', refuse)


# --------------------------------------------------------------------------
# Harness pieces (no training).


def test_shards_split_point_seed_pairs_point_major():
  points = [harness.Point(f'p{i}', {}) for i in range(3)]
  runs = lambda shard, names=(): [(p.name, k) for p, k in harness.select_runs(
      points, 2, shard=shard, names=names)]
  assert runs((0, 1)) == [('p0', 0), ('p0', 1), ('p1', 0), ('p1', 1), ('p2', 0), ('p2', 1)]
  shards = [runs((i, 4)) for i in range(4)]
  assert shards[1] == [('p0', 1), ('p2', 1)]  # runs 1 and 5
  assert [len(s) for s in shards] == [2, 2, 1, 1]  # balanced over runs, not points
  assert sorted(r for s in shards for r in s) == runs((0, 1))
  # --points narrows a shard; it does not renumber the runs.
  assert runs((1, 4), names=['p2', 'p1']) == [('p2', 1)]
  with pytest.raises(ValueError, match=r"--points: unknown \['nope'\]"):
    runs((0, 1), names=['nope'])
  with pytest.raises(ValueError, match=r'^shard=3/3: expected i/n'):
    runs((3, 3))


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
# Seeds, summaries and verdicts: a fake run_point, no training.


def _fake_result(point, seed, top1, *, evals=(), wall=10.0):
  return {'point': point.name, 'seed': seed, 'overrides': dict(point.overrides),
          'info': dict(point.info), 'steps': 2, 'top1': top1, 'raw_top1': top1 + 0.01,
          'top5': 1.0, 'eval_count': 13, 'train_wall_s': wall, 'evals': list(evals),
          'model': 'm', 'width': 1.0, 'depth': 1.0, 'resolution': 16, 'params': 100,
          'macs': 1000}


def _write_result(study_dir, point, seed, top1, **kwargs):
  workdir = harness.run_dir(str(study_dir), point.name, seed)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, harness.RESULT_FILE), 'w', encoding='utf-8') as f:
    json.dump(_fake_result(point, seed, top1, **kwargs), f)


def _toy_study(seeds=2, **kwargs):
  points = [harness.Point(f'p{i}', {'model.width': 0.25 * (i + 1)}, {'family': f'f{i}'})
            for i in range(4)]
  return harness.Study('toy', presets.smoke_config, points, info_columns=('family',),
                       seeds=seeds, **kwargs)


@pytest.fixture
def fake_runs(monkeypatch):
  """harness.run_point replaced by one that writes a result at once; lists its (point, seed)s."""
  calls = []

  def run_point(study, point, seed, workdir, extra=None, num_devices=0):
    assert harness.point_config(study, point, extra, seed).seed == seed
    calls.append((point.name, seed))
    _write_result(os.path.dirname(os.path.dirname(workdir)), point, seed, 0.5 + 0.01 * seed)
    return harness.read_result(workdir)

  monkeypatch.setattr(harness, 'run_point', run_point)
  return calls


def test_sigterm_after_a_runs_last_step_stops_the_study(tmp_path, fake_runs):
  # train.run's handler sees a SIGTERM during its final eval/save but no longer
  # stops; it passes the signal on, and the study stops before its next run.
  from efficientnet_jax import runtime  # pylint: disable=g-import-not-at-top
  study = _toy_study(seeds=1)
  real_run_point = harness.run_point

  def run_point_then_sigterm(*args, **kwargs):
    with runtime.Preemption() as preemption:
      os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.requested
    return real_run_point(*args, **kwargs)

  harness.run_point = run_point_then_sigterm  # fake_runs' monkeypatch restores it
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(harness.Preempted, match='stopped before p1/seed0'):
    harness.run_study(study, str(tmp_path), log=lambda _: None)
  assert fake_runs == [('p0', 0)]
  assert signal.getsignal(signal.SIGTERM) == before


def test_seeds_train_skip_resume_and_refuse_per_seed(tmp_path, fake_runs):
  root, log = str(tmp_path), []
  study = _toy_study(seeds=2)
  rows = harness.run_study(study, root, log=log.append)
  every = [(f'p{i}', k) for i in range(4) for k in range(2)]
  assert fake_runs == every == [(r['point'], r['seed']) for r in rows]
  assert os.path.exists(tmp_path / 'toy' / 'p3' / 'seed1' / harness.RESULT_FILE)
  fake_runs.clear()
  harness.run_study(study, root, log=log.append)  # all finished: each seed skipped
  assert fake_runs == [] and sum('finished before' in line for line in log) == 8
  # p1/seed1 stopped after a checkpoint; seed 2 is new: only those train.
  os.remove(tmp_path / 'toy' / 'p1' / 'seed1' / harness.RESULT_FILE)
  (tmp_path / 'toy' / 'p1' / 'seed1' / 'checkpoints').mkdir()
  log.clear()
  rows = harness.run_study(dataclasses.replace(study, seeds=3), root, log=log.append)
  assert fake_runs == [('p0', 2), ('p1', 1), ('p1', 2), ('p2', 2), ('p3', 2)]
  assert any(line.startswith('[toy 5/12] p1/seed1: resuming in ') for line in log)
  assert len(rows) == 12 and rows[-1]['seed'] == 2
  # A finished seed whose point changed, or a result of another seed, is refused.
  changed = dataclasses.replace(study, points=[
      harness.Point('p0', {'model.width': 0.5}), *study.points[1:]])
  with pytest.raises(ValueError, match=r'p0/seed0 finished with overrides .*rename the point'):
    harness.run_study(changed, root, log=log.append)
  shutil.copy(tmp_path / 'toy' / 'p0' / 'seed0' / harness.RESULT_FILE,
              tmp_path / 'toy' / 'p0' / 'seed1' / harness.RESULT_FILE)
  with pytest.raises(ValueError, match=r'p0/seed1 finished with seed 0, not 1'):
    harness.run_study(study, root, log=log.append)


def test_seed_flags_and_old_layout(tmp_path, capsys):
  argv = ['--study=grid', '--preset=smoke', f'--root={tmp_path}']
  assert scaling_study.main(argv + ['--set=seed=3']) == 2
  assert 'error: --set=seed: the seed is set per run by --seeds=N' in capsys.readouterr().err
  assert scaling_study.main(argv + ['--seeds=0']) == 2
  assert '--seeds=0: expected N >= 1' in capsys.readouterr().err
  assert scaling_study.main(argv + ['--list', '--seeds=3']) == 0
  out = capsys.readouterr().out
  assert 'grid: 2 points × 3 seeds (config.seed 0..2) = 6 runs' in out
  assert [line.split()[2:4] for line in out.splitlines()[1:]] == [['runs', '0-2'],
                                                                 ['runs', '3-5']]
  # A point workdir from before seeds (result.json in <point>/ itself) is refused.
  name = studies.grid_study(presets.get_preset('smoke')).points[0].name
  (tmp_path / 'grid' / name).mkdir(parents=True)
  (tmp_path / 'grid' / name / harness.RESULT_FILE).write_text('{}')
  assert scaling_study.main(argv + ['--collect_only']) == 2
  assert f'move its files into {tmp_path}/grid/{name}/seed0/' in capsys.readouterr().err


def test_studies_take_the_preset_seeds_and_name_their_comparisons():
  small, smoke = presets.get_preset('small'), presets.get_preset('smoke')
  for name in studies.STUDY_NAMES:
    assert studies.make_study(name, small).seeds == 3
    assert studies.make_study(name, smoke).seeds == 1
  svc = studies.make_study('single_vs_compound', small)
  assert svc.metric == 'top1'
  assert svc.comparisons == [(f'compound_x{b:g}', f'{f}_x{b:g}') for b in small.budgets
                             for f in ('depth', 'width', 'resolution')]
  assert baselines_study.make_study('small').comparisons == svc.comparisons
  grid = studies.make_study('grid', small)
  assert grid.comparisons == [('a1.2_b1.1_g1.15', p.name) for p in grid.points[1:]]
  assert studies.make_study('table_vs_formula', small).comparisons[:2] == [
      ('table_b1', 'formula_matched_b1'), ('table_b1', 'formula_phi1')]
  progressive = progressive_study.make_study('small')
  assert (progressive.seeds, progressive.comparisons) == (
      3, [('progressive', 'fixed'), ('progressive_size', 'fixed'),
          ('progressive', 'progressive_size'), ('fixed_small', 'fixed')])
  assert progressive.extra_metrics[0].lower_is_better
  # An eval every half epoch (234 of 468 steps): the time-to-target clock.
  fixed = harness.point_config(progressive, progressive.points[0], None, seed=1)
  assert (fixed.eval_every_steps, fixed.num_epochs, fixed.seed) == (234, 3.0, 1)
  # Every stage keeps a 3x3 final map (30 px, the old smallest stage, left 1x1).
  smallest = {p.name: p.overrides.get('progressive.image_size_min', p.overrides.get(
      'image_size', p.overrides['model.resolution'])) for p in progressive.points}
  assert min(smallest.values()) == 72
  assert [progressive_study.final_map(s) for s in (30, 48, 65, 72, 96)] == [1, 2, 3, 3, 3]
  with pytest.raises(ValueError, match="point 'a' sets seed"):
    harness.Study('x', dict, [harness.Point('a', {'seed': 1})])
  with pytest.raises(ValueError, match=r"comparisons name unknown points \['b'\]"):
    harness.Study('x', dict, [harness.Point('a', {})], comparisons=[('a', 'b')])


def test_results_summarise_the_seeds_and_state_verdicts(tmp_path):
  scipy_stats = pytest.importorskip('scipy.stats')
  study = _toy_study(seeds=3, comparisons=[('p1', 'p0'), ('p2', 'p0'), ('p3', 'p0')])
  top1 = {'p0': [0.80, 0.82, 0.81], 'p1': [0.85, 0.86, 0.88], 'p2': [0.81, 0.80, 0.83],
          'p3': [0.90]}
  for point in study.points:
    for seed, value in enumerate(top1[point.name]):
      _write_result(tmp_path / 'toy', point, seed, value, wall=10.0 + seed)
  rows = harness.collect(study, str(tmp_path))
  assert len(rows) == 10
  csv_rows = _rows(tmp_path / 'toy')
  assert [(r['point'], r['seed']) for r in csv_rows][:4] == [
      ('p0', '0'), ('p0', '1'), ('p0', '2'), ('p1', '0')]
  table = (tmp_path / 'toy' / 'results.md').read_text(encoding='utf-8')
  assert ('10 of 12 runs finished: 4 points × 3 seeds (config.seed 0-2); '
          'missing: p3 (seeds 1, 2).') in table
  low, high = scipy_stats.t.interval(0.95, 2, loc=81.0, scale=1.0 / 3 ** 0.5)
  assert (f'| p0 | f0 | 100 | 0.00 M | 2 | 3 | 81.00 | 1.00 | {low:.2f} – {high:.2f} | — | 11 |'
          in table)  # no eval curve, no last-epoch gain
  assert '| p3 | f3 | 100 | 0.00 M | 2 | 1 | 90.00 | — | — | — | 10 |' in table
  verdicts = table.split('## Verdicts')[1]
  # Paired differences 5, 4, 7 points: t(0.975, 2) * 1.528 / sqrt(3) = 3.79 either side.
  assert ('- p1 − p0: +5.33 points of EMA top-1 (95 % CI +1.54 to +9.13, paired over 3 '
          'seeds): p1 is better') in verdicts
  assert ('- p2 − p0: +0.33 points of EMA top-1 (95 % CI −4.84 to +5.50, paired over 3 '
          'seeds): no significant difference at 95 %') in verdicts
  assert ('- p3 − p0: +10.00 points of EMA top-1 (paired over 1 seed): the 95 % interval '
          'cannot be computed from one seed') in verdicts
  assert harness.study_verdicts(study, rows)[0] == verdicts.split('\n- ')[1].split('\n')[0]


def test_last_epoch_gain_is_the_last_eval_minus_the_one_an_epoch_before():
  evals = [{'epoch': e, 'top1': t} for e, t in ((0.5, 0.70), (1.0, 0.80), (1.5, 0.84),
                                                 (2.0, 0.86), (2.5, 0.87), (3.0, 0.875))]
  assert harness.last_epoch_gain(evals) == pytest.approx(0.875 - 0.86)
  assert harness.last_epoch_gain(evals[:2]) is None  # no eval a whole epoch before the last
  assert harness.last_epoch_gain([{'epoch': 1.0, 'top1': 0.5}, {'epoch': 2.0, 'top1': None}]) \
      is None
  assert harness.last_epoch_gain([], 'raw_top1') is None


def test_time_to_target_across_resumed_invocations(tmp_path):
  """Eval times from metrics.jsonl's stamps and harness.jsonl's invocations; the verdict."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  segments = [{'start': 1000.0, 'time': 1100.0, 'wall_s': 100.0},
              {'time': 2050.0, 'wall_s': 50.0}]  # no 'start': time - wall_s
  evals = [(10, 1090.0, 0.5), (15, 1500.0, 0.6), (20, 2030.0, 0.7), (20, 2040.0, 0.71)]
  (workdir / harness.SEGMENTS_FILE).write_text(''.join(json.dumps(s) + '\n' for s in segments))
  (workdir / 'metrics.jsonl').write_text(''.join(
      json.dumps({'step': st, 'split': 'eval', 'time': t, 'top1': v}) + '\n'
      for st, t, v in evals) + json.dumps({'step': 5, 'split': 'train', 'loss': 1.0}) + '\n')
  curve = harness.eval_curve(str(workdir))
  # Step 15's eval lies in no recorded invocation (killed): its time is unknown.
  assert [(e['step'], e['wall_s'], e['top1']) for e in curve] == [
      (10, 90.0, 0.5), (15, None, 0.6), (20, 140.0, 0.71)]
  assert [harness.time_to_target(curve, t) for t in (0.0, 0.55, 0.65, 0.8)] == [
      90.0, None, 140.0, None]
  # The progressive study: per point, runs that reached the target; paired time verdicts.
  study = dataclasses.replace(progressive_study.make_study('smoke', 0.6), plot_fn=None)
  points = {p.name: p for p in study.points}
  times = {'fixed': [100.0, 110.0, 104.0], 'progressive': [80.0, 86.0, 83.0],
           'progressive_size': [90.0, None, 120.0]}
  for name, walls in times.items():
    for seed, wall in enumerate(walls):
      curve = [{'step': 1, 'top1': 0.5, 'wall_s': 10.0},
               {'step': 2, 'top1': 0.7 if wall else 0.55, 'wall_s': wall or 200.0}]
      _write_result(tmp_path / 'progressive', points[name], seed, 0.7, evals=curve,
                    wall=(wall or 200.0) + 20.0)
  harness.collect(dataclasses.replace(study, seeds=3), str(tmp_path))
  table = (tmp_path / 'progressive' / 'results.md').read_text(encoding='utf-8')
  assert '## Wall time to EMA top-1 ≥ 60 %' in table
  assert '| progressive_size | 2 of 3 | 105.0 | 21.2 |' in table
  assert ('- progressive − fixed: −21.7 s of wall time to EMA top-1 ≥ 60 % (95 % CI −26.8 '
          'to −16.5, paired over 3 seeds): progressive is better (lower)') in table
  assert '- progressive_size − fixed: +3.0 s of wall time' in table
  assert 'paired over 2 seeds): no significant difference at 95 %' in table
  # The whole run's training time, compared the same way (one results.csv column).
  assert ('- progressive − fixed: −21.7 s of training wall time of the whole run (95 % CI '
          '−26.8 to −16.5, paired over 3 seeds): progressive is better (lower)') in table
  header = (tmp_path / 'progressive' / 'results.csv').read_text().splitlines()[0].split(',')
  assert header.count('train_wall_s') == 1 and header[-1] == 'time_to_target_s'


def test_plots_average_the_seeds_of_a_point():
  rows = [{'point': 'a', 'macs': 5, 'top1': v, 'line': 'l'} for v in (0.80, 0.82, 0.81)]
  rows += [{'point': 'b', 'macs': 2, 'top1': 0.7, 'line': 'l'}]
  (b, a), = plots.aggregate(rows, x='macs', y='top1', group='line').values()
  assert (b['x'], b['y'], b['yerr'], b['n']) == (2, pytest.approx(70.0), 0.0, 1)
  assert (a['x'], a['y'], a['n']) == (5, pytest.approx(81.0), 3)
  assert a['yerr'] == pytest.approx(stats.mean_ci([80.0, 82.0, 81.0]).half_width)


# --------------------------------------------------------------------------
# Smoke presets end to end.


def test_grid_smoke_runs_skips_and_resumes(tmp_path, data_flags, monkeypatch, capsys):
  """The paper's grid point with two seeds, seed 0 resumed; then skipped, published, refused.

  One point only: the second seed costs what the grid's second point did.
  """
  root = str(tmp_path)
  study = studies.grid_study(presets.get_preset('smoke'))
  names = [p.name for p in study.points]
  # An unfinished run: a 1-step run of seed 0 left a checkpoint but no result.
  first = harness.point_config(study, study.points[0], harness.parse_set_flag(
      [f[len('--set='):] for f in data_flags if f.startswith('--set=')]), seed=0)
  first.train_steps = 1
  train.run(first, harness.run_dir(os.path.join(root, 'grid'), names[0], 0),
            devices=jax.devices()[:1])
  argv = ['--study=grid', '--preset=smoke', f'--root={root}', '--seeds=2',
          f'--points={names[0]}', *data_flags]
  assert scaling_study.main(argv) == 0
  out = capsys.readouterr().out
  assert f'{names[0]}/seed0: resuming' in out and f'{names[0]}/seed1: training' in out
  rows = _check_outputs(os.path.join(root, 'grid'), names[:1],
                        ['grid_top1_vs_macs.png', 'grid_top1_vs_alpha.png'], of=2, seeds=2)
  assert [r['paper'] for r in rows] == ['True', 'True']
  configs = [json.load(open(os.path.join(harness.run_dir(os.path.join(root, 'grid'), names[0],
                                                         k), 'config.json')))
             for k in range(2)]
  assert [c['seed'] for c in configs] == [0, 1]  # each run trained its own config.seed
  for k in range(2):  # the eval curve, timed from metrics.jsonl's stamps
    result = harness.read_result(harness.run_dir(os.path.join(root, 'grid'), names[0], k))
    # Seed 0's 1-step eval ran outside the harness: no recorded invocation, no time.
    assert [(e['step'], e['wall_s'] is None) for e in result['evals']] == (
        [(1, True), (2, False)] if k == 0 else [(2, False)])
    assert result['seed'] == k and 0 < result['evals'][-1]['wall_s'] <= result['train_wall_s']
  table = open(os.path.join(root, 'grid', 'results.md'), encoding='utf-8').read()
  assert '## Verdicts' in table
  assert f'- {names[0]} − {names[1]}: no seed has a value (EMA top-1) for both' in table
  # Everything finished: a second invocation trains nothing and rebuilds the outputs.
  _no_training(monkeypatch)
  os.remove(os.path.join(root, 'grid', 'results.md'))
  published = os.path.join(root, 'published')
  assert scaling_study.main(argv + [f'--publish={published}']) == 0
  assert capsys.readouterr().out.count('finished before') == 2
  assert os.path.exists(os.path.join(root, 'grid', 'results.md'))
  # --publish copies exactly what the study generated.
  assert sorted(os.listdir(published)) == [
      'grid_top1_vs_alpha.png', 'grid_top1_vs_macs.png', 'results.csv', 'results.md']
  for name in os.listdir(published):
    with open(os.path.join(published, name), 'rb') as a, \
         open(os.path.join(root, 'grid', name), 'rb') as b:
      assert a.read() == b.read(), name
  # A run whose point's overrides changed since is refused, not silently reused.
  result_path = os.path.join(harness.run_dir(os.path.join(root, 'grid'), names[0], 1),
                             harness.RESULT_FILE)
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
                        ['train_loss.png', 'top1_vs_time.png', 'top1_vs_wall.png'])
  assert len({r['resolution'] for r in rows}) == 1  # all evaluated at the full size
  # The smoke target (0) is reached at the only eval, after compiling and training.
  for row in rows:
    assert 0 < float(row['time_to_target_s']) <= float(row['train_wall_s'])
  sizes = {}
  for name in ('fixed', 'progressive', 'fixed_small'):
    records = harness.read_jsonl(harness.run_dir(str(study_dir), name, 0) + '/metrics.jsonl')
    sizes[name] = [r['image_size'] for r in records if r.get('event') == 'stage_start']
  assert sizes == {'fixed': [16], 'progressive': [12, 16], 'fixed_small': [12]}


def test_publish_refuses_a_study_without_results(tmp_path):
  (tmp_path / 'grid').mkdir()
  with pytest.raises(ValueError, match='has no results.md yet'):
    harness.publish(str(tmp_path / 'grid'), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_publish_puts_the_generated_results_into_the_readme_that_marks_them(tmp_path):
  study_dir = tmp_path / 'runs' / 'grid'
  study_dir.mkdir(parents=True)
  (study_dir / 'results.md').write_text(
      '# Grid, small\n\n| point | n |\n|---|---|\n| a | 3 |\n\n## Verdicts\n\n- a − b: +1.0\n\n'
      '![plot.png](plot.png) [csv](results.csv) [web](https://example.org/x)\n')
  (study_dir / 'plot.png').write_bytes(b'png')
  repo = tmp_path / 'exp'
  dest = repo / 'results' / 'small' / 'grid'
  begin, end = harness.readme_markers(str(dest), str(repo))
  assert begin == '<!-- begin generated: results/small/grid -->'
  (repo).mkdir()
  (repo / 'README.md').write_text(f'# Study\n\n## Results\n\n{begin}\nold table\n{end}\n\nAfter.\n')
  for _ in range(2):  # publishing again replaces the block, it does not nest it
    assert harness.publish(str(study_dir), str(dest)) == (['plot.png', 'results.md'],
                                                          str(repo / 'README.md'))
    text = (repo / 'README.md').read_text()
    assert text == (
        f'# Study\n\n## Results\n\n{begin}\n| point | n |\n|---|---|\n| a | 3 |\n\n'
        '## Verdicts\n\n- a − b: +1.0\n\n![plot.png](results/small/grid/plot.png) '
        f'[csv](results/small/grid/results.csv) [web](https://example.org/x)\n{end}\n\nAfter.\n')
  # Without markers nothing but the copies is written.
  other = tmp_path / 'plain' / 'out'
  assert harness.publish(str(study_dir), str(other)) == (['plot.png', 'results.md'], None)
