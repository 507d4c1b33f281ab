"""Training-mode batch normalisation: batch statistics, normalisation, and a hand-written gradient.

The forward is ``batch_statistics`` then ``normalize``. The gradient is torch's: with
``x_mu = x - mean``, ``inv_std = 1 / sqrt(var + eps)`` and ``n`` the (global) count,

    dx = scale * inv_std * (dy - sum(dy) / n - x_mu * inv_std**2 * sum(dy * x_mu) / n)

plus the terms of any cotangent of the returned statistics (``d mean_offset / n +
2 d var * x_mu / n``). It keeps only ``x`` (in its own dtype), the mean and ``inv_std`` from the
forward, and makes three passes over the batch (the two sums, then ``dx``), where autodiff of
the forward saves and re-reads more. Across devices the two sums are summed, as torch
SyncBatchNorm all-reduces them; parameter gradients are what autodiff gives: per device, or
summed over shard_map's devices when the parameter is replicated there.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn._src.core.normalization import normalize
from jaxbn._src.core.statistics import (
    BatchStats,
    batch_statistics,
    kept_shape,
    masked_sum,
    summed_like,
)


def batch_normalize(
    x: jax.Array,
    reduction_axes: Sequence[int],
    scale: jax.Array | None,
    bias: jax.Array | None,
    epsilon: float,
    *,
    mask: jax.Array | None = None,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
) -> tuple[jax.Array, BatchStats]:
  """Normalises ``x`` with its own batch statistics; returns ``(y, stats)``.

  ``scale`` and ``bias`` hold one value per channel (shape ``(C,)`` or keepdims), or are None.
  Statistics and ``y`` are computed in ``dtype`` (default: ``x``'s dtype promoted to at least
  float32); ``x`` itself is kept for the backward in its own dtype. ``mask``, ``axis_name`` and
  ``axis_index_groups`` are as in ``batch_statistics``; masked-out elements get ``y`` computed
  from the statistics of the valid ones and a zero gradient.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.functional import batch_normalize
    >>> x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
    >>> y, stats = batch_normalize(x, (0, 1, 2), None, None, 1e-5)
    >>> stats.var.shape
    (1, 1, 1, 3)
  """
  reduction_axes = tuple(sorted(axis % x.ndim for axis in reduction_axes))
  dtype = jnp.dtype(dtype or jnp.promote_types(x.dtype, jnp.float32))
  stats_shape = kept_shape(x.shape, reduction_axes)
  scale = jnp.ones(stats_shape, dtype) if scale is None else jnp.reshape(scale, stats_shape).astype(dtype)
  bias = jnp.zeros(stats_shape, dtype) if bias is None else jnp.reshape(bias, stats_shape).astype(dtype)
  return _batch_normalize(reduction_axes, float(epsilon), axis_name, axis_index_groups, dtype, x, scale, bias, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _batch_normalize(reduction_axes, epsilon, axis_name, axis_index_groups, dtype, x, scale, bias, mask):
  outputs, _ = _forward(reduction_axes, epsilon, axis_name, axis_index_groups, dtype, x, scale, bias, mask)
  return outputs


def _forward(reduction_axes, epsilon, axis_name, axis_index_groups, dtype, x, scale, bias, mask):
  x_compute = x.astype(dtype)
  stats = batch_statistics(
      x_compute, reduction_axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
  )
  y = normalize(x_compute - stats.shift, stats.mean_offset, stats.var, scale, bias, epsilon)
  inv_std = lax.rsqrt(stats.var + epsilon)
  # bias only for its shard_map type (see summed_like); the rest is what dx needs.
  return (y, stats), (x, scale, bias, mask, stats.shift, stats.mean_offset, inv_std, stats.count)


def _backward(reduction_axes, epsilon, axis_name, axis_index_groups, dtype, residuals, cotangents):
  del epsilon
  x, scale, bias, mask, shift, mean_offset, inv_std, count = residuals
  dy, d_stats = cotangents
  dy = dy.astype(dtype)
  sum_dy = masked_sum(lambda dy: dy, [dy], reduction_axes, mask, view=1)
  # sum(dy * x_mu), around (shift - x) and in a view of its own so that XLA does not merge it
  # with the forward's (x - shift) (see masked_sum). Not for 2-D inputs: XLA:CPU reduces a
  # (1, 1, 1, N, C) view of two inputs some 40x slower than (N, C).
  sum_dy_x_shift = -masked_sum(
      lambda dy, x: dy * (shift - x.astype(dtype)), [dy, x], reduction_axes, mask, view=3 if x.ndim > 2 else 0
  )
  sum_dy_x_mu = sum_dy_x_shift - mean_offset * sum_dy
  # Cotangents of the returned statistics (zeros unless the caller differentiates them); the
  # shift is a stop_gradient'ed constant, so the mean's gradient arrives through mean_offset.
  totals = (sum_dy, sum_dy_x_mu, d_stats.mean_offset, d_stats.var)
  if axis_name is not None:
    # A sum over the group; via all_gather, as shard_map has no grouped psum (JAX 0.10).
    gathered = lax.all_gather(jnp.stack(totals), axis_name, axis_index_groups=axis_index_groups)
    totals = jnp.sum(gathered, axis=0)
  g_sum_dy, g_sum_dy_x_mu, g_d_offset, g_d_var = totals
  n = jnp.maximum(count, 1).astype(dtype)
  # dx = a * dy + b * x_mu + c, per channel; one pass over dy and x.
  a = scale * inv_std
  b = (2 * g_d_var - a * jnp.square(inv_std) * g_sum_dy_x_mu) / n
  c = (g_d_offset - a * g_sum_dy) / n
  dx = a * dy + b * ((x.astype(dtype) - shift) - mean_offset) + c
  if mask is not None:
    dx = jnp.where(mask, dx, 0)
  d_scale = summed_like(sum_dy_x_mu * inv_std, scale)
  d_bias = summed_like(sum_dy, bias)
  return summed_like(dx.astype(x.dtype), x), d_scale, d_bias, None


_batch_normalize.defvjp(_forward, _backward)
