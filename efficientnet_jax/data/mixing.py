"""Mixup and CutMix on a host numpy batch, as the official V2 code.

google/automl `efficientnetv2/datasets.py` (commit 6a54c87, `ImageNetInput.
mixup`, `cutmix`, `cutmix_mask`, `mixing`) mixes *batched* data: each example
is mixed with the batch reversed, with a per-example λ (mixup) or box (cutmix);
CutMix labels are weighted by one scalar, the boxes' mean area. Mixing
the normalised images equals mixing raw pixels, since normalisation is affine
and the weights sum to 1. All randomness comes from the numpy `rng` argument;
the input pipeline seeds it per step, so mixing is deterministic and resumable.
"""
import numpy as np


def mixup(images: np.ndarray, labels: np.ndarray, alpha: float,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Mixes each example with the reversed batch, λ ~ Beta(α, α) per example.

  λ ← max(λ, 1 − λ), so the example keeps the larger share.
  """
  lam = rng.beta(alpha, alpha, size=len(images)).astype(np.float32)
  lam = np.maximum(lam, 1.0 - lam)
  lam_images = lam.reshape((-1,) + (1,) * (images.ndim - 1))
  images = lam_images * images + (1.0 - lam_images) * images[::-1]
  labels = lam[:, None] * labels + (1.0 - lam[:, None]) * labels[::-1]
  return images, labels


def cutmix(images: np.ndarray, labels: np.ndarray, alpha: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Pastes one box per example from the reversed batch.

  Box centre uniform over the image, sides int(√(1 − a)·(H, W)) with
  a ~ Beta(α, α), clipped to the image. As the official `cutmix`
  (mix_area = reduce_sum(mask) / size(mask) over the whole batch of masks),
  every label gets the same weight: the clipped boxes' area fraction averaged
  over the batch, not the example's own box area.
  """
  batch, height, width = images.shape[:3]
  cy = rng.integers(0, height, size=batch)
  cx = rng.integers(0, width, size=batch)
  ratio = np.sqrt(1.0 - rng.beta(alpha, alpha, size=batch))
  half_h = (ratio * height).astype(np.int64) // 2
  half_w = (ratio * width).astype(np.int64) // 2
  y1, y2 = np.clip(cy - half_h, 0, height), np.clip(cy + half_h, 0, height)
  x1, x2 = np.clip(cx - half_w, 0, width), np.clip(cx + half_w, 0, width)
  rows, cols = np.arange(height)[None, :], np.arange(width)[None, :]
  in_rows = (rows >= y1[:, None]) & (rows < y2[:, None])
  in_cols = (cols >= x1[:, None]) & (cols < x2[:, None])
  box = in_rows[:, :, None] & in_cols[:, None, :]
  images = np.where(box[..., None], images[::-1], images)
  # One scalar for the batch: the official mean of the stacked masks.
  area = np.float32(box.mean())
  labels = (1.0 - area) * labels + area * labels[::-1]
  return images, labels


def mix_batch(images: np.ndarray, labels: np.ndarray, *, mixup_alpha: float,
              cutmix_alpha: float,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Applies mixup and/or cutmix to a host batch as the official V2 code.

  Both on: the first half (B // 2) gets mixup and the rest cutmix, each half
  mixed with its own reverse.

  Args:
    images: float [B, H, W, C].
    labels: float [B, num_classes] one-hot (or soft) labels.
    mixup_alpha: Beta parameter for mixup; 0 disables it.
    cutmix_alpha: Beta parameter for cutmix; 0 disables it.
    rng: numpy generator; seed it per step for determinism.

  Returns:
    (images, labels) with the input dtypes.
  """
  dtype_images, dtype_labels = images.dtype, labels.dtype
  if mixup_alpha and cutmix_alpha:
    half = len(images) // 2
    im1, lab1 = mixup(images[:half], labels[:half], mixup_alpha, rng)
    im2, lab2 = cutmix(images[half:], labels[half:], cutmix_alpha, rng)
    images, labels = np.concatenate([im1, im2]), np.concatenate([lab1, lab2])
  elif mixup_alpha:
    images, labels = mixup(images, labels, mixup_alpha, rng)
  elif cutmix_alpha:
    images, labels = cutmix(images, labels, cutmix_alpha, rng)
  return images.astype(dtype_images), labels.astype(dtype_labels)
