"""scripts/fault_drill.py end to end: a kill -9 trial and every other fault once, on real runs."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Kept between test sessions: the children's compiled steps load instead of compiling.
CACHE = os.path.join(tempfile.gettempdir(), 'efficientnet_jax_fault_drill_cache')


def test_fault_drill_loses_nothing(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'scripts/fault_drill.py', '--trials=1', '--steps=6', '--json',
       f'--workdir={tmp_path}', f'--compile_cache={CACHE}'],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  r = json.loads(proc.stdout)
  assert r['ok'] and r['failures'] == []
  # kill -9: nothing checkpointed is lost, nothing on disk is corrupt, and every
  # resumed run ends bit-equal to the uninterrupted one.
  assert r['trials'] == 1 and len(r['kill_trials']) == 1
  assert r['lost_steps'] == 0
  assert r['corrupt_checkpoints'] == 0
  assert r['final_params_equal'] is True
  # A checkpoint every step, at most one save in flight, progress logged a step late.
  assert 0 <= r['max_recomputed_steps'] <= 3
  for trial in r['kill_trials']:
    assert trial['resumed_from'] >= max(trial['checkpoints_on_disk'], default=0)
  # SIGTERM with stdout a closed pipe: exit 0, one fresh checkpoint, no tmp dir.
  s = r['sigterm']
  assert (s['exit_code'], s['hung'], s['tmp_dirs_left']) == (0, False, [])
  assert len(s['checkpoints']) == 1 and s['checkpoints'][0] >= s['last_logged_step'] >= 3
  # NaN from step 4: a one-line error naming steps 3..4, the step-3 checkpoint kept.
  n = r['nan']
  assert n['nan_from_step'] == 4 and n['exit_code'] not in (0, None) and not n['hung']
  assert n['one_line_error'] and 'between steps 3 and 4' in n['message']
  assert n['last_good_checkpoint'] == 3
  # ENOSPC while committing step 3: error names it; step 2 restores; no step 3.
  d = r['disk_full']
  assert d['exit_code'] == 2 and 'step 3' in d['error'] and 'No space left' in d['error']
  assert 2 in d['checkpoints'] and 3 not in d['checkpoints']
  assert d['corrupt'] == [] and d['previous_checkpoint_restores'] is True
  # Truncated newest checkpoint: refused naming it and how to go on; that works.
  t = r['truncated_checkpoint']
  assert t['behaviour'] in ('refused', 'fallback') and t['final_equal'] is True
  if t['behaviour'] == 'refused':
    assert t['names_bad_checkpoint'] and t['nothing_deleted'] and 'mv ' in t['error']
    assert t['after_moving_it_aside']['resumed_from'] == 5
  # Bad image files: all skipped and counted, training completed on the rest.
  b = r['bad_images']
  assert b['num_skipped'] == b['planted_bad_files'] == 5
  assert b['num_train'] == 40 and b['training_completed']
  assert r['wall_s'] > 0


@pytest.mark.slow  # ~8 min; the default suite's 2-process kill/SIGTERM test covers its paths
def test_multiprocess_fault_drill(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'scripts/fault_drill.py', '--multiprocess', '--trials=1', '--steps=6',
       '--json', f'--workdir={tmp_path}', f'--compile_cache={CACHE}_mp'],
      cwd=REPO, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-4000:]
  r = json.loads(proc.stdout)['multiprocess']
  assert r['hangs'] == 0 and r['max_exit_s'] <= r['exit_bound_s']
  assert r['lost_steps'] == 0 and r['final_params_equal'] is True
  assert r['corruptions_detected'] == r['corruptions_planted'] == 3
  for which in ('sigterm_all', 'sigterm_one'):
    s = r[which]
    assert s['exit_codes'] == [0, 0] and s['saved_steps'][0] == s['saved_steps'][1]
