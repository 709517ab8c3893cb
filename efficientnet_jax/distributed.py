"""Multi-process runs on JAX's distributed runtime, and what each process does when another is lost.

Every host of a pod or cluster job runs `train.py`; `initialize` connects the
processes through `jax.distributed` (the coordination service runs inside
process 0). The knobs, all JAX's own:

* `heartbeat_timeout_seconds` = `config.peer_failure_timeout_s`: the
  coordination service declares a process dead once it has sent no heartbeat
  for this long (JAX's default is 100 s; pods keep it, tests and the fault
  drill use a few seconds).
* `jax_enable_recoverability`: the service then leaves the decision to the
  surviving processes instead of aborting them with a C++ `LOG(FATAL)` and a
  stack dump. `PeerWatch`, a daemon thread, asks the service which processes
  are alive (`get_live_nodes`); when one is missing it prints one line naming
  it and ends this process with `EXIT_PEER_LOST`, also while the main thread
  waits in a collective that will never complete. No checkpoint is written on
  the way out (a save in flight never reaches its commit: orbax commits only
  after every process has written its part).
* Process 0 hosts the service. When it is the one lost, every other process's
  next RPC fails and JAX itself terminates it at once (SIGABRT, exit status
  134, "Terminating process because the JAX distributed service detected fatal
  errors ... the leader task ...").

Recoverability removes the shutdown barrier too, so `finish` does it: all
processes meet at a barrier, the others disconnect, and process 0 stops the
service only when they are gone (otherwise a slower process would lose the
service under it and abort).

SIGTERM: in a multi-process run JAX's preemption notifier owns the signal, and
the train loop stops at the step the processes agree on
(`runtime.Preemption.stop_at`), so SIGTERM to any one process gives one
checkpoint of one step on all of them.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax

EXIT_PEER_LOST = 75  # EX_TEMPFAIL: a cluster manager may relaunch the job
_FINISH_TIMEOUT_S = 600


def _poll_s(timeout_s: float) -> float:
  # Each poll is an RPC of every process to the coordinator: on a pod of
  # thousands of hosts at the default 100 s timeout, one every 5 s.
  return min(5.0, max(0.5, timeout_s / 20))


def _client():
  # jax.distributed has no public handle on its client (jax 0.10.2); JAX's own
  # multihost_utils and orbax reach it the same way.
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, peer_failure_timeout_s: int) -> 'PeerWatch':
  """`jax.distributed.initialize` with the peer-failure timeout; starts and returns the watch.

  Without arguments JAX finds the cluster from its environment (TPU pods, SLURM).
  """
  if peer_failure_timeout_s < 1:
    raise ValueError(f'peer_failure_timeout_s={peer_failure_timeout_s}; accepted: >= 1 s')
  jax.config.update('jax_enable_recoverability', True)
  jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                             process_id=process_id,
                             heartbeat_timeout_seconds=int(peer_failure_timeout_s))
  watch = PeerWatch(jax.process_count(), jax.process_index(), peer_failure_timeout_s)
  watch.start()
  return watch


class PeerWatch:
  """Ends this process with one line and EXIT_PEER_LOST when the service misses a peer.

  `get_live_nodes` answers once every live process has asked (a rendezvous),
  and at once when the service has declared one dead, so the processes' watch
  threads poll in step with each other.
  """

  def __init__(self, num_processes: int, process_index: int, timeout_s: float):
    self.num_processes, self.process_index, self.timeout_s = num_processes, process_index, timeout_s
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='PeerWatch', daemon=True)

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    # No join: `get_live_nodes` is a rendezvous of the live processes, so the
    # thread may wait in one until the other processes call it or disconnect.
    self._stop.set()

  def wait_for_loss(self) -> None:
    """After a failed collective: gives the watch time to name a lost peer (and exit).

    A peer killed outright closes its sockets, so the collective fails at once,
    before the service has missed any heartbeat. Returns if no peer is lost.
    """
    if not self._stop.is_set():
      self._thread.join(timeout=self.timeout_s + 4 * _poll_s(self.timeout_s))

  def _run(self) -> None:
    everyone = list(range(self.num_processes))
    client = _client()
    while not self._stop.wait(_poll_s(self.timeout_s)):
      try:
        live = set(client.get_live_nodes(everyone))
      except Exception as e:  # pylint: disable=broad-except
        if self._stop.is_set():
          return
        _lost(f'the coordination service (process 0) is unreachable: '
              f'{str(e).splitlines()[0][:200]}')
      # This process disappears from the list once it shuts down its own client.
      missing = [p for p in everyone if p not in live and p != self.process_index]
      if missing and not self._stop.is_set():
        _lost(f'process{"es" * (len(missing) > 1)} {", ".join(map(str, missing))} of '
              f'{self.num_processes} stopped (no heartbeat for {self.timeout_s:g} s, '
              f'config.peer_failure_timeout_s)')


def _lost(what: str) -> None:
  print(f'error: process {jax.process_index()}: {what}; stopping without saving, '
        f'relaunch every process to resume from the last checkpoint', file=sys.stderr,
        flush=True)
  os._exit(EXIT_PEER_LOST)  # the main thread may be inside a collective that never returns


def agreed_step(step: int | None) -> int | None:
  """The newest checkpoint step every process sees (the smallest of their newest ones)."""
  if jax.process_count() == 1:
    return step
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  steps = multihost_utils.process_allgather(np.int64(-1 if step is None else step))
  agreed = int(np.min(steps))
  return None if agreed < 0 else agreed


def finish(watch: 'PeerWatch | None') -> None:
  """Leaves the job together: barrier, the others disconnect, then process 0 stops the service."""
  if watch is None:
    return
  watch.stop()
  client = _client()
  client.wait_at_barrier('efficientnet_jax_finish', _FINISH_TIMEOUT_S * 1000)
  if jax.process_index() != 0:
    jax.distributed.shutdown()
    return
  everyone = list(range(jax.process_count()))  # the asking process must be in the list
  deadline = time.monotonic() + _FINISH_TIMEOUT_S
  while time.monotonic() < deadline and set(client.get_live_nodes(everyone)) - {0}:
    time.sleep(0.05)
  jax.distributed.shutdown()
