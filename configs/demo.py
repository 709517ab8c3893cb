"""The embedded default: a small EfficientNet on Fashion-MNIST from Debian's package.

    make demo   # = python train.py --config=configs/demo.py --workdir=runs/demo

Hardware: any 2-core CPU machine, no internet; data from /usr/share/datasets/fashion-mnist.
Expected: see README (measured accuracy and time on the 2-core CI machine).
"""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.model.name = ''
  config.model.phi = 0.0
  config.model.width = 0.5
  config.model.depth = 0.5
  config.model.resolution = 32
  config.model.bn_momentum = 0.9  # short runs: running stats must converge quickly
  config.dtype = 'float32'  # XLA:CPU has no fast bf16 convolutions
  config.data.name = 'fashion_mnist'
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.data.augment = 'none'
  config.data.inception_crop = False  # 28 px garments fill the frame; just resize + flip
  config.data.crop_padding = 0
  config.data.shuffle_buffer = 20_000
  config.batch_size = 128
  config.eval_batch_size = 512
  config.num_epochs = 6.0
  config.optimizer = 'rmsprop'
  config.base_lr = 0.016
  config.warmup_epochs = 0.5
  config.lr_decay_epochs = 0.5
  config.lr_decay_rate = 0.8
  config.ema_decay = 0.999
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  if arg == 'smoke':
    base.smoke(config)
  return config
