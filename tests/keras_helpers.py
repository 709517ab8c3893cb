"""Shared pieces of the Keras parity tests: tolerances and a non-trivial random Keras model."""

import keras
import numpy as np

ATOL = 1e-4  # max |logit difference| in fp32
MIN_LOGIT_STD = 1e-2  # the logits must be spread for ATOL to mean something


def randomize(model: keras.Model, images: np.ndarray, seed: int) -> None:
  """Makes every BatchNorm and bias of a weights=None Keras model non-trivial.

  gamma ~ U(0.5, 1.5), beta and all biases ~ N(0, 0.5). The moving statistics
  become the BN input statistics of `images` (one training-mode pass with
  momentum 0 and dropout off): per-channel, data-dependent means and positive
  variances far from Keras' defaults 0 and 1. Calibrating on the very images
  the test compares keeps every BN output at gamma·z + beta, so the 16–79-block
  nets stay O(1). Independent random statistics grow the activations to
  1e3–1e5, and even a separate random calibration batch left V2-L and B5
  ill-conditioned enough that fp32 round-off alone gave 3–8e-4 on the logits
  (our own two depthwise impls then differed by 2e-5).
  """
  rng = np.random.default_rng(seed)
  norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
  drops = [l for l in model.layers if isinstance(l, keras.layers.Dropout)]
  for layer in norms:
    channels = layer.gamma.shape[0]
    layer.gamma.assign(rng.uniform(0.5, 1.5, channels).astype(np.float32))
    layer.beta.assign(rng.normal(0.0, 0.5, channels).astype(np.float32))
  for layer in model.layers:
    if getattr(layer, 'bias', None) is not None:
      layer.bias.assign(rng.normal(0.0, 0.5, layer.bias.shape).astype(np.float32))
  momenta, rates = [l.momentum for l in norms], [l.rate for l in drops]
  for layer in norms:
    layer.momentum = 0.0  # moving statistics := this batch's statistics
  for layer in drops:
    layer.rate = 0.0  # deterministic calibration
  model(images, training=True)
  for layer, momentum in zip(norms, momenta):
    layer.momentum = momentum
  for layer, rate in zip(drops, rates):
    layer.rate = rate
