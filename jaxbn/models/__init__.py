"""Flax models that mirror torchvision's, for exact conversion of their checkpoints: Linen here,
NNX in ``jaxbn.models.nnx``."""

from jaxbn.models import nnx
from jaxbn.models.resnet import (
    MODELS,
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    wide_resnet50_2,
)

__all__ = [
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "nnx",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "wide_resnet50_2",
]
