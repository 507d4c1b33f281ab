"""A traced program in channels-last layout: ``jaxbn.emit(layout="NHWC")``.

torch computes images as NCHW; a Flax engineer writes NHWC, the layout XLA's convolutions want.
This pass rewrites a traced program so that each value is torch's value with its axes permuted
(``Axes``: JAX axis ``i`` holds torch's axis ``perm[i]``): images are channels-last from the input
on, convolutions, dense layers and BatchNorm are Flax's channels-last layers (``flax.linen.Conv``,
``flax.linen.Dense``, ``jaxbn.BatchNorm(axis=-1)``) holding the same variables, and every op's
axes (concatenation, reduction, reshape and flatten order, indexing, pooling, padding,
interpolation, ``x.shape[1]``) are rewritten for the layout its input has. A ``permute`` costs
nothing (the array stays, its layout changes). Where torch's order decides the result (a flatten
of channels and space, whose order the next Linear's weights are in) or an op has no rule here, the
value is transposed there to the layout the op needs, so the program computes torch's values.

Each op's rule is one small function in ``RULES`` (keyed by the op table's function), each
layer's in ``LAYERS`` (keyed by the port's Linen layer class).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._src.errors import PortError
from jaxbn._src.linen.batch_norm import BatchNorm
from jaxbn._src.linen.folded import FoldedBatchNorm
from jaxbn._src.linen.frozen import FrozenBatchNorm
from jaxbn._src.port import interpreter
from jaxbn._src.port.graph import Aggregate, Node, Program, Ref, Slice, Static, Traced, single_assignment
from jaxbn._src.port.leaves import Conv, ConvTranspose, GroupNorm, LayerNorm, Leaf, Linear
from jaxbn._src.port.tracer import Guard
from jaxbn._src.torchlike import functional as ops
from jaxbn._src.torchlike.compute import per_axis

Perm = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Axes:
  """An array's layout: JAX's axis ``i`` is torch's axis ``perm[i]``."""

  perm: Perm


@dataclasses.dataclass(frozen=True)
class ShapeAxes:
  """A shape tuple's layout (``x.shape`` of an array held in ``perm``): entry ``i`` is torch's
  entry ``perm[i]``."""

  perm: Perm


def identity(rank: int) -> Perm:
  return tuple(range(rank))


def channels_last(rank: int) -> Perm:
  """NHWC for NCHW (and NLC, NDHWC): the channel axis, torch's 1, last."""
  return (0, *range(2, rank), 1) if rank >= 3 else identity(rank)


@dataclasses.dataclass(frozen=True)
class ChannelsLast:
  """The pass's result: the rewritten model, and how its inputs and outputs relate to torch's.

  ``input_axes``: per input, the axes that make it from torch's (``jnp.transpose(x, axes)``), or
  None for a value taken as torch's; ``output_axes``: by mode, per output leaf (JAX's order), the
  axes that make it from torch's."""

  traced: Traced
  input_axes: tuple[Perm | None, ...]
  output_axes: dict[bool, tuple[Perm | None, ...]]


def torch_values(traced: Traced, inputs: tuple) -> dict[bool, dict[str, Any]]:
  """Every node's value (arrays as ``jax.ShapeDtypeStruct``, in torch's layout) in each mode, from
  the ported program run under ``jax.eval_shape`` on the example's shapes."""
  module = interpreter.Ported(traced.programs[True], traced.programs[False], tuple(sorted(traced.leaves.items())))
  arrays = [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in inputs]
  variables = jax.eval_shape(lambda *xs: module.init(jax.random.key(0), *xs), *arrays)
  values = {}
  for train in (True, False):
    with interpreter.recording() as recorded:
      jax.eval_shape(
          lambda v, *xs, train=train: module.apply(
              v, *xs, train=train, mutable=True, rngs={"dropout": jax.random.key(0)}
          ),
          variables,
          *arrays,
      )
    values[train] = recorded
  return values


def rewrite(traced: Traced, inputs: tuple, outputs_as_torch: bool = False) -> ChannelsLast:
  """``traced`` in channels-last layout: floating inputs of rank 3 to 5 are taken channels-last
  (NLC, NHWC, NDHWC), other inputs as torch's. ``outputs_as_torch``: the outputs transposed back
  to torch's layout (else each stays in the layout it was computed in)."""
  values = torch_values(traced, inputs)
  leaves = dict(traced.leaves)
  programs, scopes, output_axes = {}, {}, {}
  input_axes = None
  for train in (True, False):
    rewriter = Rewriter(values[train], traced.leaves, leaves, traced.scopes[train])
    programs[train], axes_in, output_axes[train] = rewriter.run(
        single_assignment(traced.programs[train]), outputs_as_torch
    )
    scopes[train] = rewriter.scopes
    input_axes = input_axes or axes_in[: len(inputs)]  # optional inputs past the example's keep their defaults
  rewritten = dataclasses.replace(traced, programs=programs, leaves=leaves, scopes=scopes)
  return ChannelsLast(rewritten, input_axes, output_axes)


# --- the rewriter --------------------------------------------------------------------------------


class Rewriter:
  """One program's pass: each node rewritten by its rule, in program order, with the layouts of
  the values it reads; nodes the rules add (transposes) go into the scope of the node they serve."""

  def __init__(self, values: dict[str, Any], original: dict[str, Leaf], leaves: dict[str, Leaf], scopes: dict):
    self.values = dict(values)  # node name -> torch's value (shapes), for nodes added here too
    self.original = original  # path -> the port's Leaf (torch's layout), what the rules read
    self.leaves = leaves  # path -> Leaf, rewritten in place (shared by both modes)
    self.scopes = dict(scopes)
    self.layouts: dict[str, Any] = {}
    self.nodes: list[Node] = []
    self.scope: tuple = ()
    self._converted: dict[tuple[str, Perm], str] = {}
    self._taken = set(values) | set(scopes)

  def run(self, program: Program, outputs_as_torch: bool):
    self._taken |= {node.name for node in program.nodes}
    input_axes = []
    for node in program.nodes:
      self.scope = self.scopes.get(node.name, ())
      if node.kind == "input":
        layout = self._input_layout(node, program)
        input_axes.append(layout.perm if isinstance(layout, Axes) else None)
        self.layouts[node.name] = layout
        self.nodes.append(node)
      elif node.kind == "output":
        args = self.as_torch(node.args) if outputs_as_torch else node.args
        self.nodes.append(dataclasses.replace(node, args=args))
        output = _layouts(args[0], self.layouts)
      elif node.kind == "module":
        self.layouts[node.name] = self._module(node)
      else:
        fn = node.target.fn
        rule = RULES.get(type(fn)) if isinstance(fn, (Guard, Static)) else RULES.get(fn)
        self.layouts[node.name] = (rule or fallback)(self, node)
    return Program(tuple(self.nodes)), tuple(input_axes), tuple(_flattened(output))

  # --- what rules use ----------------------------------------------------------------------------

  def layout(self, value) -> Any:
    return self.layouts.get(value.name) if isinstance(value, Ref) else None

  def perm(self, value) -> Perm | None:
    layout = self.layout(value)
    return layout.perm if isinstance(layout, Axes) else None

  def shape(self, value) -> tuple:
    """torch's shape of an array value."""
    return tuple(self.values[value.name].shape)

  def emit(self, node: Node, layout) -> Any:
    self.nodes.append(node)
    self.layouts[node.name] = layout
    return layout

  def add(self, base: str, fn: Callable, args: tuple, kwargs: tuple = (), *, layout=None, value=None) -> Ref:
    """A new op node in the current scope; its value's layout and torch's value."""
    name, count = base, 0
    while name in self._taken:
      count += 1
      name = f"{base}_{count}"
    self._taken.add(name)
    self.nodes.append(Node(name, "op", ops.OpRule(fn), tuple(args), tuple(kwargs)))
    self.scopes[name] = self.scope
    self.layouts[name] = layout
    self.values[name] = value
    return Ref(name)

  def to(self, value: Ref, perm: Perm) -> Ref:
    """``value`` (an array) held in ``perm``: itself, or a transpose of it (one per value and layout)."""
    current = self.perm(value)
    if current is None or current == perm:
      return value
    key = (value.name, perm)
    if key not in self._converted:
      axes = tuple(current.index(axis) for axis in perm)
      made = self.add(
          f"{value.name}_t", jnp.transpose, (value, _tuple(axes)), layout=Axes(perm), value=self.values[value.name]
      )
      self._converted[key] = made.name
    return Ref(self._converted[key])

  def as_torch(self, argument):
    """An encoded argument with every value it reads in torch's layout (arrays transposed, shape
    tuples reordered)."""
    if isinstance(argument, Ref):
      layout = self.layout(argument)
      if isinstance(layout, Axes):
        return self.to(argument, identity(len(layout.perm)))
      if isinstance(layout, ShapeAxes) and layout.perm != identity(len(layout.perm)):
        order = _tuple(tuple(layout.perm.index(axis) for axis in range(len(layout.perm))))
        return self.add(f"{argument.name}_torch", ops.reordered, (argument, order), value=self.values[argument.name])
      if not _is_identity(layout):
        raise PortError(
            f"emit(layout='NHWC'): {argument.name} holds values in a layout an op here takes only as torch's;"
            " emit with layout='NCHW'"
        )
      return argument
    if isinstance(argument, Aggregate):
      return dataclasses.replace(argument, items=tuple(self.as_torch(item) for item in argument.items))
    if isinstance(argument, Slice):
      return Slice(*(self.as_torch(v) for v in (argument.start, argument.stop, argument.step)))
    if isinstance(argument, tuple):
      return tuple(self.as_torch(item) for item in argument)
    return argument

  def expanded(self, value: Ref, rank: int, perm: Perm) -> Ref:
    """A lower-rank operand of a broadcasting op as an array of ``rank`` axes held in ``perm``
    (torch's broadcasting aligns it to the right)."""
    own = len(self.shape(value))
    shape = (1,) * (rank - own) + self.shape(value)
    if sum(1 for n in shape if n != 1) <= 1:  # a per-channel vector (C, 1, 1): one reshape
      target = tuple(-1 if shape[a] != 1 else 1 for a in perm)
      made = jax.ShapeDtypeStruct(shape, self.values[value.name].dtype)
      return self.add(f"{value.name}_r", jnp.reshape, (value, _tuple(target)), layout=Axes(perm), value=made)
    torch_order = self.to(value, identity(own))
    grown = self.add(
        f"{value.name}_r",
        jnp.expand_dims,
        (torch_order, _tuple(tuple(range(rank - own)))),
        layout=Axes(identity(rank)),
        value=jax.ShapeDtypeStruct(shape, self.values[value.name].dtype),
    )
    return self.to(grown, perm)

  def _input_layout(self, node: Node, program: Program) -> Any:
    """Images and videos (floating, 4 or 5 axes) channels-last; a sequence (3 axes) where its first
    reader is a convolution or norm over channels (NLC), else as torch's (N, L, features)."""
    value = self.values.get(node.name)
    if not (isinstance(value, jax.ShapeDtypeStruct) and jnp.issubdtype(value.dtype, jnp.floating)):
      return _identity_layout(value)
    if value.ndim == 3:
      reader = next((n for n in program.nodes if Ref(node.name) in (*n.args, *(v for _, v in n.kwargs))), None)
      prototype = self.original[reader.target].prototype if reader is not None and reader.kind == "module" else None
      if not isinstance(prototype, CHANNEL_LAYERS):
        return _identity_layout(value)
    return Axes(channels_last(value.ndim)) if 3 <= value.ndim <= 5 else _identity_layout(value)

  def _module(self, node: Node) -> Any:
    leaf = self.original[node.target]
    rule = next((LAYERS[c] for c in type(leaf.prototype).__mro__ if c in LAYERS), None)
    if rule is None:  # a custom_modules layer: torch's layout in, torch's layout out
      self.nodes.append(dataclasses.replace(node, args=self.as_torch(node.args), kwargs=self.as_torch(node.kwargs)))
      return _identity_layout(self.values.get(node.name))
    return rule(self, node, leaf)


def _identity_layout(value) -> Any:
  """torch's own layout for a value of this structure."""
  if isinstance(value, jax.ShapeDtypeStruct):
    return Axes(identity(value.ndim))
  if isinstance(value, (tuple, list)) and not all(isinstance(v, int) for v in value):
    return type(value)(_identity_layout(v) for v in value) if type(value) in (tuple, list) else None
  if isinstance(value, dict):
    return {k: _identity_layout(v) for k, v in value.items()}
  return None


def _is_identity(layout) -> bool:
  if isinstance(layout, (Axes, ShapeAxes)):
    return layout.perm == identity(len(layout.perm))
  if isinstance(layout, (tuple, list)):
    return all(_is_identity(item) for item in layout)
  if isinstance(layout, dict):
    return all(_is_identity(item) for item in layout.values())
  return True


def _layouts(argument, layouts: dict) -> Any:
  """The layout of an encoded argument's value (containers as containers of layouts)."""
  if isinstance(argument, Ref):
    return layouts.get(argument.name)
  if isinstance(argument, Aggregate):
    items = [_layouts(item, layouts) for item in argument.items]
    if argument.keys is not None:
      return dict(zip(argument.keys, items, strict=True))
    return tuple(items)
  return None


def _flattened(layout) -> list:
  """An output's layouts in the order JAX flattens the output (dicts by sorted key)."""
  if isinstance(layout, Axes):
    return [layout.perm]
  if isinstance(layout, dict):
    return [perm for key in sorted(layout) for perm in _flattened(layout[key])]
  if isinstance(layout, (tuple, list)):
    return [perm for item in layout for perm in _flattened(item)]
  return []


def _tuple(values: tuple) -> Aggregate:
  return Aggregate(Static(tuple), tuple(values))


def _constant(value):
  """A constant argument's Python value (a tuple for an encoded tuple or list), or the argument."""
  if (
      isinstance(value, Aggregate)
      and value.keys is None
      and not any(isinstance(v, (Ref, Aggregate)) for v in value.items)
  ):
    return tuple(value.items)
  return value


# --- an op's arguments by name ---------------------------------------------------------------------


class Arguments:
  """An op node's arguments by its function's parameter names, rewritten in place (positional
  stay positional, keywords keywords)."""

  def __init__(self, node: Node):
    self.node = node
    fn = node.target.fn
    parameters = list(inspect.signature(fn).parameters.values())
    if node.target.context:
      parameters = parameters[1:]
    self.defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    self.names = [p.name for p in positional[: len(node.args)]]
    self.rest = tuple(node.args[len(positional) :])  # *args (a shape, dims)
    self.args = list(node.args[: len(positional)])
    self.kwargs = dict(node.kwargs)

  def __contains__(self, name: str) -> bool:
    return name in self.names or name in self.kwargs

  def get(self, name: str, default=None):
    if name in self.names:
      return self.args[self.names.index(name)]
    if name in self.kwargs:
      return self.kwargs[name]
    return self.defaults.get(name, default)

  def set(self, name: str, value) -> None:
    if name in self.names:
      self.args[self.names.index(name)] = value
    else:
      self.kwargs[name] = value

  def rebuilt(self, fn: Callable | None = None, rest: tuple | None = None) -> Node:
    rule = self.node.target if fn is None else ops.OpRule(fn, self.node.target.context and fn is self.node.target.fn)
    args = (*self.args, *(self.rest if rest is None else rest))
    return dataclasses.replace(self.node, target=rule, args=tuple(args), kwargs=tuple(sorted(self.kwargs.items())))


# --- op rules --------------------------------------------------------------------------------------

RULES: dict[Any, Callable[[Rewriter, Node], Any]] = {}


def rule(*functions):
  def add(fn):
    for function in functions:
      RULES[function] = fn
    return fn

  return add


def fallback(rw: Rewriter, node: Node) -> Any:
  """An op without a rule: its inputs in torch's layout, its value in torch's layout."""
  rw.emit(dataclasses.replace(node, args=rw.as_torch(node.args), kwargs=rw.as_torch(node.kwargs)), None)
  return _identity_layout(rw.values.get(node.name))


def _arrays(node: Node) -> list[Ref]:
  """The array values an op reads directly (not inside lists)."""
  return [a for a in (*node.args, *(v for _, v in node.kwargs)) if isinstance(a, Ref)]


@rule(
    ops.add, ops.sub, ops.mul, ops.div, ops.pow_, ops.neg, operator.floordiv, operator.mod, operator.eq,
    operator.ne, operator.lt, operator.le, operator.gt, operator.ge, math.ceil, math.floor, math.sqrt,
    jnp.exp, jnp.floor, jnp.ceil, jnp.sqrt, jnp.square, jax.lax.rsqrt, jnp.abs, jnp.sin, jnp.cos, ops.relu, ops.relu6,
    ops.hardswish, ops.hardsigmoid, ops.silu, ops.sigmoid, ops.tanh, ops.mish, ops.gelu, ops.leaky_relu,
    ops.elu, ops.hardtanh, ops.clamp, ops.dropout, ops.identity, ops.detach, ops.to, ops.to_float,
    ops.to_double, ops.to_half, ops.to_bfloat16, ops.rand_like, ops.randn_like, ops.bernoulli, ops.bernoulli_,
)  # fmt: skip
def elementwise(rw: Rewriter, node: Node) -> Any:
  """Elementwise, with torch's broadcasting: every array operand in the layout of the largest."""
  arrays = [a for a in _arrays(node) if rw.perm(a) is not None]
  if node.target.fn is ops.to:  # x.to(other): other gives only its dtype
    arrays = arrays[:1]
  if not arrays:
    rw.emit(dataclasses.replace(node, args=rw.as_torch(node.args), kwargs=rw.as_torch(node.kwargs)), None)
    return _identity_layout(rw.values.get(node.name))
  largest = max(arrays, key=lambda a: len(rw.shape(a)))  # the first of the largest rank
  rank, perm = len(rw.shape(largest)), rw.perm(largest)
  moved = {}
  for a in arrays:
    if rw.perm(a) != perm:
      moved[a] = rw.to(a, perm) if len(rw.shape(a)) == rank else rw.expanded(a, rank, perm)
  args = tuple(moved.get(a, a) if isinstance(a, Ref) else a for a in node.args)
  kwargs = tuple((k, moved.get(v, v) if isinstance(v, Ref) else v) for k, v in node.kwargs)
  return rw.emit(dataclasses.replace(node, args=args, kwargs=kwargs), Axes(perm))


@rule(ops.type_as)
def first_operand(rw: Rewriter, node: Node) -> Any:
  """``x.type_as(other)``: x's layout; ``other`` gives only its dtype."""
  return rw.emit(node, rw.layout(node.args[0]))


@rule(ops.new_full, ops.new_zeros, ops.new_ones)
def new_tensor(rw: Rewriter, node: Node) -> Any:
  """``x.new_zeros(size)``: ``x`` gives only its dtype; sizes in torch's order."""
  rw.emit(dataclasses.replace(node, args=(node.args[0], *rw.as_torch(node.args[1:]))), None)
  return _identity_layout(rw.values[node.name])


def _dim(dim, rank: int) -> int:
  return dim % rank if rank else 0


def _dims(value, rank: int) -> tuple[int, ...] | None:
  """Reduction dims as a tuple of torch axes (None: all)."""
  value = _constant(value)
  if value is None or value == ():
    return None
  return tuple(_dim(d, rank) for d in (value if isinstance(value, tuple) else (value,)))


def _written(axes: tuple[int, ...], like) -> Any:
  """Axes in the form torch's argument had (an int or a tuple)."""
  return axes[0] if isinstance(_constant(like), int) else _tuple(axes)


def _removed(perm: Perm, axes: tuple[int, ...]) -> Perm:
  """``perm`` without torch's ``axes``, the rest renumbered."""
  kept = [a for a in perm if a not in axes]
  return tuple(sorted(kept).index(a) for a in kept)


def _reduction(dim_name: str, keep_name: str | None, keeps: bool = False):
  def reduction(rw: Rewriter, node: Node) -> Any:
    call = Arguments(node)
    perm, given = rw.perm(node.args[0]), call.get(dim_name)
    if perm is None or isinstance(given, Ref) or (keeps and given is None):  # softmax's implicit dim: torch's
      return fallback(rw, node)
    dims = _dims(given, len(perm))
    keep = keeps or (keep_name is not None and call.get(keep_name) is True)
    if dims is None:  # every axis
      return rw.emit(node, Axes(perm) if keep else _identity_layout(rw.values[node.name]))
    call.set(dim_name, _written(tuple(perm.index(d) for d in dims), given))
    out = Axes(perm) if keep else Axes(_removed(perm, dims))
    if isinstance(rw.values[node.name], tuple):  # (values, indices): torch.max along a dim
      out = (out, out)
    return rw.emit(call.rebuilt(), out)

  return reduction


rule(ops.mean, ops.sum_, ops.amax)(_reduction("dim", "keepdim"))
rule(ops.softmax, ops.log_softmax, ops.normalize)(_reduction("dim", None, keeps=True))


@rule(ops.max_, ops.min_)
def extreme(rw: Rewriter, node: Node) -> Any:
  """``torch.max(x, other)`` is elementwise; ``torch.max(x, dim)`` a reduction."""
  other = Arguments(node).get("dim")
  if isinstance(other, Ref) and rw.perm(other) is not None:
    return elementwise(rw, node)
  return _reduction("dim", "keepdim")(rw, node)


@rule(ops.size)
def size(rw: Rewriter, node: Node) -> Any:
  perm = rw.perm(node.args[0])
  call = Arguments(node)
  dim = call.get("dim")
  if perm is None or isinstance(dim, Ref):
    return fallback(rw, node)
  if dim is None:
    return rw.emit(node, ShapeAxes(perm))
  call.set("dim", perm.index(_dim(dim, len(perm))))
  return rw.emit(call.rebuilt(), None)


@rule(ops.tensor_attribute)
def tensor_attribute(rw: Rewriter, node: Node) -> Any:
  perm, name = rw.perm(node.args[0]), node.args[1]
  if perm is None or name in ("T", "mT"):
    return fallback(rw, node)
  if name == "shape":
    return rw.emit(node, ShapeAxes(perm))
  return rw.emit(node, Axes(perm) if name in ("data", "real", "imag") else None)


@rule(ops.ndim)
def ndim(rw: Rewriter, node: Node) -> Any:
  return rw.emit(node, None)


@rule(ops.getitem)
def getitem(rw: Rewriter, node: Node) -> Any:
  x, index = node.args
  layout = rw.layout(x)
  if isinstance(layout, ShapeAxes):
    return _shape_item(rw, node, layout.perm)
  if isinstance(layout, Axes):
    return _array_item(rw, node, layout.perm)
  if isinstance(layout, (tuple, list, dict)) and not isinstance(index, (Ref, Slice, Aggregate)):
    return rw.emit(node, layout[index] if not isinstance(layout, dict) else layout.get(index))
  return fallback(rw, node)


def _shape_item(rw: Rewriter, node: Node, perm: Perm) -> Any:
  """``x.shape[1]`` is JAX's ``x.shape[3]`` for NHWC; ``x.shape[2:]`` its ``x.shape[1:3]``."""
  index = node.args[1]
  rank = len(perm)
  if isinstance(index, int):
    return rw.emit(dataclasses.replace(node, args=(node.args[0], perm.index(_dim(index, rank)))), None)
  if isinstance(index, Slice) and not any(isinstance(v, Ref) for v in (index.start, index.stop, index.step)):
    axes = list(range(rank))[slice(index.start, index.stop, index.step)]
    positions = [perm.index(a) for a in axes]
    if positions and positions == list(range(positions[0], positions[0] + len(positions))):
      jax_slice = Slice(positions[0] or None, positions[-1] + 1 if positions[-1] + 1 < rank else None, None)
      return rw.emit(dataclasses.replace(node, args=(node.args[0], jax_slice)), ShapeAxes(identity(len(axes))))
  return fallback(rw, node)


def _array_item(rw: Rewriter, node: Node, perm: Perm) -> Any:
  """Basic indexing (ints, slices, None, ``...``): each torch axis's entry at its JAX axis, a new
  axis (None) after the JAX axis of the torch axis it follows."""
  x, index = node.args
  entries = list(index.items) if isinstance(index, Aggregate) and index.kind.value is tuple else [index]
  if not all(e is None or e is Ellipsis or isinstance(e, (int, Slice)) for e in entries):
    return fallback(rw, node)  # tensor indices: torch's layout
  rank, full = len(perm), Slice(None, None, None)
  missing = rank - sum(1 for e in entries if e is not None and e is not Ellipsis)
  at = entries.index(Ellipsis) if Ellipsis in entries else len(entries)
  entries[at : at + 1] = [full] * missing
  of_axis, new_after, axis = {}, {}, 0  # torch axis -> entry; torch axis -> new axes after it
  for entry in entries:
    if entry is None:
      new_after[axis - 1] = new_after.get(axis - 1, 0) + 1
    else:
      of_axis[axis], axis = entry, axis + 1
  torch_order = []  # torch's output axes: kept input axes and new ones, in order
  for a in range(-1, rank):
    if a >= 0 and not isinstance(of_axis[a], int):
      torch_order.append(("axis", a))
    torch_order += [("new", a, k) for k in range(new_after.get(a, 0))]
  position = {key: i for i, key in enumerate(torch_order)}
  kept = [position[("axis", a)] for a in perm if not isinstance(of_axis[a], int)]  # in JAX's order
  natural = []  # each new axis after the JAX axis of the torch axis it follows
  for a in (-1, *perm):
    if a >= 0 and not isinstance(of_axis[a], int):
      natural.append(position[("axis", a)])
    natural += [position[("new", a, k)] for k in range(new_after.get(a, 0))]
  preferred = channels_last(len(torch_order))  # a channels-last value's new axes placed as channels-last has them
  out = preferred if perm == channels_last(rank) and [b for b in preferred if b in kept] == kept else tuple(natural)
  written, inputs = [], iter(perm)
  for b in out:  # JAX's index: the input axes' entries in JAX's order, None where out has a new axis
    if torch_order[b][0] == "new":
      written.append(None)
      continue
    for a in inputs:
      written.append(of_axis[a])
      if a == torch_order[b][1]:
        break
  written += [of_axis[a] for a in inputs]
  if len(written) > 2 and None not in written and all(e == full for e in written[:-1]):
    written = [Ellipsis, written[-1]]  # x[..., :c]: the last axis only (before trailing fulls are dropped)
  while written and written[-1] == full:
    written.pop()
  index = Ellipsis if not written else written[0] if len(written) == 1 else _tuple(tuple(written))
  return rw.emit(dataclasses.replace(node, args=(x, index)), Axes(tuple(out)))


@rule(ops.permute, ops.transpose)
def permute(rw: Rewriter, node: Node) -> Any:
  """torch's permute moves no data here: the array stays, its layout changes."""
  perm = rw.perm(node.args[0])
  if perm is None:
    return fallback(rw, node)
  rank = len(perm)
  if node.target.fn is ops.transpose:
    d0, d1 = (_dim(d, rank) for d in (Arguments(node).get("dim0"), Arguments(node).get("dim1")))
    dims = list(range(rank))
    dims[d0], dims[d1] = dims[d1], dims[d0]
  else:
    given = node.args[1:]
    dims = [_dim(d, rank) for d in (_constant(given[0]) if len(given) == 1 else given)]
  return rw.emit(
      Node(node.name, "op", ops.OpRule(ops.identity), (node.args[0],), module=node.module),
      Axes(tuple(dims.index(a) for a in perm)),
  )


@rule(ops.unsqueeze)
def unsqueeze(rw: Rewriter, node: Node) -> Any:
  perm = rw.perm(node.args[0])
  call = Arguments(node)
  dim = call.get("dim")
  if perm is None or isinstance(dim, Ref):
    return fallback(rw, node)
  rank = len(perm)
  dim = dim % (rank + 1)
  at = 0 if dim == 0 else perm.index(dim - 1) + 1  # after the torch axis before it
  moved = [a + (a >= dim) for a in perm]
  call.set("dim", at)
  return rw.emit(call.rebuilt(), Axes((*moved[:at], dim, *moved[at:])))


@rule(ops.squeeze)
def squeeze(rw: Rewriter, node: Node) -> Any:
  perm = rw.perm(node.args[0])
  call = Arguments(node)
  dims = call.get("dim")
  if perm is None or isinstance(dims, Ref):
    return fallback(rw, node)
  shape = rw.shape(node.args[0])
  if dims is None:
    removed = tuple(a for a in range(len(perm)) if shape[a] == 1)
  else:
    removed = tuple(d for d in _dims(dims, len(perm)) if shape[d] == 1)
    call.set("dim", _written(tuple(perm.index(d) for d in _dims(dims, len(perm))), dims))
  return rw.emit(call.rebuilt(), Axes(_removed(perm, removed)))


@rule(ops.cat, ops.stack)
def concatenate(rw: Rewriter, node: Node) -> Any:
  call = Arguments(node)
  tensors = call.get("tensors")
  if not isinstance(tensors, Aggregate) or not all(
      isinstance(t, Ref) and rw.perm(t) is not None for t in tensors.items
  ):
    return fallback(rw, node)
  perm = rw.perm(tensors.items[0])
  rank = len(perm)
  call.set("tensors", dataclasses.replace(tensors, items=tuple(rw.to(t, perm) for t in tensors.items)))
  dim = call.get("dim")
  if node.target.fn is ops.cat:
    call.set("dim", perm.index(_dim(dim, rank)))
    return rw.emit(call.rebuilt(), Axes(perm))
  dim = dim % (rank + 1)
  at = 0 if dim == 0 else perm.index(dim - 1) + 1
  moved = [a + (a >= dim) for a in perm]
  call.set("dim", at)
  return rw.emit(call.rebuilt(), Axes((*moved[:at], dim, *moved[at:])))


@rule(ops.chunk, ops.split)
def split(rw: Rewriter, node: Node) -> Any:
  perm = rw.perm(node.args[0])
  call = Arguments(node)
  if perm is None or isinstance(call.get("dim"), Ref):
    return fallback(rw, node)
  call.set("dim", perm.index(_dim(call.get("dim"), len(perm))))
  return rw.emit(call.rebuilt(), tuple(Axes(perm) for _ in rw.values[node.name]))


@rule(ops.unbind)
def unbind(rw: Rewriter, node: Node) -> Any:
  perm = rw.perm(node.args[0])
  call = Arguments(node)
  if perm is None:
    return fallback(rw, node)
  dim = _dim(call.get("dim"), len(perm))
  call.set("dim", perm.index(dim))
  return rw.emit(call.rebuilt(), tuple(Axes(_removed(perm, (dim,))) for _ in rw.values[node.name]))


@rule(ops.expand, ops.repeat)
def sizes_per_axis(rw: Rewriter, node: Node) -> Any:
  """``x.expand(*sizes)`` / ``x.repeat(*sizes)`` of the same rank: the sizes in JAX's order."""
  perm = rw.perm(node.args[0])
  sizes = node.args[1:]
  if len(sizes) == 1 and isinstance(sizes[0], Aggregate):
    sizes = sizes[0].items
  if perm is None or len(sizes) != len(perm) or node.kwargs:
    return fallback(rw, node)
  return rw.emit(dataclasses.replace(node, args=(node.args[0], *(sizes[a] for a in perm))), Axes(perm))


@rule(ops.expand_as)
def expand_as(rw: Rewriter, node: Node) -> Any:
  x, other = node.args
  if rw.perm(x) is None or rw.perm(other) is None or len(rw.perm(x)) != len(rw.perm(other)):
    return fallback(rw, node)
  perm = rw.perm(other)
  return rw.emit(dataclasses.replace(node, args=(rw.to(x, perm), other)), Axes(perm))


@rule(jnp.matmul)
def matmul(rw: Rewriter, node: Node) -> Any:
  """Batched matrix products: the two matrix axes last in torch's order, the batch axes alike."""
  a, b = node.args[:2]
  pa, pb = rw.perm(a), rw.perm(b)
  if pa is None or pa != pb or len(pa) < 2 or pa[-2:] != (len(pa) - 2, len(pa) - 1):
    return fallback(rw, node)
  return rw.emit(node, Axes(pa))


@rule(ops.prelu)
def prelu(rw: Rewriter, node: Node) -> Any:
  perm = rw.perm(node.args[0])
  if perm is None or len(perm) < 2:
    return fallback(rw, node)
  call = Arguments(node)
  if perm.index(1) != 1:
    call.set("axis", -1 if perm.index(1) == len(perm) - 1 else perm.index(1))
  return rw.emit(call.rebuilt(), Axes(perm))


@rule(ops.pad)
def pad(rw: Rewriter, node: Node) -> Any:
  """torch lists (left, right) pairs from the last torch axis backwards: here from the last JAX
  axis backwards, (0, 0) for axes not padded."""
  perm = rw.perm(node.args[0])
  call = Arguments(node)
  widths = _widths(rw, call.get("pad"))
  if perm is None or widths is None:
    return fallback(rw, node)
  rank = len(perm)
  pairs = {rank - 1 - i: (widths[2 * i], widths[2 * i + 1]) for i in range(len(widths) // 2)}
  first = min(perm.index(a) for a in pairs)
  written = [w for j in range(rank - 1, first - 1, -1) for w in pairs.get(perm[j], (0, 0))]
  call.set("pad", _tuple(tuple(written)))
  return rw.emit(call.rebuilt(), Axes(perm))


def _widths(rw: Rewriter, pad) -> tuple | None:
  """F.pad's widths as a tuple of ints, or of the Python ints computed in forward from shapes
  (timm's pad_same: its entries are torch's whatever the layout); None where they are not known
  one by one."""
  widths = _constant(pad)
  if isinstance(widths, Aggregate) and widths.keys is None:
    widths = widths.items
  if isinstance(widths, tuple) and all(
      isinstance(w, int) or (isinstance(w, Ref) and isinstance(rw.values.get(w.name), int)) for w in widths
  ):
    return widths
  return None


def _spatial(rw: Rewriter, node: Node, fn: Callable | None = None) -> Any:
  """An op over the spatial axes: channels-last input, ``channels_last=True``."""
  x = node.args[0]
  perm = rw.perm(x)
  if perm is None or len(perm) < 3:
    return fallback(rw, node)
  cl = channels_last(len(perm))
  call = Arguments(node)
  call.args[0] = rw.to(x, cl)
  call.kwargs["channels_last"] = True
  return rw.emit(call.rebuilt(fn), Axes(cl))


@rule(ops.conv)
def functional_conv(rw: Rewriter, node: Node) -> Any:
  """``F.conv2d`` (timm's BlurPool, a standardised weight, efficientnet_pytorch's same-padding
  convolution) on channels-last input; its weight and bias, arrays the model reads or computes,
  as torch's (out, in / groups, *kernel)."""
  call = Arguments(node)
  for name in ("weight", "bias"):
    if name in call:
      call.set(name, rw.as_torch(call.get(name)))
  return _spatial(rw, call.rebuilt())


rule(
    ops.interpolate, ops.dropout1d, ops.dropout2d, ops.dropout3d,
    ops.adaptive_max_pool1d, ops.adaptive_max_pool2d, ops.adaptive_max_pool3d,
)(_spatial)  # fmt: skip


def _pooling(flax_pool: Callable):
  """torch's pooling; Flax's own where it is torch's exactly (no ceil mode, dilation or divisor)."""

  def pooling(rw: Rewriter, node: Node) -> Any:
    call = Arguments(node)
    x = node.args[0]
    perm = rw.perm(x)
    if perm is None or len(perm) < 3:
      return fallback(rw, node)
    n = len(perm) - 2
    stride = call.get("stride")
    stride = call.get("kernel_size") if stride in (None, ()) else stride
    plain = (
        not call.get("ceil_mode", False)
        and call.get("dilation", 1) in (1, _tuple((1,) * n))
        and not call.get("divisor_override", None)
        and not any(isinstance(v, Ref) for v in (call.get("kernel_size"), stride, call.get("padding", 0)))
    )
    if not plain:
      return _spatial(rw, node)
    cl = channels_last(len(perm))
    kernel = per_axis(_constant(call.get("kernel_size")), n)
    strides = per_axis(_constant(stride), n)
    padding = tuple((p, p) for p in per_axis(_constant(call.get("padding", 0)), n))
    kwargs = [("strides", _tuple(strides))] if strides != (1,) * n else []
    if any(p != (0, 0) for p in padding):
      kwargs.append(("padding", _tuple(tuple(_tuple(p) for p in padding))))
    if flax_pool is nn.avg_pool and call.get("count_include_pad", True) is not True:
      kwargs.append(("count_include_pad", False))
    made = Node(
        node.name, "op", ops.OpRule(flax_pool), (rw.to(x, cl), _tuple(kernel)), tuple(kwargs), module=node.module
    )
    return rw.emit(made, Axes(cl))

  return pooling


rule(ops.max_pool1d, ops.max_pool2d, ops.max_pool3d)(_pooling(nn.max_pool))
rule(ops.avg_pool1d, ops.avg_pool2d, ops.avg_pool3d)(_pooling(nn.avg_pool))


@rule(ops.adaptive_avg_pool1d, ops.adaptive_avg_pool2d, ops.adaptive_avg_pool3d)
def adaptive_average(rw: Rewriter, node: Node) -> Any:
  """Global average pooling (output size 1) is a mean over the spatial axes."""
  perm = rw.perm(node.args[0])
  size = _constant(Arguments(node).get("output_size"))
  if perm is None or len(perm) < 3 or size not in (1, (1,) * (len(perm) - 2)):
    return _spatial(rw, node)
  cl = channels_last(len(perm))
  axes = _tuple(tuple(range(1, len(perm) - 1)))
  made = Node(
      node.name,
      "op",
      ops.OpRule(jnp.mean),
      (rw.to(node.args[0], cl),),
      (("axis", axes), ("keepdims", True)),
      module=node.module,
  )
  return rw.emit(made, Axes(cl))


@rule(ops.drop_path, ops.stochastic_depth)
def per_sample(rw: Rewriter, node: Node) -> Any:
  """Stochastic depth draws per sample, along the batch axis: JAX's first."""
  perm = rw.perm(node.args[0])
  if perm is None or perm[0] != 0:
    return fallback(rw, node)
  return rw.emit(node, Axes(perm))


@rule(ops.flatten)
def flatten(rw: Rewriter, node: Node) -> Any:
  """torch's axes ``start..end`` merged in torch's order: where their JAX axes are those in that
  order (size-1 axes anywhere among them), a flatten of JAX's; else transposed first."""
  x = node.args[0]
  perm = rw.perm(x)
  if perm is None or not perm:
    return fallback(rw, node)
  call = Arguments(node)
  rank, shape = len(perm), rw.shape(x)
  start, end = _dim(call.get("start_dim"), rank), _dim(call.get("end_dim"), rank)
  merged = list(range(start, end + 1))
  positions = sorted(perm.index(a) for a in merged)
  in_order = [a for a in perm if a in merged and shape[a] != 1] == [a for a in merged if shape[a] != 1]
  if positions != list(range(positions[0], positions[0] + len(merged))) or not in_order:
    kept = [a for a in perm if a not in merged]
    at = min(perm.index(a) for a in merged) - sum(1 for a in perm[: min(perm.index(a) for a in merged)] if a in merged)
    perm = tuple(kept[:at] + merged + kept[at:])
    x = rw.to(x, perm)
    positions = [perm.index(a) for a in merged]
  first, last = positions[0], positions[-1]
  call.args[0] = x
  call.set("start_dim", first)
  if "end_dim" in call or last != rank - 1:
    call.set("end_dim", last if last != rank - 1 else -1)
  out = []
  for a in perm:
    if a < start:
      out.append(a)
    elif a == perm[first]:
      out.append(start)
    elif a > end:
      out.append(a - (end - start))
  return rw.emit(call.rebuilt(), Axes(tuple(out)))


@rule(ops.reshape)
def reshape(rw: Rewriter, node: Node) -> Any:
  """torch's reshape in groups of axes (a run of input axes whose sizes multiply to a run of
  output axes': the merges and splits): each group's input axes must be JAX's in torch's order
  (size-1 axes anywhere), else the array is transposed first; the output's axes then follow the
  groups in JAX's order, and the shape's entries (``-1``, ``x.shape[0]``) are written in that order."""
  x = node.args[0]
  perm = rw.perm(x)
  entries = node.args[1:]
  packed = len(entries) == 1 and isinstance(entries[0], Aggregate)
  if packed:
    entries = entries[0].items
  if perm is None or node.kwargs or any(isinstance(e, Ref) and rw.perm(e) is not None for e in entries):
    return fallback(rw, node)
  shape, target = rw.shape(x), tuple(rw.values[node.name].shape)
  if len(entries) != len(target) or 0 in shape:
    return fallback(rw, node)
  groups = _groups(shape, target)
  for inputs, _ in groups:
    positions = [perm.index(a) for a in inputs]
    between = range(min(positions), max(positions) + 1)
    if positions != sorted(positions) or any(shape[perm[j]] != 1 and perm[j] not in inputs for j in between):
      perm = tuple(a for inputs, _ in sorted(groups, key=lambda g: min(perm.index(a) for a in g[0])) for a in inputs)
      perm += tuple(a for a in range(len(shape)) if a not in perm)  # size-1 axes last
      x = rw.to(x, perm)
      break
  ordered = sorted(groups, key=lambda g: perm.index(g[0][0]))
  natural = [b for _, outputs in ordered for b in outputs]
  preferred = channels_last(len(target))
  if rw.perm(node.args[0]) == channels_last(len(shape)) and [b for b in preferred if b in natural] == natural:
    out = preferred  # size-1 axes placed as channels-last has them (a bias viewed (1, C, 1, 1))
  else:
    out = list(natural)
    for b in (b for b in range(len(target)) if b not in natural):
      out.insert(out.index(b - 1) + 1 if b - 1 in out else 0, b)
    out = tuple(out)
  written = tuple(entries[b] for b in out)
  rest = (_tuple(written),) if packed else written
  return rw.emit(dataclasses.replace(node, args=(x, *rest)), Axes(out))


def _groups(shape: tuple, target: tuple) -> list[tuple[list[int], list[int]]]:
  """(input axes, output axes) runs of a reshape whose sizes multiply to each other, size-1 axes
  left out."""
  sources = [a for a in range(len(shape)) if shape[a] != 1]
  targets = [b for b in range(len(target)) if target[b] != 1]
  groups, i, j = [], 0, 0
  while i < len(sources) and j < len(targets):
    inputs, outputs = [sources[i]], [targets[j]]
    have, want = shape[sources[i]], target[targets[j]]
    i, j = i + 1, j + 1
    while have != want:
      if have < want:
        inputs.append(sources[i])
        have *= shape[sources[i]]
        i += 1
      else:
        outputs.append(targets[j])
        want *= target[targets[j]]
        j += 1
    groups.append((inputs, outputs))
  return groups


@rule(Guard)
def guard(rw: Rewriter, node: Node) -> Any:
  """A Python decision on shapes: ``len(x)`` is the batch size, JAX's first axis too; the length of
  a tuple of arrays (``list(x.chunk(2, 1))``) or of a shape does not depend on their layout."""
  layout = rw.layout(node.args[0])
  if node.target.fn.conversion == "len" and (
      isinstance(layout, (tuple, list, ShapeAxes)) or (isinstance(layout, Axes) and layout.perm[:1] == (0,))
  ):
    return rw.emit(node, None)
  return fallback(rw, node)


@rule(Static)
def structure(rw: Rewriter, node: Node) -> Any:
  """A namedtuple or dataclass the model returns: its fields' layouts (dataclass fields in order)."""
  rw.emit(node, None)
  cls = node.target.fn.value
  if dataclasses.is_dataclass(cls):
    given = dict(node.kwargs)
    return tuple(
        _layouts(given[f.name], rw.layouts) if f.name in given else None for f in dataclasses.fields(cls) if f.init
    )
  return tuple(_layouts(a, rw.layouts) for a in node.args)


# --- layer rules -----------------------------------------------------------------------------------

CHANNEL_LAYERS = (Conv, ConvTranspose, BatchNorm, FrozenBatchNorm, FoldedBatchNorm, GroupNorm)  # over axis 1

LAYERS: dict[type, Callable[[Rewriter, Node, Leaf], Any]] = {}


def layer(*classes):
  def add(fn):
    for cls in classes:
      LAYERS[cls] = fn
    return fn

  return add


def _channels_last_layer(rw: Rewriter, node: Node, prototype: nn.Module) -> Any:
  """A layer that takes channels-last input at this node's path, with this prototype."""
  x = node.args[0]
  perm = rw.perm(x)
  cl = channels_last(len(perm))
  rw.leaves[node.target] = dataclasses.replace(rw.leaves[node.target], prototype=prototype)
  return rw.emit(dataclasses.replace(node, args=(rw.to(x, cl), *node.args[1:])), Axes(cl))


@layer(Conv)
def conv(rw: Rewriter, node: Node, leaf: Leaf) -> Any:
  """torch's convolution as ``flax.linen.Conv`` (its kernel already in Flax's layout); torch's
  padding modes other than zeros as torch's layer, in torch's layout."""
  c = leaf.prototype
  if c.padding_mode != "zeros" or c.dtype is not None or rw.perm(node.args[0]) is None:
    return fallback_layer(rw, node)
  n = len(rw.shape(node.args[0])) - 2
  flax_conv = nn.Conv(
      features=c.features,
      kernel_size=per_axis(c.kernel_size, n),
      strides=c.strides,
      padding=c.padding,
      kernel_dilation=c.dilation,
      feature_group_count=c.groups,
      use_bias=c.use_bias,
      param_dtype=c.param_dtype,
  )
  return _channels_last_layer(rw, node, flax_conv)


@layer(ConvTranspose)
def conv_transpose(rw: Rewriter, node: Node, leaf: Leaf) -> Any:
  """torch's transposed convolution as ``flax.linen.ConvTranspose(transpose_kernel=True)``, with
  torch's padding as the padding of the dilated input; grouped ones as torch's layer."""
  c = leaf.prototype
  if c.groups != 1 or c.dtype is not None or rw.perm(node.args[0]) is None:
    return fallback_layer(rw, node)
  n = len(rw.shape(node.args[0])) - 2
  kernel, dilation = per_axis(c.kernel_size, n), per_axis(c.dilation, n)
  padding = tuple(
      (d * (k - 1) - p, d * (k - 1) - p + extra)
      for k, d, p, extra in zip(kernel, dilation, per_axis(c.padding, n), per_axis(c.output_padding, n), strict=True)
  )
  flax_conv = nn.ConvTranspose(
      features=c.features,
      kernel_size=kernel,
      strides=per_axis(c.strides, n),
      padding=padding,
      kernel_dilation=dilation if any(d != 1 for d in dilation) else None,
      use_bias=c.use_bias,
      param_dtype=c.param_dtype,
      transpose_kernel=True,
  )
  return _channels_last_layer(rw, node, flax_conv)


@layer(BatchNorm, FrozenBatchNorm, FoldedBatchNorm)
def batch_norm(rw: Rewriter, node: Node, leaf: Leaf) -> Any:
  """BatchNorm over the last axis: ``jaxbn.BatchNorm(axis=-1)``."""
  if rw.perm(node.args[0]) is None:
    return fallback_layer(rw, node)
  fields = {"axis": -1}
  if hasattr(leaf.prototype, "compute_channels_last"):
    fields["compute_channels_last"] = False
  return _channels_last_layer(rw, node, leaf.prototype.clone(**fields))


@layer(GroupNorm)
def group_norm(rw: Rewriter, node: Node, leaf: Leaf) -> Any:
  """``flax.linen.GroupNorm`` on channels-last input, with torch's two-pass variance."""
  g = leaf.prototype
  if rw.perm(node.args[0]) is None or len(rw.perm(node.args[0])) < 3:
    return fallback_layer(rw, node)
  flax_norm = nn.GroupNorm(
      num_groups=g.num_groups,
      epsilon=g.epsilon,
      use_scale=g.affine,
      use_bias=g.affine,
      use_fast_variance=False,
      param_dtype=g.param_dtype,
  )
  return _channels_last_layer(rw, node, flax_norm)


@layer(Linear)
def dense(rw: Rewriter, node: Node, leaf: Leaf) -> Any:
  """torch's Linear as ``flax.linen.Dense`` over torch's last axis, which must be JAX's last."""
  x = node.args[0]
  perm = rw.perm(x)
  linear = leaf.prototype
  if perm is None or linear.dtype is not None:
    return fallback_layer(rw, node)
  last = len(perm) - 1
  if perm[-1] != last:
    perm = tuple(a for a in perm if a != last) + (last,)
    x = rw.to(x, perm)
  rw.leaves[node.target] = dataclasses.replace(
      leaf, prototype=nn.Dense(features=linear.features, use_bias=linear.use_bias, param_dtype=linear.param_dtype)
  )
  return rw.emit(dataclasses.replace(node, args=(x, *node.args[1:])), Axes(perm))


@layer(LayerNorm)
def layer_norm(rw: Rewriter, node: Node, leaf: Leaf) -> Any:
  """torch's LayerNorm normalises its last axes: those must be JAX's last, in torch's order."""
  x = node.args[0]
  perm = rw.perm(x)
  if perm is None:
    return fallback_layer(rw, node)
  rank, k = len(perm), len(leaf.prototype.normalized_shape)
  trailing = tuple(range(rank - k, rank))
  if perm[rank - k :] != trailing:
    perm = tuple(a for a in perm if a not in trailing) + trailing
    x = rw.to(x, perm)
  return rw.emit(dataclasses.replace(node, args=(x, *node.args[1:])), Axes(perm))


def fallback_layer(rw: Rewriter, node: Node, leaf: Leaf | None = None) -> Any:
  """torch's layer as the port runs it: its inputs in torch's layout."""
  rw.emit(dataclasses.replace(node, args=rw.as_torch(node.args), kwargs=rw.as_torch(node.kwargs)), None)
  return _identity_layout(rw.values.get(node.name))


def carried() -> list[str]:
  """The torch functions and methods whose axes the pass rewrites (the rest run in torch's
  layout between transposes), by torch's names."""
  from jaxbn._src.port import ops as table

  return sorted({table.name_of(key) for key, rule in table.OPS.items() if rule.fn in RULES})
