"""The official EfficientNet V1 ImageNet recipe (tensorflow/tpu `main.py`), for B0 by default.

    python train.py --config=configs/base.py --workdir=runs/b0

Hardware: a TPU v3-32 / 8xA100 class machine. Expected: B0 77.1 % top-1 (paper v5,
AutoAugment, EMA weights, 350 epochs at global batch 4096); derived configs
(b1.py ... b7.py) set phi and override only what differs.
"""

import ml_collections


def get_config(arg=None):
  """arg 'smoke' shrinks everything to a 2-step run on a tiny model (tests)."""
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      name='',  # an official variant (b0..b7, lite0.., v2_s..); '' = V1 from phi
      phi=0.0,  # compound coefficient
      scaling='table',  # 'table' (released B1..B7) or 'formula' (alpha**phi, ...)
      alpha=1.2, beta=1.1, gamma=1.15, base_resolution=224,
      width=-1.0, depth=-1.0, resolution=-1,  # > 0 overrides the coefficient
      dropout=-1.0,  # head dropout; < 0 uses the model's (0.2 for B0 ... 0.5 for B7)
      drop_connect=0.2,  # stochastic depth; the paper's 0.3 was corrected to 0.2
      bn_momentum=-1.0,  # < 0: family default (V1 0.99, V2 0.9)
      bn_epsilon=-1.0,  # < 0: family default (1e-3; flax's own default would be 1e-5)
      padding='same',  # TF SAME; 'symmetric' for PyTorch-trained weights
      # Kernels (efficientnet_jax/model/kernels.py): 'auto' is the fastest one on this backend.
      depthwise='auto',  # 'auto', 'grouped', 'shifted', 'dnnl' (make kernels)
      conv='auto',  # 'auto', 'conv', 'matmul', 'dnnl' (make kernels): 1x1, stem and head convs
      # Memory / compile time (efficientnet_jax/model.py); same parameters either way.
      remat=False,  # recompute each block's activations in the backward pass
      scan_blocks=False,  # one nn.scan per stage's repeats: faster compiles for deep models
  ))
  config.dtype = 'bfloat16'  # compute dtype; params, BN stats and the loss stay fp32
  config.num_classes = -1  # < 0: from the dataset
  config.image_size = -1  # < 0: the model's resolution
  config.eval_image_size = -1

  config.data = ml_collections.ConfigDict(dict(
      name='imagenet2012', data_dir='', manual_dir='', folder='', source_dir='',
      train_split='train', eval_split='validation',
      augment='autoaugment',  # 'none', 'autoaugment' (policy v0), 'randaugment'
      randaug_layers=2, randaug_magnitude=10.0,
      mixup_alpha=0.0, cutmix_alpha=0.0,
      crop_padding=32,  # eval centre crop = size / (size + 32)
      inception_crop=True, shuffle_buffer=16_384,
      # Input ops, official by default (efficientnet_jax/data/preprocessing.py, augment.py).
      # Crop recipe: 'v1' tensorflow/tpu efficientnet preprocessing.py; 'v2' google/automl
      # efficientnetv2/preprocessing.py (V2-S..XL: area 0.05-1 train crop, no eval crop >= 320 px).
      crop='v1',
      # 'bicubic_tf1' TF1 resize_bicubic (tensorflow/tpu efficientnet `_resize_image`);
      # 'bilinear_tf1' its BILINEAR (tensorflow/tpu main.py, Lite); 'bilinear'
      # tf.image.resize (google/automl efficientnetv2); 'bicubic' TF2 half-pixel.
      resize='bicubic_tf1',
      aug_pixel_constants='fixed',  # tensorflow/tpu autoaugment.py pixels; 'scaled' < 224 px
      posterize_quirk=True,  # tensorflow/tpu autoaugment.py `posterize`: 0 bits keeps the top bit
      contrast_quirk=True,  # tensorflow/tpu autoaugment.py `contrast`: pixel_count/256, not mean
      solarize_quirk=True,  # tensorflow/tpu autoaugment.py `solarize`: threshold mod 256 (uint8)
      # Multi-process: 'files' = each process reads its own slice (scalable);
      # 'batch' = all walk one global order and keep their rows of each batch
      # (the same global batches whatever the process count; reads everything).
      process_sharding='files',
  ))
  # Where the train state lives: 'replicate' (a copy per device) or 'fsdp'
  # (large params / optimizer / EMA leaves split over the data axis; for the
  # models that do not fit replicated). efficientnet_jax/sharding.py.
  config.sharding = 'replicate'
  # Size of the `model` axis of a 2-D `data x model` mesh (the widest models):
  # large kernels split their output channels over it, the batch splits over
  # the remaining device_count // mesh_model `data` devices. 1 = the 1-D mesh.
  config.mesh_model = 1
  # Optimizer slots and EMA as one vector each ('flat': fewer kernels, faster
  # compiles) or shaped like each param ('per_leaf': what sharding needs).
  # 'auto': flat when replicated on a 1-D mesh. efficientnet_jax/state_layout.py.
  config.state_layout = 'auto'
  # LLVM optimisation level of the train step when it compiles for CPU (XLA's
  # default: 3). 1 compiles B0's step ~12% faster at the same step time
  # (efficientnet_jax/cpu_tuning.py). Accelerators ignore it.
  config.cpu_train_opt_level = 1
  # Batch-norm statistics groups: data-parallel replicas whose batches share one
  # mean/variance (tensorflow/tpu efficientnet `utils.TpuBatchNormalization`,
  # google/automl efficientnetv2 `utils.py`). 0 = the global batch; -1 = the
  # official rule for the family above 8 replicas, the global batch up to 8
  # (efficientnet_jax/bn_groups.py); 1 = each replica's own batch.
  config.bn_group_size = -1

  # EfficientNetV2 progressive learning (efficientnet_jax/progressive.py): image
  # size and regularisation grow stage by stage; each stage has its own input
  # pipeline and compiled train step. The stage's values replace image_size,
  # data.randaug_magnitude / mixup_alpha / cutmix_alpha and model dropout.
  config.progressive = ml_collections.ConfigDict(dict(
      preset='',  # '' = off; 'paper' (Table 6, linear min->max) or 'official' (AutoML code)
      num_stages=4,
      boundaries=(),  # end epoch of each stage, the last = the training length; () = equal
      # min -> max per field; -1 takes the preset's number for model.name (V2-S/M/L/XL).
      image_size_min=-1, image_size_max=-1,
      randaug_magnitude_min=-1.0, randaug_magnitude_max=-1.0,
      mixup_alpha_min=-1.0, mixup_alpha_max=-1.0,
      cutmix_alpha_min=-1.0, cutmix_alpha_max=-1.0,
      dropout_min=-1.0, dropout_max=-1.0,
      # batch_size is the batch at the largest size; smaller stages get
      # batch * (largest / size)**2, a multiple of the device count, at most
      # max_batch_size (> 0), with the LR scaled to each stage's batch.
      adapt_batch_size=False, max_batch_size=-1,
      aot_compile=True,  # compile the next stage's step while the current one trains
  ))
  # JAX persistent compilation cache, so a restart skips compiling: '' = <workdir>/
  # compile_cache unless JAX already has a cache directory; 'none' = off.
  config.compilation_cache_dir = ''

  config.batch_size = 4096  # global
  config.eval_batch_size = 1024
  config.num_epochs = 350.0
  config.train_steps = -1  # > 0 overrides num_epochs

  config.optimizer = 'rmsprop'  # TF1 semantics: ms starts at 1, eps inside the sqrt
  # Linear scaling rule: peak LR = base_lr * batch_size / 256 (0.256 at 4096).
  config.base_lr = 0.016
  config.lr_schedule = 'exponential'  # x0.97 every 2.4 epochs from step 0; or 'cosine'
  config.warmup_epochs = 5.0
  config.lr_decay_epochs = 2.4
  config.lr_decay_rate = 0.97
  config.momentum = 0.9
  config.rmsprop_decay = 0.9
  config.rmsprop_eps = 1e-3
  config.weight_decay = 1e-5  # coupled L2 on every non-BN variable
  config.label_smoothing = 0.1
  config.ema_decay = 0.9999  # warmed up as min(decay, (1+t)/(10+t))

  # Fine-tuning (efficientnet_jax/finetune.py): '' trains from scratch; otherwise
  # what predict.py's --weights takes ('lite0', a weights file, a workdir).
  config.init_from = ''
  config.init_from_model = ''  # our variant name, for a weights file that does not name it
  config.init_from_config = ''  # the training config of an init_from workdir
  config.freeze_blocks = 0  # keep the stem and the first K blocks fixed (0 = train all)

  config.seed = 0
  config.log_every_steps = 100
  config.eval_every_steps = -1  # < 0: once per epoch
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  # A checkpoint whose files differ from its manifest: 'fallback' resumes from the
  # newest intact step (the corrupt one is renamed, not deleted); 'error' stops.
  config.corrupt_checkpoint = 'fallback'
  # Multi-process: a process silent for this long is lost, and the others stop
  # (exit 75) instead of waiting in a collective (efficientnet_jax/distributed.py).
  config.peer_failure_timeout_s = 100

  if arg == 'smoke':
    smoke(config)
  return config


def smoke(config):
  """Used for testing only: a tiny network on mocked data, 2 steps."""
  config.model.name = ''
  config.model.width = 0.25
  config.model.depth = 0.25
  config.model.resolution = 32
  config.model.bn_momentum = 0.9
  config.dtype = 'float32'
  config.data.augment = 'none'
  config.data.inception_crop = False
  config.data.shuffle_buffer = 64
  config.progressive.preset = ''  # one stage at the smoke size
  config.batch_size = 8
  config.eval_batch_size = 8
  config.train_steps = 2
  config.warmup_epochs = 0.0
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1
