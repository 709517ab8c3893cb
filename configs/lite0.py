"""EfficientNet-Lite0 on ImageNet (ReLU6, no squeeze-excite, fixed stem/head) with the V1 recipe.

    python train.py --config=configs/lite0.py --workdir=runs/lite0

Hardware: a TPU pod slice or GPU cluster (global batch 4096; bf16).
Expected: 75.1 % top-1 (FP32, tensorflow/tpu lite README) at 224 px;
inputs normalised as (x - 127) / 128.
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  if arg != 'smoke':
    config.model.name = 'lite0'
  # tensorflow/tpu efficientnet main.py: Lite resizes with TF1 BILINEAR.
  config.data.resize = 'bilinear_tf1'
  return config
