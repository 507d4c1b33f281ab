"""A Python ``if`` on a tensor's values (``jaxbn/_src/port/branches.py``): the model is traced both
ways and the branches merge into one program that reads ``torch.where(decision, ...)`` where they
differ, so the port computes torch's result whichever way the decision goes, under jit. A branch
that calls a module, writes in place or draws random numbers stays refused by name. An assertion
(``torch._check``) computed from sizes alone is dropped, the sizes it read guarded; one on values
is refused.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import jaxbn
from parity_tests import port_harness


class ClampNonFinite(torch.nn.Module):
  """transformers' encoder layers (RT-DETR, and the float16 guard of many others): in training,
  clamp the hidden states where any is not finite."""

  def __init__(self):
    super().__init__()
    self.conv, self.bn, self.head = torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 1)
    self.scale = torch.nn.Parameter(torch.ones(()))

  def forward(self, x):
    h = self.bn(self.conv(x)) * self.scale
    if self.training:
      if not torch.isfinite(h).all():
        clamp_value = torch.finfo(h.dtype).max - 1000
        h = torch.clamp(h, min=-clamp_value, max=clamp_value)
    return self.head(h)


class IfElse(torch.nn.Module):
  """A branch each way, on a mean's sign: both computed, the result selected."""

  def __init__(self):
    super().__init__()
    self.conv, self.bn = torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)

  def forward(self, x):
    h = self.conv(x)
    if h.mean() > 0:
      y = h * 2
    else:
      y = torch.sigmoid(h) - 1
    return self.bn(y)


@pytest.mark.parametrize("via, api, layout", [("port", "linen", "NCHW"), ("emit", "nnx", "NHWC")])
def test_a_clamp_on_non_finite_values_trains_like_torch(via, api, layout):
  """jaxbn.verify's float64 lock-step (1e-9) on finite inputs, where the select keeps h."""
  port_harness.run(port_harness.Case(ClampNonFinite, (2, 3, 5, 5), loss="mean_square"), via=via, api=api, layout=layout)


class Overflow(torch.nn.Module):
  """The clamp alone, in training: a doubled input overflows float32 where it exceeds 1.7e38."""

  def forward(self, x):
    h = x * 2
    if self.training and not torch.isfinite(h).all():
      h = torch.clamp(h, min=-torch.finfo(h.dtype).max, max=torch.finfo(h.dtype).max)
    return h / 1e30


def test_the_select_takes_the_branch_torch_takes_on_either_input():
  """Ported on a finite example, the program gives torch's output on inputs that take the other
  branch too (was refused): Overflow on an input that overflows (torch clamps the infinities to
  float32's largest value; ported from eval mode, so the second trace must set train mode as the
  first did), IfElse on inputs whose means have either sign; in training, within float32
  rounding of torch (1e-6 of the largest output)."""
  rng = np.random.default_rng(0)
  finite = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
  overflowing = finite.copy()
  overflowing[0, 0, :2] = 3e38
  overflowing[1, 2, 0] = -3e38
  torch.manual_seed(0)
  for model, inputs in ((Overflow().eval(), [finite, overflowing]), (IfElse(), [finite - 3, finite + 3])):
    module, variables = jaxbn.port(model, finite)
    apply = jax.jit(
        lambda x, module=module, variables=variables: module.apply(variables, x, train=True, mutable=True)[0]
    )
    for x in inputs:
      with torch.no_grad():
        expected = model.train()(torch.from_numpy(x)).numpy()
      actual = np.asarray(apply(x))
      assert np.isfinite(expected).all() and np.isfinite(actual).all(), type(model).__name__
      assert np.max(np.abs(actual - expected)) <= 1e-6 * np.max(np.abs(expected)), type(model).__name__


class ModuleInBranch(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.bn = torch.nn.BatchNorm2d(3)

  def forward(self, x):
    if x.sum() > 0:  # BatchNorm's statistics would move on both paths
      x = self.bn(x)
    return x


def test_a_branch_that_calls_a_module_stays_refused_by_name():
  x = np.ones((2, 3, 4, 4), np.float32)
  with pytest.raises(jaxbn.PortError, match=r"bool\(\) of a tensor's values decides what runs .* ModuleInBranch"):
    jaxbn.port(ModuleInBranch(), x)


class CheckedValues(torch.nn.Module):

  def forward(self, x):
    torch._check(x.sum() < 1e6, lambda: "too large")  # an assertion on values, not a branch
    if not torch.isfinite(x).all():  # a branch beside it: merged
      x = torch.clamp(x, -1.0, 1.0)
    return x * 2


def test_an_assertion_on_values_is_refused_by_name_not_taken_both_ways():
  """The assertion alone is refused (the branch beside it is merged, so it is not listed)."""
  with pytest.raises(
      jaxbn.PortError, match=r"(?s)1 unsupported node.*torch._check on a tensor's values \(an assertion\)"
  ):
    jaxbn.port(CheckedValues(), np.ones((2, 3), np.float32))


class SizesChecked(torch.nn.Module):
  """transformers' deformable attention (RT-DETR v2, D-FINE): the levels' sizes written into a
  tensor one by one, and an assertion that they cover the flattened sequence."""

  def __init__(self):
    super().__init__()
    self.conv, self.bn = torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)

  def forward(self, x):
    h = self.bn(self.conv(x))
    levels = [h, torch.nn.functional.avg_pool2d(h, 2)]
    shapes = torch.empty((len(levels), 2), dtype=torch.long)
    for i, level in enumerate(levels):
      shapes[i, 0] = level.shape[2]
      shapes[i, 1] = level.shape[3]
    sequence = torch.cat([level.flatten(2) for level in levels], dim=2)
    covered = (shapes[:, 0] * shapes[:, 1]).sum() == sequence.shape[2]
    torch._check_tensor_all_with(ValueError, covered, lambda: "the sizes do not cover the sequence")
    return sequence


@pytest.mark.parametrize("via, api, layout", [("port", "linen", "NCHW"), ("emit", "nnx", "NHWC")])
def test_an_assertion_on_sizes_is_dropped_and_the_model_trains_like_torch(via, api, layout):
  """jaxbn.verify's float64 lock-step (1e-9): the assertion was refused as one on values."""
  case = port_harness.Case(SizesChecked, (2, 3, 4, 4), loss="mean_square")
  port_harness.run(case, via=via, api=api, layout=layout)


def test_an_assertion_on_sizes_leaves_guards_on_the_sizes_not_its_arithmetic(tmp_path):
  """The emitted source holds no line of the assertion's product and sum, and the port refuses
  an input of other sizes by name (the sizes it read, and those written, were the example's)."""
  x = np.ones((2, 3, 4, 4), np.float32)
  source = jaxbn.emit(SizesChecked(), x, tmp_path / "emitted").read_text()
  assert "sum" not in source and "mul" not in source and " * " not in source, source
  module, variables = jaxbn.port(SizesChecked(), x)
  with pytest.raises(jaxbn.PortError, match=r"specialised this Python branch to the example input's shapes"):
    module.apply(variables, np.ones((2, 3, 6, 6), np.float32))


class LevelsAttention(torch.nn.Module):
  """transformers' RT-DETR deformable attention: the levels' sizes come in as Python ints and
  ``torch._check`` asserts that they cover the sequence, inside a child (a class of its own)."""

  def __init__(self):
    super().__init__()
    self.proj = torch.nn.Linear(4, 4)

  def forward(self, sequence, shapes):
    torch._check(sum(h * w for h, w in shapes) == sequence.shape[1])
    return self.proj(sequence)


class SizesPassedDown(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.conv, self.bn, self.attention = torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), LevelsAttention()

  def forward(self, x):
    h = self.bn(self.conv(x))
    levels = [h, torch.nn.functional.avg_pool2d(h, 2)]
    shapes = [(level.shape[2], level.shape[3]) for level in levels]
    sequence = torch.cat([level.flatten(2) for level in levels], dim=2).transpose(1, 2)
    return self.attention(sequence, shapes)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_an_assertion_on_sizes_a_child_gets_is_a_bool_checked_in_source(api):
  """The source checks the assertion as ``bool(...)`` (was a call of an undefined ``check``: RT-DETR's
  source did not load); jaxbn.verify's float64 lock-step (1e-9) through it."""
  port_harness.run(port_harness.Case(SizesPassedDown, (2, 3, 4, 4), loss="mean_square"), via="emit", api=api)
