"""The fault drill's multi-process part: `python scripts/fault_drill.py --multiprocess`.

Every run is 2 `train.py` processes x 4 simulated CPU devices joined by
`jax.distributed` on 127.0.0.1 (data.process_sharding=batch, so a run's
result does not depend on how it was split), with
`config.peer_failure_timeout_s` set short. The faults:

  kill -9     N trials: one of the two processes (chosen at random) is killed at a
              random moment of training (a checkpoint every step, so many kills land in
              an async save). The survivor must exit non-zero within the bound
              (peer_failure_timeout_s + EXIT_SLACK_S) with one line naming the lost
              process; no step may be left that does not restore; relaunching both
              resumes from the newest step and ends bit-equal to an uninterrupted
              2-process run.
  SIGTERM     to both processes, and to one only: both exit 0 after saving the same
              step; the relaunch resumes from it and ends bit-equal.
  corruption  a flipped byte in a file restore does not read (state/_sharding), one in
              the array data (orbax would restore wrong values without a word), and a
              truncated file restore does not read (state/commit_success.txt), each in
              the newest step of a copy of the finished run: the relaunch must name the
              corrupt step, resume from the step before and end bit-equal.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import sys
import threading
import time

import fault_drill as fd

PROCESSES = 2
DEVICES_PER_PROCESS = 4
PEER_TIMEOUT_S = 5
EXIT_SLACK_S = 10  # detection poll, the failed collective's unwinding, process exit
JAX_LEADER_LOST = 'Terminating process because the JAX distributed service detected fatal'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Pair:
  """The two processes of one run."""

  def __init__(self, drill: 'MultiDrill', name: str, workdir: str):
    port = _free_port()
    argv = fd.train_argv(workdir, drill.fields())
    self.children = [
        fd.Child([sys.executable, 'train.py', *argv, f'--coordinator_address=127.0.0.1:{port}',
                  f'--num_processes={PROCESSES}', f'--process_id={i}'],
                 os.path.join(drill.logs, f'{name}.p{i}'), drill.env)
        for i in range(PROCESSES)]

  def finish(self, timeout: float = fd.CHILD_TIMEOUT_S) -> list[tuple[int | None, bool]]:
    return [c.finish(timeout) for c in self.children]


def _watch_exit(child: fd.Child) -> None:
  """Records when the child exits (polled), for exit-time bounds."""
  child.exit_time = None

  def poll():
    child.proc.wait()
    child.exit_time = time.monotonic()

  threading.Thread(target=poll, daemon=True).start()


class MultiDrill:
  """Runs the multi-process faults; `run()` returns the JSON section."""

  def __init__(self, parent: fd.Drill):
    # The parent's log, check and failure list: one report for both drills.
    self.args, self.root, self.data_dir = parent.args, parent.root, parent.data_dir
    self.log, self.check, self.failures = parent.log, parent.check, parent.failures
    self.logs = os.path.join(self.root, 'logs_multiprocess')
    os.makedirs(self.logs, exist_ok=True)
    self.cache_dir = os.path.join(self.root, 'compile_cache_multiprocess')
    self.env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count='
                    f'{DEVICES_PER_PROCESS}', JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='',
                    TF_CPP_MIN_LOG_LEVEL='2', JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                    PYTHONUNBUFFERED='1')
    self.rng = random.Random(self.args.seed + 1)
    self.inspector = fd.Inspector(parent.fields())

  def fields(self) -> dict:
    return fd.drill_overrides(self.data_dir, self.cache_dir, self.args.steps,
                              **{'data.process_sharding': 'batch',
                                 'peer_failure_timeout_s': PEER_TIMEOUT_S})

  def launch(self, name: str, workdir: str) -> Pair:
    pair = Pair(self, name, workdir)
    for c in pair.children:
      _watch_exit(c)
    return pair

  def run_to_end(self, name: str, workdir: str) -> dict:
    """Launches both processes and waits; (exit codes, hung, resumed_from, final state equal)."""
    pair = self.launch(name, workdir)
    results = pair.finish()
    lines = pair.children[0].stdout_lines()
    out = {'exit_codes': [rc for rc, _ in results], 'hung': any(h for _, h in results),
           'resumed_from': fd.resumed_step(lines)}
    out['final_equal'] = False
    if out['exit_codes'] == [0, 0]:
      try:
        final = self.inspector.restore(workdir, self.args.steps)
        out['final_equal'] = self.inspector.equal(final, self.reference_state)
      except Exception as e:  # pylint: disable=broad-except
        out['restore_error'] = f'{type(e).__name__}: {e}'[:300]
    return out

  def reference(self) -> None:
    workdir = os.path.join(self.root, 'mp_reference')
    shutil.rmtree(workdir, ignore_errors=True)
    pair = self.launch('reference', workdir)
    loop_start = pair.children[0].wait_for_line('training ', fd.CHILD_TIMEOUT_S)
    results = pair.finish()
    ok = self.check([rc for rc, _ in results] == [0, 0] and loop_start is not None,
                    f'multi-process reference run failed: {results}; see {self.logs}')
    if not ok:
      raise RuntimeError('multi-process reference run failed')
    self.reference_dir = workdir
    self.reference_state = self.inspector.restore(workdir, self.args.steps)
    times = [t for t, line in pair.children[0].lines if line and line.startswith('step ')]
    gaps = sorted(b - a for a, b in zip(times[1:], times[2:]))
    self.step_s = gaps[len(gaps) // 2] if gaps else 1.0
    self.log(f'reference: {self.args.steps} steps, median step {self.step_s:.2f} s')

  # -- kill -9 ------------------------------------------------------------------

  def kill_trial(self, k: int) -> dict:
    workdir = os.path.join(self.root, f'mp_kill_{k:02d}')
    shutil.rmtree(workdir, ignore_errors=True)
    pair = self.launch(f'kill_{k:02d}', workdir)
    victim = self.rng.randrange(PROCESSES)
    target = self.rng.randrange(0, self.args.steps - 1)
    delay = self.rng.uniform(0.0, 2.0 * self.step_s)
    seen = pair.children[0].wait_for_line(f'step {target}/' if target else 'training ',
                                          fd.CHILD_TIMEOUT_S)
    if seen is not None:
      time.sleep(max(0.0, seen + delay - time.monotonic()))
    killed_at = time.monotonic()
    pair.children[victim].proc.send_signal(signal.SIGKILL)
    survivor = pair.children[1 - victim]
    results = pair.finish(timeout=PEER_TIMEOUT_S + EXIT_SLACK_S + 60)
    rc, hung = results[1 - victim]
    exit_s = (survivor.exit_time or time.monotonic()) - killed_at
    stderr = survivor.stderr_text()
    ours = [l for l in fd.error_lines(stderr) if f'process {victim} of' in l
            or 'coordination service (process 0)' in l]
    steps, tmp = fd.checkpoint_dirs(workdir)
    restore_errors = {s: e for s, e in self.inspector.check_all(workdir).items() if e}
    trial = {'trial': k, 'killed_process': victim, 'after_step_line': target,
             'delay_s': round(delay, 2), 'survivor_exit_code': rc, 'hung': hung,
             'survivor_exit_s': round(exit_s, 2),
             'message': (ours or [l for l in stderr.splitlines() if JAX_LEADER_LOST in l]
                         or [''])[0][:300],
             'checkpoints_on_disk': steps, 'save_in_flight': bool(tmp),
             'corrupt': sorted(restore_errors)}
    trial['relaunch'] = self.run_to_end(f'kill_{k:02d}_relaunch', workdir)
    trial['lost_steps'] = max(0, max(steps, default=0) - trial['relaunch']['resumed_from'])
    trial['ok'] = (rc not in (0, None) and not hung and exit_s <= self.exit_bound_s
                   and bool(trial['message']) and not restore_errors
                   and trial['lost_steps'] == 0 and trial['relaunch']['final_equal'])
    self.check(trial['ok'], f'kill trial {k}: {trial}')
    self.log(f'kill {k}: process {victim} after step line {target} +{delay:.2f}s -> survivor '
             f'exit {rc} in {exit_s:.1f}s; on disk {steps}{" (save in flight)" * bool(tmp)}; '
             f'relaunch resumed from {trial["relaunch"]["resumed_from"]}, equal '
             f'{trial["relaunch"]["final_equal"]}')
    return trial

  # -- SIGTERM ------------------------------------------------------------------

  def sigterm_trial(self, which: str) -> dict:
    workdir = os.path.join(self.root, f'mp_sigterm_{which}')
    shutil.rmtree(workdir, ignore_errors=True)
    pair = self.launch(f'sigterm_{which}', workdir)
    target = self.rng.randrange(1, self.args.steps - 2)
    pair.children[0].wait_for_line(f'step {target}/', fd.CHILD_TIMEOUT_S)
    time.sleep(self.rng.uniform(0.0, self.step_s))
    victims = range(PROCESSES) if which == 'all' else [self.rng.randrange(PROCESSES)]
    for i in victims:
      pair.children[i].proc.send_signal(signal.SIGTERM)
    results = pair.finish()
    saved = [next((int(l.split()[3]) for l in c.stdout_lines() if l.startswith('SIGTERM: saved')),
                  None) for c in pair.children]
    steps, tmp = fd.checkpoint_dirs(workdir)
    out = {'signalled': list(victims), 'exit_codes': [rc for rc, _ in results],
           'hung': any(h for _, h in results), 'saved_steps': saved,
           'checkpoints_on_disk': steps, 'tmp_dirs_left': tmp}
    out['relaunch'] = self.run_to_end(f'sigterm_{which}_relaunch', workdir)
    out['ok'] = (out['exit_codes'] == [0, 0] and not out['hung'] and saved[0] is not None
                 and saved[0] == saved[1] and saved[0] in steps and not tmp
                 and out['relaunch']['resumed_from'] == saved[0]
                 and out['relaunch']['final_equal'])
    self.check(out['ok'], f'SIGTERM to {which}: {out}')
    self.log(f'SIGTERM to {which}: {out}')
    return out

  # -- corruption ---------------------------------------------------------------

  def corruption_trial(self, kind: str) -> dict:
    workdir = os.path.join(self.root, f'mp_corrupt_{kind}')
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(self.reference_dir, workdir)
    last = self.args.steps
    step_dir = os.path.join(workdir, 'checkpoints', str(last))
    if kind == 'flip_unread':
      target = os.path.join(step_dir, 'state', '_sharding')
    elif kind == 'truncate_unread':
      target = os.path.join(step_dir, 'state', 'commit_success.txt')
    else:  # array data: the largest file
      files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, 'state'))
               for f in fs if '/d/' in os.path.join(d, f)]
      target = max(files, key=os.path.getsize)
    data = bytearray(open(target, 'rb').read())
    if kind == 'truncate_unread':
      data = data[:len(data) // 2]
    else:
      data[len(data) // 2] ^= 0x20
    with open(target, 'wb') as f:
      f.write(bytes(data))
    # The relaunch of the finished run finds its newest step corrupt: it must fall back
    # to the step before, say so, and train the last step again to the same result.
    out = {'file': os.path.relpath(target, step_dir), 'change': kind}
    out['relaunch'] = self.run_to_end(f'corrupt_{kind}', workdir)
    with open(os.path.join(self.logs, f'corrupt_{kind}.p0.stderr'), encoding='utf-8',
              errors='replace') as f:
      pair_stderr = f.read()
    out['detected'] = (f'step {last}' in pair_stderr and 'corrupt' in pair_stderr
                       and out['relaunch']['resumed_from'] == last - 1)
    quarantined = [n for n in os.listdir(os.path.join(workdir, 'checkpoints'))
                   if n.startswith(f'{last}.corrupt-')]
    out['kept_as'] = quarantined
    out['ok'] = out['detected'] and out['relaunch']['final_equal'] and bool(quarantined)
    self.check(out['ok'], f'corruption {kind}: {out}')
    self.log(f'corruption {kind}: {out}')
    return out

  # -- all ----------------------------------------------------------------------

  @property
  def exit_bound_s(self) -> float:
    return PEER_TIMEOUT_S + EXIT_SLACK_S

  def run(self) -> dict:
    self.reference()
    trials = [self.kill_trial(k) for k in range(1, self.args.trials + 1)]
    sigterm = {w: self.sigterm_trial(w) for w in ('all', 'one')}
    corruption = [self.corruption_trial(k) for k in ('flip_unread', 'truncate_unread', 'flip_data')]
    exits = [t['survivor_exit_s'] for t in trials]
    out = {'trials': len(trials), 'peer_failure_timeout_s': PEER_TIMEOUT_S,
           'exit_bound_s': self.exit_bound_s, 'max_exit_s': max(exits, default=0.0),
           'hangs': sum(t['hung'] for t in trials),
           'kills_with_save_in_flight': sum(t['save_in_flight'] for t in trials),
           'killed_process_counts': [sum(t['killed_process'] == p for t in trials)
                                     for p in range(PROCESSES)],
           'lost_steps': sum(t['lost_steps'] for t in trials),
           'final_params_equal': all(t['relaunch']['final_equal'] for t in trials)
           and all(s['relaunch']['final_equal'] for s in sigterm.values())
           and all(c['relaunch']['final_equal'] for c in corruption),
           'corruptions_planted': len(corruption),
           'corruptions_detected': sum(c['detected'] for c in corruption),
           'sigterm_all': sigterm['all'], 'sigterm_one': sigterm['one'],
           'kill_trials': trials, 'corruptions': corruption, 'failures': self.failures}
    out['ok'] = not self.failures
    return out


def format_rows(r: dict) -> list[tuple[str, str, str]]:
  """Rows for fault_drill.format_table."""
  def mark(ok):
    return 'ok  ' if ok else 'FAIL'
  rows = [(mark(r['hangs'] == 0 and r['max_exit_s'] <= r['exit_bound_s']
                and r['final_params_equal'] and r['lost_steps'] == 0),
           f'2 processes: kill -9 x{r["trials"]}',
           f'survivor exit <= {r["max_exit_s"]:.1f} s (bound {r["exit_bound_s"]} s), hangs '
           f'{r["hangs"]}, lost steps {r["lost_steps"]}, killed per process '
           f'{r["killed_process_counts"]}, {r["kills_with_save_in_flight"]} during a save, '
           f'final state bit-equal {r["final_params_equal"]}')]
  for which in ('all', 'one'):
    s = r[f'sigterm_{which}']
    rows.append((mark(s['ok']), f'2 processes: SIGTERM to {which}',
                 f'exit {s["exit_codes"]}, saved steps {s["saved_steps"]}, relaunch resumed '
                 f'from {s["relaunch"]["resumed_from"]}, equal {s["relaunch"]["final_equal"]}'))
  rows.append((mark(r['corruptions_detected'] == r['corruptions_planted']),
               '2 processes: corrupt checkpoint',
               f'{r["corruptions_detected"]}/{r["corruptions_planted"]} detected ('
               + ', '.join(f'{c["change"]} {c["file"]}' for c in r['corruptions']) + ')'))
  return rows
