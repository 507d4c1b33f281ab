"""torch's layers as Flax Linen modules in torch's layout (channels first) with torch's default
initialisation: what ``jaxbn.port`` builds at each torch module's path and ``jaxbn.emit``'s source
constructs, as ``jaxbn.layers``. Variables have Flax's names and layouts (``kernel`` as
``(*kernel_size, in / groups, out)``), which ``jaxbn.convert`` maps to torch's state_dict.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.typing import Dtype

from jaxbn._src.linen.batch_norm import BatchNorm
from jaxbn._src.torchlike import compute
from jaxbn._src.torchlike import functional as ops
from jaxbn._src.torchlike.compute import embedding_init, kernel_init, per_axis


class Conv(nn.Module):
  """torch.nn.Conv{1,2,3}d on channels-first input: ``compute.conv``. ``kernel`` has Flax's layout
  ``(*kernel_size, in_features / groups, features)``. ``kernel_size``, ``strides``, ``padding``
  and ``dilation`` as torch takes them (an int for every axis, or one per axis); ``padding`` may
  also be ``(low, high)`` pairs per axis."""

  features: int
  kernel_size: int | tuple[int, ...]
  strides: int | tuple[int, ...] = 1
  padding: int | tuple = 0
  dilation: int | tuple[int, ...] = 1
  groups: int = 1
  use_bias: bool = True
  padding_mode: str = "zeros"
  param_dtype: Dtype = jnp.float32
  dtype: Dtype | None = None  # the computation's (torch.autocast's low dtype); default: promoted

  @nn.compact
  def __call__(self, x):
    kernel_shape = (*per_axis(self.kernel_size, x.ndim - 2), x.shape[1] // self.groups, self.features)
    kernel = self.param("kernel", kernel_init, kernel_shape, self.param_dtype)
    bias = None
    if self.use_bias:
      fan_in = int(np.prod(kernel_shape[:-1]))
      bias = self.param("bias", functools.partial(kernel_init, fan_in=fan_in), (self.features,), self.param_dtype)
    return compute.conv(
        x,
        kernel,
        bias,
        strides=self.strides,
        padding=self.padding,
        dilation=self.dilation,
        groups=self.groups,
        padding_mode=self.padding_mode,
        dtype=self.dtype,
    )


class ConvTranspose(nn.Module):
  """torch.nn.ConvTranspose{1,2,3}d on channels-first input: ``compute.conv_transpose``."""

  features: int
  kernel_size: int | tuple[int, ...]
  strides: int | tuple[int, ...] = 1
  padding: int | tuple[int, ...] = 0
  output_padding: int | tuple[int, ...] = 0
  dilation: int | tuple[int, ...] = 1
  groups: int = 1
  use_bias: bool = True
  param_dtype: Dtype = jnp.float32
  dtype: Dtype | None = None  # the computation's (torch.autocast's low dtype); default: promoted

  @nn.compact
  def __call__(self, x):
    kernel_size = per_axis(self.kernel_size, x.ndim - 2)
    kernel_shape = (*kernel_size, self.features // self.groups, x.shape[1])
    # torch's fan_in for a transposed weight (in, out/g, *k) is its dim 1 times the kernel size
    init = functools.partial(kernel_init, fan_in=int(np.prod(kernel_size)) * (self.features // self.groups))
    kernel = self.param("kernel", init, kernel_shape, self.param_dtype)
    bias = self.param("bias", init, (self.features,), self.param_dtype) if self.use_bias else None
    return compute.conv_transpose(
        x,
        kernel,
        bias,
        strides=self.strides,
        padding=self.padding,
        output_padding=self.output_padding,
        dilation=self.dilation,
        groups=self.groups,
        dtype=self.dtype,
    )


class Tensor(nn.Module):
  """A parameter or buffer that torch's forward reads directly (``x * self.gamma``), held at its
  torch path under the leaf name ``tensor``: torch's ``blocks.0.gamma`` is
  ``params/blocks/0/gamma/tensor``. A buffer lives in the ``buffers`` collection, which an
  optimiser over ``params`` never trains and a training step never writes."""

  shape: tuple[int, ...]
  dtype: str
  collection: str = "params"

  @nn.compact
  def __call__(self):
    def zeros(*_):
      return jnp.zeros(self.shape, self.dtype)  # the value comes from the state_dict

    if self.collection == "params":
      return self.param("tensor", zeros)
    return self.variable(self.collection, "tensor", zeros).value


class Held(nn.Module):
  """The tensors of torch modules that forward never calls (a detection model's denoising head, a
  shallower encoder's unused stages), each a ``Tensor`` at its torch path below this module's name:
  zeros until the state_dict fills them, never read, and frozen in the training recipe, as torch's
  optimiser leaves a parameter with no gradient. ``tensors``: path -> (shape, dtype) or (shape,
  dtype, collection).

  Example::

    >>> layers.Held({"weight": ((5, 4), "float32"), "bias": ((5,), "float32")}, name="unused")()  # doctest: +SKIP
  """

  tensors: Mapping[str, tuple] | tuple

  @nn.compact
  def __call__(self):
    for name, group in held_groups(self.tensors).items():
      if isinstance(group, tuple):
        Tensor(*group, name=name)()
      else:
        Held(group, name=name)()


def held_groups(tensors) -> dict[str, tuple | dict]:
  """``Held``'s tensors by the first part of their path: a tensor's (shape, dtype, ...) where the
  path ends there, else the rest of the paths below it."""
  groups: dict[str, tuple | dict] = {}
  for path, spec in dict(tensors).items():
    head, _, rest = path.partition(".")
    if rest:
      groups.setdefault(head, {})[rest] = spec
    else:
      groups[head] = tuple(spec)
  return groups


class Linear(nn.Module):
  """torch.nn.Linear: ``compute.linear``, ``kernel`` as ``(in, out)``."""

  features: int
  use_bias: bool = True
  param_dtype: Dtype = jnp.float32
  dtype: Dtype | None = None  # the computation's (torch.autocast's low dtype); default: promoted

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", kernel_init, (x.shape[-1], self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      init = functools.partial(kernel_init, fan_in=x.shape[-1])
      bias = self.param("bias", init, (self.features,), self.param_dtype)
    return compute.linear(x, kernel, bias, dtype=self.dtype)


class Embedding(nn.Module):
  """torch.nn.Embedding: ``compute.embedding``, ``embedding`` as torch's ``(num_embeddings,
  features)`` weight, drawn N(0, 1) as torch's (its ``padding_idx`` row zero).

  Example::

    >>> embed = Embedding(num_embeddings=100, features=16, padding_idx=0)     # doctest: +SKIP
    >>> vectors, _ = embed.init_with_output(jax.random.key(0), jnp.array([[5, 7, 0]]))  # doctest: +SKIP
  """

  num_embeddings: int
  features: int
  padding_idx: int | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids):
    table = self.param(
        "embedding", embedding_init(self.padding_idx), (self.num_embeddings, self.features), self.param_dtype
    )
    return compute.embedding(ids, table, self.padding_idx)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm on channels-first input (flax's normalises the last axis): ops.group_norm."""

  num_groups: int
  epsilon: float = 1e-5
  affine: bool = True
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = bias = None
    if self.affine:
      scale = self.param("scale", nn.initializers.ones, (x.shape[1],), self.param_dtype)
      bias = self.param("bias", nn.initializers.zeros, (x.shape[1],), self.param_dtype)
    return ops.group_norm(x, self.num_groups, scale, bias, self.epsilon)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last ``len(normalized_shape)`` axes: ops.layer_norm, with flax's
  parameter names (``scale``, ``bias``)."""

  normalized_shape: tuple[int, ...]
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = self.normalized_shape
    scale = self.param("scale", nn.initializers.ones, shape, self.param_dtype) if self.use_scale else None
    bias = self.param("bias", nn.initializers.zeros, shape, self.param_dtype) if self.use_bias else None
    return ops.layer_norm(x, shape, scale, bias, self.epsilon)


@dataclasses.dataclass(frozen=True)
class Apply:
  """``fn(x, **kwargs)`` as a hashable value (a module field): ``Apply(ops.gelu, (("approximate", "tanh"),))``."""

  fn: Callable
  kwargs: tuple = ()

  def __call__(self, x):
    return self.fn(x, **dict(self.kwargs))


@functools.cache
def activated(norm: type) -> type:
  """``norm`` followed by stateless calls (timm's BatchNormAct2d: BatchNorm, then its activation),
  as one layer at one path, so that the layer's output (what parity compares) is torch's."""

  class Activated(norm):
    after: tuple[Apply, ...] = ()

    @nn.compact
    def __call__(self, x, *args, **kwargs):
      y = super().__call__(x, *args, **kwargs)
      for apply in self.after:
        y = apply(y)
      return y

  Activated.__name__ = Activated.__qualname__ = f"{norm.__name__}Act"
  return Activated


BatchNormAct = activated(BatchNorm)


def mode_keyword(module: nn.Module) -> str | None:
  """The keyword of a module's ``__call__`` that carries the mode: ``train``, ``use_running_average``
  or ``deterministic``, if it has one."""
  import inspect

  parameters = inspect.signature(type(module).__call__).parameters
  return next((name for name in ("train", "use_running_average", "deterministic") if name in parameters), None)


def mode_keywords(module: nn.Module, train: bool) -> dict:
  """The mode as keyword arguments for ``module``'s call."""
  keyword = mode_keyword(module)
  if keyword is None:
    return {}
  return {keyword: train if keyword == "train" else not train}


class Sequential(nn.Module):
  """torch.nn.Sequential: ``layers`` called in turn, each at torch's path (``0``, ``1``, ...).

  A layer is an unbound Linen module (given the mode through its ``train``,
  ``use_running_average`` or ``deterministic`` keyword) or a function of the value (an op).

  Example::

    >>> block = Sequential((Conv(16, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)), ops.relu))  # doctest: +SKIP
    >>> y = block.apply(variables, x, train=False)                                        # doctest: +SKIP
  """

  layers: tuple

  @nn.compact
  def __call__(self, x, train: bool = False):
    for index, layer in enumerate(self.layers):
      if isinstance(layer, nn.Module):
        layer = layer.clone(parent=self, name=str(index))
        x = layer(x, **mode_keywords(layer, train))
      else:
        x = layer(x)
    return x


class Stochastic(nn.Module):
  """An op that needs the mode and randomness (``ops.dropout``, ``ops.stochastic_depth``,
  ``ops.drop_path``) as a layer, for ``Sequential``: ``Stochastic(ops.dropout, (("p", 0.2),))``
  draws from the ``"dropout"`` rng in training."""

  fn: Callable
  kwargs: tuple = ()

  @nn.compact
  def __call__(self, x, train: bool = False):
    return self.fn(ops.Context(train, lambda: self.make_rng("dropout")), x, **dict(self.kwargs))


class ModuleList(nn.Module):
  """A torch ModuleList or ModuleDict whose owner calls its members one by one (``for block in
  self.blocks: x = block(x)``): ``members`` by torch's key, each bound at ``<name>/<key>`` (its
  variables made when first called): ``blocks("0", x, train=train)``; a member that is a
  ModuleList itself is called through it, ``fuse_layers("0.1", x)`` (timm's HRNet).

  Example::

    >>> blocks = ModuleList({"0": Linear(4), "1": Linear(4)}, name="blocks")   # doctest: +SKIP
    >>> y = blocks("1", blocks("0", x))                                        # doctest: +SKIP
  """

  members: Mapping[str, nn.Module]

  def setup(self):  # bound once: a member may be called more than once
    self.bound = {key: member.clone(parent=self, name=key) for key, member in self.members.items()}

  def __call__(self, key: str, *args, **kwargs):
    head, _, rest = key.partition(".")
    return self.bound[head](rest, *args, **kwargs) if rest else self.bound[head](*args, **kwargs)


def chain(functions, x):
  """``x`` through each of ``functions`` in turn: a BatchNormAct2d's activation held as a field
  (``layers.chain(self.bn1_after, y)``), where the calls of a class differ in it."""
  for function in functions:
    x = function(x)
  return x
