"""The module table: what each torch leaf module becomes in the port.

A module with parameters or buffers becomes a Flax module at the torch module's path (``Leaf``),
whose variables ``convert.from_torch`` fills by its rules: Conv -> ``kernel``/``bias``,
BatchNorm -> ``jaxbn.BatchNorm(axis=1)`` with the torch layer's eps, momentum, affine and
track_running_stats. A module without state becomes a call of the op table (``Call``): ReLU is
``F.relu``, MaxPool2d is ``F.max_pool2d`` with its arguments. All in torch's layout (NCHW).

Classes are matched exactly; a subclass that keeps its base's ``forward`` is ported as the base.
Any other subclass is traced through (timm's BatchNormAct2d, which adds an activation, has its
own rule).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax.typing import Dtype

from jaxbn._src.linen.batch_norm import BatchNorm
from jaxbn._src.linen.folded import FoldedBatchNorm
from jaxbn._src.linen.frozen import FrozenBatchNorm
from jaxbn._src.port import ops


@dataclasses.dataclass(frozen=True)
class Leaf:
  """A Flax module (unbound; built at the torch path when called). ``mode`` names the call
  keyword that carries the mode: ``"use_running_average"`` (gets ``not train``), ``"train"``,
  ``"deterministic"`` (``not train``), or None. ``inputs_dtype``: floating inputs are cast to it
  first (an op on torch.autocast's float32 list)."""

  prototype: nn.Module
  mode: str | None = None
  inputs_dtype: str | None = None


@dataclasses.dataclass(frozen=True)
class Call:
  """A stateless module as an op-table call with the module's arguments (a sorted tuple of pairs)."""

  op: Any
  kwargs: tuple = ()


@dataclasses.dataclass(frozen=True)
class Options:
  """What every rule may need from ``port``'s arguments."""

  param_dtype: Dtype = jnp.float32
  axis_name: str | None = None
  autocast: Any = None  # an autocast.Autocast: torch.autocast's rules, or None


# --- Flax modules for torch layers that flax has no channels-first twin of ---------------------


def torch_uniform(fan_in_axes: Callable[[tuple], int]):
  """torch's default init for conv and linear weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

  def init(key, shape, dtype=jnp.float32, fan_in: int | None = None):
    bound = 1 / math.sqrt(max(fan_in if fan_in is not None else fan_in_axes(shape), 1))
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


kernel_init = torch_uniform(lambda shape: int(np.prod(shape[:-1])))


def _channels_last_dimension_numbers(n: int):
  channels_last = (0, n + 1, *range(1, n + 1))
  return jax.lax.ConvDimensionNumbers(channels_last, (n + 1, n, *range(n)), channels_last)


class Conv(nn.Module):
  """torch.nn.Conv{1,2,3}d on channels-first input. ``kernel`` has Flax's layout
  ``(*kernel_size, in_features / groups, features)``; padding is torch's, per axis. Computed
  channels-last between two transposes, which XLA cancels between neighbouring convolutions and
  BatchNorms (``compute_channels_last``): resnet50's CPU train step took 1.16x jaxbn.models'
  with channels-first dimension numbers, 0.95x this way (benchmarks/results-port-step-cpu.md)."""

  features: int
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  dilation: tuple[int, ...]
  groups: int = 1
  use_bias: bool = True
  padding_mode: str = "zeros"
  param_dtype: Dtype = jnp.float32
  dtype: Dtype | None = None  # the computation's (torch.autocast's low dtype); default: promoted

  @nn.compact
  def __call__(self, x):
    n = len(self.kernel_size)
    kernel_shape = (*self.kernel_size, x.shape[1] // self.groups, self.features)
    kernel = self.param("kernel", kernel_init, kernel_shape, self.param_dtype)
    padding = self.padding
    if self.padding_mode != "zeros":
      x = jnp.pad(x, ((0, 0), (0, 0), *padding), mode=ops.PAD_MODES[self.padding_mode])
      padding = ((0, 0),) * n
    dtype = jnp.result_type(x, kernel) if self.dtype is None else self.dtype
    y = jax.lax.conv_general_dilated(
        jnp.moveaxis(x, 1, -1).astype(dtype),
        kernel.astype(dtype),
        self.strides,
        padding,
        rhs_dilation=self.dilation,
        dimension_numbers=_channels_last_dimension_numbers(n),
        feature_group_count=self.groups,
    )
    y = jnp.moveaxis(y, -1, 1)
    if self.use_bias:
      fan_in = int(np.prod(kernel_shape[:-1]))
      bias = self.param("bias", functools.partial(kernel_init, fan_in=fan_in), (self.features,), self.param_dtype)
      y = ops.plus_bias(y, bias.reshape(-1, *(1,) * n))
    return y


class ConvTranspose(nn.Module):
  """torch.nn.ConvTranspose{1,2,3}d on channels-first input. ``kernel`` is the torch weight
  ``(in, out / groups, *kernel_size)`` in the layout of flax's ConvTranspose with
  ``transpose_kernel=True``: ``(*kernel_size, out / groups, in)`` (conversion's ordinary kernel rule)."""

  features: int
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: tuple[int, ...]
  output_padding: tuple[int, ...]
  dilation: tuple[int, ...]
  groups: int = 1
  use_bias: bool = True
  param_dtype: Dtype = jnp.float32
  dtype: Dtype | None = None  # the computation's (torch.autocast's low dtype); default: promoted

  @nn.compact
  def __call__(self, x):
    n, in_features, groups = len(self.kernel_size), x.shape[1], self.groups
    kernel_shape = (*self.kernel_size, self.features // groups, in_features)
    # torch's fan_in for a transposed weight (in, out/g, *k) is its dim 1 times the kernel size
    fan_in = int(np.prod(self.kernel_size)) * (self.features // groups)
    init = functools.partial(kernel_init, fan_in=fan_in)
    kernel = self.param("kernel", init, kernel_shape, self.param_dtype)
    dtype = jnp.result_type(x, kernel) if self.dtype is None else self.dtype
    weight = jnp.transpose(kernel, (n + 1, n, *range(n)))  # torch's (in, out/g, *k)
    weight = weight.reshape(groups, in_features // groups, self.features // groups, *self.kernel_size)
    weight = jnp.swapaxes(weight, 1, 2).reshape(self.features, in_features // groups, *self.kernel_size)
    weight = jnp.flip(weight, tuple(range(2, n + 2)))
    padding = [
        (d * (k - 1) - p, d * (k - 1) - p + op)
        for k, p, op, d in zip(self.kernel_size, self.padding, self.output_padding, self.dilation, strict=True)
    ]
    channels_first = (0, 1, *range(2, n + 2))
    y = jax.lax.conv_general_dilated(
        x.astype(dtype),
        weight.astype(dtype),
        (1,) * n,
        padding,
        lhs_dilation=self.strides,
        rhs_dilation=self.dilation,
        dimension_numbers=jax.lax.ConvDimensionNumbers(*(channels_first,) * 3),
        feature_group_count=groups,
    )
    if self.use_bias:
      bias = self.param("bias", init, (self.features,), self.param_dtype)
      y = ops.plus_bias(y, bias.reshape(-1, *(1,) * n))
    return y


class Tensor(nn.Module):
  """A parameter or buffer that torch's forward reads directly (``x * self.gamma``), held at its
  torch path under the leaf name ``tensor``: torch's ``blocks.0.gamma`` is
  ``params/blocks/0/gamma/tensor``. A buffer lives in the ``buffers`` collection, which an
  optimiser over ``params`` never trains and a training step never writes."""

  shape: tuple[int, ...]
  dtype: str
  collection: str = "params"

  @nn.compact
  def __call__(self):
    def zeros(*_):
      return jnp.zeros(self.shape, self.dtype)  # the value comes from the state_dict

    if self.collection == "params":
      return self.param("tensor", zeros)
    return self.variable(self.collection, "tensor", zeros).value


@dataclasses.dataclass(frozen=True)
class Constant:
  """A tensor the model holds outside its state_dict (a non-persistent buffer, a tensor literal in
  forward), kept in the program as bytes so that the ported module stays hashable."""

  data: bytes
  shape: tuple[int, ...]
  dtype: str

  def __call__(self):
    return jnp.asarray(np.frombuffer(self.data, np.dtype(self.dtype)).reshape(self.shape))


@dataclasses.dataclass(frozen=True)
class Metadata:
  """A tensor of a module the port runs whole, read only for its shape and dtype (timm's xcit:
  ``x.to(self.proj.weight.dtype)``): no values, which live in the Flax layer in its layout."""

  shape: tuple[int, ...]
  dtype: str

  def __call__(self):
    return jax.ShapeDtypeStruct(self.shape, np.dtype(self.dtype))


class Linear(nn.Module):
  """torch.nn.Linear: ``x @ kernel + bias`` over the last axis, ``kernel`` as ``(in, out)``."""

  features: int
  use_bias: bool = True
  param_dtype: Dtype = jnp.float32
  dtype: Dtype | None = None  # the computation's (torch.autocast's low dtype); default: promoted

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", kernel_init, (x.shape[-1], self.features), self.param_dtype)
    dtype = jnp.result_type(x, kernel) if self.dtype is None else self.dtype
    y = jnp.matmul(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      init = functools.partial(kernel_init, fan_in=x.shape[-1])
      y = ops.plus_bias(y, self.param("bias", init, (self.features,), self.param_dtype))
    return y


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm on channels-first input (flax's normalises the last axis): ops.group_norm."""

  num_groups: int
  epsilon: float = 1e-5
  affine: bool = True
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = bias = None
    if self.affine:
      scale = self.param("scale", nn.initializers.ones, (x.shape[1],), self.param_dtype)
      bias = self.param("bias", nn.initializers.zeros, (x.shape[1],), self.param_dtype)
    return ops.group_norm(x, self.num_groups, scale, bias, self.epsilon)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last ``len(normalized_shape)`` axes: ops.layer_norm, with flax's
  parameter names (``scale``, ``bias``)."""

  normalized_shape: tuple[int, ...]
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = self.normalized_shape
    scale = self.param("scale", nn.initializers.ones, shape, self.param_dtype) if self.use_scale else None
    bias = self.param("bias", nn.initializers.zeros, shape, self.param_dtype) if self.use_bias else None
    return ops.layer_norm(x, shape, scale, bias, self.epsilon)


@functools.cache
def activated(norm: type) -> type:
  """``norm`` followed by stateless calls (timm's BatchNormAct2d: BatchNorm, then its activation),
  as one layer at one path, so that the layer's output (what parity compares) is torch's."""

  class Activated(norm):
    after: tuple[Call, ...] = ()

    @nn.compact
    def __call__(self, x, *args, **kwargs):
      y = super().__call__(x, *args, **kwargs)
      for call in self.after:
        y = ops.OPS[call.op].fn(y, **dict(call.kwargs))
      return y

  Activated.__name__ = Activated.__qualname__ = f"{norm.__name__}Act"
  return Activated


BatchNormAct = activated(BatchNorm)


NORMS = (BatchNorm, FrozenBatchNorm, FoldedBatchNorm)


def swap_norm(leaf: Leaf, kind: str) -> Leaf:
  """A BatchNorm-like leaf as another kind, keeping eps, affine, dtypes and a timm activation."""
  layer = leaf.prototype
  after = getattr(layer, "after", ())
  common = dict(axis=layer.axis, param_dtype=layer.param_dtype)
  affine = dict(epsilon=layer.epsilon, use_scale=layer.use_scale, use_bias=layer.use_bias)
  if kind == "frozen":
    norm, fields = FrozenBatchNorm, {**common, **affine}
  elif kind == "folded":
    norm, fields = FoldedBatchNorm, {**common, **affine}
  elif kind == "batchnorm":
    if not isinstance(layer, BatchNorm):
      raise ValueError(f"{type(layer).__name__} does not keep momentum or tracking: port the torch model again")
    return leaf
  else:
    raise ValueError(f"kind must be 'frozen', 'folded' or 'batchnorm', not {kind!r}")
  return Leaf(activated(norm)(**fields, after=after) if after else norm(**fields), "use_running_average")


# --- the table ---------------------------------------------------------------------------------

MODULES: dict[type, Callable[[torch.nn.Module, Options], Leaf | Call | None]] = {}


def register(*classes):
  def add(rule):
    for cls in classes:
      MODULES[cls] = rule
    return rule

  return add


def call(op, **kwargs) -> Call:
  return Call(op, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items())))


def _batchnorm_fields(m, options: Options) -> dict:
  return dict(
      axis=1,
      momentum=m.momentum,
      epsilon=float(m.eps),
      use_scale=m.affine,
      use_bias=m.affine,
      track_running_stats=m.track_running_stats,
      param_dtype=options.param_dtype,
      compute_channels_last=True,
  )  # beside Conv's channels-last compute: XLA drops the transposes


@register(torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
def batchnorm(m, options):
  return Leaf(BatchNorm(**_batchnorm_fields(m, options)), "use_running_average")


@register(torch.nn.SyncBatchNorm)
def sync_batchnorm(m, options):
  return Leaf(BatchNorm(**_batchnorm_fields(m, options), axis_name=options.axis_name), "use_running_average")


def frozen_batchnorm(m, options):
  # torchvision's forward is x * scale + shift with its buffers, so the output has their dtype
  # (a bfloat16 input, as under autocast, comes out float32)
  return Leaf(FrozenBatchNorm(axis=1, epsilon=float(m.eps), dtype=options.param_dtype, param_dtype=options.param_dtype))


def _padding(m, n):
  if m.padding == "valid":
    return ((0, 0),) * n
  if m.padding == "same":  # torch puts the odd pixel on the right
    totals = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
    return tuple((t // 2, t - t // 2) for t in totals)
  return tuple((p, p) for p in m.padding)


@register(torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
def conv(m, options):
  n = len(m.kernel_size)
  return Leaf(
      Conv(
          m.out_channels,
          tuple(m.kernel_size),
          tuple(m.stride),
          _padding(m, n),
          tuple(m.dilation),
          m.groups,
          m.bias is not None,
          m.padding_mode,
          options.param_dtype,
      )
  )


@register(torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
def conv_transpose(m, options):
  if m.padding_mode != "zeros":
    return None  # torch allows only zeros too
  return Leaf(
      ConvTranspose(
          m.out_channels,
          tuple(m.kernel_size),
          tuple(m.stride),
          tuple(m.padding),
          tuple(m.output_padding),
          tuple(m.dilation),
          m.groups,
          m.bias is not None,
          options.param_dtype,
      )
  )


@register(torch.nn.Linear)
def linear(m, options):
  return Leaf(Linear(m.out_features, m.bias is not None, options.param_dtype))


@register(torch.nn.LayerNorm)
def layer_norm(m, options):
  affine = m.elementwise_affine
  return Leaf(LayerNorm(tuple(m.normalized_shape), m.eps, affine, affine and m.bias is not None, options.param_dtype))


@register(torch.nn.GroupNorm)
def group_norm(m, options):
  return Leaf(GroupNorm(m.num_groups, m.eps, m.affine, options.param_dtype))


# Stateless modules: the op table with the module's arguments.
register(torch.nn.ReLU)(lambda m, o: call(F.relu))
register(torch.nn.ReLU6)(lambda m, o: call(F.relu6))
register(torch.nn.Hardswish)(lambda m, o: call(F.hardswish))
register(torch.nn.Hardsigmoid)(lambda m, o: call(F.hardsigmoid))
register(torch.nn.SiLU)(lambda m, o: call(F.silu))
register(torch.nn.Sigmoid)(lambda m, o: call(torch.sigmoid))
register(torch.nn.Tanh)(lambda m, o: call(torch.tanh))
register(torch.nn.Mish)(lambda m, o: call(F.mish))
register(torch.nn.GELU)(lambda m, o: call(F.gelu, approximate=m.approximate))
register(torch.nn.LeakyReLU)(lambda m, o: call(F.leaky_relu, negative_slope=m.negative_slope))
register(torch.nn.ELU)(lambda m, o: call(F.elu, alpha=m.alpha))
register(torch.nn.Hardtanh)(lambda m, o: call(F.hardtanh, min_val=m.min_val, max_val=m.max_val))
register(torch.nn.Softmax)(lambda m, o: call(F.softmax, dim=m.dim))
register(torch.nn.LogSoftmax)(lambda m, o: call(F.log_softmax, dim=m.dim))
register(torch.nn.Identity)(lambda m, o: call(torch.Tensor.clone))
register(torch.nn.Flatten)(lambda m, o: call(torch.flatten, start_dim=m.start_dim, end_dim=m.end_dim))
register(torch.nn.Unfold)(
    lambda m, o: call(F.unfold, kernel_size=m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
)
register(torch.nn.Fold)(
    lambda m, o: call(
        F.fold,
        output_size=m.output_size,
        kernel_size=m.kernel_size,
        dilation=m.dilation,
        padding=m.padding,
        stride=m.stride,
    )
)
register(torch.nn.Dropout)(lambda m, o: call(F.dropout, p=m.p, training=m.training))
register(torch.nn.Upsample)(
    lambda m, o: call(
        F.interpolate,
        size=m.size,
        scale_factor=m.scale_factor,
        mode=m.mode,
        align_corners=m.align_corners,
        recompute_scale_factor=m.recompute_scale_factor,
    )
)
register(
    torch.nn.ZeroPad1d,
    torch.nn.ZeroPad2d,
    torch.nn.ZeroPad3d,
    torch.nn.ConstantPad1d,
    torch.nn.ConstantPad2d,
    torch.nn.ConstantPad3d,
)(lambda m, o: call(F.pad, pad=m.padding, value=m.value))
register(torch.nn.ReflectionPad1d, torch.nn.ReflectionPad2d, torch.nn.ReflectionPad3d)(
    lambda m, o: call(F.pad, pad=m.padding, mode="reflect")
)
register(torch.nn.ReplicationPad1d, torch.nn.ReplicationPad2d, torch.nn.ReplicationPad3d)(
    lambda m, o: call(F.pad, pad=m.padding, mode="replicate")
)
for _n in (1, 2, 3):
  register(getattr(torch.nn, f"MaxPool{_n}d"))(
      lambda m, o, n=_n: None
      if m.return_indices
      else call(
          getattr(F, f"max_pool{n}d"),
          kernel_size=m.kernel_size,
          stride=m.stride,
          padding=m.padding,
          dilation=m.dilation,
          ceil_mode=m.ceil_mode,
      )
  )
  register(getattr(torch.nn, f"AvgPool{_n}d"))(
      lambda m, o, n=_n: call(
          getattr(F, f"avg_pool{n}d"),
          kernel_size=m.kernel_size,
          stride=m.stride,
          padding=m.padding,
          ceil_mode=m.ceil_mode,
          count_include_pad=m.count_include_pad,
          divisor_override=getattr(m, "divisor_override", None),
      )
  )
  register(getattr(torch.nn, f"AdaptiveAvgPool{_n}d"))(
      lambda m, o, n=_n: call(getattr(F, f"adaptive_avg_pool{n}d"), output_size=m.output_size)
  )
  register(getattr(torch.nn, f"AdaptiveMaxPool{_n}d"))(
      lambda m, o, n=_n: None
      if m.return_indices
      else call(getattr(F, f"adaptive_max_pool{n}d"), output_size=m.output_size)
  )

try:
  from torchvision.ops import FrozenBatchNorm2d, StochasticDepth
  from torchvision.ops import stochastic_depth as _stochastic_depth

  register(FrozenBatchNorm2d)(frozen_batchnorm)
  register(StochasticDepth)(lambda m, o: call(_stochastic_depth, p=m.p, mode=m.mode, training=m.training))
except ImportError:  # torchvision is optional
  pass


def _register_timm():
  from timm.layers import BatchNormAct2d, DropPath, activations
  from timm.layers import Linear as TimmLinear
  from timm.layers.drop import drop_path

  @ops.register(drop_path, context=True)
  def timm_drop_path(ctx, x, drop_prob=0.0, training=False, scale_by_keep=True):
    return ops.drop_samples(ctx._replace(train=ctx.train and training), x, drop_prob, "row", scale_by_keep)

  register(DropPath)(
      lambda m, o: call(drop_path, drop_prob=m.drop_prob, training=m.training, scale_by_keep=m.scale_by_keep)
  )
  register(TimmLinear)(linear)
  # timm's activation modules (BatchNormAct2d's act): the same functions as torch's
  for timm_class, op, kwargs in (
      (activations.Swish, F.silu, {}),
      (activations.Mish, F.mish, {}),
      (activations.Sigmoid, torch.sigmoid, {}),
      (activations.Tanh, torch.tanh, {}),
      (activations.HardSwish, F.hardswish, {}),
      (activations.HardSigmoid, F.hardsigmoid, {}),
      (activations.GELU, F.gelu, {}),
      (activations.GELUTanh, F.gelu, {"approximate": "tanh"}),
  ):
    register(timm_class)(lambda m, o, op=op, kwargs=kwargs: call(op, **kwargs))

  @register(BatchNormAct2d)
  def batchnorm_act(m, options):
    after = [rule(m.drop, options), rule(m.act, options)]
    if any(not isinstance(c, Call) or ops.OPS[c.op].context for c in after):
      return None  # dropout inside the layer: not supported
    after = tuple(c for c in after if c.op is not torch.Tensor.clone)
    return Leaf(BatchNormAct(**_batchnorm_fields(m, options), after=after), "use_running_average")


try:
  _register_timm()
except ImportError:  # timm is optional
  pass


def find(module: torch.nn.Module, table: dict) -> Callable | None:
  """The table's rule for a module: its class's, or a base class's when the module keeps that
  base's forward."""
  for cls in type(module).__mro__:
    if cls in table:
      return table[cls] if cls is type(module) or type(module).forward is cls.forward else None
  return None


def rule(module: torch.nn.Module, options: Options, table: dict | None = None) -> Leaf | Call | None:
  """The port of one torch module, or None where its rule refuses it (e.g. dropout inside timm's
  BatchNormAct2d) or there is none."""
  factory = find(module, MODULES if table is None else table)
  return None if factory is None else factory(module, options)


def user_rule(factory: Callable[[torch.nn.Module], nn.Module]):
  """A ``custom_modules`` factory as a table rule: ``factory(torch_module)`` returns an unbound
  Flax module (it gets the mode through a ``train``, ``use_running_average`` or
  ``deterministic`` keyword of its ``__call__``, if it has one) or, for a module without state,
  a JAX function of the module's inputs."""

  def make(module, options):
    made = factory(module)
    if isinstance(made, nn.Module):
      return Leaf(made, _mode_keyword(made))
    if callable(made):
      return Call(made)
    raise TypeError(
        f"custom_modules factory for {type(module).__name__} returned {type(made).__name__}: return"
        " a flax.linen Module or a JAX function"
    )

  return make


def _mode_keyword(module: nn.Module) -> str | None:
  import inspect

  parameters = inspect.signature(type(module).__call__).parameters
  return next((name for name in ("train", "use_running_average", "deterministic") if name in parameters), None)


def class_name(cls: type) -> str:
  """``torch.nn.Conv2d`` for torch.nn's classes, else the defining module's path."""
  if getattr(torch.nn, cls.__name__, None) is cls:
    return f"torch.nn.{cls.__name__}"
  return f"{cls.__module__}.{cls.__name__}"


def supported() -> list[str]:
  return sorted(class_name(cls) for cls in MODULES)
