"""Per-channel batch statistics: the one place jaxbn reduces over a batch.

The mean is returned as ``shift + mean_offset``, where ``shift`` is a value taken from the batch
itself. Subtracting a nearby float from ``x`` is exact (Sterbenz), so sums of ``x - shift`` keep
full precision even when ``|mean| / std`` is 1e4 or more, where the textbook
``E[x^2] - E[x]^2`` in float32 returns garbage. Normalising ``(x - shift) - mean_offset`` instead
of ``x - mean`` also avoids rounding the mean to float32 before the subtraction.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax


class BatchStats(NamedTuple):
  """Per-channel statistics of a batch, with shape ``keepdims`` over the reduced axes.

  Attributes:
    shift: one element of the batch per channel (no gradient flows through it).
    mean_offset: batch mean minus ``shift``.
    var: the biased (population) variance, the one used to normalise.
    count: elements per channel over the whole (global, if synced) batch.
  """

  shift: jax.Array
  mean_offset: jax.Array
  var: jax.Array
  count: jax.Array

  @property
  def mean(self) -> jax.Array:
    return self.shift + self.mean_offset

  @property
  def unbiased_var(self) -> jax.Array:
    """Bessel-corrected variance, ``var * n / (n - 1)``: what torch feeds its running variance."""
    count = self.count.astype(self.var.dtype)
    return self.var * (count / (count - 1))


def batch_statistics(
    x: jax.Array,
    reduction_axes: Sequence[int],
    *,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
) -> BatchStats:
  """Mean and biased variance of ``x`` over ``reduction_axes``, optionally across devices.

  ``x`` should already be in the statistics dtype (float32 for half inputs). With ``axis_name``,
  each device reduces its own shard and one ``all_gather`` merges ``(count, mean, M2)`` weighted
  by count, torch SyncBatchNorm's rule, so uneven per-device batches give the global statistics.
  """
  reduction_axes = tuple(reduction_axes)
  first = tuple(slice(0, 1) if i in reduction_axes else slice(None) for i in range(x.ndim))
  shift = lax.stop_gradient(x[first])
  centered = x - shift
  count = 1
  for i in reduction_axes:
    count *= x.shape[i]
  count = jnp.asarray(count, jnp.int32)
  # Corrected two-pass (Chan, Golub & LeVeque): the second pass also sums the residuals, whose
  # float32 partial sums stay small, and adds that correction to the first pass's mean. Without it
  # the mean is off by tens of ulps once the shift lies a few standard deviations from the mean.
  rough_offset = jnp.mean(centered, reduction_axes, keepdims=True)
  residual = centered - rough_offset
  correction = jnp.mean(residual, reduction_axes, keepdims=True)
  offset = rough_offset + correction
  var = jnp.mean(jnp.square(residual), reduction_axes, keepdims=True) - jnp.square(correction)
  local = BatchStats(shift, offset, var, count)
  if axis_name is None:
    return local
  return _merge_across_devices(local, axis_name, axis_index_groups)


def _merge_across_devices(local: BatchStats, axis_name, axis_index_groups) -> BatchStats:
  """Chan et al.'s parallel merge of per-device (count, mean, M2), in one collective round."""
  gathered = lax.all_gather(
      (local.shift, local.mean_offset, local.var, local.count),
      axis_name,
      axis_index_groups=axis_index_groups,
  )
  shifts, offsets, variances, counts = gathered
  shift = shifts[0]
  # Re-express every device's mean relative to one common shift; differences of nearby floats
  # are exact, so the offsets stay small and precise.
  offsets = (shifts - shift) + offsets
  weights = counts.astype(offsets.dtype).reshape((-1,) + (1,) * offsets[0].ndim)
  total = jnp.sum(weights, axis=0)
  offset = jnp.sum(weights * offsets, axis=0) / total
  m2 = jnp.sum(weights * variances + weights * jnp.square(offsets - offset), axis=0)
  return BatchStats(shift, offset, m2 / total, jnp.sum(counts))
