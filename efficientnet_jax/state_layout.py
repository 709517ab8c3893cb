"""Where the train state keeps its optimizer slots and EMA: one vector each, or leaf by leaf.

'per_leaf': every optimizer slot (RMSProp's second moment, the momentum trace,
Adam's moments) and every EMA shadow is an array shaped like its parameter.
The sharding rules split them like their parameter, so 'fsdp' and a 2-D mesh
need this layout.

'flat': the optimizer, weight decay included, runs on all parameters
concatenated into one vector (`optim._flat_chain`), and the EMA of
{params, batch_stats} is one vector too. The math is the same; what changes is
the number of kernels. XLA gives each output array its own kernel, and XLA:CPU does not merge the
per-leaf ones, so per-leaf updates cost four kernels per parameter (moment,
trace, parameter, EMA), and compile time goes with the kernel count. Flat, the
slots and the EMA are a handful of large kernels; only the parameters, which
the model needs as separate arrays, keep one kernel each. A B0 train step
drops from 2,225 kernels to 1,410 and its compile from 12.1 s to 9.5 s on the
2-core benchmark machine, at the same step time (README, Performance). On
GPU/TPU the per-leaf kernels are fused horizontally, so there the choice
changes little either way.

'auto' (the default) is flat wherever the state is replicated on a 1-D mesh
and per-leaf where it is sharded. Checkpoints record their layout (`meta`),
and `relayout` converts a restored state, so a run resumes under the other
sharding mode (tests/test_restore_mesh.py).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

LAYOUTS = ('auto', 'flat', 'per_leaf')
# What checkpoints saved before layouts existed hold.
SAVED_BEFORE_LAYOUTS = 'per_leaf'


def resolve(layout: str, *, sharding: str, mesh_model: int) -> str:
  """'flat' or 'per_leaf' for a run with these sharding settings (see the module doc)."""
  if layout not in LAYOUTS:
    raise ValueError(f'state_layout={layout!r}; accepted: {", ".join(LAYOUTS)}')
  sharded = sharding != 'replicate' or mesh_model > 1
  if layout == 'auto':
    return 'per_leaf' if sharded else 'flat'
  if layout == 'flat' and sharded:
    raise ValueError(f"state_layout='flat' needs sharding='replicate' and mesh_model=1 "
                     f'(got sharding={sharding!r}, mesh_model={mesh_model}): sharded slots '
                     "must be shaped like their params; use 'auto' or 'per_leaf'")
  return layout


# Both jitted: applied eagerly to a B0 state, their ~300 reshapes and slices
# would each compile their own tiny program. The state's leaves are all float32.
@jax.jit
def ravel(tree: Any) -> jax.Array:
  """All leaves of `tree`, flattened in `jax.tree.leaves` order, as one vector."""
  return ravel_pytree(tree)[0]


@jax.jit
def unravel(vector: jax.Array, like: Any) -> Any:
  """The inverse of `ravel`: `vector` cut into arrays shaped like `like`'s leaves."""
  return ravel_pytree(like)[1](vector)


def init_ema(params: Any, batch_stats: Any, layout: str) -> Any:
  """The EMA's starting value: a copy of {params, batch_stats}, in `layout`."""
  variables = {'params': params, 'batch_stats': batch_stats}
  if layout == 'flat':
    return ravel(variables)
  # Own buffers: a train step that donates the state must not see one twice.
  return jax.tree.map(jnp.copy, variables)


def ema_target(params: Any, batch_stats: Any, ema: Any) -> Any:
  """{params, batch_stats} in the layout of `ema`, for `optim.update_ema`."""
  variables = {'params': params, 'batch_stats': batch_stats}
  return ravel(variables) if is_flat_ema(ema) else variables


def is_flat_ema(ema: Any) -> bool:
  return not isinstance(ema, dict)


def ema_variables(state: dict) -> dict:
  """The EMA's {params, batch_stats} trees, whatever the state's layout."""
  ema = state['ema']
  if not is_flat_ema(ema):
    return ema
  return unravel(ema, {'params': state['params'], 'batch_stats': state['batch_stats']})


def relayout(source: Any, target: Any) -> Any:
  """`source`'s values in the structure of `target` (abstract arrays), converting layouts.

  Both are train states of the same model and optimizer, one per-leaf and one
  flat (or both the same). Leaves are walked in order: a target leaf shaped
  like the next source leaf takes it as it is (params, BN statistics, step
  counts); a flat target vector is the concatenation of the next source leaves
  (per-leaf -> flat); a target leaf inside a flat source vector is the next
  slice of it (flat -> per-leaf). Works on traced values: jit it with the
  target's shardings.

  Raises:
    ValueError: the two states do not hold the same values in two layouts.
  """
  sources = jax.tree.leaves(source)
  targets, treedef = jax.tree.flatten(target)
  out, j, offset = [], 0, 0  # offset: elements of sources[j] already used

  def mismatch(what):
    return ValueError(f'cannot convert the state between layouts: {what} (target leaf '
                      f'{len(out)} of {len(targets)}, source leaf {j} of {len(sources)})')

  for t in targets:
    size = math.prod(t.shape)
    if j >= len(sources):
      raise mismatch('the source has fewer values')
    s = sources[j]
    if offset == 0 and s.shape == t.shape:
      out.append(s.astype(t.dtype))
      j += 1
    elif s.ndim == 1 and offset + size <= s.shape[0] and (offset or s.shape[0] > size):
      out.append(s[offset:offset + size].reshape(t.shape).astype(t.dtype))
      offset += size
      if offset == s.shape[0]:
        j, offset = j + 1, 0
    elif t.ndim == 1 and offset == 0:
      parts, total = [], 0
      while total < size and j < len(sources):
        parts.append(jnp.ravel(sources[j]))
        total += sources[j].size
        j += 1
      if total != size:
        raise mismatch(f'a vector of {size} elements against source leaves of {total}')
      out.append(jnp.concatenate(parts).astype(t.dtype))
    else:
      raise mismatch(f'shape {t.shape} against {s.shape}')
  if j != len(sources):
    raise mismatch('the source has more values')
  return jax.tree.unflatten(treedef, out)
