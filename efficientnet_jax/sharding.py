"""The device mesh and the two shardings the trainer uses, built in one place.

Data parallelism is `jax.jit` over a 1-D `data` mesh: the batch is split along
`data`, params / optimizer state / EMA are replicated. Gradients and BatchNorm
statistics are then reduced over the *global* batch by construction (sync BN,
a deliberate choice: the TPU code syncs only within groups of up to 8 cores).
The axis type is Auto because linen's Dropout fails under Explicit axes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


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
