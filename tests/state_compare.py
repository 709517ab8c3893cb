"""Leaf-by-leaf comparison of two training states that ran as different programs.

Two partitions of one step (replicated vs FSDP, 1-D vs 2-D mesh, 8 vs 4 vs 1
devices) sum in different orders and compile to different fusions, so their
states differ by float rounding. Rounding scales with a leaf's magnitude, not
with each element: a batch mean or a gradient sum that lands near zero keeps
the absolute error of the terms it summed. So each leaf is held to `rtol`
relative, or to `bound` times its largest |value| (at least `atol_floor`),
per top-level group ('params', 'opt_state', ...). A wrong sharding or a lost
update is off by orders of magnitude more.
"""

import jax
import numpy as np

DEFAULT_BOUND = 1e-5
DEFAULT_RTOL = 1e-5


def assert_states_close(actual, desired, *, bounds=None, rtols=None,
                        atol_floor: float = 1e-6) -> dict:
  """Asserts every leaf close; returns {group: (largest |a - b| / max(max|b|, 0.1), path)}."""
  bounds, rtols = bounds or {}, rtols or {}
  flat_a = jax.tree_util.tree_leaves_with_path(actual)
  flat_b = jax.tree_util.tree_leaves_with_path(desired)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  worst = {}
  for (path, a), (_, b) in zip(flat_a, flat_b):
    group = getattr(path[0], 'key', str(path[0]))
    a, b = np.asarray(a), np.asarray(b)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    atol = max(atol_floor, bounds.get(group, DEFAULT_BOUND) * scale)
    np.testing.assert_allclose(a, b, rtol=rtols.get(group, DEFAULT_RTOL), atol=atol,
                               err_msg=jax.tree_util.keystr(path))
    error = float(np.max(np.abs(a - b), initial=0.0)) / max(scale, 0.1)
    worst[group] = max(worst.get(group, (0.0, '')), (error, jax.tree_util.keystr(path)))
  return worst


def describe(worst: dict) -> str:
  return ', '.join(f'{group} {e:.1e} ({where})' for group, (e, where) in worst.items())
