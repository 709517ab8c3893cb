"""scripts/demo_seeds.py on finished workdirs written here (it trains nothing)."""

import json

import pytest

from tests.script_loader import load_script


def _script():
  return load_script('demo_seeds')


def _finished_seed(root, seed, top1_by_epoch, wall_s, config=None):
  workdir = root / f'seed{seed}'
  workdir.mkdir(parents=True)
  lines = [{'split': 'train', 'step': 1, 'images_per_sec': 800.0 + seed}]
  lines += [{'split': 'eval', 'step': i + 1, 'top1': t, 'raw_top1': t - 0.001}
            for i, t in enumerate(top1_by_epoch)]
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
  # Two invocations (a resumed run): the wall times add up.
  (workdir / 'demo_seeds.jsonl').write_text(
      json.dumps({'wall_s': wall_s / 2, 'exit_code': 1}) + '\n'
      + json.dumps({'wall_s': wall_s / 2, 'exit_code': 0}) + '\n')
  if config is not None:
    (workdir / 'config.json').write_text(json.dumps(config))


def test_reports_every_seed_the_spread_and_the_goals(tmp_path, capsys):
  demo_seeds = _script()
  for seed, final in enumerate([0.9162, 0.9236, 0.9174]):
    _finished_seed(tmp_path, seed, [0.85, final], wall_s=700.0)
  rc = demo_seeds.main(['--collect_only', f'--root={tmp_path}', '--json'])
  out = capsys.readouterr().out
  assert rc == 0
  assert '| 1 | 85.00 | **92.36** | 92.26 | 11 min 40 s | 801.0 |' in out
  # mean 91.907, sample std 0.397, t(0.975, 2) = 4.303: half-width 0.987
  assert ('final EMA test top-1: 91.91 ± 0.40 % (mean ± std, n = 3; '
          '95 % interval 90.92–92.89)') in out
  report = json.loads(out[out.index('{'):])
  assert report['seeds'][0]['invocations'] == 2
  assert all(report['goals'].values())

  assert demo_seeds.main(['--collect_only', f'--root={tmp_path}', '--min_top1=0.92']) == 1
  assert 'MISS every seed >= 92 %' in capsys.readouterr().out


def test_unfinished_seeds_are_left_out_and_none_is_an_error(tmp_path, capsys):
  demo_seeds = _script()
  _finished_seed(tmp_path, 0, [0.91], wall_s=600.0)
  (tmp_path / 'seed0' / 'demo_seeds.jsonl').write_text(
      json.dumps({'wall_s': 10.0, 'exit_code': 1}) + '\n')
  assert demo_seeds.main(['--collect_only', f'--root={tmp_path}', '--seeds=0']) == 2
  assert 'no finished seed' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    demo_seeds.main(['--seeds=0,x'])
  assert "--seeds='0,x': expected comma-separated integers" in capsys.readouterr().err


def test_a_workdir_of_another_config_is_refused(tmp_path):
  demo_seeds = _script()
  _finished_seed(tmp_path, 0, [0.91], wall_s=600.0, config={'batch_size': 256, 'seed': 0})
  with pytest.raises(SystemExit, match=r"trained with another config \(fields \[.*'batch_size'"):
    demo_seeds.main(['--collect_only', f'--root={tmp_path}', '--seeds=0'])


def test_against_pairs_each_seed_with_the_other_configs_run(tmp_path, capsys):
  demo_seeds = _script()
  fixed, progressive = tmp_path / 'fixed', tmp_path / 'progressive'
  for seed, (a, b) in enumerate([(0.9157, 0.9055), (0.9230, 0.9101), (0.9225, 0.9140)]):
    _finished_seed(fixed, seed, [a], wall_s=560.0 + seed)
    _finished_seed(progressive, seed, [b], wall_s=460.0 + 2 * seed)
  demo_seeds.main(['--collect_only', f'--root={progressive}', f'--against={fixed}', '--json'])
  out = capsys.readouterr().out
  # top-1 differences -1.02, -1.29, -0.85 points: mean -1.053, std 0.222,
  # half-width 4.303 * 0.222 / sqrt(3) = 0.551: -1.60 to -0.50.
  assert ('progressive − fixed: −1.05 points of final EMA test top-1 (95 % CI −1.60 to '
          '−0.50, paired over 3 seeds): fixed is better') in out
  # wall differences -100, -99, -98 s: the progressive runs are faster.
  assert ('progressive − fixed: −99.0 s of wall time (95 % CI −101.5 to −96.5, paired over '
          '3 seeds): progressive is better (lower)') in out
  report = json.loads(out[out.index('{'):])
  assert report['against']['root'] == str(fixed)
