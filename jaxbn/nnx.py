"""jaxbn for Flax NNX: torch's BatchNorm semantics, freezing and folding on ``flax.nnx`` modules,
and torch's other layers in torch's layout (``Conv``, ``Linear``, ``Sequential``: what
``jaxbn.emit(api="nnx")``'s source builds).

The same functional core as the Linen layers (``jaxbn/_src/layer.py``); conversion
(``jaxbn.convert``), ``jaxbn.parity`` and the optimiser masks take NNX modules and states too.
"""

from jaxbn._src.nnx.batch_norm import BatchNorm
from jaxbn._src.nnx.freezing import (
    fold_batchnorm,
    freeze,
    keep_eval,
    trainable,
    unfreeze,
)
from jaxbn._src.nnx.frozen import FoldedBatchNorm, FrozenBatchNorm
from jaxbn._src.torchlike.nnx import (
    Conv,
    ConvTranspose,
    Embedding,
    GroupNorm,
    Held,
    LayerNorm,
    Linear,
    Sequential,
    Stochastic,
    Tensor,
    initialise_missing,
    uninitialised,
)
from jaxbn._src.variables.state import Frozen, to_variables, update

__all__ = [
    "BatchNorm",
    "Conv",
    "ConvTranspose",
    "Embedding",
    "FoldedBatchNorm",
    "Frozen",
    "FrozenBatchNorm",
    "GroupNorm",
    "Held",
    "LayerNorm",
    "Linear",
    "Sequential",
    "Stochastic",
    "Tensor",
    "fold_batchnorm",
    "freeze",
    "initialise_missing",
    "keep_eval",
    "to_variables",
    "trainable",
    "unfreeze",
    "uninitialised",
    "update",
]
