"""``port(..., through_forward=(Function,))``: a ``torch.autograd.Function`` whose backward is its
forward's derivative is ported through its forward (checked on the example against torch's own
backward, float64, 1e-8 of the largest gradient); one whose backward is anything else is refused
by name, as every Function is without the opt-in. The ported model trains as torch does:
jaxbn.verify, gradients and updates in float64 lock-step (bound 1e-9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxbn


class MemoryEfficientSwish(torch.autograd.Function):
  """EfficientNet-PyTorch's: saves the input, recomputes sigmoid in backward (its derivative)."""

  @staticmethod
  def forward(ctx, x):
    ctx.save_for_backward(x)
    return x * torch.sigmoid(x)

  @staticmethod
  def backward(ctx, grad):
    (x,) = ctx.saved_tensors
    s = torch.sigmoid(x)
    return grad * (s * (1 + x * (1 - s)))


class StraightThroughRound(torch.autograd.Function):
  """Round in forward, identity in backward: not the forward's derivative (which is 0)."""

  @staticmethod
  def forward(x):
    return torch.round(x * 4) / 4

  @staticmethod
  def setup_context(ctx, inputs, output):
    del ctx, inputs, output

  @staticmethod
  def backward(ctx, grad):
    return grad


class Net(torch.nn.Module):

  def __init__(self, function):
    super().__init__()
    self.function = function
    self.conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
    self.bn = torch.nn.BatchNorm2d(6)
    self.fc = torch.nn.Linear(6, 4)

  def forward(self, x):
    return self.fc(self.function.apply(self.bn(self.conv(x))).mean((2, 3)))


X = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)


def test_a_function_whose_backward_is_its_derivative_trains_as_torch():
  torch.manual_seed(0)

  def build(model, inputs, dtype):
    return jaxbn.port(model, inputs[0], dtype=dtype, through_forward=(MemoryEfficientSwish,))

  result = jaxbn.verify(Net(MemoryEfficientSwish), X, steps=2, build=build)
  assert result.passed, result.summary()
  assert max(c.error for c in result.checks if c.name == "gradients") <= 1e-9


def test_without_the_opt_in_a_function_is_refused_naming_the_way_out():
  with pytest.raises(jaxbn.PortError, match=r"MemoryEfficientSwish.*through_forward=\(MemoryEfficientSwish,\)"):
    jaxbn.port(Net(MemoryEfficientSwish), X)


def test_a_backward_that_is_not_the_derivative_is_refused_by_name():
  with pytest.raises(jaxbn.PortError, match=r"StraightThroughRound is not the derivative of its forward"):
    jaxbn.port(Net(StraightThroughRound), X, through_forward=(StraightThroughRound,))


def test_the_checked_forward_is_emitted_as_source(tmp_path):
  path = jaxbn.emit(Net(MemoryEfficientSwish), X, tmp_path / "net", through_forward=(MemoryEfficientSwish,))
  text = path.read_text()
  assert "sigmoid" in text and "MemoryEfficientSwish" not in text.split('"""', 2)[-1].split("def load")[0]
