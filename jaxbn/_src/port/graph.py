"""A torch module as a program the Flax interpreter runs: torch.fx traces it (supported modules
stay whole), and each node becomes a hashable ``Node`` bound to its implementation, so the
ported module can be a static argument of ``jax.jit``. Every node without an implementation is
collected, with its module path and source line, into one ``PortError``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch
import torch.fx as fx

from jaxbn._src.checkpoints.files import tensor_to_numpy
from jaxbn._src.errors import PortError
from jaxbn._src.port import autocast, ops
from jaxbn._src.port.leaves import Constant, Leaf, Options, Tensor, class_name, find, rule


@dataclasses.dataclass(frozen=True)
class Ref:
  """The value another node computed."""

  name: str


class Static:
  """A class as a field value, compared by identity and opaque to the fingerprint Flax's lifted
  transforms (nn.jit, nn.remat) take of module fields, which recurses forever into ``tuple``."""

  __slots__ = ("value",)

  def __init__(self, value: type):
    self.value = value

  def __eq__(self, other):
    return isinstance(other, Static) and other.value is self.value

  def __hash__(self):
    return hash(self.value)

  def __call__(self, *args, **kwargs):
    return self.value(*args, **kwargs)

  def __repr__(self):
    return f"Static({self.value.__qualname__})"


@dataclasses.dataclass(frozen=True)
class Aggregate:
  """A list, tuple, namedtuple or dict of arguments (kept hashable, rebuilt on use)."""

  kind: Static
  items: tuple
  keys: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Slice:
  start: Any
  stop: Any
  step: Any


@dataclasses.dataclass(frozen=True)
class Node:
  """One step: ``input`` (target: the argument's name, ``args``: its default if any), ``module``
  (target: the dotted torch path of a Flax leaf), ``op`` (target: an ``ops.OpRule``) or
  ``output``. ``rebinds``: the value an in-place op overwrites."""

  name: str
  kind: str
  target: Any
  args: tuple = ()
  kwargs: tuple = ()
  rebinds: str | None = None


@dataclasses.dataclass(frozen=True)
class Program:
  nodes: tuple[Node, ...]


@dataclasses.dataclass(frozen=True)
class Problem:
  what: str
  path: str
  where: str

  def __str__(self):
    return f"{self.what}  [in {self.path or '<top>'}{', ' + self.where if self.where else ''}]"


def encode(value) -> Any:
  """fx arguments -> hashable values: nodes by name, containers and slices as records."""
  if isinstance(value, fx.Node):
    return Ref(value.name)
  if isinstance(value, slice):
    return Slice(encode(value.start), encode(value.stop), encode(value.step))
  if isinstance(value, dict):
    kind = dict if type(value) is fx.immutable_collections.immutable_dict else type(value)
    return Aggregate(Static(kind), tuple(encode(v) for v in value.values()), tuple(value.keys()))
  if isinstance(value, (list, tuple)):
    kind = {fx.immutable_collections.immutable_list: list}.get(type(value), type(value))
    return Aggregate(Static(kind), tuple(encode(v) for v in value))
  if isinstance(value, torch.Tensor):
    raise TypeError("tensor constant")
  return value


def decode(value, env: dict) -> Any:
  if isinstance(value, Ref):
    return env[value.name]
  if isinstance(value, Slice):
    return slice(decode(value.start, env), decode(value.stop, env), decode(value.step, env))
  if isinstance(value, Aggregate):
    items = [decode(v, env) for v in value.items]
    kind = value.kind.value
    if value.keys is not None:
      return kind(zip(value.keys, items, strict=True))
    if hasattr(kind, "_fields"):  # a namedtuple
      return kind(*items)
    return kind(items)
  if isinstance(value, tuple):
    return tuple(decode(v, env) for v in value)
  return value


def references(value) -> list[str]:
  """The names of the nodes an encoded argument reads."""
  if isinstance(value, Ref):
    return [value.name]
  if isinstance(value, Slice):
    return references((value.start, value.stop, value.step))
  if isinstance(value, Aggregate):
    value = value.items
  if isinstance(value, tuple):
    return [name for item in value for name in references(item)]
  return []


# Frames of the tracing machinery (torch's, and this file's autograd.Function hook), not the user's.
_INTERNAL = re.compile(
    r"[/\\]torch[/\\](fx|nn[/\\]modules[/\\]module\.py|_jit_internal|overrides\.py|nn[/\\]functional\.py)|jaxbn[/\\]_src[/\\]port[/\\]graph\.py"
)


def source_line(node: fx.Node) -> str:
  """``file.py:12: code`` of the user's line that made the node."""
  frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', node.stack_trace or "")
  frames = [f for f in frames if not _INTERNAL.search(f[0])]
  if not frames:
    return ""
  file, line, code = frames[-1]
  return f"{file.rsplit('/', 1)[-1]}:{line}: {code.strip()}"


def module_path(node: fx.Node) -> str:
  if node.op == "call_module":
    return node.target
  stack = node.meta.get("nn_module_stack") or {}
  return next(reversed(stack), "") if stack else ""


class Tracer(fx.Tracer):
  """fx's tracer that keeps whole every module the tables (or the user) port as one piece, and
  every ``torch.autograd.Function`` as one node: fx would otherwise inline its forward and lose
  its backward, a port with silently wrong gradients."""

  def __init__(self, is_leaf: Callable[[torch.nn.Module], bool]):
    super().__init__()
    self.record_stack_traces = True
    self.proxy_buffer_attributes = True  # a buffer read in forward is a node (its torch name), not a literal
    self._is_leaf = is_leaf

  def is_leaf_module(self, module, qualified_name):
    return self._is_leaf(module) or super().is_leaf_module(module, qualified_name)

  def trace(self, root, concrete_args=None):
    original = torch.autograd.Function.__dict__["apply"]
    tracer = self

    def apply(cls, *args, **kwargs):
      if any(isinstance(a, fx.Proxy) for a in torch.utils._pytree.tree_leaves((args, kwargs))):
        return tracer.create_proxy("call_function", autograd_call(cls), args, kwargs)
      return original.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)
    try:
      return super().trace(root, concrete_args)
    finally:
      torch.autograd.Function.apply = original


@functools.cache
def autograd_call(function: type) -> Callable:
  """The node target for a ``torch.autograd.Function`` subclass (fx names nodes by ``__name__``)."""

  def call(*args, **kwargs):
    return function.apply(*args, **kwargs)

  call.__name__ = call.__qualname__ = function.__name__
  call.autograd_function = function
  return call


@dataclasses.dataclass
class Traced:
  programs: dict[bool, Program]  # by train mode
  leaves: dict[str, Leaf]  # dotted torch path -> Flax leaf
  problems: list[Problem]
  stateless: dict[str, str]  # dotted torch path -> class, of modules run as op calls


def trace(model: torch.nn.Module, options: Options, modules: dict, custom_ops: dict, leaf_modules: tuple) -> Traced:
  """Both of the model's forwards (train and eval differ: aux heads, dropout) as programs."""

  def is_leaf(module):
    return isinstance(module, leaf_modules) or find(module, modules) is not None

  leaves: dict[str, Leaf] = {}
  stateless: dict[str, str] = {}
  problems: dict[Problem, None] = {}
  programs = {}
  modes = {module: module.training for module in model.modules()}  # each restored, not just the root's
  attributes = set(vars(model))  # fx stores tensor literals on the root as _tensor_constantN
  try:
    for train in (True, False):
      model.train(train)
      tracer = Tracer(is_leaf)
      try:
        graph = tracer.trace(model)
      except Exception as error:  # data-dependent control flow and the like
        stack = list(getattr(tracer, "module_stack", {}) or {})
        where = stack[-1] if stack else ""
        owner = type(model.get_submodule(where)).__name__ if where else type(model).__name__
        raise PortError(
            f"torch.fx could not trace {where or 'the model'} ({owner}) in {'train' if train else 'eval'} mode:"
            f" {type(error).__name__}: {error}\nPort it as one piece: leaf_modules=({owner},) and"
            f" custom_modules={{{owner}: factory}} with a Flax module for it."
        ) from error
      programs[train] = Program(
          tuple(_node(node, model, options, modules, custom_ops, leaves, stateless, problems) for node in graph.nodes)
      )
  finally:
    for module, training in modes.items():
      module.training = training
    for name in set(vars(model)) - attributes:
      delattr(model, name)
  return Traced(programs, leaves, list(problems), stateless)


def _node(node: fx.Node, model, options, modules, custom_ops, leaves, stateless, problems) -> Node:
  def problem(what):
    problems[Problem(what, module_path(node), source_line(node))] = None
    return Node(node.name, "unsupported", what)

  try:
    args = tuple(encode(a) for a in node.args)
    kwargs = tuple(sorted((k, encode(v)) for k, v in node.kwargs.items()))
  except TypeError:
    return problem(f"{node.op} {node.target}: a tensor constant in its arguments")
  if node.op == "placeholder":
    return Node(node.name, "input", node.target, args)
  if node.op == "output":
    return Node(node.name, "output", None, args)
  if node.op == "get_attr":
    return _tensor(node, model, options, modules, leaves, problem)
  inplace = node.kwargs.get("inplace") is True
  if node.op == "call_module":
    module = model.get_submodule(node.target)
    made = rule(module, options, modules)
    if made is None:
      return problem(f"module {class_name(type(module))}")
    inplace = getattr(module, "inplace", False) is True
    if isinstance(made, Leaf):
      leaves[node.target] = autocast.leaf(made, type(module), options.autocast)
      return Node(node.name, "module", node.target, args, kwargs, _rebinds(node, inplace))
    stateless[node.target] = class_name(type(module))
    key, kwargs = made.op, made.kwargs + kwargs
    # a table op (with torch.autocast's casts, if asked), or a custom_modules function
    op = autocast.op(ops.OPS[key], key, options.autocast) if key in ops.OPS else ops.OpRule(key)
    return Node(node.name, "op", op, args, kwargs, _rebinds(node, inplace))
  elif node.op == "call_method":
    key = getattr(torch.Tensor, node.target, node.target)
    inplace = node.target.endswith("_") and not node.target.endswith("__")
  else:
    key = node.target
    if isinstance(key, type) and issubclass(key, tuple) and hasattr(key, "_fields"):
      return Node(node.name, "op", ops.OpRule(Static(key)), args, kwargs)  # a namedtuple (GoogLeNetOutputs)
  if key is getattr and len(node.args) > 1 and node.args[1] not in ops.TENSOR_ATTRIBUTES:
    return problem(f"reads .{node.args[1]} of a tensor (the port reads {', '.join(ops.TENSOR_ATTRIBUTES)})")
  function = getattr(key, "autograd_function", None)
  if function is not None:
    if function in custom_ops:
      return Node(node.name, "op", custom_ops[function], args, kwargs)
    short = function.__qualname__
    return problem(
        f"torch.autograd.Function {class_name(function)}: fx would trace its forward and lose its"
        f" backward; give custom_ops={{{short}: jax_function}} (apply's arguments; jax.custom_vjp for"
        " its gradient)"
    )
  op = custom_ops.get(key) or ops.OPS.get(key)
  if op is None:
    return problem(f"{'method' if node.op == 'call_method' else 'function'} {ops.name_of(key)}")
  if key not in custom_ops:
    op = autocast.op(op, key, options.autocast)
  return Node(node.name, "op", op, args, kwargs, _rebinds(node, inplace))


def _tensor(node: fx.Node, model, options, modules, leaves, problem) -> Node:
  """A tensor read directly in forward: a parameter or (persistent) buffer becomes a ``Tensor``
  leaf at its torch path; anything else (a non-persistent buffer, a literal) a constant."""
  owner_path, _, attribute = node.target.rpartition(".")
  owner = model.get_submodule(owner_path)
  value = getattr(owner, attribute)
  if find(owner, modules) is not None:
    return problem(
        f"reads {attribute} of {owner_path} ({class_name(type(owner))}), a module the port runs as one"
        " piece; call the module instead, or port the reading module with custom_modules"
    )
  array = tensor_to_numpy(value)
  in_state_dict = attribute in owner._parameters or (
      attribute in owner._buffers and attribute not in owner._non_persistent_buffers_set
  )
  if not in_state_dict:
    return Node(node.name, "op", ops.OpRule(Constant(array.tobytes(), array.shape, array.dtype.name)))
  floating = np.issubdtype(array.dtype, np.floating)
  dtype = np.dtype(options.param_dtype if floating else jax.dtypes.canonicalize_dtype(array.dtype))
  collection = "params" if attribute in owner._parameters else "buffers"
  leaves[node.target] = Leaf(Tensor(tuple(array.shape), dtype.name, collection))
  return Node(node.name, "module", node.target)


def _rebinds(node: fx.Node, inplace: bool) -> str | None:
  first = node.args[0] if node.args else None
  return first.name if inplace and isinstance(first, fx.Node) else None
