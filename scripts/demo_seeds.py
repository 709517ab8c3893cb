"""`make demo` with several seeds: each run's accuracy and time, and the spread over seeds.

    python scripts/demo_seeds.py                      # seeds 0,1,2 in runs/demo_seeds/seed<k>
    python scripts/demo_seeds.py --collect_only --json
    python scripts/demo_seeds.py --config=configs/demo_progressive.py \
        --root=runs/demo_progressive_seeds --against=runs/demo_seeds

Seed k runs `train.py --config=configs/demo.py --workdir=<root>/seed<k> --config.seed=k`
in its own process, timed from launch to exit: what `make demo` costs once the venv
and the data are in place. A seed that finished is not run again; an unfinished one
resumes, and its wall time then sums the invocations. A workdir trained with another
config than today's `configs/demo.py` (seed aside) is refused.

Prints, per seed, the EMA test top-1 after each epoch, the final raw top-1, the wall
time and the median training img/s; then the mean, sample std and 95 % t interval of
the final EMA top-1 (`experiments/stats.py`) and the goals (--min_top1 for every seed,
--min_mean, --max_wall_s for every run); exits 1 if a goal is missed. With
--against=ROOT (another config's seeds, e.g. the fixed-size demo's), also the
difference to those runs in final EMA top-1 and wall time, paired by seed, with
its 95 % t interval and verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments import stats  # noqa: E402  (the repo root is on the path only now)

RUNS_FILE = 'demo_seeds.jsonl'  # one record per invocation: wall_s, exit code


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def check_config(workdir: str, config_path: str, seed: int) -> None:
  """Refuses a workdir whose config.json differs from today's config (seed aside)."""
  from efficientnet_jax import config_lib  # pylint: disable=g-import-not-at-top
  path = config_lib.saved_path(workdir)
  if not os.path.exists(path):
    return
  want = config_lib.load(config_path)
  want.seed = seed
  with open(path, encoding='utf-8') as f:
    have = json.load(f)
  want = json.loads(want.to_json_best_effort(sort_keys=True))
  for d in (have, want):
    d.pop('compilation_cache_dir', None)
  if have != want:
    keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    raise SystemExit(f'error: {workdir} trained with another config (fields {keys} differ '
                     f'from {config_path} with seed {seed}); delete it or use another --root')


def run_seed(workdir: str, config_path: str, seed: int) -> None:
  cmd = [sys.executable, 'train.py', f'--config={config_path}', f'--workdir={workdir}',
         f'--config.seed={seed}']
  print(f'[demo_seeds] seed {seed}: {" ".join(cmd[1:])}', flush=True)
  start = time.perf_counter()
  rc = subprocess.call(cmd, cwd=REPO)
  record = {'wall_s': round(time.perf_counter() - start, 1), 'exit_code': rc,
            'time': time.time()}
  with open(os.path.join(workdir, RUNS_FILE), 'a', encoding='utf-8') as f:
    f.write(json.dumps(record) + '\n')
  if rc != 0:
    raise SystemExit(f'error: seed {seed} exited {rc}; run the same command again to resume')


def seed_row(workdir: str, seed: int) -> dict | None:
  """The finished run's numbers, or None while it has not finished."""
  runs = read_jsonl(os.path.join(workdir, RUNS_FILE))
  if not runs or runs[-1]['exit_code'] != 0:
    return None
  records = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  evals = [r for r in records if r.get('split') == 'eval']
  speeds = [r['images_per_sec'] for r in records if 'images_per_sec' in r]
  return {'seed': seed, 'ema_top1_by_epoch': [r['top1'] for r in evals],
          'top1': evals[-1]['top1'], 'raw_top1': evals[-1]['raw_top1'],
          'wall_s': round(sum(r['wall_s'] for r in runs), 1), 'invocations': len(runs),
          'median_img_per_s': round(statistics.median(speeds), 1) if speeds else None}


def report(rows: list[dict], args: argparse.Namespace) -> dict:
  pct = [100 * r['top1'] for r in rows]
  summary = stats.mean_ci(pct)
  epochs = max(len(r['ema_top1_by_epoch']) for r in rows)
  print('| seed | ' + ' | '.join(f'ep {e + 1}' for e in range(epochs))
        + ' | raw top-1 % | wall | img/s |')
  print('|---' * (epochs + 4) + '|')
  for r in rows:
    cells = [f'{100 * v:.2f}' for v in r['ema_top1_by_epoch']]
    cells[-1] = f'**{cells[-1]}**'
    wall = f'{int(r["wall_s"] // 60)} min {r["wall_s"] % 60:.0f} s'
    print(f'| {r["seed"]} | ' + ' | '.join(cells)
          + f' | {100 * r["raw_top1"]:.2f} | {wall} | {r["median_img_per_s"]} |')
  spread = (f'{summary.mean:.2f} ± {summary.std:.2f} % (mean ± std, n = {summary.n}; '
            f'95 % interval {summary.low:.2f}–{summary.high:.2f})' if summary.n > 1
            else f'{summary.mean:.2f} % (n = 1)')
  print(f'final EMA test top-1: {spread}')
  goals = {
      f'every seed >= {100 * args.min_top1:g} %': min(pct) >= 100 * args.min_top1,
      f'mean >= {100 * args.min_mean:g} %': summary.mean >= 100 * args.min_mean,
      f'every run <= {args.max_wall_s:g} s': max(r['wall_s'] for r in rows) <= args.max_wall_s,
  }
  for goal, ok in goals.items():
    print(f'{"ok  " if ok else "MISS"} {goal}')
  return {'seeds': rows, 'mean': summary.mean, 'std': summary.std, 'n': summary.n,
          'ci95': [summary.low, summary.high], 'goals': goals}


def compare(rows: list[dict], against: list[dict], name: str, other: str) -> list[str]:
  """Verdict lines for rows − against: final EMA top-1 (points) and wall time (s), by seed."""
  lines = []
  for key, label, unit, scale, lower in (
      ('top1', 'final EMA test top-1', 'points', 100, False),
      ('wall_s', 'wall time', 's', 1, True)):
    diff = stats.paired_difference({r['seed']: scale * r[key] for r in rows},
                                   {r['seed']: scale * r[key] for r in against})
    lines.append(stats.verdict_line(name, other, diff, label, unit=unit,
                                    digits=2 if unit == 'points' else 1,
                                    lower_is_better=lower))
  return lines


def collect(root: str, config_path: str, seeds: list[int], train: bool) -> list[dict]:
  """The finished seeds under root, training (or resuming) the others when `train`."""
  rows = []
  for seed in seeds:
    workdir = os.path.abspath(os.path.join(root, f'seed{seed}'))
    check_config(workdir, config_path, seed)
    if seed_row(workdir, seed) is None and train:
      os.makedirs(workdir, exist_ok=True)
      run_seed(workdir, config_path, seed)
    row = seed_row(workdir, seed)
    if row is not None:
      rows.append(row)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', default='0,1,2', help='comma-separated config.seed values')
  parser.add_argument('--root', default='runs/demo_seeds')
  parser.add_argument('--config', default='configs/demo.py')
  parser.add_argument('--collect_only', action='store_true', help='report, train nothing')
  parser.add_argument('--min_top1', type=float, default=0.90)
  parser.add_argument('--min_mean', type=float, default=0.905)
  parser.add_argument('--max_wall_s', type=float, default=900.0)
  parser.add_argument('--json', action='store_true', help='also print the report as JSON')
  parser.add_argument('--against', default='', metavar='ROOT',
                      help="another run of this script's root (its seeds' config.json says "
                           'its config) to compare with, paired by seed')
  args = parser.parse_args(argv)
  try:
    seeds = [int(s) for s in args.seeds.split(',')]
  except ValueError:
    parser.error(f'--seeds={args.seeds!r}: expected comma-separated integers, e.g. 0,1,2')
  rows = collect(args.root, args.config, seeds, train=not args.collect_only)
  if not rows:
    print(f'error: no finished seed under {args.root}', file=sys.stderr)
    return 2
  out = report(rows, args)
  if args.against:
    against = [row for row in (seed_row(os.path.join(args.against, f'seed{seed}'), seed)
                               for seed in seeds) if row is not None]
    out['against'] = {'root': args.against, 'verdicts': compare(
        rows, against, os.path.basename(os.path.normpath(args.root)),
        os.path.basename(os.path.normpath(args.against)))}
    for line in out['against']['verdicts']:
      print(line)
  if args.json:
    print(json.dumps(out, indent=1))
  return 0 if all(out['goals'].values()) else 1


if __name__ == '__main__':
  sys.exit(main())
