"""Fine-tuning the real ImageNet Lite0 weights vs training Lite0 from scratch, same steps.

  .venv/bin/python scripts/finetune_vs_scratch.py --train=2000 --test=1000 --size=64 --steps=300

A small standalone measurement (no workdir, no checkpoints): the first
`--train` Fashion-MNIST training images and `--test` test images from
/usr/share/datasets/fashion-mnist, resized once to `--size` px (PIL bicubic,
grey -> RGB, Lite normalisation), then for each run the same number of steps
of steps.train_step (RMSProp, cosine LR with 5 % warmup, label smoothing 0.1)
at batch `--batch`, and top-1 on the test images with the raw and EMA
weights. Runs:
  finetune   Lite0 with the pretrained backbone (finetune.init_state_from), new head
  frozen     the same with the stem and the first --freeze blocks frozen
  scratch    Lite0 from a random initialisation, at each --scratch_lr
Each run prints one JSON line; the last line is a summary table.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from efficientnet_jax.weights import load as weights_load
from efficientnet_jax import state as state_lib
from efficientnet_jax import steps
from efficientnet_jax import finetune
from efficientnet_jax import optim
from efficientnet_jax import predict
from efficientnet_jax.data import fashion_mnist


def load(split: str, count: int, size: int):
  images, labels = fashion_mnist.load_split(split)
  images, labels = images[:count], labels[:count].astype(np.int32)
  resized = np.stack([np.asarray(Image.fromarray(i).resize((size, size), Image.BICUBIC)
                                 .convert('RGB'), np.float32) for i in images])
  return predict.normalize(resized, 'lite'), labels


def run(name, *, model, pretrained, lr, freeze_blocks, data, args):
  (x_train, y_train), (x_test, y_test) = data
  schedule = optim.learning_rate_schedule(
      base_lr=lr * 256 / args.batch, global_batch_size=args.batch,
      steps_per_epoch=max(1, len(x_train) // args.batch), schedule='cosine',
      warmup_epochs=0.05 * args.steps / max(1, len(x_train) // args.batch),
      total_steps=args.steps)
  tx = optim.make_optimizer(name='rmsprop', learning_rate=schedule, weight_decay=1e-5,
                            weight_decay_mask=optim.weight_decay_mask)
  state = state_lib.create_train_state(jax.random.key(args.seed), model=model, tx=tx,
                                   image_size=args.size)
  copied = 0
  if freeze_blocks:
    tx = finetune.freeze(tx, finetune.freeze_mask(state['params'], model.spec, freeze_blocks))
  if pretrained is not None:
    state, report = finetune.init_state_from(state, pretrained, tx=tx)
    copied = len(report.copied)
  elif freeze_blocks:
    state = dict(state, opt_state=tx.init(state['params']))
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   ema_decay=args.ema_decay, label_smoothing=0.1),
                 donate_argnums=0)
  evaluate = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), -1))
  rng = np.random.default_rng(args.seed)
  order = np.concatenate([rng.permutation(len(x_train))
                          for _ in range(args.steps * args.batch // len(x_train) + 1)])
  start = time.perf_counter()
  losses = []
  for i in range(args.steps):
    idx = order[i * args.batch:(i + 1) * args.batch]
    batch = {'image': x_train[idx], 'label': jax.nn.one_hot(y_train[idx], 10)}
    state, metrics = step(state, batch, jax.random.key(i))
    if (i + 1) % 50 == 0:
      losses.append(round(float(metrics['loss']), 4))
      print(f'  {name} step {i + 1}/{args.steps} loss {losses[-1]}', file=sys.stderr,
            flush=True)
  train_s = time.perf_counter() - start

  def accuracy(variables):
    hits = 0
    for s in range(0, len(x_test), 250):
      hits += int(np.sum(np.asarray(evaluate(variables, x_test[s:s + 250])) ==
                         y_test[s:s + 250]))
    return hits / len(x_test)

  result = {'run': name, 'lr_peak': lr, 'freeze_blocks': freeze_blocks,
            'copied_variables': copied, 'steps': args.steps, 'batch': args.batch,
            'top1_raw': accuracy({'params': state['params'],
                                  'batch_stats': state['batch_stats']}),
            'top1_ema': accuracy(state['ema']), 'loss_every_50': losses,
            'train_seconds': round(train_s, 1)}
  print(json.dumps(result), flush=True)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--train', type=int, default=2000)
  parser.add_argument('--test', type=int, default=1000)
  parser.add_argument('--size', type=int, default=64)
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--finetune_lr', type=float, default=0.001)
  parser.add_argument('--scratch_lr', type=float, nargs='*', default=[0.001, 0.004])
  parser.add_argument('--freeze', type=int, default=0,
                      help='> 0: also a fine-tuning run with stem + this many blocks frozen')
  parser.add_argument('--ema_decay', type=float, default=0.99)
  parser.add_argument('--skip_finetune', action='store_true', help='only the other runs')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  start = time.perf_counter()
  data = (load('train', args.train, args.size), load('test', args.test, args.size))
  source, pretrained, _ = weights_load.load_weights('lite0')
  # The module the weights were trained as (TF SAME padding, BN epsilon 1e-3),
  # with a 10-way head; the scratch runs use the same module.
  model = source.clone(num_classes=10)
  results = []
  if not args.skip_finetune:
    results.append(run('finetune', model=model, pretrained=pretrained, lr=args.finetune_lr,
                       freeze_blocks=0, data=data, args=args))
  if args.freeze:
    results.append(run(f'frozen{args.freeze}', model=model, pretrained=pretrained,
                       lr=args.finetune_lr, freeze_blocks=args.freeze, data=data, args=args))
  for lr in args.scratch_lr:
    results.append(run('scratch', model=model, pretrained=None, lr=lr, freeze_blocks=0,
                       data=data, args=args))
  print(f'# {args.train} train / {args.test} test Fashion-MNIST images at {args.size} px, '
        f'{args.steps} steps of batch {args.batch}; total {time.perf_counter() - start:.0f} s')
  print('| run | peak LR | test top-1 (raw) | test top-1 (EMA) | train s |')
  print('|---|---|---|---|---|')
  for r in results:
    print(f"| {r['run']} | {r['lr_peak']:g} | {r['top1_raw']:.3f} | {r['top1_ema']:.3f} | "
          f"{r['train_seconds']} |")


if __name__ == '__main__':
  main()
