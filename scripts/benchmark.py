"""EfficientNet train/eval throughput, compile time and peak memory, side by side with peers.

Systems (`--systems`, comma separated, each `name[:key=value[,key=value]]`):
  ours          this repository's model and `steps.train_step` (RMSProp, EMA,
                label smoothing); eval is `model.infer` (micro-batched on
                CPU). Options are `create_model` keywords, e.g. `ours:remat=1`,
                `ours:scan_blocks=1`, `ours:bn_impl=flax`, and `infer_chunk=N`
                (images per inference micro-batch, 0: whole batch), and
                `state_layout=flat|per_leaf` (optimizer slots and EMA; default
                flat, as train.py on one device), and `cpu_train_opt_level=N`
                (LLVM level of the train step on CPU; default 1, as train.py),
                and `dispatch=inline|async` (CPU computations on the calling
                thread, as train.py, or JAX's async dispatch; cpu_tuning.py).
  keras_jax     Keras 3 `keras.applications` EfficientNet on the JAX backend.
  keras_tf      ... on the TensorFlow backend, TF's own (oneDNN) kernels.
  keras_tf_xla  ... on the TensorFlow backend with `jit_compile=True`.
  torch         PyTorch + timm (skipped unless both are importable).
`torch:autocast=bfloat16` runs PyTorch's forward under `torch.autocast` (mixed
precision; compare with `ours:dtype=bfloat16`).
Every system also takes `malloc=default|tuned`, `threads=N` (pin the worker
to N cores), `xla=FLAG+FLAG` (extra XLA_FLAGS) and, for the peers,
`arch=KerasClassName` (e.g. `keras_tf:arch=ResNet152`).

Each system runs in its own worker process, so peak memory (ru_maxrss) is its
own and every framework gets its own threads and allocator settings. All
workers compile first, one at a time; then the timed steps run in
interleaved rounds (the order rotates each round), so load from other jobs
on a shared machine hits every system alike. Each turn starts with
`--turn_warmup` untimed steps: a process whose memory the kernel handed back
while another system ran (our B0 step's 3.6 GB of buffers, re-faulted at up
to 2x the step time) is timed warm, as a training job that owns its cores
runs. Step time = the median over rounds of (wall time of `--steps` steps
with one host sync at the end) / steps. `--isolate` runs the systems one after another instead
(lower memory).

Memory: `peak_rss_mb` is the worker's ru_maxrss; `info.train_xla_memory_mb` is
XLA's buffer assignment for our train step (arguments, outputs, temporaries),
known at compile time, so `--compile_only` already shows what remat saves.

Model FLOP utilisation (the table's MFU, `model_mfu`): the architecture's
multiply-adds (x2, x3 for a train step) / step time / a measured fp32 matmul
peak, the same count for every system. `mfu` in the JSON uses XLA's cost
analysis of our compiled step instead, which does not see the flops inside
oneDNN's custom calls.

  .venv/bin/python scripts/benchmark.py                        # B0 224, train b32, eval b64
  .venv/bin/python scripts/benchmark.py --json                 # one JSON object on stdout
  .venv/bin/python scripts/benchmark.py --model b4 --image_size 380 --train_batch 16 \\
      --modes train --systems ours,ours:remat=1 --isolate
  .venv/bin/python scripts/benchmark.py --model b7 --modes train --train_batch 1 \\
      --systems ours,ours:scan_blocks=1 --compile_only
  .venv/bin/python scripts/benchmark.py --latency              # paper Table 4 + B0-B7 table
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PEERS = ('keras_jax', 'keras_tf', 'keras_tf_xla', 'torch')
SYSTEMS = ('ours',) + PEERS
DEFAULT_SYSTEMS = 'ours,keras_jax,keras_tf,keras_tf_xla,torch'
_REPLY = '@@benchmark '  # prefix of protocol lines; frameworks also print to stdout

# cpu_tuning imports no framework: MALLOC_ENV (glibc: serve big blocks from the reused
# heap, never trim it) and host_info.
from efficientnet_jax import cpu_tuning  # noqa: E402

KERAS_NAMES = {f'b{i}': f'EfficientNetB{i}' for i in range(8)}
KERAS_NAMES.update({'v2_s': 'EfficientNetV2S', 'v2_m': 'EfficientNetV2M',
                    'v2_l': 'EfficientNetV2L'})
KERAS_NAMES.update({f'v2_b{i}': f'EfficientNetV2B{i}' for i in range(4)})
TIMM_NAMES = {f'b{i}': f'efficientnet_b{i}' for i in range(8)}
TIMM_NAMES.update({'v2_s': 'tf_efficientnetv2_s', 'v2_m': 'tf_efficientnetv2_m',
                   'v2_l': 'tf_efficientnetv2_l'})
TIMM_NAMES.update({f'v2_b{i}': f'tf_efficientnetv2_b{i}' for i in range(4)})
# `make bench-peers` installs PyTorch (CPU) + timm here, outside the venv: a peer to
# measure against, never a dependency, and the tests run without it as CI does.
PEERS_DIR = os.path.join(ROOT, '.peers')


# ----------------------------------------------------------------------------- system specs


def parse_system(spec: str) -> tuple[str, dict[str, str]]:
  """'ours:remat=1,xla=--a=1+--b=2' -> ('ours', {'remat': '1', 'xla': '--a=1+--b=2'})."""
  name, _, rest = spec.partition(':')
  if name not in SYSTEMS:
    raise ValueError(f'system {name!r}; accepted: {", ".join(SYSTEMS)}')
  options = {}
  for item in filter(None, rest.split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'{spec!r}: options are key=value')
    options[key] = value
  return name, options


def split_systems(text: str) -> list[str]:
  """'ours,ours:a=1,b=2,keras_tf' -> ['ours', 'ours:a=1,b=2', 'keras_tf'].

  Options use commas too, so a new system starts only at a known system name.
  """
  specs: list[str] = []
  for token in filter(None, text.split(',')):
    if token.partition(':')[0] in SYSTEMS or not specs:
      specs.append(token)
    else:
      specs[-1] += ',' + token
  return specs


def _literal(value: str) -> Any:
  """CLI option values: ints, floats and booleans as such, the rest as strings."""
  lowered = value.lower()
  if lowered in ('true', 'false'):
    return lowered == 'true'
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return value


def worker_env(options: dict[str, str], malloc: str, xla_flags: str) -> dict[str, str]:
  env = dict(os.environ)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  env['CUDA_VISIBLE_DEVICES'] = env.get('CUDA_VISIBLE_DEVICES', '')
  for key in cpu_tuning.MALLOC_ENV:
    env.pop(key, None)
  if options.get('malloc', malloc) == 'tuned':
    env.update(cpu_tuning.MALLOC_ENV)
  flags = ' '.join(filter(None, [env.get('XLA_FLAGS', ''), xla_flags,
                                 options.get('xla', '').replace('+', ' ')]))
  if flags:
    env['XLA_FLAGS'] = flags
  return env


# ----------------------------------------------------------------------------- workers


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Runner:
  """One system inside a worker: builds, compiles and steps it."""

  compile_s: dict[str, float]
  info: dict[str, Any]

  def setup(self, cfg: dict, modes: list[str]) -> None:
    raise NotImplementedError

  def run(self, mode: str, steps: int) -> None:
    """Runs `steps` steps of `mode`, blocking on the result only after the last."""
    raise NotImplementedError


def _images(rng, batch: int, size: int, low: float, high: float):
  import numpy as np
  return rng.uniform(low, high, (batch, size, size, 3)).astype(np.float32)


def _labels(batch: int, classes: int):
  import numpy as np
  return np.eye(classes, dtype=np.float32)[np.arange(batch) % classes]


class OursRunner(Runner):
  """`create_model` + `steps.train_step` / `model.apply`, jitted with donation."""

  def setup(self, cfg, modes):
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from efficientnet_jax import optim
    from efficientnet_jax import state as state_lib
    from efficientnet_jax import steps
    from efficientnet_jax.model import create_model
    from efficientnet_jax.model import infer

    dispatch = cfg['options'].get('dispatch', 'inline')
    if dispatch not in ('inline', 'async'):
      raise ValueError(f'dispatch={dispatch!r}; accepted: inline, async')
    if dispatch == 'inline':  # before the CPU client exists, as train.py
      cpu_tuning.run_cpu_computations_inline()
    if cfg.get('cache_dir'):
      jax.config.update('jax_compilation_cache_dir', cfg['cache_dir'])
      jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    self.info = {'import_rss_mb': round(_rss_mb()), 'device': str(jax.devices()[0]),
                 'matmul_gflops': round(matmul_peak_gflops(), 1)}
    kwargs = {k: _literal(v) for k, v in cfg['options'].items()
              if k not in ('malloc', 'threads', 'xla', 'infer_chunk', 'state_layout',
                           'cpu_train_opt_level', 'dispatch')}

    # What train.py uses on one device ('auto' -> flat); 'per_leaf' is the sharded runs'.
    layout = cfg['options'].get('state_layout', 'flat')
    infer_chunk = _literal(cfg['options'].get('infer_chunk', 'auto'))
    # What train.py compiles the step with (config.cpu_train_opt_level).
    compiler_options = cpu_tuning.train_compiler_options(
        jax.default_backend(),
        _literal(cfg['options'].get('cpu_train_opt_level', str(cpu_tuning.CPU_TRAIN_OPT_LEVEL))))
    if 'dtype' in kwargs:
      kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
    model = create_model(cfg['model'], num_classes=1000, **kwargs)
    size, rng = cfg['image_size'], np.random.default_rng(0)
    self.compile_s, self.flops, self._fns = {}, {}, {}
    if 'train' in modes:
      batch = cfg['train_batch']
      tx = optim.make_optimizer(name='rmsprop', learning_rate=0.016 * batch / 256,
                                weight_decay=1e-5, weight_decay_mask=optim.weight_decay_mask,
                                flat=layout == 'flat')
      init = functools.partial(state_lib.create_train_state, model=model, tx=tx, image_size=size,
                               layout=layout)
      if cfg.get('compile_only'):  # shapes suffice; B7's state alone is ~1 GB
        state = jax.eval_shape(init, jax.random.key(0))
      else:
        state = jax.jit(init)(jax.random.key(0))
      data = {'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
              'label': jax.ShapeDtypeStruct((batch, 1000), jnp.float32)}
      if not cfg.get('compile_only'):
        data = {'image': jnp.asarray(_images(rng, batch, size, -2, 2)),
                'label': jnp.asarray(_labels(batch, 1000))}
      step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, ema_decay=0.9999,
                                       label_smoothing=0.1), donate_argnums=0,
                     compiler_options=compiler_options)
      lowered = step.lower(state, data, jax.random.key(1))
      start, cpu = time.perf_counter(), time.process_time()
      compiled = lowered.compile()
      self.compile_s['train'] = time.perf_counter() - start
      self.info['train_compile_cpu_s'] = round(time.process_time() - cpu, 1)
      self.flops['train'] = _cost_flops(compiled)
      self.info['train_xla_memory_mb'] = _xla_memory_mb(compiled)
      # Kernels XLA compiles one by one (loop and library fusions): compile time follows them.
      self.info['train_kernels'] = compiled.as_text().count(' fusion(')
      self._train = [compiled, state, data, jax.random.key(1)]
    if 'eval' in modes:
      batch = cfg['eval_batch']
      variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, 3))))(
          jax.random.key(0))
      images = jnp.asarray(_images(rng, batch, size, -2, 2))
      lowered = jax.jit(lambda v, x: infer(model, v, x, chunk=infer_chunk)).lower(
          variables, images)
      start, cpu = time.perf_counter(), time.process_time()
      compiled = lowered.compile()
      self.compile_s['eval'] = time.perf_counter() - start
      self.info['eval_compile_cpu_s'] = round(time.process_time() - cpu, 1)
      self.flops['eval'] = _cost_flops(compiled)
      self._eval = (compiled, variables, images)
    self.info['flops_per_step'] = self.flops

  def run(self, mode, steps):
    import jax
    if mode == 'train':
      compiled, state, data, key = self._train
      for _ in range(steps):
        state, metrics = compiled(state, data, key)  # no host sync inside the loop
      jax.block_until_ready(metrics)
      self._train[1] = state
    else:
      compiled, variables, images = self._eval
      for _ in range(steps):
        out = compiled(variables, images)
      jax.block_until_ready(out)


def _cost_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost['flops'])
  except Exception:  # noqa: BLE001  (cost analysis is best effort)
    return None


def _xla_memory_mb(compiled) -> dict | None:
  """XLA's buffer assignment for one step: arguments, outputs and temporaries (the
  activations kept for the backward live there), in MB. Known at compile time, so
  `--compile_only` shows what remat saves without running a step."""
  try:
    m = compiled.memory_analysis()
    return {'argument': round(m.argument_size_in_bytes / 2**20),
            'output': round(m.output_size_in_bytes / 2**20),
            'alias': round(m.alias_size_in_bytes / 2**20),
            'temp': round(m.temp_size_in_bytes / 2**20)}
  except Exception:  # noqa: BLE001  (best effort, like the cost analysis)
    return None


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Best fp32 GFLOP/s of an n x n matmul on the default JAX device."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e9


class KerasRunner(Runner):
  """keras.applications model with compile(jit_compile=...) + train_on_batch / predict_on_batch."""

  def __init__(self, backend: str, jit_compile: bool):
    self.backend, self.jit_compile = backend, jit_compile

  def setup(self, cfg, modes):
    import numpy as np
    if self.backend == 'tensorflow':
      import tensorflow as tf
      threads = int(cfg['options'].get('threads', 0))
      if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    assert keras.backend.backend() == self.backend, keras.backend.backend()
    self.info = {'import_rss_mb': round(_rss_mb()), 'keras': keras.__version__}
    arch = cfg['options'].get('arch') or KERAS_NAMES.get(cfg['model'])
    if arch is None:
      raise ValueError(f'no keras.applications model for {cfg["model"]!r}')
    self.info['arch'] = arch
    size, rng = cfg['image_size'], np.random.default_rng(0)
    model = getattr(keras.applications, arch)(weights=None, input_shape=(size, size, 3),
                                               classes=1000)
    # The official recipe's optimizer and loss (TF1 RMSProp, label smoothing 0.1).
    model.compile(optimizer=keras.optimizers.RMSprop(0.016 * cfg['train_batch'] / 256, rho=0.9,
                                                     momentum=0.9, epsilon=1e-3),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
                  jit_compile=self.jit_compile)
    self.model, self.first_call_s, self.compile_s = model, {}, {}
    to_tensor = keras.ops.convert_to_tensor
    if 'train' in modes:  # keras.applications models rescale 0-255 inputs themselves
      self._x = to_tensor(_images(rng, cfg['train_batch'], size, 0, 255))
      self._y = to_tensor(_labels(cfg['train_batch'], 1000))
      start = time.perf_counter()
      model.train_on_batch(self._x, self._y)  # traces and compiles, then steps once
      self.first_call_s['train'] = time.perf_counter() - start
    if 'eval' in modes:
      self._xe = to_tensor(_images(rng, cfg['eval_batch'], size, 0, 255))
      start = time.perf_counter()
      model.predict_on_batch(self._xe)
      self.first_call_s['eval'] = time.perf_counter() - start

  def run(self, mode, steps):
    # Both return numpy, so every step ends with a host sync (Keras' own loop).
    for _ in range(steps):
      if mode == 'train':
        self.model.train_on_batch(self._x, self._y)
      else:
        self.model.predict_on_batch(self._xe)


def _import_torch_peer():
  """torch and timm, from the venv or else from `.peers/` (`make bench-peers`)."""
  if os.path.isdir(PEERS_DIR) and PEERS_DIR not in sys.path:
    sys.path.append(PEERS_DIR)  # appended: the venv's own packages win
  try:
    import torch
  except ImportError as e:
    raise ImportError('PyTorch is not installed; `make bench-peers` installs it and timm '
                      f'into {PEERS_DIR}') from e
  try:
    import torchvision  # noqa: F401
  except ImportError:
    _stand_in_for_torchvision()
  import timm
  return torch, timm


def _stand_in_for_torchvision() -> None:
  """Placeholder `torchvision.*` modules, enough for `import timm`.

  timm imports transforms, `InterpolationMode` and `FrozenBatchNorm2d` from
  torchvision at import time; its EfficientNet models use none of them. The
  registry's torchvision wheels are built against other torch builds than the
  CPU wheel, so none is installed.
  """
  import enum
  import importlib.abc
  import importlib.machinery
  import types

  class InterpolationMode(enum.Enum):
    NEAREST, BILINEAR, BICUBIC = 'nearest', 'bilinear', 'bicubic'
    BOX, HAMMING, LANCZOS = 'box', 'hamming', 'lanczos'

  class Placeholder:
    def __init__(self, *args, **kwargs):
      del args, kwargs

  class PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
      if name.startswith('__'):
        raise AttributeError(name)
      return InterpolationMode if name == 'InterpolationMode' else Placeholder

  class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
      del path, target
      if name.split('.')[0] != 'torchvision':
        return None
      return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
      module = PlaceholderModule(spec.name)
      module.__path__ = []
      return module

    def exec_module(self, module):
      del module

  sys.meta_path.insert(0, Finder())


class TorchRunner(Runner):
  """timm model, channels_last, eager (PyTorch's fastest CPU training mode)."""

  def setup(self, cfg, modes):
    import numpy as np
    torch, timm = _import_torch_peer()
    threads = int(cfg['options'].get('threads', 0))
    if threads:
      torch.set_num_threads(threads)
    self.info = {'import_rss_mb': round(_rss_mb()), 'torch': torch.__version__,
                 'timm': timm.__version__}
    arch = cfg['options'].get('arch') or TIMM_NAMES[cfg['model']]
    self.info['arch'] = arch
    self.cfg_options = cfg['options']
    size, rng = cfg['image_size'], np.random.default_rng(0)
    model = timm.create_model(arch, num_classes=1000).to(memory_format=torch.channels_last)
    self.torch, self.model, self.first_call_s, self.compile_s = torch, model, {}, {}
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)
    if 'train' in modes:
      self._x = nchw(_images(rng, cfg['train_batch'], size, -2, 2))
      self._y = torch.from_numpy(np.arange(cfg['train_batch']) % 1000)
      self.opt = torch.optim.RMSprop(model.parameters(), lr=0.016 * cfg['train_batch'] / 256,
                                     alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-5)
      self.loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
      start = time.perf_counter()
      self.run('train', 1)
      self.first_call_s['train'] = time.perf_counter() - start
    if 'eval' in modes:
      self._xe = nchw(_images(rng, cfg['eval_batch'], size, -2, 2))
      start = time.perf_counter()
      self.run('eval', 1)
      self.first_call_s['eval'] = time.perf_counter() - start

  def run(self, mode, steps):
    torch = self.torch
    # `torch:autocast=bfloat16`: PyTorch's mixed precision (bf16 convs and matmuls, fp32
    # weights and reductions), its counterpart of our `ours:dtype=bfloat16`.
    autocast = self.cfg_options.get('autocast', '')
    precision = (torch.autocast('cpu', dtype=getattr(torch, autocast)) if autocast
                 else contextlib.nullcontext())
    for _ in range(steps):
      if mode == 'train':
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        with precision:
          loss = self.loss(self.model(self._x), self._y)
        loss.backward()
        self.opt.step()
      else:
        self.model.eval()
        with torch.inference_mode(), precision:
          self.model(self._xe)


def make_runner(name: str) -> Runner:
  if name == 'ours':
    return OursRunner()
  if name == 'keras_jax':
    return KerasRunner('jax', True)
  if name == 'keras_tf':
    return KerasRunner('tensorflow', False)
  if name == 'keras_tf_xla':
    return KerasRunner('tensorflow', True)
  return TorchRunner()


def worker_main(cfg: dict) -> None:
  """Serves `setup`, `run` and `finish` commands (one JSON object per stdin line)."""
  out = sys.stdout
  sys.stdout = sys.stderr  # framework chatter must not interleave with replies

  def reply(obj):
    out.write(_REPLY + json.dumps(obj) + '\n')
    out.flush()

  threads = int(cfg['options'].get('threads', 0))
  if threads:  # before any framework creates its thread pools
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))
  if cfg['malloc'] == 'tuned':
    from efficientnet_jax import cpu_tuning
    cpu_tuning.tune_malloc()  # glibc read MALLOC_* already; this also covers late starts
  runner = None
  for line in sys.stdin:
    cmd = json.loads(line)
    try:
      if cmd['cmd'] == 'setup':
        runner = make_runner(cfg['name'])
        runner.setup(cfg, cmd['modes'])
        reply({'compile_s': runner.compile_s,
               'first_call_s': getattr(runner, 'first_call_s', {}),
               'info': runner.info, 'rss_mb': round(_rss_mb())})
      elif cmd['cmd'] == 'run':
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        runner.run(cmd['mode'], cmd['steps'])
        reply({'seconds': time.perf_counter() - start,
               'minflt': resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults})
      elif cmd['cmd'] == 'finish':
        reply({'peak_rss_mb': round(_rss_mb())})
        return
    except Exception as e:  # noqa: BLE001  (reported to the parent, which skips the system)
      reply({'error': f'{type(e).__name__}: {e}'})
      if cmd['cmd'] == 'setup':
        return


class Worker:
  """Parent-side handle of a worker process."""

  def __init__(self, spec: str, cfg: dict, args):
    self.spec = spec
    self.name, self.options = parse_system(spec)
    self.cfg = dict(cfg, name=self.name, options=self.options,
                    malloc=self.options.get('malloc', args.malloc))
    env = worker_env(self.options, args.malloc, args.xla_flags)
    if self.name == 'keras_jax':
      env['KERAS_BACKEND'] = 'jax'
    elif self.name.startswith('keras_tf'):
      env['KERAS_BACKEND'] = 'tensorflow'
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(self.cfg)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr if args.verbose
        else subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    self.error: str | None = None
    self.setup: dict = {}
    self.seconds: dict[str, list[float]] = {}
    self.faults: dict[str, list[float]] = {}  # minor page faults per timed step

  def ask(self, cmd: dict, timeout: float) -> dict:
    try:
      self.proc.stdin.write(json.dumps(cmd) + '\n')
      self.proc.stdin.flush()
    except BrokenPipeError:  # it died between two questions, e.g. killed for memory
      return {'error': f'worker exited with code {self.proc.wait()}{_signal_note(self.proc)}'}
    deadline = time.monotonic() + timeout
    while True:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
        self.proc.kill()
        return {'error': f'no reply within {timeout:.0f} s'}
      line = self.proc.stdout.readline()
      if not line:
        return {'error': f'worker exited with code {self.proc.wait()}{_signal_note(self.proc)}'}
      if line.startswith(_REPLY):
        return json.loads(line[len(_REPLY):])

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.close()
      except OSError:
        pass
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.proc.kill()


# ----------------------------------------------------------------------------- driver


def _setup(worker: Worker, modes: list[str], args) -> None:
  reply = worker.ask({'cmd': 'setup', 'modes': modes}, args.timeout)
  if 'error' in reply:
    worker.error = reply['error']
    worker.close()
    return
  worker.setup = reply
  for mode in modes:  # warm-up: first executions, allocator and caches
    if args.warmup and not args.compile_only:
      reply = worker.ask({'cmd': 'run', 'mode': mode, 'steps': args.warmup}, args.timeout)
      if 'error' in reply:
        worker.error = reply['error']
        worker.close()
        return
  _log(args, f'{worker.spec}: ready, compile {worker.setup["compile_s"] or ""} '
             f'first call {worker.setup["first_call_s"] or ""}')


def _signal_note(proc: subprocess.Popen) -> str:
  if proc.returncode == -9:
    return ' (SIGKILL: out of memory? `--isolate` runs one system at a time)'
  return ''


def _timed_round(worker: Worker, modes: list[str], args) -> None:
  for mode in modes:
    if args.turn_warmup:  # untimed: page memory back in after another system's turn
      reply = worker.ask({'cmd': 'run', 'mode': mode, 'steps': args.turn_warmup}, args.timeout)
      if 'error' in reply:
        worker.error = reply['error']
        worker.close()
        return
    reply = worker.ask({'cmd': 'run', 'mode': mode, 'steps': args.steps}, args.timeout)
    if 'error' in reply:
      worker.error = reply['error']
      worker.close()
      return
    worker.seconds.setdefault(mode, []).append(reply['seconds'] / args.steps)
    worker.faults.setdefault(mode, []).append(reply['minflt'] / args.steps)


def _finish(worker: Worker, args) -> None:
  if worker.error is None:
    reply = worker.ask({'cmd': 'finish'}, 120)
    worker.setup['peak_rss_mb'] = reply.get('peak_rss_mb')
  worker.close()


def _log(args, message: str) -> None:
  if not args.quiet:
    print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


def run_benchmark(args) -> dict:
  """Starts one worker per system and returns the result dictionary."""
  from efficientnet_jax.model import architectures
  from efficientnet_jax import model_table

  modes = args.modes.split(',')
  spec = architectures.get_spec(args.model)
  size = args.image_size or spec.resolution
  cfg = {'model': args.model, 'image_size': size, 'train_batch': args.train_batch,
         'eval_batch': args.eval_batch, 'cache_dir': args.cache_dir,
         'compile_only': args.compile_only}
  specs = split_systems(args.systems)
  workers: list[Worker] = []
  if args.isolate:
    for s in specs:
      worker = Worker(s, cfg, args)
      workers.append(worker)
      _setup(worker, modes, args)
      for _ in range(0 if args.compile_only else args.rounds):
        if worker.error is None:
          _timed_round(worker, modes, args)
      _finish(worker, args)
  else:
    workers = [Worker(s, cfg, args) for s in specs]
    for worker in workers:  # compile one at a time: compile times must not contend
      _setup(worker, modes, args)
    live = [w for w in workers if w.error is None]
    for r in range(0 if args.compile_only else args.rounds):
      order = live[r % len(live):] + live[:r % len(live)] if live else []
      for worker in order:
        if worker.error is None:
          _timed_round(worker, modes, args)
      _log(args, f'round {r + 1}/{args.rounds} done')
    for worker in workers:
      _finish(worker, args)

  macs = model_table.count_macs(spec, size)
  peak = next((w.setup['info'].get('matmul_gflops') for w in workers
               if w.error is None and 'matmul_gflops' in w.setup.get('info', {})), None)
  batches = {'train': args.train_batch, 'eval': args.eval_batch}
  systems = {}
  for worker in workers:
    if worker.error is not None:
      systems[worker.spec] = {'skipped': worker.error}
      continue
    row: dict[str, Any] = {}
    for mode in modes:
      times = worker.seconds.get(mode)
      step_s = statistics.median(times) if times else None
      row[f'{mode}_img_s'] = round(batches[mode] / step_s, 2) if step_s else None
      row[f'{mode}_step_s'] = round(step_s, 4) if step_s else None
      row[f'{mode}_step_s_all'] = [round(t, 4) for t in times] if times else []
      # Pages the kernel had to map in (and zero) per step: memory handed back and re-faulted.
      faults = worker.faults.get(mode)
      row[f'{mode}_page_faults'] = round(statistics.median(faults)) if faults else None
      compile_s = worker.setup['compile_s'].get(mode)
      if compile_s is None and mode in worker.setup['first_call_s'] and step_s:
        # Peers compile inside their first call: first call minus one step.
        compile_s = max(0.0, worker.setup['first_call_s'][mode] - step_s)
      row[f'{mode}_compile_s'] = round(compile_s, 2) if compile_s is not None else None
      # 2 flops per multiply-add; a train step is ~3 forward passes.
      model_flops = 2 * macs * batches[mode] * (3 if mode == 'train' else 1)
      if step_s and peak:
        row[f'{mode}_model_mfu'] = round(model_flops / step_s / (peak * 1e9), 4)
        xla_flops = worker.setup['info'].get('flops_per_step', {}).get(mode)
        if xla_flops:
          row[f'{mode}_mfu'] = round(xla_flops / step_s / (peak * 1e9), 4)
    row['compile_s'] = row.get('train_compile_s', row.get('eval_compile_s'))
    row['peak_rss_mb'] = worker.setup.get('peak_rss_mb')
    row['info'] = worker.setup['info']
    systems[worker.spec] = row
  result = {
      'date': time.strftime('%Y-%m-%d %H:%M'), 'host': cpu_tuning.host_info(), 'model': args.model,
      'image_size': size, 'train_batch': args.train_batch, 'eval_batch': args.eval_batch,
      'malloc': args.malloc, 'xla_flags': args.xla_flags, 'warmup': args.warmup,
      'turn_warmup': args.turn_warmup,
      'steps': args.steps, 'rounds': args.rounds, 'interleaved': not args.isolate,
      'matmul_peak_gflops': peak, 'model_macs_per_image': macs, 'systems': systems}
  result['ratios'] = ratios(systems, modes)
  return result


def ratios(systems: dict, modes: list[str]) -> dict:
  """ours / peer images-per-second for every measured `ours*` x every measured peer."""
  out = {}
  mine = [s for s in systems if s.startswith('ours') and 'skipped' not in systems[s]]
  peers = [s for s in systems if not s.startswith('ours') and 'skipped' not in systems[s]]
  for m in mine:
    for p in peers:
      entry = {}
      for mode in modes:
        a, b = systems[m].get(f'{mode}_img_s'), systems[p].get(f'{mode}_img_s')
        if a and b:
          entry[mode] = round(a / b, 2)
      out[f'{m} / {p}'] = entry
  return out


def print_table(result: dict) -> None:
  print(f'{result["model"]} @ {result["image_size"]} px, train batch {result["train_batch"]}, '
        f'eval batch {result["eval_batch"]}; {result["host"].get("cpu", "?")}, '
        f'{result["host"]["cpus"]} cpus; {result["date"]}; malloc={result["malloc"]}; '
        f'median of {result["rounds"]} rounds x {result["steps"]} steps'
        f'{" (interleaved)" if result["interleaved"] else ""}')
  cols = [('train img/s', 'train_img_s'), ('eval img/s', 'eval_img_s'),
          ('train compile s', 'train_compile_s'), ('eval compile s', 'eval_compile_s'),
          ('peak RSS MB', 'peak_rss_mb'), ('train MFU', 'train_model_mfu'),
          ('eval MFU', 'eval_model_mfu'),
          ('train faults', 'train_page_faults')]
  width = max([len(s) for s in result['systems']] + [8])
  print(f'{"system":<{width}} ' + ' '.join(f'{c:>15}' for c, _ in cols))
  for name, row in result['systems'].items():
    if 'skipped' in row:
      print(f'{name:<{width}} skipped: {row["skipped"][:100]}')
      continue
    cells = []
    for _, key in cols:
      v = row.get(key)
      cells.append(f'{"-" if v is None else (f"{v:.1%}" if "mfu" in key else v):>15}')
    print(f'{name:<{width}} ' + ' '.join(cells))
  if result['matmul_peak_gflops']:
    print(f'MFU = model multiply-adds x 2 (x 3 train) / step time / measured fp32 matmul peak '
          f'({result["matmul_peak_gflops"]} GFLOP/s)')
  for pair, r in result['ratios'].items():
    print(f'{pair}: ' + ', '.join(f'{m} {v:.2f}x' for m, v in r.items()))


# ----------------------------------------------------------------------------- latency mode


def run_latency(args) -> dict:
  """Paper Table 4 (batch 1, one core: B1 vs ResNet-152) and a B0-B7 latency/throughput table."""
  from efficientnet_jax.model import architectures

  def one(system: str, model: str, size: int, batch: int, steps: int) -> dict:
    sub = argparse.Namespace(**vars(args))
    sub.systems, sub.model, sub.image_size = system, model, size
    sub.eval_batch, sub.modes, sub.steps, sub.isolate = batch, 'eval', steps, True
    sub.compile_only = False
    res = run_benchmark(sub)
    row = res['systems'][system]
    if 'skipped' in row:
      return {'skipped': row['skipped']}
    return {'seconds': row['eval_step_s'], 'img_s': row['eval_img_s'],
            'compile_s': row['eval_compile_s'], 'peak_rss_mb': row['peak_rss_mb']}

  table4 = {}
  for label, system, model in [
      ('EfficientNet-B1 (ours, JAX)', 'ours:threads=1', 'b1'),
      ('EfficientNet-B1 (Keras, TF)', 'keras_tf:threads=1', 'b1'),
      ('ResNet-152 (Keras, TF)', 'keras_tf:threads=1,arch=ResNet152', 'b1'),
      ('ResNet-152 (Keras, JAX)', 'keras_jax:threads=1,arch=ResNet152', 'b1')]:
    size = 224 if 'ResNet' in label else architectures.get_spec(model).resolution
    _log(args, f'table 4: {label} @ {size}')
    table4[label] = dict(one(system, model, size, 1, args.latency_steps), image_size=size)
  models = {}
  for i in range(args.latency_max_b + 1):
    name = f'b{i}'
    size = architectures.get_spec(name).resolution
    _log(args, f'{name} @ {size}: latency (batch 1, 1 core)' + (
        f', throughput (batch {args.throughput_batch}, all cores)' if args.throughput_batch
        else ''))
    models[name] = {'image_size': size,
                    'latency': one('ours:threads=1', name, size, 1, args.latency_steps),
                    'throughput': one('ours', name, size, args.throughput_batch,
                                      max(1, args.latency_steps // 4))
                                  if args.throughput_batch else {}}
  return {'date': time.strftime('%Y-%m-%d %H:%M'), 'host': cpu_tuning.host_info(),
          'malloc': args.malloc, 'table4': table4, 'models': models}


def print_latency(result: dict) -> None:
  print(f'Table 4 (batch 1, one core): {result["host"].get("cpu", "?")}, {result["date"]}')
  ref = result['table4'].get('ResNet-152 (Keras, TF)', {}).get('seconds')
  for label, row in result['table4'].items():
    if 'skipped' in row:
      print(f'  {label:32s} skipped: {row["skipped"][:80]}')
      continue
    speedup = f'  {ref / row["seconds"]:.1f}x vs ResNet-152 (TF)' if ref else ''
    print(f'  {label:32s} {row["seconds"]:.3f} s @ {row["image_size"]}{speedup}')
  print('Ours, eval: latency batch 1 on one core; throughput on all cores')
  print(f'  {"model":6s} {"size":>5s} {"latency s":>10s} {"img/s":>8s} {"compile s":>10s} '
        f'{"peak RSS MB":>12s}')
  for name, row in result['models'].items():
    lat, thr = row['latency'], row['throughput']
    fmt = lambda d, k, f: f.format(d[k]) if d.get(k) is not None else '-'
    # Compile time and memory of the latency program when throughput was skipped.
    big = thr or lat
    print(f'  {name:6s} {row["image_size"]:>5d} {fmt(lat, "seconds", "{:.3f}"):>10s} '
          f'{fmt(thr, "img_s", "{:.2f}"):>8s} {fmt(big, "compile_s", "{:.1f}"):>10s} '
          f'{fmt(big, "peak_rss_mb", "{}"):>12s}')


# ----------------------------------------------------------------------------- main


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n', 2)[2])
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  parser.add_argument('--model', default='b0')
  parser.add_argument('--image_size', type=int, default=224,
                      help='0: the model\'s own training resolution')
  parser.add_argument('--train_batch', type=int, default=32)
  parser.add_argument('--eval_batch', type=int, default=64)
  parser.add_argument('--systems', default=DEFAULT_SYSTEMS)
  parser.add_argument('--modes', default='train,eval')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps per mode')
  parser.add_argument('--turn_warmup', type=int, default=1,
                      help='untimed steps at the start of every timed turn')
  parser.add_argument('--steps', type=int, default=2, help='timed steps per round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--isolate', action='store_true',
                      help='one system at a time (not interleaved; lower total memory)')
  parser.add_argument('--compile_only', action='store_true')
  parser.add_argument('--malloc', choices=('tuned', 'default'), default='tuned',
                      help='glibc malloc settings for every worker (see cpu_tuning.py)')
  parser.add_argument('--xla_flags', default='', help='extra XLA_FLAGS for every worker')
  parser.add_argument('--cache_dir', default='',
                      help='JAX persistent compilation cache for `ours` (empty: off)')
  parser.add_argument('--timeout', type=float, default=1800, help='seconds per worker request')
  parser.add_argument('--latency', action='store_true',
                      help='paper Table 4 and the B0-B7 latency/throughput table')
  parser.add_argument('--latency_steps', type=int, default=8)
  parser.add_argument('--latency_max_b', type=int, default=7)
  parser.add_argument('--throughput_batch', type=int, default=8,
                      help='batch of the all-cores throughput column of --latency; 0 skips it '
                           '(one core suffices, e.g. while the others are busy)')
  parser.add_argument('--json', action='store_true', help='print one JSON object only')
  parser.add_argument('--quiet', action='store_true', help='no progress on stderr')
  parser.add_argument('--verbose', action='store_true', help='show the workers\' stderr')
  args = parser.parse_args()
  if args.worker:
    worker_main(json.loads(args.worker))
    return
  if args.latency:
    result = run_latency(args)
    print(json.dumps(result)) if args.json else print_latency(result)
    return
  result = run_benchmark(args)
  if args.json:
    print(json.dumps(result))
  else:
    print_table(result)


if __name__ == '__main__':
  main()
