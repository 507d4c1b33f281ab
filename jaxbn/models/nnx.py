"""torchvision's ResNets in Flax NNX, module for module: attribute paths are torch's state_dict
paths (``layer1[0].conv1`` is ``layer1.0.conv1``), so conversion needs no table.

The same architecture as ``jaxbn.models.resnet`` (Linen), with its initialisers and padding
arithmetic; the mode is NNX's: ``model.train()`` / ``model.eval()``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbn._src.nnx.batch_norm import BatchNorm
from jaxbn.models.resnet import FAMILY, conv_init, linear_init


def conv(
    in_features: int,
    out_features: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    dilation: int = 1,
    *,
    rngs: nnx.Rngs,
) -> nnx.Conv:
  """torch's Conv2d(bias=False, padding=dilation * (kernel // 2)) in NHWC."""
  padding = dilation * (kernel // 2)
  return nnx.Conv(
      in_features,
      out_features,
      (kernel, kernel),
      strides=stride,
      padding=((padding, padding),) * 2,
      kernel_dilation=dilation,
      feature_group_count=groups,
      use_bias=False,
      kernel_init=conv_init,
      rngs=rngs,
  )


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(
      self,
      inplanes: int,
      planes: int,
      stride: int = 1,
      downsample: bool = False,
      groups: int = 1,
      base_width: int = 64,
      dilation: int = 1,
      *,
      norm: Callable,
      last_norm: Callable,
      rngs: nnx.Rngs,
  ):
    if groups != 1 or base_width != 64:
      raise ValueError("BasicBlock only supports groups=1 and base_width=64 (as torchvision)")
    self.conv1 = conv(inplanes, planes, 3, stride, rngs=rngs)
    self.bn1 = norm(planes, rngs=rngs)
    self.conv2 = conv(planes, planes, 3, rngs=rngs)
    self.bn2 = last_norm(planes, rngs=rngs)
    self.downsample = _downsample(inplanes, planes, stride, norm, rngs) if downsample else nnx.data(None)

  def __call__(self, x):
    out = nnx.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return nnx.relu(out + (x if self.downsample is None else _sequential(self.downsample, x)))


class Bottleneck(nnx.Module):
  """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3x3 convolution)."""

  expansion = 4

  def __init__(
      self,
      inplanes: int,
      planes: int,
      stride: int = 1,
      downsample: bool = False,
      groups: int = 1,
      base_width: int = 64,
      dilation: int = 1,
      *,
      norm: Callable,
      last_norm: Callable,
      rngs: nnx.Rngs,
  ):
    width = int(planes * (base_width / 64.0)) * groups
    self.conv1 = conv(inplanes, width, 1, rngs=rngs)
    self.bn1 = norm(width, rngs=rngs)
    self.conv2 = conv(width, width, 3, stride, groups, dilation, rngs=rngs)
    self.bn2 = norm(width, rngs=rngs)
    self.conv3 = conv(width, planes * self.expansion, 1, rngs=rngs)
    self.bn3 = last_norm(planes * self.expansion, rngs=rngs)
    self.downsample = (
        _downsample(inplanes, planes * self.expansion, stride, norm, rngs) if downsample else nnx.data(None)
    )

  def __call__(self, x):
    out = nnx.relu(self.bn1(self.conv1(x)))
    out = nnx.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return nnx.relu(out + (x if self.downsample is None else _sequential(self.downsample, x)))


def _downsample(inplanes, features, stride, norm, rngs) -> nnx.List:
  """torchvision's ``downsample = Sequential(conv1x1(stride), norm)``: children ``0`` and ``1``."""
  return nnx.List([conv(inplanes, features, 1, stride, rngs=rngs), norm(features, rngs=rngs)])


def _sequential(layers, x):
  for layer in layers:
    x = layer(x)
  return x


class ResNet(nnx.Module):
  """torchvision.models.ResNet in Flax NNX.

  Example::

    >>> import jax.numpy as jnp, jaxbn
    >>> from flax import nnx
    >>> model = jaxbn.models.nnx.resnet18(num_classes=10, rngs=nnx.Rngs(0))
    >>> model.eval()
    >>> model(jnp.ones((2, 64, 64, 3))).shape
    (2, 10)

  Args:
    block: BasicBlock or Bottleneck; layers: blocks per stage; num_classes: outputs of ``fc``.
    groups, width_per_group, replace_stride_with_dilation, zero_init_residual: torchvision's.
    norm: the norm class, called as ``norm(num_features, rngs=rngs)`` (and ``scale_init=`` for
      ``zero_init_residual``): ``jaxbn.nnx.BatchNorm`` (default), ``jaxbn.nnx.FrozenBatchNorm`` or
      a ``functools.partial`` of either.
    input_layout: ``'NHWC'`` or ``'NCHW'`` (torch's layout, transposed on entry).
  """

  def __init__(
      self,
      block: type,
      layers: Sequence[int],
      num_classes: int = 1000,
      *,
      groups: int = 1,
      width_per_group: int = 64,
      replace_stride_with_dilation: Sequence[bool] = (False, False, False),
      zero_init_residual: bool = False,
      norm: Callable = BatchNorm,
      input_layout: str = "NHWC",
      rngs: nnx.Rngs,
  ):
    if input_layout not in ("NHWC", "NCHW"):
      raise ValueError(f"input_layout must be 'NHWC' or 'NCHW', got {input_layout!r}")
    self.input_layout = input_layout
    last_norm = functools.partial(norm, scale_init=nnx.initializers.zeros) if zero_init_residual else norm
    self.conv1 = conv(3, 64, 7, 2, rngs=rngs)
    self.bn1 = norm(64, rngs=rngs)
    inplanes, dilation = 64, 1
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
      stride = 1 if i == 0 else 2
      first_dilation = dilation
      if i > 0 and replace_stride_with_dilation[i - 1]:
        dilation, stride = dilation * stride, 1
      common = dict(groups=groups, base_width=width_per_group, norm=norm, last_norm=last_norm, rngs=rngs)
      stage = [
          block(
              inplanes,
              planes,
              stride,
              stride != 1 or inplanes != planes * block.expansion,
              dilation=first_dilation,
              **common,
          )
      ]
      inplanes = planes * block.expansion
      stage += [block(inplanes, planes, dilation=dilation, **common) for _ in range(1, blocks)]
      setattr(self, f"layer{i + 1}", nnx.List(stage))
    self.fc = nnx.Linear(inplanes, num_classes, kernel_init=linear_init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.input_layout == "NCHW":
      x = jnp.transpose(x, (0, 2, 3, 1))
    stem = self.conv1.kernel.shape[2]
    if x.ndim == 4 and x.shape[-1] != stem and x.shape[1] == stem:
      raise ValueError(
          f"the input of shape {tuple(x.shape)} looks like torch's NCHW layout ({stem} channels on axis 1), but"
          f" this ResNet takes {self.input_layout}: transpose it with np.moveaxis(x, 1, -1), or build the"
          " model with input_layout='NCHW'."
      )
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      x = _sequential(stage, x)
    return self.fc(jnp.mean(x, axis=(1, 2)))


def _factory(name, block, layers, **defaults):
  def make(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs) -> ResNet:
    return ResNet(block, layers, num_classes, rngs=rngs, **{**defaults, **kwargs})

  make.__name__ = make.__qualname__ = name
  make.__doc__ = f"torchvision.models.{name} in Flax NNX; keyword arguments as ResNet's."
  return make


MODELS = {
    name: _factory(name, {"basic": BasicBlock, "bottleneck": Bottleneck}[block], layers, **defaults)
    for name, (block, layers, defaults) in FAMILY.items()
}
resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, wide_resnet50_2 = MODELS.values()
