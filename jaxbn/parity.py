"""Behaviour checks between a torch model and its Flax port, per BatchNorm layer."""

from jaxbn._src.parity import (
    ConfigMismatch,
    LayerDifference,
    compare,
    compare_config,
    format_table,
    without_dropout,
)

__all__ = ["ConfigMismatch", "LayerDifference", "compare", "compare_config", "format_table", "without_dropout"]
