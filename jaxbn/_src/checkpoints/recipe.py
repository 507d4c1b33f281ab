"""A torch model's training recipe: the part of how it trains that lives on the model, outside
its state_dict and its ``forward``.

- ``module.training`` per module: after ``model.train()`` a user puts some modules back into
  ``eval()`` (``model.apply(set_bn_eval)``); those normalise with their running statistics and
  update nothing while the rest trains.
- ``parameter.requires_grad``: an optimiser built from ``p for p in model.parameters() if
  p.requires_grad`` never moves the others (no momentum, no weight decay).

Read from the model as found, and put back as found after anything that switches modes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class TorchRecipe:
  """What a torch model holds of its recipe, by torch name.

  Attributes:
    modes: ``{module path: module.training}`` for every module (``''`` is the root).
    frozen: names of the parameters with ``requires_grad=False``.
  """

  modes: dict[str, bool]
  frozen: tuple[str, ...]

  @property
  def training(self) -> bool:
    return self.modes[""]

  @property
  def kept_in_eval(self) -> tuple[str, ...]:
    """Modules torch runs in eval while the model trains (only when the model is in train mode:
    ``model.eval()`` says nothing about how it trains)."""
    return tuple(name for name, training in self.modes.items() if self.training and not training)


def read(torch_model) -> TorchRecipe:
  return TorchRecipe(
      {name: module.training for name, module in torch_model.named_modules()},
      tuple(name for name, parameter in torch_model.named_parameters() if not parameter.requires_grad),
  )


@contextlib.contextmanager
def torch_mode(torch_model, train: bool, recipe: TorchRecipe | None = None) -> Iterator[None]:
  """``torch_model`` in eval mode, or in train mode as ``recipe`` configured it (the modules it kept
  in eval stay there; default: plain ``model.train()``); every module's flag as found afterwards."""
  found = read(torch_model).modes
  modules = dict(torch_model.named_modules())
  try:
    torch_model.train(train)
    if train and recipe is not None:
      for name in recipe.kept_in_eval:
        modules[name].training = False
    yield
  finally:
    for name, training in found.items():
      modules[name].training = training
