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
gradient 0 in exact arithmetic). Where the arithmetic cannot resolve these (an ill-conditioned
model), the bound is 10x torch's own spread with every input, parameter and buffer one ulp away
(float32's for the first step, float64's after: ``float32_twin_step``, ``Float64Twin``; run only
then). The sweep names every model that needed it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import numpy as np
import optax
import torch

import jaxbn
from parity_tests.test_resnet_parity import FLOAT64_RTOL, assert_tracks, relative_l2, relative_stats

LR, MOMENTUM = 1e-3, 0.9
PER_LAYER_RTOL = 1e-3  # `jaxbn check`'s default tolerance
# Where a tolerance is below what the arithmetic can resolve on an ill-conditioned model (few
# values per BatchNorm channel; rounding amplified through a deep net and its updates), the
# arbiter is torch's own resolution: torch run again with every parameter, buffer and input one
# ulp away (float32's or float64's rounding size); jaxbn must be within SPREAD_FACTOR of that
# spread. Run only when the tolerance fails.
SPREAD_FACTOR = 10


@dataclasses.dataclass
class Case:
  build: Callable[[], torch.nn.Module]
  input_shape: tuple[int, ...]
  floor: float = 2e-4  # identical parameters (deep nets; a shallow one gets less)
  loss: str = "ce"  # "ce": cross-entropy of every output against the labels; "l2": mean square
  steps: int = 2
  grad64_rtol: float = FLOAT64_RTOL
  per_layer: bool = False  # also jaxbn.parity.compare (what `jaxbn check` reports), within PER_LAYER_RTOL


@dataclasses.dataclass
class Measured:
  port_seconds: float
  eval_rel: float  # max |jaxbn - torch| / max |torch| of the eval outputs after conversion
  train_rel: float  # the same for the first training step (identical parameters)
  stats_rel: float  # running statistics after the first step, relative to max(|value|, 1)
  grad64_rel: float  # float64 gradients, worst tensor
  layers_rel: float | None = None  # parity.compare's worst BatchNorm layer, a train step and eval
  layers64_rel: float | None = None  # the same in float64, where float32's exceeds PER_LAYER_RTOL
  by_spread: tuple[str, ...] = ()  # the checks that needed torch's own spread one ulp away
  spread_ratio: float = 0.0  # there, the worst distance / torch's own spread (at most SPREAD_FACTOR)


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


def run(case: Case, seed: int = 0, port: Callable = None) -> Measured:
  """``port(model, x, dtype=None, strict=True) -> (module, variables)``: ``jaxbn.port`` (default),
  or ``jaxbn.emit``'s source loaded (test_emit)."""
  port = port or jaxbn.port
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
  module, variables = port(model, x)
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
  layers_rel = layers64_rel = None
  by_spread, ratios = (), [0.0]  # the checks torch's own spread decided, and how close they came
  if case.per_layer:  # the per-layer report must agree with the end-to-end parity
    layers_rel = per_layer(model, module, variables, x)
    if layers_rel > PER_LAYER_RTOL:  # float32 cannot resolve it (two values per channel): float64 decides
      with jax.enable_x64(True):
        model64 = copy.deepcopy(model).double()
        module64, variables64 = port(model64, x.astype(np.float64), dtype=np.float64)
        layers64_rel = per_layer(model64, module64, variables64, x.astype(np.float64))
      if layers64_rel > case.grad64_rtol:  # ill-conditioned even in float64: torch's own spread decides
        spread = torch_layer_spread(model64, x.astype(np.float64))
        ratios.append(layers64_rel / spread)
        assert layers64_rel <= SPREAD_FACTOR * spread, (
            f"per-layer comparison: {layers_rel:.3g} > {PER_LAYER_RTOL} in float32 and {layers64_rel:.3g} >"
            f" {case.grad64_rtol} in float64, and > {SPREAD_FACTOR}x torch float64's own spread one ulp away"
            f" ({spread:.3g})"
        )
        by_spread += ("float64 per layer",)

  torch64 = copy.deepcopy(model).double()
  sgd = lambda m: torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM)  # noqa: E731
  optimizer, optimizer64 = sgd(model), sgd(torch64)
  batches, eval_x = [batch() for _ in range(case.steps)], batch()[0]
  twin = Float64Twin(copy.deepcopy(torch64), batches, eval_x, case.loss)
  torch64_steps = torch64_run(torch64, optimizer64, batches, case.loss)

  # The first step, from identical parameters: float32 against torch float32.
  (x, labels), (_, _, stats64) = batches[0], torch64_steps[0]
  tx = jaxbn.keep_frozen(optax.sgd(LR, momentum=MOMENTUM), jaxbn.frozen_mask(variables))
  initial = variables
  before_step = copy.deepcopy(model)
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
    twin32 = functools.cache(lambda: float32_twin_step(before_step, x, labels, case.loss))
    what = f"train-mode outputs, first step ({train_rel:.3g})"
    assert_tracks_or_spread(output, out32, torch64_steps[0][0], case.floor, what, lambda: twin32()[0], ratios)
    what = f"running statistics, first step ({stats_rel:.3g})"
    twin_stats = lambda: relative_stats(twin32()[1], stats64)[0]  # noqa: E731
    assert_tracks_or_spread(*scaled, case.floor, what, twin_stats, ratios)
    by_spread += ("float32 first step",) if twin32.cache_info().misses else ()

  # Every step in float64, in lock-step with torch float64 (float32 training itself is chaotic:
  # see test_resnet_parity's docstring): gradients, outputs, statistics, then eval.
  with jax.enable_x64(True):
    module64, _ = port(model, x, dtype=np.float64, strict=False)
    variables64 = jax.tree.map(
        lambda v: np.asarray(v, np.float64) if np.issubdtype(v.dtype, np.floating) else v, initial
    )
    step64, opt_state = jax_step(module64, tx, case.loss), tx.init(variables64["params"])
    for index, ((x, labels), (out64, torch_grads, stats64)) in enumerate(zip(batches, torch64_steps, strict=True)):
      variables64, opt_state, output, grads = step64(variables64, opt_state, x.astype(np.float64), labels)
      if index == 0:
        grads = jaxbn.convert.to_state_dict({"params": grads})
        grad64_rel = assert_gradients_close(grads, torch_grads, case, lambda: twin.steps[0][1], ratios)
      twin_output = lambda i=index: twin.steps[i][0]  # noqa: E731
      assert_float64_close(as_arrays(output), out64, f"train-mode outputs, step {index}", case, twin_output, ratios)
      stats = running_stats(jaxbn.convert.to_state_dict(variables64))
      twin_stats = lambda i=index: relative_stats(twin.steps[i][2], stats64)[0]  # noqa: E731
      what = f"running statistics, step {index}"
      assert_float64_close(*relative_stats(stats, stats64), what, case, twin_stats, ratios)
    expected64 = torch64_eval(torch64, eval_x)
    actual = as_arrays(jax.jit(module64.apply)(variables64, eval_x.astype(np.float64)))
    assert_float64_close(actual, expected64, "eval after training", case, lambda: twin.eval_output, ratios)
  by_spread += ("float64 steps",) if twin.used else ()
  return Measured(
      port_seconds, eval_rel, train_rel, stats_rel, grad64_rel, layers_rel, layers64_rel, by_spread, max(ratios)
  )


def per_layer(model, module, variables, x) -> float:
  """``jaxbn.parity.compare``'s worst BatchNorm layer over a train step and an eval step."""
  report = jaxbn.parity.compare(copy.deepcopy(model), module, variables, [x, x], train_steps=1, channels_last=False)
  return max((row.max_rel for row in report), default=0.0)


def torch_layer_spread(model64, x) -> float:
  """torch float64's own per-layer spread: every BatchNorm layer's output over a train and an eval
  forward, against the same with the model and input one ulp away (the worst max |difference| /
  max |output|, as parity.compare measures)."""
  from jaxbn._src.parity import _torch_batchnorm_outputs, _torch_batchnorms

  def outputs(model, x):
    layers = _torch_batchnorms(model)
    return {
        (train, name): output
        for train in (True, False)
        for name, output in _torch_batchnorm_outputs(model, layers, x, train).items()
    }

  generator = torch.Generator().manual_seed(2)
  nudged = copy.deepcopy(model64)
  nudge(nudged, generator, 2.0**-52)
  ours, theirs = outputs(copy.deepcopy(model64), x), outputs(nudged, nudged_array(x, generator, 2.0**-52))
  return max(float(np.max(np.abs(ours[k] - theirs[k])) / max(np.max(np.abs(ours[k])), 1e-30)) for k in ours)


def torch64_run(model, optimizer, batches, loss) -> list[tuple[dict, dict, dict]]:
  """torch float64's (outputs, gradients, running statistics) after each step."""
  steps = []
  for x, labels in batches:
    out64, grads64 = torch_step(model, optimizer, x.astype(np.float64), labels, loss)
    steps.append((out64, grads64, running_stats(model.state_dict())))
  return steps


def torch64_eval(model, x) -> dict:
  model.eval()
  with torch.no_grad():
    return as_arrays(model(torch.from_numpy(x).double()))


def float32_twin_step(model, x, labels, loss) -> tuple[dict, dict]:
  """torch float32's first step (outputs, running statistics) one float32 ulp away."""
  generator = torch.Generator().manual_seed(1)
  nudge(model, generator, 2.0**-23)
  x = nudged_array(x, generator, 2.0**-23)
  optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
  output, _ = torch_step(model, optimizer, x, labels, loss)
  return output, running_stats(model.state_dict())


def assert_tracks_or_spread(actual, torch32, torch64, floor, what, twin: Callable[[], dict], ratios=None) -> None:
  """``assert_tracks`` (jaxbn's L2 distance to torch float64 within twice torch float32's plus
  ``floor``), or, where float32 rounding is amplified beyond that, within SPREAD_FACTOR of torch
  float32's own spread one ulp away (``twin()``)."""
  try:
    assert_tracks(actual, torch32, torch64, floor, what)
  except AssertionError as error:
    ours, spread = relative_l2(actual, torch64), relative_l2(twin(), torch32)
    (ratios if ratios is not None else []).append(ours / spread)
    if ours > SPREAD_FACTOR * spread:
      raise AssertionError(
          f"{error}; and relative L2 {ours:.3g} > {SPREAD_FACTOR}x torch float32's own spread one ulp away"
          f" ({spread:.3g})"
      ) from None


def nudge(model, generator, ulp: float) -> None:
  """Every floating parameter and buffer of ``model`` one ``ulp`` (relative) up or down, in place."""
  with torch.no_grad():
    for tensor in (*model.parameters(), *model.buffers()):
      if tensor.is_floating_point():
        tensor.mul_(_one_ulp(tensor.shape, generator, ulp, tensor.dtype))


class Float64Twin:
  """torch float64, one ulp away, run only when a float64 check fails at its tolerance."""

  def __init__(self, model64, batches, eval_x, loss):
    self._model, self._batches, self._eval_x, self._loss = model64, batches, eval_x, loss

  @functools.cached_property
  def _run(self):
    generator = torch.Generator().manual_seed(1)
    nudge(self._model, generator, 2.0**-52)
    moved = lambda x: nudged_array(x.astype(np.float64), generator, 2.0**-52)  # noqa: E731
    batches = [(moved(x), labels) for x, labels in self._batches]
    optimizer = torch.optim.SGD(self._model.parameters(), lr=LR, momentum=MOMENTUM)
    return torch64_run(self._model, optimizer, batches, self._loss), torch64_eval(self._model, moved(self._eval_x))

  @property
  def used(self) -> bool:
    return "_run" in vars(self)

  @property
  def steps(self):
    return self._run[0]

  @property
  def eval_output(self):
    return self._run[1]


def nudged_array(x: np.ndarray, generator, ulp: float) -> np.ndarray:
  """``x`` with every element one ``ulp`` (relative) up or down."""
  return x * _one_ulp(x.shape, generator, ulp, torch.from_numpy(x).dtype).numpy()


def _one_ulp(shape, generator, ulp: float, dtype) -> torch.Tensor:
  signs = torch.randint(0, 2, tuple(shape), generator=generator).to(dtype) * 2 - 1
  return 1 + signs * ulp


def assert_float64_close(actual: dict, expected: dict, what: str, case, twin: Callable[[], dict], ratios=None) -> None:
  """Relative L2 within ``case.grad64_rtol``, or within SPREAD_FACTOR of torch float64's own
  spread (``twin()``: the same quantity one ulp away) where that is the larger."""
  error = relative_l2(actual, expected)
  if error <= case.grad64_rtol:
    return
  spread = relative_l2(twin(), expected)
  (ratios if ratios is not None else []).append(error / spread)
  assert error <= SPREAD_FACTOR * spread, (
      f"{what}: jaxbn float64 relative L2 {error:.3g} > {case.grad64_rtol}, and > {SPREAD_FACTOR}x torch"
      f" float64's own spread one ulp away ({spread:.3g})"
  )


def assert_gradients_close(grads: dict, expected: dict, case, twin: Callable[[], dict], ratios=None) -> float:
  """float64 gradients against torch float64's, per tensor (each within ``grad64_rtol``, or
  SPREAD_FACTOR of torch's own spread one ulp away); returns the worst relative error."""
  # A conv bias before BatchNorm has gradient 0 in exact arithmetic; torch's is rounding noise,
  # so each tensor's scale is at least 1e-4 of the largest gradient anywhere.
  largest = max(np.max(np.abs(value)) for value in expected.values())

  def error(actual, key):
    return float(np.max(np.abs(actual[key] - expected[key])) / max(np.max(np.abs(expected[key])), 1e-4 * largest))

  worst = 0.0
  for key in expected:
    if error(grads, key) > case.grad64_rtol:
      spread = error(twin(), key)
      (ratios if ratios is not None else []).append(error(grads, key) / spread)
      assert error(grads, key) <= SPREAD_FACTOR * spread, (
          f"float64 gradient of {key}: relative error {error(grads, key):.3g} > {case.grad64_rtol}, and >"
          f" {SPREAD_FACTOR}x torch float64's own spread one ulp away ({spread:.3g})"
      )
    worst = max(worst, error(grads, key))
  return worst
