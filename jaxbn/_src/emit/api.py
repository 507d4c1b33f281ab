"""``jaxbn.emit``: a torch model as Flax source a person can read, edit and own, with its weights."""

from __future__ import annotations

import importlib.metadata
import pathlib
from typing import Any

import torch

from jaxbn._src.checkpoints.files import as_numpy, save_state_dict
from jaxbn._src.emit import linen as linen_source
from jaxbn._src.emit.classes import Classes
from jaxbn._src.emit.tree import tree
from jaxbn._src.errors import PortError
from jaxbn._src.port.api import traced_port

WEIGHTS = linen_source.WEIGHTS_NAME


def emit(
    torch_model: torch.nn.Module, example_input: Any, out_dir, *, api: str = "linen", **port_options
) -> pathlib.Path:
  """Writes ``out_dir/model.py`` (Flax source: one class per torch module class, layers at torch's
  attribute names, BatchNorm as ``jaxbn.BatchNorm`` with each layer's eps and momentum) and
  ``out_dir/model.safetensors`` (the torch state_dict, with its BatchNorm configuration recorded).

  ``model.load()`` returns ``(module, variables)`` with ``jaxbn.port``'s contract:
  ``module.apply(variables, x)`` is torch's eval forward, ``module.apply(variables, x, train=True,
  mutable=["batch_stats"])`` its train forward. The source imports jax, flax, numpy and jaxbn, not
  torch. ``port_options`` are ``jaxbn.port``'s (``custom_modules``, ``custom_ops``,
  ``leaf_modules``, ``dtype``); ``custom_modules`` and ``custom_ops`` are imported by reference.

  Example::

    >>> jaxbn.emit(torchvision.models.resnet18(), torch.zeros(1, 3, 64, 64), "resnet18")  # doctest: +SKIP
    >>> from resnet18.model import load                                                  # doctest: +SKIP
    >>> module, variables = load()                                                       # doctest: +SKIP

  Returns the path of ``model.py``. Raises PortError for what the port refuses, and for what the
  source cannot say yet (naming it).
  """
  if api != "linen":
    raise ValueError(f"emit: api must be 'linen' (NNX source is not written yet), not {api!r}")
  if port_options.get("autocast") is not None:
    raise PortError(
        "emit: autocast is not emitted; emit the float32 model and use jaxbn.port(autocast=) for mixed precision"
    )
  (module, _), traced = traced_port(torch_model, example_input, **port_options)
  roots = []
  for train in (True, False):
    root = tree(traced.programs[train], traced.scopes[train])
    root.torch_class = type(torch_model)
    roots.append(root)
  classes = Classes(dict(traced.leaves))
  classes.build(*roots)
  inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
  examples = [(tuple(as_numpy(x).shape), str(as_numpy(x).dtype)) for x in inputs]
  text = linen_source.module_source(classes, type(torch_model), examples, versions())
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "model.py"
  path.write_text(_formatted(text))
  save_state_dict(torch_model, out / WEIGHTS)
  return path


def versions() -> str:
  found = []
  for package in ("torch", "torchvision", "timm", "jax", "flax", "jaxbn"):
    try:
      found.append(f"{package} {importlib.metadata.version(package)}")
    except importlib.metadata.PackageNotFoundError:
      pass
  return ", ".join(found)


def _formatted(text: str) -> str:
  """The project's form (pyink, 2-space indents, 120 columns) where pyink is installed."""
  try:
    import pyink
  except ImportError:
    return text
  mode = pyink.Mode(line_length=120, is_pyink=True, pyink_indentation=2, string_normalization=True)
  try:
    return pyink.format_str(text, mode=mode)
  except Exception as error:  # a bug here, not the user's: say so with the text
    raise PortError(f"emit wrote source that does not parse ({error}):\n{text}") from error
