"""How far jaxbn's arrays are from torch's, and torch's own resolution (the arbiters).

Every measure takes groups of arrays as ``{key: array}`` (torch's state_dict keys, or output
leaves by index) and returns a float:

- ``max_relative``: per array, max |ours - torch| over max |torch|; the worst array.
- ``relative_l2``: the L2 distance over the whole group over the group's norm.
- ``tensor_errors``: per tensor, max |ours - torch| over max(max |torch|, 1e-4 of the group's
  largest value) (a conv bias before BatchNorm has gradient 0 in exact arithmetic; torch's is
  rounding noise, so no tensor is judged on a scale below that).
- ``scaled_statistics``: running statistics divided by max(|torch float64's value|, 1), counters
  apart (they must agree exactly).

Where a bound is below what the arithmetic resolves on an ill-conditioned model (few values per
BatchNorm channel; rounding amplified through a deep net and its updates), torch's own spread
decides: torch run again with every parameter, buffer and input one ulp away (``nudge``,
``nudged``) and in channels_last memory format (other kernels), and jaxbn within
``SPREAD_FACTOR`` of the larger of those spreads.
"""

from __future__ import annotations

import numpy as np

SPREAD_FACTOR = 10
TRACKS_FACTOR = 2.0  # float32: jaxbn's L2 distance to torch float64 within this times torch float32's
COUNTER = "num_batches_tracked"


def max_relative(actual: dict, expected: dict) -> float:
  worst = 0.0
  for key, value in expected.items():
    scale = max(float(np.max(np.abs(value), initial=0.0)), 1e-30)
    worst = max(worst, float(np.max(np.abs(np.asarray(actual[key], np.float64) - value), initial=0.0)) / scale)
  return worst


def relative_l2(actual: dict, expected: dict) -> float:
  distance = sum(float(np.sum((np.asarray(actual[k], np.float64) - v) ** 2)) for k, v in expected.items())
  norm = sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in expected.values())
  return float(np.sqrt(distance / max(norm, 1e-300)))


def tracks(actual: dict, torch32: dict, torch64: dict) -> tuple[float, float, float]:
  """float32 from identical parameters: (jaxbn's L2 distance to torch float64, torch float32's,
  torch float64's norm)."""

  def distance(values):
    return float(np.sqrt(sum(np.sum((np.asarray(values[k], np.float64) - v) ** 2) for k, v in torch64.items())))

  norm = float(np.sqrt(sum(np.sum(v**2) for v in torch64.values())))
  return distance(actual), distance(torch32), norm


def tensor_errors(actual: dict, expected: dict) -> dict[str, float]:
  largest = max((float(np.max(np.abs(v), initial=0.0)) for v in expected.values()), default=0.0)
  return {
      key: float(np.max(np.abs(np.asarray(actual[key], np.float64) - value), initial=0.0))
      / max(float(np.max(np.abs(value), initial=0.0)), 1e-4 * largest, 1e-300)
      for key, value in expected.items()
  }


def split_counters(statistics: dict) -> tuple[dict, dict]:
  """(running means and variances, counters)."""
  counters = {k: v for k, v in statistics.items() if k.rpartition(".")[2] == COUNTER}
  return {k: v for k, v in statistics.items() if k not in counters}, counters


def scaled_statistics(statistics: dict, reference: dict) -> dict:
  """Running means and variances over max(|reference|, 1)."""
  return {k: np.asarray(statistics[k], np.float64) / np.maximum(np.abs(v), 1.0) for k, v in reference.items()}


def counter_difference(actual: dict, expected: dict) -> float:
  return max((float(abs(int(actual[k]) - int(v))) for k, v in expected.items()), default=0.0)


def generator(seed: int):
  """A torch.Generator for the one-ulp signs."""
  import torch

  return torch.Generator().manual_seed(seed)


def one_ulp(shape, generator, ulp: float):
  """1 ± ``ulp`` per element (random signs from ``generator``, a torch.Generator)."""
  import torch

  signs = torch.randint(0, 2, tuple(shape), generator=generator).to(torch.float64) * 2 - 1
  return 1 + signs * ulp


def nudge(model, generator, ulp: float) -> None:
  """Every floating parameter and buffer of ``model`` one ``ulp`` (relative) up or down, in place."""
  import torch

  with torch.no_grad():
    for tensor in (*model.parameters(), *model.buffers()):
      if tensor.is_floating_point():
        tensor.mul_(one_ulp(tensor.shape, generator, ulp).to(tensor.dtype))


def nudged(x: np.ndarray, generator, ulp: float) -> np.ndarray:
  """``x`` with every floating element one ``ulp`` (relative) up or down."""
  if not np.issubdtype(x.dtype, np.floating):
    return x
  return (x * one_ulp(x.shape, generator, ulp).numpy()).astype(x.dtype)
