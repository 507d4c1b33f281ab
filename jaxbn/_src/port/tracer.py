"""fx's tracer, taught four things the port needs.

1. Modules the tables (or the user) port as one piece stay whole.
2. A ``torch.autograd.Function`` stays one node: fx would otherwise inline its forward and lose
   its backward, a port with silently wrong gradients (unless the user names it in
   ``through_forward`` and its backward checks out as its forward's derivative: ``autograd.py``).
3. Python decisions on traced values (``if h % 2``, ``max(pad, 0)``, ``len(x)``, ``int(n)``,
   ``str(x.device)``) are taken on the example input's concrete values, where plain symbolic
   tracing fails. The torch model is run alongside the trace, lazily and in program order (as
   eager torch would), only as far as the first decision needs; every decision leaves a
   ``Guard`` node in the program that, when the ported model runs, checks the decision comes out
   the same at its input's shapes and refuses a decision on tensor values (which JAX cannot take
   under jit), unless ``branches.py`` merges both ways of it (``forced``: the decisions a second
   trace takes the other way). An assertion (``torch._check``) computed from sizes and constants
   alone is no decision on values: guards on the sizes it read stand in for it.
4. Calls of torch's factories that take sizes are nodes: ``torch.rand`` / ``randn`` whatever their
   arguments (a call run at trace time would freeze its draws into the program), ``zeros`` /
   ``ones`` / ``full`` / ``empty`` where a size is traced (sizes never reach fx's
   ``__torch_function__``: ``torch.zeros(n, c)`` with a traced ``n`` fails in torch's parser).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import torch
import torch.fx as fx
from torch.fx._symbolic_trace import _maybe_revert_all_patches

from jaxbn._src.errors import PortError
from jaxbn._src.port import autograd, ops
from jaxbn._src.port.leaves import TRACED_FORWARDS, TRACED_THROUGH

# "check": torch._check's condition, an assertion (bool) rather than a branch; "size": a shape
# (``x.shape``, ``x.size(1)``) an assertion computed from sizes alone was decided at
CONVERSIONS: dict[str, Callable[[Any], Any]] = {
    "bool": bool,
    "check": bool,
    "size": lambda size: tuple(size) if isinstance(size, tuple) else size,
    "len": len,
    "int": int,
    "float": float,
    "index": int,
}


def guard(value, expected, conversion: str, on_values: bool):
  """The fx node a Python decision leaves: ``CONVERSIONS[conversion](value)`` was ``expected``;
  ``on_values``: ``value`` was a tensor (a decision on data, which the port refuses), not a shape."""
  del value, conversion, on_values
  return expected


def input_name(target: str, static: dict) -> str:
  """The forward's name for a placeholder: fx renames a static input (``return_dict`` becomes
  ``return_dict_1``, guarded by an assert of its value)."""
  base, _, number = target.rpartition("_")
  return base if number.isdigit() and base in static else target


@dataclasses.dataclass(frozen=True)
class Guard:
  """A Python decision the trace took on the example input, checked again where the program runs."""

  conversion: str
  expected: Any
  where: str

  def __call__(self, value):
    if isinstance(value, (jax.Array, np.ndarray)) and self.conversion != "len":  # len(): a static shape
      raise PortError(
          f"{self.where}: Python {self.conversion}() of a tensor's values decides what runs (torch took the"
          f" branch for {self.expected!r} on the example input); a ported model cannot branch on traced values"
          " under jit. Rewrite the branch with torch.where, or port the module with"
          " custom_modules={TorchClass: factory}."
      )
    actual = CONVERSIONS[self.conversion](value)
    if actual != self.expected:
      raise PortError(
          f"{self.where}: the port specialised this Python branch to the example input's shapes"
          f" ({self.conversion}() was {self.expected!r} there, {actual!r} here). Port the model again with an"
          " example input of the shapes you apply it to."
      )
    return actual


def _reads_size(node: fx.Node) -> bool:
  """``x.shape``, ``x.ndim``, ``x.size(...)``, ``x.dim()``: a node whose value is a size."""
  if node.op == "call_method":
    return node.target in ("size", "dim")
  return node.op == "call_function" and node.target is getattr and node.args[1:2] in (("shape",), ("ndim",))


# torch's factories take sizes, not tensors, so fx's proxies never reach them through
# __torch_function__: the tracer records them itself (rand_like, bernoulli take a tensor and need not)
SIZED_RANDOM = ("rand", "randn")  # every call a node (constant draws would freeze into the program)
SIZED_FACTORIES = (*SIZED_RANDOM, "zeros", "ones", "full", "empty")  # the others: where a size is traced


COMPUTING = ("call_function", "call_method", "call_module")


class Tracer(fx.Tracer):
  """fx's symbolic tracer with leaf modules, autograd functions as nodes, and concrete decisions.

  ``examples``: the forward's inputs as torch tensors, for the decisions symbolic tracing
  cannot take; ``static``: keyword inputs held at a value (traced as fx's ``concrete_args``)."""

  def __init__(
      self,
      is_leaf: Callable[[torch.nn.Module], bool],
      examples: Sequence[torch.Tensor],
      static: dict | None = None,
      through_forward: tuple[type, ...] = (),
      forced: dict[int, bool] | None = None,
  ):
    super().__init__()
    self._forced = dict(forced or {})  # decisions on values taken the other way (branches.py), by order
    self._value_decisions = 0
    self._through_forward = tuple(through_forward)  # autograd Functions traced through their forward
    self._static = dict(static or {})  # keyword inputs held fixed (fx's concrete_args)
    self.record_stack_traces = True
    self.proxy_buffer_attributes = True  # a buffer read in forward is a node (its torch name), not a literal
    self._is_leaf = is_leaf
    self._examples = list(examples)
    self._values: dict[fx.Node, Any] = {}
    self._state: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # saved before torch first runs
    self._factories: dict[str, Callable] = {}  # torch's own, while trace() records their calls
    self.aliases: dict[fx.Node, tuple[bool, list[fx.Node]]] = {}  # x[i] = v: x a view?, what shares x's memory
    self._dead: set[fx.Node] = set()  # an assertion's arithmetic, erased after tracing where nothing else reads it

  def create_arg(self, a):
    # A dataclass holding traced values (transformers' ModelOutput, which fx would flatten into a
    # plain dict, or any other): one node that builds it, so the port returns the same class.
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
      fields = {f.name: getattr(a, f.name) for f in dataclasses.fields(a) if f.init}
      return self.create_node("call_function", output_class(type(a)), (), self.create_arg(fields))
    return super().create_arg(a)

  def is_leaf_module(self, module, qualified_name):
    if isinstance(module, TRACED_THROUGH) and not self._is_leaf(module):
      return False
    return self._is_leaf(module) or super().is_leaf_module(module, qualified_name)

  def call_module(self, m, forward, args, kwargs):
    try:
      self.path_of_module(m)
    except NameError:  # made in forward, not a submodule: a slice of one (``self.features[1:3]``), ``nn.ReLU()``
      installed = {id(t) for t in (*self.root.parameters(), *self.root.buffers())}
      own = [name for name, t in (*m.named_parameters(), *m.named_buffers()) if id(t) not in installed]
      if own:
        raise PortError(
            f"{type(m).__name__} is made in forward and holds tensors no torch path names ({', '.join(own)}):"
            " a state_dict cannot fill them; make it a submodule in __init__"
        ) from None
      return forward(*args, **kwargs)  # traced through: its layers are the model's own
    return super().call_module(m, forward, args, kwargs)

  def create_proxy(self, kind, target, args, kwargs, *rest, **more):
    if kind == "call_method" and target == "__setitem__" and not isinstance(args[0], fx.Proxy):
      if self._write_sizes(*args):
        return None  # torch's __setitem__ returns None
    proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
    if torch.is_grad_enabled() or kind not in COMPUTING or target in (autograd.no_grad_value, guard):
      return proxy
    # under torch.no_grad() in forward (trace() runs with grad on): torch's value has no gradient
    return self.create_proxy("call_function", autograd.no_grad_value, (proxy,), {})

  def _write_sizes(self, tensor: torch.Tensor, index, value) -> bool:
    """``t[i] = n`` into a tensor forward made from constant sizes (transformers' RT-DETR:
    ``spatial_shapes = torch.empty(...)``, then ``spatial_shapes[level, 0] = height``), where ``n``
    is a traced shape: decided on the example (a Guard where the port runs) and written into t as
    torch writes it, so that t stays a constant holding torch's values. A traced tensor written
    into a constant, or a write into a tensor a module holds, is left to the graph, which names
    it (False)."""
    values = [value, *(index if isinstance(index, tuple) else (index,))]
    traced = [v for v in values if isinstance(v, fx.Proxy)]
    held = any(t is tensor for module in self.root.modules() for t in vars(module).values())
    if held or any(isinstance(self.value(v.node), torch.Tensor) for v in traced):
      return False  # a module's own tensor (a cache the trace must not change), or a traced tensor
    decided = {id(v): self.decide(v, "int" if isinstance(self.value(v.node), int) else "float") for v in traced}
    concrete = [decided.get(id(v), v) for v in values]
    tensor[tuple(concrete[1:]) if isinstance(index, tuple) else concrete[1]] = concrete[0]
    return True

  def proxy(self, node: fx.Node) -> fx.Proxy:
    if node.op == "placeholder" and node.args == (None,) and self.value(node) is None:
      # an optional input the example leaves at None is None in forward, so that Python's
      # ``if pixel_mask is None:`` takes its branch (a proxy is never None); given later: refused
      return None
    return ConcreteProxy(node, self)

  def trace(self, root, concrete_args=None):
    original = torch.autograd.Function.__dict__["apply"]
    tracer = self

    def apply(cls, *args, **kwargs):
      if any(isinstance(a, fx.Proxy) for a in torch.utils._pytree.tree_leaves((args, kwargs))):
        if cls in tracer._through_forward:  # the user's claim, checked on the example's values
          values = [autograd.concrete(a, tracer) for a in args]
          with _maybe_revert_all_patches():
            autograd.check_backward(cls, original.__get__(None, cls), tuple(values), kwargs)
          return autograd.forward(cls, *args, **kwargs)
        return tracer.create_proxy("call_function", autograd_call(cls), args, kwargs)
      return original.__get__(None, cls)(*args, **kwargs)  # torch's own (a C classmethod)

    def drawing(factory):
      # a random call with constant sizes would otherwise run once, here, and its values would
      # become a literal of the program; a constant torch.zeros(6, 6) stays a constant
      @functools.wraps(factory)
      def draw(*args, **kwargs):
        traced = any(isinstance(a, fx.Proxy) for a in torch.utils._pytree.tree_leaves((args, kwargs)))
        if traced or factory.__name__ in SIZED_RANDOM:
          return tracer.create_proxy("call_function", factory, args, kwargs)
        return factory(*args, **kwargs)

      return draw

    def info(of):
      # torch.finfo(x.dtype) (a mask's fill value): the example's dtype, as torch's run has it
      @functools.wraps(of)
      def concrete(*args, **kwargs):
        return of(*(tracer.value(a.node) if isinstance(a, fx.Proxy) else a for a in args), **kwargs)

      return concrete

    def checked(check, position):
      # torch._check(cond) / torch._check_with(error, cond, ...) / torch._check_tensor_all[_with] (every
      # element; transformers' torch_compilable_check): a decision on the example, guarded where the port runs
      @functools.wraps(check)
      def concrete(*args, **kwargs):
        args = list(args)
        if len(args) > position and isinstance(args[position], fx.Proxy):
          every = check.__name__.startswith("_check_tensor_all")  # of a tensor's elements
          decided = tracer.decide(args[position].all() if every else args[position], "check")
          args[position] = torch.tensor(decided) if every else decided
        return check(*args, **kwargs)

      return concrete

    self._factories = {name: getattr(torch, name) for name in SIZED_FACTORIES}
    plain = plain_forward(type(root).forward) if isinstance(root, torch.nn.Module) else None
    torch_patches = {name: drawing(factory) for name, factory in self._factories.items()}
    torch_patches.update({name: info(getattr(torch, name)) for name in ("finfo", "iinfo")})
    torch_patches.update(
        {
            name: checked(getattr(torch, name), position)
            for name, position in (
                ("_check", 0),
                ("_check_with", 1),
                ("_check_tensor_all", 0),
                ("_check_tensor_all_with", 1),
            )
        }
    )
    try:
      with (
          patched(type(root), {"forward": plain} if plain is not None else {}),
          contextlib.ExitStack() as forwards,
          patched(torch.autograd.Function, {"apply": classmethod(apply)}),
          patched(torch, torch_patches),
          torch.enable_grad(),  # so that a torch.no_grad() in forward is the forward's (create_proxy)
      ):
        for cls, forward in TRACED_FORWARDS.items():
          forwards.enter_context(patched(cls, {"forward": forward}))
        graph = super().trace(root, concrete_args)
      for node in reversed(graph.nodes):
        if node in self._dead and not node.users:
          graph.erase_node(node)
      return graph
    finally:
      if self._state is not None:  # running the model updated its BatchNorm buffers: undo
        with torch.no_grad():
          for tensor, saved in self._state:
            tensor.copy_(saved)

  def close(self) -> None:
    """Drops what the tracer holds of torch's run (every value on the example, the saved state,
    the model), once its program is built: a proxy can outlive the trace in a cache of the
    model's code (transformers' RT-DETR: ``functools.lru_cache`` on its position embedding, keyed
    on traced sizes, kept up to 32 traces, each with its activations: 8 GB after one verify)."""
    self._values.clear()
    self._state = None
    self._examples = []
    self.root = None

  # Decisions: fx asks the tracer for bool() and iter(); the proxy for len(), int() and the rest.

  def to_bool(self, obj: fx.Proxy) -> bool:
    return self.decide(obj, "bool")

  def iter(self, obj: fx.Proxy):
    return iter([obj[i] for i in range(self.decide(obj, "len"))])

  def decide(self, obj: fx.Proxy, conversion: str):
    value = self.value(obj.node)
    expected = CONVERSIONS[conversion](value)
    on_values = isinstance(value, torch.Tensor) and conversion != "len"
    arithmetic = self._arithmetic(obj.node) if on_values and conversion == "check" else []
    if arithmetic and self._sizes_only(arithmetic):
      # an assertion computed from sizes and constants alone (transformers' deformable attention:
      # ``(spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum() == sequence_length``) holds wherever
      # the sizes it read are the example's: those are guarded, the assertion and its arithmetic dropped
      for read in arithmetic:
        if _reads_size(read):
          self.create_proxy("call_function", guard, (self.proxy(read), self.value(read), "size", False), {})
        else:
          self._dead.add(read)
      return expected
    if on_values:
      expected = self._forced.get(self._value_decisions, expected)
      self._value_decisions += 1
    self.create_proxy("call_function", guard, (obj, expected, conversion, on_values), {})
    return expected

  def _sizes_only(self, arithmetic: list[fx.Node]) -> bool:
    """Whether a computation (``_arithmetic``) reads nothing of an input's or the model's values:
    only sizes, tensor literals and pure ops on them."""
    state = {name for name, _ in itertools.chain(self.root.named_parameters(), self.root.named_buffers())}
    return all(
        _reads_size(read) or (ops.pure(read) and not (read.op == "get_attr" and read.target in state))
        for read in arithmetic
    )

  def _arithmetic(self, node: fx.Node) -> list[fx.Node]:
    """``node`` and what it is computed from, stopping at shape reads (``x.shape``, ``x.size()``,
    ``x.dim()``: included, not what they read)."""
    found, pending = {}, [node]
    while pending:
      read = pending.pop()
      if read not in found:
        found[read] = None
        if not _reads_size(read):
          pending.extend(read.all_input_nodes)
    return list(found)

  def value(self, node: fx.Node) -> Any:
    """``node``'s value on the examples: the program run up to it, in order, once."""
    if node not in self._values:
      if self._state is None:
        self._state = [(t, t.detach().clone()) for t in itertools.chain(self.root.parameters(), self.root.buffers())]
      # fx's patches (Module.__call__ records a node) undone while torch runs for real
      # (and torch's own factories: a layer's forward may call torch.zeros)
      with torch.no_grad(), _maybe_revert_all_patches(), patched(torch, self._factories):
        for pending in self.graph.nodes:
          if pending not in self._values:
            try:
              self._values[pending] = self._run(pending)
            except Exception as error:
              mode = "train" if self.root.training else "eval"
              raise PortError(
                  f"a Python decision in forward needs the model run on the example input, and torch's {mode}-mode"
                  f" forward failed at {pending.target}: {type(error).__name__}: {error}. Give port() an"
                  f" example input the model runs on in {mode} mode."
              ) from error
          if pending is node:
            break
    return self._values[node]

  def _run(self, node: fx.Node) -> Any:
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), self._values.__getitem__)
    if node.op == "placeholder":
      name = input_name(node.target, self._static)
      if name in self._static:
        return self._static[name]
      if node.target.startswith("*"):  # *args, **kwargs the example does not fill: empty
        return {} if node.target.startswith("**") else ()
      index = sum(
          1 for n in self._values if n.op == "placeholder" and input_name(n.target, self._static) not in self._static
      )
      if index < len(self._examples):
        return self._examples[index]
      if args:
        return args[0]
      raise PortError(
          f"the forward's input {node.target!r} has no example: give port() every input (keywords that choose"
          " what forward does, as static_inputs={name: value})"
      )
    if node.op == "get_attr":
      return functools.reduce(getattr, node.target.split("."), self.root)
    if node.op == "call_module":
      return self.root.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_method":
      return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_function":
      return node.target(*args, **kwargs)
    return None  # the output


@contextlib.contextmanager
def patched(owner, attributes: dict):
  """``owner``'s ``attributes`` set while inside, then as they were (an attribute the owner did
  not define itself, a class's inherited ``forward``, deleted again)."""
  missing = object()
  saved = {
      name: vars(owner).get(name, missing) if isinstance(owner, type) else getattr(owner, name) for name in attributes
  }
  for name, value in attributes.items():
    setattr(owner, name, value)
  try:
    yield
  finally:
    for name, value in saved.items():
      if value is missing:
        delattr(owner, name)
      else:
        setattr(owner, name, value)


class ConcreteProxy(fx.Proxy):
  """A proxy whose conversions to Python values are decisions on the example input."""

  def __len__(self):
    return self.tracer.decide(self, "len")

  def __int__(self):
    return self.tracer.decide(self, "int")

  def __index__(self):
    return self.tracer.decide(self, "index")

  def __float__(self):
    return self.tracer.decide(self, "float")

  def __setitem__(self, index, value):
    # ``y[:, 2::3] = y[:, 2::3].sigmoid()``: a node whose result the port binds to ``y``. Torch
    # writes into y's memory, which the port cannot do: a view of another tensor, or a tensor
    # another live value views, would see the write in torch only, so those are named (graph.py)
    node = self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {}).node
    target = self.tracer.value(self.node)
    self.tracer.value(node)  # torch writes, on the example, as it would
    self.tracer.aliases[node] = (
        target._is_view(),
        [
            other
            for other, v in self.tracer._values.items()
            if other is not self.node
            and isinstance(v, torch.Tensor)
            and v.untyped_storage().data_ptr() == target.untyped_storage().data_ptr()
        ],
    )

  def __call__(self, *args, **kwargs):
    # ``if callable(cond): cond = cond()`` (transformers' torch_compilable_check): every proxy is
    # callable, the value it stands for need not be; eager torch calls only a callable one
    if not args and not kwargs and not callable(self.tracer.value(self.node)):
      return self
    return super().__call__(*args, **kwargs)

  def keys(self):
    # a dict's keys are Python values fixed by the program (``**kwargs`` passed on to another call,
    # ``for key in outputs.keys()``): the traced ones, so that ``**d`` passes what the program reads
    value = self.tracer.value(self.node)
    return list(value) if isinstance(value, dict) else super().keys()

  def __getattr__(self, name):
    if name == "device":  # the port is device-agnostic: code keys caches on it (timm's levit)
      return self.tracer.value(self.node).device
    return ConcreteAttribute(self, name)


class ConcreteAttribute(fx.proxy.Attribute, ConcreteProxy):
  """``x.shape`` and the like: fx's lazy attribute, with the same decisions."""


def plain_forward(forward: Callable) -> Callable | None:
  """A decorated forward (transformers' ``@can_return_tuple``, ``wrapper(self, *args, **kwargs)``)
  as a plain function with the signature of the one it wraps, calling the decorated one; None if
  ``forward`` is not decorated. fx reads the wrapped signature (``inspect.unwrap``) but rewrites
  the wrapper's code to it where it takes ``*args`` / ``**kwargs``, which fails ("co_varnames is
  too small", "takes 2 positional arguments but 3 were given")."""
  inner = inspect.unwrap(forward)
  if inner is forward:
    return None
  parameters, call, defaults = [], [], []
  keyword_only = False
  for parameter in inspect.signature(inner).parameters.values():
    name, kind = parameter.name, parameter.kind
    if kind is parameter.KEYWORD_ONLY and not keyword_only:
      parameters.append("*")
    keyword_only |= kind in (parameter.KEYWORD_ONLY, parameter.VAR_POSITIONAL)
    if kind is parameter.VAR_POSITIONAL:
      parameters.append(f"*{name}")
      call.append(f"*{name}")
    elif kind is parameter.VAR_KEYWORD:
      parameters.append(f"**{name}")
      call.append(f"**{name}")
    else:
      if parameter.default is parameter.empty:
        parameters.append(name)
      else:
        parameters.append(f"{name}=_defaults[{len(defaults)}]")
        defaults.append(parameter.default)
      call.append(f"{name}={name}" if kind is parameter.KEYWORD_ONLY else name)
  namespace = {"_decorated": forward, "_defaults": defaults}
  exec(f"def forward({', '.join(parameters)}):\n  return _decorated({', '.join(call)})", namespace)  # noqa: S102
  plain = namespace["forward"]
  plain.__qualname__, plain.__module__ = forward.__qualname__, forward.__module__
  return plain


@functools.cache
def autograd_call(function: type) -> Callable:
  """The node target for a ``torch.autograd.Function`` subclass (fx names nodes by ``__name__``)."""

  def call(*args, **kwargs):
    return function.apply(*args, **kwargs)

  call.__name__ = call.__qualname__ = function.__name__
  call.autograd_function = function
  return call


@functools.cache
def output_class(cls: type) -> Callable:
  """The node target that builds a dataclass output (fx names nodes by ``__name__``)."""

  def build(**fields):
    return cls(**fields)

  build.__name__ = build.__qualname__ = cls.__name__
  build.output_class = cls
  return build
