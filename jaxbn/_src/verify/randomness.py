"""What verify cannot compare: random numbers torch draws in a training forward outside the
dropout modules it turns off (``without_dropout``), such as a hand-written drop connect
(``torch.rand(...) < keep``). torch's generator cannot be reproduced in JAX, so those two runs
would differ by the draws, and a mismatch would blame the port; verify refuses them by name."""

from __future__ import annotations

import copy

import numpy as np

SAMPLING = ("torch.rand", "torch.randn", "torch.rand_like", "torch.randn_like", "torch.randint", "torch.randint_like")
SAMPLING += ("torch.bernoulli", "torch.normal", "torch.randperm", "torch.multinomial", "torch.poisson")
SAMPLING += ("Tensor.bernoulli", "Tensor.bernoulli_", "Tensor.uniform_", "Tensor.normal_", "Tensor.exponential_")
SAMPLING += ("Tensor.random_", "Tensor.multinomial")
DROPOUTS = ("F.dropout", "F.dropout1d", "F.dropout2d", "F.dropout3d", "F.alpha_dropout", "F.feature_alpha_dropout")


def _named(names: tuple[str, ...]) -> dict:
  """torch's callables by the names above."""
  import torch
  import torch.nn.functional as F

  namespaces = {"torch": torch, "Tensor": torch.Tensor, "F": F}
  return {getattr(namespaces[prefix], name): f"{prefix}.{name}" for prefix, name in (n.split(".") for n in names)}


def refuse_random_draws(torch_model, inputs: tuple[np.ndarray, ...]) -> None:
  """Runs one training forward of a copy of ``torch_model`` and raises ``ValueError`` naming each
  random draw and the module that made it (dropout at p=0 or in eval draws nothing)."""
  import torch
  from torch.overrides import TorchFunctionMode

  from jaxbn._src.checkpoints.recipe import read, torch_mode

  sampling, dropouts = _named(SAMPLING), _named(DROPOUTS)
  model = copy.deepcopy(torch_model)
  stack: list[str] = []
  found: dict[str, None] = {}

  class Draws(TorchFunctionMode):

    def __torch_function__(self, func, types, args=(), kwargs=None):
      kwargs = kwargs or {}
      if func in sampling:
        drawn = True
      elif func in dropouts:
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        drawn = kwargs.get("training", args[2] if len(args) > 2 else True) and p > 0
      else:
        drawn = False
      if drawn:
        where = stack[-1] if stack else ""
        owner = type(model.get_submodule(where)).__name__ if where else type(model).__name__
        found[f"{sampling.get(func) or dropouts[func]} in {where or 'the model'} ({owner})"] = None
      return func(*args, **kwargs)

  names = {module: name for name, module in model.named_modules()}

  def enter(module, args):
    stack.append(names[module])

  def leave(module, args, output):
    stack.pop()

  hooks = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]
  try:
    with torch_mode(model, True, read(model)), torch.no_grad(), Draws():
      model(*(torch.from_numpy(np.asarray(x)) for x in inputs))
  finally:
    for hook in hooks:
      hook.remove()
  if found:
    raise ValueError(
        "verify: the training forward draws random numbers outside the dropout modules verify turns off: "
        + "; ".join(found)
        + ". torch's draws cannot be reproduced in JAX (jaxbn.port draws its own), so the two runs cannot be"
        " compared: set that rate to 0 in the model given to verify (a drop connect or drop path rate), then"
        " verify again; the port itself keeps the draws"
    )
