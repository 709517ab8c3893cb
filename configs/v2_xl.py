"""EfficientNetV2-XL on ImageNet: the official V2 recipe with progressive learning.

    python train.py --config=configs/v2_xl.py --workdir=runs/v2_xl
    python train.py --config=configs/v2_xl.py:paper --workdir=runs/v2_xl_paper

Hardware: a TPU pod slice or multi-node GPU cluster; global batch 4096, bf16.
Walltime not measured here.
Expected: no ImageNet-1k-only number is published: XL was released only with
ImageNet-21k pretraining (google/automl README: 87.2 % after 21k -> 1k fine-tuning,
not this recipe); eval at 512 px.

The recipe of configs/v2_s.py (google/automl efficientnetv2 hparams.py). Progressive
learning, 4 stages: 'official' preset (192, 256, 320, 384 px, RandAugment 5 -> 20, mixup =
cutmix 0 -> 0.5, dropout 0.4 held) by default; `:paper` for the paper's Table 6 (not
in Table 6; L's numbers: 128 -> 380 px, RA 5 -> 25, mixup 0 -> 0.4, dropout 0.1 -> 0.5).
"""

from configs import v2_s


def get_config(arg=None):
  return v2_s.v2_config('v2_xl', arg)
