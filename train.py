"""Trains an EfficientNet: `python train.py --config=configs/b4.py --workdir=runs/b4`.

Override any field: `--config.batch_size=256 --config.model.phi=3`. A misspelled
or mistyped field is an error (the config is locked). Re-running the same
command resumes from the newest checkpoint in the workdir. On a TPU pod / SLURM
cluster run the same command on every host: `jax.distributed` is initialised
from the environment.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def _maybe_initialize_distributed():
  """Multi-host: initialise JAX's runtime where the platform announces a cluster."""
  import jax  # pylint: disable=g-import-not-at-top
  cluster_env = ('SLURM_NTASKS', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS',
                 'JAX_COORDINATOR_ADDRESS')
  if any(os.environ.get(v) for v in cluster_env):
    try:
      jax.distributed.initialize()
    except ValueError as e:  # one host after all (e.g. a 1-task SLURM job)
      print(f'jax.distributed not initialised: {e}', file=sys.stderr)


def main(argv):
  del argv
  # Orbax and tfds log every file operation at INFO; progress lines are printed.
  logging.set_verbosity(logging.WARNING)
  from efficientnet_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
  cpu_tuning.tune_malloc()  # before the first large buffer; see cpu_tuning.py
  _maybe_initialize_distributed()
  from efficientnet_jax import train  # pylint: disable=g-import-not-at-top
  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
