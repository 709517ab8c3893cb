"""Mixup/CutMix on host batches, as the official V2 code."""
import numpy as np
import pytest

from efficientnet_jax.data import mixing


def batch_of_constants(batch, size=8, classes=None):
  """Image i is constant i; label i is one-hot(i)."""
  images = np.broadcast_to(np.arange(batch, dtype=np.float32)[:, None, None,
                                                              None],
                           (batch, size, size, 3)).copy()
  labels = np.eye(classes or batch, dtype=np.float32)[:batch]
  return images, labels


def test_mixup_mixes_with_the_reversed_batch():
  images, labels = batch_of_constants(6)
  mixed, soft = mixing.mix_batch(images, labels, mixup_alpha=0.4,
                                  cutmix_alpha=0.0,
                                  rng=np.random.default_rng(0))
  again = mixing.mix_batch(images, labels, mixup_alpha=0.4, cutmix_alpha=0.0,
                            rng=np.random.default_rng(0))
  np.testing.assert_array_equal(mixed, again[0])
  assert mixed.dtype == np.float32 and soft.dtype == np.float32
  for i in range(6):
    lam = soft[i, i] if i != 5 - i else 1.0
    assert lam >= 0.5  # λ ← max(λ, 1 − λ)
    np.testing.assert_allclose(mixed[i], lam * i + (1 - lam) * (5 - i),
                               rtol=1e-5)
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)


def test_cutmix_label_weight_is_the_batch_mean_box_area():
  # google/automl efficientnetv2/datasets.py `cutmix`: mix_area =
  # reduce_sum(mask) / size(mask) over the batch, one weight for every label
  # (this test asserted each example's own area before that was fixed).
  images, labels = batch_of_constants(8, size=10)
  mixed, soft = mixing.mix_batch(images, labels, mixup_alpha=0.0,
                                  cutmix_alpha=1.0,
                                  rng=np.random.default_rng(1))
  pasted = [np.mean(mixed[i, ..., 0] == 7 - i) for i in range(8)]
  assert len(set(pasted)) > 1  # the boxes differ, the weights do not
  for i in range(8):
    partner = 7 - i
    assert set(np.unique(mixed[i])) <= {i, partner}
    np.testing.assert_allclose(soft[i, partner], np.mean(pasted), rtol=1e-6)
    np.testing.assert_allclose(soft[i, i], 1 - np.mean(pasted), rtol=1e-6)


def test_mixup_and_cutmix_split_the_batch_in_halves():
  images, labels = batch_of_constants(8, size=10)
  mixed, soft = mixing.mix_batch(images, labels, mixup_alpha=0.3,
                                  cutmix_alpha=0.3,
                                  rng=np.random.default_rng(2))
  # First half: mixup within the half (partner 3 − i), a constant image.
  for i in range(4):
    assert np.ptp(mixed[i]) < 1e-5
    assert soft[i, i] >= 0.5 and soft[i, i] + soft[i, 3 - i] == pytest.approx(1)
  # Second half: cutmix within the half (partner 11 − i), pixels from the two.
  for i in range(4, 8):
    assert set(np.unique(mixed[i])) <= {i, 11 - i}
    assert soft[i, i] + soft[i, 11 - i] == pytest.approx(1)
