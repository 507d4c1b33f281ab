"""The torch model's training recipe, carried by the port as data.

torch keeps part of how a model trains on the model itself: modules put back into ``eval()`` after
``model.train()`` (they use and keep their running statistics), and parameters with
``requires_grad=False`` (the optimiser never sees them). The port reads both when it traces and
returns them as ``Port.recipe``: Flax paths for ``Ported(keep_eval=...)``, ``jaxbn.frozen_mask``
and ``jaxbn.nnx.trainable``. What a trace would silently drop from a module (forward hooks on a
module the port runs whole, backward hooks, gradient hooks, parametrizations) is refused by name.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence

import torch

from jaxbn._src.checkpoints.recipe import TorchRecipe
from jaxbn._src.checkpoints.rules import torch_key
from jaxbn._src.errors import PortError

RECIPES = ("as_configured", "plain")


class TrainingRecipeWarning(UserWarning):
  """``jaxbn.port`` of a model whose training recipe is not plain ``model.train()``: layers kept
  in eval, or parameters torch does not train. Says what the port kept and which attribute to use."""


@dataclasses.dataclass(frozen=True)
class TrainingRecipe:
  """How torch trains the ported model, beyond ``model.train()``: ``Port.recipe``.

  Attributes:
    keep_eval: module paths (Flax form, ``'layer1/0/bn1'``) whose BatchNorm layers torch ran in
      eval while the model trained: with ``train=True`` they normalise with their running
      statistics and update nothing (``jaxbn.eval_mode`` / ``jaxbn.nnx.keep_eval`` take them).
      Other modules torch kept in eval (dropout, stochastic depth, code reading ``self.training``)
      are traced as torch runs them.
    frozen: parameter paths, or module paths for whole modules (``'conv1'``, ``'fc/bias'``), that
      torch does not train (``requires_grad=False``): ``jaxbn.frozen_mask(variables,
      parameters=frozen)``, ``jaxbn.nnx.trainable(model, parameters=frozen)``. FrozenBatchNorm
      arrays are never trained, listed here or not.

  Example::

    >>> port = jaxbn.port(net, x)                                               # doctest: +SKIP
    >>> port.recipe.keep_eval, port.recipe.frozen                               # doctest: +SKIP
    (('bn1', 'layer1', 'layer2'), ('conv1', 'bn1', 'layer1'))
    >>> tx = jaxbn.keep_frozen(optax.sgd(0.1, momentum=0.9), port.frozen_mask)  # doctest: +SKIP
  """

  keep_eval: tuple[str, ...] = ()
  frozen: tuple[str, ...] = ()

  @property
  def is_plain(self) -> bool:
    return not (self.keep_eval or self.frozen)


def covering_prefixes(
    selected: set[tuple[str, ...]], paths: Sequence[tuple[str, ...]], either: set[tuple[str, ...]] = frozenset()
) -> tuple[tuple[str, ...], ...]:
  """The shortest prefixes (never the whole model) under which every one of ``paths`` is selected
  (or in ``either``: may be covered, never listed for itself), in the model's order: ``layer1``
  when all of layer1's are, each path itself where siblings differ."""
  chosen = []

  def visit(prefix: tuple[str, ...], below: list[tuple[str, ...]]):
    if not any(path in selected for path in below):
      return
    if prefix and all(path in selected or path in either for path in below):
      chosen.append(prefix)
      return
    children: dict[str, list] = {}
    for path in below:
      if len(path) > len(prefix):
        children.setdefault(path[len(prefix)], []).append(path)
    for child, paths_below in children.items():
      visit((*prefix, child), paths_below)

  visit((), list(paths))
  return tuple(chosen)


def kept_in_eval(torch_recipe: TorchRecipe | None, mode_leaves: Sequence[str]) -> list[tuple[str, ...]]:
  """Of the ported layers that take a mode (dotted torch paths), those torch runs in eval while it trains."""
  in_eval = set(torch_recipe.kept_in_eval) if torch_recipe is not None else set()
  return [tuple(path.split(".")) for path in mode_leaves if path in in_eval]


def frozen_parameters(torch_recipe: TorchRecipe, params: Sequence[tuple[str, ...]]) -> set[tuple[str, ...]]:
  """The ported ``params`` paths of the torch parameters with ``requires_grad=False``."""
  names = set(torch_recipe.frozen)
  return {path for path in params if torch_key("params", path) in names}


def flax_paths(prefixes: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
  return tuple("/".join(prefix) for prefix in prefixes)


def notice(recipe: TrainingRecipe, torch_class: str, kept_layers: int, frozen_count: int, api: str) -> None:
  """One warning at port time for a recipe that is not plain ``model.train()``."""
  if recipe.is_plain:
    return
  parts = []
  if recipe.keep_eval:
    parts.append(
        f"{kept_layers} BatchNorm layer(s) stay in eval while it trains ({_listed(recipe.keep_eval)}), as in"
        " torch: train=True normalises them with their running statistics and updates nothing"
    )
  if recipe.frozen:
    use = (
        "nnx.Optimizer(model, tx, wrt=port.trainable)"
        if api == "nnx"
        else "jaxbn.keep_frozen(tx, port.frozen_mask) as the optimiser"
    )
    parts.append(
        f"{frozen_count} parameter(s) torch never trains (requires_grad=False, or in a module forward never"
        f" calls: {_listed(recipe.frozen)}): train with {use} so that they never move, as torch's optimiser"
        " leaves them"
    )
  warnings.warn(
      f"{torch_class}'s training recipe is not plain model.train(): " + "; ".join(parts) + ". The recipe is"
      " port.recipe; port(..., recipe='plain') ports the model as model.train() with every parameter trained.",
      TrainingRecipeWarning,
      stacklevel=4,
  )


def warn_eval_with_training_modules(torch_recipe: TorchRecipe, torch_class: str) -> None:
  """A model in eval() holding modules in train() (MC dropout): the port's eval forward is plain
  ``model.eval()``, so say it."""
  training = [name for name, flag in torch_recipe.modes.items() if flag and name]
  if not torch_recipe.training and training:
    warnings.warn(
        f"{torch_class} is in eval() but {len(training)} of its modules are in train() ({_listed(training)}): the"
        " ported train=False forward is torch's model.eval() (every module in eval) and train=True its"
        " model.train(). To port a recipe that keeps modules in eval while training, port the model in train()"
        " mode with those modules in eval().",
        TrainingRecipeWarning,
        stacklevel=4,
    )


def _listed(paths: Sequence[str], most: int = 4) -> str:
  return ", ".join(paths[:most]) + (f", ... ({len(paths)} paths)" if len(paths) > most else "")


def refused_state(torch_model: torch.nn.Module, is_leaf: Callable[[torch.nn.Module], bool]) -> list[str]:
  """Per-module and per-parameter state that torch's training honours and a trace would drop
  silently, each named with the way out."""
  from torch.nn.utils import parametrize

  problems = []
  for name, module in torch_model.named_modules():
    where = name or "the model itself"
    kind = type(module).__name__
    if parametrize.is_parametrized(module):
      problems.append(
          f"{where} ({kind}): parametrized {', '.join(module.parametrizations)} (torch.nn.utils.parametrize:"
          " weight_norm, spectral_norm, orthogonal): the port has no parametrizations; for inference,"
          " parametrize.remove_parametrizations(module, name) first"
      )
    # fx traces through a module's __call__ (hooks included) unless the port runs it whole
    hooks = {"forward ": module._forward_hooks, "forward pre-": module._forward_pre_hooks}
    if module is torch_model or is_leaf(module):
      for what, registered in hooks.items():
        if registered:
          problems.append(
              f"{where} ({kind}): {what}hook(s) {_hook_names(registered)}, which the trace does not run (the module"
              " is ported whole): remove them (handle.remove()) before porting, or write what they do into forward"
          )
    for what, registered in (("backward ", module._backward_hooks), ("backward pre-", module._backward_pre_hooks)):
      if registered:
        problems.append(
            f"{where} ({kind}): {what}hook(s) {_hook_names(registered)} change its gradient, which the port does not"
            " carry: remove them before porting, or give custom_ops a jax.custom_vjp function"
        )
  for name, parameter in torch_model.named_parameters():
    registered = {
        **(parameter._backward_hooks or {}),
        **(getattr(parameter, "_post_accumulate_grad_hooks", None) or {}),
    }
    if registered:
      problems.append(
          f"parameter {name}: gradient hook(s) {_hook_names(registered)} (Tensor.register_hook), which the port does"
          " not carry: remove them before porting and apply them to the gradients in your JAX step"
      )
  from torch.nn.modules import module as torch_module

  for what in ("forward", "forward_pre", "full_backward", "full_backward_pre"):
    registered = getattr(torch_module, f"_global_{what.removeprefix('full_')}_hooks", None)
    if registered:
      problems.append(
          f"global module {what.replace('_', ' ')} hook(s) {_hook_names(registered)}"
          f" (torch.nn.modules.module.register_module_{what}_hook): remove them before porting"
      )
  return problems


def _hook_names(registered) -> str:
  return ", ".join(getattr(hook, "__qualname__", type(hook).__name__) for hook in registered.values())


def refuse(problems: list[str], torch_class: str) -> None:
  if problems:
    lines = "\n".join(f"  - {p}" for p in problems)
    raise PortError(f"{torch_class}: {len(problems)} thing(s) torch runs that the port would drop silently:\n{lines}")
