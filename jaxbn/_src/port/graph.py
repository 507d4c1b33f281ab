"""A torch module as a program the Flax interpreter runs: torch.fx traces it (supported modules
stay whole), and each node becomes a hashable ``Node`` bound to its implementation, so the
ported module can be a static argument of ``jax.jit``. Every node without an implementation is
collected, with its module path and source line, into one ``PortError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from typing import Any

import jax
import numpy as np
import torch
import torch.fx as fx

from jaxbn._src.checkpoints.files import tensor_to_numpy
from jaxbn._src.checkpoints.recipe import TorchRecipe, torch_mode
from jaxbn._src.errors import PortError
from jaxbn._src.port import autocast, autograd, branches, ops
from jaxbn._src.port.leaves import Constant, Leaf, Metadata, Options, Tensor, class_name, find, rule
from jaxbn._src.port.tracer import Guard, Tracer, guard, input_name


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
  ``output``. ``rebinds``: the value an in-place op overwrites. ``module``: the dotted torch path of
  the stateless module an op runs for (``stages.1.pool``, a MaxPool2d), which emitted class names
  can say."""

  name: str
  kind: str
  target: Any
  args: tuple = ()
  kwargs: tuple = ()
  rebinds: str | None = None
  module: str | None = None


@dataclasses.dataclass(frozen=True)
class Program:
  nodes: tuple[Node, ...]

  @functools.cached_property
  def read(self) -> frozenset[str]:
    """The names of the nodes some node reads."""
    return frozenset(name for node in self.nodes for name in references((node.args, node.kwargs)))


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
  if isinstance(value, torch.dtype):
    return np.dtype(bool if value == torch.bool else str(value).removeprefix("torch."))
  if isinstance(value, (torch.device, torch.memory_format)):
    return None  # JAX places arrays itself; layouts are XLA's
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


def single_assignment(program: Program) -> Program:
  """The program with in-place ops as new values: a node that rebinds ``x`` makes later readers of
  ``x`` read the node instead, as the interpreter's environment does."""
  current: dict[str, str] = {}
  nodes = []
  for node in program.nodes:
    nodes.append(
        dataclasses.replace(
            node, args=_renamed(node.args, current), kwargs=_renamed(node.kwargs, current), rebinds=None
        )
    )
    if node.rebinds:
      current[node.rebinds] = node.name
  return Program(tuple(nodes))


def _renamed(value, current: dict[str, str]):
  if isinstance(value, Ref):
    return Ref(current.get(value.name, value.name))
  if isinstance(value, Slice):
    return Slice(*(_renamed(v, current) for v in (value.start, value.stop, value.step)))
  if isinstance(value, Aggregate):
    return dataclasses.replace(value, items=_renamed(value.items, current))
  if isinstance(value, tuple):
    return tuple(_renamed(v, current) for v in value)
  return value


# Frames of the tracing machinery (torch's, and the tracer's hooks and decisions), not the user's.
_INTERNAL = re.compile(
    r"[/\\]torch[/\\](fx|nn[/\\]modules[/\\]module\.py|_jit_internal|overrides\.py|nn[/\\]functional\.py)|jaxbn[/\\]_src[/\\]port[/\\]tracer\.py"
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
  stack = node.meta.get("nn_module_stack") or {}  # key -> (path, class); a key may be "path@N"
  return next(reversed(stack.values()))[0] if stack else ""


@dataclasses.dataclass
class Traced:
  programs: dict[bool, Program]  # by train mode
  leaves: dict[str, Leaf]  # dotted torch path -> Flax leaf
  problems: list[Problem]
  stateless: dict[str, str]  # dotted torch path -> class, of modules run as op calls
  scopes: dict[bool, dict[str, tuple[Scope, ...]]]  # by train mode: node name -> the calls it is inside
  held: tuple[str, ...] = ()  # torch paths of the tensors of modules neither forward calls, held as they are


@dataclasses.dataclass(frozen=True)
class Scope:
  """One module call a node runs inside: ``key`` tells repeated calls apart (``relu@1``)."""

  key: str
  path: str
  torch_class: type


def scope(node: fx.Node, leaves: set[str]) -> tuple[Scope, ...]:
  """The module calls (outermost first) that made a node. A call_module node is not inside itself,
  and nothing is inside a module called whole (``leaves``): what fx records while it makes that
  call (an argument's lazy ``x.data``, the tracer's ``no_grad`` detach of its output) is its caller's."""
  stack = [Scope(key, path, cls) for key, (path, cls) in (node.meta.get("nn_module_stack") or {}).items()]
  while stack and stack[-1].path in leaves:
    stack.pop()
  return tuple(stack)


def trace(
    model: torch.nn.Module,
    examples: tuple[torch.Tensor, ...],
    options: Options,
    modules: dict,
    custom_ops: dict,
    leaf_modules: tuple,
    recipe: TorchRecipe | None = None,
    static_inputs: dict | None = None,
    through_forward: tuple[type, ...] = (),
) -> Traced:
  """Both of the model's forwards (train and eval differ: aux heads, dropout) as programs.
  ``examples``: the forward's inputs, for the Python decisions fx cannot take symbolically.
  ``recipe``: the modules torch keeps in eval while it trains stay in eval in the train trace
  (dropout there drops nothing; code reading ``self.training`` takes its eval branch).
  ``static_inputs``: keyword inputs traced at a fixed value (``return_dict=False``).
  ``through_forward``: autograd Functions traced through their forward (``port``'s option)."""
  static_inputs = dict(static_inputs or {})

  def is_leaf(module):
    return isinstance(module, leaf_modules) or find(module, modules) is not None

  leaves: dict[str, Leaf] = {}
  stateless: dict[str, str] = {}
  problems: dict[Problem, None] = {}
  programs, scopes = {}, {}
  saved = _attributes(model)
  try:
    for train in (True, False):
      # the rules read module.training too (dropout's); the tracer drops torch's run when done (close)
      with (
          torch_mode(model, train, recipe),
          contextlib.closing(Tracer(is_leaf, examples, static_inputs, through_forward)) as tracer,
      ):
        untraced = _attributes(model)  # in this mode

        def retrace(forced):  # the trace with decisions on values taken the other way (branches.py)
          # from the model as this mode's trace found it (what a trace caches on modules is its own)
          _restore_keeping_literals(model, untraced)
          try:
            with contextlib.closing(Tracer(is_leaf, examples, static_inputs, through_forward, forced)) as other:
              return other.trace(model, concrete_args=static_inputs or None)
          finally:
            _restore_keeping_literals(model, untraced)

        try:
          graph = tracer.trace(model, concrete_args=static_inputs or None)
        except PortError:
          raise
        except Exception as error:  # data-dependent control flow and the like
          stack = list((getattr(tracer, "module_stack", None) or {}).values())
          where = stack[-1][0] if stack else ""
          owner = type(model.get_submodule(where)).__name__ if where else type(model).__name__
          raise PortError(
              f"torch.fx could not trace {where or 'the model'} ({owner}) in {'train' if train else 'eval'} mode:"
              f" {type(error).__name__}: {error}\nPort it as one piece: leaf_modules=({owner},) and"
              f" custom_modules={{{owner}: factory}} with a Flax module for it."
          ) from error
        branches.merged(graph, retrace, tracer.value, model)
        for node, what in _unsafe_writes(graph, tracer.aliases).items():
          problems[Problem(what, module_path(node), source_line(node))] = None
        programs[train] = Program(
            tuple(
                _node(node, model, options, modules, custom_ops, leaves, stateless, problems, static_inputs)
                for node in graph.nodes
            )
        )
        called_whole = {node.target for node in graph.nodes if node.op == "call_module"}
        scopes[train] = {node.name: scope(node, called_whole) for node in graph.nodes}
      # what this trace cached on modules (anchors, a shape: traced values) is the trace's own
      _restore(saved)
  finally:
    _restore(saved)
  return Traced(programs, leaves, list(problems), stateless, scopes)


def _restore_keeping_literals(model: torch.nn.Module, saved: list) -> None:
  """``_restore(saved)``, keeping the tensor literals fx stored on the root while tracing
  (``_tensor_constant0``): the programs traced so far read them, and the next trace names its own."""
  literals = {name: value for name, value in vars(model).items() if branches.literal_name(name)}
  _restore(saved)
  vars(model).update(literals)


def _attributes(model: torch.nn.Module) -> list:
  """Every module's attributes, and the contents of those that are dicts: tracing switches modes,
  fx stores tensor literals on the root, and modules fill caches (timm's attention-bias caches)."""
  return [
      (module, {name: (value, dict(value) if type(value) is dict else None) for name, value in vars(module).items()})
      for module in model.modules()
  ]


def _restore(saved: list) -> None:
  for module, attributes in saved:
    for name in set(vars(module)) - set(attributes):
      del vars(module)[name]
    for name, (value, contents) in attributes.items():
      vars(module)[name] = value
      if contents is not None:
        value.clear()
        value.update(contents)


def _node(node: fx.Node, model, options, modules, custom_ops, leaves, stateless, problems, static) -> Node:
  def problem(what):
    problems[Problem(what, module_path(node), source_line(node))] = None
    return Node(node.name, "unsupported", what)

  try:
    args = tuple(encode(a) for a in node.args)
    kwargs = tuple(sorted((k, encode(v)) for k, v in node.kwargs.items()))
  except TypeError:
    return problem(f"{node.op} {node.target}: a tensor constant in its arguments")
  if node.op == "placeholder":
    name = input_name(node.target, static)
    if name in static:  # the forward's own keyword, defaulting to its value (fx's assert checks others)
      return Node(node.name, "input", name, (encode(static[name]),))
    return Node(node.name, "input", node.target, args)
  if node.op == "output":
    return Node(node.name, "output", None, args)
  if node.op == "get_attr":
    return _tensor(node, model, options, modules, leaves, problem)
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
    return Node(node.name, "op", op, args, kwargs, _rebinds(node, inplace), node.target)
  key, inplace = ops.key_of(node), ops.writes_in_place(node)
  if node.op == "call_function":
    if isinstance(key, type) and issubclass(key, tuple) and hasattr(key, "_fields"):
      return Node(node.name, "op", ops.OpRule(Static(key)), args, kwargs)  # a namedtuple (GoogLeNetOutputs)
  if key is autograd.no_grad_value:  # computed under torch.no_grad() in forward
    return Node(node.name, "op", ops.OPS[torch.Tensor.detach], args, kwargs)
  if getattr(key, "output_class", None) is not None:  # a dataclass output (ModelOutput)
    return Node(node.name, "op", ops.OpRule(Static(as_pytree(key.output_class))), args, kwargs)
  readable = (*ops.TENSOR_ATTRIBUTES, *ops.RESULT_FIELDS)
  if key is getattr and len(node.args) > 1 and node.args[1] not in readable:
    return problem(f"reads .{node.args[1]} of a tensor (the port reads {', '.join(readable)})")
  if key is guard:
    _, expected, conversion, on_values = node.args
    if on_values:
      path = module_path(node)
      owner = type(model.get_submodule(path) if path else model).__name__
      if conversion == "check":
        return problem(
            f"torch._check on a tensor's values (an assertion), which JAX cannot evaluate under jit: check"
            f" it outside the model, or port {owner} as one piece: leaf_modules=({owner},) and"
            f" custom_modules={{{owner}: factory}}"
        )
      return problem(
          f"Python {conversion}() of a tensor's values decides what runs (a data-dependent branch), which JAX"
          f" cannot trace: rewrite it with torch.where, or port {owner} as one piece: leaf_modules=({owner},)"
          f" and custom_modules={{{owner}: factory}}"
      )
    return Node(node.name, "op", ops.OpRule(Guard(conversion, expected, source_line(node))), args[:1])
  function = getattr(key, "autograd_function", None)
  if function is not None:
    if function in custom_ops:
      return Node(node.name, "op", custom_ops[function], args, kwargs)
    short = function.__qualname__
    return problem(
        f"torch.autograd.Function {class_name(function)}: fx would trace its forward and lose its"
        f" backward; give custom_ops={{{short}: jax_function}} (apply's arguments; jax.custom_vjp for"
        f" its gradient), or, if its backward is its forward's derivative, through_forward=({short},)"
        " (checked on the example)"
    )
  op = custom_ops.get(key) or ops.OPS.get(key)
  if op is None:
    return problem(f"{'method' if node.op == 'call_method' else 'function'} {ops.name_of(key)}")
  if options.autocast is not None and key in autocast.COMPOSITE and key not in custom_ops:
    return problem(
        f"{autocast.COMPOSITE[key]} under autocast: torch casts each of the ops it is made of by its own"
        " list, which the port does not reproduce; port without autocast (float32, or the model in bfloat16)"
    )
  if key not in custom_ops:
    op = autocast.op(op, key, options.autocast)
  return Node(node.name, "op", op, args, kwargs, _rebinds(node, inplace))


def _unsafe_writes(graph: fx.Graph, aliases: dict) -> dict[fx.Node, str]:
  """``x[i] = v`` where torch's write into x's memory would reach another value the port keeps
  apart: x is a view of another tensor, or a value read later views x."""
  position = {node: i for i, node in enumerate(graph.nodes)}
  unsafe = {}
  for node, (is_view, sharing) in aliases.items():
    later = [other.name for other in sharing if any(position[user] > position[node] for user in other.users)]
    if is_view or later:
      whose = "a view of another tensor" if is_view else f"viewed by {', '.join(later)}, read later"
      unsafe[node] = (
          f"x[index] = value on a tensor {whose}: torch's write reaches the other through shared memory,"
          " which the port cannot reproduce; write to a copy (x = x.clone()) or build the result with torch.cat / torch.where"
      )
  return unsafe


def as_pytree(cls: type) -> type:
  """A dataclass output as a JAX pytree of its fields (in their order; ``None`` fields stay None),
  so that jit returns it; registered once, if JAX does not know the class yet."""
  names = [f.name for f in dataclasses.fields(cls) if f.init]
  try:
    jax.tree_util.register_pytree_node(
        cls, lambda value: ([getattr(value, n) for n in names], None), lambda _, items: cls(*items)
    )
  except ValueError:  # registered already (by an earlier port, or by the user)
    pass
  return cls


def _tensor(node: fx.Node, model, options, modules, leaves, problem) -> Node:
  """A tensor read directly in forward: a parameter or (persistent) buffer becomes a ``Tensor``
  leaf at its torch path; anything else (a non-persistent buffer, a literal) a constant."""
  owner_path, _, attribute = node.target.rpartition(".")
  owner = model.get_submodule(owner_path)
  array = tensor_to_numpy(getattr(owner, attribute))
  dtype = _port_dtype(array, options)
  # a module the program calls whole holds its tensors in its Flax layer; one it only reads
  # (MultiheadAttention's out_proj, read by the attention op) is its tensors
  if find(owner, modules) is not None and any(
      n.op == "call_module" and n.target == owner_path for n in node.graph.nodes
  ):
    if all(user.target is getattr and user.args[1] in ("shape", "ndim", "dtype") for user in node.users):
      return Node(node.name, "op", ops.OpRule(Metadata(tuple(array.shape), dtype.name)))
    return problem(
        f"reads {attribute} of {owner_path} ({class_name(type(owner))}), a module the port runs as one"
        " piece; call the module instead, or port the reading module with custom_modules"
    )
  in_state_dict = attribute in owner._parameters or (
      attribute in owner._buffers and attribute not in owner._non_persistent_buffers_set
  )
  if not in_state_dict:
    return Node(node.name, "op", ops.OpRule(Constant(array.tobytes(), array.shape, array.dtype.name, attribute)))
  leaves[node.target] = tensor_leaf(array, options, "params" if attribute in owner._parameters else "buffers")
  return Node(node.name, "module", node.target)


def _port_dtype(array: np.ndarray, options: Options) -> np.dtype:
  floating = np.issubdtype(array.dtype, np.floating)
  return np.dtype(options.param_dtype if floating else jax.dtypes.canonicalize_dtype(array.dtype))


def tensor_leaf(array: np.ndarray, options: Options, collection: str) -> Leaf:
  """A torch tensor held at its path (a parameter or buffer), in the port's dtype."""
  return Leaf(Tensor(tuple(array.shape), _port_dtype(array, options).name, collection))


def _rebinds(node: fx.Node, inplace: bool) -> str | None:
  first = node.args[0] if node.args else None
  return first.name if inplace and isinstance(first, fx.Node) else None
