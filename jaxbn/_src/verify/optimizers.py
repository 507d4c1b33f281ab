"""The optimiser both frameworks step with: one description, torch's optimiser and optax's twin.

Each is a frozen dataclass with torch's argument names and defaults; ``.torch(parameters)``
builds ``torch.optim``'s, ``.optax()`` the optax transformation with the same update rule
(before ``jaxbn.keep_frozen``, which leaves what torch does not train as it is).
"""

from __future__ import annotations

import dataclasses

import optax


@dataclasses.dataclass(frozen=True)
class SGD:
  """``torch.optim.SGD`` (no dampening) and its optax twin.

  Example: ``jaxbn.verify(model, x, optimizer=jaxbn.verification.SGD(lr=0.1, weight_decay=1e-4))``.
  """

  lr: float = 1e-3
  momentum: float = 0.9
  weight_decay: float = 0.0
  nesterov: bool = False

  def torch(self, parameters):
    import torch

    return torch.optim.SGD(
        parameters, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, nesterov=self.nesterov
    )

  def optax(self) -> optax.GradientTransformation:
    # torch adds weight_decay * p to the gradient before the momentum buffer (coupled decay)
    return optax.chain(
        optax.add_decayed_weights(self.weight_decay),
        optax.sgd(self.lr, momentum=self.momentum or None, nesterov=self.nesterov),
    )


@dataclasses.dataclass(frozen=True)
class Adam:
  """``torch.optim.Adam`` (coupled weight decay) and its optax twin.

  Example: ``jaxbn.verify(model, x, optimizer=jaxbn.verification.Adam(lr=1e-4))``.
  """

  lr: float = 1e-3
  betas: tuple[float, float] = (0.9, 0.999)
  eps: float = 1e-8
  weight_decay: float = 0.0

  def torch(self, parameters):
    import torch

    return torch.optim.Adam(parameters, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

  def optax(self) -> optax.GradientTransformation:
    return optax.chain(
        optax.add_decayed_weights(self.weight_decay),
        optax.adam(self.lr, b1=self.betas[0], b2=self.betas[1], eps=self.eps),
    )


@dataclasses.dataclass(frozen=True)
class AdamW:
  """``torch.optim.AdamW`` (decoupled weight decay, ``p -= lr * weight_decay * p``) and its optax twin.

  Example: ``jaxbn.verify(model, x, optimizer=jaxbn.verification.AdamW(weight_decay=0.05))``.
  """

  lr: float = 1e-3
  betas: tuple[float, float] = (0.9, 0.999)
  eps: float = 1e-8
  weight_decay: float = 1e-2

  def torch(self, parameters):
    import torch

    return torch.optim.AdamW(parameters, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

  def optax(self) -> optax.GradientTransformation:
    return optax.adamw(self.lr, b1=self.betas[0], b2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay)


Optimizer = SGD | Adam | AdamW
