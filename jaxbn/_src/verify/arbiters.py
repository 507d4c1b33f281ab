"""The decisions: each turns measured groups of arrays into a ``Check``. A bound the arithmetic
cannot resolve on an ill-conditioned model is decided by torch's own spread (``twins()``: torch's
arrays from runs that differ from it only in rounding, computed only when needed: every input,
parameter and buffer one ulp away, and the model in channels_last memory format, which runs other
kernels; the spread is the larger distance to torch)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jaxbn._src.verify import measures
from jaxbn._src.verify.measures import SPREAD_FACTOR, TRACKS_FACTOR
from jaxbn._src.verify.result import Check

Twins = Callable[[], list[dict]]


def tracks(
    name: str, dtype: str, ours: dict, torch32: dict, torch64: dict, twins: Twins, floor: float, absolute=False
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
  ours_l2, bound = measures.relative_l2(ours, torch64), SPREAD_FACTOR * max(
      measures.relative_l2(t, torch32) for t in twins()
  )
  return Check(name, dtype, 0, ours_l2, bound, "torch float32 spread", ours_l2 <= bound)


def group(name: str, step: int | None, ours: dict, theirs: dict, twins: Twins, rtol: float) -> Check:
  """float64: relative L2 over the group within ``rtol``, else within SPREAD_FACTOR of torch
  float64's own spread."""
  error = measures.relative_l2(ours, theirs)
  if error <= rtol:
    return Check(name, "float64", step, error, rtol, "tolerance", True)
  bound = SPREAD_FACTOR * max(measures.relative_l2(t, theirs) for t in twins())
  return Check(name, "float64", step, error, bound, "torch float64 spread", error <= bound)


def tensors(name: str, step: int | None, ours: dict, theirs: dict, twins: Twins, rtol: float) -> Check:
  """float64, per tensor: each within ``rtol``, else within SPREAD_FACTOR of torch float64's own
  spread for that tensor; the check names the worst tensor."""
  errors = measures.tensor_errors(ours, theirs)
  beyond = {k: e for k, e in errors.items() if not e <= rtol}
  if not beyond:
    worst = max(errors, key=errors.get, default=None)
    return Check(name, "float64", step, errors.get(worst, 0.0), rtol, "tolerance", True, worst)
  spreads = [measures.tensor_errors(t, theirs) for t in twins()]
  spread = {k: max(s[k] for s in spreads) for k in beyond}
  ratios = {k: e / max(SPREAD_FACTOR * spread[k], 1e-300) for k, e in beyond.items()}
  key = max(ratios, key=lambda k: ratios[k] if np.isfinite(ratios[k]) else np.inf)
  bound = SPREAD_FACTOR * spread[key]
  return Check(name, "float64", step, beyond[key], bound, "torch float64 spread", bool(beyond[key] <= bound), key)
