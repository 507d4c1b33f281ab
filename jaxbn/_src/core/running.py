"""Running (tracked) statistics: torch's update rule and momentum convention."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbn._src.core.statistics import BatchStats


class RunningStats(NamedTuple):
  """torch's three BatchNorm buffers, per channel.

  Attributes:
    mean: ``running_mean`` (torch's initial value 0).
    var: ``running_var``, fed with the UNBIASED batch variance (initial value 1).
    num_batches_tracked: training batches counted so far (int32, int64 under x64); it drives the
      cumulative average of ``momentum=None``.
  """

  mean: jax.Array
  var: jax.Array
  num_batches_tracked: jax.Array


def update_factor(momentum: float | None, num_batches_tracked: jax.Array, dtype=jnp.float32) -> jax.Array | float:
  """Weight of the new batch: ``momentum`` (torch's convention), or ``1 / num_batches_tracked``
  (a cumulative average) when ``momentum`` is None. ``num_batches_tracked`` already counts the
  new batch, as in torch. Example::

    >>> import jax.numpy as jnp
    >>> from jaxbn.functional import update_factor
    >>> update_factor(0.1, jnp.array(5)), float(update_factor(None, jnp.array(4)))
    (0.1, 0.25)
  """
  if momentum is None:
    return 1 / num_batches_tracked.astype(dtype)
  return momentum


def update_running_stats(running: RunningStats, batch: BatchStats, momentum: float | None) -> RunningStats:
  """One training step's update: ``running = (1 - f) * running + f * batch``; the counter always
  counts the batch.

  The variance fed in is the unbiased batch variance (``n / (n - 1)``), as torch does; ``batch``
  has keepdims shape, ``running`` the per-channel shape. Dtypes of ``running`` are kept.

  A channel with fewer than two values in the (global, valid) batch keeps its mean and variance:
  torch leaves them unchanged on an empty batch and raises before touching them on a single
  value (after counting the batch), where ``n / (n - 1)`` would write NaN. Example::

    >>> import jax.numpy as jnp
    >>> from jaxbn.functional import RunningStats, batch_statistics, update_running_stats
    >>> running = RunningStats(jnp.zeros(2), jnp.ones(2), jnp.zeros((), jnp.int32))
    >>> empty = batch_statistics(jnp.zeros((0, 2)), (0,))
    >>> update_running_stats(running, empty, momentum=0.3)
    RunningStats(mean=Array([0., 0.], dtype=float32), var=Array([1., 1.], dtype=float32), num_batches_tracked=Array(1, dtype=int32))
  """
  num_batches_tracked = running.num_batches_tracked + 1

  def blend(old: jax.Array, new: jax.Array) -> jax.Array:
    dtype = jnp.promote_types(old.dtype, new.dtype)
    factor = update_factor(momentum, num_batches_tracked, dtype)
    new = new.reshape(old.shape).astype(dtype)
    enough = batch.count.reshape(old.shape) >= 2
    return jnp.where(enough, (1 - factor) * old + factor * new, old).astype(old.dtype)

  return RunningStats(
      blend(running.mean, batch.mean),
      blend(running.var, batch.unbiased_var),
      num_batches_tracked,
  )
