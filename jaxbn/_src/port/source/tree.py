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
  users: dict[str, set[str]] = {}
  for node in program.nodes:
    for name in references((node.args, node.kwargs)):
      users.setdefault(name, set()).add(node.name)
  _connect(root, users)
  return root


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
