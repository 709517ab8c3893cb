"""What the checkpoint manifest costs: B0 / B4 train states saved and restored, with and without.

    python scripts/benchmark_checkpoint.py [--models=b0,b4] [--rounds=3] [--json]

For each model, the full train state (params, batch stats, RMSProp slots, EMA;
random values, so nothing compresses better than real weights) is saved with
`checkpointing.save` and restored with `checkpointing.restore`, in a temporary
directory. Per round it measures:

  save_s          save + wait (the manifest is written inside the commit)
  manifest_s      `write_manifest` alone on the saved step (its share of the save)
  verify_s        `verify_manifest` alone (every file read and checksummed)
  restore_s       restore with the manifest checked on a thread beside it
  restore_bare_s  restore of the same step with its manifest removed (unverified)

and prints medians, the overhead ratios and the state size. The page cache is
warm after the save (this script cannot drop it); on a cold cache both
restores read from disk and the thread overlaps the check with those reads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _random_state(model: str):
  """The per-leaf train state of `model` (1000 classes) on one device, filled with random values."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from efficientnet_jax import optim  # pylint: disable=g-import-not-at-top
  from efficientnet_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from efficientnet_jax.model import create_model, scaling  # pylint: disable=g-import-not-at-top
  net = create_model(model, num_classes=1000)
  tx = optim.make_optimizer(name='rmsprop', learning_rate=0.016, weight_decay=1e-5,
                            weight_decay_mask=optim.weight_decay_mask)
  size = scaling.OFFICIAL_V1_TABLE[model][2]
  shapes = jax.eval_shape(functools.partial(state_lib.create_train_state, model=net, tx=tx,
                                            image_size=size), jax.random.key(0))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          shapes)
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda a: jax.device_put(
      rng.standard_normal(a.shape).astype(a.dtype), device), abstract)
  return state, abstract


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def measure(model: str, rounds: int) -> dict:
  from efficientnet_jax import checkpointing  # pylint: disable=g-import-not-at-top
  state, abstract = _random_state(model)
  runs = []
  for r in range(rounds):
    root = tempfile.mkdtemp(prefix=f'ckpt_bench_{model}_')
    try:
      manager = checkpointing.make_checkpoint_manager(root, save_interval_steps=1)
      t = time.perf_counter()
      checkpointing.save(manager, 1, state, meta={'model': model}, force=True)
      checkpointing.wait(manager)
      save_s = time.perf_counter() - t
      step_dir = os.path.join(root, 'checkpoints', '1')
      t = time.perf_counter()
      checkpointing.write_manifest(step_dir)
      manifest_s = time.perf_counter() - t
      t = time.perf_counter()
      problems = checkpointing.verify_manifest(step_dir)
      verify_s = time.perf_counter() - t
      assert problems == [], problems
      t = time.perf_counter()
      checkpointing.restore(manager, abstract, 1)
      restore_s = time.perf_counter() - t
      os.remove(os.path.join(step_dir, checkpointing.MANIFEST_FILE))
      t = time.perf_counter()
      checkpointing.restore(manager, abstract, 1)
      restore_bare_s = time.perf_counter() - t
      size = _dir_bytes(step_dir)
      checkpointing.close(manager)
    finally:
      shutil.rmtree(root, ignore_errors=True)
    runs.append({'round': r, 'save_s': save_s, 'manifest_s': manifest_s, 'verify_s': verify_s,
                 'restore_s': restore_s, 'restore_bare_s': restore_bare_s})
    print(f'[{model} round {r + 1}/{rounds}] ' + ', '.join(
        f'{k} {v:.3f}' for k, v in runs[-1].items() if k != 'round'), file=sys.stderr, flush=True)
  med = {k: statistics.median(run[k] for run in runs) for k in runs[0] if k != 'round'}
  return {'model': model, 'state_mb': round(size / 2**20, 1), 'rounds': runs,
          'median': {k: round(v, 3) for k, v in med.items()},
          'manifest_share_of_save': round(med['manifest_s'] / med['save_s'], 3),
          'restore_overhead': round(med['restore_s'] / med['restore_bare_s'] - 1, 3)}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='b0,b4')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  results = [measure(m, args.rounds) for m in args.models.split(',')]
  print('| model | state MB | save s | manifest s | verify s | restore s (verified) | '
        'restore s (unverified) | restore overhead |')
  print('|---|---|---|---|---|---|---|---|')
  for r in results:
    m = r['median']
    print(f'| {r["model"]} | {r["state_mb"]} | {m["save_s"]:.3f} | {m["manifest_s"]:.3f} | '
          f'{m["verify_s"]:.3f} | {m["restore_s"]:.3f} | {m["restore_bare_s"]:.3f} | '
          f'{100 * r["restore_overhead"]:+.0f} % |')
  if args.json:
    print(json.dumps({'results': results, 'time': time.strftime('%Y-%m-%d %H:%M %Z')},
                     indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
