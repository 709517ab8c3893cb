"""The import report and matching loop shared by the Keras, PyTorch and TF-checkpoint importers.

Every one of our variables is looked up by name in the source, never by
position; what is missing, left over or of another shape is collected in an
`ImportReport`, and the import raises unless the caller allows a partial
result. One report class for every source, so callers (predict.py) handle
them alike: `report.create_model()` builds the module the weights fit.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, NamedTuple

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from efficientnet_jax.model.architectures import ModelSpec
from efficientnet_jax.model import EfficientNet, create_model

Path = tuple[str, ...]
# A (1, 64, 64, 3) input is enough for every variant's shapes (stride 32 -> 2x2).
_TEMPLATE_INPUT = (1, 64, 64, 3)


class Missing(NamedTuple):
  """One of our variables that no source variable filled."""
  ours: str
  source: str | None  # the source key looked for; None if ours has no counterpart

  def __str__(self) -> str:
    return f'{self.ours} (looked for {self.source})' if self.source else self.ours


class ShapeMismatch(NamedTuple):
  """One of our variables whose source counterpart has another shape."""
  ours: str
  source: str
  our_shape: tuple[int, ...]
  source_shape: tuple[int, ...]  # after the layout transpose

  def __str__(self) -> str:
    return f'{self.ours} {self.our_shape} <- {self.source} {self.source_shape}'


@dataclasses.dataclass
class ImportReport:
  """What an import filled, what it could not, and how to build the matching model.

  Attributes:
    loaded: our variable paths ('params/block_3/dw_conv/kernel') that were filled.
    missing: our variables with no source counterpart, with the key looked for.
    unexpected: source keys that none of ours took.
    shape_mismatches: pairs found by name whose shapes differ (left unfilled).
    ignored: source keys skipped on purpose (BN `num_batches_tracked`,
      optimizer slots, `global_step`, EMA shadows of unused variables).
    ema: our variable paths whose value came from an ExponentialMovingAverage
      shadow variable (TF checkpoints).
    notes: non-fatal facts about using these weights (padding, BN epsilon,
      input normalisation).
    spec: the architecture the weights were matched against, with the BN
      epsilon the weights were trained with.
    model_kwargs: `create_model` keyword arguments that reproduce the source
      (num_classes / include_top, padding); see `create_model`.
    preprocessing: source variables of input-preprocessing layers, skipped on
      purpose (Keras' Rescaling/Normalization; see weights/keras.py).
    normalization: what the source's own preprocessing computes, when measured
      (Keras: a `keras.KerasNormalization`).
    source: the source's name in summaries ('Keras', 'TF', 'PyTorch').
    missing_group: when set, the summary counts missing variables per group
      (e.g. per block) instead of listing them; missing entries come in whole
      blocks when the depth differs.
  """
  loaded: list[str] = dataclasses.field(default_factory=list)
  missing: list[Missing] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  shape_mismatches: list[ShapeMismatch] = dataclasses.field(default_factory=list)
  ignored: list[str] = dataclasses.field(default_factory=list)
  ema: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  spec: ModelSpec | None = None
  model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  preprocessing: list[str] = dataclasses.field(default_factory=list)
  normalization: Any = None
  source: str = 'source'
  missing_group: Callable[[Missing], str] | None = dataclasses.field(
      default=None, repr=False, compare=False)

  @property
  def ok(self) -> bool:
    """True when every variable of ours was filled and every source weight was used."""
    return not (self.missing or self.unexpected or self.shape_mismatches)

  def create_model(self, **overrides: Any) -> EfficientNet:
    """Our module configured like the source (padding, BN epsilon, classifier)."""
    if self.spec is None:
      raise ValueError('this report has no spec')
    return create_model(self.spec, **{**self.model_kwargs, **overrides})

  def summary(self, limit: int = 20) -> str:
    """A readable account; long lists are cut to `limit` entries."""

    def section(title, items):
      if not items:
        return []
      lines = [f'{title} ({len(items)}):']
      lines += [f'  {item}' for item in items[:limit]]
      if len(items) > limit:
        lines.append(f'  ... and {len(items) - limit} more')
      return lines

    lines = [f'loaded {len(self.loaded)} variables'
             + (f' ({len(self.ema)} from EMA shadows)' if self.ema else '')
             + (f'; ignored {len(self.ignored)} source keys' if self.ignored else '')]
    if self.missing_group is None:
      lines += section(f'missing (ours without a {self.source} weight)', self.missing)
    else:
      groups: dict[str, int] = {}
      for item in self.missing:
        group = self.missing_group(item)
        groups[group] = groups.get(group, 0) + 1
      lines += section(
          f'missing: {len(self.missing)} of our variables have no {self.source} weight; '
          'by module',
          [f'{group}: {count} variables'
           for group, count in sorted(groups.items(), key=lambda g: natural_key(g[0]))])
    lines += section(f'unexpected ({self.source} weights unused)', self.unexpected)
    lines += section(f'shape mismatches (ours <- {self.source})', self.shape_mismatches)
    lines += section('notes', self.notes)
    return '\n'.join(lines)


def natural_key(text: str) -> list:
  """Sort key that puts block_2 before block_11."""
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', text)]


def variable_template(module: EfficientNet) -> dict[Path, jax.ShapeDtypeStruct]:
  """Flat {path: shape/dtype} of the module's variables, without computing values."""
  shapes = jax.eval_shape(
      lambda key: module.init(key, jnp.zeros(_TEMPLATE_INPUT), train=False),
      jax.random.key(0))
  return flax.traverse_util.flatten_dict(shapes)


def match_variables(template: Mapping[Path, Any], weights: Mapping[str, np.ndarray],
                    source_key: Callable[[Path], str | None],
                    transform: Callable[[Path, np.ndarray], np.ndarray],
                    report: ImportReport) -> tuple[dict[Path, np.ndarray], set[str]]:
  """Fills each of our variables from the source key that names it.

  Args:
    template: our flat variables (shapes/dtypes).
    weights: source arrays by key.
    source_key: our path -> source key (None when ours has no counterpart).
    transform: converts a source array to our layout.
    report: receives loaded / missing / shape_mismatches.

  Returns:
    (filled, used): our flat arrays and the source keys consumed.
  """
  filled, used = {}, set()
  for path, leaf in template.items():
    ours = '/'.join(path)
    key = source_key(path)
    if key is None or key not in weights:
      report.missing.append(Missing(ours, key))
      continue
    used.add(key)
    value = transform(path, np.asarray(weights[key]))
    if value.shape != tuple(leaf.shape):
      report.shape_mismatches.append(
          ShapeMismatch(ours, key, tuple(leaf.shape), tuple(value.shape)))
      continue
    filled[path] = value.astype(leaf.dtype)
    report.loaded.append(ours)
  return filled, used


def finish(filled: dict[Path, np.ndarray], report: ImportReport, *, what: str,
           allow_partial: bool, base_variables: Mapping[str, Any] | None) -> dict[str, Any]:
  """Raises on an incomplete import unless allowed; merges into `base_variables`."""
  if not report.ok and not allow_partial:
    raise ValueError(f'{what}:\n{report.summary()}\n'
                     '(pass allow_partial=True to accept a partial import)')
  if base_variables is not None:
    flat = flax.traverse_util.flatten_dict(dict(base_variables))
    flat.update(filled)
    filled = flat
  return flax.traverse_util.unflatten_dict(filled)
