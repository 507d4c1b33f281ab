"""The op table the port looks up: torch's callables -> ``jaxbn.ops``'s JAX functions.

``jaxbn/_src/torchlike/functional.py`` registers each JAX function under the names of the torch
callables it implements ("torch.flatten", "Tensor.flatten"); here those names are resolved to
torch's objects, which is what fx's nodes hold. Names of an optional library that is not
installed (torchvision, timm) are left out.
"""

from __future__ import annotations

import builtins
import importlib
import math
import operator

import torch
import torch.nn.functional as F

from jaxbn._src.torchlike import functional
from jaxbn._src.torchlike.functional import (  # noqa: F401 (the port's modules use them through here)
    PAD_MODES,
    RESULT_FIELDS,
    TENSOR_ATTRIBUTES,
    Context,
    OpRule,
    drop_samples,
    group_norm,
    layer_norm,
    plus_bias,
)

_NAMESPACES = {
    "torch": torch,
    "F": F,
    "Tensor": torch.Tensor,
    "operator": operator,
    "math": math,
    "builtins": builtins,
}


def resolve(name: str):
  """The torch object a table name stands for, or None where its library is not installed."""
  prefix, _, attribute = name.rpartition(".")
  try:
    namespace = _NAMESPACES.get(prefix) or importlib.import_module(prefix)
  except ImportError:
    return None
  return getattr(namespace, attribute)


OPS: dict = {key: rule for name, rule in functional.TABLE.items() if (key := resolve(name)) is not None}


def method(name: str):
  """``Tensor.<name>``, the key under which fx's ``call_method`` nodes are looked up."""
  return getattr(torch.Tensor, name)


def key_of(node):
  """The table key of an fx ``call_function`` / ``call_method`` node: its function, or
  ``Tensor.<method>`` (the method's name where Tensor has none)."""
  return getattr(torch.Tensor, node.target, node.target) if node.op == "call_method" else node.target


def writes_in_place(node) -> bool:
  """Whether an fx ``call_function`` / ``call_method`` node writes into its first argument:
  ``x.add_(y)``, ``x[i] = v``, ``F.relu(x, inplace=True)``."""
  if node.op == "call_method":
    return node.target.endswith("_") and not node.target.endswith("__")
  return node.kwargs.get("inplace") is True or node.target is operator.setitem


def pure(node) -> bool:
  """Whether an fx node may be run or dropped at will: no module call (its state would move), no
  write in place, no random draw (a tensor read, ``get_attr``, is pure)."""
  if node.op in ("call_module", "placeholder", "output"):
    return False
  if node.op == "get_attr":
    return True
  rule = OPS.get(key_of(node))
  return not writes_in_place(node) and not (rule is not None and rule.context)


PUBLIC_NAMESPACES = (
    ("F", F),
    ("torch", torch),
    ("torch.fft", torch.fft),
    ("torch.linalg", torch.linalg),
    ("torch.special", torch.special),
)


def name_of(key) -> str:
  """A readable name for a torch callable: ``torch.cat``, ``F.relu``, ``Tensor.view``, ``operator.add``
  (a torch builtin by its public alias: ``torch.fft.fft2``, not ``torch._C._fft.fft_fft2``)."""
  if isinstance(key, str):
    return key
  name = getattr(key, "__name__", repr(key))
  if getattr(torch.Tensor, name, None) is key:
    return f"Tensor.{name}"
  for prefix, namespace in PUBLIC_NAMESPACES:
    if getattr(namespace, name, None) is key:
      return f"{prefix}.{name}"
  for prefix, namespace in PUBLIC_NAMESPACES:
    alias = next(
        (attribute for attribute, value in vars(namespace).items() if value is key and not attribute.startswith("_")),
        None,
    )
    if alias:
      return f"{prefix}.{alias}"
  module = getattr(key, "__module__", None) or ""
  if module in ("_operator", "operator"):
    return f"operator.{name}"
  if module == "builtins":
    return name
  return f"{module}.{name}"


def supported() -> list[str]:
  return sorted({name_of(key) for key in OPS})
