"""torch's layers as Flax NNX modules in torch's layout (channels first), with torch's default
initialisation: the NNX twins of ``jaxbn.layers`` (same arithmetic, ``compute``), which
``jaxbn.emit(api="nnx")``'s source builds. Constructed as torch's are, with the input size
(``in_features``) given; variables keep Flax's names and layouts (``kernel``, ``bias``,
``scale``), so ``jaxbn.convert`` maps torch's state_dict onto them."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from jaxbn._src.torchlike import compute
from jaxbn._src.torchlike import functional as ops
from jaxbn._src.torchlike.compute import embedding_init, kernel_init
from jaxbn._src.torchlike.linen import held_groups
from jaxbn._src.variables.state import Buffer


def _param(rngs: nnx.Rngs, shape: tuple, dtype, fan_in: int) -> nnx.Param:
  return nnx.Param(kernel_init(rngs.params(), shape, dtype, fan_in=fan_in))


class Conv(nnx.Module):
  """torch.nn.Conv{1,2,3}d: ``Conv(in_features, features, kernel_size=(3, 3), strides=2,
  padding=1, rngs=rngs)``; ``kernel_size`` has one entry per spatial axis, the others take an int
  for every axis. ``kernel`` is ``(*kernel_size, in_features / groups, features)``."""

  def __init__(
      self,
      in_features: int,
      features: int,
      kernel_size: tuple[int, ...],
      strides: int | tuple[int, ...] = 1,
      padding: int | tuple = 0,
      dilation: int | tuple[int, ...] = 1,
      groups: int = 1,
      use_bias: bool = True,
      padding_mode: str = "zeros",
      param_dtype: Dtype = jnp.float32,
      dtype: Dtype | None = None,
      *,
      rngs: nnx.Rngs,
  ):
    shape = (*kernel_size, in_features // groups, features)
    fan_in = math.prod(shape[:-1])
    self.kernel = _param(rngs, shape, param_dtype, fan_in)
    self.bias = _param(rngs, (features,), param_dtype, fan_in) if use_bias else nnx.data(None)
    self.strides, self.padding, self.dilation, self.groups = strides, padding, dilation, groups
    self.padding_mode, self.dtype = padding_mode, dtype

  def __call__(self, x):
    bias = None if self.bias is None else self.bias[...]
    return compute.conv(
        x,
        self.kernel[...],
        bias,
        strides=self.strides,
        padding=self.padding,
        dilation=self.dilation,
        groups=self.groups,
        padding_mode=self.padding_mode,
        dtype=self.dtype,
    )


class ConvTranspose(nnx.Module):
  """torch.nn.ConvTranspose{1,2,3}d; ``kernel`` is ``(*kernel_size, features / groups, in_features)``."""

  def __init__(
      self,
      in_features: int,
      features: int,
      kernel_size: tuple[int, ...],
      strides: int | tuple[int, ...] = 1,
      padding: int | tuple[int, ...] = 0,
      output_padding: int | tuple[int, ...] = 0,
      dilation: int | tuple[int, ...] = 1,
      groups: int = 1,
      use_bias: bool = True,
      param_dtype: Dtype = jnp.float32,
      dtype: Dtype | None = None,
      *,
      rngs: nnx.Rngs,
  ):
    fan_in = math.prod(kernel_size) * (features // groups)  # torch's, for a weight (in, out/g, *k)
    self.kernel = _param(rngs, (*kernel_size, features // groups, in_features), param_dtype, fan_in)
    self.bias = _param(rngs, (features,), param_dtype, fan_in) if use_bias else nnx.data(None)
    self.strides, self.padding, self.output_padding = strides, padding, output_padding
    self.dilation, self.groups, self.dtype = dilation, groups, dtype

  def __call__(self, x):
    bias = None if self.bias is None else self.bias[...]
    return compute.conv_transpose(
        x,
        self.kernel[...],
        bias,
        strides=self.strides,
        padding=self.padding,
        output_padding=self.output_padding,
        dilation=self.dilation,
        groups=self.groups,
        dtype=self.dtype,
    )


class Linear(nnx.Module):
  """torch.nn.Linear: ``Linear(in_features, features, rngs=rngs)``, ``kernel`` as ``(in, out)``."""

  def __init__(
      self,
      in_features: int,
      features: int,
      use_bias: bool = True,
      param_dtype: Dtype = jnp.float32,
      dtype: Dtype | None = None,
      *,
      rngs: nnx.Rngs,
  ):
    self.kernel = _param(rngs, (in_features, features), param_dtype, in_features)
    self.bias = _param(rngs, (features,), param_dtype, in_features) if use_bias else nnx.data(None)
    self.dtype = dtype

  def __call__(self, x):
    return compute.linear(x, self.kernel[...], None if self.bias is None else self.bias[...], dtype=self.dtype)


class Embedding(nnx.Module):
  """torch.nn.Embedding: ``Embedding(num_embeddings, features, rngs=rngs)``, ``embedding`` as
  torch's ``(num_embeddings, features)`` weight; the ``padding_idx`` row gets no gradient.

  Example::

    >>> embed = Embedding(100, 16, padding_idx=0, rngs=nnx.Rngs(0))
    >>> embed(jnp.array([[5, 7, 0]])).shape
    (1, 3, 16)
  """

  def __init__(
      self,
      num_embeddings: int,
      features: int,
      padding_idx: int | None = None,
      param_dtype: Dtype = jnp.float32,
      *,
      rngs: nnx.Rngs,
  ):
    init = embedding_init(padding_idx)
    self.embedding = nnx.Param(init(rngs.params(), (num_embeddings, features), param_dtype))
    self.padding_idx = padding_idx

  def __call__(self, ids):
    return compute.embedding(ids, self.embedding[...], self.padding_idx)


def _affine(shape, use_scale: bool, use_bias: bool, dtype):
  scale = nnx.Param(jnp.ones(shape, dtype)) if use_scale else nnx.data(None)
  bias = nnx.Param(jnp.zeros(shape, dtype)) if use_bias else nnx.data(None)
  return scale, bias


def _value(variable):
  return None if variable is None else variable[...]


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm on channels-first input: ``GroupNorm(num_channels, num_groups)``."""

  def __init__(
      self,
      num_channels: int,
      num_groups: int,
      epsilon: float = 1e-5,
      affine: bool = True,
      param_dtype: Dtype = jnp.float32,
      *,
      rngs: nnx.Rngs | None = None,
  ):
    del rngs  # torch's init is deterministic
    self.scale, self.bias = _affine((num_channels,), affine, affine, param_dtype)
    self.num_groups, self.epsilon = num_groups, epsilon

  def __call__(self, x):
    return ops.group_norm(x, self.num_groups, _value(self.scale), _value(self.bias), self.epsilon)


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm over the last ``len(normalized_shape)`` axes."""

  def __init__(
      self,
      normalized_shape: tuple[int, ...],
      epsilon: float = 1e-5,
      use_scale: bool = True,
      use_bias: bool = True,
      param_dtype: Dtype = jnp.float32,
      *,
      rngs: nnx.Rngs | None = None,
  ):
    del rngs
    self.normalized_shape = tuple(normalized_shape)
    self.scale, self.bias = _affine(self.normalized_shape, use_scale, use_bias, param_dtype)
    self.epsilon = epsilon

  def __call__(self, x):
    return ops.layer_norm(x, self.normalized_shape, _value(self.scale), _value(self.bias), self.epsilon)


class Tensor(nnx.Module):
  """A parameter or buffer that torch's forward reads directly (``x * self.gamma``), as
  ``tensor``: an ``nnx.Param``, or a buffer no optimiser trains (``collection="buffers"``)."""

  def __init__(self, shape: tuple[int, ...], dtype: str, collection: str = "params", *, rngs: nnx.Rngs | None = None):
    del rngs  # the value comes from the state_dict
    kind = nnx.Param if collection == "params" else Buffer
    self.tensor = kind(jnp.zeros(shape, dtype))

  def __call__(self):
    return self.tensor[...]


class Held(nnx.Dict):
  """The tensors of torch modules that forward never calls, each a ``Tensor`` at its torch path
  below this attribute (the Linen ``layers.Held``'s twin): zeros until the state_dict fills them,
  never read, never trained. ``tensors``: path -> (shape, dtype) or (shape, dtype, collection).

  Example::

    >>> self.unused = Held({"weight": ((5, 4), "float32"), "bias": ((5,), "float32")})  # doctest: +SKIP
  """

  def __init__(self, tensors, *, rngs: nnx.Rngs | None = None):
    del rngs  # the values come from the state_dict
    groups = held_groups(tensors)
    super().__init__({k: Tensor(*g) if isinstance(g, tuple) else Held(g) for k, g in groups.items()})


class Sequential(nnx.List):
  """torch.nn.Sequential: layers called in turn, held at torch's paths (``0``, ``1``, ...). A layer
  is an NNX module or a function of the value (an op).

  Example::

    >>> block = Sequential([Conv(3, 16, (3, 3), padding=1, rngs=nnx.Rngs(0)), ops.relu])  # doctest: +SKIP
  """

  def __call__(self, x):
    for layer in self:
      x = layer(x)
    return x


class Stochastic(nnx.Module):
  """An op that needs the mode and randomness (``ops.dropout``, ``ops.stochastic_depth``,
  ``ops.drop_path``) as a layer: ``Stochastic(ops.dropout, (("p", 0.2),), rngs=rngs)``; training
  (``model.train()``) draws from ``rngs``' dropout stream."""

  def __init__(self, fn, kwargs: tuple = (), *, rngs: nnx.Rngs):
    self.fn, self.kwargs = fn, tuple(kwargs)
    self.deterministic = False
    self.rngs = rngs["dropout"].fork()

  def __call__(self, x):
    return self.fn(ops.Context(not self.deterministic, self.rngs), x, **dict(self.kwargs))


def uninitialised(make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs | None = None) -> nnx.Module:
  """``make(rngs)`` without its random initialisation: arrays as shapes only (``nnx.eval_shape``),
  to be filled from a checkpoint (``jaxbn.convert.from_torch(state_dict, model)``), and its dropout
  streams real, drawing from ``rngs`` (default ``nnx.Rngs(0)``). A one-block-per-stage ResNet is
  built this way in 0.13 s, where random initialisation, op by op, took 7 s on a 2-core CPU.

  Example::

    >>> model = jaxbn.nnx.uninitialised(lambda rngs: ResNet(rngs=rngs))                 # doctest: +SKIP
    >>> jaxbn.convert.from_torch(jaxbn.load_state_dict("model.safetensors"), model)   # doctest: +SKIP
  """
  rngs = nnx.Rngs(0) if rngs is None else rngs
  model = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  for path, node in list(nnx.iter_graph(model)):
    if isinstance(node, nnx.RngStream) and path and not str(path[-1]).startswith("_"):
      parent = model
      for part in path[:-1]:
        parent = parent[part] if isinstance(part, int) else getattr(parent, part)
      stream = rngs["dropout"].fork()
      if isinstance(path[-1], int):
        parent[path[-1]] = stream
      else:
        setattr(parent, path[-1], stream)
  return model


def initialise_missing(model: nnx.Module, make: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
  """Fills, in place, every array of ``model`` that is still a shape only (``uninitialised``, then
  a checkpoint that lacked it: an edited model's new head) with ``make(nnx.Rngs(0))``'s own initial
  value. Under ``jax.jit`` only those initialisers run, not the whole model's op by op.

  Example::

    >>> model = jaxbn.nnx.uninitialised(lambda rngs: ResNet(rngs=rngs))                 # doctest: +SKIP
    >>> jaxbn.convert.from_torch(state_dict, model, strict=False)                      # doctest: +SKIP
    >>> jaxbn.nnx.initialise_missing(model, lambda rngs: ResNet(rngs=rngs))            # doctest: +SKIP
  """
  state = nnx.state(model)
  lacking = [
      path for path, variable in nnx.to_flat_state(state) if isinstance(variable.get_value(), jax.ShapeDtypeStruct)
  ]
  if not lacking:
    return model

  def fresh():
    made = dict(nnx.to_flat_state(nnx.state(make(nnx.Rngs(0)))))
    return [made[path].get_value() for path in lacking]

  nnx.update(model, nnx.from_flat_state(list(zip(lacking, jax.jit(fresh)(), strict=True))))
  return model
