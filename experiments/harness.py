"""Runs a study's named points, each with N seeds in its own workdir, and tabulates the results.

A `Point` is a name plus dotted config overrides on top of the study's base
config; a study runs every point with seeds 0..N-1 (`--seeds`, default the
preset's), because one seed of a short run cannot tell its noise from an
effect. `run_study` trains each (point, seed) with `efficientnet_jax.train.run`
in `<root>/<study>/<point>/seed<k>/` (config.seed = k), skipping runs that
finished (their `result.json`, written after the final eval, is present) and
resuming unfinished ones from their checkpoints. `--shard=i/n` runs the
(point, seed) pairs whose index % n == i in the point-major list, so n
cluster jobs share a study evenly; every job then rebuilds the outputs from
all finished workdirs: `results.csv` (one row per run), `results.md` (one row
per point: mean, std and 95 % interval over the seeds, then the study's
verdicts, paired by seed; `experiments/stats.py`) and the PNG plots.

Runs go in-process, one after the other: that saves the 10-20 s of JAX/TF
start-up per run that child processes would cost, keeps the small eager
programs (checkpoint slicing, RNG set-up) compiled across runs, and lets runs
with the same shapes (every seed of a point) share compiled programs through
one persistent compilation cache per study (`<root>/<study>/compile_cache`).
Each run's train/eval steps are new `jax.jit` objects over its own model; what
JAX keeps of them between runs is its bounded executable caches (the progress
line prints the process RSS so growth would show). `jax.clear_caches()` between
runs was tried and dropped: it made every checkpoint save recompile hundreds
of per-array slice programs (20-30 s per point on this 2-core machine).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import os
import platform
import re
import shutil
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from efficientnet_jax import experiment
from efficientnet_jax import cpu_tuning
from efficientnet_jax import runtime
from experiments import stats

RESULT_FILE = 'result.json'  # written once a run's final eval is done
SEGMENTS_FILE = 'harness.jsonl'  # one record per training invocation (wall time)
BASE_COLUMNS = ('point', 'model', 'width', 'depth', 'resolution', 'params', 'macs',
                'steps', 'top1', 'raw_top1', 'top5', 'train_wall_s')
METRIC_LABELS = {'top1': 'EMA top-1', 'raw_top1': 'raw top-1', 'top5': 'EMA top-5'}


class Preempted(Exception):
  """A run stopped on SIGTERM after saving a checkpoint."""


@dataclasses.dataclass(frozen=True)
class Point:
  """One configuration of a study, trained once per seed.

  Attributes:
    name: the workdir name (letters, digits, '_', '-', '.', '=').
    overrides: dotted config fields -> values, e.g. {'model.width': 0.5}; never
      'seed' (the seeds are the study's).
    info: extra columns for the results table and plots (family, budget, ...).
  """
  name: str
  overrides: Mapping[str, Any]
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Metric:
  """A per-run number derived from its results row, summarised and compared like top-1.

  Attributes:
    key: its results.csv column.
    label: text for the heading and verdicts ('wall time to EMA top-1 >= 85 %').
    value: row -> the number, or None where the run has none (target not reached).
    unit, digits: how differences are written ('s', 1 -> '+12.3 s').
    lower_is_better: which sign of a difference names the first point the winner.
  """
  key: str
  label: str
  value: Callable[[dict], float | None]
  unit: str = 's'
  digits: int = 1
  lower_is_better: bool = False


@dataclasses.dataclass
class Study:
  """A named list of points over one base config, its seeds, comparisons and plots.

  Attributes:
    name: the study directory under the root.
    base_config: returns a fresh base config (configs/base.py-like ConfigDict).
    points: the configurations, in order.
    info_columns: `Point.info` keys shown in the tables (in this order).
    plot_fn: (rows, study_dir) -> paths of the PNGs it wrote; rows are those
      of finished runs, one per (point, seed), as in results.csv.
    title: heading of results.md.
    seeds: each point trains with config.seed = 0..seeds-1.
    metric: the plots' and verdicts' accuracy, 'top1' (EMA) or 'raw_top1'.
    comparisons: (point_a, point_b) pairs; results.md states a - b with its
      95 % interval, paired by seed, for `metric` and each extra metric.
    extra_metrics: per-run numbers beyond accuracy (the progressive study's
      wall time to a target), tabulated and compared the same way.
  """
  name: str
  base_config: Callable[[], Any]
  points: list[Point]
  info_columns: tuple[str, ...] = ()
  plot_fn: Callable[[list[dict], str], list[str]] | None = None
  title: str = ''
  seeds: int = 1
  metric: str = 'top1'
  comparisons: Sequence[tuple[str, str]] = ()
  extra_metrics: tuple[Metric, ...] = ()

  def __post_init__(self):
    names = [p.name for p in self.points]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
      raise ValueError(f'study {self.name!r}: duplicate point names {dupes}')
    for point in self.points:
      if not point.name or not all(c.isalnum() or c in '_-.=' for c in point.name):
        raise ValueError(f'study {self.name!r}: point name {point.name!r} must be non-empty '
                         "letters, digits, '_', '-', '.', '='")
      if 'seed' in point.overrides:
        raise ValueError(f'study {self.name!r}: point {point.name!r} sets seed; the seeds '
                         'are the study\'s (--seeds)')
    if self.seeds < 1:
      raise ValueError(f'study {self.name!r}: seeds={self.seeds}; expected >= 1')
    unknown = sorted({n for pair in self.comparisons for n in pair} - set(names))
    if unknown:
      raise ValueError(f'study {self.name!r}: comparisons name unknown points {unknown}')


# --------------------------------------------------------------------------
# Configs.


def parse_set_flag(items: Sequence[str]) -> dict:
  """['data.source_dir=/x', 'train_steps=3'] -> dict; values parsed as JSON when they can be."""
  out = {}
  for item in items:
    if '=' not in item:
      raise ValueError(f'--set {item!r}: expected field=value')
    key, raw = item.split('=', 1)
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      value = raw
    out[key.strip()] = value
  return out


def check_extra(extra: Mapping[str, Any] | None) -> None:
  """--set overrides every run alike; the seed is per run, so it is refused there."""
  if extra and 'seed' in extra:
    raise ValueError('--set=seed: the seed is set per run by --seeds=N (seeds 0..N-1, one '
                     'workdir each); drop --set=seed')


def point_config(study: Study, point: Point, extra: Mapping[str, Any] | None = None,
                 seed: int = 0):
  """The base config with the point's overrides and `seed`, then `extra` (e.g. data paths)."""
  check_extra(extra)
  config = study.base_config()
  # Imported here: config_checks pulls in TensorFlow (the augmentation names),
  # which --list and --collect_only never need.
  from efficientnet_jax import config_lib  # pylint: disable=g-import-not-at-top
  config_lib.set_fields(config, {**point.overrides, 'seed': int(seed)})
  if extra:
    config_lib.set_fields(config, extra)
  return config


def model_counts(config) -> dict:
  """Params and multiply-adds (at the eval resolution) of the network `config` trains."""
  from efficientnet_jax.model import architectures  # pylint: disable=g-import-not-at-top
  from efficientnet_jax import model_table  # pylint: disable=g-import-not-at-top
  spec = architectures.spec_from_config(config.model)
  num_classes = config.num_classes if config.num_classes > 0 else None
  if num_classes is None:
    from efficientnet_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    num_classes = input_pipeline.dataset_info(
        experiment.data_spec_from_config(config.data))['num_classes']
  resolution = (config.eval_image_size if config.eval_image_size > 0
                else spec.eval_resolution)
  return {'model': spec.name, 'width': spec.width, 'depth': spec.depth,
          'resolution': resolution,
          'params': model_table.count_params(spec, num_classes=num_classes),
          'macs': model_table.count_macs(spec, resolution, num_classes=num_classes)}


# --------------------------------------------------------------------------
# Running.


def run_dir(study_dir: str, point_name: str, seed: int) -> str:
  """The workdir of one (point, seed): <root>/<study>/<point>/seed<k>."""
  return os.path.join(study_dir, point_name, f'seed{seed}')


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def read_result(workdir: str) -> dict | None:
  path = os.path.join(workdir, RESULT_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file


def _jsonable(overrides: Mapping[str, Any]) -> dict:
  return json.loads(json.dumps(dict(overrides), default=str))


def _elapsed_at(when: float | None, segments: list[dict]) -> float | None:
  """Training wall time at unix time `when`: earlier invocations' walls plus this one's part.

  None where `when` is unknown or outside every recorded invocation (one killed
  before the harness could record it, whose time train_wall_s lacks as well).
  The end (start + perf-counter wall) gets a second of slack for the unix
  clock's drift against the perf counter.
  """
  before = 0.0
  for seg in segments:
    start = seg.get('start', seg['time'] - seg['wall_s'])
    if when is not None and start <= when <= seg['time'] + 1.0:
      return round(before + min(when - start, seg['wall_s']), 2)
    before += seg['wall_s']
  return None


def eval_curve(workdir: str) -> list[dict]:
  """Every eval of a run (step, epoch, EMA and raw top-1) with the training wall time at it.

  The time is train.run's wall clock from the invocation's start (compiling,
  data set-up and earlier evals included) to the eval record's `time` stamp,
  summed over resumed invocations. A step evaluated twice (a run stopped
  between its eval and checkpoint) keeps its last record.
  """
  segments = read_jsonl(os.path.join(workdir, SEGMENTS_FILE))
  by_step = {}
  for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl')):
    if r.get('split') == 'eval':
      by_step[int(r['step'])] = {'step': int(r['step']), 'epoch': r.get('epoch'),
                                 'top1': r['top1'], 'raw_top1': r.get('raw_top1'),
                                 'wall_s': _elapsed_at(r.get('time'), segments)}
  return [by_step[s] for s in sorted(by_step)]


def time_to_target(evals: Sequence[dict], target: float, key: str = 'top1') -> float | None:
  """Wall time of the first eval whose `key` reaches `target`; None if none does (or untimed)."""
  for r in evals:
    if r.get(key) is not None and r[key] >= target:
      return r.get('wall_s')
  return None


def last_epoch_gain(evals: Sequence[dict], key: str = 'top1') -> float | None:
  """How much `key` rose over a run's last epoch; near 0: the run had converged.

  The last eval minus the latest one an epoch or more before it; None where
  the run has no such eval.
  """
  curve = [e for e in evals if e.get('epoch') is not None and e.get(key) is not None]
  if not curve:
    return None
  last = curve[-1]
  earlier = [e for e in curve[:-1] if e['epoch'] <= last['epoch'] - 1 + 1e-9]
  return last[key] - earlier[-1][key] if earlier else None


def run_point(study: Study, point: Point, seed: int, workdir: str,
              extra: Mapping[str, Any] | None = None, num_devices: int = 0) -> dict:
  """Trains (or resumes) one (point, seed) to the end; writes and returns its result record.

  num_devices > 0 trains on the first that many devices (quick CPU checks).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from efficientnet_jax import train  # pylint: disable=g-import-not-at-top
  config = point_config(study, point, extra, seed)
  if not config.compilation_cache_dir and not jax.config.jax_compilation_cache_dir:
    # One cache per study (unless JAX already has one): every seed of a point,
    # and points with the same shapes, compile once; a resumed run skips compiling.
    study_dir = os.path.dirname(os.path.dirname(workdir))  # <study>/<point>/seed<k>
    config.compilation_cache_dir = os.path.join(study_dir, 'compile_cache')
  os.makedirs(workdir, exist_ok=True)
  began, start = time.time(), time.perf_counter()
  devices = jax.devices()[:num_devices] if num_devices > 0 else None
  outcome = train.run(config, workdir, devices=devices)
  wall = time.perf_counter() - start
  with open(os.path.join(workdir, SEGMENTS_FILE), 'a', encoding='utf-8') as f:
    f.write(json.dumps({'wall_s': wall, 'start': began, 'time': began + wall,
                        'preempted': outcome.preempted}) + '\n')
  if outcome.preempted:
    raise Preempted(f'{point.name}/seed{seed}: SIGTERM, saved step {outcome.step}; '
                    'run the same command again to resume')
  final = outcome.eval
  segments = read_jsonl(os.path.join(workdir, SEGMENTS_FILE))
  result = {'point': point.name, 'seed': int(seed), 'overrides': _jsonable(point.overrides),
            'info': _jsonable(point.info), 'steps': int(final['step']),
            'top1': final['top1'], 'raw_top1': final['raw_top1'], 'top5': final['top5'],
            'eval_count': final['count'],
            'train_wall_s': round(sum(s['wall_s'] for s in segments), 2),
            'evals': eval_curve(workdir), **model_counts(config)}
  _write_json(os.path.join(workdir, RESULT_FILE), result)
  return result


def check_result_matches(point: Point, seed: int, result: dict, workdir: str) -> None:
  """A finished run whose point's overrides changed since (or another seed's) is an error."""
  want = _jsonable(point.overrides)
  if result.get('overrides') != want:
    raise ValueError(f'{workdir} finished with overrides {result.get("overrides")}, but point '
                     f'{point.name!r} now has {want}; delete the workdir or rename the point')
  if result.get('seed', seed) != seed:
    raise ValueError(f'{workdir} finished with seed {result["seed"]}, not {seed}; '
                     'a workdir copied from another seed? delete it')


def check_layout(study: Study, study_dir: str) -> None:
  """Refuses point workdirs from before seeds (one run per point in <point>/ itself)."""
  for point in study.points:
    old = os.path.join(study_dir, point.name)
    if any(os.path.exists(os.path.join(old, n)) for n in (RESULT_FILE, 'checkpoints')):
      raise ValueError(f'{old} is a workdir from before seeds (one run per point); runs now go '
                       f'to {old}/seed<k>/: move its files into {old}/seed0/ (it trained '
                       'with seed 0 unless --set=seed said otherwise) or delete it')


def select_runs(points: Sequence[Point], seeds: int, *, shard: tuple[int, int] = (0, 1),
                names: Sequence[str] = ()) -> list[tuple[Point, int]]:
  """The (point, seed) pairs of shard i of n, restricted to the points `names` if given.

  The pairs are numbered point-major (p0/seed0, p0/seed1, ..., p1/seed0, ...)
  and shard i gets those whose number % n == i, whatever `names` selects.
  """
  index, count = shard
  if count < 1 or not 0 <= index < count:
    raise ValueError(f'shard={index}/{count}: expected i/n with 0 <= i < n')
  known = {p.name for p in points}
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f'--points: unknown {unknown}; this study has {sorted(known)}')
  runs = [(p, k) for p in points for k in range(seeds)]
  return [(p, k) for i, (p, k) in enumerate(runs)
          if i % count == index and (not names or p.name in names)]


def _run_one(study: Study, study_dir: str, point: Point, seed: int, prefix: str,
             run_args: dict, log) -> dict | None:
  """Skips (None), resumes or trains one (point, seed); returns a fresh result."""
  workdir = run_dir(study_dir, point.name, seed)
  result = read_result(workdir)
  if result is not None:
    check_result_matches(point, seed, result, workdir)
    log(f'{prefix}: finished before (top1 {result["top1"]:.4f}), skipped')
    return None
  resumed = os.path.isdir(os.path.join(workdir, 'checkpoints'))
  log(f'{prefix}: {"resuming" if resumed else "training"} in {workdir}')
  return run_point(study, point, seed, workdir, **run_args)


def run_study(study: Study, root: str, *, shard: tuple[int, int] = (0, 1),
              names: Sequence[str] = (), collect_only: bool = False,
              extra: Mapping[str, Any] | None = None, num_devices: int = 0,
              log=None) -> list[dict]:
  """Runs the selected (point, seed) pairs (unless collect_only), then writes the outputs.

  Returns the rows of all finished runs (not only this shard's).
  """
  log = log or functools.partial(print, flush=True)  # interleaves with train.run's lines
  check_extra(extra)
  study_dir = os.path.join(root, study.name)
  check_layout(study, study_dir)
  os.makedirs(study_dir, exist_ok=True)
  todo = ([] if collect_only
          else select_runs(study.points, study.seeds, shard=shard, names=names))
  began = time.perf_counter()
  trained = 0
  run_args = {'extra': extra, 'num_devices': num_devices}
  # The SIGTERM handler train.run installs per run passes the signal on to this one.
  with runtime.Preemption() as stop:
    for i, (point, seed) in enumerate(todo):
      prefix = f'[{study.name} {i + 1}/{len(todo)}] {point.name}/seed{seed}'
      if stop.requested:  # SIGTERM after a run's last step, or between runs
        raise Preempted(f'SIGTERM; stopped before {point.name}/seed{seed}; run the same '
                        'command again to continue')
      result = _run_one(study, study_dir, point, seed, prefix, run_args, log)
      if result is None:
        continue
      trained += 1
      elapsed = time.perf_counter() - began
      left = len(todo) - i - 1
      log(f'{prefix}: top1 {result["top1"]:.4f} (raw {result["raw_top1"]:.4f}), '
          f'{result["macs"] / 1e6:.2f} M MACs, {result["train_wall_s"]:.0f} s; '
          f'{left} left, about {elapsed / trained * left / 60:.1f} min; rss {_rss_gb():.2f} GB')
  rows = collect(study, root)
  log(f'[{study.name}] {len(rows)}/{len(study.points) * study.seeds} runs '
      f'({len(study.points)} points × {study.seeds} seeds) finished; outputs in {study_dir}')
  return rows


def _rss_gb() -> float:
  """Resident memory of this process (0 where /proc is missing)."""
  try:
    with open('/proc/self/statm', encoding='ascii') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**30
  except (OSError, ValueError, IndexError):
    return 0.0


# --------------------------------------------------------------------------
# Outputs.


def result_rows(study: Study, root: str) -> list[dict]:
  """One flat row per finished (point, seed) in seeds 0..study.seeds-1, point-major.

  Beside the results.csv columns a row holds `evals` (the run's eval curve,
  `eval_curve`) and the study's extra metrics.
  """
  rows = []
  for point in study.points:
    for seed in range(study.seeds):
      result = read_result(run_dir(os.path.join(root, study.name), point.name, seed))
      if result is None:
        continue
      row = {'point': point.name, 'seed': seed, **dict(point.info)}
      row.update({k: result[k] for k in BASE_COLUMNS if k in result and k != 'point'})
      row['evals'] = result.get('evals', [])
      for metric in study.extra_metrics:
        row[metric.key] = metric.value(row)
      rows.append(row)
  return rows


def columns(study: Study) -> list[str]:
  cols = ['point', 'seed', *study.info_columns, *BASE_COLUMNS[1:]]
  return cols + [m.key for m in study.extra_metrics if m.key not in cols]


def _fmt(key: str, value) -> str:
  if value is None or value == '':
    return ''
  if key in ('top1', 'raw_top1', 'top5') and isinstance(value, float):
    return f'{100 * value:.2f}'
  if key == 'macs':
    return f'{value / 1e6:.2f} M'
  if key == 'params':
    return f'{value:,}'
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def write_csv(rows: list[dict], cols: Sequence[str], path: str) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, fieldnames=list(cols), extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def _table(header: Sequence[str], body: list[list[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  return '\n'.join(lines + ['| ' + ' | '.join(cells) + ' |' for cells in body])


def _accuracy_keys(study: Study) -> tuple[str, ...]:
  return ('top1',) if study.metric == 'top1' else ('top1', study.metric)


def _summary_cells(summary: stats.Summary | None, scale: float, digits: int) -> list[str]:
  """mean, std, 95 % CI; '—' where n = 1 (std, CI) or nothing was measured."""
  if summary is None:
    return ['—', '—', '—']
  std = '—' if summary.std is None else f'{summary.std * scale:.{digits}f}'
  return [f'{summary.mean * scale:.{digits}f}', std, stats.format_ci(summary, digits, scale)]


def summary_table(study: Study, rows: list[dict]) -> str:
  """One row per point with a finished run: n, and mean / std / 95 % CI of its top-1s."""
  keys = _accuracy_keys(study)
  header = ['point', *study.info_columns, 'params', 'MACs', 'steps', 'n']
  for key in keys:
    short = METRIC_LABELS.get(key, key).split()[0]  # 'EMA', 'raw'
    header += [f'top-1 {short} %', f'{short} std', f'{short} 95 % CI']
  header += ['last-epoch gain', 'train s (mean)']
  body = []
  for point in study.points:
    runs = [r for r in rows if r['point'] == point.name]
    if not runs:
      continue
    cells = [_fmt(c, runs[0].get(c)) for c in ('point', *study.info_columns, 'params',
                                                 'macs', 'steps')] + [str(len(runs))]
    for key in keys:
      cells += _summary_cells(stats.mean_ci([r[key] for r in runs]), 100, 2)
    gains = [g for g in (last_epoch_gain(r.get('evals', []), study.metric) for r in runs)
             if g is not None]
    cells.append(stats.signed(100 * sum(gains) / len(gains)) if gains else '—')
    walls = [float(r['train_wall_s']) for r in runs]
    body.append(cells + [f'{sum(walls) / len(walls):.0f}'])
  return _table(header, body)


def metric_table(study: Study, metric: Metric, rows: list[dict]) -> str:
  """An extra metric per point: how many runs have it, and its mean / std / 95 % CI."""
  body = []
  for point in study.points:
    runs = [r for r in rows if r['point'] == point.name]
    if not runs:
      continue
    values = [r[metric.key] for r in runs if r.get(metric.key) is not None]
    summary = stats.mean_ci(values) if values else None
    body.append([point.name, f'{len(values)} of {len(runs)}',
                 *_summary_cells(summary, 1.0, metric.digits)])
  return _table(['point', 'runs with a value', f'mean ({metric.unit})', 'std', '95 % CI'], body)


def _by_seed(rows: list[dict], point: str, value: Callable[[dict], float | None]) -> dict:
  out = {}
  for r in rows:
    if r['point'] == point and value(r) is not None:
      out[r['seed']] = value(r)
  return out


def study_verdicts(study: Study, rows: list[dict]) -> list[str]:
  """A sentence per comparison and metric: a − b, its 95 % CI paired by seed, the verdict.

  Accuracy first (the study's `metric`, in points of %), then each extra metric.
  """
  label = METRIC_LABELS.get(study.metric, study.metric)
  lines = []

  def top1(r):  # points of %
    return 100 * r[study.metric]

  for a, b in study.comparisons:
    diff = stats.paired_difference(_by_seed(rows, a, top1), _by_seed(rows, b, top1))
    lines.append(stats.verdict_line(a, b, diff, label))
  for metric in study.extra_metrics:
    for a, b in study.comparisons:
      def value(r, key=metric.key):
        return r.get(key)
      diff = stats.paired_difference(_by_seed(rows, a, value), _by_seed(rows, b, value))
      lines.append(stats.verdict_line(a, b, diff, metric.label, unit=metric.unit,
                                      digits=metric.digits,
                                      lower_is_better=metric.lower_is_better))
  return lines


def host_description() -> str:
  """'<CPU model>, <n> CPUs' of this machine."""
  info = cpu_tuning.host_info()
  return f'{info.get("cpu") or platform.machine()}, {info["cpus"]} CPUs'


def provenance(rows: list[dict]) -> str:
  """Where and when the table was made, and the training time it sums."""
  total = sum(float(r.get('train_wall_s') or 0.0) for r in rows)
  return (f'Generated {time.strftime("%Y-%m-%d %H:%M %Z")} on {host_description()}. '
          f'Training wall time of the {len(rows)} finished runs: {total / 60:.1f} min '
          f'(`train s`: `train.run` wall time of a run, compiling and the final eval included).')


def publish(study_dir: str, dest: str) -> tuple[list[str], str | None]:
  """Copies a study's generated outputs (results.md, results.csv, *.png) into `dest`.

  Then the README.md nearest above `dest` whose text marks a block for it
  (`readme_markers`) gets results.md's body there, so the README's tables and
  verdicts are the generated ones. Returns (the copied names, that README's
  path or None).
  """
  names = sorted(n for n in os.listdir(study_dir)
                 if n in ('results.md', 'results.csv') or n.endswith('.png'))
  if 'results.md' not in names:
    raise ValueError(f'--publish: {study_dir} has no results.md yet (no finished run)')
  os.makedirs(dest, exist_ok=True)
  for name in names:
    shutil.copyfile(os.path.join(study_dir, name), os.path.join(dest, name))
  return names, _splice_into_readme(dest)


def readme_markers(dest: str, readme_dir: str) -> tuple[str, str]:
  """The comment lines that enclose the generated block of `dest` in readme_dir's README.md."""
  key = os.path.relpath(os.path.abspath(dest), os.path.abspath(readme_dir))
  return f'<!-- begin generated: {key} -->', f'<!-- end generated: {key} -->'


def _splice_into_readme(dest: str) -> str | None:
  """Puts dest/results.md (title dropped, links relative to the README) between its markers."""
  folder = os.path.dirname(os.path.abspath(dest))
  while True:
    path = os.path.join(folder, 'README.md')
    begin, end = readme_markers(dest, folder)
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        text = f.read()
      if begin in text and end in text:
        break
    if os.path.dirname(folder) == folder:
      return None
    folder = os.path.dirname(folder)
  with open(os.path.join(dest, 'results.md'), encoding='utf-8') as f:
    body = f.read().split('\n', 1)[1].strip()  # the title is the README's own heading
  prefix = os.path.relpath(os.path.abspath(dest), folder)
  body = re.sub(r'\]\((?!https?:|/)([^)]+)\)', lambda m: f']({prefix}/{m.group(1)})', body)
  head, rest = text.split(begin, 1)
  text = f'{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}'
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return path


def _progress_line(study: Study, rows: list[dict]) -> str:
  """'4 of 6 runs finished: 2 points × 3 seeds (config.seed 0-2); missing: b (seeds 1, 2).'"""
  missing = []
  for point in study.points:
    done = {r['seed'] for r in rows if r['point'] == point.name}
    left = [k for k in range(study.seeds) if k not in done]
    if left and study.seeds == 1:
      missing.append(point.name)
    elif left:
      missing.append(f'{point.name} (seed{"s" if len(left) > 1 else ""} '
                     f'{", ".join(map(str, left))})')
  seeds = '0' if study.seeds == 1 else f'0-{study.seeds - 1}'
  return (f'{len(rows)} of {len(study.points) * study.seeds} runs finished: '
          f'{len(study.points)} points × {study.seeds} seed{"s" if study.seeds > 1 else ""} '
          f'(config.seed {seeds})' + (f'; missing: {", ".join(missing)}' if missing else '')
          + '.')


SUMMARY_NOTE = ('Per point: n finished seeds, the mean, the sample standard deviation and the '
                '95 % confidence interval of the mean (Student t: mean ± t(0.975, n−1)·std/√n); '
                '— where n = 1. Top-1 in %; `last-epoch gain` is the mean rise of that top-1 '
                'over a run\'s last epoch, in points (near 0: converged); `train s` is the mean '
                'training wall time of a run. One row per run: results.csv.')
METRIC_NOTE = ('Over the runs that have a value (`runs with a value`: e.g. those that reached '
               'the target); the others are left out here and in the verdicts.')
VERDICT_NOTE = ('Each line is a − b, averaged over the seeds both points have, paired by '
                'seed: seed k of every point reads the same data order and augmentation draws '
                'and starts from the same RNG key. The interval is the paired Student-t 95 % '
                'interval of the mean difference; a point is called better only when it '
                'excludes 0.')


def results_markdown(study: Study, rows: list[dict], plot_paths: Sequence[str]) -> str:
  """results.md: progress, the per-point summary, extra metrics, verdicts, plots, provenance."""
  text = [f'# {study.title or study.name}', '', _progress_line(study, rows), '',
          SUMMARY_NOTE, '', summary_table(study, rows), '']
  for metric in study.extra_metrics:
    text += [f'## {metric.label[0].upper()}{metric.label[1:]}', '', METRIC_NOTE, '',
             metric_table(study, metric, rows), '']
  if study.comparisons:
    text += ['## Verdicts', '', VERDICT_NOTE, '']
    text += [f'- {line}' for line in study_verdicts(study, rows)] + ['']
  text += [f'![{os.path.basename(p)}]({os.path.basename(p)})' for p in plot_paths]
  if rows:
    text += ['', provenance(rows)]
  return '\n'.join(text) + '\n'


def collect(study: Study, root: str) -> list[dict]:
  """Rebuilds results.csv, results.md and the plots from the finished workdirs."""
  study_dir = os.path.join(root, study.name)
  os.makedirs(study_dir, exist_ok=True)
  rows = result_rows(study, root)
  write_csv(rows, columns(study), os.path.join(study_dir, 'results.csv'))
  plot_paths = study.plot_fn(rows, study_dir) if (study.plot_fn and rows) else []
  tmp = os.path.join(study_dir, 'results.md.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(results_markdown(study, rows, plot_paths))
  os.replace(tmp, os.path.join(study_dir, 'results.md'))
  return rows


# --------------------------------------------------------------------------
# Command line.


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The flags every study.py shares."""
  parser.add_argument('--root', default='runs/experiments',
                      help='workdirs go to <root>/<study>/<point>/seed<k>/')
  parser.add_argument('--seeds', type=int, default=None, metavar='N',
                      help='train every point with config.seed = 0..N-1, one workdir each '
                           '(default: the preset\'s); also what --collect_only tabulates')
  parser.add_argument('--shard', default='0/1',
                      help='i/n: run the (point, seed) pairs whose index %% n == i, '
                           'numbered point-major (cluster jobs)')
  parser.add_argument('--points', default='', help='comma-separated point names to run')
  parser.add_argument('--collect_only', action='store_true',
                      help='only rebuild results.csv/.md and plots from finished workdirs')
  parser.add_argument('--list', action='store_true',
                      help='print the points, their seeds and run numbers, and exit')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='config override for every run (e.g. data.data_dir=/x); not seed')
  parser.add_argument('--num_devices', type=int, default=0,
                      help='train on the first N devices (0 = all); 1 for quick CPU checks')
  parser.add_argument('--publish', default='', metavar='DIR',
                      help='afterwards copy results.md/.csv and the plots to DIR '
                           '(e.g. the experiment\'s results/ folder in the repo), and put '
                           'results.md into the README above DIR that marks a block for it')


def parse_shard(text: str) -> tuple[int, int]:
  try:
    index, count = (int(v) for v in text.split('/'))
  except ValueError:
    raise ValueError(f'--shard={text!r}: expected i/n, e.g. 0/4') from None
  return index, count


def print_list(study: Study) -> None:
  """--list: the points with their run numbers (what --shard splits) and seeds."""
  n = study.seeds
  print(f'{study.name}: {len(study.points)} points × {n} seeds (config.seed 0..{n - 1}) = '
        f'{len(study.points) * n} runs, numbered point-major for --shard')
  for i, point in enumerate(study.points):
    runs = f'{i * n}' if n == 1 else f'{i * n}-{i * n + n - 1}'
    print(f'{i:3d} {point.name:40s} runs {runs:9s} {dict(point.info)}')


def _build(make_study: Callable[[], Study], args: argparse.Namespace) -> Study:
  study = make_study()
  seeds = getattr(args, 'seeds', None)
  if seeds is not None:
    if seeds < 1:
      raise ValueError(f'--seeds={seeds}: expected N >= 1')
    study = dataclasses.replace(study, seeds=seeds)
  return study


def main_for(make_study: Callable[[], Study], args: argparse.Namespace) -> int:
  """Builds the study and runs it as the shared flags say; returns the exit status."""
  try:
    study = _build(make_study, args)
  except ValueError as e:  # an unknown preset, study or base model; a bad --seeds
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.list:
    print_list(study)
    return 0
  cpu_tuning.tune_process()  # see efficientnet_jax/cpu_tuning.py
  try:
    shard = parse_shard(args.shard)
    names = [n for n in args.points.split(',') if n]
    extra = parse_set_flag(args.set)
    run_study(study, args.root, shard=shard, names=names, collect_only=args.collect_only,
              extra=extra, num_devices=args.num_devices)
    if args.publish:
      copied, readme = publish(os.path.join(args.root, study.name), args.publish)
      print(f'[{study.name}] copied {", ".join(copied)} to {args.publish}'
            + (f'; updated {readme}' if readme else ''), flush=True)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except Preempted as e:
    print(f'stopped: {e}', file=sys.stderr)
    return 3
  return 0
