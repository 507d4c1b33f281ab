"""``jaxbn.verify``: proof that a port trains like its torch model, on the user's own model.

The run, on a copy of the torch model (the model itself is left as found):

1. Round trip: the Flax variables convert back to torch's state_dict bit for bit (keys, dtypes,
   values) and load into the model with ``strict=True``.
2. Eval outputs from identical parameters, in the model's dtype.
3. The first optimiser step in the model's dtype (float32) from identical parameters against
   torch's: training outputs and every running statistic and counter.
4. Every step in float64, in lock-step with torch float64 (float32 training is chaotic: a value
   near a ReLU's kink rounds to either side, and steps amplify it): eval outputs before training;
   at each step the training outputs, every gradient, every running statistic and counter, every
   parameter after the update; eval outputs after the last step.

Both frameworks train the model as configured: modules torch keeps in eval stay in eval, and
parameters with ``requires_grad=False`` are not stepped (on the Flax side through what the port or
the emitted source says: ``Port.frozen_mask`` / ``Port.trainable``, ``frozen_mask`` /
``trainable`` in ``model.py``), so a port that trains what torch does not fails.

Bounds (``measures`` names each measure): float32 from identical parameters ``floor`` (2e-4 of
the largest output: deep nets' rounding), or else jaxbn's L2 distance to torch float64 within
twice torch float32's plus ``floor``; float64 ``rtol`` (1e-9: relative L2 of outputs and scaled
statistics, per tensor for gradients and parameters). Where the arithmetic cannot resolve a bound
(an ill-conditioned model), torch's own spread decides: torch run again one ulp away and in
channels_last memory format, jaxbn within 10x of the larger difference. Counters and the round
trip are exact. torch's float64 runs compute Hardswish and Hardsigmoid as its own elementwise ops
(``runs.exact_hard_activations``: its fused float64 backward of those is 3e-8 off).
"""

from __future__ import annotations

import copy
import ctypes
import functools
import gc
import pathlib
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxbn._src.checkpoints.rules import to_state_dict
from jaxbn._src.parity import torch_batchnorms, without_dropout
from jaxbn._src.verify import arbiters, measures
from jaxbn._src.verify.batches import as64, draw, inputs_of
from jaxbn._src.verify.optimizers import SGD, Optimizer
from jaxbn._src.verify.randomness import refuse_random_draws
from jaxbn._src.verify.result import Check, Divergence, LayerFigures, Verification
from jaxbn._src.verify.runs import LOSSES, Step, TorchRun
from jaxbn._src.verify.targets import Target, flax_run, target, variables_of

FLOOR = 2e-4  # float32 from identical parameters, relative to the largest output (deep nets' rounding)
RTOL = 1e-9  # float64, relative
HARD_ACTIVATIONS = ("hardswish", "hardsigmoid")  # module classes (torch's, timm's) said in the notes


def verify(
    torch_model,
    example_input: Any,
    *,
    via: str = "port",
    api: str = "linen",
    layout: str = "NCHW",
    steps: int = 3,
    optimizer: Optimizer | None = None,
    loss: str = "mean_square",
    batches: Sequence[Any] | None = None,
    seed: int = 0,
    floor: float = FLOOR,
    rtol: float | None = None,
    build: Callable[..., Any] | None = None,
) -> Verification:
  """Ports (or emits) ``torch_model`` and trains both for ``steps`` optimiser steps in lock-step:
  returns a ``Verification`` (``.passed``, ``.summary()``, ``.to_json()``, ``.divergence``: which
  layer, which step, forward or backward). Prints nothing.

  Args:
    torch_model: the model as the user trains it (its modules' ``training`` flags and parameters'
      ``requires_grad`` as configured, read as ``jaxbn.port`` reads them). A copy is trained; its
      dropout and stochastic depth are set to p=0 (torch's random masks cannot be reproduced).
    example_input: an array or tensor in torch's layout, or a tuple of them: the batches' shapes
      and dtypes (floating inputs are drawn at random, others repeated).
    via, api: what is verified: ``"port"`` (``jaxbn.port``) or ``"emit"`` (``jaxbn.emit``'s
      ``model.py``, imported and loaded), as ``"linen"`` or ``"nnx"``.
    layout: for ``via="emit"``, ``"NHWC"`` verifies the channels-last source (its inputs and
      outputs transposed by its ``INPUT_AXES`` / ``OUTPUT_AXES``; everything else as torch's).
    steps: optimiser steps in float64 lock-step (the first also in the model's dtype).
    optimizer: ``jaxbn.verification.SGD`` (default: lr 1e-3, momentum 0.9), ``Adam`` or ``AdamW``.
    loss: ``"mean_square"`` of every floating output, or ``"cross_entropy"`` of every (batch,
      classes) output against random labels (other outputs: mean square).
    batches: ``steps + 1`` inputs (arrays or tuples) to use instead of random ones; the last is
      the eval after training.
    seed: the random batches and labels.
    floor, rtol: the float32 and float64 bounds (module docstring); ``rtol`` by default 1e-9.
    build: instead of ``via``/``api``, ``build(torch_model, inputs, dtype) -> jaxbn.Port`` (``inputs``
      a tuple of arrays; ``dtype`` None or ``np.float64``): the user's own Flax side.

  Example::

    result = jaxbn.verify(model, np.zeros((4, 3, 64, 64), np.float32), api="nnx")
    assert result.passed, result.summary()
  """
  if loss not in LOSSES:
    raise ValueError(f"loss={loss!r}: choose one of {LOSSES}")
  if steps < 1:
    raise ValueError(f"steps={steps}: verify needs at least one optimiser step")
  optimizer = SGD() if optimizer is None else optimizer
  started = time.perf_counter()
  model = without_dropout(copy.deepcopy(torch_model))
  rtol = RTOL if rtol is None else rtol
  hard = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.lower() in HARD_ACTIVATIONS})
  notes = ()
  if hard:
    notes = (
        f"torch float64's {'/'.join(hard)} computed as torch's elementwise ops (x * relu6(x + 3) / 6): its"
        " fused float64 backward rounds 1/6 to float32",
    )
  inputs = inputs_of(example_input)
  refuse_random_draws(model, inputs)
  draws = draw(inputs, batches, steps, seed)
  with tempfile.TemporaryDirectory() as directory:
    chosen = (
        Target("the given build()", build) if build is not None else target(via, api, pathlib.Path(directory), layout)
    )
    run = _Run(model, chosen, optimizer, loss, draws, floor, rtol)
    checks = run.checks()
  return Verification(
      target=chosen.name,
      optimizer=repr(optimizer),
      loss=loss,
      steps=steps,
      checks=tuple(checks),
      divergence=run.divergence(checks),
      layers=run.layer_figures(),
      seconds={**run.seconds, "total": time.perf_counter() - started},
      notes=notes,
  )


def _module_of(key: str) -> str:
  return key.rpartition(".")[0] or key


def _return_freed_memory() -> None:
  """Hands what the float32 phase freed back to the system before the float64 phase. glibc keeps
  freed memory in per-thread arenas that XLA's compiler threads and torch's autograd do not share:
  nasnetalarge's float32 phase left 8.2 GB resident, 5.8 GB after this. Once a verification: a
  collection after every phase cost the test suite minutes."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator decides
    pass


class _Run:
  """One verification's state: the torch runs (as found, float64, the rounding twins), the Flax
  runs, and what each step gave."""

  def __init__(self, model, chosen: Target, optimizer, loss, batches, floor, rtol):
    self.model, self.target, self.optimizer, self.loss = model, chosen, optimizer, loss
    self.batches, self.floor, self.rtol = batches, floor, rtol
    self.batches64 = [(as64(inputs), labels) for inputs, labels in batches]
    self.initial = copy.deepcopy(model)
    self.dtype = next((str(p.dtype).removeprefix("torch.") for p in model.parameters()), "float32")
    self.seconds: dict[str, float] = {"build": 0.0, "torch": 0.0, "jax": 0.0}
    self.native: dict[str, Step] = {}  # the model's dtype: "eval", "torch eval", "step", "torch step"
    self.steps64: list[tuple[Step, Step]] = []  # (jaxbn, torch) float64, per step
    self.eval64: dict[str, Step] = {}  # "before", "torch before", "after", "torch after"
    self.order: list[str] = []

  def _timed(self, what: str, call: Callable, *args):
    start = time.perf_counter()
    result = call(*args)
    self.seconds[what] += time.perf_counter() - start
    return result

  def _torch(self, model, exact: bool = False) -> TorchRun:
    """torch's side; ``exact``: a float64 reference, its hard activations as compositions of
    torch's elementwise ops (``runs.exact_hard_activations``: torch's fused float64 backward rounds
    their 1/6 to float32)."""
    return TorchRun(model, self.optimizer, self.loss, torch_batchnorms(model), exact)

  def checks(self) -> list[Check]:
    checks = []
    built = self._timed("build", self.target.build, self.model, self.batches[0][0], None)
    checks.append(self._round_trip(built))
    flax = flax_run(built, self.optimizer.optax(), self.loss)
    torch_run = self._torch(self.model)
    inputs, labels = self.batches[0]
    self.native["torch eval"] = self._timed("torch", torch_run.evaluate, inputs)
    self.native["eval"] = self._timed("jax", flax.evaluate, inputs)
    self.native["torch step"] = self._timed("torch", torch_run.step, inputs, labels)
    self.native["step"] = self._timed("jax", flax.step, inputs, labels)
    self.order = torch_run.order
    del built, flax, torch_run  # float32's models freed before float64's are made (yolov3: 20 GB at once)
    _return_freed_memory()
    model64 = copy.deepcopy(self.initial).double()
    torch64 = self._torch(model64, exact=True)
    with jax.enable_x64(True):
      # built before torch64 trains: both start from the same float64 parameters
      built64 = self._timed("build", self.target.build, model64, self.batches64[0][0], np.float64)
      flax64 = flax_run(built64, self.optimizer.optax(), self.loss)
      self.eval64["torch before"] = self._timed("torch", torch64.evaluate, self.batches64[0][0])
      self.eval64["before"] = self._timed("jax", flax64.evaluate, self.batches64[0][0])
      for inputs, labels in self.batches64[:-1]:
        theirs = self._timed("torch", torch64.step, inputs, labels)
        self.steps64.append((self._timed("jax", flax64.step, inputs, labels), theirs))
      last = self.batches64[-1][0]
      self.eval64["torch after"] = self._timed("torch", torch64.evaluate, last)
      self.eval64["after"] = self._timed("jax", flax64.evaluate, last)
    checks += self._native_checks()
    checks += self._float64_checks()
    return checks

  def _round_trip(self, built) -> Check:
    """Every tensor back to torch bit for bit, and a strict load into the model."""
    from jaxbn._src.checkpoints.rules import to_torch

    expected = {k: v.detach().numpy() for k, v in self.model.state_dict().items()}
    variables = variables_of(built)
    back = to_state_dict(variables)
    problems = [f"{k} missing" for k in expected if k not in back] + [
        f"{k} unexpected" for k in back if k not in expected
    ]
    problems += [
        f"{k} differs"
        for k, v in expected.items()
        if k in back and (back[k].dtype != v.dtype or back[k].shape != v.shape or not np.array_equal(back[k], v))
    ]
    if not problems:
      try:
        copy.deepcopy(self.initial).load_state_dict(to_torch(variables, like=self.model), strict=True)
      except RuntimeError as error:
        problems.append(f"load_state_dict(strict=True): {str(error).splitlines()[0]}")
    where = ", ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
    return Check(
        "round trip to torch's state_dict", self.dtype, None, len(problems), 0, "exact", not problems, where or None
    )

  # -- the model's dtype (float32), from identical parameters ---------------------------------

  @functools.cached_property
  def _twins_native(self) -> list[Step]:
    """torch's first step in the model's dtype, from each of the rounding twins."""
    ulp = float(np.finfo(np.dtype(self.dtype) if self.dtype != "bfloat16" else np.float32).eps) / 2
    return [
        self._torch(model).step(*batches[0])
        for model, batches in self._rounding_twins(self.initial, self.batches[:1], 1, ulp)
    ]

  @staticmethod
  def _rounding_twins(model, batches, seed: int, ulp: float) -> list[tuple[Any, list]]:
    """Copies of ``model`` and ``batches`` that differ from them only in rounding: every parameter,
    buffer and input one ``ulp`` away (random signs from ``seed``); the model in channels_last
    memory format, which runs other kernels (torch float64 against itself that way measured 1.7e-8
    on segmentation_models_pytorch's Unet/mobileone_s0 at its second step, where one ulp gave 4.7e-11)."""
    import torch

    nudged, generator = copy.deepcopy(model), measures.generator(seed)
    measures.nudge(nudged, generator, ulp)
    moved = [(tuple(measures.nudged(x, generator, ulp) for x in inputs), labels) for inputs, labels in batches]
    return [(nudged, moved), (copy.deepcopy(model).to(memory_format=torch.channels_last), batches)]

  def _native_checks(self) -> list[Check]:
    checks = []
    eval_error = measures.max_relative(self.native["eval"].outputs, self.native["torch eval"].outputs)
    if eval_error <= self.floor:
      checks.append(Check("eval outputs", self.dtype, None, eval_error, self.floor, "tolerance", True))
    else:  # float32 rounding on an ill-conditioned model, or a different computation: float64 decides
      error64 = measures.relative_l2(self.eval64["before"].outputs, self.eval64["torch before"].outputs)
      checks.append(Check("eval outputs", self.dtype, None, error64, self.rtol, "float64", error64 <= self.rtol))
    ours, theirs, first64 = self.native["step"], self.native["torch step"], self.steps64[0][1]
    checks.append(
        arbiters.tracks(
            "training outputs",
            self.dtype,
            ours.outputs,
            theirs.outputs,
            first64.outputs,
            lambda: [twin.outputs for twin in self._twins_native],
            self.floor,
        )
    )
    statistics, counters = measures.split_counters(ours.statistics)
    expected, expected_counters = measures.split_counters(theirs.statistics)
    reference = measures.split_counters(first64.statistics)[0]
    scale = functools.partial(measures.scaled_statistics, reference=reference)
    checks.append(
        arbiters.tracks(
            "running statistics",
            self.dtype,
            scale(statistics),
            scale(expected),
            scale(reference),
            lambda: [scale(measures.split_counters(twin.statistics)[0]) for twin in self._twins_native],
            self.floor,
            absolute=True,
        )
    )
    checks.append(self._counters(counters, expected_counters, self.dtype, 0))
    return checks

  @staticmethod
  def _counters(actual, expected, dtype, step) -> Check:
    difference = measures.counter_difference(actual, expected)
    wrong = [k for k, v in expected.items() if int(actual[k]) != int(v)]
    return Check("num_batches_tracked", dtype, step, difference, 0, "exact", not wrong, ", ".join(wrong[:5]) or None)

  # -- float64 lock-step ------------------------------------------------------------------------

  @functools.cached_property
  def _twins64(self) -> list[tuple[Step, list[Step], Step]]:
    """torch float64 from each of the rounding twins: (eval before, every step, eval after)."""
    runs = []
    with jax.enable_x64(True):
      for model, batches in self._rounding_twins(copy.deepcopy(self.initial).double(), self.batches64, 2, 2.0**-52):
        run = self._torch(model, exact=True)
        before = run.evaluate(batches[0][0])
        steps = [run.step(*batch) for batch in batches[:-1]]
        runs.append((before, steps, run.evaluate(batches[-1][0])))
    return runs

  def _group64(self, name, step, ours, theirs, twins) -> Check:
    return arbiters.group(name, step, ours, theirs, twins, self.rtol)

  def _tensors64(self, name, step, ours, theirs, twins) -> Check:
    return arbiters.tensors(name, step, ours, theirs, twins, self.rtol)

  def _float64_checks(self) -> list[Check]:
    def twins(part: int, step: int = 0) -> list[Step]:  # run only when a bound fails
      return [twin[part][step] if part == 1 else twin[part] for twin in self._twins64]

    def evaluation(when: str, part: int) -> Check:
      ours, theirs = self.eval64[when].outputs, self.eval64[f"torch {when}"].outputs
      return self._group64(
          f"eval outputs {when} training", None, ours, theirs, lambda: [t.outputs for t in twins(part)]
      )

    checks = [evaluation("before", 0)]
    for step, (ours, theirs) in enumerate(self.steps64):
      twin_steps = lambda step=step: twins(1, step)  # noqa: E731
      statistics, counters = measures.split_counters(ours.statistics)
      expected, expected_counters = measures.split_counters(theirs.statistics)
      scale = functools.partial(measures.scaled_statistics, reference=expected)
      checks += [
          self._group64(
              "training outputs", step, ours.outputs, theirs.outputs, lambda s=twin_steps: [t.outputs for t in s()]
          ),
          self._tensors64(
              "gradients", step, ours.gradients, theirs.gradients, lambda s=twin_steps: [t.gradients for t in s()]
          ),
          self._group64(
              "running statistics",
              step,
              scale(statistics),
              scale(expected),
              lambda s=twin_steps: [scale(measures.split_counters(t.statistics)[0]) for t in s()],
          ),
          self._counters(counters, expected_counters, "float64", step),
          self._tensors64(
              "parameters after the update",
              step,
              ours.parameters,
              theirs.parameters,
              lambda s=twin_steps: [t.parameters for t in s()],
          ),
      ]
    checks.append(evaluation("after", 2))
    return checks

  # -- where it went wrong ------------------------------------------------------------------------

  def _rank(self, layer: str) -> int:
    """A module's place in the forward (modules never called, or the output: after the rest)."""
    return self.order.index(layer) if layer in self.order else len(self.order)

  def _first_layer(self, errors: dict[str, float], bound: float) -> str | None:
    beyond = [layer for layer, error in errors.items() if not error <= bound]
    return min(beyond, key=self._rank) if beyond else None

  @staticmethod
  def _layer_errors(ours: dict, theirs: dict) -> dict[str, float]:
    return {k: measures.max_relative({k: ours[k]}, {k: v}) for k, v in theirs.items() if k in ours}

  def _statistics_errors(self, ours: Step, theirs: Step) -> dict[str, float]:
    """Per layer: max |difference| / max(|torch|, 1) over its running mean and variance, and any
    counter difference."""
    errors: dict[str, float] = {}
    for key, value in theirs.statistics.items():
      if key not in ours.statistics:
        continue
      difference = np.abs(ours.statistics[key] - value) / np.maximum(np.abs(value), 1.0)
      layer = _module_of(key)
      errors[layer] = max(errors.get(layer, 0.0), float(np.max(difference, initial=0.0)))
    return errors

  def divergence(self, checks: list[Check]) -> Divergence | None:
    """The first failed check's step and phase, and there the first layer in the forward beyond
    the bound (for gradients the last: the backward runs the other way)."""
    failed = next((check for check in checks if not check.passed), None)
    if failed is None:
      return None
    if failed.name.startswith("round trip"):
      return Divergence("round trip", None, failed.dtype, (failed.where or "").split(" ")[0], None, failed.error, 0)
    float64 = failed.dtype == "float64" or failed.arbiter == "float64"
    bound = self.rtol if float64 else self.floor
    if failed.name.startswith("eval"):
      if "after" in failed.name:
        ours, theirs = self.eval64["after"], self.eval64["torch after"]
      elif float64:
        ours, theirs = self.eval64["before"], self.eval64["torch before"]
      else:
        ours, theirs = self.native["eval"], self.native["torch eval"]
      errors = self._layer_errors(ours.layers, theirs.layers)
      layer = self._first_layer(errors, bound) or "the output (after every BatchNorm layer)"
      return Divergence("eval", None, failed.dtype, layer, None, errors.get(layer, failed.error), bound)
    ours, theirs = self.steps64[failed.step] if float64 else (self.native["step"], self.native["torch step"])
    dtype = "float64" if float64 else self.dtype
    if failed.name == "training outputs":
      forward = self._layer_errors(ours.layers, theirs.layers)
      layer = self._first_layer(forward, bound) or "the output (after every BatchNorm layer)"
      return Divergence("forward", failed.step, dtype, layer, None, forward.get(layer, failed.error), bound)
    if failed.name == "gradients":
      errors = measures.tensor_errors(ours.gradients, theirs.gradients)
      beyond = [k for k, e in errors.items() if not e <= bound]
      tensor = max(beyond, key=lambda k: self._rank(_module_of(k))) if beyond else failed.where
      return Divergence(
          "backward", failed.step, dtype, _module_of(tensor), tensor, errors.get(tensor, failed.error), bound
      )
    if failed.name in ("running statistics", "num_batches_tracked"):
      errors = self._statistics_errors(ours, theirs)
      layer = self._first_layer(errors, 0 if failed.name == "num_batches_tracked" else bound)
      layer = layer or _module_of(failed.where or "")
      return Divergence("statistics", failed.step, dtype, layer, None, errors.get(layer, failed.error), bound)
    errors = measures.tensor_errors(ours.parameters, theirs.parameters)
    beyond = [k for k, e in errors.items() if not e <= bound]
    tensor = min(beyond, key=lambda k: self._rank(_module_of(k))) if beyond else failed.where
    return Divergence("update", failed.step, dtype, _module_of(tensor), tensor, errors.get(tensor, failed.error), bound)

  def layer_figures(self) -> tuple[LayerFigures, ...]:
    """Per torch module, the worst over the run: BatchNorm outputs (model's dtype: eval and the
    first step), gradients, updates and statistics (float64)."""
    figures: dict[str, dict[str, float]] = {}

    def note(layer, field, value):
      entry = figures.setdefault(layer, {})
      entry[field] = max(entry.get(field, 0.0), value) if np.isfinite(value) else float("inf")

    for ours, theirs in (
        (self.native["eval"], self.native["torch eval"]),
        (self.native["step"], self.native["torch step"]),
    ):
      for layer, error in self._layer_errors(ours.layers, theirs.layers).items():
        note(layer, "output", error)
    for ours, theirs in self.steps64:
      for field, errors in (
          ("gradient", measures.tensor_errors(ours.gradients, theirs.gradients)),
          ("update", measures.tensor_errors(ours.parameters, theirs.parameters)),
      ):
        for key, error in errors.items():
          note(_module_of(key), field, error)
      for layer, error in self._statistics_errors(ours, theirs).items():
        note(layer, "statistics", error)
    ordered = sorted(figures, key=self._rank)
    return tuple(LayerFigures(layer, **figures[layer]) for layer in ordered)
