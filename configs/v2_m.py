"""EfficientNetV2-M on ImageNet: the official V2 recipe with progressive learning.

    python train.py --config=configs/v2_m.py --workdir=runs/v2_m
    python train.py --config=configs/v2_m.py:paper --workdir=runs/v2_m_paper

Hardware: 32 TPUv3 cores (a TPU v3-32, on which the paper times its training) or a
multi-node GPU cluster; global batch 4096, bf16. Walltime not measured here.
Expected: 85.2 % top-1 (google/automl README, ImageNet-1k, 350 epochs, eval at 480 px,
EMA; timm measures the released weights at 85.21). A rerun of the official code on TPU
reached 84.46 (google/automl#1024).

The recipe of configs/v2_s.py (google/automl efficientnetv2 hparams.py). Progressive
learning, 4 stages: 'official' preset (192, 256, 320, 384 px, RandAugment 5 -> 15, mixup =
cutmix 0 -> 0.2, dropout 0.3 held) by default; `:paper` for the paper's Table 6 (128 ->
380 px, RA 5 -> 20, mixup 0 -> 0.2, dropout 0.1 -> 0.4).
"""

from configs import v2_s


def get_config(arg=None):
  return v2_s.v2_config('v2_m', arg)
