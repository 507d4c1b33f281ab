"""The model's call tree as classes: one per torch module class, shared by every call whose code
has the same shape, with what differs between those calls (channels, strides) as its fields.

A block's code is a list of statements over expressions (plain tuples, so that two calls' code
can be compared): ``("const", value, label)`` for every number, string or tuple in it,
``("var", name)`` for a value, ``("train",)`` for the mode, and calls of layers, children and
functions. A class's *shape* is its code with the constants taken out (``skeleton``); the
constants whose values differ between the calls become the class's fields, those that do not
stay literals.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import itertools
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen
import torch
from flax import nnx

from jaxbn._src.errors import PortError
from jaxbn._src.port.graph import Aggregate, Node, Ref, Slice, Static, references
from jaxbn._src.port.leaves import Constant, Leaf, Metadata
from jaxbn._src.port.source.tree import Block, called
from jaxbn._src.port.tracer import Guard
from jaxbn._src.torchlike import functional

OPAQUE = (Guard, Constant, Metadata, Static)  # op targets that are not functions of the previous value

SEQUENTIAL_FORWARD = torch.nn.Sequential.forward


def identity_input(statement, identities=frozenset()) -> str | None:
  """The variable an assignment of an identity reads: ``y = ops.identity(x)`` (timm's
  ``nn.Identity()``, ``.contiguous()``) or a call of a class key in ``identities`` (a class that
  returns its input) gives ``"x"``; any other statement None."""
  if statement[0] != "assign" or len(statement[1]) != 1 or statement[2][0] not in ("op", "call"):
    return None
  expression = statement[2]
  if expression[0] == "op":
    identity, args = getattr(expression[1], "fn", None) is functional.identity, expression[2]
  else:
    identity, args = expression[1] in identities, expression[4]
  return args[0][1] if identity and args and args[0][0] == "var" else None


@dataclasses.dataclass
class Class:
  """One emitted class: its torch class, its code's shape, and every call's constants.

  ``optional``: constant index -> the index of the flag constant of the optional child call it is
  part of (a torch submodule that some calls have and others have not: ResNet's ``downsample``).
  """

  torch_class: type
  skeleton: tuple
  labels: list  # one per constant of the skeleton, for field names
  example: tuple  # one call's code (statements with its value names), to render
  calls: list[list[Any]] = dataclasses.field(default_factory=list)  # each call's constants
  keys: list[str] = dataclasses.field(default_factory=list)  # each call's key
  optional: dict[int, int] = dataclasses.field(default_factory=dict)
  head: int | None = None  # the model's class: the constant of its last Linear's output size
  stateless: frozenset = frozenset()  # attributes of the stateless modules its calls run as ops (pool)

  def fields(
      self, label=str, sizes: bool = False, shape=lambda label: None, named=None, written=lambda label: True
  ) -> dict[int, str]:
    """Constant index -> field name, for the constants whose values differ between calls, and
    with ``sizes`` every size (``*features``, its layers' and its children's, a ``groups`` above
    one equal to a size: depthwise) and a loop's count even where all calls agree. Equal columns
    share one field, named after the first; a constant of an optional call shares the field of a
    column it equals wherever the call is made, and is a literal where it is constant there. In a
    class called once, equal values say nothing of design: each layer's output size is a field of its own (was
    DenseNet's ``transition1`` reading the dense layers' bottleneck width, both 128) but where it is
    one layer's in members built alike (``_once``), and an input size reads the latest output size it
    equals (NNX's ``num_features=conv0_out_features``). A size a guard expects shares a field only
    with those of its torch name (``shape(label)``: an input's height is no width where they are equal).
    ``head`` is the field ``num_classes``; ``named``: index -> a name for it (the torch attribute
    it is), in place of its label's. ``written(label)``: whether the constant reaches the source (a
    child's constant the child writes as a literal does not: it differs between calls only where
    some make the child's optional part and others do not)."""
    columns: dict[tuple, str] = {}
    produced: list[tuple[tuple, str, str]] = []  # called once: output sizes' (column, field, role), in order
    fields: dict[int, str] = dict.fromkeys(self._heads(), "num_classes")
    taken: set[str] = set(fields.values())
    flags = set(self.optional.values())
    texts = [label(x) for x in self.labels] if sizes else []
    size_columns = {self._column(i) for i, text in enumerate(texts) if text.endswith("features")}
    steps = [i for i, label in enumerate(self.labels) if isinstance(label, tuple) and label[0] in ("step", "rest")]
    counts = self._loop_counts() if sizes else set()
    # a series' size step, and the size of members after the first, after the sizes, so that they
    # read the size they equal (a growth rate; HGNetV2's ``mid_chs``)
    for index in [*(i for i in range(len(self.labels)) if i not in steps), *steps]:
      if index in fields or not written(self.labels[index]):
        continue
      if index in counts:  # a field of its own: equal to a size or another count by chance
        fields[index] = _untaken(_identifier(label(self.labels[index])), taken)
        continue
      size = (
          sizes
          and shape(self.labels[index]) is None
          and (  # a guard's size: no layer's
              texts[index].endswith("features")
              or (self._depthwise(index, texts[index]) or index in steps)
              and self._column(index) in size_columns
          )
      )
      present = (
          [i for i, call in enumerate(self.calls) if call[self.optional[index]]] if index in self.optional else None
      )
      rows = present if present is not None else range(len(self.calls))
      size = size and any(self.calls[i][index] is not None for i in rows)  # None: a layer no call has
      column = tuple(value_key(self.calls[i][index]) for i in rows)
      if len(set(column)) <= 1 and index not in flags and not size:
        continue
      if shape(self.labels[index]) is not None:
        column = ("shape", shape(self.labels[index]), *column)
      elif index not in flags and all(type(self.calls[i][index]) is bool for i in rows):
        # flags equal by chance say nothing of each other: one shares a field only with flags of
        # its name (a stage's blocks' ``with_identity``), not another's (``with_vertical_conv``)
        column = ("flag", re.sub(r"\d+", "#", label(self.labels[index])), *column)
      if present is not None:
        shared = next(
            (n for (c, n) in columns.items() if len(c) == len(self.calls) and _restricted(c, present) == column), None
        )
        if shared is not None:
          fields[index] = shared
          continue
        column = ("optional", *column)
      if sizes and len(self.calls) == 1 and present is None:
        fields[index] = self._once(index, texts[index], column, produced, columns, taken, label)
        continue
      if column not in columns:
        columns[column] = _untaken(_identifier((named or {}).get(index) or label(self.labels[index])), taken)
      fields[index] = columns[column]
    return fields

  def _once(self, index: int, text: str, column: tuple, produced: list, columns: dict, taken: set, label) -> str:
    """The field of a size in a class called once (see ``fields``). Output sizes of one role (the
    same layer in members of a container built alike: ``cv2_0_0_conv`` and ``cv2_1_0_conv``, or a
    child's one field that several of its constants read) share a field where they are equal."""
    output = text.endswith("features") and not text.endswith(("in_features", "num_features"))
    role = "_".join("#" if part.isdigit() else part for part in re.split(r"[._]", text))
    for value, name, made in reversed(produced):
      if value == column and (made == role or not output):
        return name
    if not output and column in columns:
      return columns[column]
    name = _untaken(_identifier(label(self.labels[index])), taken)
    if output:
      produced.append((column, name, role))
    else:
      columns[column] = name
    return name

  def _depthwise(self, index: int, text: str) -> bool:
    """A convolution's group count that some call sets to more than one: tied to a size where it
    equals one (depthwise); ``groups=1`` (no grouping) or BatchNorm's ``axis_index_groups`` that
    merely equal a size (a layer with one output) are not."""
    grouping = re.search(r"(^|_)(groups|feature_group_count)$", text) and not text.endswith("axis_index_groups")
    return bool(grouping) and any(isinstance(call[index], int) and call[index] > 1 for call in self.calls)

  def _heads(self) -> list[int]:
    """The constants of the classifier's output size: ``head``, and the same layer's in the other
    mode's branch (where train and eval differ, each branch calls it)."""
    if self.head is None:
      return []
    return [i for i, label in enumerate(self.labels) if label == self.labels[self.head]]

  def _column(self, index: int) -> tuple:
    return tuple(value_key(call[index]) for call in self.calls)

  def _loop_counts(self) -> set[int]:
    """The constants that count a loop's members (``_accumulated``): fields as sizes are, so that
    no class loops ``for i in range(1)``."""
    found = set()

    def walk(e):
      if isinstance(e, tuple) and e and e[0] not in ("call", "element"):  # not a child's own
        if e[0] == "accumulate" and e[2][0] == "hole":
          found.add(e[2][1])
        for x in e:
          walk(x)

    walk(self.skeleton)
    return found

  @property
  def identity(self) -> bool:
    """Its code returns its one input (through identities only): channels-last source's
    torchvision ``Permute``, whose permute moves nothing there."""
    statements = [s for s in self.skeleton if s[0] not in ("inputs", "input")]
    inputs = next((s[1] for s in self.skeleton if s[0] == "inputs"), ())
    if len(inputs) != 1 or not statements or statements[-1][0] != "return":
      return False
    value = inputs[0]
    for statement in statements[:-1]:
      if identity_input(statement) != value:
        return False
      value = statement[1][0]
    return statements[-1][1] == ("var", value)

  def default(self, index: int):
    """A field's default: False for an optional call's flag, None for its constants, the model's
    own value for ``num_classes``; else none."""
    if index in self._heads():
      return self.calls[0][index]
    if index in set(self.optional.values()):
      return False
    return None if index in self.optional else REQUIRED


REQUIRED = object()


# what a Flax module has already (``name``, ``parent``, ``train``, ``apply``), and torch's mode: no field's name
FLAX_MODULE_NAMES = frozenset(dir(flax.linen.Module)) | frozenset(dir(nnx.Module)) | {"name", "parent", "training"}


def module_attributes(module: torch.nn.Module) -> dict[str, Any]:
  """A torch module's own public settings (``vars``: not its submodules, parameters or buffers),
  without torch's mode."""
  return {name: value for name, value in vars(module).items() if not name.startswith("_") and name != "training"}


def _attributes_holding(module: torch.nn.Module, value) -> set[str]:
  """The module's public attributes whose value is ``value`` (of its type), that can name a field."""
  key = value_key(value)
  return {
      name
      for name, held in module_attributes(module).items()
      if name not in FLAX_MODULE_NAMES and value_key(held) == key
  }


def _restricted(column: tuple, rows: list[int]) -> tuple:
  return tuple(column[i] for i in rows)


def value_key(value):
  """Values compared for equality (``1 == 1.0 == True`` in Python; not here)."""
  if isinstance(value, Constant):  # its bytes' digest, not their repr (levit's tables: 300 kB each)
    return ("Constant", value.dtype, value.shape, hashlib.sha1(value.data).hexdigest())
  return (type(value).__name__, repr(value))


def _identifier(label: str) -> str:
  name = re.sub(r"\W+", "_", label).strip("_") or "field"
  return f"f_{name}" if name[0].isdigit() else name


@dataclasses.dataclass
class Code:
  """A call's code before classes are assigned: children as ``("ref", key)``."""

  torch_class: type
  code: tuple
  height: int
  stateless: frozenset = frozenset()  # attributes of the stateless modules it runs as ops


class Classes:
  """The classes of a model's call tree. First every call's code (children by reference), then,
  from the leaves' callers up, classes: a child's class is settled (variants with and without an
  optional child merged) before its caller's code is compared."""

  def __init__(
      self,
      leaves: dict[str, Leaf],
      layer_fields: Callable[[str, Leaf], tuple[type, tuple]] | None = None,
      held: frozenset[str] = frozenset(),
      module_at: Callable[[str], torch.nn.Module] | None = None,
      torch_order: bool = True,
  ):
    """``layer_fields(path, leaf) -> (class, ((field, value), ...))``: how the source builds the
    layer at ``path``; default: the Linen prototype's class and dataclass fields. ``held``: the
    paths of tensors of modules forward never calls (``Traced.held``). ``module_at(path)``: the
    torch module there, whose attributes name the op arguments that differ between its calls.
    ``torch_order``: ops' arguments are in torch's layout (F.pad's amounts name their sides)."""
    self.leaves = leaves
    self.torch_order = torch_order
    self.held = held
    self.module_at = module_at
    self.argument_labels: set[str] = set()  # the labels of ops' arguments (``reshape_3``)
    self.layer_fields = layer_fields or linen_fields
    self.classes: dict[tuple, Class] = {}  # class key -> Class, callers after their children
    self.built: dict[str, tuple] = {}  # call key -> (class key, constants)
    self.codes: dict[str, Code] = {}  # call key -> its code
    self.sequences: set[str] = set()  # call keys of Sequentials written as layers.Sequential
    self._fields: dict[tuple, dict[int, str]] = {}
    self._setting: dict[tuple, set[int]] = {}  # per class: the constants that give each field its value
    self.root: tuple | None = None  # the model's class key, once built

  def build(self, train_root: Block, eval_root: Block) -> tuple:
    """Every class; returns the model's class key."""
    self._collect(train_root, eval_root)
    self._level()
    for height in sorted({code.height for code in self.codes.values()}):
      level: dict[tuple, Class] = {}
      calls = {key: self._resolve(code.code) for key, code in self.codes.items() if code.height == height}
      accumulated = {key: _accumulated(call) for key, call in calls.items()}
      # torch class -> containers some call of it rolls, with their first member's own constants
      rolled: dict[type, dict[str, set[int]]] = collections.defaultdict(dict)
      for key, code in accumulated.items():
        for container, firsts in _rolled_containers(code).items():
          rolled[self.codes[key].torch_class].setdefault(container, set()).update(firsts)
      for key, resolved in accumulated.items():
        torch_class = self.codes[key].torch_class
        if rolled[torch_class]:  # again, rolling those containers as some call of the class does
          resolved = _accumulated(calls[key], {c: frozenset(f) for c, f in rolled[torch_class].items()})
        skeleton, constants, labels = _skeleton(resolved)
        cls = level.setdefault((torch_class, skeleton), Class(torch_class, skeleton, labels, resolved))
        cls.calls.append(constants)
        cls.keys.append(key)
      for class_key, cls in _merge_optional(level).items():
        cls.stateless = frozenset().union(*(self.codes[key].stateless for key in cls.keys))
        self.classes[class_key] = cls
        for key, constants in zip(cls.keys, cls.calls, strict=True):
          self.built[key] = (class_key, constants)
    self.root = self.built[train_root.key][0]
    self.classes[self.root].head = _head(self.classes[self.root].skeleton)
    return self.root

  def _level(self) -> None:
    """Every call of a torch class at the height of its tallest, and its callers above it, so that
    variants with and without an optional child (taller for it: ``se = SqueezeExcite(c) if use_se
    else nn.Identity()``) are compared on one level; not a class with a call below another of its
    own (DLA's trees of trees), nor where classes call each other's variants (no height holds)."""
    callees = {key: _refs(code.code) for key, code in self.codes.items()}
    below: dict[str, set] = {}

    def descendants(key: str) -> set:
      if key not in below:
        below[key] = set().union(*({c, *descendants(c)} for c in callees[key]))
      return below[key]

    nested = {
        self.codes[key].torch_class
        for key in self.codes
        if any(self.codes[c].torch_class is self.codes[key].torch_class for c in descendants(key))
    }
    heights = {key: code.height for key, code in self.codes.items()}
    for _ in range(len(heights) + 1):
      tallest: dict[type, int] = collections.defaultdict(int)
      for key, height in heights.items():
        tallest[self.codes[key].torch_class] = max(tallest[self.codes[key].torch_class], height)
      levelled = {
          key: max(
              1 + max((heights[c] for c in callees[key]), default=-1),
              0 if self.codes[key].torch_class in nested else tallest[self.codes[key].torch_class],
          )
          for key in heights
      }
      if levelled == heights:
        for key, height in heights.items():
          self.codes[key].height = height
        return
      heights = levelled

  # --- phase 1: each call's code -----------------------------------------------------------------

  def _collect(self, train_block: Block | None, eval_block: Block | None) -> int:
    """Records a call's code (after its children's); returns its height (0: calls only layers)."""
    some = train_block or eval_block
    heights = [self._collect_child(*pair) for pair in _child_pairs(train_block, eval_block)]
    blocks = (train_block, eval_block)
    chains = [None if b is None else self._chains(b) for b in blocks]
    # a container is a Sequential in both modes or in neither: both branches build it at one name
    both = set.intersection(*({c for _, c, _ in found.values()} for found in chains if found is not None))
    code = _merge_modes(
        *(
            None if b is None else self._code(b, {i: chain for i, chain in found.items() if chain[1] in both})
            for b, found in zip(blocks, chains, strict=True)
        )
    )
    code = _packed(code)
    height = 1 + max(heights, default=-1)
    stateless = {
        _relative(item.module, some.path).partition(".")[0]
        for block in blocks
        if block is not None
        for item in block.items
        if not isinstance(item, Block)
        and item.module is not None
        and item.module.startswith(f"{some.path}." if some.path else "")
        and item.target.fn is not functional.identity
    }  # not nn.Identity (the source writes no line for it), nor a module held elsewhere (ultralytics'
    # Conv.default_act, one SiLU for every Conv: its torch path is the first Conv's)
    self.codes[some.key] = Code(some.torch_class, code, height, frozenset(stateless))
    return height

  def _collect_child(self, train_block: Block | None, eval_block: Block | None) -> int:
    """A child's code; a torch.nn.Sequential that chains its items has none of its own (it is
    written as ``layers.Sequential``): its height is its items'."""
    some = train_block or eval_block
    if some.torch_class.forward is SEQUENTIAL_FORWARD:
      heights = [self._collect_child(*pair) for pair in _child_pairs(train_block, eval_block)]
      if all(self._sequence(b) is not None for b in (train_block, eval_block) if b is not None):
        self.sequences.add(some.key)
        return max(heights, default=-1)
    return self._collect(train_block, eval_block)

  def _code(self, block: Block, chains: dict) -> tuple:
    """A block's statements, for one mode, with its ``chains`` (``_chains``) as Sequentials."""
    statements = []
    containers = self._called_containers(block)
    index = 0
    while index < len(block.items):
      item = block.items[index]
      if index in chains:
        end, container, elements = chains[index]
        first, last = block.items[index], block.items[end - 1]
        args = (("var", _inputs(first)[0]),)
        statements.append(("assign", (_outputs(last)[0],), ("sequential", elements, container, args)))
        index = end
        continue
      held = self._held(block, index, containers)
      if held is not None:
        end, statement = held
        statements.append(statement)
        index = end
        continue
      if isinstance(item, Block):
        statements.append(self._child(block, item))
      else:
        statements.append(self._node(block, item))
      index += 1
    if block.key:  # a module's forward returns what its caller reads; the model's has an output node
      outputs = tuple(("var", name) for name in block.outputs)
      statements.append(("return", outputs[0] if len(outputs) == 1 else ("tuple", outputs)))
    return _canonical((("inputs", tuple(block.inputs)), *_guarded_once(statements)))

  def _child(self, parent: Block, child: Block) -> tuple:
    attribute = _relative(child.path, parent.path)
    args = tuple(("var", name) for name in child.inputs)
    if child.key in self.sequences:
      elements = _relabelled(self._sequence(child), attribute)
      return ("assign", tuple(child.outputs), ("sequential", elements, attribute, args))
    return ("assign", tuple(child.outputs), ("call", ("ref", child.key), attribute, args))

  def _sequence(self, block: Block) -> tuple | None:
    """A torch.nn.Sequential whose items each take the previous one's value: its elements."""
    elements = []
    previous = block.inputs[0] if len(block.inputs) == 1 else None
    for index, item in enumerate(block.items):
      if isinstance(item, Block):
        attribute = _relative(item.path, block.path)
        if item.inputs != [previous] or len(item.outputs) != 1 or attribute != str(index):
          return None
        element = self._child_element(item, attribute)
        if element is None:
          return None
        elements.append(element)
        previous = item.outputs[0]
        continue
      if item.kind not in ("module", "op") or not _reads_only(item, previous):
        return None
      expression = self._node(block, item)[2]
      if expression[0] == "tensor" or expression[0] == "op" and isinstance(expression[1].fn, OPAQUE):
        return None
      if expression[0] == "layer" and expression[3] != str(index):
        return None
      elements.append(expression)
      previous = item.name
    return tuple(elements) if block.outputs == [previous] else None

  def _child_element(self, item: Block, attribute: str) -> tuple | None:
    """A child called as a Sequential's element at ``attribute``: a Sequential in a Sequential
    (torchvision's Conv2dNormActivation), or a class's call; None for neither."""
    if item.key in self.sequences:
      return ("sequence", _relabelled(self._sequence(item), attribute))
    if item.key in self.codes:
      return ("element", ("ref", item.key), attribute)
    return None

  def _held(self, block: Block, index: int, containers: set[str]) -> tuple[int, tuple] | None:
    """The held tensors from ``index`` on below one attribute of the block's module (a child forward
    never calls; a member of one of ``containers``, those the block calls members of): (end index,
    ``("held", attribute, tensors)``), tensors as ``(path below it, (shape, dtype[, collection]))``;
    None where ``index`` is no such tensor."""

    def below(item) -> tuple[str, str] | None:
      if isinstance(item, Block) or item.kind != "module" or item.target not in self.held:
        return None
      head, _, rest = _relative(item.target, block.path).partition(".")
      if head in containers:  # an uncalled member of a container whose other members are called
        member, _, rest = rest.partition(".")
        head = f"{head}.{member}"
      return (head, rest) if rest else None  # a tensor of the module itself: a Tensor leaf as any other

    first = below(block.items[index])
    if first is None:
      return None
    tensors, end = [], index
    while end < len(block.items) and (found := below(block.items[end])) is not None and found[0] == first[0]:
      prototype = self.leaves[block.items[end].target].prototype
      spec = (tuple(prototype.shape), prototype.dtype)
      tensors.append((found[1], spec if prototype.collection == "params" else (*spec, prototype.collection)))
      end += 1
    return end, ("assign", (), ("held", first[0], ("const", tuple(tensors), f"{first[0]}_tensors")))

  def _called_containers(self, block: Block) -> set[str]:
    """The attributes of the block's containers whose members it calls one by one (``blocks`` for
    ``blocks.0``)."""
    attributes = (_item_attribute(item, block.path) for item in block.items if not self._is_held(item))
    return {a.partition(".")[0] for a in attributes if a and "." in a}

  def _is_held(self, item) -> bool:
    return not isinstance(item, Block) and item.kind == "module" and item.target in self.held

  def _chains(self, block: Block) -> dict[int, tuple[int, str, tuple]]:
    """The runs of items that call a container's members in order, each on the previous one's value
    (``for layer in self.layers: x = layer(x)``), as a Sequential's elements: start index -> (end
    index, the container's attribute, elements). The container's members are called nowhere else in
    the block and the values between them are read by nothing else, so that calling the container as
    a Sequential is the same code."""
    members = [None if self._is_held(item) else _member(_item_attribute(item, block.path)) for item in block.items]
    called = collections.Counter(m[0] for m in members if m is not None)
    # a container with members forward never calls stays a container (they are held in it)
    holding = {_relative(item.target, block.path).partition(".")[0] for item in block.items if self._is_held(item)}
    reads = collections.Counter(name for item in block.items for name in _inputs(item))
    reads.update(block.outputs)
    chains, index = {}, 0
    while index < len(block.items):
      member = members[index]
      if member is None or member[1] != 0 or len(_inputs(block.items[index])) != 1:
        index += 1
        continue
      container, end = member[0], index
      while (
          end < len(block.items)
          and members[end] == (container, end - index)
          and len(_outputs(block.items[end])) == 1
          and (end == index or _inputs(block.items[end]) == _outputs(block.items[end - 1]))
      ):
        end += 1
      inner = [_outputs(block.items[i])[0] for i in range(index, end - 1)]
      complete = called[container] == end - index and container not in holding
      if complete and all(reads[name] == 1 for name in inner):
        elements = self._chain_elements(block, block.items[index:end], container)
        if elements is not None:
          chains[index] = (end, container, elements)
      index = max(end, index + 1)
    return chains

  def _chain_elements(self, block: Block, items: list, container: str) -> tuple | None:
    """A chain's items as a Sequential's elements (see ``_sequence``), labelled under ``container``."""
    elements = []
    for position, item in enumerate(items):
      if isinstance(item, Block):
        element = self._child_element(item, f"{container}.{position}")
        if element is None:
          return None
        elements.append(element)
        continue
      first = item.args[0].name if item.args and isinstance(item.args[0], Ref) else None
      if item.kind != "module" or not _reads_only(item, first):
        return None
      _, cls, fields, attribute, mode, args, kwargs = self._node(block, item)[2]
      elements.append(("layer", cls, fields, str(position), mode, args, kwargs))
    return tuple(elements)

  def _node(self, block: Block, node: Node) -> tuple:
    if node.kind == "input":
      default = _expression(node.args[0], node.target) if node.args else None
      return ("input", node.name, node.target, default)
    if node.kind == "output":
      return ("return", _expression(node.args[0], "output"))
    if node.kind == "unsupported":
      raise PortError(f"emit: {node.target}")
    fn = getattr(node.target, "fn", None)
    if isinstance(fn, Constant):  # a hole: calls holding other tables are one class
      return ("assign", (node.name,), ("tensor", ("const", fn, fn.attribute or "constant")))
    op, names = _argument_labels(node)
    as_given = (lambda value: value) if _indexes(fn) else _listed_numbers_as_tuple
    args = tuple(_expression(as_given(a), label) for a, label in zip(node.args, names, strict=True))
    if fn is functional.pad and len(args) > 1 and self.torch_order:
      args = (args[0], _sides(args[1]), *args[2:])
    kwargs = tuple((k, _expression(as_given(v), f"{op}_{k}")) for k, v in node.kwargs)
    self.argument_labels.update(names, (f"{op}_{k}" for k, _ in node.kwargs))
    if isinstance(fn, Guard) and fn.conversion != "len" and _is_size(fn.expected):
      return ("assign", (node.name,), _sized_guard(fn, args))
    if node.kind == "module":
      attribute = _relative(node.target, block.path)
      leaf = self.leaves[node.target]
      cls, values = self.layer_fields(node.target, leaf)
      fields = tuple((name, ("const", value, f"{attribute}_{name}")) for name, value in values)
      return ("assign", (node.name,), ("layer", cls, fields, attribute, leaf.mode, args, kwargs))
    return ("assign", (node.name,), ("op", node.target, args, kwargs))

  # --- phase 2: children as their classes ------------------------------------------------------

  def _resolve(self, e):
    """``("ref", key)`` children as their class and constants (labelled for field names)."""
    if isinstance(e, tuple) and e:
      if e[0] == "call" and isinstance(e[1], tuple) and e[1][0] == "ref":
        _, (_, key), attribute, args = e
        class_key, constants = self.built[key]
        return ("call", class_key, _labelled(constants, attribute, class_key), attribute, self._resolve(args))
      if e[0] == "element" and e[1][0] == "ref":
        _, (_, key), attribute = e
        class_key, constants = self.built[key]
        return ("element", class_key, _labelled(constants, attribute, class_key))
      if e[0] == "const":
        return e
      if e[0] == "sequential":
        _, elements, attribute, args = e
        return ("sequential", _runs(self._resolve(elements), attribute), attribute, self._resolve(args))
      return tuple(self._resolve(x) for x in e)
    return e

  def label(self, label) -> str:
    """A constant's label as text: a child's constant is named by the child's attribute and field."""
    if isinstance(label, str):
      return label
    if label[0] == "step":  # how a series' member's size goes up from one member to the next
      return f"{self.label(label[1])}_step"
    if label[0] == "rest":  # the value of members after the first (``classes._varying``)
      return self.label(label[1])
    if label[0] == "shape":  # the size a guard expects (``_sized_guard``)
      return label[1]
    _, attribute, key, index = label
    child = self.classes[key]
    return f"{attribute}_{self.fields(key).get(index) or self.label(child.labels[index])}"

  def fields(self, key) -> dict[int, str]:
    """A class's fields (computed once the classes are built: the source asks for each call)."""
    if key not in self._fields:
      cls = self.classes[key]
      self._fields[key] = cls.fields(
          self.label, sizes=key != self.root, shape=self.shape, named=self._named(cls), written=self._written
      )
    return self._fields[key]

  def _written(self, label) -> bool:
    """Whether a constant reaches the source: a child's only where it gives a field of the child
    its value (the first of the constants that share the field: ``field_arguments``)."""
    if isinstance(label, tuple) and label[0] == "child":
      _, _, key, index = label
      if key not in self._setting:
        self._setting[key] = set({name: i for i, name in reversed(self.fields(key).items())}.values())
      return index in self._setting[key]
    return True

  def modules(self, cls: Class) -> list[torch.nn.Module] | None:
    """The torch modules of a class's calls, where each call is one module's."""
    if self.module_at is None:
      return None
    try:
      return [self.module_at(key.partition("@")[0]) for key in cls.keys]
    except AttributeError:  # a call the tree made of no one module
      return None

  def _named(self, cls: Class) -> dict[int, str]:
    """Constant index -> the torch attribute it is, for an op's argument that differs between the
    class's calls and that one attribute of the torch module equals in every call: levit's
    ``ops.reshape(x, b, n, self.num_heads, -1)``, not ``self.reshape_3``."""
    modules = self.modules(cls) if len(cls.calls) > 1 else None
    if modules is None:
      return {}
    named = {}
    for index, label in enumerate(cls.labels):
      column = [call[index] for call in cls.calls]
      if label not in self.argument_labels or len({value_key(v) for v in column}) < 2:
        continue
      held = set.intersection(*(_attributes_holding(m, v) for m, v in zip(modules, column, strict=True)))
      if len(held) == 1:
        named[index] = held.pop()
    return named

  def shape(self, label) -> str | None:
    """The torch name of the size a guard expects (``in_height``), where a constant, its own or a
    child's, is one."""
    if isinstance(label, str) or label[0] in ("step", "rest"):
      return None
    if label[0] == "shape":
      return label[1]
    _, _, key, index = label
    return self.shape(self.classes[key].labels[index])


def _refs(code: tuple) -> set[str]:
  """The keys of the children a call's code calls (``("ref", key)``), its Sequentials' items too."""
  if not (isinstance(code, tuple) and code) or code[0] == "const":
    return set()
  if code[0] == "ref" and len(code) == 2 and isinstance(code[1], str):
    return {code[1]}
  return set().union(*map(_refs, code))


def _runs(elements: tuple, attribute: str) -> tuple:
  """A Sequential's children made the same way several times in a row (a stage's blocks after its
  first, torchvision's ``for _ in range(1, blocks)``) as ``("repeat", element, count)``: the count
  is a constant, so that stages of different depths are one class with the count a field."""
  runs: list = []
  for index, element in enumerate(elements):
    if element[0] != "element":
      runs.append(element)
    elif runs and runs[-1][0] == "repeat" and _same_element(runs[-1][1], element):
      _, first, (_, count, label) = runs[-1]
      runs[-1] = ("repeat", first, ("const", count + 1, label))
    else:
      runs.append(("repeat", element, ("const", 1, f"{attribute}_{index}_repeats")))
  if len(runs) == 1 and runs[0][0] == "repeat":  # the whole Sequential: its depth
    _, element, (_, count, _) = runs[0]
    runs[0] = ("repeat", element, ("const", count, f"num_{attribute}"))
  return tuple(runs)


def _same_element(a: tuple, b: tuple) -> bool:
  """Two resolved elements of one class made with the same values (their labels differ)."""
  return a[1] == b[1] and [value_key(c[1]) for c in a[2]] == [value_key(c[1]) for c in b[2]]


def _head(skeleton: tuple) -> int | None:
  """The constant index of the output size of the last Linear the model's own code calls (its
  classifier), if any: the model's ``num_classes``."""
  found = []

  def walk(e):
    if isinstance(e, tuple) and e:
      if e[0] == "layer" and getattr(e[1], "__name__", "") in ("Linear", "Dense"):
        found.extend(v[1] for name, v in e[2] if name in ("features", "out_features") and v[0] == "hole")
      elif e[0] not in ("call", "element"):
        for x in e:
          walk(x)

  walk(skeleton)
  return found[-1] if found else None


def linen_fields(path: str, leaf: Leaf) -> tuple[type, tuple]:
  """Every field of the Linen layer, so that calls compare field by field (the source leaves out
  defaults)."""
  prototype = leaf.prototype
  return type(prototype), tuple(
      (f.name, getattr(prototype, f.name)) for f in dataclasses.fields(prototype) if f.name not in ("parent", "name")
  )


ALWAYS_WRITTEN = ("momentum", "epsilon")  # a BatchNorm's, even at torch's defaults: what a reader checks first


def _untaken(name: str, taken: set) -> str:
  """``name``, or with underscores after it where a field has it; taken from now on."""
  while name in taken:
    name += "_"
  taken.add(name)
  return name


def _labelled(constants, attribute: str, class_key) -> tuple:
  return tuple(("const", value, ("child", attribute, class_key, i)) for i, value in enumerate(constants))


def _relabelled(elements: tuple, prefix: str) -> tuple:
  """A Sequential's elements with their constants' labels under the Sequential's attribute."""

  def walk(e):
    if isinstance(e, tuple) and e:
      if e[0] == "const" and len(e) == 3 and isinstance(e[2], str):
        return ("const", e[1], f"{prefix}_{e[2]}")
      if e[0] == "element":
        return ("element", e[1], f"{prefix}.{e[2]}")
      return tuple(walk(x) for x in e)
    return e

  return walk(elements)


def _merge_optional(level: dict[tuple, Class]) -> dict[tuple, Class]:
  """Variants of one torch class that differ by child calls some calls make and others do not
  (``if self.downsample is not None``) or by terms some calls add and others do not (a RepVGG
  block's ``if self.identity is not None: out = out + self.identity(x)``), as one class with each
  behind a flag: a variant merges into one that has what it lacks, one such part at a time."""
  classes = dict(level)
  merged = True
  while merged:
    merged = False
    for (key_a, a), (key_b, b) in [(x, y) for x in classes.items() for y in classes.items() if x[0] != y[0]]:
      if a.torch_class is not b.torch_class or b.optional:
        continue
      found = _optional_form(a.example, b.skeleton)
      if found is None:
        continue
      combined = _combine(a, b, *found)
      del classes[key_a], classes[key_b]
      classes[(a.torch_class, combined.skeleton)] = combined
      merged = True
      break
  return classes


MOST_FLAGS = 4  # optional parts of one class: each merge tries every present/absent choice of those it has


def _optional_form(code: tuple, other_skeleton: tuple) -> tuple[tuple, int | None, tuple[bool, ...]] | None:
  """``(code with the part behind a new flag, the statement index of that flag's optional, the
  choice of its earlier flags that gives other_skeleton)``, if leaving one removable part of
  ``code`` out (``_removable``), and the parts already behind flags in or out as chosen, gives code
  of ``other_skeleton``'s shape; no new part where the choice alone does (index None)."""
  flags = [i for i, statement in enumerate(code) if statement[0] == "optional"]
  if len(flags) > MOST_FLAGS:
    return None
  other = _without_placeholders(other_skeleton)
  ours = sum(identity_input(s) is not None for s in code) + sum(
      identity_input(s) is not None for i in flags for s in code[i][2]
  )  # placeholders the code may make, optional parts' included
  sizes = [len(code[i][2]) + 1 for i in flags]  # an optional part's statements where it is made
  for part in [None, *_removable(code)]:
    removed = 0 if part is None else part[1] - part[0] + 1
    for choice in itertools.product((True, False), repeat=len(flags)):
      made = sum(size for size, present in zip(sizes, choice, strict=True) if present)
      # cheap, no code rewritten: as many statements, but for placeholders on either side
      if not len(other) - len(other_skeleton) <= len(code) - removed - len(flags) + made - len(other_skeleton) <= ours:
        continue
      resolved = _resolved(code if part is None else _without(code, *part), choice)
      if _without_placeholders(_skeleton(resolved)[0]) == other:
        if part is None:
          return code, None, choice
        start, end, _, _ = part
        attribute = next(filter(None, map(called_attribute, code[start : end + 1])))
        flag = ("const", True, f"with_{attribute}")
        optional = ("optional", flag, code[start:end], code[end])
        return code[:start] + (optional,) + code[end + 1 :], start, choice
  return None


def _without_placeholders(code: tuple) -> tuple:
  """``code`` without its ``nn.Identity()`` placeholders (what read one reads its input), its values
  renamed in order. The source writes no line for a placeholder, so variants equal but for them are
  one class: a block holding a SqueezeExcite where others hold ``nn.Identity()`` in its place, the
  SqueezeExcite behind a flag."""
  return _canonical(tuple(without_identities(list(code))))


def without_identities(statements: list, read=identity_input, renamed: dict | None = None) -> list:
  """The statements without those that pass a value on unchanged (``read(statement)``: the value
  it passes on, else None): a later read of their value reads their input. ``renamed`` (filled):
  what was left out, and its input, for statements that follow these."""
  kept, renamed = [], {} if renamed is None else renamed
  for statement in statements:
    for old, new in renamed.items():
      statement = substituted(statement, old, new)
    passed = read(statement)
    if passed is not None:
      renamed[statement[1][0]] = passed
      continue
    kept.append(statement)
  return kept


def _removable(code: tuple) -> list[tuple[int, int, str, str]]:
  """The parts of ``code`` that can be behind a flag, as ``(first statement, last statement, the
  value it makes, the value read in its place without it)``: a child call on one value (without
  it, its output is its input), and a term added to a value (without it, the sum is that value):
  the statements that make the term, read by nothing else, and the addition that ends them
  (TextNet's ``y = y + self.horizontal_batch_norm(self.horizontal_conv(x))``)."""
  readers: dict[str, list[int]] = collections.defaultdict(list)
  for index, statement in enumerate(code):
    for name in statement_reads(statement):
      readers[name].append(index)
  parts = []
  for index, statement in enumerate(code):
    if statement[0] != "assign" or len(statement[1]) != 1:
      continue
    output, expression = statement[1][0], statement[2]
    if expression[0] in ("call", "sequential"):
      args = expression[4] if expression[0] == "call" else expression[3]
      if len(args) == 1 and args[0][0] == "var":
        parts.append((index, index, output, args[0][1]))
      continue
    if not (expression[0] == "op" and getattr(expression[1], "fn", None) is functional.add and not expression[3]):
      continue
    args = expression[2]
    if len(args) != 2 or any(a[0] != "var" for a in args) or args[0] == args[1] or index == 0:
      continue
    made = code[index - 1]
    if made[0] != "assign" or len(made[1]) != 1 or made[1][0] not in (args[0][1], args[1][1]):
      continue
    term = made[1][0]
    kept = args[1][1] if term == args[0][1] else args[0][1]
    start, inside = index - 1, {index - 1}
    # earlier statements whose values only the term's statements read are the term's too
    while start > 0 and code[start - 1][0] == "assign" and _reads_only_within(code[start - 1], readers, inside):
      start -= 1
      inside.add(start)
    # a term made by a child or layer, which names its flag (an input added as it is: a skip)
    if readers[term] == [index] and any(called_attribute(code[i]) for i in inside):
      parts.append((start, index, output, kept))
  return parts


def _reads_only_within(statement: tuple, readers: dict, inside: set[int]) -> bool:
  """Whether every value ``statement`` makes is read, and only by statements ``inside``."""
  made = statement[1] if statement[0] == "assign" else ()
  return bool(made) and all(readers[name] and set(readers[name]) <= inside for name in made)


def statement_reads(statement) -> list[str]:
  """The values a statement reads (a child call's arguments, not its class key or constants)."""
  found = []

  def walk(e):
    if isinstance(e, tuple) and e:
      if e[0] == "var" and len(e) == 2:
        found.append(e[1])
      elif e[0] == "call":
        walk(e[4])
      elif e[0] == "assign":
        walk(e[2])
      elif e[0] not in ("const", "element"):
        for x in e:
          walk(x)

  walk(statement)
  return found


def _without(code: tuple, start: int, end: int, output: str, kept: str) -> tuple:
  """``code`` without statements ``start`` to ``end``: what read ``output`` reads ``kept``."""
  return substituted(code[:start] + code[end + 1 :], output, kept)


def _resolved(code: tuple, present: tuple[bool, ...]) -> tuple:
  """``code`` with its optional parts (the ``n``-th: ``present[n]``) written out or left out."""
  out, number = [], 0
  rest = list(code)
  while rest:
    statement = rest.pop(0)
    if statement[0] != "optional":
      out.append(statement)
      continue
    _, _, prefix, last = statement
    if present[number]:
      out += [*prefix, last]
    else:
      made, kept = last[1][0], passed_on(statement)
      rest = [substituted(s, made, kept) for s in rest]
    number += 1
  return tuple(out)


def passed_on(optional: tuple) -> str:
  """The value an optional part's output is where the part is left out: the one its last
  statement reads that its own statements do not make."""
  _, _, prefix, last = optional
  made = {name for s in prefix for name in s[1]}
  return next(name for name in statement_reads(last) if name not in made)


def called_attribute(statement: tuple) -> str | None:
  """The attribute of the child a statement calls (a layer, a class, a Sequential: ``horizontal_conv``),
  if it calls one; an optional part's, its last statement's."""
  if statement[0] == "optional":
    statement = statement[3]
  if statement[0] != "assign":
    return None
  expression = statement[2]
  position = {"call": 3, "layer": 3, "sequential": 2}.get(expression[0])
  return expression[position] if position is not None else None


def substituted(e, old: str, new: str):
  """``e`` reading value ``new`` where it read ``old``; a child call's class key and constants are
  not code of this class, only its arguments are (as linen's ``_reads`` walks)."""
  if isinstance(e, tuple) and e:
    if e[0] == "var" and len(e) == 2:
      return ("var", new) if e[1] == old else e
    if e[0] == "call":
      return (*e[:-1], substituted(e[-1], old, new))
    if e[0] in ("const", "element"):
      return e
    return tuple(substituted(x, old, new) for x in e)
  return e


def _combine(a: Class, b: Class, flagged: tuple, part: int | None, choice: tuple[bool, ...]) -> Class:
  """One class of ``a`` and ``b``: ``flagged`` is ``a``'s code with the new optional part at
  statement ``part`` (None: none new), ``choice`` what ``b`` makes of ``a``'s earlier ones. Each
  call's constants in the combined order: ``a``'s with the new flag True, ``b``'s with every flag
  as it makes the part and None for the constants of the parts it lacks."""
  skeleton, _, labels = _skeleton(flagged)
  numbered_code = numbered(flagged)
  optional, flag_of_statement = {}, {}
  for index, statement in enumerate(numbered_code):
    if statement[0] == "optional":
      flag_of_statement[index] = statement[1][3]
      for constant in _constant_indices(statement[2:]):
        optional[constant] = statement[1][3]
  combined = Class(a.torch_class, skeleton, labels, flagged, optional=optional)
  new_flag = flag_of_statement.get(part)
  earlier = [flag for index, flag in flag_of_statement.items() if index != part]
  present = dict(zip(earlier, choice, strict=True))
  if new_flag is not None:
    present[new_flag] = False
  for calls, keys, theirs in ((a.calls, a.keys, False), (b.calls, b.keys, True)):
    for call, key in zip(calls, keys, strict=True):
      values = iter(call)
      row = []
      for index in range(len(labels)):
        if index == new_flag:
          row.append(not theirs)
        elif theirs and index in present:
          row.append(present[index])
        elif theirs and index in optional and not present[optional[index]]:
          row.append(None)
        else:
          row.append(next(values))
      combined.calls.append(row)
      combined.keys.append(key)
  return combined


def _constant_indices(e) -> list[int]:
  found = []

  def walk(x):
    if isinstance(x, tuple) and x:
      if x[0] == "const" and len(x) == 4:
        found.append(x[3])
      elif x[0] == "call":
        walk(x[2])
        walk(x[4])
      elif x[0] == "element":
        walk(x[2])
      else:
        for y in x:
          walk(y)

  walk(e)
  return found


def _canonical(code: tuple) -> tuple:
  """A block's code with its values named in order of appearance (``v0``, ``v1``): the names the
  trace gave differ between the train and eval programs, and the code is self-contained. A child's
  call keeps its class key and constants as they are (only its arguments, last, name values)."""
  names: dict[str, str] = {}

  def name(n):
    return names.setdefault(n, f"v{len(names)}")

  def walk(e):
    if isinstance(e, tuple) and e:
      if e[0] in ("const", "element"):
        return e
      if e[0] == "call":
        return (*e[:-1], walk(e[-1]))
      if e[0] == "var" and len(e) == 2:
        return ("var", name(e[1]))
      if e[0] == "inputs":
        return ("inputs", tuple(name(n) for n in e[1]))
      if e[0] == "input":
        return ("input", name(e[1]), e[2], walk(e[3]))
      if e[0] == "assign":
        return ("assign", tuple(name(n) for n in e[1]), walk(e[2]))
      return tuple(walk(x) for x in e)
    return e

  return walk(code)


def _guarded_once(statements: list) -> list:
  """A guard the trace took twice on one value (``list(x.chunk(2, 1))`` checks the length twice:
  ultralytics' C2f and C3k2) written once; what read the second reads the first."""
  kept, seen, renamed = [], {}, {}
  for statement in statements:
    for old, new in renamed.items():
      statement = substituted(statement, old, new)
    if statement[0] == "assign" and statement[2][0] == "op" and isinstance(getattr(statement[2][1], "fn", None), Guard):
      check = repr(statement[2][1:])
      if check in seen:
        renamed[statement[1][0]] = seen[check]
        continue
      seen[check] = statement[1][0]
    kept.append(statement)
  return kept


def _packed(code: tuple) -> tuple:
  """A forward that takes a list (DenseNet's layer, ultralytics' ``Concat``) reads its traced
  inputs only as that list, in order (in each mode): such code takes them packed (``("inputs",
  (name,), "*")``, ``def __call__(self, *xs)``) and reads the pack where it read the list, so that
  one class serves every length (was one class per count: ``DenseLayerWith2Inputs`` ..
  ``With48Inputs``)."""
  if code[0][0] != "inputs":
    return code
  inputs = code[0][1]
  listed = tuple(("var", name) for name in inputs)
  found: list[tuple] = []
  reads: collections.Counter = collections.Counter()

  def walk(e, replace=False):
    if not (isinstance(e, tuple) and e) or e[0] in ("const", "element"):
      return e
    if e[0] == "aggregate" and e[1].value in (list, tuple) and e[3] is None and e[2] == listed:
      found.append(e)
      return ("var", inputs[0]) if replace else e
    if e[0] == "var" and len(e) == 2:
      reads[e[1]] += 1
      return e
    if e[0] == "call":
      return (*e[:-1], walk(e[-1], replace))
    return tuple(walk(x, replace) for x in e)

  walk(code[1:])
  if not (inputs and found) or any(reads[name] for name in inputs):  # read only in the list
    return code
  return (("inputs", inputs[:1], "*"), *walk(code[1:], replace=True))


SERIES = re.compile(r"^([A-Za-z_]\w*?[A-Za-z_])(\d+)$")  # a numbered child: denselayer12
MEMBER = re.compile(r"^([A-Za-z_]\w*)\.(\d+)$")  # a container's member: m.0


def _accumulated(code: tuple, class_rolls: Mapping[str, frozenset[int]] | None = None) -> tuple:
  """Children of one class made alike, numbered in a series (``denselayer1``, ``denselayer2``, ..)
  or a container's members in order (``m.0``, ``m.1``, ..), each called on every value before it
  (DenseNet's block: ``features.append(layer(features))``) or on the last one (ultralytics' C2f:
  ``y.extend(m(y[-1]) for m in self.m)``), the whole list then read as one (``torch.cat(y, 1)``).
  Such a run is ``("accumulate", call, count, start, prefix, each, container)``: the first child's
  ``call`` with the series' stem (or the container) for its attribute and no arguments, how many,
  the first number, the values the list starts with, ``"all"`` or ``"last"`` (what each member
  reads), whether the members are a container's; the list's reader reads the run's value. The count
  is a constant, so that blocks of different depths are one class with the count a field (were one
  class per count, each written out member by member: ``_DenseBlockWith24Denselayer``,
  ``C2fWith2M``); a container's run is every call of its members, its first member's constants
  their own where they differ from the others' (HGBlock's input size). ``class_rolls``: what other calls
  of the class roll (``_rolled_containers``): those containers' one-member runs roll too (a container
  of one member is a Sequential; where another call of the class rolls more, the C2f of depth 1 is
  that class), and their first member's constants that differ there are the first member's own
  here too, where they are equal (HGNetV2's blocks whose input size is their width: one class with
  those whose input size differs)."""
  reads: collections.Counter = collections.Counter()
  lists: collections.Counter = collections.Counter()
  members: collections.Counter = collections.Counter()  # container -> calls of its members

  def count(e):
    if not (isinstance(e, tuple) and e) or e[0] in ("const", "element"):
      return
    if e[0] == "var" and len(e) == 2:
      reads[e[1]] += 1
    elif e[0] == "call":
      members[e[3].partition(".")[0]] += 1
      count(e[-1])
    else:
      if e[0] == "aggregate" and e[1].value is list and e[3] is None:
        lists[e[2]] += 1
      if e[0] == "sequential":
        members[e[2]] += 1
      for x in e:
        count(x)

  count(code)
  read_as_list: dict[tuple, tuple] = {}  # a run's whole list -> the run's value

  def rolled(statements: tuple) -> tuple:
    kept, index = [], 0
    while index < len(statements):
      run = _series_run(statements, index, class_rolls or {})
      if run is None:
        kept.append(statements[index])
        index += 1
        continue
      end, prefix, outputs, steps, each, first = run
      made = tuple(("var", y) for y in outputs)
      if each == "last":  # the list: values made before the run, its input, the members' values
        ending = [items for items in lists if items[-len(outputs) - 1 :] == (*prefix, *made)]
        prefix = ending[0][: -len(outputs)] if len(ending) == 1 else ()
        wanted = [2] * (len(outputs) - 1) + [1]  # by the next member and the list; the last by the list
      else:
        wanted = [len(outputs) - k for k in range(len(outputs))]  # by every later member and the list
      values = (*prefix, *made)
      _, key, constants, attribute, _ = first
      container = MEMBER.match(attribute)
      whole = container is None or members[container[1]] == len(outputs)  # a loop builds every member
      if not (prefix and whole) or lists[values] != 1 or [reads[y] for y in outputs] != wanted:
        kept.append(statements[index])  # a value read on its own, or the list not read whole
        index += 1
        continue
      stem, start = (container or SERIES.match(attribute)).groups()
      constants = [("const", c[1], ("child", stem, *c[2][2:])) for c in constants]
      constants = [_varying(c, step, stem) for c, step in zip(constants, steps, strict=True)]
      call = ("call", key, tuple(constants), stem, ())
      total = ("const", len(outputs), f"num_{stem}" if container else f"num_{stem}s")
      accumulate = ("accumulate", call, total, int(start), prefix, each, container is not None)
      kept.append(("assign", (outputs[-1],), accumulate))
      read_as_list[values] = ("var", outputs[-1])
      index = end
    return tuple(kept)

  code = rolled(code)
  if code and code[-1][0] == "modes":
    code = (*code[:-1], ("modes", rolled(code[-1][1]), rolled(code[-1][2])))
  if not read_as_list:
    return code

  def replaced(e):
    if not (isinstance(e, tuple) and e) or e[0] in ("const", "element"):
      return e
    if e[0] == "aggregate" and e[1].value is list and e[3] is None and e[2] in read_as_list:
      return read_as_list[e[2]]
    if e[0] == "call":
      return (*e[:-1], replaced(e[-1]))
    return tuple(replaced(x) for x in e)

  return replaced(code)


def _varying(constant: tuple, step, stem: str) -> tuple:
  """A rolled member's constant (the first member's), as the loop writes it: itself, going up by a
  step (``progression``), or another value after the first member's (``first``)."""
  if isinstance(step, tuple):  # ("first", the other members' value)
    first = ("const", constant[1], ("child", f"{stem}_0", *constant[2][2:]))
    return ("first", first, ("const", step[1], ("rest", constant[2])))
  return ("progression", constant, ("const", step, ("step", constant[2]))) if step else constant


def _rolled_containers(code) -> dict[str, set[int]]:
  """The containers whose members ``_accumulated`` rolled, at any depth of the code, each with
  the constants its first member has of its own (``"first"``)."""
  if not (isinstance(code, tuple) and code) or code[0] in ("const", "element", "call"):
    return {}
  if code[0] == "accumulate" and code[6]:
    _, _, constants, container, _ = code[1]
    return {container: {j for j, constant in enumerate(constants) if constant[0] == "first"}}
  found: dict[str, set[int]] = {}
  for x in code:
    for container, firsts in _rolled_containers(x).items():
      found.setdefault(container, set()).update(firsts)
  return found


def _series_run(statements: tuple, index: int, class_rolls: Mapping[str, frozenset[int]]) -> tuple | None:
  """The run of child calls from ``index`` that ``_accumulated`` rolls: (its end, the values the
  list starts with (``"last"``: the first member's input), each call's value, each constant's step
  from one call to the next (``_steps``); what each member reads, ``"all"`` or ``"last"``; the first
  call). None where fewer than two calls make one; one member of a container in ``class_rolls`` (or a
  one-member Sequential of it) makes one."""

  def series_call(statement):
    if statement[0] != "assign" or len(statement[1]) != 1:
      return None
    expression = statement[2]
    if expression[0] == "sequential" and len(expression[1]) == 1 and expression[1][0][0] == "repeat":
      (_, element, (_, total, _)), attribute, args = expression[1][0], expression[2], expression[3]
      if total != 1 or element[0] != "element" or attribute not in class_rolls or len(args) != 1:
        return None
      expression = ("call", element[1], element[2], f"{attribute}.0", args)  # the one member, called
    if expression[0] != "call":
      return None
    _, key, constants, attribute, args = expression
    match = SERIES.match(attribute) or MEMBER.match(attribute)
    if match is None or not args or any(a[0] != "var" for a in args):
      return None
    return key, [c[1] for c in constants], match[1], int(match[2]), args, expression

  first = series_call(statements[index])
  if first is None:
    return None
  key, values, stem, number, prefix, expression = first
  container = MEMBER.match(expression[3]) is not None
  outputs, columns, end, each = [statements[index][1][0]], [values], index + 1, None
  while end < len(statements) and (call := series_call(statements[end])) is not None:
    if (call[0], call[2]) != (key, stem) or call[3] != number + len(outputs):
      break
    chained = container and len(prefix) == 1 and call[4] == (("var", outputs[-1]),)
    following = "last" if chained else "all" if call[4] == (*prefix, *(("var", y) for y in outputs)) else None
    if following is None or each not in (None, following):
      break
    outputs.append(statements[end][1][0])
    columns.append(call[1])
    each, end = following, end + 1
  firsts = class_rolls.get(stem, frozenset()) if container else frozenset()
  if len(outputs) == 1 and container and stem in class_rolls and len(prefix) == 1:
    return end, prefix, outputs, [("first", v) if j in firsts else 0 for j, v in enumerate(values)], "last", expression
  length, steps = _steps(columns, container, firsts)
  return (index + length, prefix, outputs[:length], steps, each, expression) if length > 1 else None


def _steps(calls: list[list], container: bool, firsts: frozenset[int] = frozenset()) -> tuple[int, list]:
  """How many of ``calls`` (each call's constants) one loop makes, and how each constant goes
  from one call to the next: 0 where it stays, an integer's step where the calls' values go up by it
  (NNX's input sizes: ``num_input_features + i * growth_rate``), or, in a container's members,
  ``("first", the others' value)`` where the first member's differs and the rest agree (timm's
  HGNetV2 block: ``in_chs if i == 0 else mid_chs``), taken where it makes the whole run; ``firsts``:
  constants taken so where they are equal too (another call of the class differs there)."""

  def progressions(rows: list[list]) -> list | None:
    steps = [_step(a, b) for a, b in zip(rows[0], rows[1], strict=True)]
    fits = all(
        step is not None and value_key(value + k * step if step else value) == value_key(row[j])
        for k, row in enumerate(rows)
        for j, (value, step) in enumerate(zip(rows[0], steps, strict=True))
    )
    return steps if fits else None

  def after_first(rows: list[list]) -> list | None:
    rest = rows[1:]
    if any(value_key(row[j]) != value_key(rest[0][j]) for row in rest for j in range(len(row))):
      return None
    differ = {j for j in range(len(rows[0])) if value_key(rows[0][j]) != value_key(rest[0][j])}
    return [("first", value) if j in firsts | differ else 0 for j, value in enumerate(rest[0])]

  if container and len(calls) > 1 and (firsts or progressions(calls) is None):
    steps = after_first(calls)
    if steps is not None:
      return len(calls), steps
  length = next((n for n in range(len(calls), 1, -1) if progressions(calls[:n]) is not None), 1)
  return length, progressions(calls[:length]) if length > 1 else []


def _step(first, second) -> int | None:
  """How a constant goes from one call to the next: 0 where it stays, an integer's difference
  where it goes up (an input size: ``num_input_features + i * growth_rate``), else None."""
  if value_key(first) == value_key(second):
    return 0
  integers = type(first) is int and type(second) is int
  return second - first if integers and second > first else None


def _child_pairs(train_block: Block | None, eval_block: Block | None):
  """The children of a block's two modes, matched by call key: (train child, eval child)."""
  pairs: dict[str, list] = {}
  for mode, block in enumerate((train_block, eval_block)):
    for item in block.items if block is not None else ():
      if isinstance(item, Block):
        pairs.setdefault(item.key, [None, None])[mode] = item
  return [tuple(pair) for pair in pairs.values()]


def _argument_labels(node: Node) -> tuple[str, list[str]]:
  """The op's name and a label per positional argument, for field names (``flatten_start_dim``)."""
  fn = getattr(node.target, "fn", None)
  op = (getattr(fn, "__name__", None) or "op").rstrip("_")  # assert_'s message: assert_message
  try:
    parameters = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
  except (TypeError, ValueError):  # a callable without a signature
    parameters = []
  if getattr(node.target, "context", False):
    parameters = parameters[1:]  # the Context, which the source passes first
  return op, [f"{op}_{parameters[i] if i < len(parameters) else i}" for i in range(len(node.args))]


PAD_SIDES = ("pad_left", "pad_right", "pad_top", "pad_bottom", "pad_front", "pad_back")  # F.pad's order


def _sides(amounts: tuple) -> tuple:
  """F.pad's amounts, each labelled for its side as torch's documentation names it (transformers'
  MobileNetV2 pads as TensorFlow does, from its input's size: ``self.pad_left``, was
  ``self.pad_pad``); channels-last source lists other axes first: not there."""
  if amounts[0] != "aggregate" or len(amounts[2]) > len(PAD_SIDES):
    return amounts
  items = tuple(
      ("const", item[1], side) if item[0] == "const" else item
      for item, side in zip(amounts[2], PAD_SIDES, strict=False)
  )
  return (amounts[0], amounts[1], items, amounts[3])


def _indexes(fn) -> bool:
  """Whether a list in the op's arguments means other than a tuple: an index (``x[[0, 2]]`` takes
  rows, ``x[0, 2]`` one item) or a Python operator's operand (``size == [7, 7]`` is False)."""
  return fn in (functional.getitem, functional.setitem) or getattr(fn, "__module__", None) == "_operator"


def _listed_numbers_as_tuple(value):
  """A list of numbers as a tuple: torch's ``int[]`` arguments take either (efficientnet_pytorch's
  same-padding convolution keeps its stride a list where it is 2, torch's tuple where it is 1: one
  class, was ``Conv2dStaticSamePadding`` and ``...1``)."""
  if isinstance(value, Aggregate) and value.kind.value is list and value.keys is None:
    if all(isinstance(item, (int, float)) for item in value.items):
      return Aggregate(Static(tuple), value.items)
  return value


def _is_size(value) -> bool:
  """An int (not a bool) or a tuple of them: a shape."""
  if isinstance(value, tuple):
    return all(map(_is_size, value))
  return isinstance(value, int) and not isinstance(value, bool)


ASSIGNED = re.compile(r":\s*(\w+)\s*=[^=]")  # a guard's torch line that names its value: in_height = int(...)


def _sized_guard(guard: Guard, args: tuple) -> tuple:
  """A guard on a size (``int(x.shape[-2])`` was 32; not ``len()``, which the code's structure
  decides: ``len(x.chunk(2, 1))``) with the size it expects a constant, named for the torch
  variable it was assigned to (``in_height``): calls at other sizes are one class, the size a field
  (transformers' MobileNetV2 layers, which pad as TensorFlow does from their input's size, were one
  class per size, ``MobileNetV2ConvLayer1`` .. ``4``)."""
  named = ASSIGNED.search(guard.where)
  expected = ("const", guard.expected, ("shape", named[1] if named else "expected_size"))
  return ("op", functional.OpRule(dataclasses.replace(guard, expected=None)), args, (("expected", expected),))


def _item_attribute(item, base: str) -> str | None:
  """The attribute of the child or layer a block's item calls, if it calls one."""
  path = called(item)
  return None if path is None else _relative(path, base)


def _member(attribute: str | None) -> tuple[str, int] | None:
  """``("layers", 3)`` for ``"layers.3"``: a container's member and its index."""
  container, _, index = (attribute or "").rpartition(".")
  return (container, int(index)) if container and index.isdigit() else None


def _inputs(item) -> list[str]:
  return item.inputs if isinstance(item, Block) else references((item.args, item.kwargs))


def _outputs(item) -> list[str]:
  return item.outputs if isinstance(item, Block) else [item.name]


def _reads_only(node: Node, previous: str | None) -> bool:
  """The node reads the previous value, as its first argument, and nothing else."""
  names = references((node.args, node.kwargs))
  return previous is not None and names == [previous] and node.args and node.args[0] == Ref(previous)


def _relative(path: str, base: str) -> str:
  """``path`` as an attribute path of the module at ``base``, which calls it."""
  if base and not path.startswith(base + "."):  # tree.py writes such a caller inline in its own caller
    raise PortError(f"emit: {base} calls {path}, which it does not hold (a bug of the emitter's: please report it)")
  return path[len(base) + 1 :] if base else path


PROXY = re.compile(r"Proxy\(\w+\)")  # fx's repr of a traced value, as an f-string in forward wrote it


def _expression(value, label: str) -> tuple:
  """An encoded node argument as an expression."""
  if isinstance(value, Ref):
    return ("var", value.name)
  if isinstance(value, Slice):
    return ("slice", _expression(value.start, label), _expression(value.stop, label), _expression(value.step, label))
  if isinstance(value, Aggregate):
    items = tuple(_expression(v, label) for v in value.items)
    return ("aggregate", value.kind, items, value.keys)
  if isinstance(value, tuple) and any(isinstance(v, (Ref, Slice, Aggregate)) for v in value):
    return ("tuple", tuple(_expression(v, label) for v in value))
  if isinstance(value, str):  # a message formatted while fx traced: its values were proxies
    value = PROXY.sub("?", value)
  return ("const", value, label)


def _merge_modes(train_code: tuple | None, eval_code: tuple | None) -> tuple:
  """One body when both modes' code has the same shape, with a constant that is True in train and
  False in eval (``training=self.training``) as the mode; else the signature, the statements both
  modes begin with (merged so), and ``("modes", the rest of train's, the rest of eval's)``: a
  detection head that returns other values in eval is one branch at the end, not two bodies."""
  if train_code is None or eval_code is None:  # called in one mode only (an aux head): its code as it is
    return train_code if eval_code is None else eval_code
  merged = _merge(train_code, eval_code)
  if merged is not _FAIL:
    return merged
  signature, other = _signature(train_code), _signature(eval_code)
  if signature != other:  # a module's calls are inlined where they differ (tree.py): the model's inputs
    named = [{s[2] for s in code if s[0] == "input"} for code in (signature, other)]
    raise PortError(
        f"emit: the model's forward reads inputs in one mode only ({', '.join(sorted(named[0] ^ named[1]))});"
        " the source has one signature: emit a wrapper whose forward takes the inputs both modes read"
        " (jaxbn.port runs the model as it is)"
    )
  train_body, eval_body = _body(train_code), _body(eval_code)
  common = []  # values are named in order of appearance in each mode, so a common start has one naming
  for a, b in zip(train_body, eval_body, strict=False):  # the shorter ends in a return
    statement = _merge(a, b)
    if statement is _FAIL or statement[0] == "return":
      break
    common.append(statement)
  rest = len(common)
  return (*signature, *common, ("modes", train_body[rest:], eval_body[rest:]))


def _signature(code: tuple) -> tuple:
  return tuple(s for s in code if s[0] in ("inputs", "input"))


def _body(code: tuple | None) -> tuple | None:
  return None if code is None else tuple(s for s in code if s[0] not in ("inputs", "input"))


_FAIL = object()


def _merge(a, b):
  """``a`` and ``b`` as one, where they differ only in constants that are the mode; else _FAIL."""
  if a == b:
    return a
  if not (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and a):
    return _FAIL
  if a[0] == b[0] == "const" and len(a) == 3:
    if a[1] is True and b[1] is False:
      return ("train",)
    if a[1] is False and b[1] is True:
      return ("not_train",)
    return _FAIL
  if a[0] == "var":
    return _FAIL
  parts = tuple(_merge(x, y) for x, y in zip(a, b, strict=True))
  return _FAIL if any(p is _FAIL for p in parts) else parts


def numbered(code) -> tuple:
  """The code with each constant's position (pre-order) as a fourth element."""
  count = [0]

  def walk(e):
    if isinstance(e, tuple) and e:
      if e[0] == "const" and len(e) == 3:
        count[0] += 1
        return (*e, count[0] - 1)
      if e[0] == "call":
        _, key, constants, attribute, args = e
        return ("call", key, walk(constants), attribute, walk(args))
      if e[0] == "element":
        return ("element", e[1], walk(e[2]))
      return tuple(walk(x) for x in e)
    return e

  return walk(code)


def _skeleton(code) -> tuple[tuple, list, list]:
  """The code with each constant as ``("hole", i)`` and its values named in order of appearance
  (``_canonical``); the constants and their labels in order."""
  constants: list = []
  labels: list = []

  def walk(e):
    if isinstance(e, tuple) and e:
      if e[0] == "const" and len(e) == 4:
        constants.append(e[1])
        labels.append(e[2])
        return ("hole", e[3])
      if e[0] == "call":
        _, key, consts, attribute, args = e
        return ("call", key, walk(consts), attribute, walk(args))
      if e[0] == "element":
        return ("element", e[1], walk(e[2]))
      return tuple(walk(x) for x in e)
    return e

  return walk(_canonical(numbered(code))), constants, labels
