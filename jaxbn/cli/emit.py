"""``jaxbn emit``: a torch model (random init, or ``--weights``) as Flax source and its weights."""

from __future__ import annotations

import pathlib

import numpy as np

import jaxbn
from jaxbn.cli.errors import UsageError
from jaxbn.cli.models import model_with_weights, read_weights


def emit(args) -> int:
  out = pathlib.Path(args.out)
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out {out}: a file; --out names the directory for model.py and model.safetensors.")
  if (out / "model.py").exists() and not args.overwrite:
    raise UsageError(f"{out / 'model.py'} exists; pass --overwrite to replace it.")
  weights = read_weights(args.weights)
  torch_model, _ = model_with_weights(args.model, weights, args.weights, args.num_classes)
  torch_model.eval()  # the model is saved as it is; its mode is the loader's to choose
  example = np.zeros((args.batch, 3, args.size, args.size), np.float32)
  path = jaxbn.emit(torch_model, example, out, api=args.api, layout=args.layout)
  classes = sum(line.startswith("class ") for line in path.read_text().splitlines())
  layout = ", channels-last: inputs NHWC" if args.layout == "NHWC" else ""
  print(
      f"{path}: {type(torch_model).__name__} as Flax {'NNX' if args.api == 'nnx' else 'Linen'} source"
      f" ({classes} Python classes{layout})"
  )
  print(f"{out / 'model.safetensors'}: its weights ({'from ' + args.weights if args.weights else 'random init'})")
  load = "model = load()" if args.api == "nnx" else "module, variables = load()"
  print(f"load it from {out.parent.resolve()}: from {out.name}.model import load; {load}")
  return 0
