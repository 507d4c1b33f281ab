"""Why jaxbn exists, in one table.

torch.nn.BatchNorm2d, jaxbn.BatchNorm and flax.linen.BatchNorm (momentum translated to flax's
convention, 0.1 -> 0.9) train on the same batches; then all three run in eval mode.

  python examples/why_jaxbn.py [--steps 10] [--batch 4 8 5 5]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import numpy as np
import torch

import jaxbn


def train_and_eval(steps: int, shape: tuple[int, ...], mean: float, seed: int = 0) -> dict:
  """Max differences from torch after ``steps`` training steps (NCHW data, channel axis 1)."""
  rng = np.random.default_rng(seed)
  batches = [(rng.standard_normal(shape) * 2 + mean).astype(np.float32) for _ in range(steps + 1)]
  channels = shape[1]
  torch_bn = torch.nn.BatchNorm2d(channels)
  layers = {
      "jaxbn.BatchNorm": jaxbn.BatchNorm(axis=1, momentum=0.1),
      "flax.linen.BatchNorm": nn.BatchNorm(axis=1, momentum=0.9),
  }
  variables = {
      name: layer.init(jax.random.key(0), batches[0], use_running_average=True) for name, layer in layers.items()
  }
  train_error = dict.fromkeys(layers, 0.0)
  exact_error = dict.fromkeys([*layers, "torch"], 0.0)  # train output against float64 maths
  for x in batches[:steps]:
    expected = torch_bn.train()(torch.from_numpy(x)).detach().numpy()
    x64 = x.astype(np.float64)
    exact = (x64 - x64.mean((0, 2, 3), keepdims=True)) / np.sqrt(x64.var((0, 2, 3), keepdims=True) + 1e-5)
    exact_error["torch"] = max(exact_error["torch"], float(np.max(np.abs(expected - exact))))
    for name, layer in layers.items():
      y, updates = layer.apply(variables[name], x, use_running_average=False, mutable=["batch_stats"])
      variables[name] = {**variables[name], **updates}
      train_error[name] = max(train_error[name], float(np.max(np.abs(y - expected))))
      exact_error[name] = max(exact_error[name], float(np.max(np.abs(y - exact))))
  x = batches[steps]
  expected = torch_bn.eval()(torch.from_numpy(x)).detach().numpy()
  running_var = torch_bn.running_var.numpy()
  report = {}
  for name, layer in layers.items():
    y = layer.apply(variables[name], x, use_running_average=True)
    stats = variables[name]["batch_stats"]
    report[name] = {
        "train output": train_error[name],
        "train output vs float64": exact_error[name],
        "eval output": float(np.max(np.abs(y - expected))),
        "running var (rel.)": float(np.max(np.abs(stats["var"] - running_var) / running_var)),
        "num_batches_tracked": int(stats.get("num_batches_tracked", -1)),
    }
  report["torch"] = {
      "num_batches_tracked": int(torch_bn.num_batches_tracked),
      "train output vs float64": exact_error["torch"],
  }
  return report


def print_table(title: str, report: dict) -> None:
  print(f"\n{title}")
  print(f"  {'max |difference| from torch':<28} {'jaxbn.BatchNorm':>16} {'flax.linen.BatchNorm':>21}")
  for row in ("train output", "eval output", "running var (rel.)"):
    print(f"  {row:<28} {report['jaxbn.BatchNorm'][row]:>16.2e} {report['flax.linen.BatchNorm'][row]:>21.2e}")
  tracked = report["jaxbn.BatchNorm"]["num_batches_tracked"]
  torch_tracked = report["torch"]["num_batches_tracked"]
  print(f"  {'num_batches_tracked':<28} {tracked:>16} {'(none)':>21}   torch: {torch_tracked}")
  row = "train output vs float64"
  print(
      f"  {'max |error| vs float64 maths':<28} {report['jaxbn.BatchNorm'][row]:>16.2e}"
      f" {report['flax.linen.BatchNorm'][row]:>21.2e}   torch: {report['torch'][row]:.2e}"
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, nargs=4, default=[4, 8, 5, 5], metavar=("N", "C", "H", "W"))
  args = parser.parse_args()
  shape = tuple(args.batch)
  print(
      f"torch {torch.__version__}, jax {jax.__version__}; {args.steps} training steps on"
      f" {'x'.join(map(str, shape))} float32 batches, then eval."
  )
  print_table("Unit-scale data (std 2):", train_and_eval(args.steps, shape, mean=0.0))
  print_table("Data far from zero (mean 1e4, std 2):", train_and_eval(args.steps, shape, mean=1e4))
  print(
      "\nflax keeps a biased running variance (torch: unbiased, n/(n-1)), so eval outputs drift;"
      "\nits default fast variance (E[x^2] - E[x]^2) collapses on data with a large mean."
      "\njaxbn matches torch to float32 rounding in both modes (see parity_tests/)."
  )


if __name__ == "__main__":
  main()
