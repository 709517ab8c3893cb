"""Batch-norm statistics groups: how many data-parallel replicas share one mean/variance.

`config.bn_group_size` is read through `resolve_bn_group_size`, a pure function
of the value, the model family and the replica count (the size of the mesh's
data axis), so the dry run (`recipe.py`) and the model agree on it:

* > 0: that many consecutive replicas per group (it must divide the count).
* 0: every replica: statistics over the global batch.
* -1 (default): what the official code runs on a TPU slice of `replicas`
  cores when there are more than 8 replicas; the global batch up to 8. Up to 8
  replicas the official V1 code normalises each replica by its own batch (see
  below); a GPU box or a small slice here keeps synchronised statistics
  instead, and `bn_group_size=1` reproduces the per-replica behaviour.

  - V1 and Lite (tensorflow/tpu `models/official/efficientnet/utils.py`
    `TpuBatchNormalization._moments`, lines 147-151 at 7dc921f; used for
    training by `efficientnet_builder.py` line 200 and
    `lite/efficientnet_lite_builder.py` line 77): 1 (each replica's own batch)
    up to 8 replicas, max(8, replicas // 8) above.
  - V2, V2-B0..B3 included (google/automl `efficientnetv2/utils.py`
    `TpuBatchNormalization._moments` line 189 at 6a54c87, chosen on TPU by
    `efficientnetv2/main.py` lines 78-79): min(8, replicas), i.e. the global
    batch up to 8 replicas and groups of 8 above.

  Both raise, as here, when the group size does not divide the replica count.
"""

from __future__ import annotations

GLOBAL = 0
OFFICIAL = -1
# Families whose official code is google/automl efficientnetv2; every other
# family (v1, lite, mobilenet_v2) follows tensorflow/tpu efficientnet.
AUTOML_FAMILIES = ('v2',)


def official_bn_group_size(family: str, replicas: int) -> int:
  """The official code's group size for `family` on `replicas` replicas.

  Args:
    family: `ModelSpec.family` ('v1', 'lite', 'v2', 'mobilenet_v2').
    replicas: data-parallel replicas (TPU cores in the official code).

  Returns:
    Replicas per statistics group.
  """
  if family in AUTOML_FAMILIES:
    return min(8, replicas)
  return 1 if replicas <= 8 else max(8, replicas // 8)


def resolve_bn_group_size(value: int, family: str, replicas: int) -> int:
  """Replicas per batch-norm statistics group (see the module docstring).

  Args:
    value: `config.bn_group_size`: > 0 explicit, 0 global, -1 official.
    family: `ModelSpec.family`.
    replicas: data-parallel replicas, >= 1.

  Returns:
    A divisor of `replicas`: 1 = per-replica statistics, `replicas` = global.

  Raises:
    ValueError: a value below -1, a replica count below 1, or a group size that
      does not divide the replica count (one line naming the field).
  """
  if isinstance(value, bool) or not isinstance(value, int) or value < OFFICIAL:
    raise ValueError(f'bn_group_size={value!r}; accepted: an int > 0 (replicas per group), '
                     '0 (global batch) or -1 (the official rule)')
  if replicas < 1:
    raise ValueError(f'replicas={replicas}; accepted: >= 1')
  if value == GLOBAL or (value == OFFICIAL and replicas <= 8):
    return replicas
  size = official_bn_group_size(family, replicas) if value == OFFICIAL else value
  if replicas % size:
    rule = ' (the official rule)' if value == OFFICIAL else ''
    raise ValueError(f'bn_group_size={value} gives groups of {size} replicas{rule}, which '
                     f'do not divide the {replicas} data-parallel replicas')
  return size


def bn_group_count(value: int, family: str, replicas: int) -> int:
  """How many statistics groups the global batch splits into (the model's `bn_groups`).

  Groups are consecutive replicas, so with the batch laid out replica by
  replica this is replicas // group size (1 = global statistics).

  Raises:
    ValueError: as `resolve_bn_group_size`.
  """
  return replicas // resolve_bn_group_size(value, family, replicas)
