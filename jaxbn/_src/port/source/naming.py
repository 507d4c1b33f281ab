"""Class names for emitted source: a torch class emitted as several classes (its calls' code differs
in shape) gets names that say what differs, as a person would name them: ``InvertedResidualWithSkip``
(adds its input), ``BasicBlockWithDownsample`` (calls a child the others do not; ``OsaStageWithPool``
a stateless module, run as an op),
``C2fWith2M`` (two members in ``m``, the others one), ``InvertedResidualWith2Conv`` (a Sequential
of two), ``MultiheadAttentionWith3Inputs`` (called with a mask), ``_DenseBlockWith12Denselayer``
(a numbered series of children: ``denselayer1`` .. ``denselayer12``); the one with none of these
keeps torch's name. Where that does not tell two apart, the functions they run do, their norms'
activations included (``InvertedResidualWithHardswish``, dpn's ``CatBnActWithSilu``), then the
child classes they call (``C2fWithBottleneck``), then their torch modules' settings (selecsls'
``SelecSlsBlockIsFirst``, a flag; ``PartitionGrid``, a string), then their layers' classes (smp's
``PSPBlockWithBatchNorm``), then the Python branch each took (smp's mit ``LayerNormIfNdimIs4``: torch's
``if x.ndim == 4:``), and a number only where nothing
does or the name would run past ``LONGEST`` with a child's name in it; a name past ``LONGEST`` keeps
only what tells it apart. An input added through an nn.Identity is a skip connection too (timm's
``shortcut``)."""

from __future__ import annotations

import ast
import collections
import re
from collections.abc import Callable, Iterable

from jaxbn._src.port.source.classes import identity_input, module_attributes, value_key
from jaxbn._src.port.tracer import Guard
from jaxbn._src.torchlike import functional

LONGEST = 64  # characters: a longer name keeps only the parts that tell its class apart

# torch.nn.functional's functions (activations, pooling: ``relu``, ``avg_pool2d``) name a class; not
# arithmetic or reshaping (``floordiv``, ``view``), which say nothing a reader would name it for
NAMED_FUNCTIONS = frozenset(rule.fn for name, rule in functional.TABLE.items() if name.startswith("F."))


def class_names(
    classes: dict[tuple, object],
    reserved: Iterable[str] = (),
    modules: Callable[[object], list] | None = None,
    unwritten: Iterable[tuple] = (),
) -> dict[tuple, str]:
  """Class key -> name, for ``Classes.classes`` (children before their callers); ``modules(cls)``:
  the torch modules of a class's calls (``Classes.modules``), whose settings tell variants apart
  where nothing else does. ``unwritten``: classes the source leaves out (identities), named last
  so that they take no name from a written one (smp's Attention placeholder made mit_b0's
  ``Attention1``)."""
  names: dict[tuple, str] = {}
  taken = set(reserved)
  groups: dict[type, list[tuple]] = collections.defaultdict(list)
  for key, cls in classes.items():
    groups[cls.torch_class].append(key)
  # a torch class's variants once every variant of the classes they call is named (children come
  # first in ``classes``; a group is named at its last: efficientvit_m0's ResidualDrop, first seen
  # around a ConvNorm, calls both LocalWindowAttention variants, and was numbered)
  position = {key: i for i, key in enumerate(classes)}
  unwritten = set(unwritten)
  ordered = sorted(groups.items(), key=lambda group: (set(group[1]) <= unwritten, position[group[1][-1]]))
  for torch_class, keys in ordered:
    base = torch_class.__name__
    if len(keys) == 1:
      chosen = {keys[0]: base}
    else:
      features = {key: _features(classes[key].skeleton, classes[key].calls, unwritten) for key in keys}
      for key in keys:  # a stateless module it runs as an op (timm's OsaStage's ``pool``) is an attribute too
        features[key]["attributes"] |= classes[key].stateless
      settings = {key: _settings(modules(classes[key])) for key in keys} if modules is not None else {}
      chosen = _variant_names(base, keys, features, settings, names)
      # variants that call variants of their own torch class (DLA's trees of trees) are named again
      # with those children's names, until no name changes (was DlaTreeWithDownsample1)
      nested = any(features[key]["children"] & set(keys) for key in keys)
      for _ in keys if nested else ():
        again = _variant_names(base, keys, features, settings, {**names, **chosen})
        if again == chosen:
          break
        chosen = again
    for key in keys:
      name = chosen[key]
      while name in taken:
        name = next_name(name)
      taken.add(name)
      names[key] = name
  return names


def _variant_names(base: str, keys: list, features: dict, settings: dict, names: dict) -> dict[tuple, str]:
  """A torch class's variants' names (before numbering clashes), from what their code has
  (``features``), their torch modules' settings and the names of the classes they call."""
  parts = {key: _described(features[key], [features[k] for k in keys]) for key in keys}
  # the functions they run tell them apart (MobileNetV3's blocks: relu or hardswish)
  _told_apart(parts, keys, lambda key: features[key]["ops"], _camel)
  described = dict(parts)

  def by_settings(parts: dict) -> None:
    """After the children they call: the settings of torch's modules tell them apart (selecsls'
    ``is_first``, maxvit's ``partition_type``), then their layers' classes (smp's PSPBlock: a
    BatchNorm where the pool is over one pixel)."""
    if settings:
      _told_apart(parts, keys, settings.get, prefix="")
    _told_apart(parts, keys, lambda key: features[key]["layers"])

  # the children by name, the shortest names first, without the model family's words
  # (HGNetV2StageWithBasicLayer); a child that keeps its torch class's name where the variants call
  # others of that class names nothing (transformers' EfficientNetBlock calls the plain
  # DepthwiseLayer, EfficientNetBlockWithDepthwiseLayerWithDepthwiseConvPad another)
  variants: dict[type, set] = collections.defaultdict(set)
  for key in keys:
    for child in features[key]["children"]:
      variants[child[0]].add(child)

  def child_part(child) -> str:
    # a tree's own class names it still: DLA's TreeWithTree holds the plain Tree
    if len(variants[child[0]]) > 1 and not _own_part(names, child) and child[0].__name__ != base:
      return ""
    return "With" + _unshared(base, names.get(child, child[0].__name__))

  every = {key: {child_part(c) for c in features[key]["children"]} - {""} for key in keys}
  named_by_children = _told_apart(parts, keys, every.get, order=lambda c: (len(c), c), prefix="")
  by_settings(parts)
  # last, the Python branch each took (smp's mit LayerNorm: ``if x.ndim == 4:``, was LayerNorm1)
  _told_apart(parts, keys, lambda key: features[key]["branches"], prefix="")
  chosen = _shortest(base, parts, every)
  long = named_by_children & {key for key, name in chosen.items() if len(name) > LONGEST}
  if long:
    # a child's name past LONGEST: what tells the children apart in its place (transformers'
    # EfficientNetBlockWithDepthwiseConvPad, was EfficientNetBlock1), else a number
    # every variant's, clashing or not: a part tells a variant apart only from those that lack it
    by_parts = {
        key: [*described[key], *sorted({_own_part(names, c) for c in features[key]["children"]} - {""}, key=len)]
        for key in keys
    }
    by_settings(by_parts)
    shorter = _shortest(base, by_parts)
    for key in long:
      chosen[key] = shorter[key] if len(shorter[key]) <= LONGEST else base + "".join(described[key])
  return chosen


WORD_START = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")  # Lo|FTR|Rep|VGG|Stage


def _unshared(base: str, name: str) -> str:
  """``name`` without the words it begins with that ``base`` begins with too, a model family's
  prefix (HGNetV2Stage's child HGNetV2BasicLayer names it HGNetV2StageWithBasicLayer); a word starts
  at an upper-case letter after a lower-case one or a digit, or before a lower-case one (RepVGG is
  two words, VGGStage two, PPOCRV6 one). A name that begins with the other whole (ConvNorm's child
  ConvNormAct) keeps it all."""
  if name.startswith(base) or base.startswith(name):
    return name
  starts = {m.start() for m in WORD_START.finditer(base)} & {m.start() for m in WORD_START.finditer(name)}
  shared = [i for i in starts if base[:i] == name[:i]]
  return name[max(shared, default=0) :]


def _own_part(names: dict[tuple, str], child: tuple) -> str:
  """What a child class's name says past its torch class's (``WithDepthwiseConvPad``); "" for the
  variant that keeps torch's name or one named by a number."""
  name, base = names.get(child, child[0].__name__), child[0].__name__
  own = name[len(base) :] if name.startswith(base) else name
  return "" if own.isdigit() else own


def _told_apart(
    parts: dict[tuple, list[str]], keys: list[tuple], has, named=str, order=None, prefix: str = "With"
) -> set[tuple]:
  """Where variants' names clash, each gains ``prefix`` (``With``) and the ``named`` form of what
  ``has(key)`` gives it that not every clashing variant has (in ``order``); returns the keys that
  clashed."""
  clashed: set[tuple] = set()
  for clashing in _clashes({key: "".join(parts[key]) for key in keys}).values():
    found = {key: has(key) for key in clashing}
    common = set.intersection(*found.values())
    for key in clashing:
      parts[key] = [*parts[key], *(f"{prefix}{named(x)}" for x in sorted(found[key] - common, key=order))]
    clashed.update(clashing)
  return clashed


def _shortest(base: str, parts: dict[tuple, list[str]], every: dict[tuple, set[str]] | None = None) -> dict[tuple, str]:
  """Each variant's name: all its parts, or where that is longer than LONGEST, as few of them as
  say, for every other variant, something it has that the other has not (where it has any):
  greedy, the part that tells it from most others first. ``every``: the parts each variant would
  have were it named for all it has (the children its name leaves out): a part that another
  variant has there tells the two nothing apart."""
  every = every or {}
  chosen = {}
  for key, own in parts.items():
    if len(base + "".join(own)) <= LONGEST:
      chosen[key] = base + "".join(own)
      continue
    apart = [set(own) - set(other) - every.get(k, set()) for k, other in parts.items() if k != key]
    apart = [differ for differ in apart if differ]
    picked: set[str] = set()
    while apart:
      best = max(own, key=lambda part: sum(part in differ for differ in apart))
      picked.add(best)
      apart = [differ for differ in apart if best not in differ]
    chosen[key] = base + "".join(part for part in own if part in picked)
  return chosen


SETTING = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,15}")  # a string setting that reads as a name: "grid"


def _settings(modules: list | None) -> set[str]:
  """Name parts for the settings all of a class's torch modules share: a flag that is on by its
  name (``IsFirst``), a short string by its value (``Grid``)."""
  if not modules:
    return set()
  shared = None
  for module in modules:
    own = {(name, value) for name, value in module_attributes(module).items() if type(value) in (bool, str)}
    shared = own if shared is None else shared & own
  return {
      _camel(name) if value is True else _camel(value)
      for name, value in shared
      if value is True or isinstance(value, str) and SETTING.fullmatch(value)
  }


def _described(own: dict, every: list[dict]) -> list[str]:
  """What ``own`` has that not every variant has, as name parts. A numbered series of attributes
  (DenseNet's ``denselayer1`` .. ``denselayer24``, regnet's ``block3-0`` ..) is named by its stem:
  how many it has where every variant has the series, else the stem (``AnyStageWithBlock3``)."""
  parts = []
  if own["skip"] and not all(f["skip"] for f in every):
    parts.append("WithSkip")
  inputs = collections.Counter(f["inputs"] for f in every).most_common(1)[0][0]
  if own["inputs"] != inputs:
    parts.append(f"With{own['inputs']}Inputs")
  series = _series(every)
  unnumbered = [{a for a in f["attributes"] if _stem(a) not in series} for f in every]
  everywhere = set.intersection(*unnumbered)
  parts += [f"With{_camel(a)}" for a in sorted(own["attributes"] - everywhere) if _stem(a) not in series]
  stems = [collections.Counter(_stem(a) for a in f["attributes"] if _stem(a) in series) for f in every]
  for stem, count in sorted(collections.Counter(_stem(a) for a in own["attributes"] if _stem(a) in series).items()):
    counts = [s[stem] for s in stems if stem in s]
    if len(counts) < len(stems):  # a series the others lack: which, and how many where that differs
      parts.append(f"With{count if len(set(counts)) > 1 else ''}{_camel(stem)}")
    elif count != collections.Counter(counts).most_common(1)[0][0]:
      parts.append(f"With{count}{_camel(stem)}")
  for attribute, count in sorted(own["counts"].items()):
    counts = [f["counts"].get(attribute) for f in every]
    usual = collections.Counter(counts).most_common(1)[0][0]
    if count != usual and attribute in everywhere:
      parts.append(f"With{count}{_camel(attribute)}")
  return parts


_NUMBERED = re.compile(r"(.*\D)\d+")


def _stem(attribute: str) -> str | None:
  """``denselayer`` for ``denselayer12``, ``block3-`` for ``block3-0``; None without a number."""
  match = _NUMBERED.fullmatch(attribute)
  return match[1] if match else None


def _series(every: list[dict]) -> set[str]:
  """The stems of numbered attributes that the variants number in more than three ways (the same
  name with other numbers: ``denselayer1`` .. ``denselayer6``, ``block1-0`` .. ``block3-2``): a
  series of blocks, not roles such as ``conv1`` .. ``conv3`` or ``ls1``, ``ls2``."""
  shapes: dict[str, set[str]] = collections.defaultdict(set)
  for f in every:
    for attribute in f["attributes"]:
      if _stem(attribute) is not None:
        shapes[re.sub(r"\d+", "#", attribute)].add(attribute)
  return {_stem(a) for attributes in shapes.values() if len(attributes) > 3 for a in attributes}


def _features(skeleton: tuple, calls: list, unwritten: Iterable[tuple] = ()) -> dict:
  """A class's code as what names can say: whether it adds its input to a value (a skip
  connection), how many inputs it takes, the attributes it calls (first part), how many members or Sequential elements
  each has, the child classes it calls and the functions it runs (``relu``). A call of an
  ``unwritten`` class (an identity the source leaves out: smp's ``attention1``) says nothing."""
  inputs = next((set(s[1]) for s in skeleton if s[0] == "inputs"), set())
  found = {
      "skip": False,
      "inputs": len(inputs),
      "attributes": set(),
      "counts": collections.Counter(),
      "children": set(),
      "ops": set(),
      "layers": set(),  # the classes of its layers
      "branches": set(),  # the Python branches the trace took, as name parts (``IfNdimIs4``)
  }
  members: dict[str, set] = collections.defaultdict(set)
  for statement in skeleton:  # an identity's output is its input (timm's ``shortcut``, an nn.Identity)
    if identity_input(statement) in inputs:
      inputs.add(statement[1][0])

  def attribute(path: str, elements: int | None = None):
    first, _, rest = path.partition(".")
    found["attributes"].add(first)
    if rest.split(".")[0].isdigit():
      members[first].add(rest.split(".")[0])
    elif elements is not None:
      found["counts"][first] = elements

  def elements(items):  # a Sequential's: its layers are named by index, its children are classes
    for item in items:
      if item[0] == "op":
        walk(item)
      elif item[0] == "layer":
        found["layers"].add(item[1].__name__)
      elif item[0] == "element":
        found["children"].add(item[1])
      elif item[0] == "sequence":
        elements(item[1])
      elif item[0] == "repeat":
        elements(item[1:2])

  def activations(fields):  # a norm's activation (timm's BatchNormAct2d ``after``), where every call has one
    for name, value in fields:
      applied = {value_key(call[value[1]]) for call in calls} if name == "after" and value[0] == "hole" else ()
      if len(applied) == 1:
        found["ops"].update(a.fn.__name__ for a in calls[0][value[1]] or () if a.fn in NAMED_FUNCTIONS)

  def walk(e):
    if not (isinstance(e, tuple) and e):
      return
    kind = e[0]
    if kind == "layer":
      attribute(e[3])
      activations(e[2])
      found["layers"].add(e[1].__name__)
    elif kind == "call":
      if e[1] in unwritten:
        return
      found["children"].add(e[1])
      attribute(e[3])
      walk(e[4])
      return
    elif kind == "element":
      found["children"].add(e[1])
      return
    elif kind == "sequential":
      attribute(e[2], _length(e[1], calls))
      elements(e[1])
      return
    elif kind == "op":
      function = getattr(e[1], "fn", None)
      if isinstance(function, Guard):
        found["branches"].update(filter(None, [_branch(function)]))
      if function in NAMED_FUNCTIONS:
        found["ops"].add(function.__name__)
      if function is functional.add:
        found["skip"] |= any(a[:1] == ("var",) and a[1] in inputs for a in e[2])
    for x in e:
      walk(x)

  walk(skeleton)
  for first, keys in members.items():
    found["counts"][first] = len(keys)
  return found


COMPARED = {ast.Eq: "Is", ast.NotEq: "IsNot", ast.Gt: "Above", ast.LtE: "AtMost", ast.Lt: "Below", ast.GtE: "AtLeast"}
CONDITION = re.compile(r"(?:el)?if (.+):")  # torch's line of a branch on one condition


def _branch(guard: Guard) -> str | None:
  """The branch a guard's trace took, as a name part, where torch's line branches on one comparison
  of a name with a number (``if x.ndim == 4:`` -> ``IfNdimIs4``, or ``IfNdimIsNot4``) or on a
  name's truth (``if padding:`` -> ``IfPadding``, ``IfNotPadding``); None for any other."""
  if guard.conversion != "bool" or not isinstance(guard.expected, bool):
    return None
  line = CONDITION.fullmatch(guard.where.partition(": ")[2].strip())
  try:
    condition = ast.parse(line[1], mode="eval").body
  except (TypeError, SyntaxError):  # no line of one condition (None), or not one Python expression
    return None
  if isinstance(condition, ast.Compare) and len(condition.ops) == 1 and type(condition.ops[0]) in COMPARED:
    subject = condition.left
    try:
      number = ast.literal_eval(condition.comparators[0])
    except ValueError:  # not a literal
      return None
    if type(number) is not int:
      return None
    words = list(COMPARED.values())
    word = COMPARED[type(condition.ops[0])]
    word = word if guard.expected else words[words.index(word) ^ 1]  # each word's negation is its pair
    tail = f"{word}{number}".replace("-", "Minus")
  else:
    subject, tail = condition, ""
  name = subject.attr if isinstance(subject, ast.Attribute) else getattr(subject, "id", None)
  if name is None:
    return None
  return f"If{'' if guard.expected or tail else 'Not'}{_camel(name)}{tail}"


def _length(elements: tuple, calls: list) -> int | None:
  """How many elements a Sequential has (a run counts its blocks), if every call of the class has
  as many (a run's count may be a field: a stage's depth)."""
  total = 0
  for element in elements:
    if element[0] == "repeat":
      index = element[2][1]
      counts = {call[index] for call in calls}
      if len(counts) != 1:
        return None
      total += counts.pop()
    else:
      total += 1
  return total


def _clashes(chosen: dict[tuple, str]) -> dict[str, list[tuple]]:
  by_name = collections.defaultdict(list)
  for key, name in chosen.items():
    by_name[name].append(key)
  return {name: keys for name, keys in by_name.items() if len(keys) > 1}


def _camel(attribute: str) -> str:
  """``conv_dw`` as ``ConvDw``; torch's names that are no identifiers too (regnet's ``block1-0``:
  ``Block1_0``)."""
  parts = re.split(r"[^0-9A-Za-z_]+", attribute)
  return "_".join(filter(None, ("".join(p[:1].upper() + p[1:] for p in part.split("_")) for part in parts)))


def next_name(name: str) -> str:
  """``name1`` after ``name``, ``name2`` after ``name1``."""
  stem = name.rstrip("0123456789")
  number = name[len(stem) :]
  return f"{stem}{int(number) + 1 if number else 1}"
