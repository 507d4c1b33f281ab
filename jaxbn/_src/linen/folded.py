"""jaxbn.FoldedBatchNorm: what remains of a BatchNorm folded into the layer before it (a bias)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype

from jaxbn._src.core import checks
from jaxbn._src.core.layer import folded_call, prepare
from jaxbn._src.linen.frozen import IgnoredBatchNormFields


class FoldedBatchNorm(IgnoredBatchNormFields):
  """What remains of a BatchNorm folded into the preceding kernel by ``jaxbn.fold_batchnorm``:
  ``y = x + bias``. Accepts BatchNorm's fields (ignored, keyword-only; positional order ``axis,
  dtype, param_dtype``) so it can be a model's norm class.

  Example::

    >>> import jax, jax.numpy as jnp, jaxbn
    >>> layer = jaxbn.FoldedBatchNorm()
    >>> layer.apply({'params': {'bias': jnp.array([1.0, 2.0])}}, jnp.zeros((3, 2)))[0].tolist()
    [1.0, 2.0]
  """

  axis: int | Sequence[int] = -1
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  # Folding has used or removed these.
  epsilon: float = dataclasses.field(default=1e-5, kw_only=True)
  use_bias: bool = dataclasses.field(default=True, kw_only=True)
  use_scale: bool = dataclasses.field(default=True, kw_only=True)

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    prepared = prepare(checks.layer_label("FoldedBatchNorm", self.scope.path), x, self.axis)
    bias = self.param("bias", nn.initializers.zeros, prepared.feature_shape, self.param_dtype)
    return folded_call(prepared, bias=bias, dtype=self.dtype)
