"""The ported model: a Linen module that walks the traced program.

Leaves (Conv, BatchNorm, ...) are built at their torch paths, ``features.3.block.0.1`` as
``features/3/block/0/1``, through one nested ``Namespace`` per path part; everything else is a
call of the op table. All fields are hashable records, so the module can be a static argument
of ``jax.jit`` and can be used with ``nn.jit`` and ``nn.remat``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxbn._src.errors import PortError
from jaxbn._src.port.autocast import cast
from jaxbn._src.port.graph import Program, decode, references
from jaxbn._src.port.leaves import NORMS, Conv, Leaf, Linear, swap_norm
from jaxbn._src.port.ops import Context
from jaxbn._src.variables.paths import under


def _call(layer: nn.Module, leaf: Leaf, train: bool, args, kwargs):
  if leaf.inputs_dtype is not None:
    args, kwargs = cast((args, kwargs), leaf.inputs_dtype)
  return layer(*args, **kwargs, **_mode_keywords(leaf, train))


def _mode_keywords(leaf: Leaf, train: bool) -> dict:
  if leaf.mode is None:
    return {}
  return {leaf.mode: train if leaf.mode == "train" else not train}


class Namespace(nn.Module):
  """One part of a torch module path; holds no variables of its own."""

  @nn.compact
  def __call__(self, path: tuple[str, ...], leaf: Leaf, train: bool, args, kwargs):
    if len(path) == 1:
      return _call(leaf.prototype.clone(parent=self, name=path[0]), leaf, train, args, kwargs)
    return Namespace(name=path[0])(path[1:], leaf, train, args, kwargs)


class Ported(nn.Module):
  """A torch model ported by ``jaxbn.port``: ``apply(variables, *inputs, train=False)``.

  ``train=True`` is torch's ``train()`` (pass ``mutable=["batch_stats"]``, and
  ``rngs={"dropout": key}`` where the model has dropout or stochastic depth); ``train=False`` is
  ``eval()``. Inputs and outputs are in torch's layout; outputs keep torch's structure (tuples,
  namedtuples, dicts) as JAX pytrees. ``init`` creates the variables of both forwards.

  Example::

    >>> module, variables = jaxbn.port(torchvision.models.googlenet(), x)   # doctest: +SKIP
    >>> outputs, updates = module.apply(variables, x, train=True, mutable=["batch_stats"],
    ...                                 rngs={"dropout": key})              # doctest: +SKIP
    >>> outputs.aux_logits1.shape                                          # doctest: +SKIP
    (4, 1000)

  Attributes:
    train_program, eval_program: the traced forwards.
    leaves: ``(dotted torch path, Leaf)`` pairs: the Flax module at each path.
    name_of_torch_class: the torch model's class, for reading.
    keep_eval: module paths (``('layer1', '0')``) whose layers run in eval mode with ``train=True``:
      the torch model kept them in ``eval()`` while it trained (``Port.recipe.keep_eval``).
  """

  train_program: Program
  eval_program: Program
  leaves: tuple[tuple[str, Leaf], ...]
  name_of_torch_class: str = ""
  keep_eval: tuple[tuple[str, ...], ...] = ()

  @nn.compact
  def __call__(self, *inputs, train: bool = False, **named_inputs) -> Any:
    leaves = dict(self.leaves)
    top: dict[str, nn.Module] = {}  # built once per call: a module may be called many times

    def call_module(path: str, args, kwargs, train_mode: bool):
      first, *rest = parts = path.split(".")
      leaf = leaves[path]
      train_mode = train_mode and not under(parts, self.keep_eval)
      if not rest:
        if first not in top:
          top[first] = leaf.prototype.clone(parent=self, name=first)
        return _call(top[first], leaf, train_mode, args, kwargs)
      if first not in top:
        top[first] = Namespace(name=first)
      return top[first](tuple(rest), leaf, train_mode, args, kwargs)

    if self.is_initializing():
      # Variables of both forwards; in eval mode, so that a one-sample example input suffices.
      other = self.eval_program if train else self.train_program
      run(other, inputs, named_inputs, call_module, Context(False, self._no_rng), False)
      return run(
          self.train_program if train else self.eval_program,
          inputs,
          named_inputs,
          call_module,
          Context(False, self._no_rng),
          False,
      )
    context = Context(train, self._dropout_rng)
    return run(self.train_program if train else self.eval_program, inputs, named_inputs, call_module, context, train)

  def _dropout_rng(self):
    if not self.has_rng("dropout"):
      raise ValueError(
          f"{self.name_of_torch_class or 'the ported model'}: this forward draws random numbers"
          " (dropout, stochastic depth, torch.rand / randn / bernoulli), which needs randomness:"
          " apply(..., rngs={'dropout': key})."
      )
    return self.make_rng("dropout")

  @staticmethod
  def _no_rng():
    return jax.random.key(0)  # init: only shapes count (dropout draws nothing in init's eval mode)

  @nn.nowrap
  def batchnorm_layers(self) -> dict[str, nn.Module]:
    """The BatchNorm-like layers (jaxbn.BatchNorm, FrozenBatchNorm, FoldedBatchNorm) by torch path."""
    return {path: leaf.prototype for path, leaf in self.leaves if isinstance(leaf.prototype, NORMS)}

  @nn.nowrap
  def batchnorm_epsilons(self) -> dict[str, float]:
    """``{'flax/path': eps}``, for ``jaxbn.fold_batchnorm(..., epsilon=)``."""
    return {path.replace(".", "/"): layer.epsilon for path, layer in self.batchnorm_layers().items()}

  @nn.nowrap
  def batchnorm_producers(self) -> dict[str, str]:
    """``{'norm/path': 'conv/path'}`` for every norm fed directly by a convolution or linear layer
    whose output nothing else reads (so folding changes nothing else), from the eval forward."""
    nodes = self.eval_program.nodes
    readers: dict[str, int] = {}
    for node in nodes:
      for name in references((node.args, node.kwargs)):
        readers[name] = readers.get(name, 0) + 1
    by_name = {node.name: node for node in nodes}
    leaves, producers = dict(self.leaves), {}
    for node in nodes:
      if node.kind == "module" and isinstance(leaves[node.target].prototype, NORMS) and node.args:
        source = by_name.get(getattr(node.args[0], "name", None))
        if (
            source is not None
            and source.kind == "module"
            and readers[source.name] == 1
            and isinstance(leaves[source.target].prototype, (Conv, Linear))
        ):
          producers[node.target.replace(".", "/")] = source.target.replace(".", "/")
    return producers

  @nn.nowrap
  def with_batchnorm(self, kind: str) -> Ported:
    """The same model with every BatchNorm as ``"frozen"`` (jaxbn.FrozenBatchNorm: use with
    ``jaxbn.freeze(variables)``), ``"folded"`` (jaxbn.FoldedBatchNorm: with
    ``jaxbn.fold_batchnorm(variables, epsilon=module.batchnorm_epsilons(),
    producers=module.batchnorm_producers())``) or ``"batchnorm"`` (as ported)."""
    leaves = tuple(
        (path, swap_norm(leaf, kind) if isinstance(leaf.prototype, NORMS) else leaf) for path, leaf in self.leaves
    )
    return self.clone(leaves=leaves)


_RECORDING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("jaxbn_port_recording", default=None)


@contextlib.contextmanager
def recording():
  """``{node name: value}`` of every program run inside, arrays as ``jax.ShapeDtypeStruct``
  (run it under ``jax.eval_shape``): what the channels-last pass reads the values' shapes from."""
  values: dict[str, Any] = {}
  token = _RECORDING.set(values)
  try:
    yield values
  finally:
    _RECORDING.reset(token)


def _abstract(value):
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype) if isinstance(v, jax.Array) else v, value)


def run(program: Program, inputs: tuple, named_inputs: dict, call_module, context: Context, train: bool):
  """Walks the program once: each node's value from the values it refers to."""
  env: dict[str, Any] = {}
  positional, named = list(inputs), dict(named_inputs)
  for node in program.nodes:  # bound first: fx places a static input's assert right after it
    if node.kind == "input":
      env[node.name] = _input(node, positional, named, program.read)
  if named:
    raise TypeError(f"the ported model has no input {', '.join(map(repr, named))}")
  recorded = _RECORDING.get()
  if recorded is not None:
    recorded.update({name: _abstract(value) for name, value in env.items()})
  for node in program.nodes:
    if node.kind == "input":
      continue
    if node.kind == "output":
      return decode(node.args[0], env)
    args, kwargs = decode(node.args, env), dict(decode(node.kwargs, env))
    if node.kind == "module":
      value = call_module(node.target, args, kwargs, train)
    elif node.target.context:
      value = node.target.fn(context, *args, **kwargs)
    else:
      value = node.target.fn(*args, **kwargs)
    env[node.name] = value
    if recorded is not None:
      recorded[node.name] = _abstract(value)
    if node.rebinds:
      env[node.rebinds] = value
  raise AssertionError("a traced program ends with its output")


def _input(node, positional: list, named: dict, read: frozenset) -> Any:
  """One input of the forward, as Python binds it: positionally, by keyword, or its default
  (``*args`` and ``**kwargs`` take what is left). A value the traced program never reads was
  specialised away when porting (``if return_dict is False:``): another value is refused."""
  if node.target.startswith("**"):
    value, given = dict(named), bool(named)
    named.clear()
  elif node.target.startswith("*"):
    value, given = tuple(positional), bool(positional)
    positional.clear()
  elif positional:
    return positional.pop(0)
  elif node.target in named:
    value = named.pop(node.target)
    default = decode(node.args[0], {}) if node.args else _NO_DEFAULT
    given = not _same(value, default)
  elif node.args:
    return decode(node.args[0], {})
  else:
    raise TypeError(f"the ported model needs its input {node.target!r}")
  if given and node.name not in read:
    keywords = node.target.startswith("**")
    names = list(value) if keywords else [node.target]
    extra_positional = node.target.startswith("*") and not keywords
    values = list(value.values()) if keywords else list(value) if extra_positional else [value]
    if extra_positional or any(isinstance(v, (jax.Array, np.ndarray)) for v in values):
      fix = "give it to port() as an example input"  # a tensor, or positional (static_inputs are keywords)
    else:
      fix = f"port the model again with static_inputs={{{', '.join(f'{n!r}: ...' for n in names)}}}"
    raise PortError(
        f"the ported model was traced without its input {', '.join(names)} (the trace took the default there), so"
        f" the value given now would be ignored: {fix}."
    )
  return value


_NO_DEFAULT = object()


def _same(value, default) -> bool:
  if value is default:
    return True
  return type(value) is type(default) and isinstance(value, (bool, int, float, str)) and value == default
