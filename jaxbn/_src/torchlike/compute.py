"""The arithmetic of torch's layers on channels-first arrays, shared by the Linen and NNX shells
(``jaxbn.layers``, ``jaxbn.nnx.layers``): convolution, transposed convolution, linear, and
torch's default initialisation."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._src.torchlike import functional as ops


def torch_uniform(fan_in_axes: Callable[[tuple], int]):
  """torch's default init for conv and linear weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

  def init(key, shape, dtype=jnp.float32, fan_in: int | None = None):
    bound = 1 / math.sqrt(max(fan_in if fan_in is not None else fan_in_axes(shape), 1))
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


kernel_init = torch_uniform(lambda shape: int(np.prod(shape[:-1])))


def per_axis(value, n: int) -> tuple:
  """torch's ``3`` or ``(3, 3)``: one value per spatial axis."""
  return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def pairs(padding, n: int) -> tuple[tuple[int, int], ...]:
  """Padding as ``(low, high)`` per axis, from torch's ``p``, ``(p, q)`` or explicit pairs."""
  padding = per_axis(padding, n)
  return tuple(tuple(p) if isinstance(p, (tuple, list)) else (p, p) for p in padding)


def compact(values: tuple):
  """``(3, 3)`` as ``3`` and ``((1, 1), (1, 1))`` as ``1``: the short form, for readable fields."""
  if values and all(isinstance(v, tuple) and len(v) == 2 and v[0] == v[1] for v in values):
    values = tuple(v[0] for v in values)
  return values[0] if values and all(v == values[0] for v in values) else values


def _channels_last_dimension_numbers(n: int):
  channels_last = (0, n + 1, *range(1, n + 1))
  return jax.lax.ConvDimensionNumbers(channels_last, (n + 1, n, *range(n)), channels_last)


def conv(x, kernel, bias, *, strides=1, padding=0, dilation=1, groups=1, padding_mode="zeros", dtype=None):
  """torch's convolution of channels-first ``x`` with a Flax-layout kernel ``(*k, in / groups, out)``
  (``padding="SAME"``: XLA's, which is timm's Conv2dSame's),
  computed channels-last between two transposes, which XLA cancels between neighbouring
  convolutions and BatchNorms (``compute_channels_last``): resnet50's CPU train step took 1.16x
  jaxbn.models' with channels-first dimension numbers, 0.95x this way
  (benchmarks/results-port-step-cpu.md)."""
  n = x.ndim - 2
  if padding == "SAME":  # TensorFlow's, as timm's Conv2dSame pads: the odd pixel after
    window = [d * (k - 1) + 1 for d, k in zip(per_axis(dilation, n), kernel.shape[:n], strict=True)]
    pads = tuple(jax.lax.padtype_to_pads(x.shape[2:], window, per_axis(strides, n), "SAME"))
  else:
    pads = pairs(padding, n)
  if padding_mode != "zeros":
    x = jnp.pad(x, ((0, 0), (0, 0), *pads), mode=ops.PAD_MODES[padding_mode])
    pads = ((0, 0),) * n
  dtype = jnp.result_type(x, kernel) if dtype is None else dtype
  y = jax.lax.conv_general_dilated(
      jnp.moveaxis(x, 1, -1).astype(dtype),
      kernel.astype(dtype),
      per_axis(strides, n),
      pads,
      rhs_dilation=per_axis(dilation, n),
      dimension_numbers=_channels_last_dimension_numbers(n),
      feature_group_count=groups,
  )
  y = jnp.moveaxis(y, -1, 1)
  return y if bias is None else ops.plus_bias(y, bias.reshape(-1, *(1,) * n))


def conv_transpose(x, kernel, bias, *, strides=1, padding=0, output_padding=0, dilation=1, groups=1, dtype=None):
  """torch's transposed convolution; ``kernel`` is torch's weight ``(in, out / groups, *k)`` in the
  layout of flax's ConvTranspose with ``transpose_kernel=True``: ``(*k, out / groups, in)``."""
  n, in_features = x.ndim - 2, x.shape[1]
  kernel_size = kernel.shape[:n]
  features = kernel.shape[n] * groups
  dtype = jnp.result_type(x, kernel) if dtype is None else dtype
  weight = jnp.transpose(kernel, (n + 1, n, *range(n)))  # torch's (in, out/g, *k)
  weight = weight.reshape(groups, in_features // groups, features // groups, *kernel_size)
  weight = jnp.swapaxes(weight, 1, 2).reshape(features, in_features // groups, *kernel_size)
  weight = jnp.flip(weight, tuple(range(2, n + 2)))
  dilation = per_axis(dilation, n)
  padding = [
      (d * (k - 1) - p, d * (k - 1) - p + op)
      for k, p, op, d in zip(kernel_size, per_axis(padding, n), per_axis(output_padding, n), dilation, strict=True)
  ]
  channels_first = (0, 1, *range(2, n + 2))
  y = jax.lax.conv_general_dilated(
      x.astype(dtype),
      weight.astype(dtype),
      (1,) * n,
      padding,
      lhs_dilation=per_axis(strides, n),
      rhs_dilation=dilation,
      dimension_numbers=jax.lax.ConvDimensionNumbers(*(channels_first,) * 3),
      feature_group_count=groups,
  )
  return y if bias is None else ops.plus_bias(y, bias.reshape(-1, *(1,) * n))


def linear(x, kernel, bias, *, dtype=None):
  """torch.nn.Linear with a ``(in, out)`` kernel: ``x @ kernel + bias`` over the last axis."""
  dtype = jnp.result_type(x, kernel) if dtype is None else dtype
  y = jnp.matmul(x.astype(dtype), kernel.astype(dtype))
  return y if bias is None else ops.plus_bias(y, bias)


def embedding_init(padding_idx: int | None):
  """torch.nn.Embedding's initialisation: N(0, 1), the ``padding_idx`` row zero."""

  def init(key, shape, dtype=jnp.float32):
    table = jax.random.normal(key, shape, dtype)
    return table if padding_idx is None else table.at[padding_idx].set(0)

  return init


def embedding(ids, table, padding_idx=None):
  """torch.nn.functional.embedding: ``table``'s rows at ``ids``; the ``padding_idx`` row gets no
  gradient, as in torch. torch raises on an id outside the table; so does this where the ids are
  concrete, under jit (where it cannot) such a row is NaN, never another row."""
  try:
    low, high = (int(np.min(ids)), int(np.max(ids))) if np.size(ids) else (0, 0)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    low = high = 0  # traced: unknown here
  if not 0 <= low <= high < table.shape[0]:
    raise IndexError(f"embedding: ids from {low} to {high}, outside a table of {table.shape[0]} rows")
  if padding_idx is not None:
    padding = jnp.arange(table.shape[0])[:, None] == padding_idx
    table = jnp.where(padding, jax.lax.stop_gradient(table), table)
  return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)
