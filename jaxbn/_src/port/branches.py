"""A data-dependent ``if`` as a select: the model traced both ways, the branches merged with
``torch.where``.

JAX cannot branch on a traced value under jit, and fx follows one path. Where forward decides on a
tensor's values (``if not torch.isfinite(h).all(): h = h.clamp(...)``, transformers' RT-DETR in
training), the model is traced again with that decision the other way. The two programs agree up
to the decision and again after the branch; the merged program computes both branches' nodes
and, where the common code reads a value the branches made differently, reads
``torch.where(decision, taken, other)``: torch's result for either outcome, at the cost of both
branches. A branch that calls a module (its state would move on both paths), writes in place or
draws random numbers is not merged, nor is a decision that is not one boolean (an ``int()`` of
values, a ``torch._check`` assertion on values): those stay refused by name (``graph.py``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
import torch.fx as fx

from jaxbn._src.port import ops
from jaxbn._src.port.tracer import guard

MAX_DECISIONS = 8  # each one more trace of the whole model


def value_decisions(graph: fx.Graph) -> list[fx.Node]:
  """The Guard nodes of decisions on tensor values, in program order (the tracer counts them so)."""
  return [node for node in graph.nodes if node.op == "call_function" and node.target is guard and node.args[3]]


def merged(
    graph: fx.Graph, retrace: Callable[[dict[int, bool]], fx.Graph], values: Callable, root: torch.nn.Module
) -> bool:
  """``graph`` with each value decision's other branch merged in, in place: ``retrace(forced)``
  traces the model again with decision ``i`` (counted in program order) taken as ``forced[i]``;
  ``values(node)``: a node's value on the example; ``root``: the traced model, which holds the
  tensor literals of both traces. Only ``bool()`` decisions are merged, all or none: False, and
  ``graph`` unchanged, where one cannot be."""
  decisions = value_decisions(graph)  # numbered as the tracer counts them
  branches = [(index, d) for index, d in enumerate(decisions) if d.args[2] == "bool"]
  if not branches or len(branches) > MAX_DECISIONS:
    return False  # int() / float() of values and torch._check assertions have no two ways: they stay refused
  plans = []
  for index, decision in branches:
    condition = decision.args[0]
    value = values(condition)
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.dim() == 0):
      return False  # where() needs one boolean
    try:
      other = retrace({index: not decision.args[1]})
    except Exception:  # noqa: BLE001 - the other way fails in torch itself: the decision stays refused
      return False
    plan = _plan(graph, other, decision, root)
    if plan is None:
      return False
    plans.append(plan)
  reads = [key for plan in plans for key in plan[3]]
  if len(reads) != len(set(reads)):
    return False  # two decisions select the same read: nested branches
  for plan in plans:
    _apply(graph, *plan)
  graph.lint()
  return True


def _signature(node: fx.Node) -> tuple:
  target = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", repr(node.target))
  if _literal(node):
    target = "a tensor literal"  # each trace names its own: compared by value (_plan)
  return (node.op, target, len(node.args), tuple(sorted(node.kwargs)))


def literal_name(name: str) -> bool:
  """fx's name for a tensor literal it stores on the root (``_tensor_constant0``)."""
  return name.startswith("_tensor_constant")


def _literal(node: fx.Node) -> bool:
  return node.op == "get_attr" and literal_name(node.target)


def _plan(graph: fx.Graph, other: fx.Graph, decision: fx.Node, root: torch.nn.Module):
  """How ``other`` (the trace with ``decision`` the other way) merges into ``graph``: its branch
  nodes, and the inputs of common nodes that must become selects; None where it cannot."""
  mine, theirs = list(graph.nodes), list(other.nodes)
  matcher = difflib.SequenceMatcher(None, [_signature(n) for n in mine], [_signature(n) for n in theirs], False)
  counterpart: dict[fx.Node, fx.Node] = {}  # their node -> mine
  branch_mine, branch_theirs = [], []
  for tag, i1, i2, j1, j2 in matcher.get_opcodes():
    if tag == "equal":
      counterpart.update(zip(theirs[j1:j2], mine[i1:i2], strict=True))
    else:
      branch_mine += mine[i1:i2]
      branch_theirs += theirs[j1:j2]
  for theirs_node, my_node in counterpart.items():
    if _literal(my_node):
      a, b = getattr(root, my_node.target), getattr(root, theirs_node.target)
      if not (a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)):
        return None
  position = {node: i for i, node in enumerate(mine)}
  start = position[decision]
  # both branches lie after the decision; the decision is matched with its twin
  if decision not in counterpart.values() or any(position[n] < start for n in branch_mine):
    return None
  if any(not ops.pure(n) for n in (*branch_mine, *branch_theirs)):
    return None
  own = set(branch_theirs)
  for node in branch_theirs:  # their branch reads what came before the decision, or itself
    if any(a not in own and position[counterpart[a]] > start for a in node.all_input_nodes):
      return None
  selects = {}  # (my node, my input) -> their input: read through a select
  for their_node, my_node in counterpart.items():
    if position[my_node] <= start:
      continue
    pairs = _paired(my_node, their_node)
    if pairs is None:
      return None
    differ = {(m, t) for m, t in pairs if t in own or counterpart.get(t) is not m}
    for mine_input, their_input in differ:
      if any(m is mine_input and (m, t) not in differ for m, t in pairs):
        return None  # one input, read as itself in one place and through a select in another
      if their_input not in own and position[counterpart[their_input]] >= position[my_node]:
        return None  # their value is made after the read: the programs do not line up
      if selects.setdefault((my_node, mine_input), their_input) is not their_input:
        return None
  return decision, branch_theirs, counterpart, selects


def _paired(mine: fx.Node, theirs: fx.Node) -> list[tuple[fx.Node, fx.Node]] | None:
  """The node inputs of two matched nodes, position by position; None where their constants differ."""
  flat_mine, _ = torch.utils._pytree.tree_flatten((mine.args, mine.kwargs))
  flat_theirs, _ = torch.utils._pytree.tree_flatten((theirs.args, theirs.kwargs))
  if len(flat_mine) != len(flat_theirs):
    return None
  pairs = []
  for a, b in zip(flat_mine, flat_theirs, strict=True):
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
      pairs.append((a, b))
    elif isinstance(a, fx.Node) or isinstance(b, fx.Node) or not _same(a, b):
      return None
  return pairs


def _same(a, b) -> bool:
  try:
    return bool(a == b) if type(a) is type(b) else False
  except Exception:  # noqa: BLE001 - values that do not compare
    return False


def _apply(graph: fx.Graph, decision: fx.Node, branch: list, counterpart: dict, selects: dict) -> None:
  """Their branch copied in after the decision, each differing read through a select, the
  decision's guard removed (the select decides now)."""
  condition, taken = decision.args[0], decision.args[1]
  copies: dict[fx.Node, fx.Node] = {}

  def mapped(node: fx.Node) -> fx.Node:
    return copies.get(node) or counterpart[node]

  anchor = decision
  for node in branch:
    with graph.inserting_after(anchor):
      copies[node] = anchor = graph.node_copy(node, mapped)
  for (my_node, mine_input), their_input in selects.items():
    with graph.inserting_before(my_node):
      other = mapped(their_input)
      arguments = (condition, mine_input, other) if taken else (condition, other, mine_input)
      select = graph.call_function(torch.where, arguments)
      select.meta = dict(decision.meta)
    my_node.replace_input_with(mine_input, select)
  graph.erase_node(decision)
