"""The two sides of a verification, stepping in lock-step: a torch model trained as configured,
and its Flax port (Linen variables, or an NNX module). Each step returns a ``Step``: what both
frameworks' arrays are after it, under torch's state_dict keys, in float64 numpy."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbn._src.checkpoints.recipe import read as read_recipe
from jaxbn._src.checkpoints.recipe import torch_mode
from jaxbn._src.checkpoints.rules import to_state_dict
from jaxbn._src.parity import is_batchnorm_call, linen_outputs, nnx_batchnorm_outputs, recording
from jaxbn._src.variables.state import to_variables

RUNNING = ("running_mean", "running_var", "num_batches_tracked")


@dataclasses.dataclass
class Step:
  """One training step (or, with no gradients, an eval forward)."""

  outputs: dict[str, np.ndarray]  # the output's floating leaves, by index
  layers: dict[str, np.ndarray]  # each BatchNorm layer's output, by torch module name
  gradients: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # what torch trains
  parameters: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # after the update
  statistics: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # after the forward


def _numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):
    value = value.detach().numpy()
  return np.asarray(value).astype(np.float64)  # a copy: torch's buffers change in place as it trains


def _is_floating(leaf) -> bool:
  if hasattr(leaf, "is_floating_point"):  # a torch tensor
    return leaf.is_floating_point()
  dtype = getattr(leaf, "dtype", None)  # None in torch's output (RT-DETR's training dict) is a leaf of its pytree
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _sorted_dicts(value):
  """Plain dicts with sorted keys, as JAX flattens them (torch's pytree keeps insertion order)."""
  if type(value) is dict:
    return {key: _sorted_dicts(value[key]) for key in sorted(value)}
  if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
    return type(value)(*map(_sorted_dicts, value))
  if type(value) in (list, tuple):
    return type(value)(map(_sorted_dicts, value))
  return value


def output_leaves(output) -> dict[str, np.ndarray]:
  """The floating leaves of an output (tuples, dicts, dataclasses such as transformers'
  ModelOutput), by index: a torch output through torch's pytree, a JAX one through JAX's."""
  import torch

  if any(isinstance(leaf, torch.Tensor) for leaf in torch.utils._pytree.tree_leaves(output)):
    leaves = torch.utils._pytree.tree_leaves(_sorted_dicts(output))
  else:
    leaves = jax.tree.leaves(output)
  return {str(i): _numpy(leaf) for i, leaf in enumerate(leaf for leaf in leaves if _is_floating(leaf))}


def split_state(state_dict: dict) -> tuple[dict, dict]:
  """(parameters, running statistics) of a state_dict, as float64 copies."""
  statistics = {k: _numpy(v) for k, v in state_dict.items() if k.rpartition(".")[2] in RUNNING}
  return {k: _numpy(v) for k, v in state_dict.items() if k not in statistics}, statistics


# The loss both frameworks differentiate: "mean_square" of every floating output (any model), or
# "cross_entropy" of every (batch, classes) output against labels % classes (others: mean square).
LOSSES = ("mean_square", "cross_entropy")


def torch_loss(output, labels, kind: str):
  import torch

  total = 0
  for leaf in torch.utils._pytree.tree_leaves(output):
    if not _is_floating(leaf):
      continue
    if kind == "cross_entropy" and leaf.ndim == 2:
      total = total + torch.nn.functional.cross_entropy(leaf, labels % leaf.shape[-1])
    else:
      total = total + leaf.square().mean()
  return total


def jax_loss(output, labels, kind: str):
  total = 0.0
  for leaf in jax.tree.leaves(output):
    if not _is_floating(leaf):
      continue
    if kind == "cross_entropy" and leaf.ndim == 2:
      total = total + optax.softmax_cross_entropy_with_integer_labels(leaf, labels % leaf.shape[-1]).mean()
    else:
      total = total + jnp.mean(leaf**2)
  return total


def exact_hard_activations():
  """A torch function mode in which ``F.hardswish`` and ``F.hardsigmoid`` (``nn.Hardswish``'s,
  timm's) are compositions of torch's own elementwise ops: torch's fused float64 backward of these
  rounds 1/6 to float32 (0.16666667163), 3.0e-8 off at the first step of transformers' PP-OCRv5
  recogniser and 3.4e-7 after one SGD step, where the composition is exact (torch float64 with it
  against jaxbn: the same 3.4e-7 from torch's own, and 4e-12 with only Hardswish replaced)."""
  import torch.nn.functional as F
  from torch.overrides import TorchFunctionMode

  class ExactHardActivations(TorchFunctionMode):

    def __torch_function__(self, func, types, args=(), kwargs=None):
      if func is F.hardsigmoid:
        return F.relu6(args[0] + 3) / 6
      if func is F.hardswish:
        return args[0] * F.relu6(args[0] + 3) / 6
      return func(*args, **(kwargs or {}))

  return ExactHardActivations()


class TorchRun:
  """The torch model, trained as configured (modules it keeps in eval stay in eval, parameters
  with ``requires_grad=False`` are not stepped); its modes are restored after every call.
  ``exact``: with ``exact_hard_activations`` (float64 references)."""

  def __init__(self, model, optimizer, loss: str, batchnorms: dict, exact: bool = False):
    self.model, self.loss, self.batchnorms = model, loss, batchnorms
    self.exact = exact
    self.recipe = read_recipe(model)
    self.optimizer = optimizer.torch([p for p in model.parameters() if p.requires_grad])
    self.order: list[str] = []  # module names in the order the first forward calls them

  def _ordering(self):
    def first_call(name):
      return lambda module, args: None if name in self.order else self.order.append(name)

    return [m.register_forward_pre_hook(first_call(name)) for name, m in self.model.named_modules()]

  def step(self, inputs, labels) -> Step:
    import torch

    hooks = [] if self.order else self._ordering()
    with recording(self.batchnorms, {}) as layers, torch_mode(self.model, True, self.recipe), self._exact():
      output = self.model(*map(torch.from_numpy, inputs))
      for hook in hooks:
        hook.remove()
      self.optimizer.zero_grad()
      torch_loss(output, torch.from_numpy(labels), self.loss).backward()
      gradients = {k: _numpy(p.grad) for k, p in self.model.named_parameters() if p.grad is not None}
      self.optimizer.step()
    parameters, statistics = split_state(self.model.state_dict())
    return Step(output_leaves(output), dict(layers), gradients, parameters, statistics)

  def evaluate(self, inputs) -> Step:
    import torch

    with recording(self.batchnorms, {}) as layers, torch_mode(self.model, False), torch.no_grad(), self._exact():
      output = self.model(*map(torch.from_numpy, inputs))
    return Step(output_leaves(output), dict(layers))

  def _exact(self):
    return exact_hard_activations() if self.exact else contextlib.nullcontext()


def _torch_names(captured: dict, layout: Layout | None = None) -> dict[str, np.ndarray]:
  """Captured module outputs by torch module name (NNX captures every module: arrays only), in
  torch's layout."""
  arrays = {path.replace("/", "."): _numpy(value) for path, value in captured.items() if hasattr(value, "dtype")}
  return arrays if layout is None else {name: layout.torch_layer(value) for name, value in arrays.items()}


@dataclasses.dataclass(frozen=True)
class Layout:
  """A channels-last model's inputs and outputs against torch's (emitted source's ``INPUT_AXES``,
  ``OUTPUT_AXES``, ``TRAIN_OUTPUT_AXES``): each array is torch's transposed by its axes."""

  inputs: tuple
  outputs: tuple
  train_outputs: tuple

  def model_inputs(self, inputs: tuple) -> tuple:
    return tuple(x if axes is None else np.transpose(x, axes) for x, axes in zip(inputs, self.inputs, strict=True))

  def torch_output(self, output, train: bool):
    """The output with each array in torch's layout."""
    axes = iter(self.train_outputs if train else self.outputs)
    leaves, tree = jax.tree.flatten(output)
    moved = [jnp.transpose(leaf, np.argsort(next(axes))) if hasattr(leaf, "shape") else leaf for leaf in leaves]
    return jax.tree.unflatten(tree, moved)

  @staticmethod
  def torch_layer(value: np.ndarray) -> np.ndarray:
    """A BatchNorm layer's output: channels last, torch's channels second."""
    return np.moveaxis(value, -1, 1) if value.ndim >= 3 else value


class LinenRun:
  """A Linen module and its variables, stepped with ``optax`` as the user would: the optimiser
  ``jaxbn.keep_frozen(tx, frozen_mask)``, ``train=True`` and ``mutable=["batch_stats"]``."""

  def __init__(self, module, variables, tx: optax.GradientTransformation, loss: str, layout: Layout | None = None):
    self.variables, self.opt_state = variables, tx.init(variables["params"])
    self.layout = layout

    def forward(variables, inputs, train):
      return module.apply(
          variables,
          *inputs,
          train=train,
          mutable=["batch_stats", "intermediates"],
          capture_intermediates=is_batchnorm_call,
      )

    @jax.jit
    def step(variables, opt_state, inputs, labels):
      def objective(params):
        output, state = forward({**variables, "params": params}, inputs, True)
        return jax_loss(output, labels, loss), (output, state)

      gradients, (output, state) = jax.grad(objective, has_aux=True)(variables["params"])
      updates, opt_state = tx.update(gradients, opt_state, variables["params"])
      new = {**variables, "params": optax.apply_updates(variables["params"], updates)}
      if "batch_stats" in state:
        new["batch_stats"] = state["batch_stats"]
      return new, opt_state, output, gradients, state.get("intermediates", {})

    self._step = step
    self._evaluate = jax.jit(lambda variables, inputs: forward(variables, inputs, False))

  def step(self, inputs, labels) -> Step:
    self.variables, self.opt_state, output, gradients, captured = self._step(
        self.variables, self.opt_state, _model_inputs(inputs, self.layout), labels
    )
    parameters, statistics = split_state(to_state_dict(self.variables))
    gradients = {k: _numpy(v) for k, v in to_state_dict({"params": gradients}).items()}
    layers = _torch_names(linen_outputs(captured), self.layout)
    return Step(_torch_leaves(output, self.layout, True), layers, gradients, parameters, statistics)

  def evaluate(self, inputs) -> Step:
    output, state = self._evaluate(self.variables, _model_inputs(inputs, self.layout))
    layers = _torch_names(linen_outputs(state.get("intermediates", {})), self.layout)
    return Step(_torch_leaves(output, self.layout, False), layers)


def _model_inputs(inputs: tuple, layout: Layout | None) -> tuple:
  return inputs if layout is None else layout.model_inputs(inputs)


def _torch_leaves(output, layout: Layout | None, train: bool) -> dict[str, np.ndarray]:
  return output_leaves(output if layout is None else layout.torch_output(output, train))


class NnxRun:
  """An NNX module stepped as the user would: ``nnx.Optimizer(model, tx, wrt=trainable)`` under
  ``nnx.jit``, ``model.train()`` (modules set to ``keep_eval`` stay in eval)."""

  def __init__(self, model, tx: optax.GradientTransformation, trainable: Any, loss: str, layout: Layout | None = None):
    from flax import nnx

    self.model, self.optimizer = model, nnx.Optimizer(model, tx, wrt=trainable)
    self.layout = layout

    def forward(model, inputs):
      return nnx_batchnorm_outputs(model, *inputs)

    @nnx.jit
    def step(model, optimizer, inputs, labels):
      def objective(model):
        output, captured = forward(model, inputs)
        return jax_loss(output, labels, loss), (output, captured)

      gradients, (output, captured) = nnx.grad(objective, argnums=nnx.DiffState(0, trainable), has_aux=True)(model)
      optimizer.update(model, gradients)
      return output, gradients, captured

    self._step, self._evaluate = step, nnx.jit(forward)

  def step(self, inputs, labels) -> Step:
    self.model.train()
    output, gradients, captured = self._step(self.model, self.optimizer, _model_inputs(inputs, self.layout), labels)
    parameters, statistics = split_state(to_state_dict(to_variables(self.model)))
    gradients = {k: _numpy(v) for k, v in to_state_dict(to_variables(gradients)).items()}
    layers = _torch_names(captured, self.layout)
    return Step(_torch_leaves(output, self.layout, True), layers, gradients, parameters, statistics)

  def evaluate(self, inputs) -> Step:
    self.model.eval()
    output, captured = self._evaluate(self.model, _model_inputs(inputs, self.layout))
    self.model.train()
    return Step(_torch_leaves(output, self.layout, False), _torch_names(captured, self.layout))
