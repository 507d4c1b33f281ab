"""torch's layers as Flax Linen modules in torch's layout (channels first), with torch's default
initialisation: what ``jaxbn.port`` runs and ``jaxbn.emit``'s source builds."""

from jaxbn._src.torchlike.linen import (
    Apply,
    Conv,
    ConvTranspose,
    Embedding,
    GroupNorm,
    Held,
    LayerNorm,
    Linear,
    ModuleList,
    Sequential,
    Stochastic,
    Tensor,
    chain,
)

__all__ = [
    "Apply",
    "Conv",
    "ConvTranspose",
    "Embedding",
    "GroupNorm",
    "Held",
    "LayerNorm",
    "Linear",
    "ModuleList",
    "Sequential",
    "Stochastic",
    "Tensor",
    "chain",
]
