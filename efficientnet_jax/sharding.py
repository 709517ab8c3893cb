"""The device mesh and the two shardings the trainer uses, built in one place.

Data parallelism is `jax.jit` over a 1-D `data` mesh: the batch is split along
`data`, params / optimizer state / EMA are replicated. Gradients and BatchNorm
statistics are then reduced over the *global* batch by construction (sync BN,
a deliberate choice: the TPU code syncs only within groups of up to 8 cores).
The axis type is Auto because linen's Dropout fails under Explicit axes.

`config.sharding` picks where the train state lives (`state_shardings`):
'replicate' keeps a full copy on every device; 'fsdp' splits each large leaf
along the `data` axis (ZeRO-3 style), so per-device parameter and optimizer
memory falls by about the device count while XLA gathers weights where a
layer needs them. The math is the same either way; only the layout changes.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


# Leaves below this many elements stay replicated under FSDP: splitting a BN
# scale or a bias saves nothing and costs a gather per use.
FSDP_MIN_SIZE = 2**12


def make_mesh(devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ('data',), axis_types=(AxisType.Auto,),
                       devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def check_batch_size(global_batch: int, mesh, field: str = 'batch_size') -> None:
  """The global batch must split evenly over devices and processes."""
  devices = mesh.devices.size
  if global_batch <= 0 or global_batch % devices:
    raise ValueError(f'{field}={global_batch} is not divisible by the device count '
                     f'{devices}; use a multiple of {devices}')
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


def state_shardings(abstract_state, mesh, mode: str = 'replicate'):
  """A NamedSharding for every leaf of `abstract_state` (shapes only), by `mode`."""
  if mode == 'replicate':
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  if mode == 'fsdp':
    size = mesh.shape['data']
    return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(tuple(a.shape), size)),
                        abstract_state)
  raise ValueError(f"sharding={mode!r}; accepted: replicate, fsdp")


def bytes_per_device(tree) -> int:
  """The largest number of bytes any one device holds of `tree`'s arrays."""
  per_device: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values()) if per_device else 0
