"""The eval preprocessing each kind of weights was measured with (no TensorFlow import).

`eval_preprocessing(spec, origin)` is the one definition predict, embed,
export and evaluate use for imported weights; `from_config` is a training
config's own eval preprocessing (what training evaluates with). Both give the
arguments of `data.preprocessing.eval_image` / `data.make_eval_iterator`.
"""

from __future__ import annotations

import dataclasses
import math

from efficientnet_jax.model.architectures import ModelSpec

# google/automl efficientnetv2 preprocessing.py: the V2-S..XL eval ('v2' crop, bilinear).
V2_AUTOML_VARIANTS = ('v2_s', 'v2_m', 'v2_l', 'v2_xl')
# The eval centre crop of every TF-trained release: tensorflow/tpu efficientnet
# preprocessing.py CROP_PADDING = 32 (the code the V1/Lite checkpoints were
# evaluated with; commit 22d5cab, Nov 2021, later made it round(size/7)) and
# google/automl efficientnetv2 preprocessing.py / preprocess_legacy.py.
TF_CROP_PADDING = 32


@dataclasses.dataclass(frozen=True)
class TimmEvalCfg:
  """Eval settings of one timm PyTorch-trained weight (its `default_cfgs` entry).

  `normalization` is ours nearest to timm's mean/std: 'v1' is exactly
  IMAGENET_DEFAULT_MEAN/STD; 'v2' ((x-128)/128) stands in for
  IMAGENET_INCEPTION_MEAN/STD ((x-127.5)/127.5).
  """
  model: str
  input_size: int
  crop_pct: float
  normalization: str = 'v1'
  test_size: int | None = None
  test_crop_pct: float | None = None
  interpolation: str = 'bicubic'


# huggingface/pytorch-image-models timm/models/efficientnet.py `default_cfgs`
# (master, Aug 2026): `_cfg` defaults crop_pct 0.875, interpolation 'bicubic',
# IMAGENET_DEFAULT mean/std; the entries below override only what is listed.
# timm/data/transforms_factory.py `transforms_imagenet_eval` resizes the short
# side to floor(size / crop_pct) with PIL and centre-crops `size`.
TIMM_PYTORCH_CFGS: dict[str, TimmEvalCfg] = {
    'efficientnet_b0.ra_in1k': TimmEvalCfg('b0', 224, 0.875),
    'efficientnet_b0.ra4_e3600_r224_in1k': TimmEvalCfg('b0', 224, 0.9, 'v2', 256, 1.0),
    'efficientnet_b1.ft_in1k': TimmEvalCfg('b1', 224, 0.875, 'v1', 256, 1.0),
    'efficientnet_b1.ra4_e3600_r240_in1k': TimmEvalCfg('b1', 240, 0.9, 'v2', 288, 1.0),
    'efficientnet_b2.ra_in1k': TimmEvalCfg('b2', 256, 0.875, 'v1', 288, 1.0),
    'efficientnet_b3.ra2_in1k': TimmEvalCfg('b3', 288, 0.875, 'v1', 320, 1.0),
    'efficientnet_lite0.ra_in1k': TimmEvalCfg('lite0', 224, 0.875),
}
# Our variant -> the timm tag its PyTorch-trained weights default to (the
# first-listed, i.e. timm's default, tag of efficientnet_<variant>).
TIMM_DEFAULT_TAG = {'b0': 'efficientnet_b0.ra_in1k', 'b1': 'efficientnet_b1.ft_in1k',
                    'b2': 'efficientnet_b2.ra_in1k', 'b3': 'efficientnet_b3.ra2_in1k',
                    'lite0': 'efficientnet_lite0.ra_in1k'}


@dataclasses.dataclass(frozen=True)
class EvalPreprocessing:
  """The arguments of `data.make_eval_iterator`, and where they come from."""
  image_size: int
  crop: str
  crop_padding: int
  resize: str
  normalization: str
  rule: str  # a short citation of the recipe


def timm_crop_padding(size: int, crop_pct: float) -> int:
  """Our crop_padding for timm's crop_pct.

  timm crops `size` pixels of a short side resized to floor(size / crop_pct),
  i.e. size/(size + padding) of it.
  """
  return math.floor(size / crop_pct) - size


def _timm_preprocessing(spec: ModelSpec, image_size: int | None,
                        timm_cfg: str | None) -> EvalPreprocessing:
  tag = timm_cfg or TIMM_DEFAULT_TAG.get(spec.name)
  if tag not in TIMM_PYTORCH_CFGS:
    what = f'--timm_cfg={timm_cfg}' if timm_cfg else f'--model={spec.name} (origin pytorch)'
    raise ValueError(f'{what}: no timm eval settings; accepted --timm_cfg: '
                     f'{", ".join(TIMM_PYTORCH_CFGS)} (or pass --data.crop_padding and '
                     '--data.resize)')
  cfg = TIMM_PYTORCH_CFGS[tag]
  if cfg.model != spec.name:
    fits = [t for t, c in TIMM_PYTORCH_CFGS.items() if c.model == spec.name]
    raise ValueError(f'--timm_cfg={tag} is for {cfg.model}, the weights are {spec.name}; '
                     f'accepted: {", ".join(fits) or "none"}')
  size = image_size or cfg.input_size
  crop_pct = cfg.test_crop_pct if size == cfg.test_size else cfg.crop_pct
  # TF2 half-pixel bicubic after the crop approximates PIL's antialiased bicubic
  # resize before it; 'bicubic' is the closest of our resize ops.
  return EvalPreprocessing(size, 'v1', timm_crop_padding(size, crop_pct), 'bicubic',
                           cfg.normalization,
                           f'timm {tag}: crop_pct {crop_pct:g}, {cfg.interpolation} (approx.)')


def eval_preprocessing(spec: ModelSpec, origin: str, *, image_size: int | None = None,
                       timm_cfg: str | None = None) -> EvalPreprocessing:
  """The official eval preprocessing for weights of `spec` trained at `origin`.

  Args:
    spec: the weights' variant.
    origin: 'tf' (official TF releases and their ports) or 'pytorch' (timm's
      own training).
    image_size: eval size; default the official one (spec.eval_resolution, or
      timm's input_size).
    timm_cfg: a `TIMM_PYTORCH_CFGS` tag (origin 'pytorch'); default by variant.

  Raises:
    ValueError: an unknown origin, or PyTorch-trained weights timm has no
      settings for.
  """
  if origin == 'pytorch':
    return _timm_preprocessing(spec, image_size, timm_cfg)
  if origin != 'tf':
    raise ValueError(f'origin={origin!r}; accepted: tf, pytorch')
  size = image_size or spec.eval_resolution
  if spec.family == 'lite':
    # tensorflow/tpu efficientnet main.py: Lite resizes with (TF1) BILINEAR.
    return EvalPreprocessing(size, 'v1', TF_CROP_PADDING, 'bilinear_tf1', 'lite',
                             'tensorflow/tpu efficientnet lite (main.py, preprocessing.py)')
  if spec.name in V2_AUTOML_VARIANTS:
    return EvalPreprocessing(size, 'v2', TF_CROP_PADDING, 'bilinear', spec.normalization,
                             'google/automl efficientnetv2 preprocessing.py')
  return EvalPreprocessing(size, 'v1', TF_CROP_PADDING, 'bicubic_tf1', spec.normalization,
                           'tensorflow/tpu efficientnet preprocessing.py')


def from_config(config, spec: ModelSpec, image_size: int | None = None) -> EvalPreprocessing:
  """The eval preprocessing a training config evaluates with (a workdir's weights)."""
  size = image_size or (config.eval_image_size if config.eval_image_size > 0
                        else spec.eval_resolution)
  return EvalPreprocessing(size, config.data.crop, config.data.crop_padding, config.data.resize,
                           spec.normalization, 'the training config (config.data)')


def for_weights(spec: ModelSpec, weights: str, origin: str | None = None, *, config=None,
                image_size: int | None = None) -> EvalPreprocessing:
  """The eval preprocessing of `--weights`: the official one of where they were trained,
  or a workdir's training config's (`config`: a ConfigDict or 'path.py[:arg]')."""
  from efficientnet_jax import config_lib  # pylint: disable=g-import-not-at-top
  from efficientnet_jax.weights import load as weights_load  # pylint: disable=g-import-not-at-top
  kind = weights_load.weights_origin(weights, origin)
  if kind == 'workdir':
    config = config_lib.load(config) if isinstance(config, str) else config
    return from_config(config, spec, image_size)
  return eval_preprocessing(spec, kind, image_size=image_size)

