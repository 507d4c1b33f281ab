"""Running (tracked) statistics: torch's update rule and momentum convention."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbn._src.statistics import BatchStats


class RunningStats(NamedTuple):
  """torch's three BatchNorm buffers: ``running_mean``, ``running_var``, ``num_batches_tracked``."""

  mean: jax.Array
  var: jax.Array
  num_batches_tracked: jax.Array


def update_factor(
    momentum: float | None, num_batches_tracked: jax.Array, dtype=jnp.float32
) -> jax.Array | float:
  """Weight of the new batch: ``momentum`` (torch's convention), or ``1 / num_batches_tracked``
  (a cumulative average) when ``momentum`` is None. ``num_batches_tracked`` already counts the
  new batch, as in torch."""
  if momentum is None:
    return 1 / num_batches_tracked.astype(dtype)
  return momentum


def update_running_stats(
    running: RunningStats, batch: BatchStats, momentum: float | None
) -> RunningStats:
  """One training step's update: ``running = (1 - f) * running + f * batch``.

  The variance fed in is the unbiased batch variance (``n / (n - 1)``), as torch does; ``batch``
  has keepdims shape, ``running`` the per-channel shape. Dtypes of ``running`` are kept.
  """
  num_batches_tracked = running.num_batches_tracked + 1

  def blend(old: jax.Array, new: jax.Array) -> jax.Array:
    dtype = jnp.promote_types(old.dtype, new.dtype)
    factor = update_factor(momentum, num_batches_tracked, dtype)
    new = new.reshape(old.shape).astype(dtype)
    return ((1 - factor) * old + factor * new).astype(old.dtype)

  return RunningStats(
      blend(running.mean, batch.mean),
      blend(running.var, batch.unbiased_var),
      num_batches_tracked,
  )
