"""``jaxbn check``: a torch model and its jaxbn twin side by side, per BatchNorm layer, and with
``--train-steps`` trained side by side (``jaxbn.verify``).

The torch model (random init, or ``--weights``) trains its BatchNorm statistics for a few steps,
is saved as ``.safetensors`` with its BatchNorm configuration, loaded, converted (ported with
``jaxbn.port``, Linen or NNX, or written as source by ``jaxbn.emit`` and loaded, unless it is one
of jaxbn.models' ResNets) and run next to torch in training and eval. Exit status 1 when the worst
relative difference exceeds ``--tolerance`` (for a ported model: and the same comparison in
float64 exceeds 1e-9, so that float32 rounding on an ill-conditioned layer is not reported as a
wrong port), a running statistic is not finite, or ``jaxbn.verify`` fails.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import tempfile
import time

import jax
import numpy as np
import torch

import jaxbn
from jaxbn._src.checkpoints import config as layer_config
from jaxbn._src.checkpoints.files import state_dict_to_numpy
from jaxbn._src.checkpoints.inspection import inspect_state_dict
from jaxbn._src.checkpoints.recipe import read as read_recipe
from jaxbn._src.checkpoints.recipe import torch_mode
from jaxbn._src.port.nnx import PortedNNX
from jaxbn._src.verify.targets import load_source
from jaxbn.cli.errors import UsageError
from jaxbn.cli.flax_linen import flax_linen_port_errors
from jaxbn.cli.models import model_with_weights, read_weights
from jaxbn.cli.plot import check_plot_target, plot_report
from jaxbn.models import MODELS


def validate(args) -> dict | None:
  """Everything that can be known before a model runs; returns the ``--weights`` state_dict."""
  if args.model in MODELS and (args.emit or args.train_steps):
    option = "--emit" if args.emit else "--train-steps"
    raise UsageError(
        f"{option} checks what jaxbn.port / jaxbn.emit make of a torch model; {args.model} is jaxbn.models'"
        f" hand-written ResNet: use --model torchvision:{args.model}."
    )
  if args.layout != "NCHW" and not args.emit:
    raise UsageError(
        f"--layout {args.layout} is the emitted source's layout (jaxbn.port computes in torch's): add --emit."
    )
  if args.plot:
    check_plot_target(args.plot)
  if args.json:
    target = pathlib.Path(args.json)
    if not target.parent.is_dir():
      raise UsageError(f"--json {args.json}: no folder {target.parent}; create it or choose another path.")
  return read_weights(args.weights)


def train_statistics(torch_model, batches, args) -> None:
  """torch's BatchNorm statistics moved by ``args.steps`` forward passes in train mode (no
  gradient steps); a batch the model cannot take is a user error, found on the first one."""
  with torch_mode(torch_model, True, read_recipe(torch_model)), torch.no_grad():  # as configured
    for step in range(args.steps):
      try:
        torch_model(torch.from_numpy(batches()))
      except (RuntimeError, ValueError) as error:
        if step:
          raise
        raise UsageError(
            f"{args.model} cannot take a {args.batch}x3x{args.size}x{args.size} batch in training mode:"
            f" torch says {str(error).splitlines()[0]!r}. Choose a larger --size or --batch."
        ) from None


def check(args) -> int:
  weights = validate(args)
  torch.manual_seed(args.seed)
  torch_model, ported = model_with_weights(args.model, weights, args.weights, args.num_classes)
  if ported:
    jaxbn.parity.without_dropout(torch_model)  # torch's random masks cannot be reproduced
  rng = np.random.default_rng(args.seed)

  def batch():
    return rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)

  train_statistics(torch_model, batch, args)
  print(
      f"{args.model}: {'weights from ' + args.weights if args.weights else 'random init'},"
      f" BatchNorm statistics trained for {args.steps} steps on {args.batch}x3x{args.size}x{args.size} batches"
      + ("; ported with jaxbn.port, dropout and stochastic depth off (p=0)" if ported else "")
  )

  timings = {}
  with tempfile.TemporaryDirectory() as directory:
    path = pathlib.Path(directory) / "model.safetensors"
    jaxbn.save_state_dict(torch_model, path)  # the BatchNorm configuration is recorded with it
    start = time.perf_counter()
    state_dict = jaxbn.load_state_dict(path)
    timings["load .safetensors"] = time.perf_counter() - start
    recorded = jaxbn.read_batchnorm_config(path)
  x = batch()
  channels_last = not ported or args.layout == "NHWC"  # jaxbn.models and channels-last source take NHWC
  flax_input = np.moveaxis(x, 1, -1) if channels_last else x
  naive = None
  if ported:
    start = time.perf_counter()
    model, variables = flax_twin(torch_model, x, state_dict, args)
    timings[f"{described(args)} (trace, build, convert)"] = time.perf_counter() - start
    if not (args.emit or args.api == "nnx"):  # the trap is shown on the Linen port's layers
      naive = flax_linen_port_errors(copy.deepcopy(torch_model), model, variables, args)
  elif args.api == "nnx":
    from flax import nnx

    start = time.perf_counter()
    model = jaxbn.models.nnx.MODELS[args.model](torch_model.fc.out_features, rngs=nnx.Rngs(0))
    timings["build the NNX module"] = time.perf_counter() - start
    start = time.perf_counter()
    jaxbn.convert.from_torch(state_dict, model)  # in place
    timings["convert (rules)"] = time.perf_counter() - start
    variables = None  # compare runs the module's own state, leaving it as it is
  else:
    model = jaxbn.models.MODELS[args.model](num_classes=torch_model.fc.out_features)
    start = time.perf_counter()
    template = jax.eval_shape(model.init, jax.random.key(0), flax_input)
    timings["template (jax.eval_shape of init)"] = time.perf_counter() - start
    start = time.perf_counter()
    variables = jaxbn.convert.from_torch(state_dict, template).variables
    timings["convert (rules)"] = time.perf_counter() - start

  mismatches = layer_config.mismatches(recorded, layer_config.flax_configs(model, flax_input))
  print(
      "BatchNorm configuration recorded in the checkpoint (eps, momentum, affine, tracking):",
      "all layers match" if not mismatches else "",
  )
  for m in mismatches:
    print(f"  {m.layer}: {m.field} torch={m.torch} flax={m.flax}")

  batches = [batch() for _ in range(args.steps + 1)]
  before = copy.deepcopy(torch_model) if ported else None  # compare moves torch's statistics
  start = time.perf_counter()
  report = jaxbn.parity.compare(
      torch_model, model, variables, batches, train_steps=args.steps, channels_last=channels_last
  )
  timings["compare (both frameworks, incl. compilation)"] = time.perf_counter() - start
  print(
      f"\nPer BatchNorm layer, max |jaxbn - torch| / max |torch output| over {args.steps} training"
      " steps and 1 eval step; drift: running statistics relative to max(|value|, 1)"
  )
  print(jaxbn.parity.format_table(report))
  if naive is not None:
    print(naive)
  verification = None
  if args.train_steps:
    start = time.perf_counter()
    verification = jaxbn.verify(
        before,
        x,
        via="emit" if args.emit else "port",
        api=args.api,
        layout=args.layout,
        steps=args.train_steps,
        seed=args.seed,
    )
    timings["jaxbn.verify (both frameworks, float32 and float64)"] = time.perf_counter() - start
    print(f"\nTrained side by side ({args.train_steps} optimiser steps; jaxbn.verify):\n{verification.summary()}")
  if args.plot:
    plot_report(report, args.plot, args.model, verification)
    print(f"\nPlot of the per-layer differences: {args.plot}")
  # Only jaxbn's own steps: a torch-vs-JAX speed ratio needs each measured alone (benchmarks/).
  print("\nTimings (this machine):")
  for name, seconds in timings.items():
    print(f"  {name:<46} {seconds * 1e3:9.1f} ms")
  worst = max(row.max_rel for row in report)
  worst64 = None
  if ported and worst > args.tolerance:
    worst64 = float64_worst(copy.deepcopy(before), batches, args.steps, args)
    print(
        f"\nIn float64 (both models in double, the same batches) the worst relative difference is {worst64:.2e}"
        f" (bound {min(args.tolerance, FLOAT64_BOUND):.0e}): "
        + (
            "float32 rounding, amplified where a BatchNorm channel has few values, is what exceeds the tolerance;"
            " the layers compute what torch's do."
            if worst64 <= min(args.tolerance, FLOAT64_BOUND)
            else "the difference is not float32 rounding."
        )
    )
  status = verdict(report, state_dict, torch_model, args.tolerance, worst64)
  if verification is not None and not verification.passed:
    print(f"\nFAILED: jaxbn.verify: {verification.divergence.describe() if verification.divergence else 'see above'}")
    status = 1
  if args.json:
    write_json(args, status, report, worst64, verification)
  return status


def described(args) -> str:
  if not args.emit:
    return f"jaxbn.port (api={args.api!r})"
  return f"jaxbn.emit (api={args.api!r}, layout={args.layout!r}, loaded)"


def flax_twin(torch_model, x, state_dict, args):
  """``(module, variables)`` of what is checked, with the weights from the file: jaxbn.port's
  module, or jaxbn.emit's model.py loaded (emit writes ``torch_model``'s state_dict, the file's);
  an NNX module's variables are its own (None)."""
  if args.emit:
    with tempfile.TemporaryDirectory() as directory:
      path = jaxbn.emit(torch_model, x, pathlib.Path(directory) / "emitted", api=args.api, layout=args.layout)
      loaded = load_source(path).load()
    return (loaded, None) if args.api == "nnx" else loaded
  module, variables = ported_for_layers(torch_model, x, args.api, announce=True)
  if variables is None:
    jaxbn.convert.from_torch(state_dict, module)  # in place
    return module, None
  return module, jaxbn.convert.from_torch(state_dict, variables).variables


def ported_for_layers(torch_model, x, api: str, dtype=None, announce: bool = False):
  """jaxbn.port's ``(module, variables)`` for the per-layer comparison; an NNX module's variables
  are its own (None). An NNX port that is the Linen port inside nnx.bridge is compared as the
  Linen port: its layers are Linen's (``announce``: say so)."""
  module, variables = jaxbn.port(torch_model, x, api=api, dtype=dtype)
  if isinstance(module, PortedNNX):
    if announce:
      print(
          "(the NNX port of this model is jaxbn.port's Linen module inside nnx.bridge, not native NNX"
          " classes: its layers are compared as the Linen port's)"
      )
    return jaxbn.port(torch_model, x, dtype=dtype)
  return (module, None) if api == "nnx" else (module, variables)


def write_json(args, status: int, report, worst64, verification) -> None:
  """``--json``: one object (README: "jaxbn check --json")."""
  document = {
      "schema": 1,
      "model": args.model,
      "checked": described(args) if args.model not in MODELS else f"jaxbn.models ({args.api})",
      "status": status,
      "passed": status == 0,
      "tolerance": args.tolerance,
      "worst": max(row.max_rel for row in report),
      "worst_float64": worst64,
      "layers": [dataclasses.asdict(row) for row in report],
      "verify": None if verification is None else verification.to_json(),
  }
  pathlib.Path(args.json).write_text(json.dumps(document, indent=1) + "\n")


# float64 resolves what float32 cannot (2 ** -29 finer): a float32 difference that float64 brings
# under this is rounding, not a different computation.
FLOAT64_BOUND = 1e-9


def float64_worst(torch_model, batches, steps: int, args) -> float:
  """The same per-layer comparison with the torch model and its port in float64."""
  with jax.enable_x64(True):
    model64 = torch_model.double()
    batches64 = [b.astype(np.float64) for b in batches]
    module, variables = ported_for_layers(model64, batches64[0], args.api, np.float64)
    report = jaxbn.parity.compare(model64, module, variables, batches64, train_steps=steps, channels_last=False)
  return max(row.max_rel for row in report)


def verdict(report, state_dict, torch_model, tolerance: float, worst64: float | None = None) -> int:
  """0 when every difference is within ``tolerance`` (or, in float32, beyond it only by rounding
  that float64 resolves: ``worst64``) and every statistic finite, else 1."""
  worst = max(row.max_rel for row in report)
  # NaN compares False with any tolerance: non-finite statistics or differences fail by name.
  corrupted = [
      f"{framework} {layer.layer}: {problem}"
      for framework, state in (
          ("checkpoint", state_dict),
          ("torch after the check", state_dict_to_numpy(torch_model.state_dict())),
      )
      for layer in inspect_state_dict(state)
      for problem in layer.problems
      if "non-finite" in problem
  ]
  corrupted += sorted(
      {
          f"jaxbn {row.layer}: non-finite output or running statistics ({row.mode}, step {row.step})"
          for row in report
          if not np.all(np.isfinite([row.max_rel, row.mean_drift or 0, row.var_drift or 0]))
      }
  )
  if corrupted:
    print("\nFAILED: non-finite running statistics:\n  " + "\n  ".join(corrupted))
    return 1
  if worst > tolerance and (worst64 is None or worst64 > min(tolerance, FLOAT64_BOUND)):
    print(f"\nFAILED: worst relative difference {worst:.2e} > tolerance {tolerance:.0e}")
    return 1
  if worst > tolerance:
    print(f"\nOK: worst relative difference {worst:.2e} in float32, {worst64:.2e} in float64")
    return 0
  print(f"\nOK: worst relative difference {worst:.2e} <= tolerance {tolerance:.0e}")
  return 0
