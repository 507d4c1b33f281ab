"""PyTorch state_dict <-> Flax variables, by rule rather than by per-model key tables.

A torch key ``a.b.c.weight`` names module path ``a.b.c`` and leaf ``weight``; the Flax variables
hold the same module path (``rename`` maps paths that differ). Which Flax leaf a torch leaf
becomes depends on what the Flax module at that path holds (the template):

  weight              -> params/kernel (OI... -> ...IO), params/scale, params/embedding
  bias                -> params/bias
  running_mean, _var  -> batch_stats/mean, var (BatchNorm) or params/mean, var (FrozenBatchNorm)
  num_batches_tracked -> batch_stats/num_batches_tracked (int64 -> the counter dtype); dropped
                         for FrozenBatchNorm (as torchvision's FrozenBatchNorm2d does); 0 when an
                         old checkpoint lacks it
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from jaxbn._src.checkpoints.files import as_numpy, numpy_to_torch
from jaxbn._src.core.layer import counter_dtype
from jaxbn._src.errors import ConversionError
from jaxbn._src.variables.state import as_variables, is_nnx, state_of, update

Rename = Callable[[str], str] | Sequence[tuple[str, str]] | None

# torch leaf -> (collection, Flax leaf) candidates, in order of preference.
TO_FLAX = {
    "weight": [("params", "kernel"), ("params", "scale"), ("params", "embedding")],
    "bias": [("params", "bias")],
    "running_mean": [("batch_stats", "mean"), ("params", "mean")],
    "running_var": [("batch_stats", "var"), ("params", "var")],
    "num_batches_tracked": [("batch_stats", "num_batches_tracked")],
}
TO_TORCH = {flax: torch for torch, candidates in TO_FLAX.items() for flax in candidates}
# A parameter or buffer that a ported forward reads directly: torch's ``a.gamma`` is Flax's
# ``params/a/gamma/tensor`` (``buffers/a/gamma/tensor`` for a buffer); see jaxbn.port.
TENSOR = (("params", "tensor"), ("buffers", "tensor"))


class Converted(NamedTuple):
  """The result of ``from_torch``: variables and, like torch's load_state_dict, what did not fit.

  Attributes:
    variables: the Flax variables.
    missing: Flax paths the state_dict has nothing for (kept from the template in non-strict mode
      when the template holds arrays).
    unexpected: torch keys with no place in the Flax variables.
    mismatched: ``(torch key, torch shape, Flax path, expected shape)`` for shapes that differ
      after the layout change.
  """

  variables: dict
  missing: list[str]
  unexpected: list[str]
  mismatched: list[tuple[str, tuple, str, tuple]]


def kernel_to_flax(weight: np.ndarray) -> np.ndarray:
  """torch ``(out, in, *spatial)`` (conv, any rank, grouped or depthwise) or ``(out, in)``
  (linear) -> Flax ``(*spatial, in, out)``."""
  return np.transpose(weight, (*range(2, weight.ndim), 1, 0))


def kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
  """The inverse of ``kernel_to_flax``."""
  return np.transpose(kernel, (kernel.ndim - 1, kernel.ndim - 2, *range(kernel.ndim - 2)))


def renamer(rename: Rename) -> Callable[[str], str]:
  if rename is None:
    return lambda path: path
  if callable(rename):
    return rename
  rules = [(re.compile(pattern), replacement) for pattern, replacement in rename]

  def apply(path: str) -> str:
    for pattern, replacement in rules:
      path = pattern.sub(replacement, path)
    return path

  return apply


def _split(path: str) -> tuple[str, ...]:
  return tuple(p for p in path.split(".") if p)


def _flat(variables: Mapping) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(unfreeze(variables))


def from_torch(
    state_dict: Mapping[str, Any],
    template: Mapping,
    *,
    rename: Rename = None,
    strict: bool = True,
    dtype: Any = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Converted:
  """A torch state_dict as the Flax variables that ``template`` describes.

  Args:
    state_dict: torch key -> array (numpy or torch tensors; see ``jaxbn.load_state_dict``).
    template: the Flax model's variables, from ``model.init`` or ``jax.eval_shape(model.init, ...)``;
      or an NNX module, filled in place (``variables`` is then its ``nnx.state``), or an NNX
      state (``variables`` is a filled copy).
    rename: maps a torch module path (``'layer1.0.conv1'``) to the Flax one (dotted): a callable,
      or ``(regex, replacement)`` pairs applied in order.
    strict: raise one ConversionError listing every missing key, unexpected key and shape
      mismatch (torch's load_state_dict style); else return them in the result.
    dtype: cast floating arrays to this dtype; default: keep the checkpoint's dtypes.
    progress: wraps the iteration over tensors (e.g. ``tqdm.tqdm``) for a progress bar.

  Example::

    >>> template = jax.eval_shape(model.init, jax.random.key(0), x)        # doctest: +SKIP
    >>> variables = jaxbn.convert.from_torch(state_dict, template).variables  # doctest: +SKIP
  """
  if is_nnx(template):
    converted = from_torch(
        state_dict, as_variables(template), rename=rename, strict=strict, dtype=dtype, progress=progress
    )
    filled = update(template, converted.variables, partial=True)  # non-strict: the rest as it was
    return converted._replace(variables=state_of(filled))
  rename = renamer(rename)
  flat_template = _flat(template)
  modules: dict[tuple[str, ...], dict[tuple[str, str], Any]] = collections.defaultdict(dict)
  for (collection, *path, leaf), value in flat_template.items():
    modules[tuple(path)][(collection, leaf)] = value

  flat: dict[tuple[str, ...], np.ndarray] = {}
  unexpected, mismatched = [], []
  for key, array in (progress or iter)(state_dict.items()):
    module_path, _, torch_leaf = key.rpartition(".")
    path = _split(rename(module_path))
    holds = modules.get(path, {})
    target = next((c for c in TO_FLAX.get(torch_leaf, ()) if c in holds), None)
    tensor = modules.get((*path, torch_leaf), {})
    if target is None and tensor:  # a tensor read directly in forward, held at its own path
      path, holds = (*path, torch_leaf), tensor
      target = next((c for c in TENSOR if c in tensor), None)
    if target is None:
      if torch_leaf == "num_batches_tracked" and ("params", "mean") in holds:
        continue  # a FrozenBatchNorm keeps no counter
      unexpected.append(key)
      continue
    torch_shape = tuple(array.shape)
    array = as_numpy(array)
    if target[1] == "kernel":
      array = kernel_to_flax(array)
    destination = (target[0], *path, target[1])
    expected = holds[target]
    if tuple(array.shape) != tuple(expected.shape):
      mismatched.append((key, torch_shape, "/".join(destination), tuple(expected.shape)))
      continue
    if target[1] == "num_batches_tracked":
      array = array.astype(counter_dtype())
    elif target[1] == "tensor" and not np.issubdtype(array.dtype, np.floating):
      array = array.astype(expected.dtype)  # int64 index tables as int32 unless jax_enable_x64
    elif dtype is not None and jnp.issubdtype(array.dtype, jnp.floating):  # bfloat16 included
      array = array.astype(dtype)
    flat[destination] = array

  wrongly_shaped = {tuple(destination.split("/")) for *_, destination, _ in mismatched}
  missing = []
  for destination, value in flat_template.items():
    if destination in flat or destination in wrongly_shaped:
      continue
    if destination[-1] == "num_batches_tracked" and destination[:-1] + ("mean",) in flat:
      flat[destination] = np.zeros((), counter_dtype())  # torch fills it for old checkpoints
      continue
    missing.append("/".join(destination))
    if not strict and isinstance(value, (np.ndarray, jax.Array)):
      flat[destination] = value

  if strict and (missing or unexpected or mismatched):
    raise ConversionError(_describe(missing, unexpected, mismatched, modules, rename))
  return Converted(traverse_util.unflatten_dict(flat), missing, unexpected, mismatched)


def template_from_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """Flax variable shapes inferred from torch names and shapes alone, for models jaxbn has no
  Flax definition of: ``weight`` of rank >= 2 is a kernel (conv or linear), of rank 1 a scale;
  BatchNorm buffers go to ``batch_stats``. Embedding tables (rank-2 ``weight`` kept as is in
  Flax) are indistinguishable from linear kernels here: convert those with a real template."""
  flat = {}
  for key, array in state_dict.items():
    module_path, _, leaf = key.rpartition(".")
    shape = tuple(np.shape(array))
    if leaf == "weight":
      collection, flax_leaf = ("params", "kernel") if len(shape) >= 2 else ("params", "scale")
      shape = (*shape[2:], shape[1], shape[0]) if len(shape) >= 2 else shape
    elif leaf == "bias":
      collection, flax_leaf = "params", "bias"
    elif leaf in ("running_mean", "running_var", "num_batches_tracked"):
      collection, flax_leaf = "batch_stats", TO_FLAX[leaf][0][1]
    else:
      continue  # reported as unexpected by from_torch
    flat[(collection, *_split(module_path), flax_leaf)] = jax.ShapeDtypeStruct(shape, np.asarray(array).dtype)
  return traverse_util.unflatten_dict(flat)


def _describe(missing, unexpected, mismatched, modules, rename) -> str:
  lines = ["the state_dict does not fit the Flax variables:"]
  if missing:
    lines.append(f"  missing ({len(missing)}; in the Flax model, not in the state_dict): {', '.join(missing)}")
  if unexpected:
    lines.append(f"  unexpected ({len(unexpected)}; no place in the Flax model): {', '.join(unexpected)}")
  for key, torch_shape, destination, expected in mismatched:
    torch_layout = (
        f" (torch layout {tuple(kernel_to_torch(np.empty(expected, np.int8)).shape)})"
        if destination.endswith("/kernel")
        else ""
    )
    lines.append(f"  shape mismatch: {key} {torch_shape} -> {destination} expects {expected}{torch_layout}")
  flax_batchnorms = sorted(
      {
          key.rpartition(".")[0]
          for key in unexpected
          if key.endswith(".num_batches_tracked")
          and ("batch_stats", "mean") in modules.get(_split(rename(key.rpartition(".")[0])), {})
      }
  )
  if flax_batchnorms:
    lines.append(
        f"  {', '.join(flax_batchnorms)}: the Flax layer keeps batch_stats without num_batches_tracked, as"
        " flax.linen.BatchNorm does (biased running var, opposite momentum): build it with jaxbn.BatchNorm."
    )
  elsewhere = [key for key in unexpected if _split(rename(key.rpartition(".")[0])) not in modules]
  if elsewhere and missing:
    lines.append(
        "Module paths must match (torch 'layer1.0.conv1' = Flax layer1/0/conv1) and these do not, e.g."
        f" {elsewhere[0]}: map those that differ with rename=; strict=False returns a partial result with this report."
    )
  else:
    lines.append("strict=False returns a partial result with this report.")
  return "\n".join(lines)


def to_state_dict(
    variables: Mapping, *, rename: Rename = None, progress: Callable[[Iterable], Iterable] | None = None
) -> dict[str, np.ndarray]:
  """Flax variables -> a torch state_dict of numpy arrays (no torch needed).

  ``rename`` maps Flax module paths (dotted) to torch ones. Counters come back as int64.
  ``variables`` may be an NNX module or state.
  """
  variables = as_variables(variables)
  rename = renamer(rename)  # compiled once
  state_dict, unknown = {}, []
  for (collection, *path, leaf), value in (progress or iter)(_flat(variables).items()):
    key = torch_key(collection, (*path, leaf), rename)
    if key is None:
      unknown.append("/".join((collection, *path, leaf)))
      continue
    value = np.asarray(value)
    if leaf == "kernel":
      value = kernel_to_torch(value)
    elif leaf == "num_batches_tracked" or (
        (collection, leaf) in TENSOR and collection == "buffers" and np.issubdtype(value.dtype, np.signedinteger)
    ):
      value = value.astype(np.int64)  # torch's counters and integer buffers (index tables) are int64
    state_dict[key] = value
  if unknown:
    raise ConversionError(
        f"no torch name for {len(unknown)} Flax variable(s): {', '.join(unknown)}. jaxbn maps"
        f" {sorted('/'.join(k) for k in TO_TORCH)}."
    )
  return _in_torch_order(state_dict)


def _in_torch_order(state_dict: dict) -> dict:
  """Each module's tensors together, its parameters then its buffers, modules in the order they
  first appear: torch's ``state_dict()`` order (Flax keeps parameters and statistics apart)."""
  modules: dict[str, list[str]] = {}
  for key in state_dict:
    modules.setdefault(key.rpartition(".")[0], []).append(key)
  return {key: state_dict[key] for keys in modules.values() for key in keys}


def torch_key(collection: str, path: Sequence[str], rename: Rename = None) -> str | None:
  """The torch state_dict key of the Flax variable ``collection/path`` (``params``, ``('layer1',
  '0', 'conv1', 'kernel')`` -> ``layer1.0.conv1.weight``), or None where torch has no name for it."""
  *module, leaf = path
  if (collection, leaf) in TENSOR:
    *module, torch_leaf = module
  else:
    torch_leaf = TO_TORCH.get((collection, leaf))
  if torch_leaf is None:
    return None
  module_path = renamer(rename)(".".join(module))
  return f"{module_path}.{torch_leaf}" if module_path else torch_leaf


def to_torch(variables: Mapping, *, rename: Rename = None, like=None) -> dict:
  """Flax variables (or an NNX module or state) -> a torch state_dict of tensors, loadable with
  ``strict=True``.

  ``like``: the torch model it is for. The state_dict then comes in that model's key order and
  carries its ``_metadata`` (torch's per-module versions, which some loaders read: MNASNet's
  refuses a state_dict without them), as ``like.state_dict()`` would. Example::

    >>> torch_model.load_state_dict(jaxbn.convert.to_torch(variables, like=torch_model))  # doctest: +SKIP
  """
  state_dict = numpy_to_torch(to_state_dict(variables, rename=rename))
  if like is None:
    return state_dict
  reference = like.state_dict()
  ordered = collections.OrderedDict((key, state_dict.pop(key)) for key in reference if key in state_dict)
  ordered.update(state_dict)  # keys the model lacks: its loader names them
  ordered._metadata = reference._metadata
  return ordered
