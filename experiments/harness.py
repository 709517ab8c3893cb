"""Runs a study's list of named points, each in its own workdir, and tabulates the results.

A `Point` is a name plus dotted config overrides on top of the study's base
config. `run_study` trains every point with `efficientnet_jax.train.run` in
`<root>/<study>/<point>/`, skipping points that finished (their `result.json`,
written after the final eval, is present) and resuming unfinished ones from
their checkpoints. `--shard=i/n` runs the points whose index % n == i, so n
cluster jobs share a study; every job then rebuilds the outputs from all
finished workdirs: `results.csv`, `results.md` and the study's PNG plots.

Points run in-process, one after the other: that saves the 10-20 s of JAX/TF
start-up per point that child processes would cost, keeps the small eager
programs (checkpoint slicing, RNG set-up) compiled across points, and lets
points with the same shapes share compiled programs through one persistent
compilation cache per study (`<root>/<study>/compile_cache`). Each point's
train/eval steps are new `jax.jit` objects over its own model; what JAX keeps
of them between points is its bounded executable caches (the progress line
prints the process RSS so growth would show). `jax.clear_caches()` between
points was tried and dropped: it made every checkpoint save recompile hundreds
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
import shutil
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from efficientnet_jax import experiment
from efficientnet_jax import cpu_tuning

RESULT_FILE = 'result.json'  # written once a point's final eval is done
SEGMENTS_FILE = 'harness.jsonl'  # one record per training invocation (wall time)
BASE_COLUMNS = ('point', 'model', 'width', 'depth', 'resolution', 'params', 'macs',
                'steps', 'top1', 'raw_top1', 'top5', 'train_wall_s')


class Preempted(Exception):
  """A point stopped on SIGTERM after saving a checkpoint."""


@dataclasses.dataclass(frozen=True)
class Point:
  """One training run of a study.

  Attributes:
    name: the workdir name (letters, digits, '_', '-', '.', '=').
    overrides: dotted config fields -> values, e.g. {'model.width': 0.5}.
    info: extra columns for the results table and plots (family, budget, ...).
  """
  name: str
  overrides: Mapping[str, Any]
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Study:
  """A named list of points over one base config, and how to plot their results.

  Attributes:
    name: the study directory under the root.
    base_config: returns a fresh base config (configs/base.py-like ConfigDict).
    points: the runs, in order.
    info_columns: `Point.info` keys shown in the table (in this order).
    plot_fn: (rows, study_dir) -> paths of the PNGs it wrote; rows are those
      of finished points, as in results.csv.
    title: heading of results.md.
  """
  name: str
  base_config: Callable[[], Any]
  points: list[Point]
  info_columns: tuple[str, ...] = ()
  plot_fn: Callable[[list[dict], str], list[str]] | None = None
  title: str = ''

  def __post_init__(self):
    names = [p.name for p in self.points]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
      raise ValueError(f'study {self.name!r}: duplicate point names {dupes}')
    for name in names:
      if not name or not all(c.isalnum() or c in '_-.=' for c in name):
        raise ValueError(f'study {self.name!r}: point name {name!r} must be non-empty '
                         "letters, digits, '_', '-', '.', '='")


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


def point_config(study: Study, point: Point, extra: Mapping[str, Any] | None = None):
  """The base config with the point's overrides, then `extra` (e.g. data paths) on top."""
  config = study.base_config()
  # Imported here: config_checks pulls in TensorFlow (the augmentation names),
  # which --list and --collect_only never need.
  from efficientnet_jax import config_lib  # pylint: disable=g-import-not-at-top
  config_lib.set_fields(config, point.overrides)
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


def run_point(study: Study, point: Point, workdir: str,
              extra: Mapping[str, Any] | None = None, num_devices: int = 0) -> dict:
  """Trains (or resumes) one point to the end; writes and returns its result record.

  num_devices > 0 trains on the first that many devices (quick CPU checks).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from efficientnet_jax import train  # pylint: disable=g-import-not-at-top
  config = point_config(study, point, extra)
  if not config.compilation_cache_dir and not jax.config.jax_compilation_cache_dir:
    # One cache per study (unless JAX already has one): points with the same
    # shapes compile once, and a resumed point skips compiling.
    config.compilation_cache_dir = os.path.join(os.path.dirname(workdir), 'compile_cache')
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  devices = jax.devices()[:num_devices] if num_devices > 0 else None
  outcome = train.run(config, workdir, devices=devices)
  wall = time.perf_counter() - start
  with open(os.path.join(workdir, SEGMENTS_FILE), 'a', encoding='utf-8') as f:
    f.write(json.dumps({'wall_s': wall, 'time': time.time(),
                        'preempted': outcome.preempted}) + '\n')
  if outcome.preempted:
    raise Preempted(f'{point.name}: SIGTERM, saved step {outcome.step}; '
                    'run the same command again to resume')
  final = outcome.eval
  segments = read_jsonl(os.path.join(workdir, SEGMENTS_FILE))
  result = {'point': point.name, 'overrides': _jsonable(point.overrides),
            'info': _jsonable(point.info), 'steps': int(final['step']),
            'top1': final['top1'], 'raw_top1': final['raw_top1'], 'top5': final['top5'],
            'eval_count': final['count'],
            'train_wall_s': round(sum(s['wall_s'] for s in segments), 2),
            **model_counts(config)}
  _write_json(os.path.join(workdir, RESULT_FILE), result)
  return result


def check_result_matches(point: Point, result: dict, workdir: str) -> None:
  """A finished workdir of a point whose overrides changed since is an error, not a skip."""
  want = _jsonable(point.overrides)
  if result.get('overrides') != want:
    raise ValueError(f'{workdir} finished with overrides {result.get("overrides")}, but point '
                     f'{point.name!r} now has {want}; delete the workdir or rename the point')


def select_points(points: Sequence[Point], *, shard: tuple[int, int] = (0, 1),
                  names: Sequence[str] = ()) -> list[Point]:
  """The points of shard i of n (index % n == i), restricted to `names` if given."""
  index, count = shard
  if count < 1 or not 0 <= index < count:
    raise ValueError(f'shard={index}/{count}: expected i/n with 0 <= i < n')
  known = {p.name for p in points}
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f'--points: unknown {unknown}; this study has {sorted(known)}')
  return [p for i, p in enumerate(points)
          if i % count == index and (not names or p.name in names)]


def run_study(study: Study, root: str, *, shard: tuple[int, int] = (0, 1),
              names: Sequence[str] = (), collect_only: bool = False,
              extra: Mapping[str, Any] | None = None, num_devices: int = 0,
              log=None) -> list[dict]:
  """Runs the selected points (unless collect_only), then writes the study's outputs.

  Returns the rows of all finished points (not only this shard's).
  """
  log = log or functools.partial(print, flush=True)  # interleaves with train.run's lines
  study_dir = os.path.join(root, study.name)
  os.makedirs(study_dir, exist_ok=True)
  todo = [] if collect_only else select_points(study.points, shard=shard, names=names)
  began = time.perf_counter()
  trained = 0
  for i, point in enumerate(todo):
    workdir = os.path.join(study_dir, point.name)
    prefix = f'[{study.name} {i + 1}/{len(todo)}] {point.name}'
    result = read_result(workdir)
    if result is not None:
      check_result_matches(point, result, workdir)
      log(f'{prefix}: finished before (top1 {result["top1"]:.4f}), skipped')
      continue
    resumed = os.path.isdir(os.path.join(workdir, 'checkpoints'))
    log(f'{prefix}: {"resuming" if resumed else "training"} in {workdir}')
    result = run_point(study, point, workdir, extra, num_devices)
    trained += 1
    elapsed = time.perf_counter() - began
    left = len(todo) - i - 1
    log(f'{prefix}: top1 {result["top1"]:.4f} (raw {result["raw_top1"]:.4f}), '
        f'{result["macs"] / 1e6:.2f} M MACs, {result["train_wall_s"]:.0f} s; '
        f'{left} left, about {elapsed / trained * left / 60:.1f} min; rss {_rss_gb():.2f} GB')
  rows = collect(study, root)
  log(f'[{study.name}] {len(rows)}/{len(study.points)} points finished; outputs in {study_dir}')
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
  """One flat row per finished point, in the study's point order."""
  rows = []
  for point in study.points:
    result = read_result(os.path.join(root, study.name, point.name))
    if result is None:
      continue
    row = {'point': point.name, **dict(point.info)}
    row.update({k: result[k] for k in BASE_COLUMNS if k in result and k != 'point'})
    rows.append(row)
  return rows


def columns(study: Study) -> list[str]:
  return ['point', *study.info_columns, *BASE_COLUMNS[1:]]


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


def markdown_table(rows: list[dict], cols: Sequence[str]) -> str:
  """Top-1 columns in %, MACs in millions; one row per finished point."""
  names = {'top1': 'top-1 EMA %', 'raw_top1': 'top-1 raw %', 'top5': 'top-5 EMA %',
           'macs': 'MACs', 'train_wall_s': 'train s'}
  lines = ['| ' + ' | '.join(names.get(c, c) for c in cols) + ' |',
           '|' + '|'.join('---' for _ in cols) + '|']
  for row in rows:
    lines.append('| ' + ' | '.join(_fmt(c, row.get(c)) for c in cols) + ' |')
  return '\n'.join(lines)


def host_description() -> str:
  """'<CPU model>, <n> CPUs' of this machine."""
  info = cpu_tuning.host_info()
  return f'{info.get("cpu") or platform.machine()}, {info["cpus"]} CPUs'


def provenance(rows: list[dict]) -> str:
  """Where and when the table was made, and the training time it sums."""
  total = sum(float(r.get('train_wall_s') or 0.0) for r in rows)
  return (f'Generated {time.strftime("%Y-%m-%d %H:%M %Z")} on {host_description()}. '
          f'Training wall time of the {len(rows)} finished points: {total / 60:.1f} min '
          f'(the `train s` column: `train.run` wall time, compiling and the final eval included).')


def publish(study_dir: str, dest: str) -> list[str]:
  """Copies a study's generated outputs (results.md, results.csv, *.png) into `dest`."""
  names = sorted(n for n in os.listdir(study_dir)
                 if n in ('results.md', 'results.csv') or n.endswith('.png'))
  if 'results.md' not in names:
    raise ValueError(f'--publish: {study_dir} has no results.md yet (no finished point)')
  os.makedirs(dest, exist_ok=True)
  for name in names:
    shutil.copyfile(os.path.join(study_dir, name), os.path.join(dest, name))
  return names


def collect(study: Study, root: str) -> list[dict]:
  """Rebuilds results.csv, results.md and the plots from the finished workdirs."""
  study_dir = os.path.join(root, study.name)
  rows = result_rows(study, root)
  cols = columns(study)
  write_csv(rows, cols, os.path.join(study_dir, 'results.csv'))
  plots = study.plot_fn(rows, study_dir) if (study.plot_fn and rows) else []
  missing = [p.name for p in study.points if p.name not in {r['point'] for r in rows}]
  text = [f'# {study.title or study.name}', '',
          f'{len(rows)} of {len(study.points)} points finished'
          + (f' (missing: {", ".join(missing)})' if missing else '') + '.', '',
          # The spec name (with every override) is in results.csv; too wide here.
          markdown_table(rows, [c for c in cols if c != 'model']), '']
  text += [f'![{os.path.basename(p)}]({os.path.basename(p)})' for p in plots]
  if rows:
    text += ['', provenance(rows)]
  tmp = os.path.join(study_dir, 'results.md.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write('\n'.join(text) + '\n')
  os.replace(tmp, os.path.join(study_dir, 'results.md'))
  return rows


# --------------------------------------------------------------------------
# Command line.


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The flags every study.py shares."""
  parser.add_argument('--root', default='runs/experiments',
                      help='workdirs go to <root>/<study>/<point>/')
  parser.add_argument('--shard', default='0/1',
                      help='i/n: run the points whose index %% n == i (cluster jobs)')
  parser.add_argument('--points', default='', help='comma-separated point names to run')
  parser.add_argument('--collect_only', action='store_true',
                      help='only rebuild results.csv/.md and plots from finished workdirs')
  parser.add_argument('--list', action='store_true', help='print the points and exit')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='config override for every point (e.g. data.data_dir=/x)')
  parser.add_argument('--num_devices', type=int, default=0,
                      help='train on the first N devices (0 = all); 1 for quick CPU checks')
  parser.add_argument('--publish', default='', metavar='DIR',
                      help='afterwards copy results.md/.csv and the plots to DIR '
                           '(e.g. the experiment\'s results/ folder in the repo)')


def parse_shard(text: str) -> tuple[int, int]:
  try:
    index, count = (int(v) for v in text.split('/'))
  except ValueError:
    raise ValueError(f'--shard={text!r}: expected i/n, e.g. 0/4') from None
  return index, count


def main_for(make_study: Callable[[], Study], args: argparse.Namespace) -> int:
  """Builds the study and runs it as the shared flags say; returns the exit status."""
  try:
    study = make_study()
  except ValueError as e:  # an unknown preset, study or base model
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.list:
    for i, point in enumerate(study.points):
      print(f'{i:3d} {point.name:40s} {dict(point.info)}')
    return 0
  try:
    shard = parse_shard(args.shard)
    names = [n for n in args.points.split(',') if n]
    extra = parse_set_flag(args.set)
    run_study(study, args.root, shard=shard, names=names, collect_only=args.collect_only,
              extra=extra, num_devices=args.num_devices)
    if args.publish:
      copied = publish(os.path.join(args.root, study.name), args.publish)
      print(f'[{study.name}] copied {", ".join(copied)} to {args.publish}', flush=True)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except Preempted as e:
    print(f'stopped: {e}', file=sys.stderr)
    return 3
  return 0
