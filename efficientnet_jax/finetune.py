"""Fine-tuning building blocks: pretrained weights into a new train state, block freezing.

  _, variables, _ = weights.load.load_weights('lite0')         # or a file / a workdir
  state = create_train_state(key, model=model, tx=tx, ...)     # model: 10 classes
  state, report = init_state_from(state, variables, tx=tx)     # all but the head copied
  print(report.summary())
  tx = freeze(tx, freeze_mask(params, model.spec, blocks=4))   # stem + blocks 0..3 fixed

`transfer` copies every pretrained variable whose path and shape match the
new model and keeps the fresh initialisation of the rest: the classifier
(always re-initialised: another label set), and anything whose shape differs
(e.g. the classifier of another class count, which is the same thing). The
report lists what was copied and what was not, so a silently empty transfer
(another architecture) cannot pass: `transfer` raises when a variable other
than the head is left fresh, unless `allow_partial`.

Freezing is by whole blocks: the stem and the first K MBConv / fused blocks
(the low-level features) get zero updates (`optax.set_to_zero` through
`optax.multi_transform`), which also keeps weight decay off them because our
decay is part of `tx`. Their BatchNorm *statistics* are not parameters: in
train mode they would follow the new data, so the train step restores them
(`restore_frozen_batch_stats`), as Keras' frozen layers keep theirs.

The weights expect the source variant's input normalisation (Lite: (x - 127)
/ 128); the training config must use the same model family so that our input
pipeline normalises accordingly (configs/finetune.py uses model.name='lite0').
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.traverse_util
import jax
import numpy as np
import optax

from efficientnet_jax import state_layout
from efficientnet_jax.model.architectures import ModelSpec
from efficientnet_jax.model import network
from efficientnet_jax.model import stack_block_variables

HEAD = ('classifier',)  # the modules a new label set re-initialises


@dataclasses.dataclass
class TransferReport:
  """What `transfer` copied from the pretrained variables into the new model.

  Attributes:
    copied: our variable paths ('params/block_3/dw_conv/kernel') taken from the source.
    fresh: paths kept at their new initialisation (the head, and mismatches).
    shape_mismatches: (path, new shape, pretrained shape) left fresh.
    unused: pretrained paths the new model has no place for (e.g. the old head).
  """
  copied: list[str] = dataclasses.field(default_factory=list)
  fresh: list[str] = dataclasses.field(default_factory=list)
  shape_mismatches: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)
  unused: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    copied_params = sum(1 for p in self.copied if p.startswith('params/'))
    lines = [f'copied {len(self.copied)} pretrained variables ({copied_params} params, '
             f'{len(self.copied) - copied_params} BN statistics)',
             f'fresh (newly initialised): {", ".join(self.fresh) or "none"}']
    if self.shape_mismatches:
      lines.append('shape mismatches (new <- pretrained): ' + ', '.join(
          f'{p} {a} <- {b}' for p, a, b in self.shape_mismatches))
    if self.unused:
      lines.append(f'unused pretrained: {", ".join(self.unused)}')
    return '\n'.join(lines)


def _is_head(path: tuple[str, ...]) -> bool:
  return len(path) > 1 and path[1] in HEAD


def transfer(pretrained: Mapping[str, Any], fresh: Mapping[str, Any], *,
             spec: ModelSpec | None = None, allow_partial: bool = False,
             ) -> tuple[dict[str, Any], TransferReport]:
  """Pretrained variables over a fresh initialisation, the classifier kept fresh.

  Args:
    pretrained: {'params', 'batch_stats'} of the source model (unscanned layout).
    fresh: the new model's {'params', 'batch_stats'} (e.g. `model.init`).
    spec: the new model's spec; needed only when `fresh` uses scanned stages
      (`scan_blocks=True`), to stack the pretrained blocks the same way.
    allow_partial: accept variables outside the head left fresh (another
      architecture; see the module docstring).

  Returns:
    (variables like `fresh`, report).
  """
  pretrained = {k: pretrained[k] for k in ('params', 'batch_stats') if k in pretrained}
  fresh = {k: fresh[k] for k in ('params', 'batch_stats') if k in fresh}
  if any(key.startswith('stage_') for key in fresh.get('params', {})):
    if spec is None:
      raise ValueError('transfer: the new model scans its stages (scan_blocks=True); '
                       'pass spec= to stack the pretrained blocks')
    pretrained = stack_block_variables(pretrained, spec)
  source = flax.traverse_util.flatten_dict(jax.device_get(pretrained))
  target = flax.traverse_util.flatten_dict(fresh)
  report = TransferReport()
  out = {}
  for path, value in target.items():
    name = '/'.join(path)
    if _is_head(path) or path not in source:
      report.fresh.append(name)
      out[path] = value
      continue
    new = np.asarray(source[path])
    if new.shape != tuple(value.shape):
      report.shape_mismatches.append((name, tuple(value.shape), new.shape))
      report.fresh.append(name)
      out[path] = value
      continue
    out[path] = new.astype(value.dtype)
    report.copied.append(name)
  report.unused = sorted('/'.join(p) for p in source if p not in target or _is_head(p))
  unexpected_fresh = [p for p in report.fresh if not _is_head(tuple(p.split('/')))]
  if unexpected_fresh and not allow_partial:
    raise ValueError(
        f'transfer: {len(unexpected_fresh)} variables outside the classifier have no '
        f'pretrained value of the same path and shape (first: {unexpected_fresh[:5]}); the '
        'pretrained model is another architecture? (allow_partial=True accepts it)\n'
        + report.summary())
  return flax.traverse_util.unflatten_dict(out), report


def init_state_from(state: dict, pretrained: Mapping[str, Any], *, tx,
                    spec: ModelSpec | None = None, allow_partial: bool = False,
                    ) -> tuple[dict, TransferReport]:
  """A fresh train state (state.create_train_state) with the pretrained backbone.

  params, batch_stats and the EMA copy start from the transferred values; the
  optimizer state is re-initialised for them; the step stays 0.
  """
  variables, report = transfer(
      pretrained, {'params': state['params'], 'batch_stats': state['batch_stats']},
      spec=spec, allow_partial=allow_partial)
  params = jax.tree.map(lambda a, b: jax.numpy.asarray(b, a.dtype), state['params'],
                        variables['params'])
  batch_stats = jax.tree.map(lambda a, b: jax.numpy.asarray(b, a.dtype),
                             state['batch_stats'], variables['batch_stats'])
  layout = 'flat' if state_layout.is_flat_ema(state['ema']) else 'per_leaf'
  return dict(state, params=params, batch_stats=batch_stats, opt_state=tx.init(params),
              ema=state_layout.init_ema(params, batch_stats, layout)), report


def frozen_modules(spec: ModelSpec, blocks: int) -> tuple[str, ...]:
  """Top-level module names frozen by `blocks`: the stem and block_0..block_{blocks-1}."""
  total = len(spec.blocks())
  if not 0 <= blocks <= total:
    raise ValueError(f'freeze_blocks={blocks}: {spec.name} has {total} blocks; '
                     f'accepted 0..{total} (0 = nothing frozen)')
  if blocks == 0:
    return ()
  return ('stem_conv', 'stem_bn') + tuple(f'block_{i}' for i in range(blocks))


def freeze_mask(tree: Mapping[str, Any], spec: ModelSpec, blocks: int) -> Any:
  """A pytree of bools like `tree` (params or batch_stats): True = frozen.

  Scanned stages (`stage_{s}_repeats`) stack several blocks in one array and
  can only be frozen whole; a K that splits one raises.
  """
  frozen = set(frozen_modules(spec, blocks))
  runs = {f'stage_{stage}_repeats': indices
          for stage, indices in network._scanned_runs(spec)}  # pylint: disable=protected-access

  def leaf_frozen(path, _):
    top = path[0].key
    if top in runs:
      inside = [f'block_{i}' in frozen for i in runs[top]]
      if any(inside) and not all(inside):
        raise ValueError(f'freeze_blocks={blocks} splits the scanned {top} (blocks '
                         f'{runs[top][0]}..{runs[top][-1]}); choose a stage boundary or '
                         'model.scan_blocks=False')
      return all(inside)
    return top in frozen

  return jax.tree_util.tree_map_with_path(leaf_frozen, dict(tree))


def freeze(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
  """`tx` for the trainable leaves, zero updates (no decay, no slots) for frozen ones."""
  labels = jax.tree.map(lambda frozen: 'frozen' if frozen else 'train', mask)
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)


def restore_frozen_batch_stats(new: Any, old: Any, mask: Any) -> Any:
  """The train step's updated BN statistics, with the frozen blocks' kept at `old`."""
  return jax.tree.map(lambda frozen, n, o: o if frozen else n, mask, new, old)
