"""torch.autocast's rules for the port: which ops run in the low dtype, which in float32.

Inside ``torch.autocast(device, dtype)`` torch casts the floating arguments of a listed op before
calling it: matrix products and convolutions to ``dtype`` (its "lower_precision_fp" list), a
device-specific list to float32 ("fp32"), ``cat``/``stack`` on CPU to their widest argument
("promote"). Every other op runs in its inputs' dtype by the usual promotion, which JAX shares
(``bfloat16 * float32`` is float32 in both). Parameters stay float32; casts of float64 tensors are
never made (``is_eligible`` in torch's source).

``LISTS`` are torch 2.14's lists (``aten/src/ATen/autocast_mode.cpp``, the
``TORCH_LIBRARY_IMPL(aten, AutocastCPU, m)`` and ``AutocastCUDA`` blocks) restricted to the ATen
ops the port's tables reach; ``ATEN`` names the ATen op each table entry calls. Both are checked
against the installed torch in ``parity_tests/test_autocast.py``: every name has (or, off the
lists, lacks) the device's autocast kernel in torch's dispatcher, and on CPU every op is run under
``torch.autocast`` with its result's dtype compared.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import torch
import torch.nn.functional as F

from jaxbn._src.port import leaves, ops

LOWER, FLOAT32, PROMOTE = "lower_precision_fp", "fp32", "promote"

_CONVS = {f"conv{n}d": (getattr(F, f"conv{n}d"), getattr(torch.nn, f"Conv{n}d")) for n in (1, 2, 3)}
_PAD_OPS = {"reflect": "reflection_pad{}d", "replicate": "replication_pad{}d"}
_UPSAMPLE_OPS = {
    "nearest": "upsample_nearest{}d",
    "nearest-exact": "_upsample_nearest_exact{}d",
    "linear": "upsample_linear1d",
    "bilinear": "upsample_bilinear2d",
    "bicubic": "upsample_bicubic2d",
    "trilinear": "upsample_trilinear3d",
}


def _pad(x, pad, mode="constant", value=None):
  return _PAD_OPS[mode].format(len(pad) // 2) if mode in _PAD_OPS else None


def _interpolate(x, size=None, scale_factor=None, mode="nearest", align_corners=None, *args, **kwargs):
  name = _UPSAMPLE_OPS[mode].format(x.ndim - 2)
  return f"_{name}_aa" if kwargs.get("antialias") else name


def _pow(x, exponent):
  if not hasattr(x, "dtype"):
    return "pow.Scalar"  # 2 ** tensor
  return "pow.Tensor_Tensor" if hasattr(exponent, "dtype") else "pow.Tensor_Scalar"


def _sum(x, dim=None, *args, **kwargs):
  return "sum" if dim is None else "sum.dim_IntList"


def _einsum(equation, *operands):
  """torch contracts einsum's operands pairwise with bmm, which autocast casts; one operand, or
  no index summed away, runs without bmm."""
  inputs, _, output = equation.replace(" ", "").partition("->")
  terms = inputs.split(",")
  if len(terms) < 2:
    return None
  if not output:  # implicit form: the indices that appear once, sorted
    output = "".join(sorted(c for c in set(inputs) - {","} if inputs.count(c) == 1))
  summed = set("".join(terms)) - set(output) - {"."}
  return "bmm" if summed else None


# The ATen op each entry of the port's tables calls (a function of the arguments where it depends on them).
ATEN: dict[Any, str | Callable[..., str | None]] = {
    **{key: name for name, keys in _CONVS.items() for key in keys},
    **{getattr(torch.nn, f"ConvTranspose{n}d"): f"conv_transpose{n}d{'.input' if n > 1 else ''}" for n in (1, 2, 3)},
    **{key: "linear" for key in (torch.nn.Linear, F.linear)},
    F.grid_sample: "grid_sampler",
    **{key: "matmul" for key in (torch.matmul, ops.method("matmul"), operator.matmul)},
    **{key: "bmm" for key in (torch.bmm, ops.method("bmm"))},
    F.scaled_dot_product_attention: "scaled_dot_product_attention",
    **{key: "prelu" for key in (F.prelu, torch.prelu)},
    **{key: "cat" for key in (torch.cat, torch.concat, torch.concatenate)},
    torch.stack: "stack",
    **{getattr(F, f"{op}3d"): f"{op}3d" for op in ("avg_pool", "max_pool", "adaptive_avg_pool", "adaptive_max_pool")},
    F.pad: _pad,
    F.interpolate: _interpolate,
    **{key: "softmax.int" for key in (F.softmax, torch.softmax, ops.method("softmax"))},
    **{key: "log_softmax.int" for key in (F.log_softmax, torch.log_softmax, ops.method("log_softmax"))},
    **{key: "exp" for key in (torch.exp, ops.method("exp"))},
    **{key: "rsqrt" for key in (torch.rsqrt, ops.method("rsqrt"))},
    **{key: _pow for key in (torch.pow, ops.method("pow"), operator.pow)},
    **{key: _sum for key in (torch.sum, ops.method("sum"))},
    **{key: "layer_norm" for key in (torch.nn.LayerNorm, F.layer_norm)},
    **{key: "group_norm" for key in (torch.nn.GroupNorm, F.group_norm)},
    F.normalize: "norm.ScalarOpt_dim",
    torch.einsum: _einsum,
}
try:
  from timm.layers import Linear as TimmLinear

  ATEN[TimmLinear] = "linear"
except ImportError:  # timm is optional
  pass

_LOWER_BOTH = (
    "conv1d conv2d conv3d conv_transpose1d conv_transpose2d.input conv_transpose3d.input linear matmul bmm"
    " scaled_dot_product_attention prelu"
).split()

LISTS: dict[str, dict[str, str]] = {
    "cpu": {
        **dict.fromkeys(_LOWER_BOTH, LOWER),
        **dict.fromkeys(
            "avg_pool3d max_pool3d adaptive_avg_pool3d adaptive_max_pool3d reflection_pad1d reflection_pad2d"
            " replication_pad1d replication_pad2d replication_pad3d grid_sampler".split(),
            FLOAT32,
        ),
        "cat": PROMOTE,
        "stack": PROMOTE,
    },
    "cuda": {
        **dict.fromkeys(_LOWER_BOTH, LOWER),
        **dict.fromkeys(  # softmax, log_softmax and sum are "fp32_set_opt_dtype": float32 unless given a dtype
            "softmax.int log_softmax.int exp rsqrt pow.Tensor_Scalar pow.Tensor_Tensor pow.Scalar sum sum.dim_IntList"
            " layer_norm group_norm norm.ScalarOpt_dim"  # norm is "fp32_append_dtype": computed in float32
            " upsample_nearest1d upsample_nearest2d upsample_nearest3d _upsample_nearest_exact1d"
            " _upsample_nearest_exact2d _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d"
            " _upsample_bilinear2d_aa upsample_bicubic2d _upsample_bicubic2d_aa upsample_trilinear3d grid_sampler".split(),
            FLOAT32,
        ),
    },
}


# Ops torch computes as several ATen ops, each cast by its own list entry, which one table op cannot
# reproduce: refused under autocast, by name.
COMPOSITE = {F.multi_head_attention_forward: "nn.MultiheadAttention (F.multi_head_attention_forward)"}


@dataclasses.dataclass(frozen=True)
class Autocast:
  """``torch.autocast(device_type=device, dtype=dtype)``'s rules."""

  dtype: str
  device: str

  def category(self, key, args=(), kwargs=None) -> str | None:
    aten = ATEN.get(key)
    if callable(aten):
      aten = aten(*args, **(kwargs or {}))
    return LISTS[self.device].get(aten)

  def target(self, key, args, kwargs) -> Any:
    """The dtype the op's floating arguments are cast to, or None."""
    category = self.category(key, args, kwargs)
    if category == LOWER:
      return jnp.dtype(self.dtype)
    if category == FLOAT32:
      return jnp.dtype(jnp.float32)
    if category == PROMOTE:
      floating = [leaf.dtype for leaf in jax.tree.leaves((args, kwargs)) if _eligible(leaf)]
      return jnp.result_type(*floating) if floating else None
    return None


def make(dtype, device: str | None) -> Autocast | None:
  """``port(autocast=, autocast_device=)`` checked; the device defaults to JAX's backend."""
  if dtype is None:
    return None
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"autocast takes jnp.bfloat16 or jnp.float16 (torch.autocast's dtypes), not {dtype}")
  device = device or ("cuda" if jax.default_backend() == "gpu" else "cpu")
  if device not in LISTS:
    raise ValueError(
        f"autocast_device must be one of {sorted(LISTS)} (whose lists torch.autocast uses), not {device!r}"
    )
  return Autocast(dtype.name, device)


def _eligible(value) -> bool:
  dtype = getattr(value, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating) and dtype != jnp.float64


def cast(tree, dtype):
  return jax.tree.map(lambda v: v.astype(dtype) if _eligible(v) else v, tree)


@dataclasses.dataclass(frozen=True)
class Cast:
  """A table op called as inside torch.autocast: its floating arguments cast first, where listed."""

  fn: Callable
  key: Any
  autocast: Autocast

  def __call__(self, *args, **kwargs):
    dtype = self.autocast.target(self.key, args, kwargs)
    if dtype is None:
      return self.fn(*args, **kwargs)
    return self.fn(*cast(args, dtype), **cast(kwargs, dtype))


def op(rule: ops.OpRule, key, autocast: Autocast | None) -> ops.OpRule:
  if autocast is None or key not in ATEN:
    return rule
  return dataclasses.replace(rule, fn=Cast(rule.fn, key, autocast))


def leaf(made: leaves.Leaf, torch_class: type, autocast: Autocast | None) -> leaves.Leaf:
  """A module leaf under autocast: a listed layer computes in the list's dtype (its parameters stay
  in param_dtype)."""
  if autocast is None:
    return made
  category = autocast.category(torch_class)
  if category == LOWER:
    return dataclasses.replace(made, prototype=made.prototype.clone(dtype=jnp.dtype(autocast.dtype)))
  if category == FLOAT32:
    return dataclasses.replace(made, inputs_dtype="float32")
  return made
