"""Parameters and multiply-adds of any EfficientNet, beside the official figures.

    python -m efficientnet_jax.model_table            # every named variant
    python -m efficientnet_jax.model_table --json
    python -m efficientnet_jax.model_table --phi=3 --scaling=formula --alpha=1.3

Parameters come from `jax.eval_shape` of `model.init` (no compute, so B7, L2
and V2-XL are instant) and count what the official releases count: conv/FC
weights, biases and BN scale/offset, not BN running statistics. Multiply-adds
(the paper's "FLOPs" column) are counted analytically per layer; a test
cross-checks them against XLA's cost analysis.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from efficientnet_jax.model import architectures
from efficientnet_jax.model import scaling
from efficientnet_jax.model.architectures import ModelSpec
from efficientnet_jax.model import create_model

# Official parameter counts: B0-B7 from the released checkpoints / Keras, the rest
# computed from the official block tables (= timm's published counts); MobileNetV2
# = keras.applications.MobileNetV2's trainable weights (BN statistics excluded).
OFFICIAL_PARAMS = {
    'b0': 5_288_548, 'b1': 7_794_184, 'b2': 9_109_994, 'b3': 12_233_232,
    'b4': 19_341_616, 'b5': 30_389_784, 'b6': 43_040_704, 'b7': 66_347_960,
    'b8': 87_413_142, 'l2': 480_309_308,
    'lite0': 4_652_008, 'lite1': 5_416_680, 'lite2': 6_092_072, 'lite3': 8_197_096,
    'lite4': 13_006_568,
    'v2_s': 21_458_488, 'v2_m': 54_139_356, 'v2_l': 118_515_272, 'v2_xl': 208_119_808,
    'v2_b0': 7_139_704, 'v2_b1': 8_141_052, 'v2_b2': 10_096_086, 'v2_b3': 14_358_406,
    'mobilenet_v2': 3_504_872, 'mobilenet_v2_140': 6_108_776,
}
# Published multiply-adds: EfficientNet paper Table 2 (arXiv:1905.11946v5), the
# tensorflow/tpu Lite README, the google/automl V2 README (at eval size), and the
# MobileNetV2 paper (arXiv:1801.04381 Table 6 / its model list).
PUBLISHED_MACS = {
    'b0': 0.39e9, 'b1': 0.70e9, 'b2': 1.0e9, 'b3': 1.8e9, 'b4': 4.2e9, 'b5': 9.9e9,
    'b6': 19e9, 'b7': 37e9,
    'lite0': 407e6, 'lite1': 631e6, 'lite2': 899e6, 'lite3': 1.44e9, 'lite4': 2.64e9,
    'v2_s': 8.4e9, 'v2_m': 24.7e9, 'v2_l': 56.3e9,
    'v2_b0': 0.72e9, 'v2_b1': 1.2e9, 'v2_b2': 1.7e9, 'v2_b3': 3.0e9,
    'mobilenet_v2': 300e6, 'mobilenet_v2_140': 585e6,
}


def count_params(spec: ModelSpec, num_classes: int = 1000) -> int:
  """Trainable parameters, from shapes only."""
  model = create_model(spec, num_classes=num_classes)
  shapes = jax.eval_shape(
      lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False),
      jax.random.key(0))
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes['params'])))


def count_macs(spec: ModelSpec, resolution: int | None = None,
               num_classes: int = 1000) -> int:
  """Multiply-adds of one forward pass of one image, layer by layer.

  Counts convolutions, the SE 1x1 convs and the classifier; BN, activations,
  pooling and the SE gating multiply are not multiply-adds of a weight layer
  and, as in the paper, are not counted. Output sizes follow TF SAME padding.
  """
  size = resolution or spec.resolution
  size = math.ceil(size / 2)
  macs = size * size * 3 * 3 * 3 * spec.stem_ch
  for b in spec.blocks():
    out = math.ceil(size / b.stride)
    if b.fused:
      mid = b.expanded_ch if b.expand != 1 else b.out_ch
      macs += out * out * b.kernel * b.kernel * b.in_ch * mid
      if b.expand != 1:
        macs += out * out * mid * b.out_ch
    else:
      if b.expand != 1:
        macs += size * size * b.in_ch * b.expanded_ch
      macs += out * out * b.kernel * b.kernel * b.expanded_ch
      if b.se_ch:
        macs += 2 * b.expanded_ch * b.se_ch
      macs += out * out * b.expanded_ch * b.out_ch
    size = out
  macs += size * size * spec.blocks()[-1].out_ch * spec.head_features
  macs += spec.head_features * num_classes
  return int(macs)


def table_rows(specs: list[ModelSpec], *, eval_size: bool = True) -> list[dict]:
  """One row per spec; V2 is counted at its eval size (as its README), V1 at its resolution."""
  rows = []
  for spec in specs:
    resolution = spec.eval_resolution if eval_size else spec.resolution
    params = count_params(spec)
    macs = count_macs(spec, resolution)
    coeff_multiple = spec.depth * spec.width**2 * (resolution / scaling.BASE_RESOLUTION)**2
    row = dict(model=spec.name, family=spec.family, width=spec.width, depth=spec.depth,
               resolution=resolution, params=params, macs=macs,
               compute_multiple=round(coeff_multiple, 3),
               official_params=OFFICIAL_PARAMS.get(spec.name),
               published_macs=PUBLISHED_MACS.get(spec.name))
    row['params_diff'] = (None if row['official_params'] is None
                          else params - row['official_params'])
    row['macs_deviation_pct'] = (None if row['published_macs'] is None else
                                 round(100 * (macs / row['published_macs'] - 1), 2))
    rows.append(row)
  return rows


def _fmt(value, fmt):
  return '-' if value is None else format(value, fmt)


def format_table(rows: list[dict]) -> str:
  header = (f'{"model":<28}{"res":>5}{"params":>14}{"official":>14}{"diff":>6}'
            f'{"MACs (G)":>10}{"paper (G)":>10}{"dev %":>8}{"x B0":>8}')
  lines = [header, '-' * len(header)]
  for r in rows:
    lines.append(
        f'{r["model"]:<28}{r["resolution"]:>5}{r["params"]:>14,}'
        f'{_fmt(r["official_params"], ","):>14}{_fmt(r["params_diff"], "d"):>6}'
        f'{r["macs"] / 1e9:>10.3f}'
        f'{_fmt(r["published_macs"] and r["published_macs"] / 1e9, ".3g"):>10}'
        f'{_fmt(r["macs_deviation_pct"], "+.1f"):>8}{r["compute_multiple"]:>8.2f}')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--json', action='store_true', help='print a JSON array')
  parser.add_argument('--models', nargs='*', default=None,
                      help=f'names (default: all): {", ".join(architectures.MODEL_NAMES)}')
  parser.add_argument('--phi', type=float, action='append', default=None,
                      help='count a compound-scaled V1 network instead (repeatable)')
  parser.add_argument('--scaling', default='table', help='table or formula (with --phi)')
  parser.add_argument('--alpha', type=float, default=scaling.ALPHA)
  parser.add_argument('--beta', type=float, default=scaling.BETA)
  parser.add_argument('--gamma', type=float, default=scaling.GAMMA)
  parser.add_argument('--base-resolution', type=int, default=scaling.BASE_RESOLUTION)
  args = parser.parse_args(argv)
  try:
    if args.phi is not None:
      specs = [architectures.compound_spec(
          phi, scaling_mode=args.scaling, alpha=args.alpha, beta=args.beta,
          gamma=args.gamma, base_resolution=args.base_resolution) for phi in args.phi]
    else:
      specs = [architectures.get_spec(n) for n in (args.models or architectures.MODEL_NAMES)]
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  rows = table_rows(specs)
  if args.json:
    print(json.dumps(rows, indent=1))
  else:
    print(format_table(rows))
    if args.phi is not None:
      c = args.alpha * args.beta**2 * args.gamma**2
      print(f'\nalpha*beta^2*gamma^2 = {c:.3f} (the paper constrains it to ~2; '
            f'each unit of phi multiplies compute by about this much)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
