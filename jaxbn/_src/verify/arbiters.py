"""The decisions: each turns measured groups of arrays into a ``Check``. A bound the arithmetic
cannot resolve on an ill-conditioned model is decided by torch's own spread (``twin()``: torch's
arrays with every input, parameter and buffer one ulp away, computed only when needed)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jaxbn._src.verify import measures
from jaxbn._src.verify.measures import SPREAD_FACTOR, TRACKS_FACTOR
from jaxbn._src.verify.result import Check

Twin = Callable[[], dict]


def tracks(
    name: str, dtype: str, ours: dict, torch32: dict, torch64: dict, twin: Twin, floor: float, absolute=False
) -> Check:
  """The model's dtype (float32) from identical parameters: within ``floor`` of torch float32
  (relative to the largest value; ``absolute`` for values already scaled), else jaxbn's L2
  distance to torch float64 within TRACKS_FACTOR of torch float32's plus ``floor`` of the norm,
  else within SPREAD_FACTOR of torch float32's own spread."""
  if absolute:
    error = max((float(np.max(np.abs(ours[k] - v), initial=0.0)) for k, v in torch32.items()), default=0.0)
  else:
    error = measures.max_relative(ours, torch32)
  if error <= floor:
    return Check(name, dtype, 0, error, floor, "tolerance", True)
  distance, theirs, norm = measures.tracks(ours, torch32, torch64)
  bound = TRACKS_FACTOR * theirs + floor * norm
  if distance <= bound:
    return Check(name, dtype, 0, distance, bound, "tracks torch float32", True)
  ours_l2, bound = measures.relative_l2(ours, torch64), SPREAD_FACTOR * measures.relative_l2(twin(), torch32)
  return Check(name, dtype, 0, ours_l2, bound, "torch float32 spread", ours_l2 <= bound)


def group(name: str, step: int | None, ours: dict, theirs: dict, twin: Twin, rtol: float) -> Check:
  """float64: relative L2 over the group within ``rtol``, else within SPREAD_FACTOR of torch
  float64's own spread."""
  error = measures.relative_l2(ours, theirs)
  if error <= rtol:
    return Check(name, "float64", step, error, rtol, "tolerance", True)
  bound = SPREAD_FACTOR * measures.relative_l2(twin(), theirs)
  return Check(name, "float64", step, error, bound, "torch float64 spread", error <= bound)


def tensors(name: str, step: int | None, ours: dict, theirs: dict, twin: Twin, rtol: float) -> Check:
  """float64, per tensor: each within ``rtol``, else within SPREAD_FACTOR of torch float64's own
  spread for that tensor; the check names the worst tensor."""
  errors = measures.tensor_errors(ours, theirs)
  beyond = {k: e for k, e in errors.items() if not e <= rtol}
  if not beyond:
    worst = max(errors, key=errors.get, default=None)
    return Check(name, "float64", step, errors.get(worst, 0.0), rtol, "tolerance", True, worst)
  spread = measures.tensor_errors(twin(), theirs)
  ratios = {k: e / max(SPREAD_FACTOR * spread[k], 1e-300) for k, e in beyond.items()}
  key = max(ratios, key=lambda k: ratios[k] if np.isfinite(ratios[k]) else np.inf)
  bound = SPREAD_FACTOR * spread[key]
  return Check(name, "float64", step, beyond[key], bound, "torch float64 spread", bool(beyond[key] <= bound), key)
