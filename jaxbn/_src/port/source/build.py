"""A traced model as the text of ``model.py`` (``jaxbn.emit``), or as live NNX classes
(``jaxbn.port(api="nnx")``)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import linecache
import pathlib
import tempfile
from typing import Any

import jax
import numpy as np
import torch

from jaxbn._src.checkpoints.files import as_numpy, save_state_dict
from jaxbn._src.errors import PortError
from jaxbn._src.port import layout as layouts
from jaxbn._src.port.graph import Program, Traced, references
from jaxbn._src.port.recipe import TrainingRecipe
from jaxbn._src.port.source import linen, nnx
from jaxbn._src.port.source.classes import Classes
from jaxbn._src.port.source.tree import inline_where_inputs_differ, tree
from jaxbn._src.port.tracer import Guard

LAYOUTS = ("NCHW", "NHWC")


def model_source(
    traced: Traced,
    torch_model: torch.nn.Module,
    example_input: Any,
    api: str,
    recipe: TrainingRecipe | None = None,
    layout: str = "NCHW",
) -> tuple[str, str, dict]:
  """``(text, name of the model's class, constants)``: the traced model as Flax ``api`` source,
  and the tensors too large to write into it (``constants.safetensors``, which the text loads).
  ``recipe``: torch's training recipe, written as editable lists the model uses. ``layout``:
  ``"NCHW"`` (torch's, with jaxbn's torch-layout layers) or ``"NHWC"`` (channels-last, with
  Flax's own layers: ``layout.py``)."""
  if layout not in LAYOUTS:
    raise ValueError(f"emit: layout must be one of {LAYOUTS}, not {layout!r}")
  inputs = tuple(as_numpy(x) for x in (example_input if isinstance(example_input, (tuple, list)) else (example_input,)))
  axes = None
  if layout == "NHWC":
    channels_last = layouts.rewrite(traced, inputs)
    traced, axes = channels_last.traced, channels_last
    inputs = tuple(x if a is None else np.transpose(x, a) for x, a in zip(inputs, axes.input_axes, strict=True))
  roots = []
  for train in (True, False):
    program, scopes = _held_inside(traced.programs[train], traced.scopes[train], set(traced.held))
    root = tree(_signature_read(program), scopes)
    root.torch_class = type(torch_model)
    roots.append(root)
  inline_where_inputs_differ(*roots)
  module_at = torch_model.get_submodule
  if api == "nnx":
    classes = Classes(
        dict(traced.leaves), nnx.layer_fields(torch_model), frozenset(traced.held), module_at, layout == "NCHW"
    )
    classes.build(*roots)
    text, name, constants = nnx.module_source(classes, type(torch_model), versions(), recipe, axes)
  else:
    classes = Classes(
        dict(traced.leaves), held=frozenset(traced.held), module_at=module_at, torch_order=layout == "NCHW"
    )
    classes.build(*roots)
    # the dtype JAX makes of it (int64 is int32 without jax_enable_x64)
    examples = [(tuple(x.shape), str(jax.dtypes.canonicalize_dtype(x.dtype))) for x in inputs]
    text, name, constants = linen.module_source(classes, type(torch_model), examples, versions(), recipe, axes)
  return formatted(text), name, constants


def _held_inside(program: Program, scopes: dict, held: set[str]) -> tuple[Program, dict]:
  """The program with each tensor of a module forward never calls (the port holds it: a node at the
  program's end) moved into the call of its nearest ancestor that forward calls, so that the
  source declares it in that class, at torch's path below it (``denoising_class_embed.weight``)."""
  if not held:
    return program, scopes
  kept = [node for node in program.nodes if not (node.kind == "module" and node.target in held)]
  ends = {}  # a module forward calls (its first call) -> (the calls its nodes are inside, its last node)
  for index, node in enumerate(kept):
    inside = scopes.get(node.name, ())
    for depth, scope in enumerate(inside):
      if "@" not in scope.key:
        ends[scope.path] = (inside[: depth + 1], index)
  scopes = dict(scopes)
  after: dict[int, list] = {}
  for node in program.nodes:
    if node.kind == "module" and node.target in held:
      owner = max((path for path in ends if node.target.startswith(path + ".")), key=len, default=None)
      # after its ancestor's last node, so that the call's nodes stay contiguous; the model's own: last
      scopes[node.name], last = ends[owner] if owner is not None else ((), len(kept) - 2)
      after.setdefault(last, []).append(node)
  nodes = [x for index, node in enumerate(kept) for x in (node, *after.get(index, ()))]
  return dataclasses.replace(program, nodes=tuple(nodes)), scopes


def _signature_read(program: Program) -> Program:
  """The program without the optional inputs it never reads but in the guards of Python branches
  (``return_dict=None`` that a branch was specialised on, an empty ``**kwargs``): left out of the
  source's signature with those guards, so that Python refuses them where the code would ignore them."""
  guards = {node.name for node in program.nodes if node.kind == "op" and isinstance(node.target.fn, Guard)}
  read = {name for node in program.nodes if node.name not in guards for name in references((node.args, node.kwargs))}
  unread = {
      node.name
      for node in program.nodes
      if node.kind == "input" and node.name not in read and (node.args or node.target.startswith("*"))
  }
  checks = {node.name for node in program.nodes if node.name in guards and set(references(node.args)) <= unread}
  return Program(tuple(node for node in program.nodes if node.name not in unread | checks))


def write(directory: pathlib.Path, text: str, constants: dict) -> pathlib.Path:
  """``directory/model.py`` and, where the model has large constants, ``constants.safetensors``."""
  directory.mkdir(parents=True, exist_ok=True)
  if constants:
    save_state_dict(constants, directory / linen.CONSTANTS_FILE)
  path = directory / "model.py"
  path.write_text(text)
  return path


def load_classes(text: str, name: str, constants: dict) -> dict:
  """Runs generated source as a module of its own, its namespace. Its constants are read from a
  temporary directory while the module runs, which is then removed; its lines stay in linecache
  (an entry without a modification time, which ``linecache.checkcache`` keeps), so tracebacks and
  ``inspect.getsource`` of its methods show them."""
  with tempfile.TemporaryDirectory(prefix="jaxbn-port-") as directory:
    filename = str(write(pathlib.Path(directory), text, constants))
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    namespace = {"__name__": f"jaxbn_port_{name}", "__file__": filename}
    exec(compile(text, filename, "exec"), namespace)  # noqa: S102 (jaxbn's own generated source)
  return namespace


def versions() -> str:
  found = []
  for package in ("torch", "torchvision", "timm", "jax", "flax", "jaxbn"):
    try:
      found.append(f"{package} {importlib.metadata.version(package)}")
    except importlib.metadata.PackageNotFoundError:
      pass
  return ", ".join(found)


def formatted(text: str) -> str:
  """The project's form (pyink, 2-space indents, 120 columns) where pyink is installed."""
  try:
    import pyink
  except ImportError:
    return text
  mode = pyink.Mode(line_length=120, is_pyink=True, pyink_indentation=2, string_normalization=True)
  try:
    return pyink.format_str(text, mode=mode)
  except Exception as error:  # a bug of the emitter's, not the user's: say so with the text
    raise PortError(f"emit wrote source that does not parse ({error}):\n{text}") from error
