"""PyTorch state_dict <-> Flax variables (see ``jaxbn/_src/convert.py`` for the rules)."""

from jaxbn._src.checkpoints.config import LayerConfig
from jaxbn._src.checkpoints.loading import load
from jaxbn._src.checkpoints.rules import (
    Converted,
    from_torch,
    kernel_to_flax,
    kernel_to_torch,
    template_from_state_dict,
    to_state_dict,
    to_torch,
)
from jaxbn._src.errors import ConfigMismatchError, ConversionError

__all__ = [
    "ConfigMismatchError",
    "ConversionError",
    "Converted",
    "LayerConfig",
    "from_torch",
    "kernel_to_flax",
    "kernel_to_torch",
    "load",
    "template_from_state_dict",
    "to_state_dict",
    "to_torch",
]
