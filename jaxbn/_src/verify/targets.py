"""What is verified: the Flax model a user trains, built from the torch model in one of four ways
(``jaxbn.port`` or ``jaxbn.emit``'s source; Linen or NNX), or by the user's own function."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import pathlib
import warnings
from collections.abc import Callable
from typing import Any

import optax

from jaxbn._src.nnx.freezing import trainable
from jaxbn._src.port.api import Port, port
from jaxbn._src.port.recipe import TrainingRecipeWarning
from jaxbn._src.variables.freezing import frozen_mask, keep_frozen
from jaxbn._src.variables.state import as_variables, is_nnx
from jaxbn._src.verify.runs import Layout, LinenRun, NnxRun

TARGETS = ("port", "emit")
APIS = ("linen", "nnx")
LAYOUTS = ("NCHW", "NHWC")


@dataclasses.dataclass(frozen=True)
class Target:
  """How the Flax side is made: ``build(torch_model, example_inputs, dtype) -> Port``."""

  name: str  # "port (linen)", "emitted source (nnx)", ...
  build: Callable[..., Port]


def _quietly(call, *args, **kwargs):
  """verify trains with the recipe itself: the port's notice about it is not for this call."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", TrainingRecipeWarning)
    return call(*args, **kwargs)


def _from_port(api: str) -> Callable[..., Port]:
  def build(model, inputs, dtype):
    return _quietly(port, model, inputs if len(inputs) > 1 else inputs[0], dtype=dtype, api=api)

  return build


_modules = itertools.count()


def load_source(path: pathlib.Path):
  """An emitted ``model.py`` imported as a module of its own (a new name each time)."""
  spec = importlib.util.spec_from_file_location(f"jaxbn_verified_model_{next(_modules)}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _from_source(api: str, directory: pathlib.Path, layout: str) -> Callable[..., Port]:
  """``jaxbn.emit`` into ``directory``, ``model.py`` imported, its ``load()``; what it trains from
  its own ``frozen_mask`` / ``trainable`` (the emitted ``FROZEN`` list); its inputs and outputs
  against torch's from its own ``INPUT_AXES`` and ``OUTPUT_AXES`` (channels-last source)."""
  from jaxbn._src.emit.api import emit

  count = itertools.count()

  def build(model, inputs, dtype):
    example = inputs if len(inputs) > 1 else inputs[0]
    path = _quietly(emit, model, example, directory / f"model{next(count)}", api=api, layout=layout, dtype=dtype)
    source = load_source(path)
    axes = None
    if hasattr(source, "INPUT_AXES"):
      outputs = tuple(source.OUTPUT_AXES)
      axes = Layout(tuple(source.INPUT_AXES), outputs, tuple(getattr(source, "TRAIN_OUTPUT_AXES", outputs)))
    if api == "nnx":  # model.py has trainable() where torch froze something
      loaded = source.load()
      return _Emitted(loaded, None, getattr(source, "trainable", trainable)(loaded), axes)
    module, variables = source.load()
    mask = getattr(source, "frozen_mask", frozen_mask)
    return _Emitted(module, variables, mask(variables), axes)

  return build


@dataclasses.dataclass(frozen=True)
class _Emitted:
  """Emitted source's model, with what its own ``model.py`` says to train."""

  module: Any
  variables: Any
  frozen: Any  # Linen: the frozen mask; NNX: the trainable filter
  layout: Layout | None = None  # channels-last source: its inputs and outputs against torch's


def target(via: str, api: str, directory: pathlib.Path | None = None, layout: str = "NCHW") -> Target:
  if via not in TARGETS:
    raise ValueError(f"via={via!r}: verify checks one of {TARGETS}")
  if api not in APIS:
    raise ValueError(f"api={api!r}: verify checks one of {APIS}")
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: verify checks one of {LAYOUTS}")
  if via == "port":
    if layout != "NCHW":
      raise ValueError("layout='NHWC' is emitted source's: verify(via='emit', layout='NHWC')")
    return Target(f"jaxbn.port (api={api!r})", _from_port(api))
  suffix = ", layout='NHWC'" if layout == "NHWC" else ""
  return Target(f"jaxbn.emit source (api={api!r}{suffix})", _from_source(api, directory, layout))


def flax_run(built, optimizer: optax.GradientTransformation, loss: str):
  """The Flax side of the lock-step from what ``Target.build`` gave (a ``Port`` or emitted source),
  with its optimiser as the user would build it."""
  layout = None if isinstance(built, Port) else built.layout
  if is_nnx(built.module):
    wrt = built.trainable if isinstance(built, Port) else built.frozen
    return NnxRun(built.module, optimizer, wrt, loss, layout)
  mask = built.frozen_mask if isinstance(built, Port) else built.frozen
  return LinenRun(built.module, built.variables, keep_frozen(optimizer, mask), loss, layout)


def variables_of(built) -> Any:
  """Linen variables (an NNX model's through ``to_variables``) for the round trip."""
  return as_variables(built.module if is_nnx(built.module) else built.variables)
