"""NNX modules and states as Linen-style variables, so that every jaxbn tool takes either.

The rules of conversion, freezing and folding are written once, on ``{'params': ...,
'batch_stats': ...}`` with string module paths. An NNX state maps onto that by variable type:
``nnx.Param`` -> ``params``, ``nnx.BatchStat`` -> ``batch_stats``, ``jaxbn.nnx.Frozen`` ->
``params`` (where a Linen FrozenBatchNorm keeps its arrays), and the bridge's ``buffers`` type ->
``buffers`` (tensors a ported forward reads). List indices become strings, as
Flax Linen names children ``'0'``, ``'1'``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx, traverse_util


class Frozen(nnx.Variable):
  """A value no optimiser trains: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and ``nnx.grad``
  (which differentiate ``nnx.Param``) leave it alone, and layers read it behind
  ``stop_gradient``. FrozenBatchNorm holds its four arrays in it."""


# Buffers a ported forward reads directly (jaxbn.port), as flax's Linen-to-NNX bridge types them.
Buffer = nnx.variable_type_from_name("buffers", allow_register=True)
COLLECTIONS = ((Frozen, "params"), (nnx.Param, "params"), (nnx.BatchStat, "batch_stats"), (Buffer, "buffers"))


def is_nnx(obj) -> bool:
  return isinstance(obj, (nnx.Module, nnx.State))


def collection_of(variable: nnx.Variable) -> str | None:
  return next((name for kind, name in COLLECTIONS if isinstance(variable, kind)), None)


def state_of(module_or_state) -> nnx.State:
  return nnx.state(module_or_state) if isinstance(module_or_state, nnx.Module) else module_or_state


def _flat(module_or_state) -> list[tuple[tuple, nnx.Variable]]:
  return list(nnx.to_flat_state(state_of(module_or_state)))


def to_variables(module_or_state) -> dict:
  """``{'params': ..., 'batch_stats': ...}`` of the arrays an NNX module or state holds (other
  variable types, such as RNG state, are left out)."""
  flat = {}
  for path, variable in _flat(module_or_state):
    collection = collection_of(variable)
    if collection is not None:
      flat[(collection, *map(str, path))] = variable.get_value()  # an array, or a shape (nnx.eval_shape)
  return traverse_util.unflatten_dict(flat)


def as_variables(obj) -> Mapping[str, Any]:
  """Linen variables as they are; an NNX module or state through ``to_variables``."""
  return to_variables(obj) if is_nnx(obj) else obj


def _assign(flat_state, variables: Mapping) -> list[str]:
  """Sets each variable of ``flat_state`` to its value in ``variables``; returns the paths with none."""
  values = traverse_util.flatten_dict(dict(variables))
  unset = []
  for path, variable in flat_state:
    collection = collection_of(variable)
    key = (collection, *map(str, path))
    if collection is None:
      continue
    if key in values:
      variable.set_value(values[key])
    else:
      unset.append("/".join(key))
  return unset


def update(module_or_state, variables: Mapping, *, partial: bool = False):
  """Writes Linen-style ``variables`` into an NNX module in place (returns it), or into a copy of
  an NNX state (returns the copy). Each variable keeps its type; every array must be given
  unless ``partial``."""
  target = module_or_state
  if not isinstance(target, nnx.Module):
    target = jax.tree.map(lambda value: value, target)  # new Variables, same arrays
  unset = _assign(_flat(target), variables)
  if unset and not partial:
    raise ValueError(f"no value for {', '.join(unset)}")
  return target
