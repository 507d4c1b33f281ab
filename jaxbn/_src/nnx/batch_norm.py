"""jaxbn.nnx.BatchNorm: a flax.nnx BatchNorm with torch.nn.BatchNorm{1,2,3}d's semantics."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from jaxbn._src.core import checks
from jaxbn._src.core.layer import batch_norm_call, counter_dtype, prepare
from jaxbn._src.core.running import RunningStats

_NO_MODE = (
    "No use_running_average was given to jaxbn.nnx.BatchNorm: pass it to the constructor, to the"
    " call, or set the mode with model.train() / model.eval() / nnx.view(model,"
    " use_running_average=...)."
)


def optional(variable_type, value):
  """A variable, or ``nnx.data(None)`` where the layer has none (so the attribute always exists)."""
  return nnx.data(None) if value is None else variable_type(value)


def held_shapes(module: nnx.Module, names) -> dict[str, tuple[int, ...]]:
  return {name: tuple(getattr(module, name).shape) for name in names if getattr(module, name) is not None}


class BatchNorm(nnx.Module):
  """Batch normalisation with PyTorch's semantics, as a drop-in for ``flax.nnx.BatchNorm``.

  The same running-statistics rules as ``jaxbn.BatchNorm`` (Linen), on the same functional core:
  ``momentum`` is the weight of the new batch (torch's 0.1, not flax's 0.99); the running variance
  takes the unbiased batch variance; ``momentum=None`` is the cumulative average;
  ``num_batches_tracked`` is kept; ``track_running_stats=False`` uses batch statistics in both
  modes.

  Example::

    >>> import jax, jax.numpy as jnp, jaxbn
    >>> from flax import nnx
    >>> bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    >>> y = bn(jax.random.normal(jax.random.key(0), (8, 3)))   # training mode: stats move
    >>> int(bn.num_batches_tracked[...])
    1
    >>> bn.eval()                                               # torch's model.eval()
    >>> y = bn(jnp.ones((1, 3)))
    >>> int(bn.num_batches_tracked[...])
    1

  Args:
    num_features: channels (torch's ``num_features``).
    use_running_average: True: normalise with the running statistics (torch's ``eval()``);
      False: with the batch's (``train()``). ``model.train()``, ``model.eval()`` and
      ``nnx.view(model, use_running_average=...)`` set it; a value passed to the call wins.
    axis: the channel axis: -1 for NHWC, 1 for torch's NCHW.
    momentum: torch's convention, ``running = (1 - momentum) * running + momentum * batch``;
      ``None`` for the cumulative average ``1 / num_batches_tracked``.
    epsilon: added to the variance; must be > 0 where batch statistics are used.
    dtype: the output dtype; default: the input's (torch's rule).
    param_dtype: dtype of ``scale``, ``bias`` and the running statistics.
    use_bias, use_scale: torch's ``affine``; bias_init, scale_init: their initialisers.
    track_running_stats: False: no running statistics; batch statistics in both modes.
    axis_name, axis_index_groups: statistics over the devices of a mapped axis (``nnx.shard_map``,
      ``nnx.pmap``, ``nnx.vmap``), with torch SyncBatchNorm's count-weighted merge.
    runtime_checks: a ``jax.experimental.checkify`` check for a global count of 1 per channel under
      ``mask`` / ``axis_name`` (see ``jaxbn.BatchNorm``).
    keep_eval: normalise with the running statistics and update nothing, whatever the mode:
      ``model.train()`` does not undo it (torch's ``.train()`` trap). Set it on a subtree with
      ``jaxbn.nnx.keep_eval``.
    rngs: for the initialisers, as flax's layer.

  Attributes: ``scale``, ``bias`` (``nnx.Param``); ``mean``, ``var``, ``num_batches_tracked``
  (``nnx.BatchStat``; the counter is int32, int64 under x64); absent ones are None.
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: bool | None = False,
      axis: int = -1,
      momentum: float | None = 0.1,
      epsilon: float = 1e-5,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = nnx.initializers.zeros_init(),
      scale_init: Initializer = nnx.initializers.ones_init(),
      track_running_stats: bool = True,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      runtime_checks: bool = False,
      keep_eval: bool = False,
      rngs: nnx.Rngs,
  ):
    checks.check_momentum(momentum)
    shape = (num_features,)
    self.scale = optional(nnx.Param, scale_init(rngs.params(), shape, param_dtype) if use_scale else None)
    self.bias = optional(nnx.Param, bias_init(rngs.params(), shape, param_dtype) if use_bias else None)
    tracked = track_running_stats
    self.mean = optional(nnx.BatchStat, jnp.zeros(shape, param_dtype) if tracked else None)
    self.var = optional(nnx.BatchStat, jnp.ones(shape, param_dtype) if tracked else None)
    self.num_batches_tracked = optional(nnx.BatchStat, jnp.zeros((), counter_dtype()) if tracked else None)
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.track_running_stats = track_running_stats
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.runtime_checks = runtime_checks
    self.keep_eval = keep_eval

  def __call__(
      self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
  ) -> jax.Array:
    """Normalises ``x``; ``mask`` (boolean, broadcastable to ``x``) restricts the batch statistics
    to the marked elements."""
    use_running_average = nnx.module.first_from(use_running_average, self.use_running_average, error_msg=_NO_MODE)
    use_running_average = use_running_average or self.keep_eval
    label = f"jaxbn.nnx.BatchNorm({self.num_features})"
    prepared = prepare(label, x, self.axis)
    held = {"num_features": (self.num_features,), **held_shapes(self, ("scale", "bias", "mean"))}
    checks.check_channels(label, prepared.x.shape, prepared.feature_axes, held)
    running = None
    if self.mean is not None:
      running = RunningStats(self.mean[...], self.var[...], self.num_batches_tracked[...])
    y, updated = batch_norm_call(
        label,
        prepared,
        scale=None if self.scale is None else self.scale[...],
        bias=None if self.bias is None else self.bias[...],
        running=running,
        use_running_average=use_running_average,
        momentum=self.momentum,
        epsilon=self.epsilon,
        update=self.track_running_stats and not use_running_average,
        param_dtype=self.param_dtype,
        dtype=self.dtype,
        mask=mask,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        runtime_checks=self.runtime_checks,
    )
    if updated is not None:
      self.mean[...], self.var[...], self.num_batches_tracked[...] = updated
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view(model, use_running_average=...)``."""
    if use_running_average is not None:
      self.use_running_average = use_running_average
