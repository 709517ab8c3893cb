"""The train state: create it, describe it abstractly, restore it, and view its weights.

The state is a dict pytree: params, batch_stats, opt_state, ema (of params
and BN statistics, in the layout of `state_layout.py`) and step. It is created
already sharded (`jax.eval_shape`, then a jitted init with out_shardings) and
restored onto any mesh from a workdir's orbax checkpoints.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from efficientnet_jax import checkpointing
from efficientnet_jax import sharding
from efficientnet_jax import state_layout
from efficientnet_jax.experiment import Experiment, build_experiment
from efficientnet_jax.model import EfficientNet


def create_train_state(key, *, model: EfficientNet, tx, image_size: int,
                       layout: str = 'per_leaf') -> dict:
  """Params, BN statistics, optimizer state, EMA (of params and BN stats) and step.

  `layout` ('per_leaf' or 'flat', state_layout.py) is the EMA's; `tx` must be
  made for the same one (`optim.make_optimizer(flat=...)`).
  """
  variables = model.init({'params': key}, jnp.zeros((1, image_size, image_size, 3)),
                         train=False)
  params, batch_stats = variables['params'], variables['batch_stats']
  return dict(params=params, batch_stats=batch_stats, opt_state=tx.init(params),
              ema=state_layout.init_ema(params, batch_stats, layout),
              step=jnp.zeros((), jnp.int32))


def raw_variables(state: dict) -> dict:
  """The trained {'params', 'batch_stats'} (the EMA's are `state_layout.ema_variables`)."""
  return {'params': state['params'], 'batch_stats': state['batch_stats']}


def state_init_fn(exp: Experiment, layout: str):
  """key -> the experiment's fresh train state, in `layout` ('flat' or 'per_leaf')."""
  tx = exp.tx if layout == exp.layout else exp.make_tx(layout == 'flat')
  return functools.partial(create_train_state, model=exp.model, tx=tx,
                           image_size=exp.image_size, layout=layout)


def abstract_state(exp: Experiment, layout: str, mesh, mode: str):
  """The train state's shapes in `layout`, each with its sharding on `mesh` under `mode`."""
  abstract = jax.eval_shape(state_init_fn(exp, layout), jax.random.key(0))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, sharding.state_shardings(abstract, mesh, mode))


def architecture_meta(exp: Experiment) -> dict:
  """What a checkpoint records of its network, to refuse resuming another one."""
  return {'model': exp.spec.name, 'num_classes': exp.num_classes,
          'blocks': len(exp.spec.blocks()), 'width': exp.spec.width, 'depth': exp.spec.depth}


def check_workdir_matches(manager, exp: Experiment, workdir: str) -> None:
  """Refuses to resume a checkpoint of another network (before anything is written)."""
  step = checkpointing.latest_step(manager)
  if step is None:
    return
  saved = checkpointing.read_meta(manager, step)
  want = architecture_meta(exp)
  diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
  if diff:
    detail = ', '.join(f'{k}: checkpoint {a!r} vs config {b!r}' for k, (a, b) in diff.items())
    raise ValueError(f'workdir {workdir} holds a checkpoint (step {step}) of a different '
                     f'model ({detail}); use another --workdir')


def restore_state(manager, step: int, exp: Experiment, abstract, mesh, mode: str,
                  fallback: bool = False):
  """(state, meta) of checkpoint `step`, in this run's layout and shardings (`abstract`).

  A checkpoint saved in the other state layout (another sharding mode) is read
  in its own layout and converted on device (`state_layout.relayout`). With
  `fallback`, a corrupt step gives way to the newest intact older one (the
  restored state's `step` says which).
  """
  saved = checkpointing.read_meta(manager, step).get('state_layout',
                                                     state_layout.SAVED_BEFORE_LAYOUTS)
  if saved == exp.layout:
    return checkpointing.restore(manager, abstract, step, fallback_to_previous=fallback)
  if saved not in state_layout.LAYOUTS:
    raise ValueError(f'checkpoint step {step} has state_layout={saved!r}; this code knows '
                     f'{", ".join(state_layout.LAYOUTS[1:])}')
  state, meta = checkpointing.restore(manager, abstract_state(exp, saved, mesh, mode), step,
                                      fallback_to_previous=fallback)
  convert = jax.jit(lambda s: state_layout.relayout(s, abstract),
                    out_shardings=jax.tree.map(lambda a: a.sharding, abstract))
  return convert(state), meta


def load_checkpoint(config, workdir: str, step: int | None = None, mesh=None):
  """(experiment, state, step) of a workdir's newest (or given) checkpoint, placed on `mesh`.

  `config` is the (checked) config the workdir was trained with. Laid out by
  its `sharding` / `mesh_model` rules on `mesh` (default: all devices), so a
  model that only fits sharded also loads sharded.
  """
  mesh = mesh or sharding.make_mesh(model=config.mesh_model)
  exp = build_experiment(config)
  manager = checkpointing.make_checkpoint_manager(os.path.abspath(workdir), async_save=False)
  step = checkpointing.latest_step(manager) if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {os.path.abspath(workdir)}/checkpoints')
  check_workdir_matches(manager, exp, workdir)
  abstract = abstract_state(exp, exp.layout, mesh, config.sharding)
  state, _ = restore_state(manager, step, exp, abstract, mesh, config.sharding)
  return exp, state, step
