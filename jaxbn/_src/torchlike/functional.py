"""torch's functions and Tensor methods as JAX functions: torch's arguments, layout (NCHW) and
semantics (torch's index rules for pooling windows and interpolation, torch's ``chunk`` sizes).

This is the op table ``jaxbn.port`` runs and ``jaxbn.emit``'s source calls (as ``jaxbn.ops``),
without torch: each function is registered under the names of the torch callables it implements
(``torch.flatten`` and ``Tensor.flatten`` share one function); the port resolves the names to
torch's objects. In-place variants are their out-of-place twins (the caller rebinds the value).
Ops that need the mode or randomness (dropout, stochastic depth) take a ``Context`` first.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Context(NamedTuple):
  """What a stochastic op needs: the mode and a source of randomness (Flax's "dropout" rng)."""

  train: bool
  make_rng: Callable[[], jax.Array]


@dataclasses.dataclass(frozen=True)
class OpRule:
  fn: Callable
  context: bool = False


TABLE: dict[str, OpRule] = {}  # torch's name ("torch.flatten", "F.relu", "Tensor.view") -> rule


def register(*torch_names: str, context: bool = False):
  def add(fn):
    for name in torch_names:
      TABLE[name] = OpRule(fn, context)
    return fn

  return add


def _named(name: str, fn: Callable) -> Callable:
  """A function made by a factory, under its public name (emitted source calls it by that name)."""
  fn.__name__ = fn.__qualname__ = name
  return fn


def _wide(x):
  """x in float32 at least: torch's kernels sum and normalise low-precision input in float32 and
  return it in its own dtype."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _dims(dims) -> tuple[int, ...]:
  """torch accepts ``x.permute(0, 2, 1)`` and ``x.permute((0, 2, 1))``."""
  if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
    return tuple(dims[0])
  return tuple(dims)


# --- arithmetic and indexing -------------------------------------------------------------------


@register("operator.add", "operator.iadd", "torch.add", "Tensor.add", "Tensor.add_")
def add(x, y, *, alpha=1):
  return x + (y if alpha == 1 else alpha * y)


@register("operator.sub", "operator.isub", "torch.sub", "Tensor.sub", "Tensor.sub_")
def sub(x, y, *, alpha=1):
  return x - (y if alpha == 1 else alpha * y)


@register("operator.mul", "operator.imul", "torch.mul", "Tensor.mul", "Tensor.mul_")
def mul(x, y):
  return x * y


@register("operator.truediv", "operator.itruediv", "torch.div", "Tensor.div", "Tensor.div_")
def div(x, y, *, rounding_mode=None):
  if rounding_mode == "floor":
    return jnp.floor_divide(x, y)
  if rounding_mode == "trunc":
    return jnp.trunc(x / y).astype(jnp.result_type(x, y))
  if _integer_array(x) and (_integer_array(y) or isinstance(y, int)):
    return x.astype(jnp.float32) / y  # torch's true division of integers: its default dtype, float32
  return x / y


def _integer_array(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.integer)


# torch's //, % and comparisons are Python's; on shapes (ints, static under jit) they run at trace time.
for _name in ("floordiv", "mod", "eq", "ne", "lt", "le", "gt", "ge"):
  register(f"operator.{_name}")(getattr(operator, _name))
for _name in ("eq", "ne", "lt", "le", "gt", "ge"):  # x.eq(y), torch.eq(x, y): elementwise, as the operators
  register(f"torch.{_name}", f"Tensor.{_name}")(getattr(operator, _name))
for _name in ("ceil", "floor", "sqrt"):
  register(f"math.{_name}")(getattr(math, _name))


@register("torch._assert")
def assert_(condition, message):
  """torch's shape asserts, checked when the port is traced (shapes are static): a failing one
  raises torch's message."""
  try:
    holds = bool(condition)
  except jax.errors.ConcretizationTypeError:  # a value known only at run time: not a shape check
    return
  if not holds:
    raise AssertionError(message)


@register("operator.neg", "torch.neg", "Tensor.neg")
def neg(x):
  return -x


@register("torch.einsum")
def einsum(equation, *operands):
  if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
    operands = tuple(operands[0])
  return jnp.einsum(equation, *operands, precision=jax.lax.Precision.HIGHEST)


register("operator.matmul", "torch.matmul", "Tensor.matmul")(jnp.matmul)


@register("torch.bmm", "Tensor.bmm")
def bmm(x, y):
  """Batched (b, n, m) @ (b, m, p); torch takes 3-D operands only."""
  if x.ndim != 3 or y.ndim != 3:
    raise ValueError(f"bmm takes 3-D tensors (torch's rule), got {x.ndim}-D and {y.ndim}-D")
  return jnp.matmul(x, y)


@register("operator.pow", "torch.pow", "Tensor.pow")
def pow_(x, y):
  return x**y


@register("operator.getitem", "Tensor.__getitem__")
def getitem(x, index):
  return x[index]


@register("operator.setitem")
def setitem(x, index, value):
  """``x[index] = value`` as a new array (the port rebinds ``x`` to it): in x's dtype, as torch
  casts; a boolean mask of x's shape selects with ``where`` (its count of True is not static)."""
  value = jnp.asarray(value, x.dtype)
  if isinstance(index, jax.Array | np.ndarray) and index.dtype == bool and index.shape == x.shape:
    return jnp.where(index, value, x)
  return x.at[index].set(value)


register("torch.exp", "Tensor.exp")(jnp.exp)
register("torch.floor", "Tensor.floor", "Tensor.floor_")(jnp.floor)
register("torch.ceil", "Tensor.ceil", "Tensor.ceil_")(jnp.ceil)
register("torch.sqrt", "Tensor.sqrt")(jnp.sqrt)
register("torch.square", "Tensor.square")(jnp.square)
register("torch.rsqrt", "Tensor.rsqrt")(jax.lax.rsqrt)
register("torch.abs", "Tensor.abs", "operator.abs")(jnp.abs)  # operator.abs: Python's abs(x)
register("torch.log", "Tensor.log")(jnp.log)
register("torch.isfinite", "Tensor.isfinite")(jnp.isfinite)
register("torch.isnan", "Tensor.isnan")(jnp.isnan)
register("torch.isinf", "Tensor.isinf")(jnp.isinf)
# torch's &, |, ^, ~ are bitwise (logical on bool tensors), as NumPy's
for _name in ("and_", "or_", "xor", "invert"):
  register(f"operator.{_name}")(getattr(operator, _name))
register("torch.logical_not", "Tensor.logical_not")(jnp.logical_not)
register("torch.logical_and", "Tensor.logical_and")(jnp.logical_and)
register("torch.logical_or", "Tensor.logical_or")(jnp.logical_or)


@register("torch.where")
def where(condition, input=None, other=None):  # noqa: A002 (torch's names)
  """``torch.where(condition, input, other)``; the one-argument form (the indices of True, a
  count known only at run time) has no static shape."""
  if input is None and other is None:
    raise NotImplementedError(
        "torch.where(condition) returns as many indices as the condition has True values, a shape"
        " JAX cannot know under jit: use torch.where(condition, input, other)"
    )
  return jnp.where(condition, input, other)


@register("Tensor.masked_fill", "Tensor.masked_fill_", "torch.masked_fill")
def masked_fill(x, mask, value):
  return jnp.where(mask, jnp.asarray(value, x.dtype), x)


register("torch.sin", "Tensor.sin")(jnp.sin)
register("torch.cos", "Tensor.cos")(jnp.cos)


@register("torch.meshgrid")
def meshgrid(*tensors, indexing=None):
  """torch's default indexing is "ij" (NumPy's is "xy")."""
  if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
    tensors = tuple(tensors[0])
  return tuple(jnp.meshgrid(*tensors, indexing=indexing or "ij"))


@register("torch.arange")
def arange(start=0, end=None, step=1, *, dtype=None, device=None, requires_grad=False, layout=None, pin_memory=False):
  """torch's dtype rule: int64 (int32 without x64) for integer arguments, else float32;
  ``arange(n)`` and ``arange(end=n)`` count from 0."""
  del device, requires_grad, layout, pin_memory
  integers = all(isinstance(v, int) for v in (start, end, step) if v is not None)
  dtype = dtype if dtype is not None else (jnp.int64 if integers else jnp.float32)
  values = np.arange(start, end, step) if end is not None else np.arange(start)
  return jnp.asarray(values, jax.dtypes.canonicalize_dtype(dtype))


def _new(fill):
  def new(x, *size, fill_value=None, dtype=None, device=None, requires_grad=False, layout=None, pin_memory=False):
    """``x.new_*(size, ...)``: x's dtype unless another is given (devices are torch's)."""
    del device, requires_grad, layout, pin_memory
    if fill is None:  # new_full(size, fill_value)
      size, fill_value = (size[0], size[1]) if len(size) == 2 else (size[0], fill_value)
    shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else tuple(size)
    return jnp.full(shape, fill if fill is not None else fill_value, x.dtype if dtype is None else dtype)

  return new


def _factory(fill):
  def make(*size, fill_value=None, dtype=None, device=None, requires_grad=False, layout=None, pin_memory=False):
    """``torch.zeros(*size)`` and friends, in torch's default dtypes: float32, and for ``full``
    the fill's (int64 for an int, bool for a bool). ``torch.empty``'s values are unspecified in
    torch: zeros here."""
    del device, requires_grad, layout, pin_memory
    if fill is None:  # full(size, fill_value)
      size, fill_value = (size[0],), (size[1] if len(size) > 1 else fill_value)
    value = fill if fill is not None else fill_value
    if dtype is None:
      dtype = (
          jnp.bool_
          if isinstance(value, bool)
          else jnp.int64
          if isinstance(value, int) and fill is None
          else jnp.float32
      )
    shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else tuple(size)
    return jnp.full(shape, value, jax.dtypes.canonicalize_dtype(dtype))

  return make


zeros = register("torch.zeros", "torch.empty")(_named("zeros", _factory(0)))
ones = register("torch.ones")(_named("ones", _factory(1)))
full = register("torch.full")(_named("full", _factory(None)))


@register("torch.tensor")
def tensor(data, *, dtype=None, device=None, requires_grad=False, pin_memory=False):
  """``torch.tensor(data)`` of numbers (sizes, when traced: static in the port), in torch's
  default dtypes: float32 for floats, int64 (int32 without x64) for ints, bool for bools."""
  del device, requires_grad, pin_memory
  if dtype is None:
    values = np.asarray(data)
    dtype = jnp.float32 if values.dtype.kind == "f" else values.dtype
  return jnp.asarray(data, jax.dtypes.canonicalize_dtype(dtype))


tril = register("torch.tril", "Tensor.tril")(_named("tril", lambda x, diagonal=0: jnp.tril(x, diagonal)))
triu = register("torch.triu", "Tensor.triu")(_named("triu", lambda x, diagonal=0: jnp.triu(x, diagonal)))


new_full = register("Tensor.new_full")(_named("new_full", _new(None)))
new_zeros = register("Tensor.new_zeros")(_named("new_zeros", _new(0)))
new_ones = register("Tensor.new_ones")(_named("new_ones", _new(1)))


def _like(fill):
  def like(x, *fill_value, dtype=None, **torch_only):
    """``torch.zeros_like(x)`` and friends: x's shape, x's dtype unless another is given;
    ``empty_like``'s values are unspecified in torch: zeros here."""
    del torch_only  # device, layout, requires_grad, memory_format
    value = fill if fill is not None else fill_value[0]
    return jnp.full(x.shape, value, x.dtype if dtype is None else dtype)

  return like


zeros_like = register("torch.zeros_like", "torch.empty_like")(_named("zeros_like", _like(0)))
ones_like = register("torch.ones_like")(_named("ones_like", _like(1)))
full_like = register("torch.full_like")(_named("full_like", _like(None)))


# Tensor attributes that JAX arrays share; any other is refused when the port traces (.device is
# the example input's, taken when tracing: the port is device-agnostic).
TENSOR_ATTRIBUTES = ("shape", "ndim", "dtype", "real", "imag", "T", "mT", "data")


@register("builtins.getattr")
def tensor_attribute(x, name):
  if name == "data":  # torch's x.data: the values, outside autograd
    return detach(x)
  return tuple(x.shape) if name == "shape" else getattr(x, name)


@register("Tensor.size")
def size(x, dim=None):
  return tuple(x.shape) if dim is None else x.shape[dim]


@register("Tensor.dim")
def ndim(x):
  return x.ndim


def reordered(values: tuple, order: tuple[int, ...]) -> tuple:
  """``values`` (a shape) in another order: a channels-last array's ``x.shape`` in torch's order."""
  return tuple(values[i] for i in order)


# --- dtypes ------------------------------------------------------------------------------------


@register("Tensor.to")
def to(x, *args, **kwargs):
  """``Tensor.to(dtype | tensor | device, ...)``: the dtype changes; devices and copies are torch's
  (the port passes torch's dtypes as NumPy's and devices as None)."""
  for target in (*args, kwargs.get("dtype")):
    if isinstance(target, (np.dtype, type)) or hasattr(target, "dtype"):  # x.dtype, or another tensor
      return x.astype(getattr(target, "dtype", target))
  return x


@register("Tensor.type_as")
def type_as(x, other):
  return x.astype(other.dtype)


def _cast(dtype):
  # int64 is int32 where JAX runs without x64 (its default), as arange's
  return lambda x, memory_format=None: x.astype(jax.dtypes.canonicalize_dtype(dtype))


to_float = register("Tensor.float")(_named("to_float", _cast(jnp.float32)))
to_double = register("Tensor.double")(_named("to_double", _cast(jnp.float64)))
to_half = register("Tensor.half")(_named("to_half", _cast(jnp.float16)))
to_bfloat16 = register("Tensor.bfloat16")(_named("to_bfloat16", _cast(jnp.bfloat16)))
to_long = register("Tensor.long")(_named("to_long", _cast(jnp.int64)))
to_int = register("Tensor.int")(_named("to_int", _cast(jnp.int32)))
to_bool = register("Tensor.bool")(_named("to_bool", _cast(jnp.bool_)))


# --- shapes ------------------------------------------------------------------------------------


@register("torch.flatten", "Tensor.flatten")
def flatten(x, start_dim=0, end_dim=-1):
  if x.ndim == 0:
    return x.reshape(1)
  start, end = start_dim % x.ndim, end_dim % x.ndim
  return x.reshape(*x.shape[:start], -1, *x.shape[end + 1 :])


@register("torch.reshape", "Tensor.view", "Tensor.reshape")
def reshape(x, *shape):
  return x.reshape(_dims(shape))


@register("torch.permute", "Tensor.permute")
def permute(x, *dims):
  return jnp.transpose(x, _dims(dims))


@register("torch.transpose", "torch.swapaxes", "Tensor.transpose", "Tensor.swapaxes")
def transpose(x, dim0, dim1):
  return jnp.swapaxes(x, dim0, dim1)


@register("Tensor.contiguous", "Tensor.clone", "torch.clone")
def identity(x, *args, **kwargs):
  return x


@register("Tensor.detach", "torch.detach")
def detach(x):
  """torch's ``detach()`` (and every value computed under ``torch.no_grad()``): the value, with no
  gradient flowing back through it. Not an identity: YOLO26's one-to-one head trains on detached
  features so that it stays out of the backbone's gradient."""
  return jax.tree.map(lambda v: jax.lax.stop_gradient(v) if isinstance(v, jax.Array) else v, x)


@register("torch.squeeze", "Tensor.squeeze")
def squeeze(x, dim=None):
  if dim is None:
    return jnp.squeeze(x)
  dims = (dim,) if isinstance(dim, int) else tuple(dim)
  return jnp.squeeze(x, tuple(d for d in dims if x.shape[d] == 1))  # torch ignores non-1 dims


@register("torch.unsqueeze", "Tensor.unsqueeze")
def unsqueeze(x, dim):
  return jnp.expand_dims(x, dim if dim >= 0 else dim + x.ndim + 1)


@register("Tensor.repeat")
def repeat(x, *sizes):
  sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes
  return jnp.tile(x.reshape((1,) * (len(sizes) - x.ndim) + x.shape), sizes)


@register("Tensor.expand")
def expand(x, *sizes):
  sizes = _dims(sizes)
  lead = len(sizes) - x.ndim
  return jnp.broadcast_to(x, tuple(x.shape[i - lead] if s == -1 else s for i, s in enumerate(sizes)))


@register("Tensor.expand_as")
def expand_as(x, other):
  return jnp.broadcast_to(x, other.shape)


@register("torch.cat", "torch.concat", "torch.concatenate")
def cat(tensors, dim=0):
  return jnp.concatenate(list(tensors), axis=dim)


@register("torch.stack")
def stack(tensors, dim=0):
  return jnp.stack(list(tensors), axis=dim)


@register("torch.chunk", "Tensor.chunk")
def chunk(x, chunks, dim=0):
  size = math.ceil(x.shape[dim] / chunks)  # torch's rule: equal chunks of ceil(n/chunks), maybe fewer
  return split(x, size, dim)


@register("torch.split", "Tensor.split")
def split(x, split_size_or_sections, dim=0):
  length = x.shape[dim]
  if isinstance(split_size_or_sections, int):
    sizes = [min(split_size_or_sections, length - start) for start in range(0, length, split_size_or_sections)]
  else:
    sizes = list(split_size_or_sections)
  return tuple(jnp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=dim))


@register("torch.repeat_interleave", "Tensor.repeat_interleave")
def repeat_interleave(x, repeats, dim=None, *, output_size=None):
  if not isinstance(repeats, int):  # a tensor of counts makes a size from values
    raise TypeError(f"repeat_interleave with repeats of type {type(repeats).__name__}: the port takes an int")
  return jnp.repeat(x.reshape(-1) if dim is None else x, repeats, axis=0 if dim is None else dim)


@register("torch.unbind", "Tensor.unbind")
def unbind(x, dim=0):
  return tuple(jnp.moveaxis(x, dim, 0))


# --- reductions --------------------------------------------------------------------------------


def _reduction(jnp_fn):
  def reduce(x, dim=None, keepdim=False, *, dtype=None):
    axis = None if dim is None else (dim if isinstance(dim, int) else tuple(dim))
    return jnp_fn(x, axis=axis, keepdims=keepdim, dtype=dtype)

  return reduce


mean = register("torch.mean", "Tensor.mean")(_named("mean", _reduction(jnp.mean)))
sum_ = register("torch.sum", "Tensor.sum")(_named("sum_", _reduction(jnp.sum)))


@register("torch.cumsum", "Tensor.cumsum")
def cumsum(x, dim, *, dtype=None):
  if dtype is None:  # torch sums bools and integers in int64, floats in their own dtype
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else jax.dtypes.canonicalize_dtype(np.int64)
  x = x.astype(dtype)
  # torch's kernel accumulates a low-precision float in float32, rounding each partial sum
  return jnp.cumsum(_wide(x) if jnp.issubdtype(dtype, jnp.inexact) else x, axis=dim).astype(dtype)


def _bound(reduce):
  """``torch.amax`` / ``amin``: over ``dim`` (one axis or several; all by default)."""

  def bound(x, dim=(), keepdim=False):
    return reduce(x, axis=dim if isinstance(dim, int) else (tuple(dim) or None), keepdims=keepdim)

  return bound


amax = register("torch.amax", "Tensor.amax")(_named("amax", _bound(jnp.max)))
amin = register("torch.amin", "Tensor.amin")(_named("amin", _bound(jnp.min)))


class ValuesIndices(NamedTuple):
  """What torch's ``max(dim)``, ``min(dim)`` and ``topk`` return (``torch.return_types``): a pair
  that also reads as ``.values`` and ``.indices``."""

  values: jax.Array
  indices: jax.Array


RESULT_FIELDS = ValuesIndices._fields  # read as attributes of an op's result, beside TENSOR_ATTRIBUTES


def _extreme(reduce, arg_reduce, elementwise):
  """``torch.max`` / ``min``: of everything; ``(values, indices)`` along ``dim``; or elementwise."""

  def extreme(x, dim=None, keepdim=False):
    if dim is None:
      return reduce(x)
    if hasattr(dim, "shape"):  # another tensor
      return elementwise(x, dim)
    return ValuesIndices(reduce(x, axis=dim, keepdims=keepdim), arg_reduce(x, axis=dim, keepdims=keepdim))

  return extreme


max_ = register("torch.max", "Tensor.max")(_named("max_", _extreme(jnp.max, jnp.argmax, jnp.maximum)))
min_ = register("torch.min", "Tensor.min")(_named("min_", _extreme(jnp.min, jnp.argmin, jnp.minimum)))


# the first index of the extreme; of everything, flattened, without dim (jnp's axis=None, as torch's)
argmax = register("torch.argmax", "Tensor.argmax")(
    _named("argmax", lambda x, dim=None, keepdim=False: jnp.argmax(x, dim, keepdims=keepdim))
)
argmin = register("torch.argmin", "Tensor.argmin")(
    _named("argmin", lambda x, dim=None, keepdim=False: jnp.argmin(x, dim, keepdims=keepdim))
)
all_ = register("torch.all", "Tensor.all")(_named("all_", _reduction(lambda x, dtype=None, **kw: jnp.all(x, **kw))))
any_ = register("torch.any", "Tensor.any")(_named("any_", _reduction(lambda x, dtype=None, **kw: jnp.any(x, **kw))))


@register("torch.topk", "Tensor.topk")
def topk(x, k, dim=-1, largest=True, sorted=True):  # noqa: A002 (torch's name)
  """The ``k`` largest (smallest) values along ``dim`` and their indices, largest (smallest)
  first; torch's order for ``sorted=False`` is unspecified, this one is sorted too. Among equal
  values the lower index comes first."""
  del sorted
  moved = jnp.moveaxis(x, dim, -1)
  values, indices = jax.lax.top_k(moved if largest else -moved, k)
  values = values if largest else -values
  return ValuesIndices(jnp.moveaxis(values, -1, dim), jnp.moveaxis(indices, -1, dim))


@register("torch.gather", "Tensor.gather")
def gather(x, dim, index, *, sparse_grad=False):
  """``out[i][j] = x[i][index[i][j]]`` along ``dim``: torch lets ``index`` be smaller than ``x`` in
  the other axes, which read x's leading part."""
  del sparse_grad
  dim %= x.ndim
  leading = tuple(slice(None) if d == dim else slice(0, n) for d, n in enumerate(index.shape))
  return jnp.take_along_axis(x[leading], index, axis=dim)


# --- activations -------------------------------------------------------------------------------


def _activation(name, fn):
  """An activation as function, Tensor method and in-place method: ``inplace`` changes nothing
  here (the interpreter rebinds the input)."""
  return _named(name, lambda x, *args, inplace=False, **kwargs: fn(x, *args, **kwargs))


relu = register("F.relu", "F.relu_", "torch.relu", "torch.relu_", "Tensor.relu", "Tensor.relu_")(
    _activation("relu", jax.nn.relu)
)
relu6 = register("F.relu6")(_activation("relu6", jax.nn.relu6))
hardswish = register("F.hardswish")(_activation("hardswish", jax.nn.hard_swish))
hardsigmoid = register("F.hardsigmoid")(_activation("hardsigmoid", jax.nn.hard_sigmoid))
silu = register("F.silu")(_activation("silu", jax.nn.silu))
sigmoid = register("torch.sigmoid", "F.sigmoid", "Tensor.sigmoid", "Tensor.sigmoid_")(
    _activation("sigmoid", jax.nn.sigmoid)
)
tanh = register("torch.tanh", "F.tanh", "Tensor.tanh", "Tensor.tanh_")(_activation("tanh", jnp.tanh))
mish = register("F.mish")(_activation("mish", lambda x: x * jnp.tanh(jax.nn.softplus(x))))


@register("F.gelu")
def gelu(x, approximate="none"):
  return jax.nn.gelu(x, approximate=approximate == "tanh")


@register("F.leaky_relu")
def leaky_relu(x, negative_slope=0.01, inplace=False):
  return jnp.where(x >= 0, x, negative_slope * x)


@register("F.elu")
def elu(x, alpha=1.0, inplace=False):
  return jnp.where(x > 0, x, alpha * jnp.expm1(x))


@register("F.prelu", "torch.prelu")
def prelu(x, weight, *, axis=1):
  """One slope, or one per channel along ``axis`` (torch's: 1; a 1-D input is its own channel
  axis; channels-last input: ``axis=-1``)."""
  if x.ndim >= 2 and weight.size > 1:
    axis %= x.ndim
    weight = weight.reshape((-1,) + (1,) * (x.ndim - 1 - axis))
  return jnp.where(x >= 0, x, weight * x).astype(x.dtype)


@register("F.hardtanh")
def hardtanh(x, min_val=-1.0, max_val=1.0, inplace=False):
  return jnp.clip(x, min_val, max_val)


@register("torch.clamp", "torch.clip", "Tensor.clamp", "Tensor.clamp_", "Tensor.clip")
def clamp(x, min=None, max=None):
  return jnp.clip(x, min, max)


@register("F.softmax", "torch.softmax", "Tensor.softmax")
def softmax(x, dim=None, _stacklevel=3, dtype=None):
  return jax.nn.softmax(x if dtype is None else x.astype(dtype), axis=dim)


@register("F.log_softmax", "torch.log_softmax", "Tensor.log_softmax")
def log_softmax(x, dim=None, _stacklevel=3, dtype=None):
  return jax.nn.log_softmax(x if dtype is None else x.astype(dtype), axis=dim)


# --- dropout and stochastic depth --------------------------------------------------------------


@register("F.dropout", context=True)
def dropout(ctx: Context, x, p=0.5, training=True, inplace=False):
  # ``training`` is the traced module's flag; the port's mode decides too (a train graph under init).
  if not (training and ctx.train) or p == 0:
    return x
  if p == 1:
    return jnp.zeros_like(x)
  keep = jax.random.bernoulli(ctx.make_rng(), 1 - p, x.shape)
  return jnp.where(keep, x / (1 - p), 0).astype(x.dtype)


def _channel_dropout(spatial: int):
  def dropout_nd(ctx: Context, x, p=0.5, training=True, inplace=False, *, channels_last=False):
    # one draw per (sample, channel), over the ``spatial`` axes (the last ones, or before the
    # channels with ``channels_last``); unbatched (C, ...) input too
    if not (training and ctx.train) or p == 0:
      return x
    if p == 1:
      return jnp.zeros_like(x)
    if channels_last:
      shape = x.shape[: x.ndim - spatial - 1] + (1,) * spatial + x.shape[-1:]
    else:
      shape = x.shape[: x.ndim - spatial] + (1,) * spatial
    keep = jax.random.bernoulli(ctx.make_rng(), 1 - p, shape)
    return jnp.where(keep, x / (1 - p), 0).astype(x.dtype)

  dropout_nd.__name__ = dropout_nd.__qualname__ = f"dropout{spatial}d"
  return dropout_nd


dropout1d = register("F.dropout1d", context=True)(_channel_dropout(1))
dropout2d = register("F.dropout2d", context=True)(_channel_dropout(2))
dropout3d = register("F.dropout3d", context=True)(_channel_dropout(3))


# --- random numbers ----------------------------------------------------------------------------
# Drawn from the port's randomness (the Context's: Flax's "dropout" rng stream, NNX's rngs) with
# torch's shapes, dtypes and distributions; torch's own values cannot be reproduced. A
# ``generator=`` (torch's own stream) has no JAX counterpart and is refused.


def _size(size) -> tuple[int, ...]:
  """torch accepts ``rand(2, 3)``, ``rand((2, 3))`` and ``rand(x.shape)``."""
  return tuple(int(n) for n in (size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size))


def _no_generator(generator) -> None:
  if generator is not None:
    raise ValueError(
        "a torch.Generator cannot drive JAX's random numbers: draw without generator= (the port draws"
        " from its own rng stream, rngs={'dropout': key})"
    )


def _factory(sample: Callable, name: str, like: bool):
  def draw(ctx: Context, *args, generator=None, dtype=None, **torch_only):
    del torch_only  # device, layout, requires_grad, pin_memory, memory_format, out
    _no_generator(generator)
    if like:
      (x,) = args
      shape, dtype = x.shape, dtype or x.dtype
    else:
      shape, dtype = _size(args), dtype or jnp.float32
    return sample(ctx.make_rng(), shape, dtype)

  return _named(name, draw)


rand = register("torch.rand", context=True)(_factory(jax.random.uniform, "rand", like=False))
randn = register("torch.randn", context=True)(_factory(jax.random.normal, "randn", like=False))
rand_like = register("torch.rand_like", context=True)(_factory(jax.random.uniform, "rand_like", like=True))
randn_like = register("torch.randn_like", context=True)(_factory(jax.random.normal, "randn_like", like=True))


@register("torch.bernoulli", "Tensor.bernoulli", context=True)
def bernoulli(ctx: Context, x, p=None, *, generator=None, out=None):
  """1 with probability ``x`` (elementwise), or with probability ``p`` where given; x's dtype."""
  _no_generator(generator)
  return jax.random.bernoulli(ctx.make_rng(), x if p is None else p, x.shape).astype(x.dtype)


@register("Tensor.bernoulli_", context=True)
def bernoulli_(ctx: Context, x, p=0.5, *, generator=None):
  """x refilled with draws of 1 with probability ``p`` (a number or a tensor), in x's dtype."""
  _no_generator(generator)
  return jax.random.bernoulli(ctx.make_rng(), p, x.shape).astype(x.dtype)


def drop_samples(ctx: Context, x, p: float, mode: str = "row", scale: bool = True):
  """torchvision's stochastic_depth / timm's drop_path: drop whole samples ("row") or the
  whole batch ("batch") with probability p, scaling survivors by 1/(1-p)."""
  if not ctx.train or p == 0:
    return x
  survival = 1.0 - p
  shape = (x.shape[0],) + (1,) * (x.ndim - 1) if mode == "row" else (1,) * x.ndim
  noise = jax.random.bernoulli(ctx.make_rng(), survival, shape).astype(x.dtype)
  if survival > 0 and scale:
    noise = noise / survival
  return x * noise


@register("torchvision.ops.stochastic_depth", context=True)
def stochastic_depth(ctx: Context, x, p, mode, training=True):
  return drop_samples(ctx._replace(train=ctx.train and training), x, p, mode)


@register("timm.layers.drop.drop_path", context=True)
def drop_path(ctx: Context, x, drop_prob=0.0, training=False, scale_by_keep=True):
  return drop_samples(ctx._replace(train=ctx.train and training), x, drop_prob, "row", scale_by_keep)


# --- normalization (BatchNorm is jaxbn's; these serve the LayerNorm and GroupNorm leaves too) ----


def _affine(y, weight, bias, shape):
  if weight is not None:
    y = y * weight.reshape(shape)
  return y if bias is None else y + bias.reshape(shape)


def _standardize(x, axes, eps):
  mean = jnp.mean(x, axes, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)  # two passes: torch's accuracy
  return (x - mean) * jax.lax.rsqrt(var + eps)


@register("F.normalize")
def normalize(x, p=2.0, dim=1, eps=1e-12, out=None):
  del out  # torch writes into it; the port returns the value
  wide = _wide(x)  # torch's norm accumulates low precision in float32, then rounds once
  norm = (
      jnp.sqrt(jnp.sum(wide * wide, dim, keepdims=True))
      if p == 2
      else jnp.sum(jnp.abs(wide) ** p, dim, keepdims=True) ** (1 / p)
  )
  return x / jnp.maximum(norm.astype(x.dtype), eps)


@register("F.layer_norm")
def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
  shape = tuple(normalized_shape)
  y = _standardize(_wide(x), tuple(range(-len(shape), 0)), eps)
  return _affine(y, weight, bias, shape).astype(x.dtype)


@register("F.group_norm")
def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
  y = _standardize(_wide(x).reshape(x.shape[0], num_groups, -1), -1, eps).reshape(x.shape)
  return _affine(y, weight, bias, (-1,) + (1,) * (x.ndim - 2)).astype(x.dtype)


def plus_bias(y, bias):
  """``y + bias`` in y's dtype with the bias rounded to it, added in float32 at least: in a
  low-precision y the bias's gradient, a sum over every position, would otherwise accumulate in
  bfloat16 (measured: 3.0 where torch's is 2e-3, on a bias before a BatchNorm)."""
  return (_wide(y) + _wide(bias.astype(y.dtype))).astype(y.dtype)


# --- functional convolution (nn.Conv* modules are leaves, with Flax's kernel layout) -------------


@register("F.conv1d", "F.conv2d", "F.conv3d")
def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, channels_last=False):
  """torch's functional convolution with a torch-layout weight (out, in / groups, *kernel) on
  channels-first input (channels-last with ``channels_last``); padding as torch takes it (ints,
  'same', 'valid')."""
  n = x.ndim - 2
  dilation = _tuple(dilation, n)
  if padding == "valid":
    pads = [(0, 0)] * n
  elif padding == "same":  # torch puts the odd pixel on the right
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True)]
    pads = [(t // 2, t - t // 2) for t in totals]
  else:
    pads = [(p, p) for p in _tuple(padding, n)]
  torch_spec = (0, 1, *range(2, n + 2))
  spec = (0, n + 1, *range(1, n + 1)) if channels_last else torch_spec
  y = jax.lax.conv_general_dilated(
      x,
      weight.astype(x.dtype),
      _tuple(stride, n),
      pads,
      rhs_dilation=dilation,
      dimension_numbers=jax.lax.ConvDimensionNumbers(spec, torch_spec, spec),
      feature_group_count=groups,
  )
  if bias is None:
    return y
  return plus_bias(y, bias if channels_last else bias.reshape(-1, *(1,) * n))


# --- attention and patches ---------------------------------------------------------------------


@register("F.scaled_dot_product_attention", context=True)
def scaled_dot_product_attention(
    ctx: Context, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
  """torch's reference: ``softmax(q @ k^T * scale + mask) @ v``; a boolean mask (and
  ``is_causal``'s lower triangle) marks the positions that take part."""
  if enable_gqa:  # grouped-query attention: each key/value head serves a group of query heads
    key = jnp.repeat(key, query.shape[-3] // key.shape[-3], axis=-3)
    value = jnp.repeat(value, query.shape[-3] // value.shape[-3], axis=-3)
  scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
  scores = query @ jnp.swapaxes(key, -2, -1) * scale
  if is_causal:
    scores = jnp.where(jnp.tril(jnp.ones(scores.shape[-2:], bool)), scores, -jnp.inf)
  if attn_mask is not None:
    scores = jnp.where(attn_mask, scores, -jnp.inf) if attn_mask.dtype == bool else scores + attn_mask
  weights = jax.nn.softmax(scores, axis=-1)
  return dropout(ctx, weights, dropout_p) @ value


@register("F.linear")
def linear(x, weight, bias=None):
  y = x @ weight.T
  return y if bias is None else y + bias


def _additive_mask(mask, dtype):
  """torch's ``_canonical_mask``: a boolean mask's True (a position left out) as -inf, a float
  mask as it is."""
  if mask is None or mask.dtype != jnp.bool_:
    return mask
  return jnp.where(mask, -jnp.inf, 0).astype(dtype)


@register("F.multi_head_attention_forward", context=True)
def multi_head_attention_forward(
    ctx: Context,
    query,
    key,
    value,
    embed_dim_to_check,
    num_heads,
    in_proj_weight,
    in_proj_bias,
    bias_k,
    bias_v,
    add_zero_attn,
    dropout_p,
    out_proj_weight,
    out_proj_bias,
    training=True,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    use_separate_proj_weight=False,
    q_proj_weight=None,
    k_proj_weight=None,
    v_proj_weight=None,
    static_k=None,
    static_v=None,
    average_attn_weights=True,
    is_causal=False,
):
  """torch.nn.MultiheadAttention's computation (sequence first: ``(L, N, E)``, or ``(L, E)``):
  the input projections, ``softmax(q k^T / sqrt(head_dim) + masks)``, dropout on those weights
  in training, the output projection; the weights averaged over heads (or per head) when asked."""
  if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None:
    raise NotImplementedError(
        "multi_head_attention_forward with bias_k/bias_v, add_zero_attn or static_k/static_v is not supported"
        " by the port: port that module with custom_modules"
    )
  if is_causal and attn_mask is None:
    raise RuntimeError("Need attn_mask if specifying the is_causal hint.")  # torch's check
  batched = query.ndim == 3
  if not batched:
    query, key, value = query[:, None], key[:, None], value[:, None]
    key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
  target_length, batch, embed_dim = query.shape
  source_length = key.shape[0]
  head_dim = embed_dim // num_heads
  biases = (None,) * 3 if in_proj_bias is None else jnp.split(in_proj_bias, 3)
  weights = (q_proj_weight, k_proj_weight, v_proj_weight) if use_separate_proj_weight else jnp.split(in_proj_weight, 3)
  q, k, v = (linear(t, w, b) for t, w, b in zip((query, key, value), weights, biases, strict=True))

  def heads(t, length):  # (L, N, E) -> (N, heads, L, head_dim)
    return jnp.transpose(t.reshape(length, batch, num_heads, head_dim), (1, 2, 0, 3))

  q, k, v = heads(q, target_length), heads(k, source_length), heads(v, source_length)
  scores = (q * math.sqrt(1.0 / head_dim)) @ jnp.swapaxes(k, -2, -1)  # (N, heads, L, S)
  mask = _additive_mask(attn_mask, query.dtype)
  if mask is not None:
    scores = scores + (mask if mask.ndim == 2 else mask.reshape(batch, num_heads, target_length, source_length))
  padding = _additive_mask(key_padding_mask, query.dtype)
  if padding is not None:
    scores = scores + padding[:, None, None, :]
  weights = dropout(ctx, jax.nn.softmax(scores, axis=-1), dropout_p, training)  # returned as dropped, as torch's
  output = weights @ v  # (N, heads, L, head_dim)
  output = jnp.transpose(output, (2, 0, 1, 3)).reshape(target_length, batch, embed_dim)
  output = linear(output, out_proj_weight, out_proj_bias)
  weights = (weights.mean(axis=1) if average_attn_weights else weights) if need_weights else None
  if not batched:
    output = output[:, 0]
    weights = None if weights is None else weights[0]
  return output, weights


@register("Tensor.unfold")
def tensor_unfold(x, dimension, size, step):
  """``Tensor.unfold``: windows of ``size`` every ``step`` along ``dimension``, as a new last axis."""
  dimension %= x.ndim
  windows = jnp.arange((x.shape[dimension] - size) // step + 1)[:, None] * step + jnp.arange(size)
  return jnp.moveaxis(jnp.take(x, windows, axis=dimension), dimension + 1, -1)


@register("Tensor.reshape_as", "Tensor.view_as")
def reshape_as(x, other):
  return x.reshape(other.shape)


@register("F.unfold")
def unfold(x, kernel_size, dilation=1, padding=0, stride=1):
  """``nn.Unfold``: each sliding block's values as one column, ``(N, C * prod(k), L)`` in torch's
  (channel, then kernel position) order."""
  n = x.ndim - 2
  patches = jax.lax.conv_general_dilated_patches(
      x,
      _tuple(kernel_size, n),
      _tuple(stride, n),
      [(p, p) for p in _tuple(padding, n)],
      rhs_dilation=_tuple(dilation, n),
      precision=jax.lax.Precision.HIGHEST,
  )
  return patches.reshape(patches.shape[0], patches.shape[1], -1)


@register("F.fold")
def fold(x, output_size, kernel_size, dilation=1, padding=0, stride=1):
  """``nn.Fold``: the adjoint of ``unfold``, so overlapping blocks sum as in torch. ``x`` is
  ``(N, C * prod(k), L)``."""
  size = _tuple(output_size, 2)
  channels = x.shape[1] // math.prod(_tuple(kernel_size, len(size)))
  image = jax.ShapeDtypeStruct((x.shape[0], channels, *size), x.dtype)
  (folded,) = jax.linear_transpose(lambda y: unfold(y, kernel_size, dilation, padding, stride), image)(x)
  return folded


# --- pooling -----------------------------------------------------------------------------------


def _tuple(value, n: int) -> tuple[int, ...]:
  return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def pool_geometry(length, kernel, stride, padding, dilation, ceil_mode):
  """torch's pooling output size and the right padding that yields it (ceil mode adds windows
  that start inside the input or its left padding)."""
  span = dilation * (kernel - 1) + 1
  out = (length + 2 * padding - span + (stride - 1 if ceil_mode else 0)) // stride + 1
  if ceil_mode and (out - 1) * stride >= length + padding:
    out -= 1
  right = max((out - 1) * stride + span - length - padding, 0)
  return out, right


class Window(NamedTuple):
  """A pooling window per spatial axis, with torch's (left, right) padding for its output size."""

  kernel: tuple[int, ...]
  stride: tuple[int, ...]
  dilation: tuple[int, ...]
  pads: list[tuple[int, int]]


def spatial_axes(x, n: int, channels_last: bool = False) -> tuple[int, ...]:
  """The ``n`` spatial axes of ``x``: the last ones (torch's layout), or those before the channel
  axis (channels-last: NHWC)."""
  end = x.ndim - 1 if channels_last else x.ndim
  return tuple(range(end - n, end))


def _window(x, axes, kernel_size, stride, padding, dilation, ceil_mode) -> Window:
  n = len(axes)
  kernel = _tuple(kernel_size, n)
  stride = _tuple(stride if stride not in (None, ()) else kernel_size, n)
  padding, dilation = _tuple(padding, n), _tuple(dilation, n)
  pads = [
      (p, pool_geometry(x.shape[axis], k, s, p, d, ceil_mode)[1])
      for axis, k, s, p, d in zip(axes, kernel, stride, padding, dilation, strict=True)
  ]
  return Window(kernel, stride, dilation, pads)


def _pool(x, axes, window: Window, init, op):
  def full(values, other):  # one entry per axis of x: ``values`` on the spatial axes
    entries = [other] * x.ndim
    for axis, value in zip(axes, values, strict=True):
      entries[axis] = value
    return entries

  return jax.lax.reduce_window(
      x,
      init,
      op,
      tuple(full(window.kernel, 1)),
      tuple(full(window.stride, 1)),
      full(window.pads, (0, 0)),
      window_dilation=tuple(full(window.dilation, 1)),
  )


def _max_pool(n):
  def max_pool(
      x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False, *, channels_last=False
  ):
    if return_indices:
      raise NotImplementedError("max pooling with return_indices=True is not supported by the port")
    axes = spatial_axes(x, n, channels_last)
    return _pool(x, axes, _window(x, axes, kernel_size, stride, padding, dilation, ceil_mode), -jnp.inf, jax.lax.max)

  return max_pool


def _avg_pool(n):
  def avg_pool(
      x,
      kernel_size,
      stride=None,
      padding=0,
      ceil_mode=False,
      count_include_pad=True,
      divisor_override=None,
      *,
      channels_last=False,
  ):
    axes = spatial_axes(x, n, channels_last)
    window = _window(x, axes, kernel_size, stride, padding, 1, ceil_mode)
    total = _pool(_wide(x), axes, window, 0.0, jax.lax.add)
    if divisor_override:
      return (total / divisor_override).astype(x.dtype)
    # torch divides by the window's size clipped to the padded input (count_include_pad) or to
    # the input; a box, so the count is a product of per-axis counts.
    divisor = np.ones((), np.float64)
    for axis, (left, right), k, s in zip(axes, window.pads, window.kernel, window.stride, strict=True):
      length = x.shape[axis]
      inside = np.zeros(left + length + right)
      inside[0 if count_include_pad else left : left + length + (left if count_include_pad else 0)] = 1
      counts = np.array([inside[i : i + k].sum() for i in range(0, left + length + right - k + 1, s)])
      divisor = np.multiply.outer(divisor, counts)
    if channels_last:
      divisor = divisor[..., None]
    return (total / jnp.asarray(divisor, total.dtype)).astype(x.dtype)

  return avg_pool


max_pool1d, max_pool2d, max_pool3d = (
    register(f"F.max_pool{n}d")(_named(f"max_pool{n}d", _max_pool(n))) for n in (1, 2, 3)
)
avg_pool1d, avg_pool2d, avg_pool3d = (
    register(f"F.avg_pool{n}d")(_named(f"avg_pool{n}d", _avg_pool(n))) for n in (1, 2, 3)
)


def adaptive_bins(length: int, out: int) -> list[tuple[int, int]]:
  """torch's adaptive pooling bins: ``[floor(i*L/out), ceil((i+1)*L/out))``, overlapping when
  ``out`` does not divide ``L``."""
  return [((i * length) // out, -((-(i + 1) * length) // out)) for i in range(out)]


def _adaptive(n, reduce):
  def adaptive_pool(x, output_size, return_indices=False, *, channels_last=False):
    if return_indices:
      raise NotImplementedError("adaptive max pooling with return_indices=True is not supported by the port")
    sizes = _tuple(output_size, n)
    for axis, out in zip(spatial_axes(x, n, channels_last), sizes, strict=True):
      length = x.shape[axis]
      out = length if out is None else out
      if length % out == 0:  # equal bins: one reshape
        shape = x.shape[:axis] + (out, length // out) + x.shape[axis + 1 :]
        x = reduce(x.reshape(shape), axis + 1)
      else:
        x = jnp.stack(
            [reduce(jax.lax.slice_in_dim(x, start, end, axis=axis), axis) for start, end in adaptive_bins(length, out)],
            axis=axis,
        )
    return x

  return adaptive_pool


adaptive_avg_pool1d, adaptive_avg_pool2d, adaptive_avg_pool3d = (
    register(f"F.adaptive_avg_pool{n}d")(
        _named(f"adaptive_avg_pool{n}d", _adaptive(n, lambda x, axis: jnp.mean(x, axis)))
    )
    for n in (1, 2, 3)
)
adaptive_max_pool1d, adaptive_max_pool2d, adaptive_max_pool3d = (
    register(f"F.adaptive_max_pool{n}d")(
        _named(f"adaptive_max_pool{n}d", _adaptive(n, lambda x, axis: jnp.max(x, axis)))
    )
    for n in (1, 2, 3)
)


# --- padding and interpolation -----------------------------------------------------------------

PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@register("F.pad")
def pad(x, pad, mode="constant", value=None):
  # torch lists (left, right) pairs from the last axis backwards
  pairs = [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)]
  widths = [(0, 0)] * (x.ndim - len(pairs)) + pairs[::-1]
  if mode == "constant":  # negative widths crop, as in torch
    return jax.lax.pad(x, jnp.asarray(value or 0, x.dtype), [(low, high, 0) for low, high in widths])
  return jnp.pad(x, widths, mode=PAD_MODES[mode])


def _source_scale(length_in, length_out, scale_factor, align_corners):
  if align_corners:
    return (length_in - 1) / (length_out - 1) if length_out > 1 else 0.0
  return 1.0 / scale_factor if scale_factor is not None else length_in / length_out


@register("F.interpolate")
def interpolate(
    x,
    size=None,
    scale_factor=None,
    mode="nearest",
    align_corners=None,
    recompute_scale_factor=None,
    antialias=False,
    *,
    channels_last=False,
):
  if antialias or mode not in ("nearest", "linear", "bilinear", "trilinear"):
    raise NotImplementedError(f"interpolate(mode={mode!r}, antialias={antialias}) is not supported by the port")
  axes = spatial_axes(x, x.ndim - 2, channels_last)
  n = len(axes)
  if size is not None:
    sizes, factors = _tuple(size, n), (None,) * n
  else:
    factors = _tuple(scale_factor, n)
    sizes = tuple(int(math.floor(x.shape[axis] * f)) for axis, f in zip(axes, factors, strict=True))
    if recompute_scale_factor:
      factors = (None,) * n
  for axis, length_out, factor in zip(axes, sizes, factors, strict=True):
    length_in = x.shape[axis]
    scale = _source_scale(length_in, length_out, factor, bool(align_corners))
    positions = np.arange(length_out, dtype=np.float64)
    if mode == "nearest":
      index = np.minimum(np.floor(positions.astype(np.float32) * np.float32(scale)).astype(np.int64), length_in - 1)
      x = jnp.take(x, index, axis=axis)
      continue
    source = positions * scale if align_corners else np.maximum((positions + 0.5) * scale - 0.5, 0)
    low = np.minimum(np.floor(source).astype(np.int64), length_in - 1)
    high = np.minimum(low + 1, length_in - 1)
    weight = jnp.asarray(source - low, x.dtype).reshape((-1,) + (1,) * (x.ndim - axis - 1))
    x = jnp.take(x, low, axis=axis) * (1 - weight) + jnp.take(x, high, axis=axis) * weight
  return x


@register("F.grid_sample")
def grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=None):
  """``x`` (N, C, H, W) read at ``grid``'s (N, H_out, W_out, 2) points, (x, y) in [-1, 1]:
  torch's ``bilinear`` and ``nearest`` modes with ``zeros`` or ``border`` padding, its weights
  written as torch's kernel writes them."""
  if x.ndim != 4 or mode not in ("bilinear", "nearest") or padding_mode not in ("zeros", "border"):
    raise NotImplementedError(
        f"grid_sample of a {x.ndim}-D input with mode={mode!r}, padding_mode={padding_mode!r} is not supported by"
        " the port (4-D input, bilinear or nearest, zeros or border padding are)"
    )
  height, width = x.shape[2:]

  def source(coordinate, size):  # torch's grid_sampler_compute_source_index
    if align_corners:
      position = (coordinate + 1) / 2 * (size - 1)
    else:
      position = ((coordinate + 1) * size - 1) / 2
    return jnp.clip(position, 0, size - 1) if padding_mode == "border" else position

  column, row = source(grid[..., 0], width), source(grid[..., 1], height)

  def read(rows, columns):  # x at integer points (N, H_out, W_out) -> (N, C, H_out, W_out), 0 outside
    inside = (rows >= 0) & (rows < height) & (columns >= 0) & (columns < width)
    rows, columns = jnp.clip(rows, 0, height - 1).astype(jnp.int32), jnp.clip(columns, 0, width - 1).astype(jnp.int32)
    values = jax.vmap(lambda image, r, c: image[:, r, c])(x, rows, columns)
    return jnp.where(inside[:, None], values, 0).astype(x.dtype)

  if mode == "nearest":
    return read(jnp.round(row), jnp.round(column))  # round half to even: torch's nearbyint
  west, north = jnp.floor(column), jnp.floor(row)
  east, south = west + 1, north + 1
  return (
      read(north, west) * ((east - column) * (south - row))[:, None]
      + read(north, east) * ((column - west) * (south - row))[:, None]
      + read(south, west) * ((east - column) * (row - north))[:, None]
      + read(south, east) * ((column - west) * (row - north))[:, None]
  )


__all__ = sorted(  # the public names: every table function of this module, and what calls them need
    {rule.fn.__name__ for rule in TABLE.values() if getattr(rule.fn, "__module__", None) == __name__}
    | {"Context", "ValuesIndices", "drop_samples", "plus_bias", "pool_geometry", "adaptive_bins", "reordered"}
    | {"spatial_axes"}
)
