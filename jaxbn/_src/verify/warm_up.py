"""Non-trivial BatchNorm state for a model at random init, before it is verified.

At init every running mean is 0 and variance 1 (FrozenBatchNorm2d's too), where a port that
swapped them, or read the variance as a standard deviation, would still pass. ``warm_up`` trains
the model (as configured) for a few SGD steps on random batches and gives FrozenBatchNorm2d layers
still at identity random statistics and affine.
"""

from __future__ import annotations

from typing import Any

from jaxbn._src.checkpoints.recipe import read as read_recipe
from jaxbn._src.checkpoints.recipe import torch_mode
from jaxbn._src.verify.batches import draw, inputs_of
from jaxbn._src.verify.optimizers import SGD
from jaxbn._src.verify.runs import torch_loss


def _randomise_identity_frozen_batchnorms(model, generator) -> None:
  import torch

  for module in model.modules():
    if (
        type(module).__name__ == "FrozenBatchNorm2d"
        and bool(torch.all(module.running_var == 1))
        and bool(torch.all(module.running_mean == 0))
    ):
      channels = module.weight.shape[0]
      module.weight.copy_(1 + 0.2 * torch.randn(channels, generator=generator))
      module.bias.copy_(0.2 * torch.randn(channels, generator=generator))
      module.running_mean.copy_(0.2 * torch.randn(channels, generator=generator))
      module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))


def warm_up(torch_model, example_input: Any, *, steps: int = 2, loss: str = "mean_square", seed: int = 0):
  """Trains ``torch_model`` in place for ``steps`` SGD steps (lr 1e-3, momentum 0.9) on random
  batches shaped like ``example_input`` (an array or tensor, or a tuple of them), as configured
  (modules kept in eval stay in eval, frozen parameters stay), after giving FrozenBatchNorm2d
  layers at identity random statistics. Returns the model.

  Example::

    model = jaxbn.verification.warm_up(torchvision.models.resnet18(), np.zeros((4, 3, 64, 64), np.float32))
  """
  import torch

  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    _randomise_identity_frozen_batchnorms(torch_model, generator)
  optimizer = SGD().torch([p for p in torch_model.parameters() if p.requires_grad])
  recipe = read_recipe(torch_model)
  for inputs, labels in draw(inputs_of(example_input), None, steps - 1, seed + 1):  # steps batches
    with torch_mode(torch_model, True, recipe):
      optimizer.zero_grad()
      output = torch_model(*map(torch.from_numpy, inputs))
      torch_loss(output, torch.from_numpy(labels), loss).backward()
      optimizer.step()
  return torch_model
