"""Running statistics that look wrong, layer by layer, in a torch-style state_dict.

Hours of training live in running statistics and nothing recomputes them, so ``jaxbn inspect``
and ``jaxbn check`` look for the marks of corruption: non-finite values (NaN or inf inputs
propagate into the buffers, in torch as in jaxbn), a negative or all-zero variance, and a
counter of 0 beside statistics that have moved (a conversion that dropped or zeroed it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np


@dataclasses.dataclass
class LayerStats:
  """One BatchNorm layer's buffers: its module path, channel count, counter (None where the layer
  keeps none, e.g. FrozenBatchNorm2d) and what looks wrong."""

  layer: str
  channels: int
  num_batches_tracked: int | None
  problems: list[str]


def _channels(flags: np.ndarray) -> str:
  indices = np.flatnonzero(flags)
  shown = ", ".join(str(i) for i in indices[:8]) + (", ..." if indices.size > 8 else "")
  return f"channel{'s' if indices.size > 1 else ''} {shown}"


def running_stat_problems(mean: np.ndarray, var: np.ndarray, num_batches_tracked: int | None) -> list[str]:
  """What is wrong with one layer's running statistics; empty when nothing is."""
  mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
  problems = []
  for name, values in (("running_mean", mean), ("running_var", var)):
    if not np.all(np.isfinite(values)):
      problems.append(f"non-finite {name} in {_channels(~np.isfinite(values))}")
  if np.any(var < 0):
    problems.append(f"negative running_var in {_channels(var < 0)}")
  if var.size and np.all(var == 0):
    problems.append("running_var is 0 in every channel")
  if num_batches_tracked == 0 and (np.any(mean != 0) or np.any(var != 1)):
    problems.append("num_batches_tracked is 0 but the statistics are not torch's initial 0 and 1")
  return problems


def inspect_state_dict(state_dict: Mapping[str, np.ndarray]) -> list[LayerStats]:
  """Every module with ``running_mean`` and ``running_var`` in a torch-style state_dict."""
  layers = []
  for key in state_dict:
    layer, _, leaf = key.rpartition(".")
    if leaf != "running_mean" or f"{layer}.running_var" not in state_dict:
      continue
    counter = state_dict.get(f"{layer}.num_batches_tracked")
    counter = None if counter is None else int(np.asarray(counter))
    mean, var = state_dict[key], state_dict[f"{layer}.running_var"]
    layers.append(LayerStats(layer, int(np.size(mean)), counter, running_stat_problems(mean, var, counter)))
  return layers
