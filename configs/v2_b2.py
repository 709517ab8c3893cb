"""EfficientNetV2-B2 on ImageNet: the V2 recipe with V1-style AutoAugment and progressive sizes.

    python train.py --config=configs/v2_b2.py --workdir=runs/v2_b2

Hardware: a TPU pod slice or GPU cluster; global batch 4096, bf16. Walltime not measured here.
Expected: 80.5 % top-1 (google/automl README, ImageNet-1k, 10.1M params),
trained up to 208 px, evaluated at 260 px.

As google/automl configures V2-B0..B3 (`effnetv1_autoaug`, "for fair comparison" with V1,
google/automl#1203): the V2 optimiser, schedule, BN momentum 0.9 and weight-decay mask of
configs/v2_s.py, with the legacy V1 input pipeline: AutoAugment policy v0, bicubic, eval
crop size/(size+32), ImageNet mean/std; no mixup or cutmix. Progressive learning as for
every V2 (`effnetv2_configs.py` stages=4, sched=True): four equal stages at
148, 168, 188, 208 px (int(128 + (train - 128)(s+1)/4)); AutoAugment has no magnitude to
grow and the dropout is held. Trains on ImageNet minus minival (`train_minus_minival`,
as the official 'train' split) and reports on `validation`.
"""

from configs import v2_b0


def get_config(arg=None):
  return v2_b0.v2_b_config('v2_b2', arg)
