"""Folding inference BatchNorm into the layer before it.

``(x @ W + b - mean) * s + beta`` with ``s = scale / sqrt(var + eps)`` equals
``x @ (W * s) + (b - mean) * s + beta``: the kernel absorbs ``s`` along its output axis, and
what is left of the norm is a per-channel bias, held by a FoldedBatchNorm at the norm's path so
that the same model code runs with ``norm=jaxbn.FoldedBatchNorm``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from jaxbn._src.variables.freezing import layers_holding_stats, linen_variables


def _producer(norm_path: tuple[str, ...], kernels: set[tuple[str, ...]]) -> tuple[str, ...] | None:
  """The layer feeding a norm, by torchvision's naming: ``bnN`` after ``convN``, ``bn`` after
  ``conv``, and in a Sequential child ``k`` after child ``k - 1``."""
  *parent, name = norm_path
  candidates = [name.replace("bn", "conv", 1), name.replace("norm", "conv", 1)]
  if name.isdigit() and int(name) > 0:
    candidates.append(str(int(name) - 1))
  for candidate in candidates:
    path = (*parent, candidate)
    if candidate != name and path in kernels:
      return path
  return None


def fold_batchnorm(
    variables: Mapping[str, Any],
    *,
    epsilon: float | Mapping[str, float] = 1e-5,
    producers: Mapping[str, str] | None = None,
) -> dict:
  """Variables of a model in eval mode -> those of the same model built with
  ``norm=jaxbn.FoldedBatchNorm``, each BatchNorm or FrozenBatchNorm folded into the convolution
  or dense layer before it (found by torchvision's naming, or given in ``producers`` as
  ``{'norm/path': 'conv/path'}``). ``epsilon`` is the norms' eps (not stored in variables), or ``{'norm/path': eps}``.

  Example::

    >>> folded = jaxbn.fold_batchnorm(variables)                        # doctest: +SKIP
    >>> jaxbn.models.resnet50(norm=jaxbn.FoldedBatchNorm).apply(folded, x)  # doctest: +SKIP
  """
  variables = linen_variables(variables, "fold_batchnorm")
  params = traverse_util.flatten_dict(unfreeze(variables.get("params", {})))
  stats = traverse_util.flatten_dict(unfreeze(variables.get("batch_stats", {})))
  merged = {**params, **stats}
  norms = layers_holding_stats(merged)
  kernels = {path[:-1] for path in params if path[-1] == "kernel"}
  given = {tuple(k.split("/")): tuple(v.split("/")) for k, v in (producers or {}).items()}
  unfound = []
  for norm in sorted(norms):
    producer = given.get(norm) or _producer(norm, kernels)
    if producer is None or producer not in kernels:
      unfound.append("/".join(norm))
      continue
    mean, var = (np.asarray(merged[norm + (leaf,)], np.float64) for leaf in ("mean", "var"))
    scale = np.asarray(params.get(norm + ("scale",), 1.0), np.float64)
    beta = np.asarray(params.get(norm + ("bias",), 0.0), np.float64)
    eps = epsilon["/".join(norm)] if isinstance(epsilon, Mapping) else epsilon
    multiplier = scale / np.sqrt(var + eps)
    kernel = params[producer + ("kernel",)]
    params[producer + ("kernel",)] = (np.asarray(kernel, np.float64) * multiplier).astype(kernel.dtype)
    if producer + ("bias",) in params:  # the producer's own bias is scaled by the norm too
      bias = params[producer + ("bias",)]
      params[producer + ("bias",)] = (np.asarray(bias, np.float64) * multiplier).astype(bias.dtype)
    for leaf in ("scale", "bias", "mean", "var"):
      params.pop(norm + (leaf,), None)
    for leaf in ("mean", "var", "num_batches_tracked"):
      stats.pop(norm + (leaf,), None)
    params[norm + ("bias",)] = (beta - mean * multiplier).astype(kernel.dtype)
  if unfound:
    raise ValueError(
        f"fold_batchnorm: no preceding kernel found for {', '.join(unfound)}. Name the producers:"
        " producers={'norm/path': 'conv/path'}."
    )
  result = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
  result["params"] = traverse_util.unflatten_dict(params)
  if stats:
    result["batch_stats"] = traverse_util.unflatten_dict(stats)
  return jax.tree.map(np.asarray, result)
