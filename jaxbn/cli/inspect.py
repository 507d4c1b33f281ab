"""``jaxbn inspect FILE``: every BatchNorm layer in a checkpoint (torch or Flax): channels,
counter, recorded configuration, and running statistics that look wrong (exit status 1 if any)."""

from __future__ import annotations

import pathlib

import jaxbn
from jaxbn._src.checkpoints.flax_files import is_flax_file, read_flax
from jaxbn._src.checkpoints.inspection import inspect_state_dict
from jaxbn.cli.errors import UsageError


def inspect(args) -> int:
  source = pathlib.Path(args.file)
  if not source.exists():
    raise UsageError(f"{source}: no such file or directory.")
  state_dict = jaxbn.convert.to_state_dict(read_flax(source)) if is_flax_file(source) else jaxbn.load_state_dict(source)
  configs = jaxbn.read_batchnorm_config(source) or {}
  layers = inspect_state_dict(state_dict)
  print(
      f"{source}: {len(state_dict)} tensors, {len(layers)} BatchNorm layers;"
      f" configuration {'recorded' if configs else 'not recorded (eps and momentum unknown)'}"
  )
  width = max([len(layer.layer) for layer in layers] + [5])
  print(f"{'layer':<{width}}  {'channels':>8}  {'batches':>8}  {'class':<15}  {'eps':>7}  {'momentum':>8}  problems")
  for layer in layers:
    config = configs.get(layer.layer)
    counter = "-" if layer.num_batches_tracked is None else str(layer.num_batches_tracked)
    kind, eps, momentum = (config.kind, f"{config.eps:g}", str(config.momentum)) if config else ("?", "?", "?")
    print(
        f"{layer.layer:<{width}}  {layer.channels:>8}  {counter:>8}  {kind:<15}  {eps:>7}  {momentum:>8}"
        f"  {'; '.join(layer.problems) or 'ok'}"
    )
  suspicious = [layer.layer for layer in layers if layer.problems]
  if suspicious:
    print(f"\n{len(suspicious)} layer(s) with suspicious running statistics: {', '.join(suspicious)}")
    return 1
  return 0
