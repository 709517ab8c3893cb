"""Trains an EfficientNet: `python train.py --config=configs/b4.py --workdir=runs/b4`.

Override any field: `--config.batch_size=256 --config.model.phi=3`. A misspelled
or mistyped field is an error (the config is locked). Re-running the same
command resumes from the newest checkpoint in the workdir. On a TPU pod / SLURM
cluster run the same command on every host: `jax.distributed` is initialised
from the environment (scripts/launch_tpu_pod.sh, scripts/slurm_train.sbatch).
Elsewhere give every process --coordinator_address=HOST:PORT --num_processes=N
--process_id=I.
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
# Multi-process without a cluster manager that JAX recognises (TPU pods and
# SLURM are detected): the same three values on every process but process_id.
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, e.g. 10.0.0.1:1234.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the resolved recipe (efficientnet_jax/'
                             'recipe.py) and exit: no data, no compile, no workdir.')
_JSON = flags.DEFINE_bool('json', False, 'With --dry_run: print one JSON object.')
flags.mark_flags_as_required(['config'])
flags.register_multi_flags_validator(
    ['workdir', 'dry_run'], lambda f: bool(f['workdir'] or f['dry_run']),
    message='flag --workdir must have a value other than None (or pass --dry_run)')


def _maybe_initialize_distributed(config):
  """Multi-host: joins JAX's runtime from the flags, or where the platform announces one.

  Returns the `distributed.PeerWatch` of a multi-process run, else None.
  """
  from efficientnet_jax import distributed  # pylint: disable=g-import-not-at-top
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  timeout = config.peer_failure_timeout_s
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      given = ', '.join(f'--{n}={v}' for n, v in zip(
          ('coordinator_address', 'num_processes', 'process_id'), explicit) if v is not None)
      raise ValueError(f'{given} alone; accepted: --coordinator_address, --num_processes and '
                       '--process_id together, or none of them')
    if _NUM_PROCESSES.value < 1:
      raise ValueError(f'--num_processes={_NUM_PROCESSES.value}; accepted: >= 1')
    if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
      raise ValueError(f'--process_id={_PROCESS_ID.value}; accepted: 0..'
                       f'{_NUM_PROCESSES.value - 1} (--num_processes={_NUM_PROCESSES.value})')
    return distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  peer_failure_timeout_s=timeout)
  cluster_env = ('SLURM_NTASKS', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS',
                 'JAX_COORDINATOR_ADDRESS')
  if any(os.environ.get(v) for v in cluster_env):
    try:
      return distributed.initialize(peer_failure_timeout_s=timeout)
    except ValueError as e:  # one host after all (e.g. a 1-task SLURM job)
      print(f'jax.distributed not initialised: {e}', file=sys.stderr)
  return None


def _config_error(argv) -> str | None:
  """The one-line message for an unknown `--config.` field, if one is the parse failure's cause."""
  from efficientnet_jax import config_lib  # pylint: disable=g-import-not-at-top
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    return None
  config = config_lib.load(spec)
  for arg in argv:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      try:
        config_lib.set_fields(config, {key: None})
      except ValueError as e:
        return str(e)
  return None


def _parse_flags(argv):
  """absl's flag parsing, with every failure as one `error:` line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError, ValueError) as e:  # ml_collections on an unknown field
    message = _config_error(argv) or f'{type(e).__name__}: {e}'
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv):
  del argv
  if _DRY_RUN.value:
    from efficientnet_jax import recipe  # pylint: disable=g-import-not-at-top
    sys.exit(recipe.dry_run(_CONFIG.value, as_json=_JSON.value))
  # Orbax and tfds log every file operation at INFO; progress lines are printed.
  logging.set_verbosity(logging.WARNING)
  from efficientnet_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
  cpu_tuning.tune_process()  # before the first large buffer; see cpu_tuning.py
  from efficientnet_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.best_effort_console()  # a closed stdout pipe must not stop training
  from efficientnet_jax import train  # pylint: disable=g-import-not-at-top
  peers = None
  try:
    peers = _maybe_initialize_distributed(_CONFIG.value)
    train.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError,
          train.checkpointing.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except Exception:  # pylint: disable=broad-except
    if peers is not None:  # a collective that failed because a peer died: say which
      peers.wait_for_loss()
    raise
  from efficientnet_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.finish(peers)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
