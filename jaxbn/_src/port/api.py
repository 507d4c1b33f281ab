"""``jaxbn.port``: any torch BatchNorm model as a Flax module and its variables."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx, traverse_util

from jaxbn._src.checkpoints.files import as_numpy, state_dict_to_numpy
from jaxbn._src.checkpoints.recipe import read as read_recipe
from jaxbn._src.checkpoints.rules import from_torch, torch_key
from jaxbn._src.errors import PortError
from jaxbn._src.nnx.freezing import keep_eval as keep_eval_nnx
from jaxbn._src.nnx.freezing import trainable as nnx_trainable
from jaxbn._src.port import layout, leaves, ops
from jaxbn._src.port import recipe as recipes
from jaxbn._src.port.autocast import make as make_autocast
from jaxbn._src.port.graph import Node, Program, Traced, tensor_leaf, trace
from jaxbn._src.port.interpreter import Ported
from jaxbn._src.port.leaves import MODULES, Options, find, user_rule
from jaxbn._src.port.nnx import PortedNNX
from jaxbn._src.port.source.build import load_classes, model_source
from jaxbn._src.torchlike.nnx import uninitialised
from jaxbn._src.variables.freezing import frozen_mask, layers_holding_stats
from jaxbn._src.variables.state import as_variables

EXTEND = (
    "Extend the port: custom_modules={TorchClass: factory} (factory(torch_module) returns a Flax"
    " Linen module, called at the torch module's path, whose variables convert.from_torch fills),"
    " custom_ops={torch_function_or_Tensor_method: jax_function} (same arguments as torch's),"
    " leaf_modules=(TorchClass, ...) to keep a module whole instead of tracing into it."
)


@dataclasses.dataclass(frozen=True)
class Port:
  """What ``jaxbn.port`` returns: ``module, variables = port`` unpacks like a pair.

  Attributes:
    module: a ``Ported`` Linen module, or for ``api="nnx"`` the ``nnx.Module``.
    variables: its variables, converted from the torch model (NNX: its ``nnx.state``).
    recipe: how torch trains the model beyond ``model.train()`` (``TrainingRecipe``): the layers
      it keeps in eval (already part of ``module``'s training forward) and the parameters it does
      not train (for the optimiser: ``frozen_mask``, ``trainable``).
  """

  module: Any
  variables: Any
  recipe: recipes.TrainingRecipe = recipes.TrainingRecipe()

  # a pair, as before the recipe: ``module, variables = port``, ``port[0]``
  def __iter__(self):
    return iter((self.module, self.variables))

  def __getitem__(self, index):
    return (self.module, self.variables)[index]

  def __len__(self):
    return 2

  @property
  def frozen_mask(self) -> Any:
    """True for every parameter torch does not train (``requires_grad=False``, FrozenBatchNorm2d's
    buffers, those of modules forward never calls): ``jaxbn.keep_frozen(tx, port.frozen_mask)`` is
    torch's optimiser step."""
    return frozen_mask(self.variables, parameters=self.recipe.frozen)

  @property
  def trainable(self) -> Any:
    """For ``api="nnx"``: the NNX filter of what torch trains, ``nnx.Optimizer(model, tx,
    wrt=port.trainable)`` and ``nnx.grad(..., argnums=nnx.DiffState(0, port.trainable))``."""
    if not isinstance(self.module, nnx.Module):
      raise TypeError(
          "Port.trainable is the NNX filter of an api='nnx' port; for a Linen port use"
          " jaxbn.keep_frozen(tx, port.frozen_mask)."
      )
    return nnx_trainable(self.module, parameters=self.recipe.frozen)


def port(
    torch_model: torch.nn.Module,
    example_input: Any,
    *,
    dtype: Any = None,
    autocast: Any = None,
    autocast_device: str | None = None,
    axis_name: str | None = None,
    custom_modules: dict[type, Callable[[torch.nn.Module], nn.Module]] | None = None,
    custom_ops: dict[Callable, Callable] | None = None,
    leaf_modules: tuple[type, ...] = (),
    strict: bool = True,
    api: str = "linen",
    rngs: Any = None,
    recipe: str = "as_configured",
    static_inputs: dict[str, Any] | None = None,
    through_forward: tuple[type, ...] = (),
) -> Port:
  """A torch model as a Flax Linen module with the same module paths, and its variables.

  torch.fx traces the model's train and eval forwards (they may differ: aux heads, dropout);
  BatchNorm layers become ``jaxbn.BatchNorm(axis=1)`` with each torch layer's eps, momentum,
  affine and track_running_stats (FrozenBatchNorm2d: ``jaxbn.FrozenBatchNorm``), other modules
  and ops their torch-exact JAX twins (``jaxbn.port_supported()`` lists them). Weights and running
  statistics come through ``jaxbn.convert.from_torch``, so ``to_torch``, ``parity.compare``,
  ``freeze``, ``frozen_mask``, ``eval_mode`` and ``fold_batchnorm`` work on the result unchanged.

  Args:
    torch_model: the model; its mode is restored after tracing, nothing else is changed.
    example_input: a tensor or array in torch's layout (NCHW), or a tuple of them: the shapes
      the variables are created for.
    dtype: cast floating variables (and the layers' param_dtype) to this; default: the torch
      model's. That is torch's ``model.to(dtype)``, running statistics included; for mixed
      precision use ``autocast``.
    autocast: ``jnp.bfloat16`` or ``jnp.float16``: the forward runs as inside
      ``torch.autocast(device_type=autocast_device, dtype=autocast)``: the ops on torch's
      lower-precision list (convolutions, linear layers, matmul, scaled_dot_product_attention) in
      this dtype, those on its float32 list in float32, the rest in their inputs' dtype; variables
      stay in ``dtype`` (float32), BatchNorm's statistics and updates in float32.
    autocast_device: whose lists: ``"cpu"`` or ``"cuda"`` (they differ: CUDA's float32 list holds
      softmax, layer_norm, exp, pow, sum, interpolation); default: JAX's backend (``"cuda"`` on GPU).
    axis_name: the mapped axis over which SyncBatchNorm layers merge statistics.
    custom_modules: ``{torch class: factory}``: ``factory(torch_module)`` returns an unbound
      Flax Linen module used at that module's path (it gets the mode through a ``train``,
      ``use_running_average`` or ``deterministic`` keyword, if its ``__call__`` has one).
    custom_ops: ``{torch function or Tensor method: jax function}`` with torch's arguments.
    leaf_modules: classes to keep whole rather than trace into (give them custom_modules).
    strict: the state_dict must fit the ported variables exactly (as ``load_state_dict``).
    api: ``"linen"``, or ``"nnx"`` for a native ``nnx.Module``: the classes ``jaxbn.emit(api="nnx")``
      writes, built in memory, holding the converted variables (``model.layer1[0].bn1.mean``;
      ``model.train()`` / ``model.eval()``; every ``jaxbn.nnx`` tool); ``variables`` is then its
      ``nnx.state``. With ``custom_modules`` (Linen modules), ``custom_ops`` or ``autocast``, or
      where NNX source cannot say the model yet (a container in a container called member by
      member), a ``PortedNNX`` (flax's Linen-to-NNX bridge over the Linen port) instead.
    rngs: for ``api="nnx"``: the ``nnx.Rngs`` the model is built with and dropout draws from
      (default ``nnx.Rngs(0)``).
    recipe: ``"as_configured"``: the training forward is the torch model's as configured when it
      is in train mode (modules put back into ``eval()`` stay in eval), and ``Port.recipe`` says
      which parameters torch does not train (``requires_grad=False``); a warning says so when
      that is not plain ``model.train()``. ``"plain"``: ``model.train()``, every parameter trained.
    static_inputs: keyword inputs of ``forward`` that choose what it does (``{"return_dict":
      False}``), traced at these values (fx's ``concrete_args``); the ported model takes them by the
      same names, defaulting to these values, and refuses others with torch's message. Other
      optional keywords keep their defaults, and ``*args`` / ``**kwargs`` the example does not fill
      are empty; a keyword the trace never read (its default decided a branch) is refused at apply
      time rather than ignored.
    through_forward: ``torch.autograd.Function`` subclasses whose backward is the derivative of
      their forward (a memory-efficient swish): traced through their forward, so JAX
      differentiates it, once the claim holds on the example in float64 (torch's backward against
      autograd of the forward, within 1e-8 of the largest gradient); else a PortError naming the
      Function. Without it every Function is refused by name.

  Returns ``Port(module, variables, recipe)``, which unpacks as ``module, variables``:
  ``module.apply(variables, x)`` is torch's eval forward; ``module.apply(variables, x, train=True,
  mutable=["batch_stats"], rngs={"dropout": key})`` its training forward, with torch's
  running-statistic updates; ``jaxbn.keep_frozen(tx, port.frozen_mask)`` its optimiser.

  Raises PortError listing every unsupported module and op with its path and source line, and
  what torch runs that the port would drop (hooks, parametrizations).

  Example::

    >>> import torch, torchvision, jaxbn                                     # doctest: +SKIP
    >>> net = torchvision.models.mobilenet_v3_small()                        # doctest: +SKIP
    >>> module, variables = jaxbn.port(net, torch.zeros(1, 3, 64, 64))       # doctest: +SKIP
    >>> logits = module.apply(variables, x)                                  # doctest: +SKIP
  """
  return traced_port(
      torch_model,
      example_input,
      dtype=dtype,
      autocast=autocast,
      autocast_device=autocast_device,
      axis_name=axis_name,
      custom_modules=custom_modules,
      custom_ops=custom_ops,
      leaf_modules=leaf_modules,
      strict=strict,
      api=api,
      rngs=rngs,
      recipe=recipe,
      static_inputs=static_inputs,
      through_forward=through_forward,
  )[0]


def traced_port(
    torch_model,
    example_input,
    *,
    dtype=None,
    autocast=None,
    autocast_device=None,
    axis_name=None,
    custom_modules=None,
    custom_ops=None,
    leaf_modules=(),
    strict=True,
    api="linen",
    rngs=None,
    recipe="as_configured",
    static_inputs=None,
    through_forward=(),
) -> tuple[Port, Traced]:
  """``port``, and the traced programs it runs (for ``jaxbn.emit``)."""
  if not isinstance(torch_model, torch.nn.Module):
    raise TypeError(f"port takes a torch.nn.Module, got {type(torch_model).__name__}")
  if api not in ("linen", "nnx"):
    raise ValueError(f"api must be 'linen' or 'nnx', not {api!r}")
  if recipe not in recipes.RECIPES:
    raise ValueError(f"recipe must be one of {recipes.RECIPES}, not {recipe!r}")
  torch_recipe = read_recipe(torch_model) if recipe == "as_configured" else None
  state_dict = state_dict_to_numpy(torch_model.state_dict())
  floating = [v.dtype for v in state_dict.values() if np.issubdtype(v.dtype, np.floating)]
  options = Options(
      param_dtype=jnp.dtype(dtype) if dtype is not None else (floating[0] if floating else jnp.float32),
      axis_name=axis_name,
      autocast=make_autocast(autocast, autocast_device),
  )
  modules = {**MODULES, **{cls: user_rule(factory) for cls, factory in (custom_modules or {}).items()}}
  if find(torch_model, modules) is not None:
    raise PortError(
        f"the model is a single {type(torch_model).__name__}, which the port runs as one piece inside a"
        f" model: port torch.nn.Sequential(model) (its paths gain a leading '0.')."
    )
  custom_ops = {
      (getattr(torch.Tensor, key) if isinstance(key, str) else key): ops.OpRule(fn)
      for key, fn in (custom_ops or {}).items()
  }
  leaf_modules = tuple(leaf_modules)
  _refuse_shared_tensors(torch_model)
  recipes.refuse(
      recipes.refused_state(torch_model, lambda m: isinstance(m, leaf_modules) or find(m, modules) is not None),
      type(torch_model).__name__,
  )
  traced = trace(
      torch_model,
      _torch_examples(example_input, torch_model),
      options,
      modules,
      custom_ops,
      leaf_modules,
      torch_recipe,
      static_inputs,
      tuple(through_forward),
  )
  if traced.problems:
    lines = "\n".join(f"  - {p}" for p in traced.problems)
    raise PortError(f"{type(torch_model).__name__}: {len(traced.problems)} unsupported node(s):\n{lines}\n{EXTEND}")
  held = _uncalled(state_dict, traced, strict)
  if held:
    parameters = {name for name, _ in torch_model.named_parameters()}
    traced = _holding(traced, {key: state_dict[key] for key in held}, parameters, options)
  order = {name: i for i, (name, _) in enumerate(torch_model.named_modules())}  # the recipe in torch's order
  mode_leaves = sorted((path for path, leaf in traced.leaves.items() if leaf.mode is not None), key=order.get)
  in_eval = recipes.kept_in_eval(torch_recipe, mode_leaves)
  keep_eval = recipes.covering_prefixes(set(in_eval), [tuple(path.split(".")) for path in mode_leaves])
  module = Ported(
      traced.programs[True],
      traced.programs[False],
      tuple(sorted(traced.leaves.items())),
      type(torch_model).__name__,
      keep_eval,
  )
  inputs = tuple(as_numpy(x) for x in (example_input if isinstance(example_input, (tuple, list)) else (example_input,)))
  if axis_name is not None and not any(getattr(leaf.prototype, "axis_name", None) for leaf in traced.leaves.values()):
    warnings.warn(
        f"port(axis_name={axis_name!r}): {type(torch_model).__name__} has no SyncBatchNorm, so no layer"
        " merges statistics over that axis. Convert the torch model first:"
        " torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).",
        stacklevel=2,
    )
  if api == "nnx":
    nnx_module = None
    if not (custom_modules or custom_ops or options.autocast is not None):  # the user's parts, autocast: the bridge
      try:
        text, name, constants = model_source(traced, torch_model, example_input, "nnx")
      except PortError:  # what NNX source cannot say yet (a ModuleList in a ModuleList): the bridge holds it
        text = None
      if text is not None:
        model_class = load_classes(text, name, constants)[name]
        nnx_module = uninitialised(lambda rngs: model_class(rngs=rngs), rngs)  # the arrays come from the state_dict
        if not strict and from_torch(state_dict, nnx_module, strict=False, dtype=dtype).missing:
          nnx_module = model_class(rngs=rngs or nnx.Rngs(0))  # fresh values for what the state_dict lacks
    if nnx_module is None:
      nnx_module = PortedNNX(module, rngs=rngs or nnx.Rngs(0)).lazy_init(*inputs)  # keep_eval in the Linen port
    elif keep_eval:
      keep_eval_nnx(nnx_module, *recipes.flax_paths(keep_eval))
    from_torch(state_dict, nnx_module, strict=strict, dtype=dtype)  # in place
    result = Port(nnx_module, nnx.state(nnx_module))
  else:
    template = jax.eval_shape(lambda *xs: module.init(jax.random.key(0), *xs), *inputs)
    result = Port(module, from_torch(state_dict, template, strict=strict, dtype=dtype).variables)
  if torch_recipe is not None:
    position = {key: i for i, key in enumerate(state_dict)}
    params = sorted(
        traverse_util.flatten_dict(as_variables(result.variables).get("params", {})),
        key=lambda path: position.get(torch_key("params", path), len(position)),
    )
    frozen = recipes.frozen_parameters(torch_recipe, params)
    frozen |= {path for path in params if torch_key("params", path) in held}  # never given a gradient
    frozen_layers = layers_holding_stats(set(params))  # FrozenBatchNorm2d's buffers: never trained anyway
    buffers = {path for path in params if path[:-1] in frozen_layers}
    recipe = recipes.TrainingRecipe(
        recipes.flax_paths(keep_eval), recipes.flax_paths(recipes.covering_prefixes(frozen, params, buffers))
    )
    recipes.notice(recipe, type(torch_model).__name__, len(in_eval), len(frozen), api)
    recipes.warn_eval_with_training_modules(torch_recipe, type(torch_model).__name__)
    result = dataclasses.replace(result, recipe=recipe)
  return result, traced


def _torch_examples(example_input, torch_model) -> tuple[torch.Tensor, ...]:
  """The example inputs as torch tensors in the model's floating dtype, for the trace's decisions."""
  floating = next((p.dtype for p in torch_model.parameters() if p.is_floating_point()), torch.float32)
  inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
  arrays = (as_numpy(x) for x in inputs)
  return tuple(
      torch.from_numpy(a.astype(np.float32)).to(floating)
      if jnp.issubdtype(a.dtype, jnp.floating)
      else torch.from_numpy(a)
      for a in arrays
  )


def _refuse_shared_tensors(model) -> None:
  """Refuses a model that holds one tensor at more than one state_dict key: a module at two paths,
  or weights tied across modules (transformers' PP-DocLayoutV3: ``decoder.class_embed.weight`` is
  ``enc_score_head.weight``). torch trains the one tensor with the gradients of every use; the port
  would hold a copy per key, train them apart and write a stale one back."""
  keys: dict[int, list[str]] = {}
  for key, tensor in model.state_dict(keep_vars=True).items():
    keys.setdefault(id(tensor), []).append(key)
  shared = [names for names in keys.values() if len(names) > 1]
  if shared:
    listed = "; ".join(" is ".join(names) for names in shared[:8]) + ("; ..." if len(shared) > 8 else "")
    raise PortError(
        f"{type(model).__name__} holds {len(shared)} tensor(s) at more than one state_dict key ({listed}): a"
        " module at two paths, or weights tied across modules. torch trains each as one tensor with the"
        " gradients of every use; the port would hold a copy per key and train them apart, so it refuses."
        " Untie them before porting (each module its own copy, as torch then trains them too), or share"
        " them in Flax yourself after porting."
    )


def _uncalled(state_dict, traced, strict) -> list[str]:
  """The state_dict keys of modules that neither forward calls (smp's encoders keep the stages
  and heads a shallower depth leaves out): held as they are (``_holding``). Weights of modules the
  port runs as stateless calls (a custom_modules factory's function) would be dropped: refused."""
  # a leaf holds the keys under its path, or is the key (a Tensor leaf)
  unheld = [key for key in state_dict if not any(key == leaf or key.startswith(leaf + ".") for leaf in traced.leaves)]
  holders = sorted({key.rpartition(".")[0] or "<top>" for key in unheld})
  if not holders or not strict:
    return []

  def caller(path):  # the module run as a stateless call that holds ``path``, if any
    return next((c for c in traced.stateless if path == c or path.startswith(c + ".")), None)

  def described(path):
    owner = caller(path)
    return f"{path} ({'' if owner == path else f'in {owner}, '}a {traced.stateless[owner]})"

  as_calls = [path for path in holders if caller(path)]
  if as_calls:
    raise PortError(
        f"{len(as_calls)} torch module(s) hold weights or buffers that the port runs as a stateless call, so"
        f" they have no place: {', '.join(map(described, as_calls))}. Give custom_modules a factory that returns a Flax module holding them (it gets them at"
        " the torch path), or pass strict=False to leave them out."
    )
  return unheld


def _holding(traced, tensors: dict[str, np.ndarray], parameters: set[str], options: Options):
  """``traced`` with ``tensors`` held at their torch paths as Tensor leaves the programs make and
  never read: in the variables (a state_dict round trip keeps them), never changed by a training
  step, and frozen in the recipe, as torch's optimiser skips a parameter with no gradient."""
  leaves = dict(traced.leaves)
  nodes = []
  for index, (key, array) in enumerate(tensors.items()):
    leaves[key] = tensor_leaf(array, options, "params" if key in parameters else "buffers")
    nodes.append(Node(f"held_{index}", "module", key))
  programs = {mode: Program((*p.nodes[:-1], *nodes, p.nodes[-1])) for mode, p in traced.programs.items()}
  return dataclasses.replace(traced, programs=programs, leaves=leaves, held=tuple(tensors))


def supported() -> dict[str, list[str]]:
  """What the port runs: torch module classes and torch functions / Tensor methods."""
  return {"modules": leaves.supported(), "functions and methods": ops.supported()}


def supported_markdown() -> str:
  """The README's list of what the port runs, generated from the two tables, and of what
  channels-last source carries, from the layout pass's."""
  table = supported()
  lines = []
  for title, names in table.items():
    lines.append(f"**{title[0].upper() + title[1:]}** ({len(names)}): " + ", ".join(f"`{n}`" for n in names))
  carried = layout.carried()
  lines.append(
      f'**Carried channels-last** by `jaxbn.emit(layout="NHWC")` ({len(carried)} of the'
      f" {len(table['functions and methods'])}, and the modules that call them; convolutions, Linear,"
      " BatchNorm, GroupNorm and LayerNorm as layers): "
      + ", ".join(f"`{n}`" for n in carried)
      + ". The others run in torch's layout, between transposes."
  )
  return "\n\n".join(lines)
