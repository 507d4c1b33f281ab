"""jaxbn: BatchNorm for Flax that behaves exactly like PyTorch's."""

from jaxbn._src.batch_norm import BatchNorm
from jaxbn._src.checks import MomentumConventionWarning
from jaxbn import functional

__all__ = ["BatchNorm", "MomentumConventionWarning", "functional"]
__version__ = "0.1.0"
