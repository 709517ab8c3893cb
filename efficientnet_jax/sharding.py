"""The device mesh and the shardings the trainer uses, built in one place.

Data parallelism is `jax.jit` over a `data` mesh axis: the batch is split along
`data`, params / optimizer state / EMA are replicated. Gradients are then
reduced over the global batch by construction; BatchNorm statistics too, or
within groups of consecutive replicas as the official TPU code does
(`config.bn_group_size`, `bn_groups.py`; the model reshapes the batch into its
groups, so XLA reduces each group's statistics among its own devices). The
axis types are Auto because linen's Dropout fails under Explicit axes.

`config.sharding` picks where the train state lives (`state_shardings`):
'replicate' keeps a full copy on every device; 'fsdp' splits each large leaf
along the `data` axis (ZeRO-3 style), so per-device parameter and optimizer
memory falls by about the device count while XLA gathers weights where a
layer needs them. The math is the same either way; only the layout changes.

`config.mesh_model` > 1 (the widest models) makes the mesh 2-D, `data x model`
with `model` the inner (fastest, same-host) axis: each large leaf's
output-channel (last) dim is split over `model`, and under 'fsdp' another large
dim over `data` as well (`mesh2d_spec`). The batch still splits over `data`
only, so it is replicated across `model`. An orthogonal knob rather than a third
`sharding` mode: 'replicate' and 'fsdp' keep their meaning (is the state split
over `data`?) and mesh_model=1 is exactly the 1-D mesh as before.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


# Leaves below this many elements stay replicated under FSDP: splitting a BN
# scale or a bias saves nothing and costs a gather per use.
FSDP_MIN_SIZE = 2**12


# Where the train state lives: a copy per device, or large leaves split over `data`.
MODES = ('replicate', 'fsdp')

def make_mesh(devices=None, model: int = 1) -> jax.sharding.Mesh:
  """A 1-D `data` mesh, or with `model` > 1 a (devices // model, model) `data x model` one."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  if isinstance(model, bool) or not isinstance(model, int) or model < 1 or n % model:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    raise ValueError(f'mesh_model={model!r}; accepted: a divisor of the device count {n} '
                     f'({", ".join(map(str, divisors))})')
  if model == 1:  # the 1-D mesh: P('data') shardings and checkpoints exactly as before
    return jax.make_mesh((n,), ('data',), axis_types=(AxisType.Auto,), devices=devices)
  return jax.make_mesh((n // model, model), ('data', 'model'),
                       axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def model_size(mesh) -> int:
  """The size of the `model` axis; 1 on a 1-D mesh."""
  return dict(mesh.shape).get('model', 1)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def check_batch_size(global_batch: int, mesh, field: str = 'batch_size') -> None:
  """The global batch must split evenly over the `data` axis and over processes."""
  data = mesh.shape['data']
  if global_batch <= 0 or global_batch % data:
    if model_size(mesh) == 1:
      what = f'the device count {data}'
    else:
      what = (f'the data-axis size {data} ({mesh.devices.size} devices / '
              f'mesh_model={model_size(mesh)})')
    raise ValueError(f'{field}={global_batch} is not divisible by {what}; use a multiple '
                     f'of {data}')
  if global_batch % jax.process_count():
    raise ValueError(f'{field}={global_batch} is not divisible by the process count '
                     f'{jax.process_count()}')


def to_global(host_batch: dict, sharding: NamedSharding) -> dict:
  """Turns this process's rows of a batch into one global, sharded array per key."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in host_batch.items()}


def fsdp_spec(shape: tuple[int, ...], axis_size: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """The largest dimension divisible by `axis_size` goes over `data`; else replicated."""
  if axis_size <= 1 or math.prod(shape) < min_size:
    return P()
  candidates = [d for d, n in enumerate(shape) if n % axis_size == 0]
  if not candidates:
    return P()
  # Largest dimension; on ties the last one (conv kernels' output channels).
  dim = max(candidates, key=lambda d: (shape[d], d))
  return P(*(['data' if d == dim else None for d in range(len(shape))]))


def mesh2d_spec(shape: tuple[int, ...], data_size: int, model_size_: int, *,
                fsdp: bool, min_size: int = FSDP_MIN_SIZE) -> P:
  """`model` on the output-channel (last) dim; under `fsdp` also `data` on another dim.

  A conv kernel (kh, kw, in, out) or dense kernel (in, out) splits `out` over
  `model` and `in` over `data`; the params, their optimizer slots and EMA share
  shapes, so they share layouts. Where the last dim does not divide, the
  largest dim that does takes `model`. A depthwise kernel (kh, kw, 1, C) has
  no second large dim: under `fsdp` its channel dim splits over both axes when
  it divides by model x data. Small or indivisible leaves stay replicated.
  """
  if model_size_ <= 1:
    return fsdp_spec(shape, data_size, min_size) if fsdp else P()
  if math.prod(shape) < min_size:
    return P()
  axes: list = [None] * len(shape)
  divisible = [d for d, n in enumerate(shape) if n % model_size_ == 0]
  if not divisible:
    return fsdp_spec(shape, data_size, min_size) if fsdp else P()
  last = len(shape) - 1
  model_dim = last if last in divisible else max(divisible, key=lambda d: (shape[d], d))
  axes[model_dim] = 'model'
  if fsdp and data_size > 1:
    others = [d for d, n in enumerate(shape) if d != model_dim and n % data_size == 0]
    if others:
      axes[max(others, key=lambda d: (shape[d], d))] = 'data'
    elif shape[model_dim] % (data_size * model_size_) == 0:
      # `model` major: each device's chunk lies inside its `model` half, so
      # gathering over `data` alone gives the `model`-split layout (with
      # ('data', 'model') XLA reorders chunks by collective-permutes).
      axes[model_dim] = ('model', 'data')
  return P(*axes)


def state_shardings(abstract_state, mesh, mode: str = 'replicate'):
  """A NamedSharding for every leaf of `abstract_state` (shapes only), by `mode` and mesh."""
  if mode not in MODES:
    raise ValueError(f"sharding={mode!r}; accepted: {', '.join(MODES)}")
  data, model = mesh.shape['data'], model_size(mesh)
  if model == 1 and mode == 'replicate':
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  return jax.tree.map(
      lambda a: NamedSharding(mesh, mesh2d_spec(tuple(a.shape), data, model,
                                                fsdp=mode == 'fsdp')),
      abstract_state)


def bytes_per_device(tree) -> int:
  """The largest number of bytes any one device holds of `tree`'s arrays."""
  per_device: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values()) if per_device else 0
