"""jaxbn.nnx.FrozenBatchNorm and FoldedBatchNorm: fixed normalisation layers for flax.nnx."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from jaxbn._src.core import checks
from jaxbn._src.core.layer import folded_call, frozen_call, prepare
from jaxbn._src.nnx.batch_norm import held_shapes, optional
from jaxbn._src.variables.state import Frozen

# jaxbn.nnx.BatchNorm's options that a frozen or folded layer accepts and ignores, so that it can
# be passed wherever a model takes its norm class.
IGNORED_BATCHNORM_OPTIONS = frozenset(
    {
        "use_running_average",
        "momentum",
        "track_running_stats",
        "axis_name",
        "axis_index_groups",
        "bias_init",
        "scale_init",
        "runtime_checks",
        "keep_eval",
    }
)


def check_ignored(kind: str, options: dict) -> None:
  unknown = sorted(set(options) - IGNORED_BATCHNORM_OPTIONS)
  if unknown:
    raise TypeError(
        f"jaxbn.nnx.{kind} got unexpected keyword argument(s) {', '.join(unknown)}; it takes"
        f" BatchNorm's {', '.join(sorted(IGNORED_BATCHNORM_OPTIONS))} and ignores them."
    )


class FrozenBatchNorm(nnx.Module):
  """BatchNorm with fixed statistics and affine: ``(x - mean) / sqrt(var + eps) * scale + bias``.

  torchvision's ``FrozenBatchNorm2d`` for flax.nnx: ``mean``, ``var``, ``scale`` and ``bias`` are
  ``jaxbn.nnx.Frozen`` variables (not ``nnx.Param``), so an optimiser over ``nnx.Param`` cannot
  move them, weight decay included, and their gradient is zero. ``jaxbn.nnx.freeze(model)``
  turns a model's BatchNorm layers into these, in place; ``num_batches_tracked`` is then kept
  (never read) so that ``unfreeze`` restores it.

  Example::

    >>> import jax.numpy as jnp, jaxbn
    >>> frozen = jaxbn.nnx.FrozenBatchNorm(2)
    >>> frozen.var[...] = jnp.array([4.0, 9.0])
    >>> frozen(jnp.array([[2.0, 3.0]])).round(3).tolist()
    [[1.0, 1.0]]

  Args:
    num_features: channels.
    axis: the channel axis: -1 for NHWC, 1 for NCHW.
    epsilon: added to the variance; 0 is allowed.
    dtype: the output dtype (default: the input's); param_dtype: the four arrays'.
    use_bias, use_scale: whether it has ``bias`` / ``scale``.
    rngs, and jaxbn.nnx.BatchNorm's other options: accepted and ignored (drop-in as a norm class);
      the options are kept in ``batchnorm_options`` for ``jaxbn.nnx.unfreeze``.
  """

  def __init__(
      self,
      num_features: int,
      *,
      axis: int = -1,
      epsilon: float = 1e-5,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      rngs: nnx.Rngs | None = None,
      **ignored,
  ):
    del rngs  # fixed initial values: ones and zeros
    check_ignored("FrozenBatchNorm", ignored)
    self.batchnorm_options = tuple(sorted(ignored.items()))  # what unfreeze() rebuilds the BatchNorm with
    shape = (num_features,)
    self.mean = Frozen(jnp.zeros(shape, param_dtype))
    self.var = Frozen(jnp.ones(shape, param_dtype))
    self.scale = optional(Frozen, jnp.ones(shape, param_dtype) if use_scale else None)
    self.bias = optional(Frozen, jnp.zeros(shape, param_dtype) if use_bias else None)
    self.num_batches_tracked = nnx.data(None)  # kept by freeze() for unfreeze(); never read
    self.num_features = num_features
    self.axis = axis
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype

  def __call__(self, x, use_running_average: bool | None = None):
    del use_running_average  # always the stored statistics
    label = f"jaxbn.nnx.FrozenBatchNorm({self.num_features})"
    prepared = prepare(label, x, self.axis)
    held = {"num_features": (self.num_features,), **held_shapes(self, ("mean", "var", "scale", "bias"))}
    checks.check_channels(label, prepared.x.shape, prepared.feature_axes, held)
    value = lambda v: None if v is None else v[...]  # noqa: E731
    return frozen_call(
        prepared,
        mean=self.mean[...],
        var=self.var[...],
        scale=value(self.scale),
        bias=value(self.bias),
        epsilon=self.epsilon,
        param_dtype=self.param_dtype,
        dtype=self.dtype,
    )


class FoldedBatchNorm(nnx.Module):
  """What remains of a BatchNorm folded into the kernel before it by
  ``jaxbn.nnx.fold_batchnorm``: ``y = x + bias`` (``bias`` an ``nnx.Param``).

  Example::

    >>> import jax.numpy as jnp, jaxbn
    >>> folded = jaxbn.nnx.FoldedBatchNorm(2)
    >>> folded(jnp.zeros((1, 2))).tolist()
    [[0.0, 0.0]]
  """

  def __init__(
      self,
      num_features: int,
      *,
      axis: int = -1,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      rngs: nnx.Rngs | None = None,
      epsilon: float = 1e-5,
      use_bias: bool = True,
      use_scale: bool = True,
      **ignored,
  ):
    del rngs, epsilon, use_bias, use_scale  # folding has used or removed them
    check_ignored("FoldedBatchNorm", ignored)
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
    self.num_features = num_features
    self.axis = axis
    self.dtype = dtype

  def __call__(self, x, use_running_average: bool | None = None):
    label = f"jaxbn.nnx.FoldedBatchNorm({self.num_features})"
    prepared = prepare(label, x, self.axis)
    checks.check_channels(label, prepared.x.shape, prepared.feature_axes, {"bias": tuple(self.bias.shape)})
    return folded_call(prepared, bias=self.bias[...], dtype=self.dtype)
