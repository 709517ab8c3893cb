"""Input pipeline: datasets, preprocessing, augmentation (host-side, tf.data).

The training loop needs only:

  from efficientnet_jax import data
  spec = data.DataSpec('fashion_mnist')
  info = data.dataset_info(spec)
  train = data.make_train_iterator(spec, image_size=32, batch_size=128, seed=0,
                                   normalization='v1', num_classes=10)
  evals = data.make_eval_iterator(spec, image_size=32, batch_size=128,
                                  normalization='v1')
"""
from efficientnet_jax.data.input_pipeline import dataset_info
from efficientnet_jax.data.input_pipeline import make_eval_iterator
from efficientnet_jax.data.input_pipeline import make_train_iterator
from efficientnet_jax.data.sources import DataSpec
from efficientnet_jax.data.sources import skipped_examples

__all__ = [
    'DataSpec', 'dataset_info', 'make_eval_iterator', 'make_train_iterator',
    'skipped_examples'
]
