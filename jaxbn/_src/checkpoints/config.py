"""BatchNorm configuration, the part of a model a state_dict does not hold: eps, momentum,
affine, track_running_stats and the layer's class. Read from torch and Flax models, written
into checkpoints, compared on load.

Layers are named by torch module path (``layer1.0.bn1``); a Flax path ``layer1/0/bn1`` is the
same layer. In a file the configuration is one JSON string under ``METADATA_KEY``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from jaxbn._src.errors import ConfigMismatchError
from jaxbn._src.linen.batch_norm import BatchNorm
from jaxbn._src.linen.frozen import FrozenBatchNorm
from jaxbn._src.nnx.batch_norm import BatchNorm as NNXBatchNorm
from jaxbn._src.nnx.frozen import FrozenBatchNorm as NNXFrozenBatchNorm
from jaxbn._src.variables.state import is_nnx

METADATA_KEY = "jaxbn.batchnorm"
FROZEN = "FrozenBatchNorm"


@dataclasses.dataclass(frozen=True)
class LayerConfig:
  """One BatchNorm layer's configuration. ``kind``: ``BatchNorm``, ``SyncBatchNorm``,
  ``FrozenBatchNorm`` (no momentum or tracking), ``flax.linen.BatchNorm`` or ``flax.nnx.BatchNorm``."""

  kind: str
  eps: float
  momentum: float | None = None
  affine: bool = True
  track_running_stats: bool = True


@dataclasses.dataclass
class ConfigMismatch:
  """A layer whose configuration differs between the expected (torch, or a file) and Flax."""

  layer: str
  field: str
  torch: Any
  flax: Any


def torch_configs(torch_model) -> dict[str, LayerConfig]:
  """The BatchNorm layers of a torch module (BatchNorm1d/2d/3d, SyncBatchNorm, torchvision's
  FrozenBatchNorm2d and subclasses such as timm's BatchNormAct2d), by module path."""
  import torch

  configs = {}
  for name, module in torch_model.named_modules():
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
      kind = "SyncBatchNorm" if isinstance(module, torch.nn.SyncBatchNorm) else "BatchNorm"
      configs[name] = LayerConfig(
          kind, float(module.eps), module.momentum, bool(module.affine), bool(module.track_running_stats)
      )
    elif type(module).__name__ == "FrozenBatchNorm2d":
      configs[name] = LayerConfig(FROZEN, float(module.eps))
  return configs


def _config_of(module) -> LayerConfig | None:
  """One Flax layer's configuration (Linen or NNX); None for a layer that is no BatchNorm."""
  if isinstance(module, (FrozenBatchNorm, NNXFrozenBatchNorm)):
    return LayerConfig(FROZEN, float(module.epsilon))
  if isinstance(module, (nn.BatchNorm, nnx.BatchNorm)):
    kind = "flax.linen.BatchNorm" if isinstance(module, nn.BatchNorm) else "flax.nnx.BatchNorm"
    return LayerConfig(kind, float(module.epsilon), module.momentum)
  if isinstance(module, BatchNorm):
    affine = module.use_scale and module.use_bias
  elif isinstance(module, NNXBatchNorm):
    affine = module.scale is not None and module.bias is not None
  else:
    return None
  kind = "SyncBatchNorm" if module.axis_name is not None else "BatchNorm"
  return LayerConfig(kind, float(module.epsilon), module.momentum, affine, module.track_running_stats)


def nnx_configs(model) -> dict[str, LayerConfig]:
  """The BatchNorm layers an NNX module holds, by torch-style dotted path."""
  configs = {".".join(map(str, path)): _config_of(module) for path, module in nnx.iter_modules(model)}
  return {name: config for name, config in configs.items() if config is not None}


def flax_configs(flax_model, example_input=None, **apply_kwargs) -> dict[str, LayerConfig]:
  """The BatchNorm layers a Flax model calls on ``example_input`` (traced, nothing computed), by
  torch-style dotted path. ``apply_kwargs`` are the model's call arguments (e.g. ``train``).
  An NNX module is read as it is (no input needed)."""
  if is_nnx(flax_model):
    return nnx_configs(flax_model)
  configs: dict[str, LayerConfig] = {}

  def record(next_fun, args, kwargs, context):
    config = _config_of(context.module) if context.method_name == "__call__" else None
    if config is not None:
      configs[".".join(context.module.scope.path)] = config
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: flax_model.init(jax.random.key(0), x, **apply_kwargs), example_input)
  return configs


def mismatches(expected: Mapping[str, LayerConfig], actual: Mapping[str, LayerConfig]) -> list[ConfigMismatch]:
  """Every field that differs, layer by layer (``expected`` from torch or a file). BatchNorm and
  SyncBatchNorm count as the same class: on one device they compute the same thing."""
  found = []
  for name, want in expected.items():
    have = actual.get(name)
    if have is None:
      found.append(ConfigMismatch(name, "layer", want.kind, "no BatchNorm at this path"))
      continue
    if have.kind in ("flax.linen.BatchNorm", "flax.nnx.BatchNorm"):
      fix = "jaxbn.nnx.BatchNorm" if have.kind == "flax.nnx.BatchNorm" else "jaxbn.BatchNorm"
      found.append(
          ConfigMismatch(
              name, "class", want.kind, f"{have.kind} (biased running var, opposite" f" momentum): use {fix}"
          )
      )
      continue
    if (want.kind == FROZEN) != (have.kind == FROZEN):
      found.append(ConfigMismatch(name, "class", want.kind, have.kind))
    if want.eps != have.eps:
      found.append(ConfigMismatch(name, "eps", want.eps, have.eps))
    if FROZEN in (want.kind, have.kind):
      continue
    for field in ("momentum", "affine", "track_running_stats"):
      if getattr(want, field) != getattr(have, field):
        found.append(ConfigMismatch(name, field, getattr(want, field), getattr(have, field)))
  return found


def to_metadata(configs: Mapping[str, LayerConfig]) -> dict[str, str]:
  """String metadata for a .safetensors header (or a JSON file beside other formats)."""
  return {METADATA_KEY: json.dumps({name: dataclasses.asdict(c) for name, c in configs.items()}, sort_keys=True)}


def from_metadata(metadata: Mapping[str, str] | None) -> dict[str, LayerConfig] | None:
  """The configuration recorded by ``to_metadata``; None for files written without it."""
  if not metadata or METADATA_KEY not in metadata:
    return None
  return {name: LayerConfig(**fields) for name, fields in json.loads(metadata[METADATA_KEY]).items()}


def check(
    recorded: Mapping[str, LayerConfig],
    actual: Mapping[str, LayerConfig],
    *,
    strict: bool = True,
    source: str = "the checkpoint",
) -> list[ConfigMismatch]:
  """Compares the configuration recorded in ``source`` with the Flax model's: one
  ConfigMismatchError listing every differing layer and field, or with ``strict=False`` one
  warning; returns the mismatches."""
  found = mismatches(recorded, actual)
  if found:
    lines = [f"{len(found)} BatchNorm setting(s) differ between {source} and the Flax model:"]
    lines += [f"  {m.layer}: {m.field} recorded {m.torch!r}, model {m.flax!r}" for m in found]
    lines.append(
        "Build the Flax layers with the recorded values (e.g. jaxbn.BatchNorm(epsilon=...,"
        " momentum=...)); the outputs and running statistics differ otherwise."
    )
    if strict:
      raise ConfigMismatchError("\n".join(lines))
    warnings.warn("\n".join(lines), stacklevel=2)
  return found
