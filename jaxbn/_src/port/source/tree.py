"""A traced program cut back into the torch model's module calls: one ``Block`` per call of a
module whose forward the port traced into, holding its own nodes and the calls of its children
in program order, with the values it reads from outside (``inputs``) and those read outside it
(``outputs``), as a function of its own."""

from __future__ import annotations

import dataclasses

from jaxbn._src.errors import PortError
from jaxbn._src.port.graph import Program, Scope, references, single_assignment


@dataclasses.dataclass
class Block:
  key: str  # the call, as fx keys it ("layer1.0"; "blocks.0@1" for a second call)
  path: str  # the torch module path; "" for the model
  torch_class: type | None
  items: list = dataclasses.field(default_factory=list)  # Node | Block, in program order
  inputs: list[str] = dataclasses.field(default_factory=list)
  outputs: list[str] = dataclasses.field(default_factory=list)

  def nodes(self):
    """Every node inside, children's included, in program order."""
    for item in self.items:
      yield from item.nodes() if isinstance(item, Block) else (item,)


def tree(program: Program, scopes: dict[str, tuple[Scope, ...]]) -> Block:
  """The model's call tree. A module's calls run contiguously in a traced program; one that does not
  (fx interleaved it with its caller's ops) is refused."""
  program = single_assignment(program)
  root = Block("", "", None)
  blocks = {"": root}
  for node in program.nodes:
    parent = root
    for scope in scopes.get(node.name, ()):
      block = blocks.get(scope.key)
      if block is None:
        block = blocks[scope.key] = Block(scope.key, scope.path, scope.torch_class)
        parent.items.append(block)
      elif parent.items[-1] is not block:
        raise PortError(f"emit: the calls of {scope.path} are not contiguous in the traced program")
      parent = block
    parent.items.append(node)
  _inline_callers_of_others(root)
  _connect(root, _users(root))
  return root


def _inline_callers_of_others(block: Block) -> None:
  """Writes inline in its caller each call of a module whose forward calls modules it does not hold
  (ultralytics' RT-DETR decoder calls the heads its caller passes it as arguments), and each call
  of a module inside which its caller calls or reads too (EdgeTAM calls ``mask_decoder`` and
  ``mask_decoder.conv_s0``): a class of its own could not hold those at torch's paths. Its children
  are then the caller's, at their paths below it (``decoder.layers.0``, a container); children
  first, so that such calls move up until a caller holds every module they call."""
  for item in block.items:
    if isinstance(item, Block):
      _inline_callers_of_others(item)
  paths = [called(item) for item in block.items]
  entered = {item.path for item in block.items if isinstance(item, Block)}
  entered = {path for path in entered if any(p and p.startswith(path + ".") for p in paths)}
  _splice(block, lambda child: child.path in entered or any(not _holds(child, inner) for inner in child.items))


def _splice(block: Block, inline) -> None:
  """Each child call ``inline(child)`` chooses replaced by the child's own items."""
  block.items = [
      x for item in block.items for x in (item.items if isinstance(item, Block) and inline(item) else (item,))
  ]


def _holds(block: Block, item) -> bool:
  """The module ``block`` calls holds what ``item`` calls (a node that calls no module: True)."""
  path = called(item)
  return path is None or path.startswith(block.path + ".")


def called(item) -> str | None:
  """The path of the module (or tensor) an item calls (reads); None for other nodes."""
  return item.path if isinstance(item, Block) else item.target if item.kind == "module" else None


def inline_where_inputs_differ(train_root: Block, eval_root: Block) -> None:
  """Writes inline in its caller, in both modes, each call of a module that reads more values in one
  mode than in the other (ultralytics' SemanticSegment reads its auxiliary level only in train): one
  class has one signature."""
  if _inline_pairs(train_root, eval_root):
    for root in (train_root, eval_root):
      _connect(root, _users(root))


def _inline_pairs(train_block: Block, eval_block: Block) -> bool:
  changed = False
  while True:
    children = [{item.key: item for item in b.items if isinstance(item, Block)} for b in (train_block, eval_block)]
    common = children[0].keys() & children[1].keys()
    differ = {key for key in common if len(children[0][key].inputs) != len(children[1][key].inputs)}
    if not differ:
      break
    for block in (train_block, eval_block):
      _splice(block, lambda child: child.key in differ)
    changed = True
  for key in common:
    changed |= _inline_pairs(children[0][key], children[1][key])
  return changed


def _users(root: Block) -> dict[str, set[str]]:
  """Value name -> the nodes that read it."""
  users: dict[str, set[str]] = {}
  for node in root.nodes():
    for name in references((node.args, node.kwargs)):
      users.setdefault(name, set()).add(node.name)
  return users


def _connect(block: Block, users: dict[str, set[str]]) -> None:
  """Each block's inputs (read inside, made outside) and outputs (made inside, read outside)."""
  inside = [node.name for node in block.nodes()]
  made = set(inside)
  reads: dict[str, None] = {}
  for node in block.nodes():
    for name in references((node.args, node.kwargs)):
      if name not in made:
        reads[name] = None
  block.inputs = list(reads)
  block.outputs = [name for name in inside if users.get(name, set()) - made]
  for item in block.items:
    if isinstance(item, Block):
      _connect(item, users)
