"""EfficientNetV2-S on ImageNet: the official V2 recipe with progressive learning.

    python train.py --config=configs/v2_s.py --workdir=runs/v2_s
    python train.py --config=configs/v2_s.py:paper --workdir=runs/v2_s_paper

Hardware: 32 TPUv3 cores (a TPU v3-32, on which the paper times its training) or a
GPU cluster of similar throughput; global batch 4096, bf16. Walltime not measured here.
Expected: 83.9 % top-1 (google/automl README, ImageNet-1k, 350 epochs, eval at 384 px,
EMA; timm measures the released weights at 83.90). A rerun of the official code on TPU
reached 83.46 (google/automl#1024).

The recipe of google/automl `efficientnetv2/hparams.py` (6a54c87): RMSProp
0.9/0.9, eps 1e-3, lr 0.016 per 256 images (0.256 at 4096) with 5 warmup epochs
and x0.97 every 2.4 epochs, BN momentum 0.9 / eps 1e-3 (the V2 family default),
weight decay 1e-5 not applied to biases or BN gamma/beta, label smoothing 0.1,
EMA 0.9999 (TF1 `main.py`), RandAugment N=2, stochastic depth 0.2.
Progressive learning, 4 stages over the 350 epochs: the 'official' preset (the
code's schedule; S: 171, 214, 257, 300 px, RandAugment 5 -> 10, dropout 0.2
held) by default, or the paper's Table 6 with `:paper` (128 -> 300 px, RA
5 -> 15, dropout 0.1 -> 0.3). `--config.progressive.preset=''` trains the plain
recipe at the final stage's values. Trains on ImageNet minus a 25,021-image minival
(`train_minus_minival`, the official 'train' split; efficientnet_jax/data/splits.py) and
reports on `validation`; the same for configs/v2_m.py, v2_l.py and v2_xl.py.

Input ops as google/automl `efficientnetv2/preprocessing.py`: the train crop samples
area 0.05-1 with min_object_covered 0 (`data.crop='v2'`), bilinear resizing, and the
eval crop size/(size+32) only below 320 px (from 320 px the whole image is squashed).
"""

from configs import base

# Final (max) RandAugment magnitude and mixup = cutmix alpha, AutoML
# efficientnetv2_params; the progressive presets grow towards them.
_AUGMENT = {'v2_s': (10.0, 0.0), 'v2_m': (15.0, 0.2), 'v2_l': (20.0, 0.5),
            'v2_xl': (20.0, 0.5)}


def v2_config(name: str, arg=None):
  """The V2 recipe for `name`; arg: 'paper' / 'official' (the preset) or 'smoke'."""
  config = base.get_config()
  config.model.name = name
  config.data.augment = 'randaugment'
  config.data.randaug_layers = 2
  config.data.randaug_magnitude, mix = _AUGMENT[name]
  config.data.mixup_alpha = config.data.cutmix_alpha = mix
  config.data.crop = 'v2'  # AutoML crops: area 0.05-1 train; no eval crop >= 320 px
  config.data.crop_padding = 32  # AutoML eval crop size/(size+32), below 320 px
  config.data.resize = 'bilinear'  # AutoML `tf.image.resize` default
  config.progressive.preset = arg if arg in ('paper', 'official') else 'official'
  config.progressive.num_stages = 4
  if arg == 'smoke':
    base.smoke(config)
  else:  # google/automl efficientnetv2/main.py lines 336-337: 'train' (minus minival), 'eval'
    config.data.train_split = 'train_minus_minival'
    config.data.eval_split = 'validation'
  return config


def get_config(arg=None):
  return v2_config('v2_s', arg)
