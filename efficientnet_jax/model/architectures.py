"""EfficientNet V1, Lite and V2 architectures as typed data, and the block builder.

Block tables are the official ones (tensorflow/tpu `efficientnet_builder.py`,
google/automl `efficientnetv2/effnetv2_configs.py`), plus MobileNetV2 as the
non-EfficientNet baseline of the paper's Table 3 (its inverted residuals are
MBConv blocks without squeeze-excite); `build_blocks` applies
width/depth scaling and the per-block stochastic-depth rate, so the linen
modules in `layers.py` / `model.py` only ever see final, concrete shapes.
"""

from __future__ import annotations

import dataclasses

from efficientnet_jax.model import scaling


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of the base (unscaled) network."""
  repeats: int
  kernel: int
  stride: int
  expand: int
  in_ch: int
  out_ch: int
  se_ratio: float  # 0 disables squeeze-excite
  fused: bool = False  # Fused-MBConv (V2 early stages)


@dataclasses.dataclass(frozen=True)
class Block:
  """One concrete block after scaling; everything a linen block needs."""
  index: int
  stage: int
  in_ch: int
  out_ch: int
  kernel: int
  stride: int
  expand: int
  se_ch: int  # squeeze width; 0 means no SE
  fused: bool
  drop_rate: float  # stochastic-depth rate (used only when `residual`)

  @property
  def residual(self) -> bool:
    return self.stride == 1 and self.in_ch == self.out_ch

  @property
  def expanded_ch(self) -> int:
    return self.in_ch * self.expand


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A complete network description (hashable, so it can be a linen attribute)."""
  name: str
  family: str  # 'v1', 'lite', 'v2' or 'mobilenet_v2'
  stages: tuple[Stage, ...]
  width: float
  depth: float
  resolution: int  # training resolution
  eval_resolution: int
  dropout: float
  drop_connect: float = 0.2
  activation: str = 'swish'  # 'swish' or 'relu6'
  bn_momentum: float = 0.99  # TF/flax convention: ra <- m*ra + (1-m)*batch
  bn_epsilon: float = 1e-3
  ten_percent_rule: bool = True  # V1 rounding; V2 has none
  fix_stem_head: bool = False  # Lite: stem 32 / head 1280 unscaled,
  fix_first_last_repeats: bool = False  # and first/last stage repeats unscaled
  head_ch: int = 1280
  head_min_width: bool = False  # MobileNetV2: widths < 1 keep the head at head_ch
  normalization: str = 'v1'  # input normalisation, see data/preprocessing.py

  def filters(self, channels: int) -> int:
    return scaling.round_filters(channels, self.width,
                                 ten_percent_rule=self.ten_percent_rule)

  @property
  def stem_ch(self) -> int:
    base = self.stages[0].in_ch
    return base if self.fix_stem_head else self.filters(base)

  @property
  def head_features(self) -> int:
    if self.fix_stem_head or (self.head_min_width and self.width <= 1.0):
      return self.head_ch
    return self.filters(self.head_ch)

  def stage_repeats(self) -> tuple[int, ...]:
    last = len(self.stages) - 1
    out = []
    for i, st in enumerate(self.stages):
      fixed = self.fix_first_last_repeats and i in (0, last)
      out.append(st.repeats if fixed else scaling.round_repeats(st.repeats, self.depth))
    return tuple(out)

  def blocks(self) -> tuple[Block, ...]:
    return build_blocks(self)


def build_blocks(spec: ModelSpec) -> tuple[Block, ...]:
  """Flattens stages into blocks with scaled widths and stochastic-depth rates.

  Only the first block of a stage has the stage's stride and in->out change;
  the rest are stride 1 with in == out. The stochastic-depth rate is
  drop_connect * index / N over the *rounded* block count N, so it never
  reaches drop_connect (B0: 0, 0.0125, ..., 0.1875).
  """
  repeats = spec.stage_repeats()
  total = sum(repeats)
  blocks = []
  for s, (st, reps) in enumerate(zip(spec.stages, repeats)):
    in_ch, out_ch = spec.filters(st.in_ch), spec.filters(st.out_ch)
    if s == 0:
      in_ch = spec.stem_ch
    for r in range(reps):
      index = len(blocks)
      block_in = in_ch if r == 0 else out_ch
      # SE width comes from the block *input* channels (tensorflow/tpu#616).
      se_ch = max(1, int(block_in * st.se_ratio)) if st.se_ratio > 0 else 0
      blocks.append(Block(index=index, stage=s, in_ch=block_in, out_ch=out_ch,
                          kernel=st.kernel, stride=st.stride if r == 0 else 1,
                          expand=st.expand, se_ch=se_ch, fused=st.fused,
                          drop_rate=spec.drop_connect * index / total))
  return tuple(blocks)


def _stages(rows, *, se_ratio=0.25):
  """rows: (repeats, kernel, stride, expand, in, out, fused) tuples."""
  return tuple(Stage(r, k, s, e, i, o, 0.0 if fused else se_ratio, fused)
               for r, k, s, e, i, o, fused in rows)


# B0 (tensorflow/tpu _DEFAULT_BLOCKS_ARGS). Strides 1,2,2,2,1,2,1.
V1_BASE_ROWS = (
    (1, 3, 1, 1, 32, 16, False),
    (2, 3, 2, 6, 16, 24, False),
    (2, 5, 2, 6, 24, 40, False),
    (3, 3, 2, 6, 40, 80, False),
    (3, 5, 1, 6, 80, 112, False),
    (4, 5, 2, 6, 112, 192, False),
    (1, 3, 1, 6, 192, 320, False),
)
V1_STAGES = _stages(V1_BASE_ROWS)
LITE_STAGES = _stages(V1_BASE_ROWS, se_ratio=0.0)

# EfficientNetV2 (google/automl effnetv2_configs.py); F = fused, no SE.
V2_STAGES = {
    's': _stages((
        (2, 3, 1, 1, 24, 24, True), (4, 3, 2, 4, 24, 48, True),
        (4, 3, 2, 4, 48, 64, True), (6, 3, 2, 4, 64, 128, False),
        (9, 3, 1, 6, 128, 160, False), (15, 3, 2, 6, 160, 256, False))),
    'm': _stages((
        (3, 3, 1, 1, 24, 24, True), (5, 3, 2, 4, 24, 48, True),
        (5, 3, 2, 4, 48, 80, True), (7, 3, 2, 4, 80, 160, False),
        (14, 3, 1, 6, 160, 176, False), (18, 3, 2, 6, 176, 304, False),
        (5, 3, 1, 6, 304, 512, False))),
    'l': _stages((
        (4, 3, 1, 1, 32, 32, True), (7, 3, 2, 4, 32, 64, True),
        (7, 3, 2, 4, 64, 96, True), (10, 3, 2, 4, 96, 192, False),
        (19, 3, 1, 6, 192, 224, False), (25, 3, 2, 6, 224, 384, False),
        (7, 3, 1, 6, 384, 640, False))),
    'xl': _stages((
        (4, 3, 1, 1, 32, 32, True), (8, 3, 2, 4, 32, 64, True),
        (8, 3, 2, 4, 64, 96, True), (16, 3, 2, 4, 96, 192, False),
        (24, 3, 1, 6, 192, 256, False), (32, 3, 2, 6, 256, 512, False),
        (8, 3, 1, 6, 512, 640, False))),
    'base': _stages((
        (1, 3, 1, 1, 32, 16, True), (2, 3, 2, 4, 16, 32, True),
        (2, 3, 2, 4, 32, 48, True), (3, 3, 2, 4, 48, 96, False),
        (5, 3, 1, 6, 96, 112, False), (8, 3, 2, 6, 112, 192, False))),
}

# MobileNetV2 (arXiv:1801.04381 Table 2; keras.applications.MobileNetV2): t, c, n, s
# = expand, out, repeats, stride; kernel 3, no SE, relu6, stem 32, head 1280.
MOBILENET_V2_STAGES = _stages((
    (1, 3, 1, 1, 32, 16, False), (2, 3, 2, 6, 16, 24, False),
    (3, 3, 2, 6, 24, 32, False), (4, 3, 2, 6, 32, 64, False),
    (3, 3, 1, 6, 64, 96, False), (3, 3, 2, 6, 96, 160, False),
    (1, 3, 1, 6, 160, 320, False)), se_ratio=0.0)

# (width, resolution): the released 1.0 and 1.4 models (timm's mobilenetv2_100 / _140).
MOBILENET_V2_TABLE = {
    'mobilenet_v2': (1.0, 224),
    'mobilenet_v2_140': (1.4, 224),
}

# (width, depth, train size, eval size, dropout), google/automl efficientnetv2_params.
V2_TABLE = {
    'v2_s': ('s', 1.0, 1.0, 300, 384, 0.2),
    'v2_m': ('m', 1.0, 1.0, 384, 480, 0.3),
    'v2_l': ('l', 1.0, 1.0, 384, 480, 0.4),
    'v2_xl': ('xl', 1.0, 1.0, 384, 512, 0.4),
    'v2_b0': ('base', 1.0, 1.0, 192, 224, 0.2),
    'v2_b1': ('base', 1.0, 1.1, 192, 240, 0.2),
    'v2_b2': ('base', 1.1, 1.2, 208, 260, 0.3),
    'v2_b3': ('base', 1.2, 1.4, 240, 300, 0.3),
}

# (width, depth, resolution, dropout), tensorflow/tpu lite/efficientnet_lite_builder.py.
LITE_TABLE = {
    'lite0': (1.0, 1.0, 224, 0.2),
    'lite1': (1.0, 1.1, 240, 0.2),
    'lite2': (1.1, 1.2, 260, 0.3),
    'lite3': (1.2, 1.4, 280, 0.3),
    'lite4': (1.4, 1.8, 300, 0.3),
}


def v1_spec(width: float, depth: float, resolution: int, dropout: float, *,
            name: str = 'custom', stages: tuple[Stage, ...] = V1_STAGES) -> ModelSpec:
  """A V1 network with explicit coefficients (the lowest-level entry point)."""
  return ModelSpec(name=name, family='v1', stages=stages, width=width, depth=depth,
                   resolution=resolution, eval_resolution=resolution, dropout=dropout)


def compound_spec(phi: float, *, scaling_mode: str = 'table', alpha: float = scaling.ALPHA,
                  beta: float = scaling.BETA, gamma: float = scaling.GAMMA,
                  base_resolution: int = scaling.BASE_RESOLUTION,
                  dropout: float | None = None) -> ModelSpec:
  """A V1 network from the compound coefficient phi (table or formula)."""
  c = scaling.compound_coefficients(phi, scaling=scaling_mode, alpha=alpha, beta=beta,
                                    gamma=gamma, base_resolution=base_resolution,
                                    dropout=dropout)
  if scaling_mode == 'table':
    name = f'b{int(phi)}'
  else:
    name = f'phi{phi:g}_a{alpha:g}_b{beta:g}_g{gamma:g}'
  return v1_spec(c.width, c.depth, c.resolution, c.dropout, name=name)


def _lite_spec(name: str) -> ModelSpec:
  w, d, r, dropout = LITE_TABLE[name]
  return ModelSpec(name=name, family='lite', stages=LITE_STAGES, width=w, depth=d,
                   resolution=r, eval_resolution=r, dropout=dropout, activation='relu6',
                   fix_stem_head=True, fix_first_last_repeats=True, normalization='lite')


def _v2_spec(name: str) -> ModelSpec:
  stages, w, d, train, evaluate, dropout = V2_TABLE[name]
  base = stages == 'base'
  return ModelSpec(name=name, family='v2', stages=V2_STAGES[stages], width=w, depth=d,
                   resolution=train, eval_resolution=evaluate, dropout=dropout,
                   bn_momentum=0.9, ten_percent_rule=False,
                   # V2-B0..B3 train with the legacy V1 pipeline (ImageNet mean/std).
                   normalization='v1' if base else 'v2')


def mobilenet_v2_spec(width: float = 1.0, depth: float = 1.0, resolution: int = 224, *,
                      name: str = 'mobilenet_v2') -> ModelSpec:
  """MobileNetV2 at a width / depth multiplier (the scaling baseline).

  Widths round like V1 (multiples of 8 with the 10% rule, = Keras'
  `_make_divisible`), repeats scale by ceil(depth * n) like every other family
  here, and, as in the MobileNetV2 paper and Keras, the 1280 head is scaled
  only by widths > 1. Regularisation follows TF-slim's MobileNetV2 (dropout
  0.2, no stochastic depth); BN momentum is this codebase's recipe value 0.99
  (Keras 0.999, slim 0.997; inference and the weights do not depend on it).
  Inputs: Keras' [-1, 1] (x/127.5 - 1) is closest to our 'v2' (x - 128)/128.
  """
  return ModelSpec(name=name, family='mobilenet_v2', stages=MOBILENET_V2_STAGES,
                   width=width, depth=depth, resolution=resolution,
                   eval_resolution=resolution, dropout=0.2, drop_connect=0.0,
                   activation='relu6', head_min_width=True, normalization='v2')


def _v1_named(name: str) -> ModelSpec:
  w, d, r, dropout = scaling.OFFICIAL_V1_TABLE[name]
  return v1_spec(w, d, r, dropout, name=name)


MODEL_NAMES = (tuple(scaling.OFFICIAL_V1_TABLE) + tuple(LITE_TABLE) + tuple(V2_TABLE)
               + tuple(MOBILENET_V2_TABLE))


def get_spec(name: str) -> ModelSpec:
  """The named official variant: b0..b8, l2, lite0..lite4, v2_s/m/l/xl, v2_b0..b3,
  mobilenet_v2 (_140)."""
  key = name.lower().replace('-', '_')
  if key.startswith('efficientnet_'):
    key = key[len('efficientnet_'):]
  if key in scaling.OFFICIAL_V1_TABLE:
    return _v1_named(key)
  if key in LITE_TABLE:
    return _lite_spec(key)
  if key in V2_TABLE:
    return _v2_spec(key)
  if key in MOBILENET_V2_TABLE:
    width, resolution = MOBILENET_V2_TABLE[key]
    return mobilenet_v2_spec(width, 1.0, resolution, name=key)
  raise ValueError(f'unknown model {name!r}; valid names: {", ".join(MODEL_NAMES)}')


def spec_from_config(cfg) -> ModelSpec:
  """The network a `config.model` section describes (see configs/base.py).

  `name` picks an official variant; an empty name builds a V1 network from
  `phi` with `scaling` 'table' or 'formula' (alpha, beta, gamma,
  base_resolution). `width` / `depth` / `resolution` > 0 override the
  coefficients (single-dimension ablations, small demos); `dropout` >= 0 and
  `drop_connect` >= 0 override the regularisation.
  """
  if cfg.name:
    spec = get_spec(cfg.name)
  else:
    spec = compound_spec(cfg.phi, scaling_mode=cfg.scaling, alpha=cfg.alpha, beta=cfg.beta,
                         gamma=cfg.gamma, base_resolution=cfg.base_resolution)
  changes = {}
  for field in ('width', 'depth'):
    if cfg[field] > 0:
      changes[field] = float(cfg[field])
  if cfg.resolution > 0:
    changes['resolution'] = changes['eval_resolution'] = int(cfg.resolution)
  if cfg.dropout >= 0:
    changes['dropout'] = float(cfg.dropout)
  if cfg.drop_connect >= 0:
    changes['drop_connect'] = float(cfg.drop_connect)
  for field in ('bn_momentum', 'bn_epsilon'):
    if cfg[field] > 0:
      changes[field] = float(cfg[field])
  changes = {k: v for k, v in changes.items() if getattr(spec, k) != v}
  if changes:
    suffix = ','.join(f'{k}={v:g}' for k, v in sorted(changes.items()) if k != 'eval_resolution')
    changes['name'] = f'{spec.name}[{suffix}]' if suffix else spec.name
    spec = dataclasses.replace(spec, **changes)
  return spec
