"""Flax ResNets that mirror torchvision's, module for module, so conversion needs no table.

Module paths equal torchvision's state_dict paths (``layer1.0.conv1`` is ``layer1/0/conv1``),
padding is torchvision's explicit arithmetic (never ``'SAME'``), and the norm class is an
argument: ``jaxbn.BatchNorm`` (default) or ``jaxbn.FrozenBatchNorm``. Input is NHWC; pass
``input_layout='NCHW'`` for torch-layout input.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn._src.linen.batch_norm import BatchNorm

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated normal.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def conv(features: int, kernel: int, stride: int = 1, groups: int = 1, dilation: int = 1, dtype=None, name=None):
  """torch's Conv2d(bias=False, padding=dilation * (kernel // 2)) in NHWC, computed in ``dtype``."""
  padding = dilation * (kernel // 2)
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=stride,
      padding=((padding, padding),) * 2,
      kernel_dilation=dilation,
      feature_group_count=groups,
      use_bias=False,
      kernel_init=conv_init,
      dtype=dtype,
      name=name,
  )


class Downsample(nn.Module):
  """torchvision's ``downsample = Sequential(conv1x1(stride), norm)``: children ``0`` and ``1``."""

  features: int
  stride: int
  norm: Callable
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = conv(self.features, 1, self.stride, dtype=self.dtype, name="0")(x)
    return self.norm(use_running_average=not train, name="1")(x)


class Block(nn.Module):
  """torchvision's block arguments, shared by BasicBlock and Bottleneck."""

  planes: int
  stride: int = 1
  downsample: bool = False
  groups: int = 1
  base_width: int = 64
  dilation: int = 1
  norm: Callable = BatchNorm
  dtype: Any = None  # the convolutions' (flax's dtype)


class BasicBlock(Block):
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    if self.groups != 1 or self.base_width != 64:
      raise ValueError("BasicBlock only supports groups=1 and base_width=64 (as torchvision)")
    norm = functools.partial(self.norm, use_running_average=not train)
    out = nn.relu(norm(name="bn1")(conv(self.planes, 3, self.stride, dtype=self.dtype, name="conv1")(x)))
    out = norm(name="bn2")(conv(self.planes, 3, dtype=self.dtype, name="conv2")(out))
    identity = (
        Downsample(self.planes, self.stride, self.norm, self.dtype, name="downsample")(x, train)
        if self.downsample
        else x
    )
    return nn.relu(out + identity)


class Bottleneck(Block):
  """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3x3 convolution)."""

  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    width = int(self.planes * (self.base_width / 64.0)) * self.groups
    norm = functools.partial(self.norm, use_running_average=not train)
    out = nn.relu(norm(name="bn1")(conv(width, 1, dtype=self.dtype, name="conv1")(x)))
    out = conv(width, 3, self.stride, self.groups, self.dilation, self.dtype, name="conv2")(out)
    out = nn.relu(norm(name="bn2")(out))
    out = norm(name="bn3")(conv(self.planes * self.expansion, 1, dtype=self.dtype, name="conv3")(out))
    identity = x
    if self.downsample:
      identity = Downsample(self.planes * self.expansion, self.stride, self.norm, self.dtype, name="downsample")(
          x, train
      )
    return nn.relu(out + identity)


class Stage(nn.Module):
  """torchvision's ``layerN``: a Sequential of blocks named ``0``, ``1``, ..."""

  block: type
  planes: int
  blocks: int
  stride: int
  downsample: bool
  groups: int
  base_width: int
  dilation: int
  first_dilation: int
  norm: Callable
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    common = dict(groups=self.groups, base_width=self.base_width, norm=self.norm, dtype=self.dtype)
    x = self.block(self.planes, self.stride, self.downsample, dilation=self.first_dilation, name="0", **common)(
        x, train
    )
    for i in range(1, self.blocks):
      x = self.block(self.planes, dilation=self.dilation, name=str(i), **common)(x, train)
    return x


class ResNet(nn.Module):
  """torchvision.models.ResNet in Flax.

  Example::

    >>> import jax, jax.numpy as jnp, jaxbn
    >>> model = jaxbn.models.resnet18(num_classes=10)
    >>> x = jnp.ones((2, 64, 64, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> model.apply(variables, x).shape
    (2, 10)

  Attributes:
    block: BasicBlock or Bottleneck.
    layers: blocks per stage.
    num_classes: outputs of ``fc``.
    groups, width_per_group: ResNeXt / wide ResNet widths (torchvision's arguments).
    replace_stride_with_dilation: three booleans, as torchvision.
    zero_init_residual: start each block's last norm scale at 0, as torchvision's flag.
    norm: the norm class, called with ``use_running_average`` and ``name``:
      ``jaxbn.BatchNorm`` or ``jaxbn.FrozenBatchNorm`` (or a ``functools.partial`` of either).
    input_layout: ``'NHWC'`` or ``'NCHW'`` (torch's layout, transposed on entry).
    dtype: the convolutions' and ``fc``'s computation dtype (flax's ``dtype``): ``jnp.bfloat16``
      or ``jnp.float16`` is ``torch.autocast`` (both on its lower-precision list); parameters and
      running statistics stay float32 and BatchNorm computes its statistics in float32, returning
      the input's dtype, so the output is in ``dtype``. Default: float32 throughout.
  """

  block: type
  layers: Sequence[int]
  num_classes: int = 1000
  groups: int = 1
  width_per_group: int = 64
  replace_stride_with_dilation: Sequence[bool] = (False, False, False)
  zero_init_residual: bool = False
  norm: Callable = BatchNorm
  input_layout: str = "NHWC"
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.input_layout not in ("NHWC", "NCHW"):
      raise ValueError(f"input_layout must be 'NHWC' or 'NCHW', got {self.input_layout!r}")
    if self.input_layout == "NCHW":
      x = jnp.transpose(x, (0, 2, 3, 1))
    stem = self.variables.get("params", {}).get("conv1", {}).get("kernel")
    if stem is not None and x.ndim == 4 and x.shape[-1] != stem.shape[2] and x.shape[1] == stem.shape[2]:
      raise ValueError(
          f"the input of shape {tuple(x.shape)} looks like torch's NCHW layout ({stem.shape[2]} channels on"
          f" axis 1), but this ResNet takes {self.input_layout}: transpose it with"
          " np.moveaxis(x, 1, -1), or build the model with input_layout='NCHW'."
      )
    norm = self.norm
    if self.zero_init_residual:
      norm = functools.partial(_zero_init_last_norm, self.norm, "bn3" if self.block is Bottleneck else "bn2")

    x = conv(64, 7, 2, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(norm(use_running_average=not train, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    inplanes, dilation = 64, 1
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers, strict=True)):
      stride = 1 if i == 0 else 2
      first_dilation = dilation
      if i > 0 and self.replace_stride_with_dilation[i - 1]:
        dilation, stride = dilation * stride, 1
      x = Stage(
          self.block,
          planes,
          blocks,
          stride,
          downsample=stride != 1 or inplanes != planes * self.block.expansion,
          groups=self.groups,
          base_width=self.width_per_group,
          dilation=dilation,
          first_dilation=first_dilation,
          norm=norm,
          dtype=self.dtype,
          name=f"layer{i + 1}",
      )(x, train)
      inplanes = planes * self.block.expansion
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=linear_init, dtype=self.dtype, name="fc")(x)


def _zero_init_last_norm(norm, last_name, *, name, **kwargs):
  """torchvision's zero_init_residual: each block's last norm starts with scale 0."""
  init = nn.initializers.zeros if name == last_name else nn.initializers.ones
  return norm(scale_init=init, name=name, **kwargs)


def _factory(name, block, layers, **defaults):
  def make(**kwargs) -> ResNet:
    return ResNet(block=block, layers=layers, **{**defaults, **kwargs})

  make.__name__ = make.__qualname__ = name
  make.__doc__ = f"torchvision.models.{name} in Flax; keyword arguments as ResNet's attributes."
  return make


# torchvision's ResNet family: block, blocks per stage, width arguments (shared with models/nnx.py).
FAMILY = {
    "resnet18": ("basic", (2, 2, 2, 2), {}),
    "resnet34": ("basic", (3, 4, 6, 3), {}),
    "resnet50": ("bottleneck", (3, 4, 6, 3), {}),
    "resnet101": ("bottleneck", (3, 4, 23, 3), {}),
    "resnet152": ("bottleneck", (3, 8, 36, 3), {}),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), {"groups": 32, "width_per_group": 4}),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), {"width_per_group": 128}),
}
MODELS = {
    name: _factory(name, {"basic": BasicBlock, "bottleneck": Bottleneck}[block], layers, **defaults)
    for name, (block, layers, defaults) in FAMILY.items()
}
resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, wide_resnet50_2 = MODELS.values()
