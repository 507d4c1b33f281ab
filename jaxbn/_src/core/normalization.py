"""The normalisation formula, shared by every jaxbn layer."""

from __future__ import annotations

import jax
from jax import lax


def normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    epsilon: float,
) -> jax.Array:
  """``(x - mean) / sqrt(var + epsilon) * scale + bias``, all arguments broadcastable to ``x``.

  Subtracting first (torch's CUDA order) rather than torch CPU's ``x * a + (bias - mean * a)``
  keeps precision on data with a large mean; the two differ by a few ulps on ordinary data.
  ``scale`` and ``bias`` may be None (torch's ``affine=False``); the result has the promoted
  dtype of the arguments (callers cast it back). Example::

    >>> import jax.numpy as jnp
    >>> from jaxbn.functional import normalize
    >>> normalize(jnp.array([1.0, 3.0]), 2.0, 1.0, None, None, 0.0).tolist()
    [-1.0, 1.0]
  """
  multiplier = lax.rsqrt(var + epsilon)
  if scale is not None:
    multiplier = multiplier * scale
  y = (x - mean) * multiplier
  if bias is not None:
    y = y + bias
  return y
