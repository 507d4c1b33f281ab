"""jaxbn: BatchNorm for Flax that behaves exactly like PyTorch's."""

from jaxbn import convert, functional, models, nnx, parity
from jaxbn._src.checkpoints.files import (
    load_state_dict,
    read_batchnorm_config,
    save_state_dict,
)
from jaxbn._src.core.checks import MomentumConventionWarning
from jaxbn._src.errors import CheckpointError, PortError
from jaxbn._src.linen.batch_norm import BatchNorm
from jaxbn._src.linen.folded import FoldedBatchNorm
from jaxbn._src.linen.frozen import FrozenBatchNorm
from jaxbn._src.linen.modes import eval_mode
from jaxbn._src.variables.folding import fold_batchnorm
from jaxbn._src.variables.freezing import freeze, frozen_mask, keep_frozen, unfreeze

__all__ = [
    "BatchNorm",
    "CheckpointError",
    "FoldedBatchNorm",
    "FrozenBatchNorm",
    "MomentumConventionWarning",
    "Port",
    "PortError",
    "eval_mode",
    "fold_batchnorm",
    "convert",
    "freeze",
    "frozen_mask",
    "functional",
    "keep_frozen",
    "load_state_dict",
    "models",
    "nnx",
    "parity",
    "port",
    "port_supported",
    "read_batchnorm_config",
    "save_state_dict",
    "unfreeze",
]
__version__ = "0.1.0"

# jaxbn.port needs torch, an optional extra: imported on first use.
_PORT = {"port": ("api", "port"), "Port": ("api", "Port"), "port_supported": ("api", "supported")}


def __getattr__(name):
  if name in _PORT:
    import importlib

    module, attribute = _PORT[name]
    return getattr(importlib.import_module(f"jaxbn._src.port.{module}"), attribute)
  raise AttributeError(f"module 'jaxbn' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_PORT])
