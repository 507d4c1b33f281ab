"""Behaviour checks between a torch model and its Flax port, per BatchNorm layer.

Both models see the same batches, first in training mode (their running statistics move) and
then in eval mode; every BatchNorm layer's output is compared, and after each training step
its running statistics. Layers are matched by module path (torch ``layer1.0.bn1`` = Flax
``layer1/0/bn1``), as in conversion. The Flax model's mode flag is passed as keyword arguments
(``train=True`` / ``train=False`` unless told otherwise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jaxbn._src.checkpoints import config as layer_config
from jaxbn._src.checkpoints.config import ConfigMismatch
from jaxbn._src.checkpoints.recipe import TorchRecipe, torch_mode
from jaxbn._src.checkpoints.recipe import read as read_recipe
from jaxbn._src.checkpoints.rules import Rename, renamer
from jaxbn._src.linen.batch_norm import BatchNorm
from jaxbn._src.linen.frozen import FrozenBatchNorm
from jaxbn._src.variables.state import is_nnx, to_variables


@dataclasses.dataclass
class LayerDifference:
  """One BatchNorm layer at one step: output differences and running-statistic drift."""

  layer: str
  mode: str  # "train" or "eval"
  step: int
  max_abs: float
  max_rel: float  # max |difference| / max |torch output|
  mean_drift: float | None = None  # max |running mean difference| / max(|torch|, 1)
  var_drift: float | None = None


def torch_batchnorms(torch_model) -> dict[str, Any]:
  """The torch model's BatchNorm-like layers by module name, in definition order."""
  names = layer_config.torch_configs(torch_model)
  return {name: m for name, m in torch_model.named_modules() if name in names}


def is_batchnorm_call(module, method) -> bool:
  """``capture_intermediates`` filter: the calls of jaxbn's BatchNorm layers."""
  return method == "__call__" and isinstance(module, (BatchNorm, FrozenBatchNorm))


def linen_outputs(intermediates) -> dict[str, Any]:
  """Captured Linen intermediates as ``{module path: its output}`` (``layer1/0/bn1``)."""
  # The outermost call ends last: an activated BatchNorm (timm's BatchNormAct2d) sows its inner
  # BatchNorm's output first and its own, after the activation, last; torch's hook sees that one.
  return {"/".join(path[:-1]): value[-1] for path, value in traverse_util.flatten_dict(intermediates).items()}


@contextlib.contextmanager
def _calls_recorded(classes, calls: list):
  """Every call of these NNX classes appends ``(module, output)`` to ``calls`` (the class's
  ``__call__`` wrapped while the context lasts, as ``nnx.capture`` wraps every module class's;
  capture itself sorts all modules' paths, and a container's own output beside its children's int
  keys does not sort)."""

  def recorded(call):
    @functools.wraps(call)
    def record(self, *args, **kwargs):
      output = call(self, *args, **kwargs)
      calls.append((self, output))
      return output

    return record

  originals = {cls: cls.__call__ for cls in classes}
  for cls, call in originals.items():
    cls.__call__ = recorded(call)
  try:
    yield calls
  finally:
    for cls, call in originals.items():
      cls.__call__ = call


def nnx_batchnorm_outputs(model, *inputs, **kwargs) -> tuple[Any, dict[str, Any]]:
  """``model(*inputs, **kwargs)`` and each jaxbn BatchNorm layer's output by module path (a layer
  called twice: its last call, as torch's hook keeps)."""
  from flax import nnx

  from jaxbn._src.nnx.batch_norm import BatchNorm as NnxBatchNorm
  from jaxbn._src.nnx.frozen import FrozenBatchNorm as NnxFrozenBatchNorm

  with _calls_recorded((NnxBatchNorm, NnxFrozenBatchNorm), []) as calls:
    output = model(*inputs, **kwargs)
  paths = {id(module): "/".join(map(str, path)) for path, module in nnx.iter_modules(model)}
  return output, {paths[id(module)]: value for module, value in calls if id(module) in paths}


@contextlib.contextmanager
def recording(layers: dict, outputs: dict):
  """Forward hooks that copy each layer's output (float64 numpy) into ``outputs[name]`` while the
  context lasts."""
  # Copy at once: torchvision's ReLU(inplace=True) overwrites the BatchNorm output right after.
  hooks = [
      layer.register_forward_hook(
          lambda m, i, o, name=name: outputs.__setitem__(name, o.detach().numpy().astype(np.float64))
      )
      for name, layer in layers.items()
  ]
  try:
    yield outputs
  finally:
    for hook in hooks:
      hook.remove()


def compare_config(
    torch_model, flax_model, example_input=None, *, rename: Rename = None, **apply_kwargs
) -> list[ConfigMismatch]:
  """eps, momentum, affine and track_running_stats of every torch BatchNorm against the Flax
  layer at the same path (these are not in a state_dict, so conversion cannot see them).
  A Flax layer that is flax's own BatchNorm is reported too: its semantics differ from torch's.
  A Linen model is traced on ``example_input`` (with ``apply_kwargs``); an NNX module needs none."""
  if example_input is None and not is_nnx(flax_model):
    raise TypeError("compare_config needs example_input for a Linen model: its layers exist only when called.")
  rename = renamer(rename)
  configs = layer_config.torch_configs(torch_model)
  torch_name = {rename(name): name for name in configs}
  expected = {rename(name): config for name, config in configs.items()}
  found = layer_config.mismatches(expected, layer_config.flax_configs(flax_model, example_input, **apply_kwargs))
  return [dataclasses.replace(m, layer=torch_name[m.layer]) for m in found]


def _linen_runner(flax_model: nn.Module, variables, train_kwargs, eval_kwargs):
  """A step function ``(x, train) -> (BatchNorm outputs by path, batch_stats)`` over Linen variables."""

  @functools.partial(jax.jit, static_argnums=2)
  def run(variables, x, train):
    kwargs = train_kwargs if train else eval_kwargs
    _, state = flax_model.apply(
        variables, x, **kwargs, mutable=["batch_stats", "intermediates"], capture_intermediates=is_batchnorm_call
    )
    return state

  def step(x, train):
    nonlocal variables
    state = run(variables, x, train)
    if train:
      variables = {**variables, "batch_stats": state["batch_stats"]}
    return linen_outputs(state["intermediates"]), variables.get("batch_stats", {})

  return step


def _nnx_runner(flax_model, state, train_kwargs, eval_kwargs):
  """The same over an NNX module: ``model.train()`` / ``model.eval()`` (plus the call keywords);
  the module itself is left as it is."""
  from flax import nnx

  graphdef, own = nnx.split(flax_model)
  state = own if state is None else state

  @functools.partial(jax.jit, static_argnums=2)
  def run(state, x, train):
    model = nnx.merge(graphdef, state)
    model.train() if train else model.eval()
    _, outputs = nnx_batchnorm_outputs(model, x, **(train_kwargs if train else eval_kwargs))
    return outputs, nnx.state(model)

  def step(x, train):
    nonlocal state
    captured, new_state = run(state, x, train)
    if train:
      state = new_state
    return captured, to_variables(state).get("batch_stats", {})

  return step


def compare(
    torch_model,
    flax_model,
    variables,
    batches: Sequence[np.ndarray],
    *,
    train_steps: int | None = None,
    rename: Rename = None,
    channels_last: bool = True,
    train_kwargs: dict | None = None,
    eval_kwargs: dict | None = None,
) -> list[LayerDifference]:
  """Runs both models on ``batches`` and compares every BatchNorm layer's output and, after each
  training step, its running statistics.

  Args:
    torch_model: the torch model, trained as configured: modules it holds in ``eval()`` while in
      train mode stay in eval in the training steps (as ``jaxbn.port`` keeps them); its
      statistics move, and every module's mode is left as found.
    flax_model, variables: the Flax port and its variables (e.g. from ``convert.from_torch``),
      with jaxbn layers at the torch module paths (``rename`` maps paths that differ). For an NNX
      module, ``variables`` is its state (None: its own); the module is not changed.
    batches: inputs in torch's layout (NCHW); the first ``train_steps`` (default: all but one)
      run in training mode, the rest in eval.
    channels_last: the Flax model takes NHWC input (the batches are transposed for it).
    train_kwargs, eval_kwargs: the Flax model's call arguments for each mode; default
      ``{"train": True}`` and ``{"train": False}`` for Linen (e.g. ``{"use_running_average":
      False}`` for a model whose flag has another name), none for NNX, whose mode is set with
      ``model.train()`` / ``model.eval()``.

  Returns one LayerDifference per BatchNorm layer and step (see ``format_table``).
  """
  if is_nnx(flax_model):
    step_flax = _nnx_runner(flax_model, variables, train_kwargs or {}, eval_kwargs or {})
  else:
    train_kwargs = {"train": True} if train_kwargs is None else train_kwargs
    eval_kwargs = {"train": False} if eval_kwargs is None else eval_kwargs
    step_flax = _linen_runner(flax_model, variables, train_kwargs, eval_kwargs)
  rename = renamer(rename)
  train_steps = len(batches) - 1 if train_steps is None else train_steps
  torch_layers = torch_batchnorms(torch_model)
  recipe = read_recipe(torch_model)  # the modules it keeps in eval while training, as configured
  report = []
  for step, x in enumerate(batches):
    train = step < train_steps
    outputs = torch_batchnorm_outputs(torch_model, torch_layers, x, train, recipe)
    captured, batch_stats = step_flax(np.moveaxis(x, 1, -1) if channels_last else x, train)
    stats = traverse_util.flatten_dict(batch_stats, sep="/")
    for name, layer in torch_layers.items():
      if name not in outputs:  # not run in this mode (GoogLeNet's aux heads in eval)
        continue
      path = "/".join(rename(name).split("."))
      expected = outputs[name]
      if path not in captured:
        raise ValueError(
            f"{name} ran in torch's {'train' if train else 'eval'} forward, but the Flax model has no BatchNorm"
            f" output at {path}: pass rename= to map torch paths to Flax paths."
        )
      actual = np.asarray(captured[path], np.float64)
      if channels_last and expected.ndim > 2:
        actual = np.moveaxis(actual, -1, 1)
      difference = np.max(np.abs(actual - expected))
      row = LayerDifference(
          name,
          "train" if train else "eval",
          step,
          float(difference),
          float(difference / max(np.max(np.abs(expected)), 1e-30)),
      )
      if train and getattr(layer, "running_mean", None) is not None and f"{path}/mean" in stats:
        for field, leaf, buffer in (
            ("mean_drift", "mean", layer.running_mean),
            ("var_drift", "var", layer.running_var),
        ):
          ours = np.asarray(stats[f"{path}/{leaf}"], np.float64)
          theirs = buffer.detach().numpy().astype(np.float64)
          setattr(row, field, float(np.max(np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1.0))))
      report.append(row)
  return report


def torch_batchnorm_outputs(
    torch_model, layers: dict, x: np.ndarray, train: bool, recipe: TorchRecipe | None = None
) -> dict[str, np.ndarray]:
  """Each BatchNorm layer's output (by name) in one torch forward of ``x`` in that mode (training:
  as ``recipe`` configured it), under no_grad; a layer the forward does not run (GoogLeNet's aux
  heads in eval) is absent. Every module's mode is left as found."""
  import torch

  with recording(layers, {}) as outputs, torch_mode(torch_model, train, recipe), torch.no_grad():
    torch_model(torch.from_numpy(x))
  return outputs


def without_dropout(torch_model) -> Any:
  """Sets dropout and stochastic depth to p=0 in place (torch's random masks cannot be
  reproduced, so a comparison in training mode needs them off): ``Dropout*`` and torchvision's
  ``StochasticDepth`` (``p``), timm's ``DropPath`` and transformers' ``*DropPath`` (``drop_prob``),
  ``MultiheadAttention``'s attention dropout (``dropout``) and timm heads' ``drop_rate``.
  Port the model after this: tracing records the rates. Returns the model."""
  for module in torch_model.modules():
    name = type(module).__name__
    if name.startswith("Dropout") or name == "StochasticDepth":
      module.p = 0.0
    elif name.endswith("DropPath"):  # timm's DropPath; transformers' CvtDropPath, ...
      module.drop_prob = 0.0
    elif name == "MultiheadAttention":  # torch.nn's: a rate, not a module
      module.dropout = 0.0
    if isinstance(getattr(module, "drop_rate", None), float):
      module.drop_rate = 0.0
  return torch_model


def format_table(report: Sequence[LayerDifference]) -> str:
  """Per layer, the worst step in each mode: a readable table."""
  worst: dict[tuple[str, str], LayerDifference] = {}
  for row in report:
    key = (row.layer, row.mode)
    if key not in worst or row.max_rel > worst[key].max_rel:
      worst[key] = row
  layers = list(dict.fromkeys(row.layer for row in report))
  width = max([len(name) for name in layers] + [5])
  lines = [f"{'layer':<{width}}  {'train max rel':>13}  {'eval max rel':>12}  {'mean drift':>10}  {'var drift':>10}"]

  def cell(value, width):
    return f"{value:{width}.2e}" if value is not None else f"{'-':>{width}}"

  def drift(layer, field):
    values = [getattr(r, field) for r in report if r.layer == layer and getattr(r, field) is not None]
    return cell(max(values) if values else None, 10)

  for name in layers:
    train, evaluation = worst.get((name, "train")), worst.get((name, "eval"))
    lines.append(
        f"{name:<{width}}  {cell(train and train.max_rel, 13)}  {cell(evaluation and evaluation.max_rel, 12)}"
        f"  {drift(name, 'mean_drift')}  {drift(name, 'var_drift')}"
    )
  rows = [r.max_rel for r in report]
  lines.append(
      f"{len(layers)} BatchNorm layers, {len({r.step for r in report})} steps; worst relative output"
      f" difference {max(rows):.2e}"
  )
  return "\n".join(lines)
