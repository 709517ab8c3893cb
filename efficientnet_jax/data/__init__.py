"""Input pipeline: datasets, preprocessing, augmentation (host-side, tf.data).

The training loop needs only:

  from efficientnet_jax import data
  spec = data.DataSpec('fashion_mnist')
  info = data.dataset_info(spec)
  train = data.make_train_iterator(spec, image_size=32, batch_size=128, seed=0,
                                   normalization='v1', num_classes=10)
  evals = data.make_eval_iterator(spec, image_size=32, batch_size=128,
                                  normalization='v1')

TensorFlow loads on the first use of a pipeline function, not on import, so
the model, the train state and the steps import without it (an accelerator
image without TensorFlow can run them).
"""
import importlib

from efficientnet_jax.data.spec import DataSpec

_LAZY = {'dataset_info': 'input_pipeline', 'make_eval_iterator': 'input_pipeline',
         'make_train_iterator': 'input_pipeline', 'skipped_examples': 'sources'}

__all__ = ['DataSpec', *_LAZY]


def __getattr__(name: str):
  if name in _LAZY:
    module = importlib.import_module(f'efficientnet_jax.data.{_LAZY[name]}')
    return getattr(module, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
