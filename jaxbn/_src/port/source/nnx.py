"""The classes as Flax NNX source: ``nnx.Module`` classes that build their layers in ``__init__``
at torch's attribute names (``model.layer1[0].bn1.mean``) and run them in ``__call__``, with
NNX's mode (``model.train()`` / ``model.eval()``)."""

from __future__ import annotations

import dataclasses
import inspect
import keyword
from typing import Any

import flax.linen as nn
import torch
from flax import nnx

from jaxbn._src.errors import PortError
from jaxbn._src.linen.batch_norm import BatchNorm
from jaxbn._src.linen.frozen import FrozenBatchNorm
from jaxbn._src.nnx.batch_norm import BatchNorm as NnxBatchNorm
from jaxbn._src.nnx.frozen import FrozenBatchNorm as NnxFrozenBatchNorm
from jaxbn._src.port.leaves import Leaf
from jaxbn._src.port.recipe import TrainingRecipe
from jaxbn._src.port.source import linen as base
from jaxbn._src.port.source.classes import REQUIRED, Class, Classes, numbered
from jaxbn._src.torchlike import linen
from jaxbn._src.torchlike import nnx as layers


def _num_features(module: torch.nn.Module) -> dict:
  count = getattr(module, "num_features", None)
  return {"num_features": count if count is not None else module.running_mean.shape[0]}


# Linen layer -> (NNX layer, what its constructor needs that the Linen one infers from the input)
NNX_LAYERS: dict[type, tuple[type, Any]] = {
    linen.Conv: (layers.Conv, lambda m: {"in_features": m.in_channels, "kernel_size": tuple(m.kernel_size)}),
    linen.ConvTranspose: (
        layers.ConvTranspose,
        lambda m: {"in_features": m.in_channels, "kernel_size": tuple(m.kernel_size)},
    ),
    linen.Linear: (layers.Linear, lambda m: {"in_features": m.in_features}),
    linen.Embedding: (layers.Embedding, lambda m: {}),
    linen.GroupNorm: (layers.GroupNorm, lambda m: {"num_channels": m.num_channels}),
    linen.LayerNorm: (layers.LayerNorm, lambda m: {}),
    linen.Tensor: (layers.Tensor, lambda m: {}),
    BatchNorm: (NnxBatchNorm, _num_features),
    FrozenBatchNorm: (NnxFrozenBatchNorm, _num_features),
    # Flax's own layers (channels-last source)
    nn.Conv: (nnx.Conv, lambda m: {"in_features": m.in_channels, "out_features": m.out_channels}),
    nn.ConvTranspose: (nnx.ConvTranspose, lambda m: {"in_features": m.in_channels, "out_features": m.out_channels}),
    nn.Dense: (nnx.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features}),
    nn.GroupNorm: (nnx.GroupNorm, lambda m: {"num_features": m.num_channels}),
}


def layer_fields(model: torch.nn.Module):
  """``Classes``' ``layer_fields`` for NNX: the NNX twin of each Linen layer, with the torch
  module's sizes (``in_features``, ``num_features``) its constructor takes."""

  def fields(path: str, leaf: Leaf) -> tuple[type, tuple]:
    prototype = leaf.prototype
    linen_class = next((c for c in type(prototype).__mro__ if c in NNX_LAYERS), None)
    if linen_class is None:
      raise PortError(
          f"emit(api='nnx'): {path} is a {type(prototype).__name__} from custom_modules, a Linen module; NNX source"
          " cannot build it (emit api='linen', or port it with jaxbn.port(api='nnx'))"
      )
    nnx_class, sizes = NNX_LAYERS[linen_class]
    module = model.get_submodule(path) if linen_class is not linen.Tensor else None
    parameters = inspect.signature(nnx_class.__init__).parameters
    values = {**sizes(module)} if module is not None else {}
    flax_own = type(prototype).__module__.startswith("flax.")  # its defaults (initialisers) are NNX's own
    for field in dataclasses.fields(prototype):
      if field.name in parameters and field.name not in values and field.name != "use_running_average":
        value = getattr(prototype, field.name)
        # a number at its default stays a field, so that calls compare field by field (groups=1 and 2)
        if not (flax_own and value is field.default and type(value) not in (int, float)):
          values[field.name] = value
    ordered = [(name, values[name]) for name in parameters if name in values]
    if getattr(prototype, "after", ()):
      ordered.append(("after", prototype.after))
    return nnx_class, tuple(ordered)

  return fields


class Source(base.Source):
  FLAX = ("nnx", nnx)

  def render_class(self, key: tuple, cls: Class) -> str:
    fields = self.classes.fields(key)
    code = numbered(cls.example)
    body = Body(self, fields)
    parameters = body.parameters(code)
    call = body.statements(code)
    declared: dict[str, tuple[str, Any]] = {}
    for index, name in fields.items():
      declared.setdefault(name, (self.annotation([c[index] for c in cls.calls]), cls.default(index)))
    signature = [f"{name}: {annotation}" for name, (annotation, default) in declared.items() if default is REQUIRED]
    signature += [
        f"{name}: {annotation} = {default!r}"
        for name, (annotation, default) in declared.items()
        if default is not REQUIRED
    ]
    init = [f"self.{name} = {name}" for name in declared if name in body.stored]
    if body.uses_mode:
      init.append("self.deterministic = False  # the mode: model.train() / model.eval() set it")
    if body.uses_context:
      init.append('self.rngs = rngs["dropout"].fork()  # dropout draws from it')
    init += body.construction + [
        f"self.{container} = nnx.Dict({base.nested(members, 'nnx.Dict')})"
        for container, members in body.containers.items()
    ]
    init = init or ["del rngs  # no layers"]
    lines = [f"class {self.names[key]}(nnx.Module):", f'  """{base._torch_name(cls.torch_class)} in torch."""', ""]
    lines.append(f"  def __init__(self, {', '.join([*signature, '*', 'rngs: nnx.Rngs'])}):")
    lines += ["    " + line for line in init]
    lines += ["", f"  def __call__(self, {', '.join(parameters)}):"]
    lines += ["    " + line for line in call]
    return "\n".join(lines)


def _self_attribute(attribute: str) -> str:
  """The layer at ``attribute`` of ``self``, also where torch's name is no identifier; a container's
  member (``blocks.2``) by its key."""
  container, _, key = attribute.partition(".")
  if key:
    return f"self.{container}" + "".join(f"[{level!r}]" for level in key.split("."))
  return f"self.{attribute}" if _plain(attribute) else f"getattr(self, {attribute!r})"


def _plain(attribute: str) -> bool:
  return attribute.isidentifier() and not keyword.iskeyword(attribute)


class Body(base.Body):
  """``__call__``'s statements; the layers they call are built in ``construction`` (``__init__``)."""

  def __init__(self, source: Source, fields: dict[int, str]):
    super().__init__(source, fields)
    self.construction: list[str] = []
    self.built: set[str] = set()
    self.stored: set[str] = set()
    self.in_init = False
    self.uses_mode = self.uses_context = False
    self.condition: str | None = None  # while building an optional child: its flag

  def train(self) -> str:
    self.uses_mode = True
    return "not self.deterministic"

  def context(self) -> str:
    self.uses_mode = self.uses_context = True
    return "ctx = ops.Context(not self.deterministic, self.rngs)"

  def field(self, name: str) -> str:
    if self.in_init:
      return name
    self.stored.add(name)
    return f"self.{name}"

  def stochastic(self, function: str, kwargs: str) -> str:
    return f"jaxbn.nnx.Stochastic({function}, {kwargs}, rngs=rngs)"

  def present(self, flag, attribute: str) -> str:
    return f"{_self_attribute(attribute)} is not None"

  def _optional(self, statement: tuple, index: int, last_use: dict) -> list[str]:
    self.in_init = True
    self.condition = self.expression(statement[1])
    self.in_init = False
    try:
      return super()._optional(statement, index, last_use)
    finally:
      self.condition = None

  def _build(self, attribute: str, make) -> str:
    """``self.<attribute>``, built once in ``__init__`` by ``make()`` (rendered with fields as the
    constructor's arguments)."""
    container, _, key = attribute.partition(".")
    if key:  # a member of a ModuleList or ModuleDict its owner calls one by one: in an nnx.Dict
      members, last = base.member_slot(self.containers.setdefault(container, {}), key)
      if last not in members:
        self.in_init = True
        try:
          members[last] = make()
        finally:
          self.in_init = False
        if self.condition is not None:  # a member some calls of the class have: None in the others
          members[last] = f"{members[last]} if {self.condition} else None"
      return _self_attribute(attribute)
    if attribute not in self.built:
      self.built.add(attribute)
      self.in_init = True
      try:
        value = make()
      finally:
        self.in_init = False
      if self.condition is not None:
        value = f"{value} if {self.condition} else None"
      if _plain(attribute):
        self.construction.append(f"self.{attribute} = {value}")
      else:  # torch's name (regnet's ``block1-0``), so that the state's paths stay torch's keys
        self.construction.append(f"setattr(self, {attribute!r}, {value})")
    return _self_attribute(attribute)

  def _layer(self, e) -> str:
    _, cls, fields, attribute, mode, args, kwargs = e

    def make():
      constructor, _ = self._constructor(e)
      return f"{constructor}{', ' if constructor[-1] != '(' else ''}rngs=rngs)"

    layer = self._build(attribute, make)
    call_arguments = [self.expression(a) for a in args] + [f"{k}={self.expression(v)}" for k, v in kwargs]
    return self.activated(fields, f"{layer}({', '.join(call_arguments)})")

  def _held(self, e) -> None:
    """Tensors of a child forward never calls, built in ``__init__``; nothing to call."""
    _, attribute, tensors = e
    if attribute not in self.built and "." not in attribute:  # a container's member: Held says it
      self.construction.append(base.held_comment(attribute))
    self._build(attribute, lambda: f"jaxbn.nnx.Held({self.tensors(tensors)})")

  def _child(self, e) -> str:
    _, key, constants, attribute, args = e

    return f"{self._build(attribute, lambda: self._constructed(key, constants))}({', '.join(self.expression(a) for a in args)})"

  def member(self, call: tuple, name: str, count: tuple, index: str, argument: str, container: bool) -> str:
    """A series' members are built in ``__init__`` at torch's names (``denselayer1``), as torch's
    ``add_module`` makes them; a container's in an ``nnx.Dict`` by torch's keys."""
    _, key, constants, attribute, _ = call
    if f"{attribute}*" not in self.built:
      self.built.add(f"{attribute}*")
      self.in_init = True
      try:
        constructor, total = self._constructed(key, constants), self.expression(count)
      finally:
        self.in_init = False
      if container:
        self.construction.append(
            f"self.{attribute} = nnx.Dict({{{name}: {constructor} for {index} in range({total})}})"
        )
      else:
        self.construction += [f"for {index} in range({total}):", f"  setattr(self, {name}, {constructor})"]
    return f"self.{attribute}[{name}]({argument})" if container else f"getattr(self, {name})({argument})"

  def sequence(self, elements: list[str]) -> str:
    runs = base.repeats(elements)
    if len(runs) == 1 and runs[0][1] != "1":
      return f"jaxbn.nnx.Sequential([{base.loop(*runs[0])}])"
    parts = [element if count == "1" else f"*({base.loop(element, count)})" for element, count in runs]
    return f"jaxbn.nnx.Sequential([{', '.join(parts)}])"

  def _sequential(self, e) -> str:
    _, elements, attribute, args = e

    def make():
      table = self._stages(elements, attribute)
      if table is not None:
        return f"jaxbn.nnx.Sequential([stage(runs, rngs) for runs in {table}])"
      return self.sequence([self._element(x) for x in self._members(elements)])

    return f"{self._build(attribute, make)}({self.expression(args[0])})"

  def _element(self, e) -> str:
    if e[0] == "layer":
      constructor, after = self._constructor(e)
      if after:
        raise PortError("emit: a BatchNormAct layer inside a Sequential")
      return f"{constructor}{', ' if constructor[-1] != '(' else ''}rngs=rngs)"
    if e[0] == "element" and e[1] not in self.source.identities:
      return self._constructed(e[1], e[2])
    return super()._element(e)

  def _constructed(self, key: tuple, constants: tuple) -> str:
    """A child class built with one call's fields."""
    arguments = self.source.field_arguments(key, constants, self.expression)
    return f"{self.source.names[key]}({', '.join([*arguments, 'rngs=rngs'])})"


def module_source(
    classes: Classes, torch_class: type, versions: str, recipe: TrainingRecipe | None = None, axes=None
) -> tuple[str, str, dict]:
  """``model.py`` for NNX: a header, the classes, ``load()``; torch's training recipe
  (``recipe``) as the lists ``load()`` and ``trainable`` use; with ``axes``, the channels-last
  layout's ``INPUT_AXES`` and ``OUTPUT_AXES``."""
  source = Source(classes)
  rendered = [source.render_class(key, cls) for key, cls in classes.classes.items() if key not in source.identities]
  top = source.names[next(reversed(classes.classes))]
  header = f'''"""{base._torch_name(torch_class)} as Flax NNX source, written by jaxbn.emit
({versions}).

One class per torch module class; layers sit at torch's attribute names (``model.layer1[0].bn1``),
so ``jaxbn.convert`` maps torch's state_dict onto them. {base.layout_note(axes)} Load the model
with its weights (``model.safetensors``)::

  model = load()          # in training mode, as a new torch module
  model.eval()            # torch's eval(); model.train() is torch's train()
  y = model(x)

Edit freely: ``load(model=MyEdit(rngs=nnx.Rngs(0)), strict=False)`` loads the weights into an
edited model and keeps the fresh values of what the file lacks.
"""'''
  namedtuples = base.namedtuple_lines(source)
  imports = base.import_lines(
      source,
      base.flax_imports(source, ["from flax import nnx"]),
      "from jaxbn import layers, ops" if source.uses_layers else "from jaxbn import ops",
  )
  keep_eval = (
      "\n  jaxbn.nnx.keep_eval(model, *KEEP_EVAL)  # torch's recipe, above" if recipe and recipe.keep_eval else ""
  )
  loader = f'''def load(path=None, *, model=None, strict=True):
  """``{top}`` (or ``model``, an edited one) with the weights at ``path`` (default:
  {base.WEIGHTS_NAME} beside this file). ``strict=False`` keeps fresh values for what the file
  lacks and leaves out what the model lacks."""
  state_dict = jaxbn.load_state_dict(pathlib.Path(__file__).with_name("{base.WEIGHTS_NAME}") if path is None else path)
  given = model is not None
  if not given:  # shapes only, filled from the file
    model = jaxbn.nnx.uninitialised(lambda rngs: {top}(rngs=rngs))
  jaxbn.convert.from_torch(state_dict, model, strict=strict)  # in place{keep_eval}
  if not given:  # strict=False: fresh values for what the file lacks (an edited model's new layers), only those
    jaxbn.nnx.initialise_missing(model, lambda rngs: {top}(rngs=rngs))
  return model
'''
  trainable = [TRAINABLE] if recipe is not None and recipe.frozen else []
  parts = [header, "\n".join(imports), *base.layout_lines(axes), *base.recipe_lines(recipe)]
  parts += [*base.constants_lines(source), *namedtuples]
  rendered[-1:-1] = base.stage_lines(source, STAGE)  # before the model's class, after the blocks' classes
  return "\n\n\n".join([*parts, *rendered, loader, *trainable]) + "\n", top, source.constants


STAGE = '''def stage(runs, rngs):
  """A stage of blocks from a stage table: each run ``(class, how many, fields)``, in order."""
  return jaxbn.nnx.Sequential([block(**fields, rngs=rngs) for block, count, fields in runs for _ in range(count)])'''


TRAINABLE = '''def trainable(model):
  """What torch trained, as an NNX filter (every ``nnx.Param`` but ``FROZEN``):
  ``nnx.Optimizer(model, tx, wrt=trainable(model))``."""
  return jaxbn.nnx.trainable(model, parameters=FROZEN)
'''
