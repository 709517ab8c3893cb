"""Optimizers, learning-rate schedules, weight-decay masks, EMA and the loss.

Everything here reproduces what the official TensorFlow code *runs*, which is
not always what the papers or optax's defaults say:

* TF1 `RMSPropOptimizer` keeps its second moment starting at 1, puts eps inside
  the square root and the learning rate inside the momentum buffer. optax's
  `rmsprop` reproduces it only with non-default arguments (`make_optimizer`).
* The exponential schedule counts its staircase from step 0 and the linear
  warmup *overrides* it, so the LR never equals the peak
  (`learning_rate_schedule`).
* Weight decay is a coupled L2 term (added to the gradient before the RMS
  scaling), and V1 decays biases while V2 does not (`weight_decay_mask`).
* The parameter EMA warms its decay up with the step and also averages the
  BatchNorm statistics (`ema_decay`, `update_ema`).

The current learning rate is not stored in the optimizer state: the train loop
logs `schedule(step)` with the same schedule it passed to `make_optimizer`.
"""

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

SCHEDULES = ('exponential', 'cosine', 'constant')
OPTIMIZERS = ('rmsprop', 'sgd', 'adamw')

# Module names that hold BatchNorm parameters. Our model names them `bn`,
# `stem_bn`, `dw_bn`, ...; flax auto-names them `BatchNorm_0`; converted Keras
# checkpoints use `batch_normalization`. `bn` must be a whole `_`-separated
# token so that names such as `subnet` are not mistaken for BatchNorm.
_BN_MODULE = re.compile(r'(?:^|_)bn\d*(?:_|$)|batchnorm|batch_norm', re.I)


def learning_rate_schedule(
    *,
    base_lr: float,
    global_batch_size: int,
    steps_per_epoch: int,
    schedule: str = 'exponential',
    warmup_epochs: float = 5.0,
    decay_epochs: float = 2.4,
    decay_rate: float = 0.97,
    total_steps: int | None = None,
    min_lr: float = 0.0,
) -> optax.Schedule:
  """Builds the official EfficientNet learning-rate schedule.

  The peak LR follows the linear scaling rule, peak = base_lr * batch / 256
  (0.016 * 4096 / 256 = 0.256 in the paper). As in `build_learning_rate` of the
  TPU code and `WarmupLearningRateSchedule` of the AutoML V2 code, the decay is
  a function of the global step counted from 0, and for step < W the linear
  warmup peak * step / W replaces it. After warmup the LR is floored at
  `min_lr` (AutoML's `lr_min`).

  * 'exponential': peak * decay_rate ** floor(step / D), D = int(decay_epochs
    * steps_per_epoch). With 5 warmup and 2.4 decay epochs the LR jumps from
    ~peak to 0.97**2 * peak = 0.9409 * peak when warmup ends.
    `optax.warmup_exponential_decay_schedule` is *not* this schedule: it starts
    its staircase at the end of warmup.
  * 'cosine': 0.5 * peak * (1 + cos(pi * step / total_steps)), also counted
    from step 0, reaching `min_lr` at `total_steps` (and held there after).
  * 'constant': peak after warmup.

  Args:
    base_lr: LR for a global batch of 256 (0.016 in the official recipes).
    global_batch_size: Batch size summed over all devices and hosts.
    steps_per_epoch: Optimizer steps per epoch at this batch size.
    schedule: One of `SCHEDULES`.
    warmup_epochs: Length of the linear warmup from 0; 0 disables it.
    decay_epochs: Staircase period of the exponential schedule.
    decay_rate: LR factor per staircase period.
    total_steps: Length of the cosine schedule; required for 'cosine'.
    min_lr: Lower bound on the post-warmup LR.

  Returns:
    A jit-friendly function from the step (int or array) to the LR (float32).

  Raises:
    ValueError: For an unknown schedule, a non-positive `steps_per_epoch`, a
      zero-length decay period or a missing/non-positive `total_steps` for
      'cosine'.
  """
  if schedule not in SCHEDULES:
    raise ValueError(
        f'Unknown learning-rate schedule {schedule!r}; expected one of '
        f'{SCHEDULES}.')
  if steps_per_epoch <= 0:
    raise ValueError(
        f'steps_per_epoch must be positive, got {steps_per_epoch}.')
  # Linear scaling rule (Goyal et al.): the LR grows with the global batch.
  peak = base_lr * global_batch_size / 256
  warmup_steps = int(warmup_epochs * steps_per_epoch)
  decayed_fn = _decayed_fn(schedule, peak, steps_per_epoch=steps_per_epoch,
                           decay_epochs=decay_epochs, decay_rate=decay_rate,
                           total_steps=total_steps)

  def schedule_fn(step):
    step = jnp.asarray(step)
    lr = jnp.maximum(decayed_fn(step), min_lr).astype(jnp.float32)
    if warmup_steps > 0:
      warmup_lr = (peak * step / warmup_steps).astype(jnp.float32)
      lr = jnp.where(step < warmup_steps, warmup_lr, lr)
    return lr

  return schedule_fn


def _decayed_fn(schedule: str, peak: float, *, steps_per_epoch: int, decay_epochs: float,
                decay_rate: float, total_steps: int | None):
  """step -> the schedule's LR before warmup and the floor (see learning_rate_schedule)."""
  if schedule == 'exponential':
    decay_steps = int(decay_epochs * steps_per_epoch)
    if decay_steps < 1:
      raise ValueError(
          f'decay_epochs * steps_per_epoch = {decay_epochs * steps_per_epoch} '
          'is shorter than one step.')
    # floor_divide keeps integer steps exact, where float32 step / D could
    # round up onto the next staircase.
    return lambda step: peak * jnp.power(decay_rate, jnp.floor_divide(step, decay_steps))
  if schedule == 'cosine':
    if total_steps is None or total_steps <= 0:
      raise ValueError(
          f"schedule='cosine' needs a positive total_steps, got {total_steps}.")
    # Clipping holds the LR at its floor instead of rising again when a run is
    # extended past total_steps.
    return lambda step: 0.5 * peak * (
        1.0 + jnp.cos(math.pi * jnp.minimum(step, total_steps) / total_steps))
  return lambda step: jnp.full(jnp.shape(step), peak, jnp.float32)  # 'constant'


def _key_name(key: Any) -> str:
  """The name of one path entry of `jax.tree_util.tree_map_with_path`."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  return str(key)


def weight_decay_mask(params: Any, *, exclude_bias_and_bn_scale: bool = False
                     ) -> Any:
  """Which parameters get weight decay, as a pytree of bools like `params`.

  V1 (TPU code) adds the L2 loss for every trainable variable whose name lacks
  `batch_normalization`, so convolution, depthwise and SE kernels, SE biases
  and the classifier kernel *and bias* are decayed and only BatchNorm
  scale/bias are not. V2 (AutoML code) skips every variable matching
  `.*(bias|gamma|beta).*`, i.e. all biases and the BatchNorm parameters.

  A leaf is a BatchNorm parameter when any module on its path is a BatchNorm
  module by name: a `_`-separated token `bn` (`bn`, `stem_bn`, `dw_bn`,
  `project_bn`, `head_bn`, `bn0`), or `BatchNorm`/`batch_norm(alization)`.

  Args:
    params: The `params` collection (nested dicts of arrays).
    exclude_bias_and_bn_scale: False for the V1 rule, True for the V2 rule.

  Returns:
    A pytree with the structure of `params` and a Python bool per leaf: True
    where the leaf is decayed. Pass it as `weight_decay_mask` to
    `make_optimizer`.
  """

  def decay_leaf(path, _) -> bool:
    names = [_key_name(k) for k in path] or ['']  # [''] for a bare array.
    modules, leaf = names[:-1], names[-1]
    if any(_BN_MODULE.search(m) for m in modules):
      return False
    if exclude_bias_and_bn_scale and leaf == 'bias':
      return False
    return True

  return jax.tree_util.tree_map_with_path(decay_leaf, params)


def make_optimizer(
    *,
    name: str,
    learning_rate: optax.Schedule,
    weight_decay: float,
    weight_decay_mask: Any,
    momentum: float = 0.9,
    rmsprop_decay: float = 0.9,
    rmsprop_eps: float = 1e-3,
    adamw_b1: float = 0.9,
    adamw_b2: float = 0.999,
    flat: bool = False,
) -> optax.GradientTransformation:
  """Builds the optimizer, with the official weight-decay semantics.

  * 'rmsprop': TF1 `tf.train.RMSPropOptimizer(lr, decay, momentum, epsilon)`
    with the official coupled L2. `add_decayed_weights` adds wd * v to the
    gradient of each masked leaf, which is the gradient of TF's
    `loss += wd * sum(tf.nn.l2_loss(v))`, before the RMS scaling. The RMSProp
    needs non-default optax arguments to match TF1: the second moment starts
    at 1 (`initial_scale=1.0`, optax defaults to 0), eps = 1e-3 inside the
    sqrt, and the LR is applied *before* the momentum trace, so
    mom <- momentum * mom + lr * g / sqrt(ms + eps); v <- v - mom.
  * 'sgd': the same coupled L2, then SGD with Nesterov momentum (as the flax
    ImageNet example uses). optax applies the LR after the momentum trace.
  * 'adamw': `optax.adamw` with decoupled decay, which optax multiplies by the
    learning rate (v <- v - lr * (adam_update + wd * v)).

  With `flat`, everything, the weight decay included, runs on one vector of all
  parameters (`_flat_chain`, see state_layout.py). Same updates either way.

  The LR is not kept in the optimizer state; log `learning_rate(step)` from
  the train loop. The schedule is evaluated at optax's own update count, which
  starts at 0 like TF's `global_step`, so the first update uses lr(0).

  Args:
    name: One of `OPTIMIZERS`.
    learning_rate: Schedule (or constant) for the LR, e.g. from
      `learning_rate_schedule`.
    weight_decay: L2 coefficient (1e-5 in the official recipes).
    weight_decay_mask: Pytree of bools (`weight_decay_mask`), a callable from
      params to such a pytree, or None to decay every leaf.
    momentum: Momentum of 'rmsprop' and 'sgd'.
    rmsprop_decay: Decay of the RMSProp second moment.
    rmsprop_eps: RMSProp epsilon, added inside the square root.
    adamw_b1: Adam first-moment decay.
    adamw_b2: Adam second-moment decay.
    flat: keep the optimizer state as one vector per slot ('flat' state layout).

  Returns:
    The optax gradient transformation.

  Raises:
    ValueError: For an unknown optimizer name.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {name!r}; expected one of {OPTIMIZERS}.')
  if name == 'rmsprop':  # coupled L2: the decay comes before the RMS scaling
    before, after = None, optax.rmsprop(learning_rate, decay=rmsprop_decay, eps=rmsprop_eps,
                                        initial_scale=1.0, eps_in_sqrt=True, momentum=momentum)
  elif name == 'sgd':
    before, after = None, optax.sgd(learning_rate, momentum=momentum, nesterov=True)
  else:  # adamw, optax.adamw's own chain: decoupled decay after the moments
    before, after = (optax.scale_by_adam(b1=adamw_b1, b2=adamw_b2),
                     optax.scale_by_learning_rate(learning_rate))
  if flat:
    return _flat_chain(before, weight_decay, weight_decay_mask, after)
  decay = optax.add_decayed_weights(weight_decay, mask=weight_decay_mask)
  return optax.chain(*[t for t in (before, decay, after) if t is not None])


def _flat_chain(before: optax.GradientTransformation | None, weight_decay: float,
                mask: Any, after: optax.GradientTransformation | None
                ) -> optax.GradientTransformation:
  """`chain(before, add_decayed_weights(weight_decay, mask), after)` on one flat vector.

  The gradients, parameters and every slot are concatenated into one vector
  each (`jax.tree.leaves` order, as `optax.flatten`); the decay is added there
  too, with the leaf mask spread over the vector. Same updates as the chain on
  the tree, and the same state structure as `chain(optax.flatten(before),
  decay, optax.flatten(after))`. Doing the decay leaf by leaf instead costs
  XLA:CPU one compiled kernel per decayed leaf (118 in B0's train step).
  """
  decay = optax.add_decayed_weights(weight_decay, mask=mask)  # only its (empty) state is used
  stages = [decay if t is decay else optax.with_extra_args_support(t)
            for t in (before, decay, after) if t is not None]

  def decayed_vector(params):
    keep = mask(params) if callable(mask) else mask
    if keep is None:
      return ravel_pytree(params)[0]
    return ravel_pytree(jax.tree.map(lambda p, k: p if k else jnp.zeros_like(p),
                                     params, keep))[0]

  def init_fn(params):
    vector = ravel_pytree(params)[0]
    return tuple(stage.init(params if stage is decay else vector) for stage in stages)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError('weight decay needs the params: pass them to tx.update')
    vector, unravel = ravel_pytree(updates)
    params_vector = ravel_pytree(params)[0]
    new_state = []
    for stage, stage_state in zip(stages, state):
      if stage is decay:
        vector = vector + weight_decay * decayed_vector(params)
      else:
        vector, stage_state = stage.update(vector, stage_state, params_vector, **extra_args)
      new_state.append(stage_state)
    return unravel(vector), tuple(new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ema_decay(step: jax.typing.ArrayLike, max_decay: float) -> jax.Array:
  """TF `ExponentialMovingAverage(max_decay, num_updates=step)` decay.

  min(max_decay, (1 + step) / (10 + step)): early shadows follow the weights
  closely, and 0.9999 is reached only at step 89,990. Without this warmup an
  EMA evaluated in the first epochs is still mostly the random init.

  Args:
    step: The number of optimizer updates applied so far (TF passes the global
      step after its increment); int or array.
    max_decay: The decay after warmup, e.g. 0.9999.

  Returns:
    The decay as a float32 scalar array.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(max_decay), (1.0 + step) / (10.0 + step))


def update_ema(ema: Any, new: Any, step: jax.typing.ArrayLike,
               max_decay: float) -> Any:
  """One EMA update, ema <- decay * ema + (1 - decay) * new, over any pytree.

  Pass `{'params': ..., 'batch_stats': ...}`: the TF code averages the BN
  moving mean/variance too, and an EMA without them would evaluate with BN
  statistics that do not match the averaged weights.

  Args:
    ema: The current shadow pytree.
    new: The freshly updated values, with the structure of `ema`.
    step: Passed to `ema_decay`.
    max_decay: Passed to `ema_decay`.

  Returns:
    The new shadow pytree.
  """
  return optax.incremental_update(new, ema, 1.0 - ema_decay(step, max_decay))


def cross_entropy_loss(logits: jax.Array, soft_labels: jax.Array,
                       label_smoothing: float) -> jax.Array:
  """Mean softmax cross-entropy against label-smoothed targets, in float32.

  Smoothing follows `optax.smooth_labels`: (1 - a) * labels + a / K, applied to
  the (possibly mixup-mixed) one-hot targets before the cross-entropy.
  Logits are cast to float32 first because under bf16 the log-softmax over
  1000 classes loses too much precision.

  Args:
    logits: [batch, classes] logits of any float dtype.
    soft_labels: [batch, classes] target distributions (one-hot or mixed).
    label_smoothing: Smoothing factor a (0.1 in the official recipes).

  Returns:
    The scalar float32 mean loss over the batch.
  """
  targets = optax.smooth_labels(soft_labels.astype(jnp.float32),
                                label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32),
                                     targets).mean()
