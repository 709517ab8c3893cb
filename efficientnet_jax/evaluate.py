"""Evaluates a workdir's checkpoint: `python -m efficientnet_jax.evaluate --config=... --workdir=...`.

`--step` picks a checkpoint (default: the newest) and `--image_size` evaluates
at another resolution (test-time resolution studies). Prints EMA and raw
top-1 / top-5 over every example of the eval split, and `--json` prints them
as one JSON object.
"""

import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir holding checkpoints/.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', None, 'Eval resolution (default: config).')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object.')
flags.mark_flags_as_required(['config', 'workdir'])


def evaluate_checkpoint(config, workdir: str, step: int | None = None,
                        image_size: int | None = None) -> dict:
  import dataclasses  # pylint: disable=g-import-not-at-top
  from efficientnet_jax import sharding  # pylint: disable=g-import-not-at-top
  from efficientnet_jax import state_layout  # pylint: disable=g-import-not-at-top
  from efficientnet_jax import train  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  # The config's mesh and state layout (sharding, mesh_model), as in training.
  mesh = sharding.make_mesh(model=config.get('mesh_model', 1))
  sharding.check_batch_size(config.eval_batch_size, mesh, field='eval_batch_size')
  exp, state, step = train.load_checkpoint(config, workdir, step, mesh)
  if image_size:
    exp = dataclasses.replace(exp, eval_image_size=image_size)
  raw = {'params': state['params'], 'batch_stats': state['batch_stats']}
  ema = state_layout.ema_variables(state)
  eval_fn = jax.jit(functools.partial(train.eval_step, model=exp.model),
                    in_shardings=(jax.tree.map(lambda a: a.sharding, raw),
                                  sharding.batch_sharding(mesh)),
                    out_shardings=sharding.replicated(mesh))
  results = train.evaluate(eval_fn, {'ema': ema, 'raw': raw}, exp, config, mesh)
  return {'step': step, 'image_size': exp.eval_image_size, **results}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    out = evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _STEP.value, _IMAGE_SIZE.value)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if _JSON.value:
    print(json.dumps(out))
  else:
    for name in ('ema', 'raw'):
      r = out[name]
      print(f'step {out["step"]} @ {out["image_size"]}px {name}: top1 {r["top1"]:.4f} '
            f'top5 {r["top5"]:.4f} loss {r["loss"]:.4f} ({r["count"]} examples)')


if __name__ == '__main__':
  app.run(main)
