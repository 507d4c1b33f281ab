"""Flax variables on disk: an orbax checkpoint directory, a ``.msgpack`` file
(flax.serialization) or a ``.safetensors`` file with ``'params/...'`` keys, each with the
BatchNorm configuration record (the ``.safetensors`` header, else a ``batchnorm.json`` beside)."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from flax import serialization, traverse_util

from jaxbn._src.checkpoints.config import METADATA_KEY, to_metadata
from jaxbn._src.checkpoints.files import config_sidecar, load_state_dict, safetensors_header, save_state_dict
from jaxbn._src.errors import CheckpointError

# What ``write_flax`` writes, by suffix ("" is an orbax directory).
FLAX_SUFFIXES = ("", ".msgpack", ".safetensors")


def is_flax_file(path: pathlib.Path) -> bool:
  """Flax variables (an orbax directory, ``.msgpack``, or ``.safetensors`` with '/'-separated
  keys) rather than a torch state_dict (dotted keys)."""
  if path.is_dir():
    if not (path / "_METADATA").exists():  # what orbax's StandardCheckpointer writes first
      contents = sorted(p.name for p in path.iterdir())[:5]
      raise CheckpointError(
          f"{path}: a directory, but not an orbax checkpoint (no _METADATA in it; it holds"
          f" {', '.join(contents) if contents else 'nothing'}). Give a .pth / .safetensors / .msgpack"
          " file, or a directory `jaxbn convert` (orbax) wrote."
      )
    return True
  if path.suffix == ".msgpack":
    return True
  if path.suffix == ".safetensors":
    return any("/" in key for key in safetensors_header(path)[0])
  return False


def read_flax(source: pathlib.Path) -> dict:
  """Flax variables from an orbax directory, ``.msgpack`` or a '/'-keyed ``.safetensors`` file."""
  if source.is_dir():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(source.resolve())
  if source.suffix == ".msgpack":
    try:
      return serialization.msgpack_restore(source.read_bytes())
    except ValueError as error:
      raise CheckpointError(f"{source}: not a readable .msgpack file (truncated or corrupt?): {error}") from None
  return traverse_util.unflatten_dict(load_state_dict(source), sep="/")


def write_flax(variables: dict, target: pathlib.Path, configs) -> None:
  """Flax variables to an orbax directory (``target`` without a suffix), ``.msgpack`` or
  ``.safetensors``, with the BatchNorm configuration ``configs`` (layer -> LayerConfig) recorded."""
  if target.suffix not in FLAX_SUFFIXES:
    raise CheckpointError(
        f"{target}: Flax variables are written to an orbax directory (a path without a suffix),"
        f" .msgpack or .safetensors, not {target.suffix!r}."
    )
  if target.suffix == ".safetensors":
    save_state_dict(traverse_util.flatten_dict(variables, sep="/"), target, batchnorm_config=configs)
    return
  arrays = jax.tree.map(np.asarray, variables)
  if not target.suffix:
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target.resolve(), arrays, force=True)
    checkpointer.wait_until_finished()
  else:
    target.write_bytes(serialization.msgpack_serialize(arrays))
  sidecar = config_sidecar(target)
  if configs:
    sidecar.write_text(to_metadata(configs)[METADATA_KEY])
  elif sidecar.exists():  # from an overwritten conversion
    sidecar.unlink()
