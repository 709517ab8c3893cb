"""The jitted computations of training: one optimizer step and one eval batch.

Top-level pure functions; their static parts (model, optimizer, floats) are
bound with functools.partial by the caller, which also jits them with the
state's and the batch's shardings (`train.run`), so tests call them directly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from efficientnet_jax import finetune
from efficientnet_jax import optim
from efficientnet_jax import state_layout
from efficientnet_jax.model import EfficientNet


def train_step(state: dict, batch: dict, key, *, model: EfficientNet, tx,
               ema_decay: float, label_smoothing: float, frozen_batch_stats: Any = None):
  """One optimizer step: (state, batch, key) -> (state, metrics). Jitted by the caller.

  batch['label'] holds (possibly mixed) one-hot targets. The coupled L2 weight
  decay lives in `tx`, so the reported loss is the cross-entropy alone.
  `frozen_batch_stats` (a bool tree like batch_stats) keeps the BN statistics
  of frozen blocks (fine-tuning) at their values: train mode would move them.
  """
  key = jax.random.fold_in(key, state['step'])  # per-step RNG; nothing to checkpoint

  def loss_fn(params):
    logits, updated = model.apply(
        {'params': params, 'batch_stats': state['batch_stats']}, batch['image'],
        train=True, mutable=['batch_stats'], rngs={'dropout': key})
    loss = optim.cross_entropy_loss(logits, batch['label'], label_smoothing)
    return loss, (updated['batch_stats'], logits)

  (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state['params'])
  if frozen_batch_stats is not None:
    batch_stats = finetune.restore_frozen_batch_stats(batch_stats, state['batch_stats'],
                                                      frozen_batch_stats)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = jax.tree.map(lambda p, u: p + u, state['params'], updates)
  step = state['step'] + 1
  ema = optim.update_ema(state['ema'], state_layout.ema_target(params, batch_stats, state['ema']),
                         step, ema_decay)
  top1 = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch['label'], -1))
  new_state = dict(params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema,
                   step=step)
  return new_state, {'loss': loss, 'top1': top1}


def eval_step(variables: dict, batch: dict, *, model: EfficientNet) -> dict:
  """Sums over the real (mask=True) rows: loss, top-1 and top-5 hits, count."""
  logits = model.apply(variables, batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  labels = batch['label']
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  loss = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  top5 = jnp.any(jax.lax.top_k(logits, min(5, logits.shape[-1]))[1] == labels[:, None], -1)
  return {'loss': jnp.sum(loss * mask),
          'top1': jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
          'top5': jnp.sum(top5 * mask),
          'count': jnp.sum(mask)}


@jax.jit
def all_finite(tree) -> jax.Array:
  """One bool: every leaf of `tree` is finite (checked before a checkpoint is saved)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))
