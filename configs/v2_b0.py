"""EfficientNetV2-B0 on ImageNet: the V2 recipe with V1-style AutoAugment and progressive sizes.

    python train.py --config=configs/v2_b0.py --workdir=runs/v2_b0

Hardware: a TPU pod slice or GPU cluster; global batch 4096, bf16. Walltime not measured here.
Expected: 78.7 % top-1 (google/automl README, ImageNet-1k, 7.1M params;
timm measures the released weights at 78.39), trained up to 192 px, evaluated at 224 px.

As google/automl configures V2-B0..B3 (`effnetv1_autoaug`, "for fair comparison" with V1,
google/automl#1203): the V2 optimiser, schedule, BN momentum 0.9 and weight-decay mask of
configs/v2_s.py, with the legacy V1 input pipeline: AutoAugment policy v0, bicubic, eval
crop size/(size+32), ImageNet mean/std; no mixup or cutmix. Progressive learning as for
every V2 (`effnetv2_configs.py` stages=4, sched=True): four equal stages at
144, 160, 176, 192 px (int(128 + (train - 128)(s+1)/4)); AutoAugment has no magnitude to
grow and the dropout is held. Trains on ImageNet minus minival (`train_minus_minival`,
as the official 'train' split) and reports on `validation`.
"""

from configs import base


def v2_b_config(name: str, arg=None):
  """The V2-B recipe for `name` (v2_b0 .. v2_b3); arg 'smoke' for the smoke variant."""
  config = base.get_config()
  config.model.name = name  # train/eval size and dropout from the official table
  config.data.augment = 'autoaugment'
  config.data.crop_padding = 32
  config.progressive.preset = 'official'
  config.progressive.num_stages = 4
  if arg == 'smoke':
    base.smoke(config)
  else:  # google/automl efficientnetv2/main.py lines 336-337: 'train' (minus minival), 'eval'
    config.data.train_split = 'train_minus_minival'
    config.data.eval_split = 'validation'
  return config


def get_config(arg=None):
  return v2_b_config('v2_b0', arg)
