"""The inputs both frameworks see: the example's arrays, random batches shaped like it, labels."""

from __future__ import annotations

import numpy as np


def _array(value) -> np.ndarray:
  return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def inputs_of(example) -> tuple[np.ndarray, ...]:
  return tuple(map(_array, example)) if isinstance(example, (tuple, list)) else (_array(example),)


def draw(inputs, given, steps: int, seed: int) -> list[tuple[tuple, np.ndarray]]:
  """``steps`` training batches and one eval batch, each ``(inputs, labels)``."""
  rng = np.random.default_rng(seed)
  if given is not None:
    if len(given) != steps + 1:
      raise ValueError(f"batches: {len(given)} given; verify needs steps + 1 = {steps + 1} (the last: eval)")
    drawn = [inputs_of(b) for b in given]
  else:
    drawn = [
        tuple(
            rng.standard_normal(x.shape).astype(x.dtype) if np.issubdtype(x.dtype, np.floating) else x for x in inputs
        )
        for _ in range(steps + 1)
    ]
  size = inputs[0].shape[0] if inputs[0].ndim else 1
  return [(b, rng.integers(0, 2**31 - 1, size)) for b in drawn]  # labels % classes, in the loss


def as64(inputs: tuple) -> tuple:
  return tuple(x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x for x in inputs)
