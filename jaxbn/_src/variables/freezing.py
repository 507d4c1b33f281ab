"""Freezing BatchNorm: variables between BatchNorm and FrozenBatchNorm, and optimiser masks.

A layer is recognised by its variables, not by a per-model table: a jaxbn.BatchNorm holds
``batch_stats/<path>/{mean, var}``; a jaxbn.FrozenBatchNorm holds ``params/<path>/{mean, var}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxbn._src.core.layer import counter_dtype
from jaxbn._src.variables.paths import check_prefixes_match, split_path, under
from jaxbn._src.variables.state import as_variables, is_nnx, update

NNX_MODULE_FIX = (
    "{name} takes Linen variables or an NNX state; an NNX module's layers are swapped in place"
    " with jaxbn.nnx.{name}(model)."
)


def linen_variables(variables, name: str) -> Mapping[str, Any]:
  """Linen variables as they are, an NNX state as Linen variables; an NNX module is refused
  with the NNX function that does the job."""
  from flax import nnx

  if isinstance(variables, nnx.Module):
    raise TypeError(NNX_MODULE_FIX.format(name=name))
  return as_variables(variables)


STATS = ("mean", "var")


def layers_holding_stats(flat: Mapping[tuple[str, ...], Any]) -> set[tuple[str, ...]]:
  """Module paths with both ``mean`` and ``var`` in a flattened collection: the BatchNorm layers."""
  return {path[:-1] for path in flat if path[-1] == "mean" and path[:-1] + ("var",) in flat}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  return traverse_util.unflatten_dict(dict(flat))


def freeze(variables: Mapping[str, Any]) -> dict:
  """Variables of a model built with jaxbn.BatchNorm -> the same model built with FrozenBatchNorm.

  Running mean and var move into ``params``; ``num_batches_tracked`` stays in ``batch_stats`` (a
  FrozenBatchNorm never reads it) so that ``unfreeze`` restores it. Everything else is untouched.
  An NNX state gives Linen variables (for NNX modules: ``jaxbn.nnx.freeze``).
  """
  variables = linen_variables(variables, "freeze")
  params = traverse_util.flatten_dict(variables.get("params", {}))
  stats = traverse_util.flatten_dict(variables.get("batch_stats", {}))
  layers = layers_holding_stats(stats)
  moved = {path: value for path, value in stats.items() if path[:-1] in layers and path[-1] in STATS}
  return _with_collections(variables, {**params, **moved}, {p: v for p, v in stats.items() if p not in moved})


def unfreeze(variables: Mapping[str, Any]) -> dict:
  """The inverse of ``freeze``; a counter that was never recorded (torchvision's
  FrozenBatchNorm2d drops it) starts at 0."""
  variables = linen_variables(variables, "unfreeze")
  params = traverse_util.flatten_dict(variables.get("params", {}))
  stats = traverse_util.flatten_dict(variables.get("batch_stats", {}))
  layers = layers_holding_stats(params)
  moved = {path: value for path, value in params.items() if path[:-1] in layers and path[-1] in STATS}
  for layer in layers:
    stats.setdefault(layer + ("num_batches_tracked",), jnp.zeros((), counter_dtype()))
  return _with_collections(variables, {p: v for p, v in params.items() if p not in moved}, {**stats, **moved})


def _with_collections(variables, params, stats) -> dict:
  result = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
  if params:
    result["params"] = _unflatten(params)
  if stats:
    result["batch_stats"] = _unflatten(stats)
  return result


def frozen_mask(
    variables: Any,
    *,
    modules: Sequence[str] = (),
    batchnorm_affine: Sequence[str] = (),
    parameters: Sequence[str] = (),
) -> dict:
  """A boolean pytree over ``variables['params']``: True where no optimiser may move the array.

  Always True for FrozenBatchNorm arrays. Also True for every parameter under ``modules`` (module
  paths such as ``'layer1'``; torch: ``requires_grad_(False)`` on a submodule), for the scale
  and bias of the BatchNorm layers under ``batchnorm_affine`` (``''`` for all of them; torch:
  ``bn.weight.requires_grad = False``), and for the parameters at or under ``parameters``
  (parameter paths such as ``'fc/bias'``, or module paths; torch: ``fc.bias.requires_grad =
  False``; what ``jaxbn.port`` records as ``port.recipe.frozen``). Paths are Flax (``'layer1/0'``)
  or torch (``'layer1.0'``) paths; one that matches nothing raises ValueError naming the closest
  paths.

  ``variables`` may be an NNX module or state (e.g. a Linen model through ``nnx.bridge.ToNNX``):
  the mask is then an ``nnx.State`` over its ``nnx.Param`` s, the tree ``nnx.Optimizer(model,
  keep_frozen(tx, mask), wrt=nnx.Param)`` hands to optax. (Native NNX models choose what trains
  with a filter: ``jaxbn.nnx.trainable``.)
  """
  if is_nnx(variables):
    from flax import nnx

    params = nnx.state(variables, nnx.Param) if isinstance(variables, nnx.Module) else variables.filter(nnx.Param)
    mask = frozen_mask(
        as_variables(variables), modules=modules, batchnorm_affine=batchnorm_affine, parameters=parameters
    )
    return nnx.as_pure(update(params, {"params": mask}))
  params = traverse_util.flatten_dict(variables.get("params", {}))
  stats = traverse_util.flatten_dict(variables.get("batch_stats", {}))
  frozen_layers = layers_holding_stats(params)
  module_prefixes = [split_path(m) for m in modules]
  affine_prefixes = [split_path(m) for m in batchnorm_affine]
  parameter_prefixes = [split_path(p) for p in parameters]
  check_prefixes_match(module_prefixes, [path[:-1] for path in params], "frozen_mask(modules=...)")
  check_prefixes_match(parameter_prefixes, list(params), "frozen_mask(parameters=...)")
  check_prefixes_match(affine_prefixes, layers_holding_stats(stats), "frozen_mask(batchnorm_affine=...)")
  batchnorm_layers = {layer for layer in layers_holding_stats(stats) if under(layer, affine_prefixes)}
  mask = {
      path: path[:-1] in frozen_layers
      or under(path, module_prefixes)
      or path[:-1] in batchnorm_layers
      or under(path, parameter_prefixes)
      for path in params
  }
  return _unflatten(mask)


def keep_frozen(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
  """``tx`` for the arrays where ``mask`` is False; zero updates where it is True.

  The frozen arrays never reach ``tx``, so no part of it (momentum, adamw's weight decay) can
  move them, and its state holds nothing for them.
  """
  labels = jax.tree.map(lambda frozen: "frozen" if frozen else "trainable", mask)
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
