"""What the same port built with flax.linen.BatchNorm gets wrong: the trap ``jaxbn check`` shows
next to its own table."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import torch
from flax import traverse_util

from jaxbn._src.checkpoints.recipe import read as read_recipe
from jaxbn._src.checkpoints.recipe import torch_mode
from jaxbn._src.port.leaves import Leaf, activated


def flax_linen_port_errors(torch_model, module, variables, args) -> str:
  """What the same port built with flax.linen.BatchNorm would get wrong: momentum translated to
  flax's convention (1 - m), flax's default epsilon and its biased running variance. Trained on
  the same batches as torch (no gradient steps), then compared in eval mode."""
  configs = module.batchnorm_layers()
  eps_traps = sorted(path for path, layer in configs.items() if layer.epsilon != 1e-5)
  momentum_traps = sorted(path for path, layer in configs.items() if layer.momentum != 0.1)

  def flax_batchnorm(path, leaf):
    layer = leaf.prototype
    if path not in configs:
      return leaf
    fields = dict(
        axis=1,
        momentum=1 - (layer.momentum or 0.1),
        use_scale=layer.use_scale,
        use_bias=layer.use_bias,
        param_dtype=layer.param_dtype,
    )
    after = getattr(layer, "after", ())  # timm's BatchNormAct2d activation
    return Leaf(
        activated(nn.BatchNorm)(**fields, after=after) if after else nn.BatchNorm(**fields), "use_running_average"
    )

  naive = module.clone(leaves=tuple((path, flax_batchnorm(path, leaf)) for path, leaf in module.leaves))
  stats = traverse_util.flatten_dict(variables.get("batch_stats", {}))
  naive_variables = {
      **variables,
      "batch_stats": traverse_util.unflatten_dict({k: v for k, v in stats.items() if k[-1] != "num_batches_tracked"}),
  }  # flax keeps no counter
  train = jax.jit(lambda v, x: naive.apply(v, x, train=True, mutable=["batch_stats"]))
  rng = np.random.default_rng(args.seed + 1)

  def batch():
    return rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)

  recipe = read_recipe(torch_model)  # the modules it keeps in eval while training, as the port does
  for _ in range(args.steps):
    x = batch()
    naive_variables = {**naive_variables, **train(naive_variables, x)[1]}
    with torch_mode(torch_model, True, recipe), torch.no_grad():
      torch_model(torch.from_numpy(x))
  x = batch()
  torch_model.eval()
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(x)).numpy()
  output = np.asarray(jax.jit(naive.apply)(naive_variables, x))
  ours = traverse_util.flatten_dict(naive_variables["batch_stats"], sep="/")
  drift = max(
      float(
          np.max(
              np.abs(ours[f"{path.replace('.', '/')}/var"] - layer.running_var.numpy())
              / np.maximum(np.abs(layer.running_var.numpy()), 1.0)
          )
      )
      for path, layer in torch_model.named_modules()
      if f"{path.replace('.', '/')}/var" in ours
  )
  example = f" (e.g. {eps_traps[0]}: eps={configs[eps_traps[0]].epsilon:g})" if eps_traps else ""
  return (
      f"\nThe same port with flax.linen.BatchNorm (momentum translated to 1 - m; flax's default epsilon 1e-5;"
      f" biased running variance), after the same {args.steps} training steps:\n"
      f"  torch sets eps != 1e-5 in {len(eps_traps)} of {len(configs)} BatchNorm layers{example},"
      f" momentum != 0.1 in {len(momentum_traps)}\n"
      f"  eval output: worst relative difference {np.max(np.abs(output - expected)) / np.max(np.abs(expected)):.2e};"
      f" running variance drift {drift:.2e}  (jaxbn: the table above)"
  )
