"""The EfficientNet family as flax.linen modules.

One job per module, imported in this order (each only imports those before it):
`scaling` (compound coefficients, channel/repeat rounding) -> `architectures`
(block tables of V1, Lite, V2 and MobileNetV2 as typed data) -> `kernels`
(XLA:CPU fast paths as pure functions) -> `blocks` (linen layers: convs, BN,
squeeze-excite, MBConv) -> `remat` -> `network` (the `EfficientNet` module).
"""

from efficientnet_jax.model.network import EfficientNet
from efficientnet_jax.model.network import create_model
from efficientnet_jax.model.network import infer
from efficientnet_jax.model.network import resolve_infer_chunk
from efficientnet_jax.model.network import stack_block_variables
from efficientnet_jax.model.network import unstack_block_variables

__all__ = ['EfficientNet', 'create_model', 'infer', 'resolve_infer_chunk',
           'stack_block_variables', 'unstack_block_variables']
