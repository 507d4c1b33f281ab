"""``jaxbn convert IN OUT``: a torch checkpoint to Flax variables, or Flax variables to torch.

torch (``.pth/.pt/.bin/.safetensors`` with dotted keys) -> Flax: an orbax directory (OUT without
a suffix), ``.msgpack`` or ``.safetensors`` with ``'params/...'`` keys; any of those -> torch
(``.pth/.pt/.bin/.safetensors``). The BatchNorm configuration recorded in IN, or else
``--model``'s, is written with OUT and checked against ``--model``.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np

import jaxbn
from jaxbn._src.checkpoints import config as layer_config
from jaxbn._src.checkpoints.files import TORCH_SUFFIXES
from jaxbn._src.checkpoints.flax_files import FLAX_SUFFIXES, is_flax_file, read_flax, write_flax
from jaxbn.cli.errors import UsageError, does_not_fit
from jaxbn.cli.models import model_for_weights

LARGE_CHECKPOINT_BYTES = 50 * 2**20  # progress bars above this
TORCH_TARGETS = (*TORCH_SUFFIXES, ".safetensors")


def _progress(total_bytes: int, description: str):
  if total_bytes < LARGE_CHECKPOINT_BYTES:
    return None
  from tqdm import tqdm

  return lambda items: tqdm(list(items), desc=description, unit="tensor", file=sys.stderr)


def _describe(suffix: str) -> str:
  return "a path without a suffix (orbax)" if not suffix else suffix


def validate(source: pathlib.Path, target: pathlib.Path, overwrite: bool) -> bool:
  """Everything that can be known before reading IN; returns whether IN holds Flax variables."""
  if not source.exists():
    raise UsageError(f"{source}: no such file or directory.")
  if target.exists() and not overwrite:
    raise UsageError(f"{target} exists already; pass --overwrite to replace it, or choose another OUT.")
  if not target.parent.is_dir():
    raise UsageError(f"{target}: no folder {target.parent}; create it or choose another OUT.")
  from_flax = is_flax_file(source)
  if from_flax and target.suffix not in TORCH_TARGETS:
    raise UsageError(
        f"{source} holds Flax variables and {target} would too: convert goes between torch and Flax."
        f" For torch, write OUT as {', '.join(TORCH_TARGETS)}."
    )
  if not from_flax and target.suffix not in FLAX_SUFFIXES:
    raise UsageError(
        f"{source} is a torch state_dict; write its Flax variables to"
        f" {', '.join(map(_describe, FLAX_SUFFIXES))}, not {target.suffix}."
    )
  return from_flax


def convert(args) -> int:
  source, target = pathlib.Path(args.input), pathlib.Path(args.output)
  from_flax = validate(source, target, args.overwrite)
  size = source.stat().st_size if source.is_file() else sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
  recorded = jaxbn.read_batchnorm_config(source)
  if from_flax:
    state_dict = jaxbn.convert.to_state_dict(read_flax(source), progress=_progress(size, "converting"))
    jaxbn.save_state_dict(state_dict, target, batchnorm_config=recorded)
    print(f"{source} (Flax variables) -> {target}: {len(state_dict)} torch tensors")
    return 0

  state_dict = jaxbn.load_state_dict(source)
  configs = recorded
  if args.model:
    torch_model, ported = model_for_weights(args.model, state_dict, args.num_classes)
    if ported:  # the Flax layout from jaxbn.port (traced, nothing computed at this size)
      x = np.zeros((1, 3, 224, 224), np.float32)
      model, template = jaxbn.port(torch_model, x, strict=False)
    else:
      model = jaxbn.models.MODELS[args.model](num_classes=torch_model.fc.out_features)
      x = np.zeros((1, 64, 64, 3), np.float32)
      template = jax.eval_shape(model.init, jax.random.key(0), x)
  else:
    template = jaxbn.convert.template_from_state_dict(state_dict)
  converted = jaxbn.convert.from_torch(state_dict, template, strict=False, progress=_progress(size, "converting"))
  if converted.missing or converted.unexpected or converted.mismatched:
    # both sides in torch's terms where the model is known (the Flax side's kernels are transposed)
    torch_shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()} if args.model else {}
    mismatched = [
        f"{key} {shape} != {torch_shapes.get(key, expected)} in the model"
        for key, shape, _, expected in converted.mismatched
    ]
    raise does_not_fit(
        source,
        args.model or "the layout inferred from its names",
        converted.missing,
        converted.unexpected,
        mismatched,
        "Pass the --model the checkpoint was saved from, or leave"
        " --model out to take the layout from the checkpoint.",
    )
  if args.model:
    model_configs = layer_config.flax_configs(model, x)
    if recorded is not None:
      layer_config.check(recorded, model_configs, source=str(source))
    configs = recorded or model_configs
  write_flax(converted.variables, target, configs)
  print(
      f"{source} (torch state_dict) -> {target}: {len(jax.tree.leaves(converted.variables))} Flax arrays"
      + (f", BatchNorm configuration of {len(configs)} layers recorded" if configs else "")
  )
  return 0
