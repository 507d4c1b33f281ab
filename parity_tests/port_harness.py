"""One parity run of a ported model against real torch (used by test_port_models.py).

Per model: random init with non-trivial BatchNorm state (2 torch SGD steps; FrozenBatchNorm2d
buffers randomised); ``jaxbn.port`` (timed); the variables back to a fresh torch model with
``load_state_dict(strict=True)``, every tensor bit for bit; eval outputs; the first SGD step
(momentum 0.9) from identical parameters in float32 against torch float32 (train-mode outputs,
every running statistic and counter); then every step in float64, in lock-step with torch
float64: gradients at the first step, outputs and running statistics after each, eval outputs at
the end. Dropout and stochastic depth are set to p=0 here (torch's random masks cannot be
reproduced); their semantics are tested in test_port.py.

Tolerances: from identical parameters, float32 outputs and statistics within ``floor``
(relative) of torch float32's, or else, as in test_resnet_parity, jaxbn's L2 distance to torch
float64 within twice torch float32's plus ``floor`` (deep nets amplify float32 rounding). After updates the comparison is in float64 (float32 training is chaotic: a value near
a ReLU's kink rounds to either side, see test_resnet_parity's docstring): relative L2 over each
group of arrays within ``grad64_rtol`` (1e-9). float64 gradients: every tensor within 1e-9 of its
largest |gradient| (at least 1e-4 of the largest anywhere: a conv bias before BatchNorm has
gradient 0 in exact arithmetic).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import jax
import numpy as np
import optax
import torch

import jaxbn
from parity_tests.test_resnet_parity import FLOAT64_RTOL, assert_float64_matches, assert_tracks, relative_stats

LR, MOMENTUM = 1e-3, 0.9


@dataclasses.dataclass
class Case:
  build: Callable[[], torch.nn.Module]
  input_shape: tuple[int, ...]
  floor: float = 2e-4  # identical parameters (deep nets; a shallow one gets less)
  loss: str = "ce"  # "ce": cross-entropy of every output against the labels; "l2": mean square
  steps: int = 2
  grad64_rtol: float = FLOAT64_RTOL


@dataclasses.dataclass
class Measured:
  port_seconds: float
  eval_rel: float  # max |jaxbn - torch| / max |torch| of the eval outputs after conversion
  train_rel: float  # the same for the first training step (identical parameters)
  stats_rel: float  # running statistics after the first step, relative to max(|value|, 1)
  grad64_rel: float  # float64 gradients, worst tensor


def randomise_frozen_batchnorms(model: torch.nn.Module, generator: torch.Generator) -> None:
  """FrozenBatchNorm2d layers still at their identity init get random statistics and affine."""
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


def torch_loss(output, labels, kind):
  leaves = jax.tree.leaves(output)
  if kind == "ce":
    return sum(torch.nn.functional.cross_entropy(leaf, labels) for leaf in leaves)
  return sum(leaf.square().mean() for leaf in leaves)


def jax_loss(output, labels, kind):
  leaves = jax.tree.leaves(output)
  if kind == "ce":
    return sum(optax.softmax_cross_entropy_with_integer_labels(leaf, labels).mean() for leaf in leaves)
  return sum(jax.numpy.mean(leaf**2) for leaf in leaves)


def as_arrays(output) -> dict:
  return {
      str(i): np.asarray(leaf.detach().numpy() if isinstance(leaf, torch.Tensor) else leaf, np.float64)
      for i, leaf in enumerate(jax.tree.leaves(output))
  }


def torch_step(model, optimizer, x, labels, kind):
  model.train()
  output = model(torch.from_numpy(x))
  optimizer.zero_grad()
  torch_loss(output, torch.from_numpy(labels), kind).backward()
  grads = {name: p.grad.numpy().copy() for name, p in model.named_parameters() if p.grad is not None}
  optimizer.step()
  return as_arrays(output), grads


def jax_step(module, tx, kind):
  @jax.jit
  def step(variables, opt_state, x, labels):
    def loss(params):
      output, updates = module.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return jax_loss(output, labels, kind), (output, updates)

    grads, (output, updates) = jax.grad(loss, has_aux=True)(variables["params"])
    param_updates, opt_state = tx.update(grads, opt_state, variables["params"])
    return (
        {**variables, **updates, "params": optax.apply_updates(variables["params"], param_updates)},
        opt_state,
        output,
        grads,
    )

  return step


def relative(actual: dict, expected: dict, scale=None) -> float:
  worst = 0.0
  for key, value in expected.items():
    denominator = np.maximum(np.abs(value), 1.0) if scale == "stats" else max(np.max(np.abs(value)), 1e-30)
    worst = max(worst, float(np.max(np.abs(np.asarray(actual[key], np.float64) - value) / denominator)))
  return worst


def running_stats(state_dict) -> dict:
  return {
      # astype copies: torch's buffers change in place as it trains on
      key: (value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)).astype(np.float64)
      for key, value in state_dict.items()
      if key.rpartition(".")[2] in ("running_mean", "running_var", "num_batches_tracked")
  }


def run(case: Case, seed: int = 0) -> Measured:
  torch.manual_seed(seed)
  generator = torch.Generator().manual_seed(seed)
  model = case.build()
  jaxbn.parity.without_dropout(model)
  with torch.no_grad():
    randomise_frozen_batchnorms(model, generator)
  rng = np.random.default_rng(seed)
  classes = 10

  def batch():
    return rng.standard_normal(case.input_shape).astype(np.float32), rng.integers(0, classes, case.input_shape[0])

  optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
  for _ in range(2):
    torch_step(model, optimizer, *batch(), case.loss)

  x, labels = batch()
  start = time.perf_counter()
  module, variables = jaxbn.port(model, x)
  port_seconds = time.perf_counter() - start

  # Flax -> torch: every tensor back bit for bit, loadable strictly into a fresh model.
  torch_state = {k: v.numpy() for k, v in model.state_dict().items()}
  back = jaxbn.convert.to_state_dict(variables)
  assert back.keys() == torch_state.keys(), sorted(back.keys() ^ torch_state.keys())
  for key, value in torch_state.items():
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  case.build().load_state_dict(
      jaxbn.convert.to_torch(variables, like=model), strict=True
  )  # MNASNet reads like's _metadata

  model.eval()
  with torch.no_grad():
    expected = as_arrays(model(torch.from_numpy(x)))
  evaluate = jax.jit(module.apply)
  eval_rel = relative(as_arrays(evaluate(variables, x)), expected)
  assert eval_rel <= case.floor, f"eval after conversion: {eval_rel:.3g} > {case.floor}"

  torch64 = copy.deepcopy(model).double()
  sgd = lambda m: torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM)  # noqa: E731
  optimizer, optimizer64 = sgd(model), sgd(torch64)
  batches = [batch() for _ in range(case.steps)]
  torch64_steps = []  # (outputs, gradients, running statistics) after each step
  for x, labels in batches:
    out64, grads64 = torch_step(torch64, optimizer64, x.astype(np.float64), labels, case.loss)
    torch64_steps.append((out64, grads64, running_stats(torch64.state_dict())))

  # The first step, from identical parameters: float32 against torch float32.
  (x, labels), (_, _, stats64) = batches[0], torch64_steps[0]
  tx = jaxbn.keep_frozen(optax.sgd(LR, momentum=MOMENTUM), jaxbn.frozen_mask(variables))
  initial = variables
  out32, _ = torch_step(model, optimizer, x, labels, case.loss)
  after, _, output, _ = jax_step(module, tx, case.loss)(variables, tx.init(variables["params"]), x, labels)
  output, stats, stats32 = (
      as_arrays(output),
      running_stats(jaxbn.convert.to_state_dict(after)),
      running_stats(model.state_dict()),
  )
  scaled = relative_stats(stats, stats32, stats64)  # every counter agrees; the rest relative to float64's
  train_rel, stats_rel = relative(output, out32), relative(stats, stats32, "stats")  # counters: 0
  if train_rel > case.floor or stats_rel > case.floor:  # float32 rounding amplified by depth: float64 decides
    assert_tracks(output, out32, torch64_steps[0][0], case.floor, f"train-mode outputs, first step ({train_rel:.3g})")
    assert_tracks(*scaled, case.floor, f"running statistics, first step ({stats_rel:.3g})")

  # Every step in float64, in lock-step with torch float64 (float32 training itself is chaotic:
  # see test_resnet_parity's docstring): gradients, outputs, statistics, then eval.
  with jax.enable_x64(True):
    module64, _ = jaxbn.port(model, x, dtype=np.float64, strict=False)
    variables64 = jax.tree.map(
        lambda v: np.asarray(v, np.float64) if np.issubdtype(v.dtype, np.floating) else v, initial
    )
    step64, opt_state = jax_step(module64, tx, case.loss), tx.init(variables64["params"])
    for index, ((x, labels), (out64, torch_grads, stats64)) in enumerate(zip(batches, torch64_steps, strict=True)):
      variables64, opt_state, output, grads = step64(variables64, opt_state, x.astype(np.float64), labels)
      if index == 0:
        grad64_rel = assert_gradients_close(jaxbn.convert.to_state_dict({"params": grads}), torch_grads, case)
      assert_float64_matches(as_arrays(output), out64, f"train-mode outputs, step {index}", case.grad64_rtol)
      stats = running_stats(jaxbn.convert.to_state_dict(variables64))
      assert_float64_matches(*relative_stats(stats, stats64), f"running statistics, step {index}", case.grad64_rtol)
    torch64.eval()
    x, _ = batch()
    with torch.no_grad():
      expected64 = as_arrays(torch64(torch.from_numpy(x).double()))
    assert_float64_matches(
        as_arrays(jax.jit(module64.apply)(variables64, x.astype(np.float64))),
        expected64,
        "eval after training",
        case.grad64_rtol,
    )
  return Measured(port_seconds, eval_rel, train_rel, stats_rel, grad64_rel)


def assert_gradients_close(grads: dict, expected: dict, case) -> float:
  """float64 gradients against torch float64's, per tensor; returns the worst relative error."""
  # A conv bias before BatchNorm has gradient 0 in exact arithmetic; torch's is rounding noise,
  # so each tensor's scale is at least 1e-4 of the largest gradient anywhere.
  largest = max(np.max(np.abs(value)) for value in expected.values())
  worst = 0.0
  for key, value in expected.items():
    error = float(np.max(np.abs(grads[key] - value)) / max(np.max(np.abs(value)), 1e-4 * largest))
    assert error <= case.grad64_rtol, f"float64 gradient of {key}: relative error {error:.3g} > {case.grad64_rtol}"
    worst = max(worst, error)
  return worst
