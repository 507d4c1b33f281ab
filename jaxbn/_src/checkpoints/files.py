"""Reading and writing PyTorch state_dicts as numpy arrays (.pt/.pth/.bin and .safetensors)."""

from __future__ import annotations

import os
import pathlib
import pickle
import re
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from jaxbn._src.checkpoints.config import (
    METADATA_KEY,
    from_metadata,
    to_metadata,
    torch_configs,
)
from jaxbn._src.errors import CheckpointError

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Keys under which training frameworks nest a model's state_dict in a checkpoint.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A PyTorch state_dict from ``.pt``/``.pth``/``.bin`` or ``.safetensors``, as numpy arrays.

  Dtypes are kept (bfloat16 as ``ml_dtypes.bfloat16``, ``num_batches_tracked`` as int64). Torch
  files are unpickled with ``weights_only=True``: a pickle that would run code is refused.
  ``.safetensors`` files need no torch. Example::

    >>> state_dict = jaxbn.load_state_dict("resnet18.safetensors")  # doctest: +SKIP
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: no such file.")
  if path.suffix == ".safetensors":
    return _load_safetensors(path)
  if path.suffix in TORCH_SUFFIXES:
    return _load_torch(path)
  raise CheckpointError(
      f"{path}: unknown checkpoint type {path.suffix!r}; jaxbn reads {', '.join(TORCH_SUFFIXES)} and .safetensors."
  )


def _unreadable_safetensors(path, error) -> CheckpointError:
  return CheckpointError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {error}")


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  try:
    return dict(load_file(str(path)))
  except (SafetensorError, OSError, ValueError) as error:
    raise _unreadable_safetensors(path, error) from None


def safetensors_header(path: str | os.PathLike) -> tuple[list[str], dict[str, str] | None]:
  """A ``.safetensors`` file's tensor names and metadata, read without its tensors."""
  from safetensors import SafetensorError, safe_open

  try:
    with safe_open(str(path), framework="numpy") as f:
      return list(f.keys()), f.metadata()
  except (SafetensorError, OSError, ValueError) as error:
    raise _unreadable_safetensors(path, error) from None


# torch.save writes a zip archive; before torch 1.6 it wrote a pickle (protocol 2 or later).
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _load_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    head = f.read(4)
  if not head.startswith(TORCH_MAGIC):
    raise CheckpointError(
        f"{path}: not a torch checkpoint: torch.save writes a zip archive (or, before torch 1.6, a pickle),"
        f" and this file starts with {head!r}."
    )
  try:
    import torch
  except ImportError:
    raise CheckpointError(
        f"{path}: reading torch pickles needs torch (pip install 'jaxbn[torch]'); .safetensors files do not."
    ) from None
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as error:
    raise CheckpointError(
        f"{path}: refused to unpickle: the file holds objects beyond tensors, and unpickling them"
        " could run code. If you trust the file, load it yourself with"
        " torch.load(path, weights_only=False), take its state_dict, and pass that on; better,"
        f" re-save it as .safetensors. torch said: {_first_line(error)}"
    ) from None
  except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError) as error:  # what a damaged file raises
    raise CheckpointError(
        f"{path}: not a readable torch checkpoint (truncated or corrupt?): torch said {_first_line(error)!r}"
    ) from None
  return state_dict_to_numpy(_unwrap(loaded, path))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch's weights_only messages are styled for a terminal


def _first_line(error: BaseException) -> str:
  """The first non-empty line of torch's message, without terminal styling."""
  lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def _unwrap(loaded, path) -> Mapping:
  """The state_dict inside a checkpoint: the mapping itself, or one nested under a usual key."""
  if not isinstance(loaded, Mapping):
    raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a state_dict.")
  if all(_is_tensor(v) for v in loaded.values()):
    return loaded
  for key in WRAPPER_KEYS:
    if isinstance(loaded.get(key), Mapping) and all(_is_tensor(v) for v in loaded[key].values()):
      return loaded[key]
  raise CheckpointError(
      f"{path}: not a state_dict (name -> tensor) and none is nested under {WRAPPER_KEYS};"
      f" top-level keys: {sorted(loaded)[:10]}."
  )


def _is_tensor(value) -> bool:
  import torch

  return isinstance(value, torch.Tensor)


def tensor_to_numpy(tensor) -> np.ndarray:
  """A torch tensor as a numpy array of its own (a copy), dtype kept (bfloat16 through ml_dtypes)."""
  import torch

  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
  return tensor.numpy().copy()


def numpy_to_tensor(array):
  """A numpy array as a torch tensor of its own (a copy), dtype and 0-d shape kept."""
  import torch

  array = np.asarray(array)
  if array.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(np.array(array, order="C"))


def state_dict_to_numpy(state_dict: Mapping) -> dict[str, np.ndarray]:
  """torch tensors -> numpy arrays, dtypes kept (bfloat16 through ml_dtypes)."""
  return {key: tensor_to_numpy(tensor) for key, tensor in state_dict.items()}


def numpy_to_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
  """numpy arrays -> torch tensors, dtypes kept."""
  return {key: numpy_to_tensor(array) for key, array in state_dict.items()}


def save_state_dict(state_dict, path: str | os.PathLike, *, batchnorm_config=None) -> None:
  """Writes a state_dict as ``.safetensors`` (no torch needed) or ``.pt``/``.pth``.

  ``state_dict``: name -> numpy array or tensor, or a torch module, whose state_dict is written
  and whose BatchNorm configuration (eps, momentum, affine, track_running_stats, class) is
  recorded. ``batchnorm_config`` (layer -> ``LayerConfig``) records it explicitly. The record
  goes into the ``.safetensors`` header, where ``read_batchnorm_config`` and
  ``jaxbn.convert.load`` find it; a torch pickle has no place for it. Example::

    >>> jaxbn.save_state_dict(torch_model, "model.safetensors")  # doctest: +SKIP
  """
  path = pathlib.Path(path)
  if hasattr(state_dict, "named_modules"):  # a torch module
    batchnorm_config = torch_configs(state_dict) if batchnorm_config is None else batchnorm_config
    state_dict = state_dict.state_dict()
  if path.suffix == ".safetensors":
    from safetensors.numpy import save_file

    arrays = {k: np.asarray(as_numpy(v), order="C") for k, v in state_dict.items()}
    save_file(arrays, str(path), metadata=to_metadata(batchnorm_config) if batchnorm_config else None)
    _apply_umask(path)
  elif path.suffix in TORCH_SUFFIXES:
    import torch

    torch.save(numpy_to_torch({k: as_numpy(v) for k, v in state_dict.items()}), path)
  else:
    raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; use .safetensors, .pt or .pth.")


def read_batchnorm_config(path: str | os.PathLike):
  """The BatchNorm configuration recorded with a checkpoint (layer -> ``LayerConfig``), or None
  for a file written without one: a ``.safetensors`` header, or the ``batchnorm.json`` that
  ``jaxbn convert`` writes into an orbax directory or beside a ``.msgpack`` file."""
  path = pathlib.Path(path)
  if path.suffix == ".safetensors":
    return from_metadata(safetensors_header(path)[1])
  sidecar = config_sidecar(path)
  if sidecar.is_file():
    return from_metadata({METADATA_KEY: sidecar.read_text()})
  return None


def config_sidecar(path: pathlib.Path) -> pathlib.Path:
  """Where formats without a metadata header keep the BatchNorm configuration."""
  return path / "batchnorm.json" if path.is_dir() or not path.suffix else path.with_name(path.name + ".batchnorm.json")


def as_numpy(array) -> np.ndarray:
  """A numpy array of its own from a numpy array, torch tensor or jax array. A copy:
  ``tensor.numpy()`` shares memory with torch's live buffers, which torch updates in place;
  variables must not change under the user's feet."""
  if isinstance(array, np.ndarray):
    return array.copy()
  if type(array).__module__.startswith("torch"):
    return tensor_to_numpy(array)
  return np.asarray(array)


def _apply_umask(path: pathlib.Path) -> None:
  """safetensors creates files 0600; give them the mode every other writer gives (0666 & ~umask)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)
