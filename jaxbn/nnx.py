"""jaxbn for Flax NNX: torch's BatchNorm semantics, freezing and folding on ``flax.nnx`` modules.

The same functional core as the Linen layers (``jaxbn/_src/layer.py``); conversion
(``jaxbn.convert``), ``jaxbn.parity`` and the optimiser masks take NNX modules and states too.
"""

from jaxbn._src.nnx_batch_norm import BatchNorm
from jaxbn._src.nnx_freezing import fold_batchnorm, freeze, keep_eval, trainable, unfreeze
from jaxbn._src.nnx_frozen import FoldedBatchNorm, Frozen, FrozenBatchNorm
from jaxbn._src.nnx_state import to_variables, update

__all__ = [
    "BatchNorm",
    "FoldedBatchNorm",
    "Frozen",
    "FrozenBatchNorm",
    "fold_batchnorm",
    "freeze",
    "keep_eval",
    "to_variables",
    "trainable",
    "unfreeze",
    "update",
]
