"""The demo with EfficientNetV2 progressive learning: four stages growing to its full 48 px.

    python train.py --config=configs/demo_progressive.py --workdir=runs/demo_progressive

Hardware: any 2-core CPU machine, no internet; data from /usr/share/datasets/fashion-mnist.
Expected (measured on the shared 2-core CPU machine, load 10-25, see README): stage switches
with stall_s 0.24, 0.13 and 0.15 s (36, 42, 48 px) while the next step compiled for 129-243 s on the
worker thread; with aot_compile=False each switch stalled 120-227 s.

configs/demo.py (8 epochs at batch 128, evaluated at 48 px) trained in 4 stages of 2 epochs at
30, 36, 42 and 48 px, by the paper's rule (linear from min in the first stage to max in
the last) with mixup 0 -> 0.1 and dropout 0.05 -> 0.15 growing alongside. No RandAugment:
its colour ops (invert, solarize, equalize) wreck grey garments, and with RandAugment
0 -> 3 this run ended at 81.6 % instead of 90 %.
Each stage compiles its own train step; the next one is compiled while the current one
trains (`--config.progressive.aot_compile=False` shows the stall this saves), and compiled
programs are cached in <workdir>/compile_cache (a second fresh run loads them instead of
compiling; a resumed run was measured to miss the cache and compile again, not yet explained).
"""

from configs import base
from configs import demo


def get_config(arg=None):
  config = demo.get_config()
  # configs/demo.py's input ops (TF2 bicubic, scaled pixel constants, no quirks).
  config.data.resize, config.data.aug_pixel_constants = 'bicubic', 'scaled'
  config.data.posterize_quirk = config.data.contrast_quirk = False
  config.data.solarize_quirk = False
  p = config.progressive
  p.preset = 'paper'
  p.num_stages = 4
  p.image_size_min, p.image_size_max = 30, config.model.resolution
  p.randaug_magnitude_min, p.randaug_magnitude_max = 0.0, 0.0  # data.augment stays 'none'
  p.mixup_alpha_min, p.mixup_alpha_max = 0.0, 0.1
  p.cutmix_alpha_min, p.cutmix_alpha_max = 0.0, 0.0
  p.dropout_min, p.dropout_max = 0.05, 0.15
  if arg == 'smoke':
    base.smoke(config)
  return config
