"""Median training images/s of each progressive stage of one or more training workdirs.

  python scripts/stage_speed.py runs/experiments/progressive/*/seed*  [--json]

Reads each workdir's `metrics.jsonl`: train.py's `stage_start` event of every
stage (a fixed-size run has one) and its `images_per_sec` record every
`log_every_steps`. Records before any stage event are reported under '-'.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def stage_speeds(workdir: str) -> dict[str, float]:
  """{image size (or '-') -> median images/s of that stage's training records}."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise ValueError(f'{workdir}: no metrics.jsonl; accepted: a train.py workdir')
  speeds, size = {}, '-'
  with open(path, encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      if record.get('event') == 'stage_start':
        size = str(record['image_size'])
      elif record.get('split') == 'train' and 'images_per_sec' in record:
        speeds.setdefault(size, []).append(record['images_per_sec'])
  return {s: round(statistics.median(v), 1) for s, v in speeds.items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  args = parser.parse_args(argv)
  try:
    table = {w: stage_speeds(w) for w in args.workdirs}
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(table))
    return 0
  print('| workdir | median img/s by stage size |\n|---|---|')
  for workdir, speeds in table.items():
    print(f'| {workdir} | ' + ', '.join(f'{s} px: {v:g}' for s, v in speeds.items()) + ' |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
