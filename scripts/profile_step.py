"""Where one EfficientNet train step spends its time, by op class: ours and PyTorch + timm.

    python scripts/profile_step.py                       # B0 224, batch 32, both systems
    python scripts/profile_step.py --systems ours --steps 5 --json

Each system runs in its own process with the benchmark's runners (`scripts/benchmark.py`:
the same model, optimizer, batch and tuned malloc), compiles or warms up, then profiles
`--steps` train steps:
  ours   `jax.profiler`: XLA:CPU records one event per executed thunk, named by its HLO
         instruction; the compiled module's metadata names the JAX op that made it
         (`.../transpose(jvp(EfficientNet))/block_3/dw_conv/...` is a depthwise conv's
         backward).
  torch  `torch.profiler`: aten ops with their input shapes; an op under autograd's engine
         is backward, one under `Optimizer.step` is the optimizer.
Time is each op's exclusive (self) time, summed per class and divided by the steps. Ops
that run side by side on different threads both count, so the column sums can exceed the
step's wall time, which is printed beside them. PyTorch needs `make bench-peers`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
sys.path.insert(0, ROOT)

import benchmark  # noqa: E402  (scripts/ is on the path only now)

CLASSES = ('depthwise conv fwd', 'depthwise conv bwd', '1x1 conv fwd', '1x1 conv bwd',
           'BN + activation', 'squeeze-excite', 'optimizer + EMA', 'stem, head, loss',
           'RNG (dropout, drop-connect)', 'other')


# --------------------------------------------------------------------------
# Ours: thunk events of the jax.profiler trace, classified by HLO metadata.

def classify_jax_op(op_name: str) -> str:
  """The class of an XLA op from its metadata op_name (the JAX name stack)."""
  backward = 'transpose(jvp' in op_name
  direction = 'bwd' if backward else 'fwd'
  if '_drop_masks' in op_name or 'dropout' in op_name or 'threefry' in op_name:
    return 'RNG (dropout, drop-connect)'
  if '/dw_conv/' in op_name:
    return f'depthwise conv {direction}'
  if '/se/' in op_name:
    return 'squeeze-excite'
  if re.search(r'/(expand|project)_conv/', op_name):
    return f'1x1 conv {direction}'
  if '_bn/' in op_name:
    return 'BN + activation'
  if re.search(r'/(stem_conv|head_conv|classifier)/|log_softmax|jvp\(\)', op_name):
    return 'stem, head, loss'
  if op_name.startswith('jit(') and 'EfficientNet' not in op_name:
    return 'optimizer + EMA'  # what the step does outside the model and the loss
  return 'other'


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """{instruction name: metadata op_name} over every computation of a compiled module."""
  names = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.-]+) = ', line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      names[m.group(1)] = op.group(1) if op else ''
  return names


def exclusive_times(events: list[dict]) -> list[tuple[dict, float]]:
  """(event, its duration minus that of the events nested in it on the same thread)."""
  out = []
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[(e['pid'], e['tid'])].append(e)
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e['ts'], -e['dur']))
    stack: list[list] = []  # [event, end, child time]
    for e in thread:
      while stack and stack[-1][1] <= e['ts']:
        done = stack.pop()
        out.append((done[0], done[0]['dur'] - done[2]))
      if stack:
        stack[-1][2] += e['dur']
      stack.append([e, e['ts'] + e['dur'], 0.0])
    out += [(s[0], s[0]['dur'] - s[2]) for s in stack]
  return out


def profile_ours(cfg: dict, steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  runner = benchmark.OursRunner()
  runner.setup(cfg, ['train'])
  runner.run('train', 2)  # warm: buffers allocated, caches hot
  names = hlo_op_names(runner._train[0].as_text())  # pylint: disable=protected-access
  trace_dir = tempfile.mkdtemp(prefix='profile_step_')
  start = time.perf_counter()
  jax.profiler.start_trace(trace_dir)
  runner.run('train', steps)
  jax.profiler.stop_trace()
  wall = (time.perf_counter() - start) / steps
  path, = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  with gzip.open(path) as f:
    events = [e for e in json.load(f)['traceEvents']
              if e.get('ph') == 'X' and 'hlo_op' in e.get('args', {})]
  totals = collections.Counter()
  examples: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for event, self_us in exclusive_times(events):
    op_name = names.get(event['args']['hlo_op'], '')
    cls = classify_jax_op(op_name)
    totals[cls] += self_us
    examples[cls][re.sub(r'block_\d+', 'block_N', op_name)[:90]] += self_us
  return _result(totals, steps, wall, examples)


# --------------------------------------------------------------------------
# PyTorch: aten ops of torch.profiler, classified by name, shapes and ancestors.

def classify_torch_op(name: str, shapes: list, backward: bool) -> str:
  """The class of a top-level aten op (as called by timm or autograd)."""
  direction = 'bwd' if backward else 'fwd'
  if 'conv' in name:
    # conv2d / convolution: (input, weight, ...); convolution_backward: (grad, input, weight, ...)
    x, weight = (shapes[1], shapes[2]) if 'backward' in name else (shapes[0], shapes[1])
    if len(weight) == 4 and weight[1] == 1 and weight[2] > 1:
      return f'depthwise conv {direction}'
    if len(weight) == 4 and weight[2:] == [1, 1]:
      return 'squeeze-excite' if x[2:] == [1, 1] else f'1x1 conv {direction}'
    return 'stem, head, loss'
  # SE works on [N, C, 1, 1] maps; the rest of the network on larger ones.
  on_pooled = bool(shapes) and len(shapes[0]) == 4 and shapes[0][2:] == [1, 1]
  if re.search(r'batch_norm|silu', name):
    return 'squeeze-excite' if on_pooled else 'BN + activation'
  if re.search(r'sigmoid|mean', name) or (name.startswith('aten::mul') and on_pooled):
    return 'squeeze-excite'
  if re.search(r'linear|addmm|aten::mm|aten::t$|softmax|nll_loss|cross_entropy', name):
    return 'stem, head, loss'
  return 'other'


def profile_torch(cfg: dict, steps: int) -> dict:
  runner = benchmark.TorchRunner()
  runner.setup(cfg, ['train'])
  runner.run('train', 2)
  torch = runner.torch
  start = time.perf_counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                              record_shapes=True) as prof:
    runner.run('train', steps)
  wall = (time.perf_counter() - start) / steps
  totals = collections.Counter()
  examples: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for event in prof.events():
    if event.self_cpu_time_total <= 0:
      continue
    cls, label = _torch_class(event)
    totals[cls] += event.self_cpu_time_total
    examples[cls][label] += event.self_cpu_time_total
  return _result(totals, steps, wall, examples)


def _torch_class(event) -> tuple[str, str]:
  """Walks up to the op timm or autograd called (the topmost aten op) and classifies it."""
  chain = []
  node = event
  while node is not None:
    chain.append(node)
    node = node.cpu_parent
  if any(n.name.startswith('Optimizer.') for n in chain):
    return 'optimizer + EMA', 'Optimizer.step'
  backward = any(n.name.startswith('autograd::engine') for n in chain)
  atens = [n for n in chain if n.name.startswith('aten::')]
  top = atens[-1] if atens else event
  shapes = [list(s) for s in (top.input_shapes or [])]
  return classify_torch_op(top.name, shapes, backward), top.name


# --------------------------------------------------------------------------

def _result(totals, steps: int, wall_s: float, examples) -> dict:
  ms = {c: round(totals.get(c, 0.0) / 1e3 / steps, 2) for c in CLASSES}
  top = {c: [[n, round(t / 1e3 / steps, 2)] for n, t in examples[c].most_common(3)]
         for c in CLASSES if c in examples}
  return {'ms_per_step': ms, 'op_ms_per_step': round(sum(ms.values()), 1),
          'wall_ms_per_step': round(1e3 * wall_s, 1), 'top_ops': top}


def run_worker(system: str, cfg: dict, steps: int) -> dict:
  fn = {'ours': profile_ours, 'torch': profile_torch}[system]
  return fn(cfg, steps)


def run_in_process(system: str, cfg: dict, steps: int) -> dict:
  env = benchmark.worker_env({}, 'tuned', '')
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), f'--worker={system}', f'--steps={steps}',
       f'--cfg={json.dumps(cfg)}'], capture_output=True, text=True, env=env, cwd=ROOT)
  if proc.returncode != 0:
    return {'error': (proc.stderr.strip().splitlines() or ['?'])[-1]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(results: dict, cfg: dict) -> None:
  systems = [s for s in results if 'error' not in results[s]]
  for s in results:
    if 'error' in results[s]:
      print(f'{s}: skipped ({results[s]["error"][:120]})')
  print(f'{cfg["model"].upper()} {cfg["image_size"]} px, train batch {cfg["train_batch"]}: '
        'exclusive op time per step (ms)')
  header = ['op class'] + systems + (['ours / torch'] if len(systems) == 2 else [])
  print('| ' + ' | '.join(header) + ' |')
  print('|---' * len(header) + '|')
  for c in CLASSES:
    cells = [f'{results[s]["ms_per_step"][c]:.1f}' for s in systems]
    if len(systems) == 2:
      a, b = (results[s]['ms_per_step'][c] for s in systems)
      cells.append(f'{a / b:.2f}' if b > 0 else '—')
    print(f'| {c} | ' + ' | '.join(cells) + ' |')
  for key, label in (('op_ms_per_step', 'sum of ops'), ('wall_ms_per_step', 'step wall')):
    cells = [f'{results[s][key]:.1f}' for s in systems]
    if len(systems) == 2:
      cells.append(f'{results[systems[0]][key] / results[systems[1]][key]:.2f}')
    print(f'| **{label}** | ' + ' | '.join(cells) + ' |')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--systems', default='ours,torch')
  parser.add_argument('--model', default='b0')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--train_batch', type=int, default=32)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--ours', default='', metavar='KEY=VALUE,...',
                      help="options of the benchmark's ours system, e.g. depthwise_impl=dnnl")
  parser.add_argument('--json', action='store_true')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  parser.add_argument('--cfg', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(run_worker(args.worker, json.loads(args.cfg), args.steps)))
    return 0
  cfg = {'model': args.model, 'image_size': args.image_size, 'train_batch': args.train_batch,
         'eval_batch': 1, 'cache_dir': None, 'compile_only': False}
  ours = dict(kv.split('=', 1) for kv in args.ours.split(',') if kv)
  results = {}
  for system in args.systems.split(','):
    if system not in ('ours', 'torch'):
      parser.error(f'--systems: {system!r}; accepted: ours, torch')
    print(f'[profile_step] {system} ...', file=sys.stderr, flush=True)
    options = ours if system == 'ours' else {}
    results[system] = run_in_process(system, dict(cfg, options=options), args.steps)
  print_table(results, cfg)
  if args.json:
    print(json.dumps({'config': dict(cfg, ours=ours), 'host': benchmark.cpu_tuning.host_info(),
                      'date': time.strftime('%Y-%m-%d'), 'systems': results}, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
