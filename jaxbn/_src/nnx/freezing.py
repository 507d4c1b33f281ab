"""Freezing, eval pinning and folding for flax.nnx models, in place.

NNX models are objects: a BatchNorm becomes frozen by replacing the layer (its arrays are moved,
not copied), and what an optimiser trains is chosen with a filter (``wrt=``) rather than a mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
from flax import nnx

from jaxbn._src.core.layer import counter_dtype
from jaxbn._src.nnx.batch_norm import BatchNorm
from jaxbn._src.nnx.frozen import FoldedBatchNorm, FrozenBatchNorm
from jaxbn._src.variables.folding import fold_batchnorm as fold_variables
from jaxbn._src.variables.paths import check_prefixes_match, split_path, under
from jaxbn._src.variables.state import Frozen, to_variables, update

# BatchNorm options a frozen layer carries (ignored) so that unfreeze rebuilds the same layer.
_CARRIED = ("momentum", "track_running_stats", "axis_name", "axis_index_groups", "runtime_checks", "keep_eval")


def _str_path(path: Sequence) -> tuple[str, ...]:
  return tuple(str(part) for part in path)


def layers(model: nnx.Module, kinds, paths: Sequence[str] = (), what: str = "") -> list[tuple[tuple, nnx.Module]]:
  """``(path, layer)`` for every layer of type ``kinds`` under one of ``paths`` (module paths,
  ``'layer1/0'`` or torch's ``'layer1.0'``; none: the whole model). A path that matches no such
  layer raises, naming the closest."""
  found = [(path, module) for path, module in nnx.iter_modules(model) if isinstance(module, kinds)]
  prefixes = [split_path(p) for p in paths]
  if what:
    if not found:
      names = kinds.__name__ if isinstance(kinds, type) else " or ".join(k.__name__ for k in kinds)
      raise ValueError(f"{what}: the model has no {names} layer.")
    check_prefixes_match(prefixes, [_str_path(path) for path, _ in found], what)
  return [(path, module) for path, module in found if not prefixes or under(_str_path(path), prefixes)]


def _replace(model: nnx.Module, path: tuple, layer: nnx.Module) -> None:
  if not path:
    raise ValueError("the model itself is a BatchNorm layer: freeze its parent, or build a FrozenBatchNorm.")
  parent = model
  for part in path[:-1]:
    parent = parent[part] if isinstance(part, int) else getattr(parent, part)
  if isinstance(path[-1], int):
    parent[path[-1]] = layer
  else:
    setattr(parent, path[-1], layer)


def freeze(model: nnx.Module, *paths: str) -> nnx.Module:
  """Replaces every jaxbn.nnx.BatchNorm (under ``paths``, default all) with a FrozenBatchNorm
  holding the same arrays (bit-identical) as ``Frozen`` variables; the counter and the layer's
  options are kept for ``unfreeze``. Returns ``model``, changed in place.

  Example::

    >>> import jax.numpy as jnp, jaxbn
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    >>> model = jaxbn.nnx.freeze(model)
    >>> type(model.layers[1]).__name__
    'FrozenBatchNorm'
  """
  for path, bn in layers(model, BatchNorm, paths, "jaxbn.nnx.freeze"):
    if bn.mean is None:
      raise ValueError(
          f"jaxbn.nnx.freeze: the BatchNorm at '{'/'.join(_str_path(path))}' tracks no running"
          " statistics (track_running_stats=False), so there is nothing to freeze it with."
      )
    carried = {name: getattr(bn, name) for name in _CARRIED}
    frozen = FrozenBatchNorm(
        bn.num_features,
        axis=bn.axis,
        epsilon=bn.epsilon,
        dtype=bn.dtype,
        param_dtype=bn.param_dtype,
        use_bias=bn.bias is not None,
        use_scale=bn.scale is not None,
        **carried,
    )
    for name in ("mean", "var", "scale", "bias"):
      if getattr(bn, name) is not None:
        setattr(frozen, name, Frozen(getattr(bn, name)[...]))
    frozen.num_batches_tracked = nnx.BatchStat(bn.num_batches_tracked[...])
    _replace(model, path, frozen)
  return model


def unfreeze(model: nnx.Module, *paths: str) -> nnx.Module:
  """The inverse of ``freeze``: each FrozenBatchNorm becomes a jaxbn.nnx.BatchNorm with its
  arrays as ``nnx.Param`` / ``nnx.BatchStat``, the counter and options it carried (a layer that
  never was a BatchNorm, e.g. converted from torchvision's FrozenBatchNorm2d, gets counter 0 and
  the defaults). Returns ``model``, changed in place."""
  for path, frozen in layers(model, FrozenBatchNorm, paths, "jaxbn.nnx.unfreeze"):
    bn = BatchNorm(
        frozen.num_features,
        axis=frozen.axis,
        epsilon=frozen.epsilon,
        dtype=frozen.dtype,
        param_dtype=frozen.param_dtype,
        use_bias=frozen.bias is not None,
        use_scale=frozen.scale is not None,
        rngs=nnx.Rngs(0),
        **dict(frozen.batchnorm_options),
    )
    bn.mean, bn.var = nnx.BatchStat(frozen.mean[...]), nnx.BatchStat(frozen.var[...])
    for name in ("scale", "bias"):
      if getattr(frozen, name) is not None:
        setattr(bn, name, nnx.Param(getattr(frozen, name)[...]))
    counter = frozen.num_batches_tracked
    bn.num_batches_tracked = nnx.BatchStat(jnp.zeros((), counter_dtype()) if counter is None else counter[...])
    _replace(model, path, bn)
  return model


def keep_eval(model: nnx.Module, *paths: str, keep: bool = True) -> nnx.Module:
  """Pins the jaxbn.nnx.BatchNorm layers under ``paths`` (default: all of ``model``) to eval
  mode: they normalise with their running statistics and update nothing, and ``model.train()``
  does not undo it (in torch, ``.train()`` silently re-enables batch statistics).
  ``keep=False`` releases them. Returns ``model``.

  Example::

    >>> import jax.numpy as jnp, jaxbn
    >>> from flax import nnx
    >>> model = nnx.Sequential(jaxbn.nnx.BatchNorm(2, rngs=nnx.Rngs(0)), jaxbn.nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
    >>> model = jaxbn.nnx.keep_eval(model, 'layers/0')
    >>> model.train()
    >>> y = model(jnp.array([[0.0, 1.0], [2.0, 3.0]]))
    >>> [int(bn.num_batches_tracked[...]) for bn in model.layers]
    [0, 1]
  """
  for _, bn in layers(model, BatchNorm, paths, "jaxbn.nnx.keep_eval"):
    bn.keep_eval = keep
  return model


def trainable(
    model: nnx.Module,
    *,
    modules: Sequence[str] = (),
    batchnorm_affine: Sequence[str] = (),
    parameters: Sequence[str] = (),
) -> nnx.filterlib.Filter:
  """An NNX filter for ``wrt=``: the ``nnx.Param`` s an optimiser may move. Leaves out every
  parameter under ``modules`` (torch: ``requires_grad_(False)`` on a submodule), the scale and
  bias of the BatchNorm layers under ``batchnorm_affine`` (``''`` for all; torch:
  ``bn.weight.requires_grad = False``) and the parameters at or under ``parameters`` (parameter
  paths such as ``'fc/bias'``, or module paths; what ``jaxbn.port`` records as
  ``port.recipe.frozen``). FrozenBatchNorm arrays are ``Frozen``, never ``Param``.

  Example::

    >>> wrt = jaxbn.nnx.trainable(model, modules=['layer1'], batchnorm_affine=[''])    # doctest: +SKIP
    >>> optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=wrt)                  # doctest: +SKIP
    >>> grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model, batch)           # doctest: +SKIP
  """
  module_prefixes = [split_path(m) for m in modules]
  affine_prefixes = [split_path(m) for m in batchnorm_affine]
  parameter_prefixes = [split_path(p) for p in parameters]
  params = [_str_path(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  check_prefixes_match(module_prefixes, [p[:-1] for p in params], "jaxbn.nnx.trainable(modules=...)")
  check_prefixes_match(parameter_prefixes, params, "jaxbn.nnx.trainable(parameters=...)")
  batchnorms = [_str_path(path) for path, _ in layers(model, BatchNorm)]
  check_prefixes_match(affine_prefixes, batchnorms, "jaxbn.nnx.trainable(batchnorm_affine=...)")
  fixed_affine = {path for path in batchnorms if under(path, affine_prefixes)}

  def is_trainable(path, value) -> bool:
    path = _str_path(path)
    return not under(path, module_prefixes) and path[:-1] not in fixed_affine and not under(path, parameter_prefixes)

  return nnx.All(nnx.Param, is_trainable)


def fold_batchnorm(model: nnx.Module, *, producers: Mapping[str, str] | None = None) -> nnx.Module:
  """Folds every BatchNorm and FrozenBatchNorm into the ``nnx.Conv`` / ``nnx.Linear`` before it
  (found by torchvision's naming, or ``producers={'norm/path': 'conv/path'}``), in place: the
  kernel absorbs ``scale / sqrt(var + eps)`` and the norm becomes a FoldedBatchNorm. The rule
  is ``jaxbn.fold_batchnorm``'s; each layer's own epsilon is used. Returns ``model``."""
  norms = layers(model, (BatchNorm, FrozenBatchNorm), (), "jaxbn.nnx.fold_batchnorm")
  epsilon = {"/".join(_str_path(path)): norm.epsilon for path, norm in norms}
  folded = fold_variables(to_variables(model), epsilon=epsilon, producers=producers)
  for path, norm in norms:
    _replace(
        model, path, FoldedBatchNorm(norm.num_features, axis=norm.axis, dtype=norm.dtype, param_dtype=norm.param_dtype)
    )
  update(model, folded)
  return model
