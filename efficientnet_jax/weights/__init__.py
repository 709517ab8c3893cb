"""Weight importers from other EfficientNet implementations.

`keras.py` (keras.applications), `pytorch.py` (lukemelas / timm state dicts,
read torch-free by `torch_format.py` and `safetensors_format.py`) and
`tf_checkpoint.py` (official tensorflow/tpu and google/automl checkpoints).
"""
