"""EfficientNet-B1 on ImageNet with the official V1 recipe (configs/base.py).

    python train.py --config=configs/b1.py --workdir=runs/b1

Hardware: a TPU pod slice or GPU cluster (global batch 4096; bf16).
Expected: 79.1 % top-1 / 94.4 % top-5 (paper v5 Table 2, AutoAugment, EMA weights,
350 epochs) at 240 px, eval crop size/(size+32), bicubic.
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  if arg != 'smoke':
    config.model.phi = 1.0  # width, depth, resolution and dropout from the official table
  return config
