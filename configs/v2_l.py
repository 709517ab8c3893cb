"""EfficientNetV2-L on ImageNet: the official V2 recipe with progressive learning.

    python train.py --config=configs/v2_l.py --workdir=runs/v2_l
    python train.py --config=configs/v2_l.py:paper --workdir=runs/v2_l_paper

Hardware: 32 TPUv3 cores (a TPU v3-32, on which the paper times its training) or a
multi-node GPU cluster; global batch 4096, bf16. Walltime not measured here.
Expected: 85.7 % top-1 (google/automl README, ImageNet-1k, 350 epochs, eval at 480 px,
EMA; timm measures the released weights at 85.66).

The recipe of configs/v2_s.py (google/automl efficientnetv2 hparams.py). Progressive
learning, 4 stages: 'official' preset (192, 256, 320, 384 px, RandAugment 5 -> 20, mixup =
cutmix 0 -> 0.5, dropout 0.4 held) by default; `:paper` for the paper's Table 6 (128 ->
380 px, RA 5 -> 25, mixup 0 -> 0.4, dropout 0.1 -> 0.5).
"""

from configs import v2_s


def get_config(arg=None):
  return v2_s.v2_config('v2_l', arg)
