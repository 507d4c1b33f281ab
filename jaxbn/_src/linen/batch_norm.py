"""jaxbn.BatchNorm: a flax.linen BatchNorm with torch.nn.BatchNorm{1,2,3}d's semantics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype, Initializer

from jaxbn._src.core import checks
from jaxbn._src.core.layer import batch_norm_call, counter_dtype, prepare
from jaxbn._src.core.running import RunningStats
from jaxbn._src.linen.modes import forced_eval


class BatchNorm(nn.Module):
  """Batch normalisation with PyTorch's semantics, as a drop-in for ``flax.linen.BatchNorm``.

  Differences from flax that make converted torch models behave identically:
  ``momentum`` is the weight of the new batch (torch's 0.1, not flax's 0.9); the running variance
  is updated with the unbiased batch variance; ``momentum=None`` gives a cumulative average;
  ``num_batches_tracked`` is kept; ``track_running_stats=False`` uses batch statistics in both
  modes; the output keeps the input's dtype.

  Example::

    >>> import jax, jax.numpy as jnp, jaxbn
    >>> bn = jaxbn.BatchNorm(use_running_average=False)
    >>> x = jax.random.normal(jax.random.key(0), (8, 5, 5, 3))
    >>> variables = bn.init(jax.random.key(1), x)
    >>> y, updates = bn.apply(variables, x, mutable=['batch_stats'])
    >>> int(updates['batch_stats']['num_batches_tracked'])
    1

  Attributes:
    use_running_average: True: normalise with the running statistics (torch's ``eval()``);
      False: with the batch's (torch's ``train()``). A field, a call argument, or both (flax's
      ``merge_param``: exactly one must be set).
    axis: the channel axis (or axes): -1 for NHWC, 1 for torch's NCHW layout.
    momentum: torch's convention, ``running = (1 - momentum) * running + momentum * batch``;
      ``None`` for the cumulative average ``1 / num_batches_tracked``.
    epsilon: added to the variance; must be > 0 where batch statistics are used.
    dtype: the output dtype; default: the input's dtype (torch's rule).
    param_dtype: dtype of ``scale``, ``bias`` and the running statistics.
    use_bias, use_scale: torch's ``affine`` (and ``bias``) flags.
    bias_init, scale_init: initialisers (torch: zeros and ones).
    track_running_stats: False: no ``batch_stats`` collection; batch statistics in both modes.
      Running statistics passed in anyway are used in eval and never updated, as in torch.
    axis_name, axis_index_groups: compute statistics over the devices of a mapped axis, with
      torch SyncBatchNorm's count-weighted merge.
    update_stats: False: training mode normalises with batch statistics and never writes the
      running statistics, so ``batch_stats`` need not be mutable. With True (the default), training
      without ``mutable=["batch_stats"]`` is an error, as in flax, rather than a silent no-update.
    compute_channels_last: for channels-first input (``axis=1``), normalise in channels-last
      layout between two transposes. Slower alone (the transposes are passes over the batch),
      faster inside a graph whose convolutions run channels-last, where XLA cancels the
      transposes with their neighbours': ``jaxbn.port`` sets it. Same results.
    runtime_checks: with ``mask`` or ``axis_name`` the count of values per channel is known only
      at run time, so a count of 1, where torch raises, cannot raise; the running statistics are
      then left unchanged (as torch leaves them). True adds torch's error as a
      ``jax.experimental.checkify`` check: wrap the step in
      ``checkify.checkify(step, errors=checkify.user_checks)`` and call ``err.throw()``.

  Variables: ``params/{scale, bias}`` and ``batch_stats/{mean, var, num_batches_tracked}``. Running
  statistics are updated in training mode outside ``init``; ``batch_stats`` must then be passed
  as ``mutable`` (or ``update_stats=False`` set).
  """

  use_running_average: bool | None = None
  axis: int | Sequence[int] = -1
  momentum: float | None = 0.1
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  track_running_stats: bool = True
  axis_name: str | None = None
  axis_index_groups: Any = None
  update_stats: bool = True
  runtime_checks: bool = False
  compute_channels_last: bool = False

  def __post_init__(self):
    checks.check_momentum(self.momentum)
    super().__post_init__()

  @nn.compact
  def __call__(
      self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
  ) -> jax.Array:
    """Normalises ``x``; ``mask`` (boolean, broadcastable to ``x``, e.g. ``valid[:, None, None,
    None]`` for padded examples) restricts the batch statistics to the marked elements."""
    use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    forced = forced_eval(self.scope.path)  # consulted in every mode: an eval call is inside the context too
    use_running_average = use_running_average or forced
    label = checks.layer_label("BatchNorm", self.scope.path)
    prepared = prepare(label, x, self.axis)
    feature_shape = prepared.feature_shape
    checks.check_channels(
        label,
        prepared.x.shape,
        prepared.feature_axes,
        {
            f"{collection}/{name}": self.get_variable(collection, name).shape
            for collection, name in (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"))
            if self.has_variable(collection, name)
        },
    )
    running = None
    if self.track_running_stats or self.has_variable("batch_stats", "mean"):
      running = RunningStats(
          self.variable("batch_stats", "mean", jnp.zeros, feature_shape, self.param_dtype),
          self.variable("batch_stats", "var", jnp.ones, feature_shape, self.param_dtype),
          self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), counter_dtype()),
      )
    scale = self.param("scale", self.scale_init, feature_shape, self.param_dtype) if self.use_scale else None
    bias = self.param("bias", self.bias_init, feature_shape, self.param_dtype) if self.use_bias else None

    updates = self.track_running_stats and self.update_stats and not use_running_average and not self.is_initializing()
    if updates and not self.is_mutable_collection("batch_stats"):
      raise ValueError(
          f"{label}: training mode (use_running_average=False) updates the running statistics,"
          ' but the "batch_stats" collection is not mutable, so they would silently stay as they'
          ' are. Pass mutable=["batch_stats"] to apply and keep the updates it returns; to'
          " normalise with batch statistics without updating them, build the layer with"
          " update_stats=False."
      )
    y, updated = batch_norm_call(
        label,
        prepared,
        scale=scale,
        bias=bias,
        running=None if running is None else RunningStats(*(v.value for v in running)),
        use_running_average=use_running_average,
        momentum=self.momentum,
        epsilon=self.epsilon,
        update=updates,
        param_dtype=self.param_dtype,
        dtype=self.dtype,
        mask=mask,
        axis_name=None if self.is_initializing() else self.axis_name,
        axis_index_groups=self.axis_index_groups,
        runtime_checks=self.runtime_checks,
        compute_channels_last=self.compute_channels_last,
    )
    if updated is not None:
      for variable, value in zip(running, updated, strict=True):
        variable.value = value
    return y
