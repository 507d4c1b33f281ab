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
from jaxbn._src.torchlike.compute import compact
from jaxbn._src.torchlike.linen import (  # noqa: F401 (the table's modules, used through here too)
    Apply,
    BatchNormAct,
    Conv,
    ConvTranspose,
    Embedding,
    GroupNorm,
    LayerNorm,
    Linear,
    Tensor,
    activated,
    mode_keyword,
)


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


@dataclasses.dataclass(frozen=True)
class Constant:
  """A tensor the model holds outside its state_dict (a non-persistent buffer, a tensor literal in
  forward), kept in the program as bytes so that the ported module stays hashable."""

  data: bytes
  shape: tuple[int, ...]
  dtype: str
  attribute: str = dataclasses.field(default="", compare=False)  # torch's name for it, for emitted source

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
def conv(m, options, padding=None):
  n = len(m.kernel_size)
  return Leaf(
      Conv(
          m.out_channels,
          compact(tuple(m.kernel_size)),
          compact(tuple(m.stride)),
          compact(_padding(m, n)) if padding is None else padding,
          compact(tuple(m.dilation)),
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
          compact(tuple(m.kernel_size)),
          compact(tuple(m.stride)),
          compact(tuple(m.padding)),
          compact(tuple(m.output_padding)),
          compact(tuple(m.dilation)),
          m.groups,
          m.bias is not None,
          options.param_dtype,
      )
  )


@register(torch.nn.Linear)
def linear(m, options):
  return Leaf(Linear(m.out_features, m.bias is not None, options.param_dtype))


@register(torch.nn.Embedding)
def embedding(m, options):
  if m.max_norm is not None or m.scale_grad_by_freq:  # a renorm written into the weight in forward; scaled gradients
    return None
  return Leaf(Embedding(m.num_embeddings, m.embedding_dim, m.padding_idx, options.param_dtype))


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
for _n in (1, 2, 3):
  register(getattr(torch.nn, f"Dropout{_n}d"))(
      lambda m, o, n=_n: call(getattr(F, f"dropout{n}d"), p=m.p, training=m.training)
  )


def _multihead_attention_forward(
    self,
    query,
    key,
    value,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    average_attn_weights=True,
    is_causal=False,
):
  """torch.nn.MultiheadAttention's forward as traced: its general path, F.multi_head_attention_forward
  between batch-first transposes. Its fast path (eval without gradients; the same numbers to the
  rounding) reads tensor properties (``is_nested``, devices) that a trace cannot."""
  # one decision on the input's rank (a guard where the port runs), not one per use
  batch_first = self.batch_first and bool(query.dim() == 3)
  if batch_first:
    query, key, value = (t.transpose(1, 0) for t in (query, key, value))
  output, weights = F.multi_head_attention_forward(
      query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
      self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
      training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
      use_separate_proj_weight=not self._qkv_same_embed_dim, q_proj_weight=self.q_proj_weight,
      k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
      average_attn_weights=average_attn_weights, is_causal=is_causal,
  )  # fmt: skip
  return (output.transpose(1, 0) if batch_first else output), weights


# torch.nn modules fx would keep whole whose forward is one table op on their own parameters:
# traced through, so each parameter is a variable at its torch name (``act.weight``,
# ``attn.in_proj_weight``); TRACED_FORWARDS replaces a forward while tracing.
TRACED_FORWARDS = {torch.nn.MultiheadAttention: _multihead_attention_forward}
TRACED_THROUGH = (torch.nn.PReLU, *TRACED_FORWARDS)  # F.prelu(input, self.weight)
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
  from timm.layers import BatchNormAct2d, Conv2dSame, DropPath, activations
  from timm.layers import Linear as TimmLinear
  from timm.layers.drop import drop_path

  # its forward pads as TensorFlow's "SAME" (pad_same: the odd pixel after), then convolves
  register(Conv2dSame)(lambda m, o: conv(m, o, padding="SAME"))

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
    after = tuple(Apply(ops.OPS[c.op].fn, c.kwargs) for c in after if c.op is not torch.Tensor.clone)
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
      return Leaf(made, mode_keyword(made))
    if callable(made):
      return Call(made)
    raise TypeError(
        f"custom_modules factory for {type(module).__name__} returned {type(made).__name__}: return"
        " a flax.linen Module or a JAX function"
    )

  return make


def class_name(cls: type) -> str:
  """``torch.nn.Conv2d`` for torch.nn's classes, else the defining module's path."""
  if getattr(torch.nn, cls.__name__, None) is cls:
    return f"torch.nn.{cls.__name__}"
  return f"{cls.__module__}.{cls.__name__}"


def supported() -> list[str]:
  return sorted(class_name(cls) for cls in (*MODULES, *TRACED_THROUGH))
