"""Settings that make XLA:CPU (and other frameworks) faster on Linux.

glibc's malloc (`tune_malloc`, below) and the LLVM optimisation level of the
CPU train step (`train_compiler_options`). Also `host_info`: the machine facts
that benchmark and experiment reports record.

glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on
free, so each step of a CPU training loop page-faults its activations in again
(the kernel zeroes every 4 KiB page). On the 2-core benchmark machine that made
an XLA elementwise pass over a 58 MB tensor 4-6x slower than numpy writing into
a reused buffer, and the whole B0 train step ~1.7x slower. Keeping freed memory
in the heap removes the faults; the price is that the process keeps its peak
footprint (which ru_maxrss reports anyway).

What this does not reach: a thread that glibc put on one of its per-thread
arenas gets a block larger than the arena's 64 MiB heap from mmap whatever
M_MMAP_MAX says, and unmaps it on free. Whether XLA:CPU's step buffers land
there varies from process to process: on the AVX-512 2-core machine
(2026-11-26) the B0 train step ran at 2.2 s in some benchmark rounds and 4-6 s
in others, its resident memory swinging by 3.6 GB within a step. One arena
for all threads (MALLOC_ARENA_MAX=1) held it at 2.1-2.2 s but let the heap
grow to 13-20 GB resident by fragmentation, so it is not set here.

The per-thread arenas are reached because JAX dispatches CPU computations
asynchronously: a worker thread runs the step and allocates its buffers.
`run_cpu_computations_inline` runs them on the calling (main) thread, whose
arena obeys the settings above. On the 2-core AVX-512 Xeon (2026-12-05, B0
train step at 224 px, batch 32; `train_page_faults` of scripts/benchmark.py
with `ours:dispatch=async` against `ours`): 556,905 minor page faults per step
before, none after. The trim
threshold must also be infinite rather than 2 GiB - 1: B0's step frees ~2.2 GB
at the heap top, and a finite threshold handed it back to the OS every step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

# The same setting as environment variables, for processes started from a shell
# (glibc reads them at start-up): `env $(python -c ...) python train.py`.
# (glibc's tunable is a size_t; 2**62 bytes is never reached, i.e. no trimming.)
MALLOC_ENV = {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(2**62)}


def tune_malloc() -> bool:
  """Stops glibc from returning large blocks to the OS; call before the first big allocation.

  Returns:
    True if glibc accepted the settings (False on other C libraries, e.g. musl
    or macOS, where this does nothing).
  """
  name = ctypes.util.find_library('c')
  if not name or os.name != 'posix':
    return False
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  # No mmap for large blocks (they come from the heap and are reused), and
  # never trim the heap top back to the OS (-1: "disables trimming completely",
  # mallopt(3)).
  return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def run_cpu_computations_inline() -> None:
  """Runs single-device CPU computations on the thread that calls them.

  JAX's default (`jax_cpu_enable_async_dispatch`) hands each one to a worker
  thread, whose glibc arena serves large buffers from mmap (module docstring).
  A training loop waits for every step anyway, so nothing is lost; GPU and TPU
  backends ignore the setting, and multi-device CPU computations still run
  on JAX's thread pool. JAX reads it when it creates the CPU client: call this
  before the first computation.
  """
  import jax  # pylint: disable=g-import-not-at-top  (this module imports no framework)
  jax.config.update('jax_cpu_enable_async_dispatch', False)


def tune_process() -> bool:
  """`tune_malloc` and `run_cpu_computations_inline`: call first in a training process."""
  tuned = tune_malloc()
  run_cpu_computations_inline()
  return tuned


# LLVM optimisation level of the train step on CPU, where XLA's default is 3.
# Compiling is ~one LLVM pipeline per fused kernel (1,410 in B0's step); -O1
# cut B0's step compile (224 px, batch 32) by 0.5-1.2 s, to 8.9-9.5 s, at the
# same step time (2-core Xeon, 2026-11-26; README, Performance).
CPU_TRAIN_OPT_LEVEL = 1
OPT_LEVELS = (0, 1, 2, 3)


def train_compiler_options(platform: str, opt_level: int = CPU_TRAIN_OPT_LEVEL
                           ) -> dict | None:
  """`jax.jit(compiler_options=...)` for a train step compiled for `platform`.

  LLVM -O`opt_level` on 'cpu'; None (XLA's defaults) on accelerators, whose
  kernels are not compiled by this LLVM pipeline.
  """
  if isinstance(opt_level, bool) or opt_level not in OPT_LEVELS:
    raise ValueError(f'cpu_train_opt_level={opt_level!r}; accepted: 0, 1, 2 or 3 '
                     '(an LLVM optimisation level)')
  if platform != 'cpu':
    return None
  return {'xla_backend_optimization_level': opt_level}


def host_info() -> dict:
  """{'cpus', 'python'} and, where Linux tells, 'cpu' (model name), 'mem_gib' and 'loadavg'."""
  info = {'cpus': os.cpu_count(), 'python': sys.version.split()[0]}
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      info['cpu'] = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
    with open('/proc/meminfo', encoding='utf-8') as f:
      info['mem_gib'] = round(int(f.readline().split()[1]) / 2**20, 1)
    info['loadavg'] = os.getloadavg()
  except (OSError, StopIteration):
    pass
  return info
