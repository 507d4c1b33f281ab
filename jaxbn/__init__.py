"""jaxbn: BatchNorm for Flax that behaves exactly like PyTorch's."""

from jaxbn import functional
from jaxbn._src.batch_norm import BatchNorm
from jaxbn._src.checks import MomentumConventionWarning
from jaxbn._src.freezing import freeze, frozen_mask, keep_frozen, unfreeze
from jaxbn._src.frozen import FrozenBatchNorm
from jaxbn._src.modes import eval_mode

__all__ = [
    "BatchNorm",
    "FrozenBatchNorm",
    "MomentumConventionWarning",
    "eval_mode",
    "freeze",
    "frozen_mask",
    "functional",
    "keep_frozen",
    "unfreeze",
]
__version__ = "0.1.0"
