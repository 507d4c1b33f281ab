"""jaxbn.FrozenBatchNorm: torchvision's FrozenBatchNorm2d for Flax."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype

from jaxbn._src.core import checks
from jaxbn._src.core.layer import frozen_call, prepare


class IgnoredBatchNormFields(nn.Module, kw_only=True):
  """jaxbn.BatchNorm's fields that a frozen or folded layer accepts and ignores, so that it can be
  passed wherever a model takes its norm class (``norm(use_running_average=..., momentum=...)``).
  Keyword-only: a subclass's own fields alone are positional."""

  use_running_average: bool | None = None
  momentum: float | None = 0.1
  track_running_stats: bool = True
  axis_name: str | None = None
  axis_index_groups: Any = None


class FrozenBatchNorm(IgnoredBatchNormFields):
  """BatchNorm with fixed statistics and affine: ``(x - mean) / sqrt(var + eps) * scale + bias``.

  All four arrays live in ``params`` (apply needs only ``{'params': ...}``) and are constants:
  their gradients are exactly zero, the input's gradient flows. Mask them out of the optimiser
  with ``jaxbn.frozen_mask`` so weight decay cannot move them either. Matches
  ``torchvision.ops.FrozenBatchNorm2d``, except that the output keeps the input's dtype (jaxbn's
  rule; torchvision returns float32 for half input).

  It accepts jaxbn.BatchNorm's fields, so it can be passed wherever a model takes its norm class;
  ``use_running_average``, ``momentum``, ``track_running_stats`` and ``axis_name`` are ignored
  (a frozen layer always normalises with its stored statistics) and keyword-only; the positional
  order is ``axis, epsilon, dtype, param_dtype, use_bias, use_scale``.

  Example::

    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jnp.ones((2, 4, 4, 3))
    >>> variables = jaxbn.FrozenBatchNorm().init(jax.random.key(0), x)
    >>> sorted(variables['params'])
    ['bias', 'mean', 'scale', 'var']
    >>> y = jaxbn.FrozenBatchNorm().apply(variables, x)

  Attributes:
    axis: the channel axis: -1 for NHWC, 1 for NCHW.
    epsilon: added to the variance; 0 is allowed (some torchvision detection weights use it).
    dtype: the output dtype; default: the input's.
    param_dtype: dtype of the four arrays.
    use_scale, use_bias: whether the layer has ``scale`` / ``bias`` (torch's ``affine``).
  """

  axis: int | Sequence[int] = -1
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    del use_running_average  # always the stored statistics
    label = checks.layer_label("FrozenBatchNorm", self.scope.path)
    prepared = prepare(label, x, self.axis)
    names = ["mean", "var"] + ["scale"] * self.use_scale + ["bias"] * self.use_bias
    checks.check_channels(
        label,
        prepared.x.shape,
        prepared.feature_axes,
        {f"params/{n}": self.get_variable("params", n).shape for n in names if self.has_variable("params", n)},
    )
    init = {
        "mean": nn.initializers.zeros,
        "var": nn.initializers.ones,
        "scale": nn.initializers.ones,
        "bias": nn.initializers.zeros,
    }
    frozen = {n: self.param(n, init[n], prepared.feature_shape, self.param_dtype) for n in names}
    return frozen_call(
        prepared,
        mean=frozen["mean"],
        var=frozen["var"],
        scale=frozen.get("scale"),
        bias=frozen.get("bias"),
        epsilon=self.epsilon,
        param_dtype=self.param_dtype,
        dtype=self.dtype,
    )
