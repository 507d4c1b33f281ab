"""Per-channel batch statistics: the one place jaxbn reduces over a batch.

The corrected two-pass algorithm (Chan, Golub & LeVeque): a first pass gives a rough mean, the
``shift``; the second sums ``x - shift`` and its square. Subtracting a nearby float from ``x`` is
exact (Sterbenz), the residuals are small, so their sums keep full precision even when
``|mean| / std`` is 1e4 or more, where the textbook ``E[x^2] - E[x]^2`` in float32 returns garbage.
The mean is kept as ``shift + mean_offset``: normalising ``(x - shift) - mean_offset`` instead of
``x - mean`` avoids rounding the mean to float32 before the subtraction. Only reductions touch the
batch axes, so this works unchanged on a batch sharded across devices (explicit sharding too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class BatchStats(NamedTuple):
  """Per-channel statistics of a batch, with shape ``keepdims`` over the reduced axes.

  Attributes:
    shift: the rough, first-pass mean per channel (no gradient flows through it).
    mean_offset: batch mean minus ``shift``.
    var: the biased (population) variance, the one used to normalise.
    count: elements per channel over the whole (global, if synced) batch; with a mask, the
      valid ones.
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


def kept_shape(shape: Sequence[int], reduction_axes: Sequence[int]) -> tuple[int, ...]:
  """``shape`` with the reduced axes kept as size 1: the shape of every per-channel statistic."""
  return tuple(1 if i in reduction_axes else d for i, d in enumerate(shape))


def batch_statistics(
    x: jax.Array,
    reduction_axes: Sequence[int],
    *,
    mask: jax.Array | None = None,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
) -> BatchStats:
  """Mean and biased variance of ``x`` over ``reduction_axes``, optionally across devices.

  ``x`` should already be in the statistics dtype (float32 for half inputs). ``mask`` (boolean,
  broadcastable to ``x``) marks the elements that count, e.g. ``valid[:, None, None, None]`` for
  a padded per-device batch. With ``axis_name``, each device reduces its own shard and one
  ``all_gather`` merges ``(count, mean, M2)`` weighted by count, torch SyncBatchNorm's rule, so
  uneven per-device batches give exactly the statistics of the global batch.

  Returns a BatchStats with keepdims shapes; ``count`` is an int32 array (0 for an empty batch,
  whose mean and variance are then 0). Example::

    >>> import jax.numpy as jnp
    >>> from jaxbn.functional import batch_statistics
    >>> stats = batch_statistics(jnp.array([[1.0, 10.0], [3.0, 10.0]]), (0,))
    >>> stats.mean.tolist(), stats.var.tolist(), stats.unbiased_var.tolist(), stats.count.tolist()
    ([[2.0, 10.0]], [[1.0, 0.0]], [[2.0, 0.0]], [[2, 2]])
  """
  reduction_axes = tuple(reduction_axes)
  if mask is None:
    count = jnp.full(kept_shape(x.shape, reduction_axes), math.prod(x.shape[i] for i in reduction_axes), jnp.int32)
  else:
    count = jnp.sum(jnp.broadcast_to(mask, x.shape), reduction_axes, keepdims=True, dtype=jnp.int32)
  n = jnp.maximum(count, 1).astype(x.dtype)  # a device may hold no valid element
  shift = lax.stop_gradient(masked_sum(lambda x: x, [x], reduction_axes, mask) / n)
  mean_offset = masked_sum(lambda x: x - shift, [x], reduction_axes, mask, view=1) / n
  sum_of_squares = masked_sum(lambda x: jnp.square(x - shift), [x], reduction_axes, mask, view=2)
  mean_square = sum_of_squares / n
  # Past float32's range the square of the offset may overflow too: keep inf, not inf - inf.
  var = jnp.where(mean_square == jnp.inf, mean_square, jnp.maximum(mean_square - jnp.square(mean_offset), 0))
  local = BatchStats(shift, mean_offset, var, count)
  if axis_name is None:
    return local
  return _merge_across_devices(local, axis_name, axis_index_groups)


def masked_sum(
    fn: Callable[..., jax.Array],
    arrays: Sequence[jax.Array],
    reduction_axes: Sequence[int],
    mask: jax.Array | None = None,
    *,
    view: int = 0,
) -> jax.Array:
  """``sum(fn(*arrays))`` over ``reduction_axes`` (keepdims), counting only where ``mask``.

  ``fn`` sees ``arrays`` with ``view`` leading unit axes added (per-channel operands it closes
  over broadcast as usual). Why: XLA merges identical elementwise ops, so ``x - shift`` feeding
  two sums and the normalisation would become one tensor with three consumers, which XLA:CPU
  writes out in full, an extra write and read of the batch. Giving each use its own ``view``
  keeps them apart, and each sum fuses with its producer into one read of its inputs.
  """
  lead = (1,) * view
  values = fn(*(a.reshape(lead + a.shape) for a in arrays))
  if mask is not None:  # where, not multiply: also keeps NaN or inf padding out of the sums
    mask = jnp.asarray(mask)
    values = jnp.where(mask.reshape((1,) * (values.ndim - mask.ndim) + mask.shape), values, 0)
  total = jnp.sum(values, tuple(view + a for a in reduction_axes), keepdims=True)
  return total.reshape(total.shape[view:])


def _merge_across_devices(local: BatchStats, axis_name, axis_index_groups) -> BatchStats:
  """Chan et al.'s parallel merge of per-device (count, mean, M2), in one collective round."""
  # One all_gather of the four stacked arrays; counts travel as floats (exact below 2**24 per
  # channel and device in float32).
  stacked = jnp.stack([local.shift, local.mean_offset, local.var, local.count.astype(local.var.dtype)])
  shifts, offsets, variances, counts = jnp.moveaxis(
      lax.all_gather(stacked, axis_name, axis_index_groups=axis_index_groups), 1, 0
  )
  # Re-express every device's mean relative to the shift of the device holding the most
  # elements; differences of nearby floats are exact, so the offsets stay small and precise.
  shift = jnp.take_along_axis(shifts, jnp.argmax(counts, axis=0)[None], axis=0)[0]
  offsets = (shifts - shift) + offsets
  total = jnp.sum(counts, axis=0)
  n = jnp.maximum(total, 1)
  offset = jnp.sum(counts * offsets, axis=0) / n
  m2 = jnp.sum(counts * (variances + jnp.square(offsets - offset)), axis=0)
  return BatchStats(shift, offset, m2 / n, total.astype(jnp.int32))


def _varying_axes(value: jax.Array) -> frozenset:
  """Mesh axes along which shard_map's type system considers ``value`` to differ."""
  aval = jax.typeof(value)
  manual = getattr(aval, "mat", None)  # jax >= 0.9; earlier releases call it ``vma``
  return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def summed_like(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
  """A cotangent summed over the shard_map axes along which it varies but its primal does not: a
  replicated parameter used on every device gets the sum of the per-device gradients, as
  autodiff gives it (the transpose of the implicit broadcast is a psum)."""
  extra = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
  return lax.psum(cotangent, extra) if extra else cotangent


def replicated(values: jax.Array, axis_name: str, axis_index_groups: Any = None) -> jax.Array:
  """``values`` computed from merged statistics are equal on every device of a group, but inside
  shard_map ``all_gather``'s result is typed device-varying, so ``out_specs=P()`` would reject
  them. A ``pmax`` of equal values is exact and types them replicated; it runs only there (not
  under pmap or vmap) and only on per-channel vectors. Returns ``values`` unchanged in value.
  Example::

    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.functional import replicated
    >>> jax.vmap(lambda v: replicated(v, "devices"), axis_name="devices")(jnp.ones((2, 3))).shape
    (2, 3)
  """
  if axis_name not in _varying_axes(values):
    return values
  return lax.pmax(values, axis_name, axis_index_groups=axis_index_groups)
