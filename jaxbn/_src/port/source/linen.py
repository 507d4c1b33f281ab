"""The classes as Flax Linen source: ``@nn.compact`` modules that build their layers at torch's
attribute names, with the mode as ``train``."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import math
import operator
import re
from typing import Any

import flax.linen
import jax
import numpy as np

from jaxbn._src.errors import PortError
from jaxbn._src.linen.batch_norm import BatchNorm
from jaxbn._src.linen.folded import FoldedBatchNorm
from jaxbn._src.linen.frozen import FrozenBatchNorm
from jaxbn._src.nnx.batch_norm import BatchNorm as NnxBatchNorm
from jaxbn._src.nnx.frozen import FrozenBatchNorm as NnxFrozenBatchNorm
from jaxbn._src.port.graph import Static
from jaxbn._src.port.leaves import Constant, Metadata
from jaxbn._src.port.recipe import TrainingRecipe
from jaxbn._src.port.source.classes import (
    ALWAYS_WRITTEN,
    REQUIRED,
    Class,
    Classes,
    called_attribute,
    identity_input,
    numbered,
    passed_on,
    statement_reads,
    substituted,
    value_key,
    without_identities,
)
from jaxbn._src.port.source.naming import class_names, next_name
from jaxbn._src.port.tracer import Guard
from jaxbn._src.torchlike import functional, linen
from jaxbn._src.torchlike import nnx as torchlike_nnx

INFIX = {
    functional.add: "+",
    functional.sub: "-",
    functional.mul: "*",
    jax.numpy.matmul: "@",
    functional.pow_: "**",
    operator.floordiv: "//",
    operator.mod: "%",
    operator.eq: "==",
    operator.ne: "!=",
    operator.lt: "<",
    operator.le: "<=",
    operator.gt: ">",
    operator.ge: ">=",
    operator.and_: "&",
    operator.or_: "|",
    operator.xor: "^",
}
# Python's binding strength of each operator the source writes (higher binds tighter): an operand
# that binds less tightly than its operator is parenthesised
PRECEDENCE = dict.fromkeys(("==", "!=", "<", "<=", ">", ">="), 1) | {"|": 2, "^": 3, "&": 4, "+": 6, "-": 6}
PRECEDENCE |= dict.fromkeys(("*", "@", "//", "%"), 7) | {"**": 9}
UNARY, TERM = 8, 10  # ``-x`` and ``~x``; a name, a call, an item, a literal
PREFIX = {functional.neg: "-", operator.invert: "~"}
FOLDED = 8  # operators at most in one line made of lines the trace recorded one by one

# values of a tensor written into the source, as a person writes a short table; larger ones go to
# CONSTANTS_FILE (was 4096: ultralytics' anchors were 168 numbers, one a line, 500 lines of Detect)
INLINE_CONSTANT = 16
CONSTANTS_FILE = "constants.safetensors"

# Names the source uses for other things: a value or container may not take them.
RESERVED = {"train", "self", "ctx", "rngs", "layers", "ops", "jaxbn", "jax", "jnp", "np", "nn", "nnx", "math"}
RESERVED |= {"functools", "collections", "operator", "pathlib", "traverse_util", "Any", "CONSTANTS", "stage", "struct"}
MODULE_CONSTANTS = {
    "CONSTANTS",
    "KEEP_EVAL",
    "FROZEN",
    "EXAMPLE_INPUTS",
    "INPUT_AXES",
    "OUTPUT_AXES",
    "TRAIN_OUTPUT_AXES",
}
MODE_KEYWORDS = {"use_running_average": "not train", "deterministic": "not train", "train": "train"}
JAXBN_LAYERS = {
    BatchNorm: "jaxbn.BatchNorm",
    FrozenBatchNorm: "jaxbn.FrozenBatchNorm",
    FoldedBatchNorm: "jaxbn.FoldedBatchNorm",
}


class Source:
  """Renders the classes; collects the imports and definitions the code needs."""

  FLAX = ("nn", flax.linen)  # how the source names Flax's own layers and functions (nn.Conv, nn.max_pool)

  def __init__(self, classes: Classes):
    self.classes = classes
    self.names: dict[tuple, str] = {}
    self.imports: dict[str, None] = {}
    self.namedtuples: dict[type, None] = {}
    self.uses_layers = False  # jaxbn.layers, which NNX source imports only where it is used
    self.constants: dict[str, np.ndarray] = {}  # tensors too large to write: constants.safetensors
    self.tables: dict[str, str] = {}  # stage tables (name -> text), written before the model's class
    root = next(reversed(classes.classes), None)
    self.identities = {key for key, cls in classes.classes.items() if cls.identity and key != root}
    self.names = class_names(classes.classes, modules=classes.modules, unwritten=self.identities)

  # --- classes ---------------------------------------------------------------------------------

  def render_class(self, key: tuple, cls: Class) -> str:
    fields = self.classes.fields(key)
    code = numbered(cls.example)
    lines = [f"class {self.names[key]}(nn.Module):", f'  """{_torch_name(cls.torch_class)} in torch."""', ""]
    declared: dict[str, tuple[str, Any]] = {}
    for index, name in fields.items():
      declared.setdefault(name, (self.annotation([call[index] for call in cls.calls]), cls.default(index)))
    required = [f"  {name}: {annotation}" for name, (annotation, default) in declared.items() if default is REQUIRED]
    defaulted = [
        f"  {name}: {annotation} = {default!r}"
        for name, (annotation, default) in declared.items()
        if default is not REQUIRED
    ]
    lines += required + defaulted
    if declared:
      lines.append("")
    body = Body(self, fields)
    parameters = body.parameters(code)
    keywords = [p for p in parameters if p.startswith("**")]  # train before **kwargs: keyword-only after *args
    signature = [*(p for p in parameters if p not in keywords), "train: bool = False", *keywords]
    lines += ["  @nn.compact", f"  def __call__(self, {', '.join(signature)}):"]
    statements = body.statements(code)
    lines += ["    " + line for line in body.containers_lines() + statements]
    return "\n".join(lines)

  def constant_key(self, constant: Constant) -> str:
    """The key of a tensor constant in ``constants.safetensors`` (``CONSTANTS``), stored there."""
    data = constant.data
    key = f"{constant.dtype}_{'x'.join(map(str, constant.shape))}_{hashlib.sha1(data).hexdigest()[:12]}"
    self.constants[key] = np.frombuffer(data, np.dtype(constant.dtype)).reshape(constant.shape)
    return key

  def field_arguments(self, key: tuple, constants: tuple, render) -> list[str]:
    """``field=value`` for each of a child class's fields, from the constants of one call."""
    child = self.classes.classes[key]
    seen: dict[str, None] = {}
    arguments = []
    for index, name in self.classes.fields(key).items():
      if name not in seen:
        seen[name] = None
        value, default = constants[index], child.default(index)
        text = render(value)
        if value[0] == "const" and default is not REQUIRED and text == literal(default, self):
          continue  # the field's default (an optional part this call does not make), where no field sets it
        arguments.append(f"{name}={text}")
    return arguments

  def stage_table(self, attribute: str, stages: list) -> str:
    """A module-level table of a Sequential's stages, each its runs of blocks made the same way
    ``(class, how many, fields)``, as timm's ``arch_def`` or torchvision's block settings; its name."""
    name = re.sub(r"\W", "_", attribute).upper()
    while name in self.tables or name in MODULE_CONSTANTS:
      name += "_"
    rows = []  # one run a line, as a table reads (pyink would give each field a line)
    for runs in stages:
      cells = [f"({cls}, {count}, dict({', '.join(arguments)}))" for cls, count, arguments in runs]
      rows.append("    (" + ",\n     ".join(cells) + (",)," if len(cells) == 1 else "),"))
    self.tables[name] = "\n".join(
        [
            f"# {attribute}: each stage as its runs of blocks made the same way: (class, how many, fields)",
            "# fmt: off",
            f"{name} = (",
            *rows,
            ")",
            "# fmt: on",
        ]
    )
    return name

  def annotation(self, values: list) -> str:
    annotation = _annotation(values)
    if annotation == "Any":
      self.imports["from typing import Any"] = None
    return annotation

  # --- names of things the code calls ------------------------------------------------------------

  def function(self, fn) -> str:
    if isinstance(fn, Static):  # a namedtuple or dataclass the model returns, defined in the file
      self.namedtuples[fn.value] = None
      return fn.value.__name__
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__name__", None)
    if getattr(functional, name or "", None) is fn and module == functional.__name__:
      return f"ops.{name}"
    for prefix, namespace in (("jnp", jax.numpy), ("jax.nn", jax.nn), ("jax.lax", jax.lax), ("math", math), self.FLAX):
      if name and getattr(namespace, name, None) is fn:
        if prefix == "math":
          self.imports["import math"] = None
        return f"{prefix}.{name}"
    if getattr(operator, name or "", None) is fn:
      self.imports["import operator"] = None
      return f"operator.{name}"
    return self.by_reference(fn)

  def layer(self, cls: type) -> str:
    for base in cls.__mro__:  # BatchNormAct: the BatchNorm it extends, its activation called after
      if base in JAXBN_LAYERS:
        return JAXBN_LAYERS[base]
    if getattr(linen, cls.__name__, None) is cls:
      return f"layers.{cls.__name__}"
    if getattr(self.FLAX[1], cls.__name__, None) is cls:  # Flax's own (channels-last source)
      return f"{self.FLAX[0]}.{cls.__name__}"
    if getattr(torchlike_nnx, cls.__name__, None) is cls or cls in (NnxBatchNorm, NnxFrozenBatchNorm):
      return f"jaxbn.nnx.{cls.__name__}"
    return self.by_reference(cls)

  def by_reference(self, thing) -> str:
    """Something of the user's (custom_modules, custom_ops): imported from where it is defined."""
    module, name = thing.__module__, thing.__qualname__
    if module in ("__main__", "builtins") or "<" in name:
      raise PortError(
          f"emit: {module}.{name} (given to custom_modules or custom_ops) is not importable; define it in a module"
      )
    self.imports[f"import {module}  # custom_modules / custom_ops: imported from where they are defined"] = None
    return f"{module}.{name}"


class Body:
  """One class's ``__call__``: statements with value names chosen as a person would (a value takes
  over its input's name when that input is not read again)."""

  def __init__(self, source: Source, fields: dict[int, str]):
    self.source = source
    self.fields = fields
    self.names: dict[str, str] = {}
    self.taken: set[str] = set()
    self.containers: dict[str, dict[str, str]] = {}  # ModuleList / ModuleDict members the class calls
    # children called more than once in a call (EdgeTAM's position encoding, once per level): built
    # once above the calls (Linen names a submodule when it is built), by attribute: (name, constructor)
    self.shared: dict[str, tuple[str, str] | None] = {}
    self.lists: set[str] = set()  # values that are lists: inputs taken as ``*xs``, accumulated
    self.starts: dict[str, str] = {}  # an accumulated list -> the value it starts with
    self.index = ""  # the loop's index while a series' member is written

  def parameters(self, code: tuple) -> list[str]:
    parameters = []
    for statement in code:
      if statement[0] == "inputs" and statement[2:] == ("*",):  # a list, packed: classes._packed
        parameters.append("*" + self._take(statement[1][0], "xs"))
        self.lists.add(statement[1][0])
      elif statement[0] == "inputs":
        names = statement[1]
        for i, name in enumerate(names):
          parameters.append(self._take(name, "x" if len(names) == 1 else f"x{i}"))
      elif statement[0] == "input":
        _, name, target, default = statement
        parameter = self._take(name, target)
        parameters.append(parameter if default is None else f"{parameter}={self.expression(default)}")
    return parameters

  def _take(self, name: str, wanted: str) -> str:
    chosen = wanted
    while chosen in self.taken or chosen in RESERVED or chosen in self.source.names.values():
      chosen = next_name(chosen)
    self.taken.add(chosen)
    self.names[name] = chosen
    return chosen

  def statements(self, code: tuple) -> list[str]:
    statements = [s for s in code if s[0] not in ("inputs", "input")]
    modes = statements.pop() if statements and statements[-1][0] == "modes" else None
    branches = (statements + list(modes[1]), statements + list(modes[2])) if modes else (statements,)
    for branch in branches:
      called = [called_attribute(s) for s in branch]
      self.shared.update({a: None for a in called if a is not None and "." not in a and called.count(a) > 1})
    # identities left out of the statements both modes begin with and of each branch
    renamed: dict[str, str] = {}
    statements = _without_identities(statements, self.source.identities, renamed, self.fields)
    if modes is None:
      return self._run(statements)
    train_code, eval_code = (
        _without_identities(c, self.source.identities, dict(renamed), self.fields) for c in modes[1:]
    )
    later = {name for s in (*train_code, *eval_code) for name in statement_reads(s)}
    lines = self._run(statements, later)
    above = any(_uses_context(s) for s in statements)  # ctx is made above the branches: theirs too
    names = dict(self.names)
    train_lines = self._run(train_code, context_made=above)
    # values are the branch's own; Linen's containers are built once above both branches
    self.names = {**names, **{c: self.names[c] for c in self.containers if c in self.names}}
    eval_lines = self._run(eval_code, context_made=above)
    return [*lines, f"if {self.train()}:", *("  " + x for x in train_lines), "else:", *("  " + x for x in eval_lines)]

  def _run(self, statements: list, later: set = frozenset(), context_made: bool = False) -> list[str]:
    """The statements' lines (identities already left out); ``later``: the values read after them
    (in the branches that follow); ``context_made``: ``ctx`` is made above them."""
    statements = _folded(self._unpacked(self._sums(statements, later), later), later)
    last_use: dict[str, int] = {name: len(statements) for name in later}
    for i, statement in enumerate(statements):
      for name in statement_reads(statement):
        last_use[name] = max(i, last_use.get(name, i))
    lines = []
    if not context_made and any(_uses_context(s) for s in statements):
      lines.append(self.context())
    # a check of a comparison read by nothing else: the comparison is written in the check's assert
    compared = {
        i: statements[i - 1]
        for i in range(1, len(statements))
        if _checks(statements[i - 1], statements[i], last_use, i)
    }
    for i, statement in enumerate(statements):
      if i + 1 in compared:
        continue
      if statement[0] == "optional":
        lines += self._optional(statement, i, last_use)
        continue
      if statement[0] == "return":
        lines.append(f"return {self.expression(statement[1])}")
        continue
      _, targets, expression = statement
      if expression[0] == "accumulate":
        lines += self._accumulate(targets[0], expression)
        continue
      if expression[0] == "op" and isinstance(expression[1].fn, Guard):
        lines += self._guard(targets, expression, i, last_use, compared.get(i))
        continue
      rendered = self.expression(expression)
      if rendered is None:  # built where the class is built (NNX's held tensors)
        continue
      if not targets:
        lines += rendered.split("\n")  # a comment above it
        continue
      lines.append(f"{self._assign(targets, expression, i, last_use)} = {rendered}")
    return lines

  def _guard(self, targets: tuple, expression: tuple, index: int, last_use: dict, comparison) -> list[str]:
    """A decision the trace took on the example input, checked: ``assert x.shape == (2, 64, 8, 8)``
    where torch's ``if self.shape != shape:`` was false (the ``comparison``), ``assert len(y) == 2``;
    the checked value is a line of its own only where code reads it later."""
    guard = expression[1].fn
    where, message = f"# torch: {guard.where}", "'specialised to the example input'"
    if comparison is not None:
      fn, (a, b) = comparison[2][1].fn, comparison[2][2]
      fn = fn if guard.expected else NEGATED[fn]
      return [where, f"assert {self.infix(INFIX[fn], a, b)}, {message}"]
    size = dict(expression[3]).get("expected")  # a size's guard expects a constant (classes._sized_guard)
    sized = "tuple" if isinstance(guard.expected if size is None else size[1], tuple) else "int"
    conversion = {"index": "int", "size": sized, "check": "bool"}.get(guard.conversion, guard.conversion)
    value = f"{conversion}({self.expression(expression[2][0])})"
    expected = repr(guard.expected) if size is None else self.expression(size)
    if targets[0] not in last_use and conversion == "bool" and size is None and isinstance(guard.expected, bool):
      truth = self.expression(expression[2][0])  # torch's ``if padding:``
      return [where, f"assert {truth if guard.expected else f'not {truth}'}, {message}"]
    if targets[0] not in last_use:
      return [where, f"assert {value} == {expected}, {message}"]
    target = self._assign(targets, expression, index, last_use)
    return [f"{target} = {value}", where, f"assert {target} == {expected}, {message}"]

  def _sums(self, statements: list, later: set) -> list:
    """Python's ``sum()`` of values (HRNet's fuse layers, an FPN's levels), which torch's trace records
    as ``0 + a``, then ``+ b``, ...: ``sum([a, b, ...])`` where the last addition was, the same
    additions in the same order (the values are made before it, as they were), without the line
    ``y = 0 + a``."""
    reads = collections.Counter(later)
    readers = {}  # a value read once -> the index of the statement that reads it
    for i, statement in enumerate(statements):
      for name in statement_reads(statement):
        reads[name] += 1
        readers[name] = i
    kept, removed = list(statements), set()
    for i, statement in enumerate(statements):
      if _addition(statement, self.fields) != "start":
        continue
      total, values, end = statement[1][0], [statement[2][2][1]], i
      while reads[total] == 1 and _addition(statements[readers[total]], self.fields) == ("var", total):
        removed.add(end)
        end = readers[total]
        total, values = statements[end][1][0], [*values, statements[end][2][2][1]]
      kept[end] = ("assign", (total,), ("sum", tuple(values)))
    return [statement for i, statement in enumerate(kept) if i not in removed]

  def _unpacked(self, statements: list, later: set) -> list:
    """torch's ``B, C, H, W = x.shape`` (or ``q, k, v = qkv``), which torch's trace records as one
    item taken per line: ``y, y1, y2, y3 = x.shape[:4]`` where consecutive lines take items of one
    value (an item nothing reads between two that are read is ``_``; none before the first or after
    the last one read: ``y, y1 = x.shape[2:4]``); the value no line of its own where nothing else
    reads it. The slice keeps torch's meaning where the value holds more items; a value that is a
    slice of as many (``x.shape[-2:]``) needs none."""
    reads = collections.Counter(later)
    for statement in statements:
      reads.update(statement_reads(statement))
    kept: list = []
    i = 0
    while i < len(statements):
      run = _item_run(statements, i, self.fields)
      if run is None:
        kept.append(self._item_of_size(kept, statements[i], reads))
        i += 1
        continue
      source, items = run
      i += len(items)
      read = {index: target for index, target in items.items() if reads[target]}  # the others: no line
      if len(read) < 2:
        for position, index in enumerate(items):
          if index in read:
            kept.append(self._item_of_size(kept, statements[i - len(items) + position], reads))
        continue
      first = min(read)  # items before the first one read: sliced off (``x.shape[2:4]``), no ``_``
      targets = [read.get(index) for index in range(first, max(read) + 1)]
      expression = self._made(kept, source, reads, len(items))
      sliced = _sliced(expression)
      if sliced is not None and expression[2][0][0] == "var":  # the slice of a size: x.shape[-2:]
        size = self._made(kept, expression[2][0][1], reads, 1, True)
        expression = ("op", expression[1], (size, expression[2][1]), ())
      exact = sliced == len(targets) and first == 0
      kept.append(("assign", tuple(targets), ("unpack", expression, None if exact else (first, first + len(targets)))))
    return kept

  def _item_of_size(self, kept: list, statement: tuple, reads: dict) -> tuple:
    """``y = x.shape[-1]`` for ``y = x.shape``, ``y = y[-1]`` (the size read by nothing else)."""
    taken = _taken_item(statement)
    if taken is None:
      return statement
    size = self._made(kept, taken[0], reads, 1, True)
    rule, index = statement[2][1], statement[2][2][1]
    return statement if size[0] == "var" else ("assign", statement[1], ("op", rule, (size, index), ()))

  def _made(self, kept: list, value: str, reads: dict, count: int, size_only: bool = False) -> tuple:
    """The expression that makes ``value``, taken out of ``kept`` where its line is the last there
    and only the ``count`` reads that follow read it (``size_only``: a ``x.shape``); else the value."""
    made = kept[-1] if kept else None
    if made is None or made[0] != "assign" or made[1] != (value,) or reads[value] != count:
      return ("var", value)
    expression = made[2]
    if expression[0] == "call" or expression[0] == "op" and _atomic(expression, size_only):
      kept.pop()
      return expression
    return ("var", value)

  def _accumulate(self, target: str, e: tuple) -> list[str]:
    """Children numbered in a series or a container's members, each called on the list of every
    value before it or on its last (``classes._accumulated``: DenseNet's block, ultralytics' C2f), as
    torch's loop."""
    _, call, count, start, prefix, each, container = e
    values = self._take(target, "features")
    self.lists.add(target)
    self.starts[target] = _first_var(("tuple", prefix))
    index = self.index = self._take(f"{target}:index", "i")
    number = f"{index} + {start}" if start else index
    name = f"str({number})" if container else f'f"{call[3]}{{{number}}}"'
    member = self.member(call, name, count, index, f"*{values}" if each == "all" else f"{values}[-1]", container)
    return [
        f"{values} = [{', '.join(self.expression(a) for a in prefix)}]",
        f"for {index} in range({self.expression(count)}):",
        f"  {values}.append({member})",
    ]

  def _optional(self, statement: tuple, index: int, last_use: dict) -> list[str]:
    """A part some calls of the class make and others do not (a child call, a term added): without
    it, its output is the value it passes on (the child's input, the sum's other term)."""
    _, flag, prefix, last = statement
    target, source = last[1][0], passed_on(statement)
    statements = (*prefix, last)
    renamed: dict[str, str] = {}  # the term's identities (a DropPath at rate 0) left out, as above
    prefix = _without_identities(list(prefix), self.source.identities, renamed, self.fields)
    for old, new in renamed.items():
      last = substituted(last, old, new)
    # its first child or layer the source writes; where it writes none (a term that is only an
    # identity placeholder), the placeholder's
    attribute = next(filter(None, map(called_attribute, (*prefix, last, *statements))))
    lines = []
    if last_use.get(source, -1) <= index:
      self.names[target] = self.names[source]
    else:
      name = self._take(target, "y")
      lines.append(f"{name} = {self.names[source]}")
    lines.append(f"if {self.present(flag, attribute)}:")
    # the term's own values take no name a later line reads
    later = {name for name, use in last_use.items() if use > index} | set(statement_reads(last))
    lines += ["  " + line for line in self._run(prefix, later, context_made=True)]
    lines.append(f"  {self.names[target]} = {self.expression(last[2])}")
    return lines

  # --- what differs between the APIs ---------------------------------------------------------------

  def train(self) -> str:
    """The mode, as an expression."""
    return "train"

  def context(self) -> str:
    """The line that makes ``ctx`` for ops that need the mode and randomness (dropout)."""
    return 'ctx = ops.Context(train, lambda: self.make_rng("dropout"))'

  def present(self, flag, attribute: str) -> str:
    """The condition of an optional part (``attribute``: its first child or layer)."""
    return self.expression(flag)

  def field(self, name: str) -> str:
    return f"self.{name}"

  def sequence(self, elements: list[str]) -> str:
    """A Sequential's constructor, from its elements' source (repeated blocks as a loop)."""
    runs = repeats(elements)
    if len(runs) == 1 and runs[0][1] != "1":
      return f"layers.Sequential(tuple({loop(*runs[0])}))"
    parts = [element if count == "1" else f"*({loop(element, count)})" for element, count in runs]
    return f"layers.Sequential(({', '.join(parts)}{',' if len(parts) == 1 else ''}))"

  def member(self, call: tuple, name: str, count: tuple, index: str, argument: str, container: bool) -> str:
    """A series' member named ``name`` (an expression of the loop's ``index``, below ``count``)
    called on ``argument``; a container's members are built in a ``layers.ModuleList`` above."""
    _, key, constants, attribute, _ = call
    arguments, cls = self.source.field_arguments(key, constants, self.expression), self.source.names[key]
    if not container:
      return f"{cls}({', '.join([*arguments, f'name={name}'])})({argument}, train=train)"
    if self.shared.get(attribute) is None:  # built once, above the loop (and both modes' branches)
      members = f"{{{name}: {cls}({', '.join(arguments)}) for {index} in range({self.expression(count)})}}"
      self.shared[attribute] = (self._take(attribute, attribute), f"layers.ModuleList({members}, name={attribute!r})")
    return f"{self.shared[attribute][0]}({name}, {argument}, train=train)"

  def stochastic(self, function: str, kwargs: str) -> str:
    """A Sequential's element for an op that needs the mode and randomness."""
    return f"layers.Stochastic({function}, {kwargs})"

  def _assign(self, targets: tuple, expression: tuple, index: int, last_use: dict) -> str:
    if len(targets) == 1:
      first = _first_var(expression)
      if first is not None and first in self.lists:  # what a list gives is a tensor: x, not xs
        first = self.starts.get(first)  # an accumulated list's first value, if not read again
        if first is None or last_use.get(first, -1) > index:
          return self._take(targets[0], "x")
      if first is not None and last_use.get(first, -1) <= index and first in self.names:
        self.names[targets[0]] = self.names[first]  # the input is not read again: reuse its name
        return self.names[first]
      return self._take(targets[0], "y")
    reused, first = None, _first_var(expression)  # an input read by nothing after: its last item's name
    if expression[0] == "unpack" and first is not None and last_use.get(first, -1) <= index and first in self.names:
      reused = [t for t in targets if t is not None][-1]
      self.names[reused] = self.names[first]
    return ", ".join("_" if t is None else self.names[t] if t == reused else self._take(t, "y") for t in targets)

  # --- expressions -------------------------------------------------------------------------------

  def expression(self, e) -> str:
    kind = e[0]
    if kind == "var":
      return self.names[e[1]]
    if kind == "const":
      _, value, _label, index = e
      return self.field(self.fields[index]) if index in self.fields else literal(value, self.source)
    if kind == "train":
      return self.train()
    if kind == "not_train":
      return f"not {self.train()}"
    if kind == "tuple":
      items = [self.expression(x) for x in e[1]]
      return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if kind == "slice":
      return f"slice({', '.join(self.expression(x) for x in e[1:])})"
    if kind == "aggregate":
      return self._aggregate(e)
    if kind == "layer":
      return self._layer(e)
    if kind == "call":
      return self._child(e)
    if kind == "sequential":
      return self._sequential(e)
    if kind == "held":
      return self._held(e)
    if kind == "progression":  # a series' member's size: the first member's, going up by a step
      return f"{self.expression(e[1])} + {self.index} * {self.expression(e[2])}"
    if kind == "first":  # a container member's constant: the first member's, then the others'
      return f"{self.expression(e[1])} if {self.index} == 0 else {self.expression(e[2])}"
    if kind == "sum":
      return f"sum([{', '.join(self.expression(x) for x in e[1])}])"
    if kind == "unpack":  # an item run's value (_unpacked), sliced to the items it takes
      items = "" if e[2] is None else f"[{e[2][0] or ''}:{e[2][1]}]"
      return self.expression(e[1]) + items
    if kind == "op":
      return self._op(e)
    if kind == "tensor":
      return self._tensor(e[1])
    raise AssertionError(f"unknown expression {kind}")

  def _child(self, e) -> str:
    _, key, constants, attribute, args = e
    arguments = self.source.field_arguments(key, constants, self.expression)
    constructor = f"{self.source.names[key]}({', '.join(arguments)}"
    return self._placed(attribute, constructor, [*(self.expression(a) for a in args), "train=train"])

  def tensors(self, constant: tuple) -> str:
    """A ``Held``'s tensors: ``{path: (shape, dtype), ...}``, or the field that holds them."""
    _, value, _label, index = constant
    if index in self.fields:
      return self.field(self.fields[index])
    return "{" + ", ".join(f"{path!r}: {literal(spec, self.source)}" for path, spec in value) + "}"

  def _held(self, e) -> str:
    """Tensors of a child forward never calls, made at its torch paths (the state_dict fills them)."""
    _, attribute, tensors = e
    return f"{held_comment(attribute)}\n{self._placed(attribute, f'layers.Held({self.tensors(tensors)}', [])}"

  def _sequential(self, e) -> str:
    _, elements, attribute, args = e
    table = self._stages(elements, attribute)
    if table is not None:
      constructor = f"layers.Sequential(tuple(stage(runs) for runs in {table})"
    else:
      constructor = self.sequence([self._element(x) for x in self._members(elements)])[:-1]
    return self._placed(attribute, constructor, [self.expression(args[0]), "train=train"])

  def _stages(self, elements: tuple, attribute: str) -> str | None:
    """A Sequential of stages, each a Sequential of blocks (timm's ``blocks``), as a table of each
    stage's runs of blocks where every block's fields are literals: the table's name; else None."""
    if "." in attribute or len(elements) < 2:
      return None
    stages = []
    for element in elements:
      if element[0] != "sequence" or not element[1] or any(item[0] != "element" for item in element[1]):
        return None
      runs: list[tuple[str, int, list[str]]] = []
      for _, key, constants in element[1]:
        if any(constant[3] in self.fields for constant in constants):
          return None  # a block's size is a field of this class: no module-level table
        cls, arguments = self.source.names[key], self.source.field_arguments(key, constants, self.expression)
        if runs and runs[-1][0] == cls and runs[-1][2] == arguments:
          runs[-1] = (cls, runs[-1][1] + 1, arguments)
        else:
          runs.append((cls, 1, arguments))
      stages.append(runs)
    return self.source.stage_table(attribute, stages)

  def _placed(self, attribute: str, constructor: str, call: list[str]) -> str:
    """A module built at ``attribute`` by ``constructor`` (without its closing parenthesis), called
    with ``call``. A member of a ModuleList or ModuleDict its owner calls one by one
    (``blocks.0``) is built in a ``layers.ModuleList`` at the top of ``__call__``."""
    container, _, key = attribute.partition(".")
    separator = ", " if constructor[-1] != "(" else ""
    if attribute in self.shared:
      if self.shared[attribute] is None:
        self.shared[attribute] = (self._take(attribute, attribute), f"{constructor}{separator}name={attribute!r})")
      return f"{self.shared[attribute][0]}({', '.join(call)})"
    if not key:
      return f"{constructor}{separator}name={attribute!r})({', '.join(call)})"
    members, last = member_slot(self.containers.setdefault(container, {}), key)
    members.setdefault(last, f"{constructor})")
    if container not in self.names:
      self._take(container, container)
    return f"{self.names[container]}({', '.join([repr(key), *call])})"

  def containers_lines(self) -> list[str]:
    return [f"{name} = {constructor}" for name, constructor in filter(None, self.shared.values())] + [
        f"{self.names[container]} = layers.ModuleList({nested(members, 'layers.ModuleList')}, name={container!r})"
        for container, members in self.containers.items()
    ]

  def _aggregate(self, e) -> str:
    _, kind, items, keys = e
    rendered = [self.expression(x) for x in items]
    kind = kind.value
    if keys is not None:
      return "{" + ", ".join(f"{k!r}: {v}" for k, v in zip(keys, rendered, strict=True)) + "}"
    if kind is list:
      return f"[{', '.join(rendered)}]"
    if hasattr(kind, "_fields"):
      return f"{self.source.function(Static(kind))}({', '.join(rendered)})"
    return f"({rendered[0]},)" if len(rendered) == 1 else f"({', '.join(rendered)})"

  def _constructor(self, e) -> tuple[str, list[str]]:
    _, cls, fields, attribute, mode, args, kwargs = e
    after = []
    arguments = []
    defaults = _defaults(cls)
    for name, value in fields:
      if name == "after":
        after = value[1]
        continue
      if value[3] not in self.fields and _same(value[1], defaults.get(name)) and name not in ALWAYS_WRITTEN:
        continue
      arguments.append(f"{name}={self.expression(value)}")
    return f"{self.source.layer(cls)}({', '.join(arguments)}", after

  def _layer(self, e) -> str:
    _, cls, fields, attribute, mode, args, kwargs = e
    constructor, after = self._constructor(e)
    call_arguments = [self.expression(a) for a in args] + [f"{k}={self.expression(v)}" for k, v in kwargs]
    if mode is not None:
      call_arguments.append(f"{mode}={MODE_KEYWORDS[mode]}")
    return self.activated(fields, self._placed(attribute, constructor, call_arguments))

  def activated(self, fields: tuple, value: str) -> str:
    """timm's BatchNormAct2d: the norm's value through its activation (a field where calls differ)."""
    after = next((v for name, v in fields if name == "after"), None)
    if after is None:
      return value
    if after[3] in self.fields:
      self.source.uses_layers = True
      return f"layers.chain({self.field(self.fields[after[3]])}, {value})"
    for apply in after[1]:
      extra = "".join(f", {k}={literal(v, self.source)}" for k, v in apply.kwargs)
      value = f"{self.source.function(apply.fn)}({value}{extra})"
    return value

  def _members(self, elements: tuple) -> tuple:
    """A Sequential's elements without the identities after its last layer: torch's placeholders
    (smp's segmentation head's ``nn.Identity()`` upsampling and activation), which no later
    layer's path counts (a Sequential's layers are at torch's indices)."""
    layers = [i for i, e in enumerate(elements) if self._positional(e)]
    last = layers[-1] if layers else 0
    return elements[: last + 1] + tuple(e for e in elements[last + 1 :] if not self._placeholder(e))

  def _positional(self, e) -> bool:
    """Whether a Sequential's element is a module, named for its index."""
    if e[0] == "op":
      return bool(e[1].context)  # dropout: a layer
    return not self._placeholder(e)

  def _placeholder(self, e) -> bool:
    """Whether a Sequential's element is an identity (``nn.Identity()``, a class that returns its input)."""
    if e[0] == "repeat":  # a run of one element
      return self._placeholder(e[1])
    if e[0] == "element":
      return e[1] in self.source.identities
    return e[0] == "op" and e[1].fn is functional.identity

  def _element(self, e) -> str | tuple[str, str]:
    """A Sequential's element as source; a run of one block as (source, count)."""
    if e[0] == "repeat":
      return self._element(e[1]), self.expression(e[2])
    if e[0] == "layer":
      constructor, after = self._constructor(e)
      if after:
        raise PortError("emit: a BatchNormAct layer inside a Sequential")  # not reached: timm's are attributes
      return constructor + ")"
    if e[0] == "element":
      _, key, constants = e
      if key in self.source.identities:  # a placeholder: a Sequential's indices are torch's paths
        return self.source.function(functional.identity)
      return f"{self.source.names[key]}({', '.join(self.source.field_arguments(key, constants, self.expression))})"
    if e[0] == "sequence":
      return self.sequence([self._element(x) for x in self._members(e[1])])
    _, rule, args, kwargs = e  # an op of the previous value
    function = self.source.function(rule.fn)
    if rule.context:  # dropout: a layer that gets the mode (the op's own ``training`` flag is the mode too)
      kept = [(k, v) for k, v in self._keywords(rule.fn, kwargs) if not (k == "training" and v == ("train",))]
      pairs = ", ".join(f"({k!r}, {self.expression(v)})" for k, v in kept) + ("," if len(kept) == 1 else "")
      return self.stochastic(function, f"({pairs})" if kept else "()")
    rest = [self.expression(a) for a in args[1:]]
    keywords = [f"{k}={self.expression(v)}" for k, v in self._keywords(rule.fn, kwargs)]
    if not rest and not keywords:
      return function
    if not rest:
      self.source.imports["import functools"] = None
      return f"functools.partial({function}, {', '.join(keywords)})"
    return f"lambda x: {function}(x, {', '.join(rest + keywords)})"

  def _tensor(self, constant: tuple) -> str:
    """A tensor the model holds outside its state_dict: written out where small, else read from
    ``CONSTANTS``; a field (calls hold other tensors: levit's attention index tables) is its key."""
    _, value, _label, index = constant
    if index in self.fields:
      return f"jnp.asarray(CONSTANTS[{self.field(self.fields[index])}])"
    if math.prod(value.shape) <= INLINE_CONSTANT:
      array = np.frombuffer(value.data, np.dtype(value.dtype)).reshape(value.shape)
      return f"jnp.asarray(np.array({array.tolist()!r}, np.{value.dtype}))"
    return f"jnp.asarray(CONSTANTS[{self.source.constant_key(value)!r}])"

  def _op(self, e) -> str:
    _, rule, args, kwargs = e
    fn = rule.fn
    if isinstance(fn, Metadata):
      return f"jax.ShapeDtypeStruct({fn.shape!r}, jnp.{fn.dtype})"
    a = [self.expression(x) for x in args]
    k = [f"{name}={self.expression(v)}" for name, v in self._keywords(fn, kwargs)]
    if fn is functional.getitem:
      return f"{a[0]}[{self._index(args[1])}]"
    if fn in PREFIX:
      return PREFIX[fn] + self._operand(args[0], lambda binds: binds <= UNARY)
    if fn is functional.tensor_attribute:
      if args[1][1] == "data":  # torch's values outside autograd; a JAX array has no .data
        return f"{self.source.function(functional.detach)}({a[0]})"
      return f"{a[0]}.{args[1][1]}"
    if fn is functional.size and not k:
      return f"{a[0]}.shape" if len(a) == 1 else f"{a[0]}.shape[{a[1]}]"
    if fn is functional.ndim:
      return f"{a[0]}.ndim"
    if INFIX.get(fn) and not k and len(a) == 2:
      return self.infix(INFIX[fn], *args)
    call = [*(["ctx"] if rule.context else []), *a, *k]
    return f"{self.source.function(fn)}({', '.join(call)})"

  def infix(self, symbol: str, left: tuple, right: tuple) -> str:
    """``left symbol right`` with the parentheses Python needs to read it as the trace's operations,
    and no others: ``(a - b) * c``, ``a - (b - c)`` (same binding, on the right: left to right
    otherwise), ``(a ** b) ** c``, ``(a < b) == c`` (Python chains comparisons)."""
    own = PRECEDENCE[symbol]
    chained = symbol == "**" or own == PRECEDENCE["=="]
    first = self._operand(left, lambda binds: binds < own or binds == own and chained)
    second = self._operand(right, lambda binds: binds <= own and symbol != "**" or binds < own)
    return f"{first} {symbol} {second}"

  def _operand(self, e: tuple, parenthesised) -> str:
    text = self.expression(e)
    return f"({text})" if parenthesised(self._binding(e)) else text

  def _binding(self, e: tuple) -> int:
    """How tightly an expression's source binds (``PRECEDENCE``): a negative literal as ``-x``."""
    symbol = _symbol(e)
    if symbol is not None and len(e[2]) == 1:
      return UNARY
    if symbol is not None and not self._keywords(e[1].fn, e[3]):  # as ``_op`` writes it: no keyword left
      return PRECEDENCE[symbol]
    if e[0] == "const" and e[3] not in self.fields and isinstance(e[1], (int, float)) and e[1] < 0:
      return UNARY
    if e[0] in ("not_train", "first"):  # ``not train``, ``a if i == 0 else b``
      return 0
    if e[0] == "progression":  # ``a + i * b``
      return PRECEDENCE["+"]
    return TERM

  def _keywords(self, fn, kwargs: tuple) -> list:
    """Keyword arguments in the function's order, without those at its defaults."""
    try:
      parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
      return list(kwargs)
    order = {name: i for i, name in enumerate(parameters)}
    kept = [
        (name, value)
        for name, value in kwargs
        if name != "inplace"  # torch's in-place ops are their out-of-place twins here
        and not (
            name in parameters
            and value[0] == "const"
            and value[3] not in self.fields
            and _same(value[1], parameters[name].default)
        )
    ]
    return sorted(kept, key=lambda item: order.get(item[0], len(order)))

  def _index(self, e) -> str:
    if e[0] == "slice":
      parts = ["" if x[0] == "const" and x[1] is None else self.expression(x) for x in e[1:]]
      text = f"{parts[0]}:{parts[1]}" + (f":{parts[2]}" if parts[2] else "")
      return text
    if e[0] == "aggregate" and e[1].value is tuple and e[2]:
      return ", ".join(self._index(x) for x in e[2])
    if e[0] == "const" and e[1] is Ellipsis:
      return "..."
    return self.expression(e)


def held_comment(attribute: str) -> str:
  return f"# torch's forward never calls {attribute}: its tensors, held for the state_dict, never trained"


def repeats(elements: list) -> list[tuple[str, str]]:
  """A Sequential's elements as (source, count) runs: a block made the same way several times in a
  row (resnet's blocks after a stage's first, as torchvision's ``for _ in range(1, blocks)``). An
  element is its source, or (source, count) where the classes counted its run (the count may be a
  field: a stage's depth)."""
  runs: list[tuple[str, str]] = []
  for element in elements:
    source, count = element if isinstance(element, tuple) else (element, "1")
    if "(" not in source and count.isdigit():  # an op's name (a placeholder): one per index
      runs += [(source, "1")] * int(count)
    elif runs and runs[-1][0] == source and count.isdigit() and runs[-1][1].isdigit():
      runs[-1] = (source, str(int(runs[-1][1]) + int(count)))
    else:
      runs.append((source, count))
  return runs


def loop(element: str, count: str) -> str:
  return f"{element} for _ in range({count})"


def member_slot(members: dict, key: str) -> tuple[dict, str]:
  """Where a container's member ``key`` goes: a ModuleList in a ModuleList (timm's HRNet
  ``fuse_layers[i][j]``, key ``"0.1"``) nests a dict per level; (the innermost dict, its key)."""
  *outer, last = key.split(".")
  for level in outer:
    members = members.setdefault(level, {})
    if not isinstance(members, dict):  # a member the model calls, and a module inside it too
      break
  if isinstance(members, dict) and not isinstance(members.get(last), dict):
    return members, last
  raise PortError(
      f"emit: the model calls a container's member at {key!r} and a module inside it too; emit calls"
      " of one or the other"
  )


def nested(members: dict, container: str) -> str:
  """``{key: constructor}`` with a nested dict as ``container(...)`` (no name: its owner names it);
  a list of members built alike (a decoder's six layers) as ``{str(i): constructor for i in range(6)}``."""
  built = set(members.values()) if all(isinstance(v, str) for v in members.values()) else ()
  if len(built) == 1 and len(members) > 1 and list(members) == [str(i) for i in range(len(members))]:
    return f"{{str(i): {built.pop()} for i in range({len(members)})}}"
  return (
      "{"
      + ", ".join(
          f"{k!r}: {f'{container}({nested(v, container)})' if isinstance(v, dict) else v}" for k, v in members.items()
      )
      + "}"
  )


def _defaults(cls: type) -> dict:
  """A layer class's defaults: its dataclass fields' (Linen) or its constructor's (NNX)."""
  if dataclasses.is_dataclass(cls):
    return {f.name: f.default for f in dataclasses.fields(cls)}
  return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()}


def _same(value, default) -> bool:
  """A value equal to a default, of the same type (``1 != True`` here), dtypes by name."""
  if default is inspect.Parameter.empty or default is dataclasses.MISSING:
    return False
  if value is not None and default is not None and _is_dtype(value) and _is_dtype(default):
    return np.dtype(value) == np.dtype(default)
  return value_key(value) == value_key(default)


def _is_dtype(value) -> bool:
  if value is None or isinstance(value, (str, int, float, tuple)):
    return False
  try:
    np.dtype(value)
  except TypeError:
    return False
  return True


NEGATED = {
    operator.eq: operator.ne,
    operator.ne: operator.eq,
    operator.lt: operator.ge,
    operator.le: operator.gt,
    operator.gt: operator.le,
    operator.ge: operator.lt,
}


def _checks(statement: tuple, following: tuple, last_use: dict, index: int) -> bool:
  """``following`` checks the Python bool of ``statement``'s comparison (``self.shape != shape``),
  which nothing else reads, and nothing reads the check's value."""
  if statement[0] != "assign" or following[0] != "assign" or len(statement[1]) != 1:
    return False
  comparison, check = statement[2], following[2]
  return (
      check[0] == "op"
      and isinstance(check[1].fn, Guard)
      and check[1].fn.conversion in ("bool", "check")
      and isinstance(check[1].fn.expected, bool)
      and following[1][0] not in last_use
      and comparison[0] == "op"
      and comparison[1].fn in NEGATED
      and len(comparison[2]) == 2
      and not comparison[3]
      and check[2] == (("var", statement[1][0]),)
      and last_use.get(statement[1][0]) == index
  )


def _without_identities(
    statements: list, identities: set = frozenset(), renamed: dict | None = None, fields: dict | None = None
) -> list:
  """The statements without identities (timm's ``nn.Identity()`` placeholders, ``.contiguous()``,
  calls of ``identities``, classes that return their input, a pad of 0 on every side where no
  field sets it): a later read of their value reads their input, so that the source has no line
  that does nothing. ``renamed`` (filled): what was left out, and its input, for statements that
  follow these."""
  return without_identities(
      statements, lambda s: identity_input(s, identities) or _padding_nothing(s, fields or {}), renamed
  )


def _padding_nothing(statement: tuple, fields: dict) -> str | None:
  """The variable a constant pad of 0 on every side reads (transformers' MobileNetV2 pads its 1x1
  convolutions so: ``ops.pad(x, (0, 0, 0, 0))``), where no field sets the amounts; else None."""
  if statement[0] != "assign" or len(statement[1]) != 1 or statement[2][0] != "op":
    return None
  _, rule, args, kwargs = statement[2]
  if rule.fn is not functional.pad or not args or args[0][0] != "var":
    return None
  given = dict(zip(("x", "pad", "mode", "value"), args, strict=False)) | dict(kwargs)
  amounts, mode = given.get("pad"), given.get("mode")

  def literal(e, wanted) -> bool:
    return e[0] == "const" and e[3] not in fields and value_key(e[1]) == value_key(wanted)

  if amounts is None or mode is not None and not literal(mode, "constant"):
    return None
  if amounts[0] == "aggregate":
    zero = all(literal(item, 0) for item in amounts[2])
  else:
    zero = amounts[0] == "const" and amounts[3] not in fields and isinstance(amounts[1], tuple)
    zero = zero and all(value_key(amount) == value_key(0) for amount in amounts[1])
  return args[0][1] if zero else None


def _addition(statement: tuple, fields: dict):
  """``"start"`` for ``y = 0 + x`` (a literal int 0: ``sum()``'s start), the first operand for
  ``y = a + x`` (two values, torch's ``alpha`` left at 1); else None."""
  if statement[0] != "assign" or len(statement[1]) != 1 or statement[2][0] != "op":
    return None
  _, rule, args, kwargs = statement[2]
  if rule.fn is not functional.add or kwargs or len(args) != 2 or args[1][0] != "var":
    return None
  first = args[0]
  if first[0] == "const" and type(first[1]) is int and first[1] == 0 and first[3] not in fields:
    return "start"
  return first if first[0] == "var" else None


def _item_run(statements: list, start: int, fields: dict) -> tuple[str, dict[int, str]] | None:
  """``(the value, {index: target})`` where ``statements[start:]`` begin with two or more lines
  that each take one item of one value at a literal index, each index once (in any order: the
  channels-last source takes torch's ``B, C, H, W`` as items 0, 3, 1, 2); else None."""
  source, items = None, {}
  for statement in statements[start:]:
    taken = _taken_item(statement)
    if taken is None or taken[1][0] != "const":
      break
    index = taken[1][1]
    if type(index) is not int or index < 0 or taken[1][3] in fields or index in items:
      break
    if source not in (None, taken[0]) or statement[1][0] == taken[0]:
      break
    source = taken[0]
    items[index] = statement[1][0]
  if len(items) < 2:
    return None
  return source, items


def _taken_item(statement: tuple) -> tuple[str, tuple] | None:
  """``(the value, the index)`` of a line that takes one item of a value (``y = x[0]``); else None."""
  if statement[0] != "assign" or len(statement[1]) != 1 or statement[2][0] != "op":
    return None
  _, rule, args, kwargs = statement[2]
  if rule.fn is not functional.getitem or kwargs or args[0][0] != "var":
    return None
  return args[0][1], args[1]


def _atomic(expression: tuple, size_only: bool) -> bool:
  """Whether an op's source reads as one term, so that ``[:n]`` after it slices its value: a call,
  an attribute, an item (not ``a + b``, ``-a``); ``size_only``: ``x.shape``."""
  _, rule, args, kwargs = expression
  if size_only:
    size = rule.fn is functional.size and len(args) == 1
    return not kwargs and (size or rule.fn is functional.tensor_attribute and args[1][1] == "shape")
  return not isinstance(rule.fn, Guard) and rule.fn not in INFIX and rule.fn not in PREFIX


def _sliced(expression: tuple) -> int | None:
  """The most items ``value[index]`` holds: k for ``[:k]``, ``[-k:]``, ``[j:j + k]`` (both ends
  of one sign); None for another index or expression. A run that takes item k - 1 of it finds
  exactly k."""
  if expression[0] != "op" or expression[1].fn is not functional.getitem or expression[2][1][0] != "slice":
    return None
  index = expression[2][1]
  start, stop, step = (e[1] if e[0] == "const" else ... for e in index[1:])
  start = 0 if start is None else start
  if step is not None or type(start) is not int:
    return None
  if stop is None:
    return -start if start < 0 else None
  if type(stop) is int and (start < 0) == (stop < 0) and stop > start:
    return stop - start
  return None


def _folded(statements: list, later: set) -> list:
  """Arithmetic torch writes as one expression and its trace records one operation a line (timm's
  same padding: ``y2 = y // -2``, ``y2 = -y2``, ``y2 = y2 - 1``, ...): a value that only the next
  line's operator reads, made by an operator or as an item or attribute, is written into that line
  (``y2 = (-(y // -2) - 1) * 2 + 3 - y``), up to ``FOLDED`` operators a line. The operations and
  their order are the trace's; ``Body.infix`` writes the parentheses they need."""
  reads = collections.Counter(later)
  for statement in statements:
    reads.update(statement_reads(statement))
  kept: list = []
  for statement in statements:
    operation = _operation(statement)
    made = kept[-1] if kept else None
    if operation is not None and made is not None and made[0] == "assign" and len(made[1]) == 1:
      value, expression = made[1][0], made[2]
      _, rule, args, kwargs = operation
      foldable = _operation(made) is not None or expression[0] == "op" and expression[1].fn in TAKEN
      if foldable and reads[value] == 1 and ("var", value) in args:
        folded = ("op", rule, tuple(expression if a == ("var", value) else a for a in args), kwargs)
        if _operators(folded) <= FOLDED:
          kept[-1] = ("assign", statement[1], folded)
          continue
    kept.append(statement)
  return kept


TAKEN = (functional.getitem, functional.size, functional.ndim, functional.tensor_attribute)  # x[i], x.shape


def _symbol(expression: tuple) -> str | None:
  """The Python operator an op applies (``a - b``, ``-a``), given as many operands as it takes."""
  if expression[0] != "op":
    return None
  _, rule, args, _ = expression
  return INFIX.get(rule.fn) if len(args) == 2 else PREFIX.get(rule.fn) if len(args) == 1 else None


def _operation(statement: tuple) -> tuple | None:
  """The expression of a line that applies one of Python's operators with no keyword, if it is one."""
  if statement[0] != "assign" or len(statement[1]) != 1:
    return None
  expression = statement[2]
  return expression if _symbol(expression) is not None and not expression[3] else None


def _operators(e) -> int:
  if not (isinstance(e, tuple) and e and e[0] == "op"):
    return 0
  return (_symbol(e) is not None) + sum(_operators(a) for a in e[2])


def _first_var(expression) -> str | None:
  reads = statement_reads(("return", expression))
  return reads[0] if reads else None


def _uses_context(statement) -> bool:
  def walk(e):
    if isinstance(e, tuple) and e and e[0] not in ("const", "call", "element"):
      if e[0] == "op" and len(e) == 4 and getattr(e[1], "context", False):
        return True
      return any(walk(x) for x in e)
    return False

  return walk(statement)


def literal(value, source: Source) -> str:
  """A constant as Python source."""
  if isinstance(value, float):
    if math.isinf(value):
      source.imports["import math"] = None
      return "math.inf" if value > 0 else "-math.inf"
    if math.isnan(value):
      source.imports["import math"] = None
      return "math.nan"
    return repr(value)
  if value is None or isinstance(value, (bool, int, str)):
    return repr(value)
  if value is Ellipsis:
    return "..."
  if isinstance(value, np.dtype):
    return f"jnp.{value.name}"
  if isinstance(value, type) and issubclass(value, np.generic):
    return f"jnp.{np.dtype(value).name}"
  if isinstance(value, tuple):
    items = [literal(v, source) for v in value]
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
  if isinstance(value, list):
    return f"[{', '.join(literal(v, source) for v in value)}]"
  if isinstance(value, Constant):  # a field's value: its key in CONSTANTS
    return repr(source.constant_key(value))
  if dataclasses.is_dataclass(value) and type(value) is linen.Apply:
    source.uses_layers = True
    return f"layers.Apply({source.function(value.fn)}, {literal(value.kwargs, source)})"
  raise PortError(f"emit: cannot write a {type(value).__name__} constant ({value!r}) as source")


ANNOTATED = (bool, int, float, str, tuple)  # a field's types written as its annotation, in this order


def _annotation(values: list) -> str:
  """A field's annotation from the values its calls give it: their type, or the union of their
  types (``int | tuple``: a kernel size given as 3 in one call and (1, 7) in another), ``| None``
  where a call leaves it out; ``Any`` for other values."""
  types = {type(v) for v in values}
  if types == {Constant}:  # its key in CONSTANTS
    return "str"
  if types == {int, float}:
    return "float"
  given = types - {type(None)}
  if not given or not given <= set(ANNOTATED):
    return "Any"
  names = [kind.__name__ for kind in ANNOTATED if kind in given]
  return " | ".join(names + (["None"] if type(None) in types else []))


def _torch_name(cls: type) -> str:
  return f"{cls.__module__}.{cls.__qualname__}"


def recipe_lines(recipe: TrainingRecipe | None) -> list[str]:
  """The torch model's training recipe as editable lists (``KEEP_EVAL``, ``FROZEN``), where it has one."""
  lines = []
  if recipe is not None and recipe.keep_eval:
    lines.append(
        "# torch's training recipe, as the model was configured when emitted (edit freely).\n"
        "# BatchNorm layers torch kept in eval() while the model trained: with train=True they normalise\n"
        "# with their running statistics and update nothing.\n"
        f"KEEP_EVAL = {recipe.keep_eval!r}"
    )
  if recipe is not None and recipe.frozen:
    lines.append(
        "# Parameters (or modules: all their parameters) torch did not train (requires_grad=False).\n"
        f"FROZEN = {recipe.frozen!r}"
    )
  return ["\n".join(lines)] if lines else []


def _kept_in_eval(rendered: str) -> str:
  """The model class with ``KEEP_EVAL`` as a field and its call inside ``jaxbn.eval_mode`` of it."""
  lines = rendered.split("\n")
  call = lines.index("  @nn.compact")
  body = ["  " + line if line else line for line in lines[call + 2 :]]
  return "\n".join(
      [
          *lines[:call],
          "  keep_eval: tuple[str, ...] = KEEP_EVAL  # torch's recipe, above",
          "",
          *lines[call : call + 2],
          "    with jaxbn.eval_mode(*self.keep_eval, within=self):",
          *body,
      ]
  )


FROZEN_MASK = '''def frozen_mask(variables):
  """True for the parameters torch did not train (``FROZEN``; FrozenBatchNorm arrays too):
  ``jaxbn.keep_frozen(tx, frozen_mask(variables))`` is torch's optimiser."""
  return jaxbn.frozen_mask(variables, parameters=FROZEN)
'''


def layout_lines(axes) -> list[str]:
  """Channels-last source (``axes``, the layout pass's ``ChannelsLast``): how its inputs and
  outputs relate to torch's."""
  if axes is None:
    return []
  lines = [
      "# Channels-last (NHWC): each input is torch's with its axes in this order (jnp.transpose(x, axes);",
      "# None: as torch's); each output array (in JAX's order) is torch's in the order given here.",
      f"INPUT_AXES = {list(axes.input_axes)!r}",
      f"OUTPUT_AXES = {list(axes.output_axes[False])!r}",
  ]
  if axes.output_axes[True] != axes.output_axes[False]:
    lines.append(f"TRAIN_OUTPUT_AXES = {list(axes.output_axes[True])!r}  # train=True: torch's training outputs")
  return ["\n".join(lines)]


def layout_note(axes) -> str:
  """The header's sentence on the layout."""
  if axes is None:
    return "Inputs and outputs are torch's (NCHW)."
  return (
      "Channels-last (NHWC): inputs and outputs are torch's with their axes as ``INPUT_AXES`` and\n"
      "``OUTPUT_AXES`` say, Flax's own convolution and dense layers, ``jaxbn.BatchNorm(axis=-1)``."
  )


def module_source(
    classes: Classes,
    torch_class: type,
    examples: list,
    versions: str,
    recipe: TrainingRecipe | None = None,
    axes=None,
) -> tuple[str, str, dict]:
  """``model.py``: a header, the classes (children before their callers), ``load()``; torch's
  training recipe (``recipe``) as the lists the model class and ``frozen_mask`` use; with
  ``axes``, the channels-last layout's ``INPUT_AXES`` and ``OUTPUT_AXES``."""
  source = Source(classes)
  rendered = [source.render_class(key, cls) for key, cls in classes.classes.items() if key not in source.identities]
  top = source.names[next(reversed(classes.classes))]
  if recipe is not None and recipe.keep_eval:
    rendered[-1] = _kept_in_eval(rendered[-1])
  namedtuples = namedtuple_lines(source)
  header = f'''"""{_torch_name(torch_class)} as Flax Linen source, written by jaxbn.emit
({versions}).

One class per torch module class; layers sit at torch's attribute names, so ``jaxbn.convert``
maps torch's state_dict onto them. {layout_note(axes)} Load the model with its weights
(``model.safetensors``)::

  module, variables = load()
  y = module.apply(variables, x)  # torch's eval()
  y, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])  # torch's train()

Edit freely: to load the weights into an edited model, ``load(module=MyEdit(), strict=False)``
keeps fresh variables where the file has none, and ``jaxbn.convert.from_torch(...,
strict=False)`` lists them.
"""'''
  two_modes = any(_has_modes(cls.example) for cls in classes.classes.values())
  init = (
      """def init():  # torch's train and eval forwards call different layers: the variables of both
    both = [traverse_util.flatten_dict(module.init(key, *inputs, train=train)) for train in (True, False)]
    return traverse_util.unflatten_dict({**both[1], **both[0]})"""
      if two_modes
      else """def init():
    return module.init(key, *inputs)"""
  )
  loader = f'''EXAMPLE_INPUTS = {examples!r}  # (shape, dtype) of the example the model was emitted with


def load(path=None, *, module=None, strict=True):
  """``(module, variables)``: ``{top}()`` (or ``module``, an edited model) with the weights at ``path``
  (default: {WEIGHTS_NAME} beside this file). ``strict=False`` gives fresh variables to what the
  file lacks and leaves out what the model lacks."""
  module = {top}() if module is None else module
  path = pathlib.Path(__file__).with_name("{WEIGHTS_NAME}") if path is None else path
  key, inputs = jax.random.key(0), [jnp.zeros(shape, dtype) for shape, dtype in EXAMPLE_INPUTS]

  {init}

  shapes = jax.eval_shape(init)
  converted = jaxbn.convert.from_torch(jaxbn.load_state_dict(path), shapes, strict=strict)
  if not (converted.missing or converted.mismatched):
    return module, converted.variables
  # strict=False: fresh values for what the file lacks (an edited model's new layers), and only
  # those: jit keeps just their initialisers, not the whole model's init
  given = traverse_util.flatten_dict(converted.variables)
  lacking = [key for key in traverse_util.flatten_dict(shapes) if key not in given]
  fresh = jax.jit(lambda: [traverse_util.flatten_dict(init())[key] for key in lacking])()
  return module, traverse_util.unflatten_dict({{**given, **dict(zip(lacking, fresh))}})
'''
  imports = import_lines(source, flax_imports(source, ["import flax.linen as nn", "from flax import traverse_util"]))
  frozen = [FROZEN_MASK] if recipe is not None and recipe.frozen else []
  parts = [header, "\n".join(imports), *layout_lines(axes), *recipe_lines(recipe), *constants_lines(source)]
  rendered[-1:-1] = stage_lines(source)  # before the model's class, after the blocks' classes
  return "\n\n\n".join([*parts, *namedtuples, *rendered, loader, *frozen]) + "\n", top, source.constants


def constants_lines(source: Source) -> list[str]:
  """Where the tensors too large to write into the source come from."""
  if not source.constants:
    return []
  return [
      f'CONSTANTS = jaxbn.load_state_dict(pathlib.Path(__file__).with_name("{CONSTANTS_FILE}"))  # non-persistent'
      " buffers and index tables the torch model holds outside its state_dict"
  ]


STAGE = '''def stage(runs):
  """A stage of blocks from a stage table: each run ``(class, how many, fields)``, in order."""
  return layers.Sequential(tuple(block(**fields) for block, count, fields in runs for _ in range(count)))'''


def stage_lines(source: Source, helper: str = STAGE) -> list[str]:
  """The stage tables the classes use, and the helper that builds a stage from one."""
  return [*source.tables.values(), helper] if source.tables else []


def namedtuple_lines(source: Source) -> list[str]:
  """The namedtuples (torchvision's GoogLeNetOutputs) and dataclasses (transformers' ModelOutput)
  the model returns, defined in the file: a dataclass as a ``flax.struct.dataclass`` with its
  fields in torch's order, a pytree whose leaves are those of torch's (None fields have none)."""
  lines = []
  for cls in source.namedtuples:
    if dataclasses.is_dataclass(cls):
      source.imports["from typing import Any"] = None
      fields = [f"  {f.name}: Any = None" for f in dataclasses.fields(cls) if f.init]
      lines.append(
          "\n".join(
              ["@struct.dataclass", f"class {cls.__name__}:", f'  """{_torch_name(cls)} in torch."""', "", *fields]
          )
      )
    else:
      source.imports["import collections"] = None
      lines.append(f"{cls.__name__} = collections.namedtuple({cls.__name__!r}, {list(cls._fields)!r})")
  return lines


def flax_imports(source: Source, imports: list[str]) -> list[str]:
  """``imports``, and flax's ``struct`` where the file defines a dataclass."""
  if any(dataclasses.is_dataclass(cls) for cls in source.namedtuples):
    return [*imports, "from flax import struct"]
  return imports


def import_lines(
    source: Source, flax_imports: list[str], jaxbn_imports: str = "from jaxbn import layers, ops"
) -> list[str]:
  """The standard library's, flax's, jax's and numpy's, jaxbn's, then the user's imports."""
  custom = [k for k in source.imports if "custom_modules" in k]
  standard = sorted({"import pathlib", *(k for k in source.imports if k.startswith("import ") and k not in custom)})
  standard += sorted(k for k in source.imports if k.startswith("from typing"))
  third_party = [*flax_imports, "import jax", "import jax.numpy as jnp", "import numpy as np"]
  imports = [*standard, "", *third_party, "", "import jaxbn", jaxbn_imports]
  return imports + (["", *custom] if custom else [])


WEIGHTS_NAME = "model.safetensors"


def _has_modes(code) -> bool:
  return any(statement[0] == "modes" for statement in code)
