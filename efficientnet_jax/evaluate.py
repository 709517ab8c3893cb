"""Top-1 / top-5 over a whole eval split: a training workdir, or imported weights.

  python -m efficientnet_jax.evaluate --config=configs/demo.py --workdir=runs/demo
  python -m efficientnet_jax.evaluate --weights=efficientnet-b3 --data.data_dir=/data/tfds
  python -m efficientnet_jax.evaluate --weights=lite0 --data.name=folder --data.folder=val/

Workdir (`--workdir`; `--weights=<workdir>` is the same): the checkpoint's EMA
and raw weights on the config's eval split with the config's eval
preprocessing. The config is `--config`, or else the `config.json` training
saved in the workdir. `--step` picks a checkpoint (default the newest),
`--image_size` another eval resolution.

Imported weights (`--weights`, resolved as in predict.py: lite0..2, an official
TF checkpoint, a Keras .h5, a timm / lukemelas .pth; `--model`, `--origin`) on
`--data.name` (default imagenet2012, split `--data.split`, default
'validation') with the official eval preprocessing of where the weights were
trained (`eval_presets.eval_preprocessing`):

| origin  | weights                               | crop            | resize       | norm.  |
|---------|---------------------------------------|-----------------|--------------|--------|
| tf      | V1 B0-B7, V2-B0..B3: TF checkpoints,  | v1, keeps       | bicubic_tf1  | model's|
|         | Keras .h5, lukemelas, timm tf_*       | size/(size+32)  |              |        |
| tf      | Lite0-4, --weights=lite0..2           | v1, same        | bilinear_tf1 | lite   |
| tf      | V2-S/M/L/XL                           | v2: same < 320  | bilinear     | v2     |
|         |                                       | px, none >= 320 |              |        |
| pytorch | timm's own (efficientnet_b0..b3,      | v1, crop_pct:   | bicubic      | timm's |
|         | efficientnet_lite0): TIMM_PYTORCH_CFGS| floor(s/pct)-s  | (approx.)    |        |

`--image_size`, `--data.crop`, `--data.crop_padding`, `--data.resize`,
`--normalization` override any of them; `--timm_cfg` picks another timm weight
tag. A folder dataset (`--data.name=folder --data.folder=DIR`) names each
class subfolder by its ImageNet WordNet ID (`n07920052`, the ILSVRC2012
layout) or class index (`967` or `0967`). `--json` prints one JSON object
(top1/top5 are fractions; experiments/table2/table2.py --eval_json reads it).
`evaluate_split` is the eval loop training uses too.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.resources
import json
import os
import re
import sys
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from efficientnet_jax import config_lib
from efficientnet_jax import eval_presets
from efficientnet_jax.eval_presets import EvalPreprocessing
from efficientnet_jax import data
from efficientnet_jax import sharding
from efficientnet_jax import state as state_lib
from efficientnet_jax import state_layout
from efficientnet_jax import steps
from efficientnet_jax.experiment import Experiment
from efficientnet_jax.model import EfficientNet
from efficientnet_jax.weights import load as weights_load

IMAGENET_CLASSES = 1000


@functools.cache
def _imagenet_synsets() -> dict[str, int]:
  """WordNet ID -> class index, from efficientnet_jax/imagenet_classes.txt."""
  text = importlib.resources.files('efficientnet_jax').joinpath('imagenet_classes.txt')
  out = {}
  for line in text.read_text(encoding='utf-8').splitlines():
    if line and not line.startswith('#'):
      index, synset, _ = line.split('\t')
      out[synset] = int(index)
  return out


def imagenet_label_map(class_names: Sequence[str], folder: str) -> np.ndarray:
  """ImageNet class index of each folder class (sorted subfolder names).

  Raises:
    ValueError: a name that is neither a WordNet ID nor an index 0..999, or two
      folders naming one class.
  """
  synsets, indices = _imagenet_synsets(), []
  for name in class_names:
    if re.fullmatch(r'n\d{8}', name) and name in synsets:
      indices.append(synsets[name])
    elif re.fullmatch(r'\d{1,4}', name) and int(name) < IMAGENET_CLASSES:
      indices.append(int(name))
    else:
      raise ValueError(f'--data.folder={folder}: class folder {name!r} is neither an '
                       'ImageNet WordNet ID (e.g. n07920052) nor a class index 0..999')
  if len(set(indices)) != len(indices):
    raise ValueError(f'--data.folder={folder}: two class folders name the same ImageNet '
                     f'class ({", ".join(class_names)})')
  return np.asarray(indices, np.int32)


def evaluate_batches(eval_fn, variables_by_name: dict, batches: Iterable[dict],
                     mesh) -> dict:
  """Loss/top-1/top-5/count over `batches` (host batches) for each variable set."""
  totals = {name: None for name in variables_by_name}
  batch_sharding = sharding.batch_sharding(mesh)
  for host_batch in batches:
    batch = sharding.to_global(host_batch, batch_sharding)
    for name, variables in variables_by_name.items():
      sums = eval_fn(variables, batch)
      totals[name] = sums if totals[name] is None else jax.tree.map(
          jnp.add, totals[name], sums)
  out = {}
  for name, sums in totals.items():
    if sums is None:
      raise ValueError('the eval split is empty')
    sums = jax.device_get(sums)
    count = max(float(sums['count']), 1.0)
    out[name] = {'loss': float(sums['loss']) / count, 'top1': float(sums['top1']) / count,
                 'top5': float(sums['top5']) / count, 'count': int(sums['count'])}
  return out


def evaluate_split(eval_fn, variables_by_name: dict, exp: Experiment, config, mesh) -> dict:
  """Top-1/top-5/loss over the whole eval split for each variable set (EMA, raw)."""
  prep = eval_presets.from_config(config, exp.spec, exp.eval_image_size)
  batches = data.make_eval_iterator(
      exp.data, image_size=prep.image_size,
      batch_size=config.eval_batch_size // jax.process_count(),
      normalization=prep.normalization, crop=prep.crop, crop_padding=prep.crop_padding,
      resize=prep.resize, process_index=jax.process_index(),
      process_count=jax.process_count())
  return evaluate_batches(eval_fn, variables_by_name, batches, mesh)


def evaluate_checkpoint(config, workdir: str, step: int | None = None,
                        image_size: int | None = None) -> dict:
  """{'step', 'image_size', 'ema': {...}, 'raw': {...}} of a workdir's checkpoint."""
  config_lib.check(config)
  # The config's mesh and state layout (sharding, mesh_model), as in training.
  mesh = sharding.make_mesh(model=config.mesh_model)
  sharding.check_batch_size(config.eval_batch_size, mesh, field='eval_batch_size')
  exp, state, step = state_lib.load_checkpoint(config, workdir, step, mesh)
  if image_size:
    exp = dataclasses.replace(exp, eval_image_size=image_size)
  raw = state_lib.raw_variables(state)
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=exp.model),
                    in_shardings=(jax.tree.map(lambda a: a.sharding, raw),
                                  sharding.batch_sharding(mesh)),
                    out_shardings=sharding.replicated(mesh))
  results = evaluate_split(eval_fn, {'ema': state_layout.ema_variables(state), 'raw': raw},
                           exp, config, mesh)
  return {'step': step, 'image_size': exp.eval_image_size, **results}


def _label_map(spec: data.DataSpec, num_classes: int) -> tuple[np.ndarray, int]:
  """(dataset label -> logit index, examples skipped); 1001-way heads have background 0."""
  if num_classes not in (IMAGENET_CLASSES, IMAGENET_CLASSES + 1):
    raise ValueError(f'the weights have {num_classes} classes; accepted: 1000 or 1001 '
                     '(ImageNet); evaluate a training workdir with --workdir/--config')
  info = data.dataset_info(spec)
  names = info['class_names']
  if spec.name == 'folder':
    labels = imagenet_label_map(names, spec.folder)
  elif len(names) == IMAGENET_CLASSES:
    labels = np.arange(IMAGENET_CLASSES, dtype=np.int32)
  else:
    raise ValueError(f'--data.name={spec.name} has {len(names)} classes; ImageNet weights '
                     'need the 1000 ImageNet classes (imagenet2012, imagenet_v2, or a folder)')
  return labels + (num_classes - IMAGENET_CLASSES), info['num_skipped']


def evaluate_weights(module: EfficientNet, variables: dict, spec: data.DataSpec,
                     prep: EvalPreprocessing, *, batch_size: int = 64) -> dict:
  """Imported ImageNet weights over `spec`'s whole eval split, preprocessed as `prep` says.

  Returns:
    {'loss', 'top1', 'top5' (fractions), 'count', 'skipped' (files that do not decode)}.
  """
  mesh = sharding.make_mesh()
  sharding.check_batch_size(batch_size, mesh)
  label_map, skipped = _label_map(spec, module.num_classes)
  batches = data.make_eval_iterator(
      spec, image_size=prep.image_size, batch_size=batch_size // jax.process_count(),
      normalization=prep.normalization, crop=prep.crop, crop_padding=prep.crop_padding,
      resize=prep.resize, process_index=jax.process_index(),
      process_count=jax.process_count())
  batches = (dict(b, label=label_map[b['label']]) for b in batches)
  replicated = sharding.replicated(mesh)
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=module),
                    in_shardings=(replicated, sharding.batch_sharding(mesh)),
                    out_shardings=replicated)
  variables = jax.device_put(variables, replicated)
  result = evaluate_batches(eval_fn, {'weights': variables}, batches, mesh)['weights']
  return {**result, 'skipped': skipped}


# dest -> flag of the options only an imported-weights evaluation takes.
_DATA_FLAGS = {'data_name': '--data.name', 'data_dir': '--data.data_dir',
               'data_split': '--data.split', 'data_folder': '--data.folder',
               'crop': '--data.crop', 'crop_padding': '--data.crop_padding',
               'resize': '--data.resize', 'normalization': '--normalization',
               'timm_cfg': '--timm_cfg', 'batch_size': '--batch_size'}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m efficientnet_jax.evaluate',
                                   description=__doc__.split('\n')[0])
  weights_load.add_weights_args(parser)
  parser.set_defaults(weights=None)  # evaluate names its weights (or a workdir) explicitly
  parser.add_argument('--workdir', default=None,
                      help='a training workdir (--config, default the config.json saved there)')
  add = parser.add_argument
  add('--data.name', dest='data_name', default=None,
      help="imagenet2012 (default), another 1000-class TFDS name, or 'folder'")
  add('--data.data_dir', dest='data_dir', default=None, help='TFDS data_dir')
  add('--data.split', dest='data_split', default=None, help="split (default 'validation')")
  add('--data.folder', dest='data_folder', default=None,
      help='folder dataset root: <root>/<WordNet ID or class index>/*.jpg')
  add('--data.crop', dest='crop', default=None, help="override: 'v1' or 'v2'")
  add('--data.crop_padding', dest='crop_padding', type=int, default=None,
      help='override: crop keeps size/(size+padding) of the short side')
  add('--data.resize', dest='resize', default=None,
      help='override: bicubic_tf1, bilinear, bicubic or bilinear_tf1')
  add('--normalization', default=None, help="override: 'v1', 'v2' or 'lite'")
  add('--timm_cfg', default=None, help='origin pytorch: the timm weight tag '
      f'({", ".join(eval_presets.TIMM_PYTORCH_CFGS)}); default by --model')
  add('--batch_size', type=int, default=None, help='global eval batch (default 64)')
  add('--image_size', type=int, default=None,
      help='eval resolution (default: the official one of the weights)')
  add('--json', action='store_true', help='print one JSON object')
  return parser.parse_args(argv)


def _data_spec(args: argparse.Namespace) -> data.DataSpec:
  name = args.data_name or 'imagenet2012'
  split = args.data_split or 'validation'
  if (name == 'folder') != (args.data_folder is not None):
    raise ValueError(f'--data.name={name} with --data.folder={args.data_folder}; accepted: '
                     '--data.folder together with --data.name=folder')
  return data.DataSpec(name=name, data_dir=args.data_dir, folder=args.data_folder,
                       train_split=split, eval_split=split)


def _preprocessing(module: EfficientNet, origin: str, args) -> EvalPreprocessing:
  overrides = {k: v for k, v in (('crop', args.crop), ('crop_padding', args.crop_padding),
                                 ('resize', args.resize),
                                 ('normalization', args.normalization)) if v is not None}
  if args.timm_cfg and origin != 'pytorch':
    raise ValueError(f'--timm_cfg={args.timm_cfg} applies to PyTorch-trained timm weights '
                     f'(--origin=pytorch); these are {origin}-trained')
  if origin == 'pytorch' and {'crop_padding', 'resize'} <= set(overrides):
    base = eval_presets.eval_preprocessing(module.spec, 'tf', image_size=args.image_size)
  else:
    base = eval_presets.eval_preprocessing(module.spec, origin, image_size=args.image_size,
                              timm_cfg=args.timm_cfg)
  if overrides:
    rule = f'{base.rule}, overridden: {", ".join(f"{k}={v}" for k, v in overrides.items())}'
    base = dataclasses.replace(base, **overrides, rule=rule)
  return base


def evaluate_weights_from_args(args: argparse.Namespace) -> tuple[dict, list[str]]:
  """The `--weights` evaluation: (JSON-ready result, notes for stderr)."""
  spec = _data_spec(args)
  module, variables, notes = weights_load.load_weights_from_args(args)
  origin = weights_load.weights_origin(args.weights, args.origin)
  prep = _preprocessing(module, origin, args)
  result = evaluate_weights(module, variables, spec, prep, batch_size=args.batch_size or 64)
  if result['skipped']:
    notes.append(f'{result["skipped"]} files that do not decode were skipped')
  out = {'weights': args.weights, 'model': module.spec.name, 'origin': origin,
         'num_classes': module.num_classes,
         'data': {'name': spec.name, 'split': spec.eval_split, 'data_dir': spec.data_dir,
                  'folder': spec.folder},
         'preprocessing': dataclasses.asdict(prep), **result}
  return out, notes


def _workdir_args(args: argparse.Namespace):
  """(workdir, ConfigDict) of a workdir evaluation; ValueError for flags it does not take.

  The config is `--config`, or else the one the run saved in the workdir (a
  study's runs have no config file of their own).
  """
  if args.workdir and args.weights:
    raise ValueError(f'--workdir={args.workdir} and --weights={args.weights}; accepted: one')
  workdir = args.workdir or args.weights
  given = [flag for dest, flag in _DATA_FLAGS.items() if getattr(args, dest) is not None]
  if given:
    raise ValueError(f'{", ".join(given)} apply to imported --weights; a workdir is '
                     "evaluated on its config's eval split and preprocessing")
  config = config_lib.load(args.config) if args.config else config_lib.load_saved(workdir)
  return workdir, config


def _print_text(out: dict) -> None:
  if 'ema' in out:
    for name in ('ema', 'raw'):
      r = out[name]
      print(f'step {out["step"]} @ {out["image_size"]}px {name}: top1 {r["top1"]:.4f} '
            f'top5 {r["top5"]:.4f} loss {r["loss"]:.4f} ({r["count"]} examples)')
    return
  p = out['preprocessing']
  print(f'{out["weights"]} ({out["model"]}, {out["origin"]}-trained) on {out["data"]["name"]}'
        f':{out["data"]["split"]} @ {p["image_size"]}px, crop {p["crop"]}/{p["crop_padding"]}, '
        f'{p["resize"]}, {p["normalization"]}: top1 {out["top1"]:.4f} top5 {out["top5"]:.4f} '
        f'loss {out["loss"]:.4f} ({out["count"]} examples; {p["rule"]})')


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
  args = parse_args(argv)
  notes = []
  try:
    if not args.workdir and not args.weights:
      raise ValueError('nothing to evaluate; accepted: --weights=<lite0|file|TF checkpoint> '
                       'or --workdir=<dir> [--config=<file>]')
    if args.workdir or weights_load.is_workdir(args.weights):
      workdir, config = _workdir_args(args)
      out = evaluate_checkpoint(config, workdir, args.step, args.image_size)
    else:
      out, notes = evaluate_weights_from_args(args)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for note in notes:
    print(f'note: {note}', file=sys.stderr)
  if args.json:
    print(json.dumps(out))
  else:
    _print_text(out)
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main())
