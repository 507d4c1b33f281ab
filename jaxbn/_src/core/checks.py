"""Input and configuration checks shared by the jaxbn layers: each error names the fix."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


class MomentumConventionWarning(UserWarning):
  """A momentum that looks like flax's convention (``running = m * running + (1 - m) * batch``)."""


# Momenta already warned about: flax clones modules inside apply, and one warning is enough.
_warned_momenta: set[float] = set()


def check_momentum(momentum: float | None) -> None:
  if momentum is None:
    return
  if not 0.0 <= momentum <= 1.0:
    raise ValueError(
        f"momentum must lie in [0, 1] or be None, got {momentum}. jaxbn uses torch's convention:"
        " running = (1 - momentum) * running + momentum * batch."
    )
  if momentum > 0.5 and momentum not in _warned_momenta:
    _warned_momenta.add(momentum)
    warnings.warn(
        f"momentum={momentum} is the weight of the NEW batch in jaxbn (torch's convention: running"
        " = (1 - momentum) * running + momentum * batch). flax, Keras and Equinox use the opposite"
        f" convention; flax's momentum m is jaxbn's 1 - m (flax 0.9 == jaxbn 0.1). If {momentum}"
        " is intended, silence this with warnings.filterwarnings('ignore',"
        " category=jaxbn.MomentumConventionWarning).",
        MomentumConventionWarning,
        stacklevel=4,
    )


def check_epsilon(epsilon: float, *, uses_batch_stats: bool) -> None:
  # torch's wording (torch.nn.functional.batch_norm).
  if uses_batch_stats and epsilon <= 0.0:
    raise ValueError(f"batch_norm eps must be positive during training, but got {epsilon}")
  if epsilon < 0.0:
    raise ValueError(f"batch_norm eps must be non-negative, but got {epsilon}")


def feature_axes(shape: Sequence[int], axis: int | Sequence[int]) -> tuple[int, ...]:
  """The channel axes of an input of ``shape``, non-negative and sorted."""
  rank = len(shape)
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  for a in axes:
    if not -rank <= a < rank:
      raise ValueError(
          f"axis={axis} is out of range for an input of shape {tuple(shape)}. Pass the channel"
          " axis: -1 for channels-last (NHWC) input, 1 for torch's NCHW layout."
      )
  canonical = tuple(sorted({a % rank for a in axes}))
  if len(canonical) == rank:
    raise ValueError(
        f"BatchNorm needs a batch axis besides the channel axis {axis}, got an input of shape"
        f" {tuple(shape)}. Add a leading batch axis, e.g. x[None]."
    )
  return canonical


def check_batch_size(shape: Sequence[int], reduction_axes: Sequence[int]) -> None:
  """torch's ``_verify_batch_size``: batch statistics need two values per channel."""
  if math.prod(shape[i] for i in reduction_axes) == 1:
    raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(shape)}")


def layer_label(kind: str, path: Sequence[str]) -> str:
  """How errors name a layer: its class and module path, e.g. ``BatchNorm 'layer1/0/bn1'``."""
  return f"{kind} '{'/'.join(path) or '<root>'}'"


def check_channels(layer: str, shape: Sequence[int], axes: Sequence[int], held: dict[str, tuple[int, ...]]) -> None:
  """Compare the input's channel count with the shapes of variables the layer already holds."""
  channels = tuple(shape[i] for i in axes)
  wrong = {name: s for name, s in held.items() if tuple(s) != channels}
  if wrong:
    listing = ", ".join(f"{name} {s}" for name, s in wrong.items())
    raise ValueError(
        f"{layer}: the input of shape {tuple(shape)} has {channels} channels on axis"
        f" {tuple(axes)}, but the layer's variables hold {listing}. Check the channel axis (-1 for"
        " NHWC, 1 for NCHW) and that these variables belong to this layer."
    )


def check_mask(mask, shape: Sequence[int]) -> None:
  """A mask must be boolean and broadcastable to the input (flax's convention)."""
  if mask.dtype != bool:
    raise ValueError(f"mask must be boolean, got dtype {mask.dtype}. Pass e.g. valid != 0.")
  try:
    np.broadcast_shapes(mask.shape, tuple(shape))
  except ValueError:
    raise ValueError(
        f"mask of shape {tuple(mask.shape)} does not broadcast to the input's {tuple(shape)}. For one"
        " flag per example give it the input's rank, e.g. valid[:, None, None, None] for NHWC."
    ) from None


# torch's names for the dtypes it refuses, so the message reads as torch's does.
_TORCH_DTYPE_NAMES = {
    "bool": "Bool",
    "int8": "Char",
    "uint8": "Byte",
    "int16": "Short",
    "uint16": "UInt16",
    "int32": "Int",
    "uint32": "UInt32",
    "int64": "Long",
    "uint64": "UInt64",
    "complex64": "ComplexFloat",
    "complex128": "ComplexDouble",
}


def check_input_dtype(layer: str, x) -> None:
  """Integer, boolean and complex inputs are refused (torch: NotImplementedError), before jax
  would promote an integer input to float and the output cast it back, truncated."""
  dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
  if jnp.issubdtype(dtype, jnp.floating):  # bfloat16 and the float8s too
    return
  raise TypeError(
      f"{layer}: \"batch_norm\" not implemented for '{_TORCH_DTYPE_NAMES.get(dtype.name, dtype.name)}'"
      f" (input dtype {dtype.name}). BatchNorm takes float16, bfloat16, float32 or float64 input:"
      " cast it first, e.g. x.astype(jnp.float32)."
  )
