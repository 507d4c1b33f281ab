"""One BatchNorm call, shared by every module API (Linen, NNX): the modules only hold variables.

``batch_norm_call`` is torch's ``_BatchNorm.forward`` on arrays: checks, batch or running
statistics, and the updated running statistics; ``frozen_call`` is FrozenBatchNorm2d's forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jaxbn._src.core import checks
from jaxbn._src.core.normalization import normalize
from jaxbn._src.core.running import RunningStats, update_running_stats
from jaxbn._src.core.statistics import replicated
from jaxbn._src.core.training import batch_normalize


def compute_dtype(x_dtype, param_dtype):
  """Statistics and normalisation run in at least float32; half inputs are upcast, as in torch."""
  return jnp.promote_types(jnp.promote_types(x_dtype, jnp.float32), param_dtype)


def counter_dtype():
  """torch's num_batches_tracked is int64; int32 unless jax_enable_x64 is on."""
  return jax.dtypes.canonicalize_dtype(jnp.int64)


def broadcast_shape(shape: Sequence[int], feature_axes: Sequence[int]) -> tuple[int, ...]:
  return tuple(d if i in feature_axes else 1 for i, d in enumerate(shape))


class Prepared(NamedTuple):
  """A checked input and what the layer needs to know of its shape."""

  x: jax.Array
  feature_axes: tuple[int, ...]
  feature_shape: tuple[int, ...]


def prepare(label: str, x, axis: int | Sequence[int]) -> Prepared:
  """Refuses non-float input and bad axes (before any variable is created from the shape)."""
  checks.check_input_dtype(label, x)
  x = jnp.asarray(x)  # float64 numpy becomes float32 unless jax_enable_x64 is on
  feature_axes = checks.feature_axes(x.shape, axis)
  return Prepared(x, feature_axes, tuple(x.shape[i] for i in feature_axes))


def batch_norm_call(
    label: str,
    prepared: Prepared,
    *,
    scale: jax.Array | None,
    bias: jax.Array | None,
    running: RunningStats | None,
    use_running_average: bool,
    momentum: float | None,
    epsilon: float,
    update: bool,
    param_dtype,
    dtype=None,
    mask: jax.Array | None = None,
    axis_name: str | None = None,
    axis_index_groups=None,
    runtime_checks: bool = False,
    compute_channels_last: bool = False,
) -> tuple[jax.Array, RunningStats | None]:
  """torch's BatchNorm forward. ``scale``, ``bias`` and ``running`` are per-channel arrays (or
  None when the layer has none); returns the output and the new running statistics (None when
  ``update`` is False or nothing is tracked). Running statistics are used when
  ``use_running_average`` and present; otherwise batch statistics, as torch's
  ``track_running_stats=False``. ``compute_channels_last``: for channels-first input, normalise
  between two transposes (see BatchNorm's field of that name)."""
  x, feature_axes, feature_shape = prepared
  if compute_channels_last and feature_axes == (1,) and x.ndim > 2:
    if mask is not None:
      checks.check_mask(mask, x.shape)
      mask = jnp.moveaxis(jnp.broadcast_to(mask, x.shape), 1, -1)
    y, updated = batch_norm_call(
        label,
        Prepared(jnp.moveaxis(x, 1, -1), (x.ndim - 1,), feature_shape),
        scale=scale,
        bias=bias,
        running=running,
        use_running_average=use_running_average,
        momentum=momentum,
        epsilon=epsilon,
        update=update,
        param_dtype=param_dtype,
        dtype=dtype,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        runtime_checks=runtime_checks,
    )
    return jnp.moveaxis(y, -1, 1), updated
  reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
  shape = broadcast_shape(x.shape, feature_axes)
  scale = None if scale is None else scale.reshape(shape)
  bias = None if bias is None else bias.reshape(shape)
  uses_batch_stats = not use_running_average or running is None
  checks.check_epsilon(epsilon, uses_batch_stats=uses_batch_stats)
  compute = compute_dtype(x.dtype, param_dtype)

  if not uses_batch_stats:
    mean, var = (v.reshape(shape) for v in running[:2])
    return normalize(x.astype(compute), mean, var, scale, bias, epsilon).astype(dtype or x.dtype), None

  if mask is not None:
    checks.check_mask(mask, x.shape)
  elif axis_name is None:  # with sync or a mask only the (traced) global count matters
    checks.check_batch_size(x.shape, reduction_axes)
  y, stats = batch_normalize(
      x,
      reduction_axes,
      scale,
      bias,
      epsilon,
      mask=mask,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      dtype=compute,
  )
  if runtime_checks and (mask is not None or axis_name is not None):
    checkify.check(
        jnp.all(stats.count != 1),
        f"{label}: Expected more than 1 value per channel when training, got 1 valid value"
        " in channel {} (mask / axis_name)",
        jnp.argmax(stats.count.reshape(-1) == 1),
    )
  updated = None
  if update and running is not None:
    # Buffers, as in torch (updated under no_grad): no gradient flows into them.
    updated = update_running_stats(running, jax.lax.stop_gradient(stats), momentum)
    if axis_name is not None:
      mean, var = replicated(jnp.stack(updated[:2]), axis_name, axis_index_groups)
      updated = RunningStats(mean, var, updated.num_batches_tracked)
  return y.astype(dtype or x.dtype), updated


def frozen_call(
    prepared: Prepared,
    *,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    epsilon: float,
    param_dtype,
    dtype=None,
) -> jax.Array:
  """FrozenBatchNorm2d's forward: ``(x - mean) / sqrt(var + eps) * scale + bias`` with constants."""
  checks.check_epsilon(epsilon, uses_batch_stats=False)
  x, feature_axes, _ = prepared
  shape = broadcast_shape(x.shape, feature_axes)
  mean, var, scale, bias = (
      None if a is None else jax.lax.stop_gradient(a).reshape(shape) for a in (mean, var, scale, bias)
  )
  y = normalize(x.astype(compute_dtype(x.dtype, param_dtype)), mean, var, scale, bias, epsilon)
  return y.astype(dtype or x.dtype)


def folded_call(prepared: Prepared, *, bias: jax.Array, dtype=None) -> jax.Array:
  """What is left of a BatchNorm folded into the kernel before it: ``x + bias``."""
  x, feature_axes, _ = prepared
  return (x + bias.reshape(broadcast_shape(x.shape, feature_axes))).astype(dtype or x.dtype)
