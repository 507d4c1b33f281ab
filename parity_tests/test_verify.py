"""jaxbn.verify as a specification: exact ports pass for every target, a port broken on purpose in
each way fails and names the layer, the step and the phase, and the result's JSON has the
documented schema.

The broken ports keep everything a forward-only check sees right: a wrong backward through
``custom_ops`` (forward exact), a wrong momentum or a dropped statistics update in one layer
(outputs exact in training, which normalises with batch statistics), a parameter torch does not
train that the Flax optimiser steps (forward and gradients exact).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxbn
from jaxbn.verification import SGD, Adam, AdamW


class Small(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(8)
    self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(8, momentum=0.01)
    self.fc = torch.nn.Linear(8, 5)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = torch.tanh(self.bn2(self.conv2(x)))
    return self.fc(x.mean((2, 3)))


class WithHardswish(Small):
  """Hardswish, and a Hardsigmoid gate (MobileNetV3's squeeze-excitation)."""

  def __init__(self):
    super().__init__()
    self.act, self.gate = torch.nn.Hardswish(), torch.nn.Hardsigmoid()

  def forward(self, x):
    x = self.act(self.bn1(self.conv1(x)))
    x = self.bn2(self.conv2(x))
    return self.fc((x * self.gate(x)).mean((2, 3)))


def small(frozen_conv1=False):
  torch.manual_seed(0)
  model = Small()
  with torch.no_grad():  # non-trivial statistics
    model(torch.randn(4, 3, 8, 8))
  model.conv1.requires_grad_(not frozen_conv1)
  return model


X = np.zeros((4, 3, 8, 8), np.float32)


@pytest.mark.parametrize("via", ["port", "emit"])
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_exact_ports_pass_for_every_target(via, api):
  result = jaxbn.verify(small(frozen_conv1=True), X, via=via, api=api, steps=2)
  assert result.passed, result.summary()
  assert result.divergence is None
  names = {(c.name, c.dtype, c.step) for c in result.checks}
  for step in (0, 1):
    for name in ("training outputs", "gradients", "running statistics", "parameters after the update"):
      assert (name, "float64", step) in names
  # float64 from identical parameters: what the arithmetic gives is ~1e-15, far inside 1e-9
  assert max(c.error for c in result.checks if c.dtype == "float64" and "gradients" not in c.name) < 1e-12


def test_optimizers_with_weight_decay_pass():
  for optimizer in (SGD(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True), Adam(lr=1e-2), AdamW()):
    result = jaxbn.verify(small(), X, optimizer=optimizer, steps=2, loss="cross_entropy")
    assert result.passed, (optimizer, result.summary())


def test_hard_activations_pass_at_1e_9_against_torchs_elementwise_float64_form():
  """torch's fused float64 Hardswish backward rounds 1/6 to float32 (3e-8 off, 3.4e-7 after an SGD
  step on PP-OCRv5): torch's float64 reference computes it as its own elementwise ops, and the
  port is within 1e-9 of that; the float32 checks use torch's module as it is. The note says so."""
  model = WithHardswish()
  result = jaxbn.verify(model, X, steps=2)
  assert result.passed, result.summary()
  assert {c.bound for c in result.checks if c.arbiter == "tolerance" and c.dtype == "float64"} == {1e-9}
  gradients = [c.error for c in result.checks if c.name == "gradients" and c.dtype == "float64"]
  assert max(gradients) <= 1e-12, gradients  # against torch's fused backward: 1.4e-8
  assert "Hardsigmoid/Hardswish computed as torch's elementwise ops" in result.notes[0]
  assert "note:" in result.summary()


def test_the_torch_model_is_left_as_found():
  model = small(frozen_conv1=True)
  model.bn2.eval()
  before = {k: v.clone() for k, v in model.state_dict().items()}
  jaxbn.verify(model, X, steps=1)
  assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
  assert model.training and not model.bn2.training and not model.conv1.weight.requires_grad


def wrong_relu_backward():
  @jax.custom_vjp
  def relu(x):
    return jnp.maximum(x, 0)

  relu.defvjp(lambda x: (relu(x), x), lambda x, g: (2.0 * g * (x > 0),))  # twice the true derivative
  return lambda x, inplace=False: relu(x)


def with_batchnorm(layer: str, momentum: float):
  """``custom_modules`` for BatchNorm2d: torch's port, but ``layer`` with another momentum."""

  def build(model, inputs, dtype):
    target = getattr(model, layer)

    def factory(module):
      return jaxbn.BatchNorm(
          axis=1,
          momentum=momentum if module is target else module.momentum,
          epsilon=module.eps,
          param_dtype=dtype or jnp.float32,
      )

    return jaxbn.port(model, inputs[0], dtype=dtype, custom_modules={torch.nn.BatchNorm2d: factory})

  return build


def forgets_what_torch_freezes(model, inputs, dtype):
  with pytest.warns(jaxbn.TrainingRecipeWarning, match="conv1"):
    port = jaxbn.port(model, inputs[0], dtype=dtype)
  return dataclasses.replace(port, recipe=jaxbn.TrainingRecipe())  # every parameter trains


BROKEN = {
    # name: (verify's arguments, phase, step, layer, tensor)
    "wrong backward": (
        dict(build=lambda m, i, d: jaxbn.port(m, i[0], dtype=d, custom_ops={F.relu: wrong_relu_backward()})),
        "backward",
        0,
        "bn1",  # the last layer whose gradient is wrong, in forward order: the relu after it
        "bn1.",
    ),
    "wrong momentum": (dict(build=with_batchnorm("bn2", 0.2)), "statistics", 0, "bn2", None),
    "dropped statistics update": (dict(build=with_batchnorm("bn1", 0.0)), "statistics", 0, "bn1", None),
    "a frozen parameter trains": (dict(build=forgets_what_torch_freezes), "update", 0, "conv1", "conv1.weight"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_port_fails_naming_layer_step_and_phase(name):
  arguments, phase, step, layer, tensor = BROKEN[name]
  result = jaxbn.verify(small(frozen_conv1=name == "a frozen parameter trains"), X, steps=2, **arguments)
  assert not result.passed
  divergence = result.divergence
  assert (divergence.phase, divergence.step, divergence.layer) == (phase, step, layer), result.summary()
  if tensor is not None:
    assert divergence.tensor.startswith(tensor), divergence
  assert layer in result.summary() and "FAILED" in result.summary()
  # the broken layer stands out in the per-layer figures
  figures = {f.layer: f for f in result.layers}
  field = {"backward": "gradient", "statistics": "statistics", "update": "update"}[phase]
  assert getattr(figures[layer], field) > 1e-6


def test_json_has_the_documented_schema():
  result = jaxbn.verify(small(), X, steps=1, build=with_batchnorm("bn2", 0.2))
  document = json.loads(json.dumps(result.to_json()))  # plain JSON: no NaN, no numpy types
  assert document["schema"] == jaxbn.verification.SCHEMA_VERSION == 1
  assert set(document) == {
      "schema",
      "passed",
      "target",
      "optimizer",
      "loss",
      "steps",
      "checks",
      "divergence",
      "layers",
      "seconds",
      "notes",
  }
  assert document["passed"] is False and document["steps"] == 1
  for check in document["checks"]:
    assert set(check) == {"name", "dtype", "step", "error", "bound", "arbiter", "passed", "where"}
    assert check["arbiter"] in {
        "exact",
        "tolerance",
        "tracks torch float32",
        "torch float32 spread",
        "torch float64 spread",
        "float64",
    }
  assert set(document["divergence"]) == {"phase", "step", "dtype", "layer", "tensor", "error", "bound"}
  assert document["divergence"]["layer"] == "bn2"
  assert [layer["layer"] for layer in document["layers"]] == ["conv1", "bn1", "conv2", "bn2", "fc"]
  assert set(document["seconds"]) == {"build", "torch", "jax", "total"}


def test_bad_arguments_are_refused_by_name():
  with pytest.raises(ValueError, match="loss='l1'"):
    jaxbn.verify(small(), X, loss="l1")
  with pytest.raises(ValueError, match="steps \\+ 1 = 3"):
    jaxbn.verify(small(), X, steps=2, batches=[X])
  with pytest.raises(ValueError, match="via='source'"):
    jaxbn.verify(small(), X, via="source")


class DropConnect(Small):
  """A hand-written drop connect (lukemelas' EfficientNet, smp's efficientnet-* encoders) and a
  functional dropout with its own rate: draws verify cannot turn off or reproduce."""

  def __init__(self, rate):
    super().__init__()
    self.rate = rate

  def forward(self, x):
    y = super().forward(x)
    if self.training and self.rate:
      keep = torch.rand(y.shape[0], 1, dtype=y.dtype) >= self.rate
      y = y * keep / (1 - self.rate)
    return torch.nn.functional.dropout(y, self.rate, self.training)


def test_random_draws_it_cannot_turn_off_are_refused_by_name():
  """Compared, torch's draws against the port's would be a mismatch blamed on the port."""
  with pytest.raises(
      ValueError,
      match=r"draws random numbers.*torch.rand in the model \(DropConnect\); "
      r"F.dropout in the model.*set that rate to 0",
  ):
    jaxbn.verify(DropConnect(0.2), X, steps=1)
  assert jaxbn.verify(DropConnect(0.0), X, steps=1).passed  # rate 0: nothing drawn, nothing refused


def test_spread_arbiter_accepts_only_within_ten_times_torchs_own_spread():
  """Where a bound is below what the arithmetic resolves, torch's own spread decides: the larger
  distance of torch's rounding twins (one ulp away; channels_last memory format) to torch; jaxbn
  within SPREAD_FACTOR (10) of it passes, beyond it fails; the twins run only when needed."""
  from jaxbn._src.verify import arbiters

  expected = {"out": np.linspace(1, 2, 8)}
  moved = lambda relative: {"out": expected["out"] * (1 + relative)}  # noqa: E731
  never = lambda: 1 / 0  # noqa: E731
  twins = lambda *spreads: lambda: [moved(s) for s in spreads]  # noqa: E731
  assert arbiters.group("g", 0, moved(5e-10), expected, never, 1e-9).arbiter == "tolerance"
  check = arbiters.group("g", 0, moved(1e-8), expected, twins(2e-9), 1e-9)
  assert check.passed and check.arbiter == "torch float64 spread" and check.bound == pytest.approx(2e-8)
  assert not arbiters.group("g", 0, moved(3e-8), expected, twins(2e-9), 1e-9).passed
  assert arbiters.group("g", 0, moved(3e-8), expected, twins(2e-9, 4e-9), 1e-9).passed  # the larger twin
  assert not arbiters.tensors("t", 0, moved(3e-8), expected, twins(2e-9), 1e-9).passed
  assert arbiters.tensors("t", 0, moved(1e-8), expected, twins(2e-9), 1e-9).passed
  assert arbiters.tensors("t", 0, moved(3e-8), expected, twins(1e-10, 4e-9), 1e-9).passed
  torch32, torch64 = moved(1e-7), expected  # torch float32 1e-7 from float64; floor 1e-6
  assert arbiters.tracks("o", "float32", moved(1e-6), torch32, torch64, never, 1e-6).passed
  check = arbiters.tracks("o", "float32", moved(4e-6), torch32, torch64, twins(6e-7), 1e-6)
  assert check.passed and check.arbiter == "torch float32 spread"
  assert not arbiters.tracks("o", "float32", moved(1e-4), torch32, torch64, twins(6e-7), 1e-6).passed
