"""jaxbn: BatchNorm for Flax that behaves exactly like PyTorch's."""

from jaxbn import convert, functional, layers, models, nnx, ops, parity
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
    "emit",
    "freeze",
    "frozen_mask",
    "functional",
    "keep_frozen",
    "layers",
    "load_state_dict",
    "models",
    "nnx",
    "ops",
    "parity",
    "port",
    "port_supported",
    "read_batchnorm_config",
    "save_state_dict",
    "TrainingRecipe",
    "TrainingRecipeWarning",
    "unfreeze",
    "verification",
    "verify",
]
__version__ = "0.1.0"

# jaxbn.port and jaxbn.emit need torch, an optional extra: imported on first use.
_PORT = {
    "port": ("jaxbn._src.port.api", "port"),
    "Port": ("jaxbn._src.port.api", "Port"),
    "port_supported": ("jaxbn._src.port.api", "supported"),
    "TrainingRecipe": ("jaxbn._src.port.recipe", "TrainingRecipe"),
    "TrainingRecipeWarning": ("jaxbn._src.port.recipe", "TrainingRecipeWarning"),
    "emit": ("jaxbn._src.emit.api", "emit"),
    "verify": ("jaxbn._src.verify.api", "verify"),
    "verification": ("jaxbn.verification", None),
}


def __getattr__(name):
  if name in _PORT:
    import importlib

    module, attribute = _PORT[name]
    imported = importlib.import_module(module)
    return imported if attribute is None else getattr(imported, attribute)
  raise AttributeError(f"module 'jaxbn' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_PORT])
