"""Bad configs and command lines fail at once: one line naming the field and what is accepted.

Each case also checks that the workdir is left as it was (absent, empty, or
byte-for-byte unchanged for a workdir that already holds a checkpoint).
The cases here are the ones tests/test_train.py, test_progressive.py and
test_configs.py do not already cover.
"""

import os
import subprocess
import sys

import pytest

from efficientnet_jax import checkpointing
from efficientnet_jax import train
from tests import smoke_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_config = smoke_run.smoke_config
_snapshot = smoke_run.snapshot


@pytest.mark.parametrize('overrides,message', [
    (dict(num_epochs=-1.0, train_steps=-1), r"^num_epochs=-1\.0; accepted: > 0$"),
    (dict(train_steps=-5), r"^train_steps=-5; accepted: > 0, or -1 \(default\)$"),
    (dict(train_steps=0), r"^train_steps=0; accepted: > 0, or -1 \(default\)$"),
    (dict(base_lr=0.0), r"^base_lr=0\.0; accepted: > 0$"),
    (dict(base_lr=float('nan')), r"^base_lr=nan; accepted: a finite number$"),
    (dict(lr_schedule='cosin'), r"^lr_schedule='cosin'; accepted: exponential, cosine, "
                                r"constant$"),
    (dict(label_smoothing=1.0), r"^label_smoothing=1\.0; accepted: a number in \[0, 1\)$"),
    (dict(label_smoothing=-0.1), r"^label_smoothing=-0\.1; accepted: a number in \[0, 1\)$"),
    (dict(ema_decay=1.0), r"^ema_decay=1\.0; accepted: a number in \[0, 1\)$"),
    (dict(ema_decay=-0.5), r"^ema_decay=-0\.5; accepted: a number in \[0, 1\)$"),
    (dict(momentum=1.5), r"^momentum=1\.5; accepted: a number in \[0, 1\)$"),
    (dict(weight_decay=-1e-5), r"^weight_decay=-1e-05; accepted: >= 0$"),
    (dict(warmup_epochs=-1.0), r"^warmup_epochs=-1\.0; accepted: >= 0$"),
    ({'data.name': 'folder', 'data.folder': ''},
     r"^data\.folder=''; accepted: the root directory of the image folders"),
    (dict(image_size=0), r"^image_size=0; accepted: > 0, or -1 \(default\)$"),
    (dict(eval_image_size=-7), r"^eval_image_size=-7; accepted: > 0, or -1 \(default\)$"),
    ({'model.resolution': 0}, r"^model\.resolution=0; accepted: > 0, or -1 \(default\)$"),
    ({'model.width': 0.0}, r"^model\.width=0\.0; accepted: > 0, or -1 \(default\)$"),
    ({'model.depth': -2.0}, r"^model\.depth=-2\.0; accepted: > 0, or -1 \(default\)$"),
    ({'data.randaug_layers': -1}, r"^data\.randaug_layers=-1; accepted: >= 0$"),
    ({'data.mixup_alpha': -0.2}, r"^data\.mixup_alpha=-0\.2; accepted: >= 0$"),
    ({'data.cutmix_alpha': -1.0}, r"^data\.cutmix_alpha=-1\.0; accepted: >= 0$"),
    ({'data.shuffle_buffer': 0}, r"^data\.shuffle_buffer=0; accepted: > 0$"),
    (dict(keep_checkpoints=0), r"^keep_checkpoints=0; accepted: > 0$"),
    (dict(checkpoint_every_steps=0), r"^checkpoint_every_steps=0; accepted: > 0$"),
    (dict(corrupt_checkpoint='skip'),
     r"^corrupt_checkpoint='skip'; accepted: fallback, error$"),
    (dict(peer_failure_timeout_s=0), r"^peer_failure_timeout_s=0; accepted: >= 1$"),
    (dict(log_every_steps=0), r"^log_every_steps=0; accepted: > 0$"),
    (dict(eval_batch_size=0), r"^eval_batch_size=0; accepted: > 0$"),
    (dict(num_classes=0), r"^num_classes=0; accepted: > 0, or -1 \(default\)$"),
    ({'model.depthwise': 'grouped_'}, r"^model\.depthwise='grouped_'; accepted: auto, grouped, "
                                      r"shifted, dnnl$"),
    ({'model.conv': 'xla'}, r"^model\.conv='xla'; accepted: auto, conv, matmul, dnnl$"),
    ({'model.depthwise': 'dnnl'}, r"^model\.depthwise='dnnl' serves one CPU device .* this run "
                                  r"has 8; accepted here: auto, or the pure-JAX kernels$"),
    ({'model.padding': 'valid'}, r"^model\.padding='valid'; accepted: same, symmetric$"),
    (dict(dtype='float16'), r"^dtype='float16'; accepted: float32, bfloat16$"),
    (dict(sharding='zero3'), r"^sharding='zero3'; accepted: replicate, fsdp$"),
    (dict(cpu_train_opt_level=4), r"^cpu_train_opt_level=4; accepted: 0, 1, 2 or 3 "),
    (dict(cpu_train_opt_level=True), r"^cpu_train_opt_level=True; accepted: 0, 1, 2 or 3 "),
])
def test_bad_config_is_one_line_naming_the_field(data_root, tmp_path, overrides, message):
  workdir = tmp_path / 'w'
  with pytest.raises(ValueError, match=message) as error:
    train.run(_config(data_root, **overrides), str(workdir))
  assert '\n' not in str(error.value)
  assert _snapshot(workdir) == []


def _cli(*args):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  return subprocess.run([sys.executable, 'train.py', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=180, env=env)


def _cli_error(result):
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, result.stderr[-2000:]
  return errors[0]


@pytest.mark.parametrize('flags,message', [
    (['--num_processes=2'], "error: --num_processes=2 alone; accepted: --coordinator_address, "
                            "--num_processes and --process_id together, or none of them"),
    (['--coordinator_address=127.0.0.1:1', '--num_processes=2', '--process_id=2'],
     'error: --process_id=2; accepted: 0..1 (--num_processes=2)'),
    (['--coordinator_address=127.0.0.1:1', '--num_processes=0', '--process_id=0'],
     'error: --num_processes=0; accepted: >= 1'),
    (['--config.base_lr=-1.0'], 'error: base_lr=-1.0; accepted: > 0'),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, flags, message):
  workdir = tmp_path / 'w'
  result = _cli('--config=configs/demo.py', f'--workdir={workdir}', *flags)
  assert result.returncode == 2, result.stderr[-2000:]
  assert _cli_error(result) == message
  assert 'Traceback' not in result.stderr
  assert _snapshot(workdir) == []


def _truncate_state_data_files(workdir, step):
  """Cuts every array data file of the step in half (a partial copy, a full disk)."""
  data_dir = workdir / 'checkpoints' / str(step) / 'state' / 'ocdbt.process_0' / 'd'
  files = [p for p in data_dir.iterdir() if p.is_file()]
  assert files
  for victim in files:
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2])


# Slow (30 s): tests/test_fault_drill.py's truncated-checkpoint case checks the same
# refusal (naming the step, deleting nothing) and the resume after moving it aside.
@pytest.mark.slow
def test_truncated_checkpoint_names_step_and_path_and_keeps_the_workdir(data_root, tmp_path):
  workdir = tmp_path / 'w'
  train.run(_config(data_root, train_steps=1), str(workdir))
  _truncate_state_data_files(workdir, 1)
  before = _snapshot(workdir)
  with pytest.raises(checkpointing.CheckpointError) as error:
    train.run(_config(data_root, train_steps=2), str(workdir))
  text = str(error.value)
  assert '\n' not in text
  assert text.startswith('Checkpoint step 1 at ')
  assert str(workdir / 'checkpoints' / '1') in text
  assert _snapshot(workdir) == before
  # The command line says the same in one line, exit 2, and leaves the workdir too.
  result = _cli('--config=configs/base.py:smoke', f'--workdir={workdir}',
                '--config.data.name=fashion_mnist', '--config.data.eval_split=test',
                f'--config.data.source_dir={data_root / "idx"}',
                f'--config.data.data_dir={data_root / "tfds"}', '--config.train_steps=2')
  assert result.returncode == 2, result.stderr[-2000:]
  assert _cli_error(result).startswith('error: Checkpoint step 1 at ')
  assert _snapshot(workdir) == before
