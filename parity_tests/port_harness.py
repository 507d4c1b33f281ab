"""One parity run of a model against real torch, through the public check, ``jaxbn.verify``
(used by test_port_models.py and test_emit.py).

Per model: random init, its BatchNorm state made non-trivial (``jaxbn.verification.warm_up``: 2
torch SGD steps, FrozenBatchNorm2d layers at identity randomised); then ``jaxbn.verify``: the
conversion round trip bit for bit with a strict load, eval outputs, the first optimiser step (SGD
with momentum 0.9) in float32 from identical parameters, and every step in float64 in lock-step
with torch float64 (outputs, every gradient, running statistic, counter and updated parameter),
eval after training. Bounds: ``floor`` in float32 from identical parameters (2e-4 of the largest
output for deep nets; a shallow one gets less), ``grad64_rtol`` in float64 (1e-9), each decided
by torch's own spread one ulp away where the arithmetic cannot resolve it (``jaxbn.verify``'s
docstring). The run asserts it passed, with its summary as the message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

import jaxbn


@dataclasses.dataclass
class Case:
  build: Callable[[], torch.nn.Module]
  input_shape: tuple[int, ...]
  floor: float = 2e-4  # identical parameters (deep nets; a shallow one gets less)
  loss: str = "cross_entropy"  # or "mean_square" (outputs that are not logits)
  steps: int = 2
  grad64_rtol: float | None = None  # jaxbn.verify's: 1e-9


def run(
    case: Case, seed: int = 0, via: str = "port", api: str = "linen", layout: str = "NCHW"
) -> jaxbn.verification.Verification:
  """``via``, ``api``, ``layout``: what ``jaxbn.verify`` checks (``jaxbn.port``, or ``jaxbn.emit``'s
  source, channels-last with ``layout="NHWC"``)."""
  torch.manual_seed(seed)
  model = case.build()
  example = np.zeros(case.input_shape, np.float32)
  jaxbn.verification.warm_up(model, example, loss=case.loss, seed=seed)
  result = jaxbn.verify(
      model,
      example,
      via=via,
      api=api,
      layout=layout,
      steps=case.steps,
      loss=case.loss,
      floor=case.floor,
      rtol=case.grad64_rtol,
      seed=seed,
  )
  assert result.passed, result.summary()
  return result
