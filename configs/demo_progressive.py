"""The demo with EfficientNetV2 progressive learning: four image sizes growing to its full 48 px.

    python train.py --config=configs/demo_progressive.py --workdir=runs/demo_progressive

configs/demo.py (the same network, 8 epochs at batch 128, evaluated at 48 px) trained in 4
stages of 2 epochs at 36, 40, 44 and 48 px, by the paper's rule (linear from the smallest size
in the first stage to the full one in the last; EfficientNetV2, Tan & Le 2021, Algorithm 1).
36 px is the smallest size whose last feature map is still the full size's 2x2 (five stride-2
stages, SAME padding); at 30 px it is 1x1 and the early stages teach the late ones nothing.

Regularisation is held at the demo's (dropout 0.1, no mixup, no RandAugment) instead of
growing with the size: the demo underfits (train accuracy ~ test accuracy), so there is no
overfitting for stronger regularisation to fight, and RandAugment's colour ops (invert,
solarize, equalize) wreck grey garments.

Each stage compiles its own train step; the next one compiles on a worker thread while the
current one trains (`--config.progressive.aot_compile=False` shows the stall this saves).
Hardware: any 2-core CPU machine, no internet; data from /usr/share/datasets/fashion-mnist.
Expected: experiments/progressive/README.md gives its 3 seeds against the fixed-size demo's
(accuracy and wall time).
"""

from configs import base
from configs import demo


def get_config(arg=None):
  config = demo.get_config()
  p = config.progressive
  p.preset = 'paper'
  p.num_stages = 4
  p.image_size_min, p.image_size_max = 36, config.model.resolution
  p.randaug_magnitude_min, p.randaug_magnitude_max = 0.0, 0.0  # data.augment stays 'none'
  p.mixup_alpha_min, p.mixup_alpha_max = 0.0, 0.0
  p.cutmix_alpha_min, p.cutmix_alpha_max = 0.0, 0.0
  p.dropout_min = p.dropout_max = config.model.dropout
  if arg == 'smoke':
    base.smoke(config)
  return config
