"""EfficientNet-B5 on ImageNet with the official V1 recipe (configs/base.py).

    python train.py --config=configs/b5.py --workdir=runs/b5

Hardware: a TPU pod slice or GPU cluster (global batch 4096; bf16).
Expected: 83.6 % top-1 / 96.7 % top-5 (paper v5 Table 2, AutoAugment, EMA weights,
350 epochs) at 456 px, eval crop size/(size+32), bicubic.
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  if arg != 'smoke':
    config.model.phi = 5.0  # width, depth, resolution and dropout from the official table
  return config
