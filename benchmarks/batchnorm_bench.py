"""BatchNorm speed: jaxbn vs flax.linen.BatchNorm vs torch, interleaved in one run.

For each shape and dtype, every implementation is timed round-robin (a short burst each, in a
fresh random order each round; see ``measure``), so drift of the machine hits all alike;
medians are reported, with ratios to jaxbn, effective GB/s against the memory-traffic minimum
(train forward: 3 passes over the tensor, two reads for the statistics and normalisation and
one write; forward+backward: 3 + 5; inference: 2), and the memory kept: XLA's temporary
buffers and the residuals saved for the backward.

  python benchmarks/batchnorm_bench.py [--reps 9] [--batch 32] [--out benchmarks/results-cpu.md]
"""

from __future__ import annotations

import os

# torch's OpenMP threads spin for a while after each op; interleaved with XLA's own threads on the
# same cores that spinning would be charged to whichever call runs next. Sleeping waits keep
# every measurement to its own work (set before torch starts its thread pool).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import platform
import random
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxbn

# (name, NHWC shape given the batch size) — ResNet-50 layer shapes, a 2-D and a 3-D case.
SHAPES = [
    ("N x 56x56x64", lambda n: (n, 56, 56, 64)),
    ("N x 28x28x512", lambda n: (n, 28, 28, 512)),
    ("N x 7x7x2048", lambda n: (n, 7, 7, 2048)),
    ("4096 x 1024 (2-D)", lambda n: (4096, 1024)),
    ("N x 8x16x16x64 (3-D)", lambda n: (n, 8, 16, 16, 64)),
]
PASSES = {"train fwd": 3, "train fwd+bwd": 8, "inference": 2}


def jax_callables(module, x):
  """Compiled train forward, train step and inference, and the bytes each keeps: XLA's temporary
  buffers and, for the train step, the residuals the backward reads (the vjp closure)."""
  variables = module.init(jax.random.key(0), x, use_running_average=True)
  # An argument, not a constant: XLA would fold a constant cotangent into the backward.
  cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), x.dtype)

  def train_forward(variables, x, cotangent):
    return module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])

  def forward_with_vjp(variables, x):
    def forward(x, params):
      return module.apply({**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"])

    return jax.vjp(forward, x, variables["params"], has_aux=True)

  def train_step(variables, x, cotangent):
    y, vjp, updates = forward_with_vjp(variables, x)
    return y, vjp(cotangent), updates  # y too: in a network the next layer reads it

  def inference(variables, x, cotangent):
    return module.apply(variables, x, use_running_average=True)

  compiled = {
      name: jax.jit(fn).lower(variables, x, cotangent).compile()
      for name, fn in (("train fwd", train_forward), ("train fwd+bwd", train_step), ("inference", inference))
  }
  memory = {name: c.memory_analysis().temp_size_in_bytes for name, c in compiled.items()}
  residuals = jax.eval_shape(lambda v, x: jax.tree.leaves(forward_with_vjp(v, x)[1]), variables, x)
  memory["residuals"] = sum(r.size * r.dtype.itemsize for r in residuals)
  calls = {name: (lambda c=c: jax.block_until_ready(c(variables, x, cotangent))) for name, c in compiled.items()}
  return calls, memory


def torch_callables(x_nhwc: np.ndarray, channels_last: bool, dtype: torch.dtype):
  """The layer stays float32; bfloat16 input is torch's mixed-precision case."""
  x = torch.from_numpy(np.moveaxis(x_nhwc, -1, 1).copy()).to(dtype)  # NCHW
  if channels_last and x.ndim in (4, 5):
    x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
  layer = {2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[x.ndim](x.shape[1])
  x_grad = x.detach().clone().requires_grad_(True)
  cotangent = torch.ones_like(x)

  def train_forward():
    layer.train()
    with torch.no_grad():
      layer(x)

  def train_step():
    layer.train()
    x_grad.grad = None
    layer(x_grad).backward(cotangent)

  def inference():
    layer.eval()
    with torch.no_grad():
      layer(x)

  return {"train fwd": train_forward, "train fwd+bwd": train_step, "inference": inference}


def measure(calls: dict[str, dict], reps: int, burst: int = 3) -> dict[str, dict[str, float]]:
  """calls[impl][mode] -> median seconds. Each round runs every (impl, mode) in a fresh random
  order as a short burst whose first call is not timed: interleaving spreads the machine's drift
  over all, and the untimed call absorbs the switch between frameworks (thread pools waking,
  caches refilled by the other library), which would otherwise be charged to whoever runs next."""
  order = [(impl, mode) for impl, modes in calls.items() for mode in modes]
  times = {impl: {mode: [] for mode in modes} for impl, modes in calls.items()}
  shuffle = random.Random(0).shuffle
  for _ in range(reps):
    shuffle(order)
    for impl, mode in order:
      calls[impl][mode]()
      for _ in range(burst - 1):
        start = time.perf_counter()
        calls[impl][mode]()
        times[impl][mode].append(time.perf_counter() - start)
  return {impl: {mode: statistics.median(t) for mode, t in modes.items()} for impl, modes in times.items()}


def machine() -> str:
  """The machine, thread count, library versions and date, for a results header."""
  device = jax.devices()[0]
  return (
      f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, JAX on"
      f" {device.platform} ({device.device_kind}); torch {torch.__version__}, jax {jax.__version__},"
      f" flax {__import__('flax').__version__}; {datetime.date.today()}"
  )


def write_table(path: str | None, header: str, rows: list[str], footer: str) -> None:
  if path:
    with open(path, "w") as f:
      f.write(header + "\n\n" + "\n".join(rows) + "\n\n" + footer + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reps", type=int, default=9)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--shapes", type=int, nargs="+", help="indices into SHAPES (default: all)")
  parser.add_argument("--out", help="also write the markdown table here")
  args = parser.parse_args()
  header = f"{machine()}; medians of {args.reps} interleaved rounds of 2 timed calls each (after one" " untimed)."
  rows = [
      "| shape | dtype | mode | jaxbn ms | GB/s | flax fast / jaxbn | flax two-pass / jaxbn |"
      " torch NCHW / jaxbn | torch channels_last / jaxbn | XLA temp MiB (jaxbn, flax two-pass) |"
      " residuals MiB (jaxbn, flax two-pass) |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  print(header)
  for index, (name, shape_of) in enumerate(SHAPES):
    if args.shapes and index not in args.shapes:
      continue
    for dtype_name in args.dtypes:
      dtype = jnp.dtype(dtype_name)
      x = jnp.asarray(np.random.default_rng(0).standard_normal(shape_of(args.batch)), dtype)
      calls, memory = {}, {}
      calls["jaxbn"], memory["jaxbn"] = jax_callables(jaxbn.BatchNorm(), x)
      calls["flax fast"], memory["flax fast"] = jax_callables(
          nn.BatchNorm(momentum=0.9, use_fast_variance=True, dtype=dtype), x
      )
      calls["flax two-pass"], memory["flax two-pass"] = jax_callables(
          nn.BatchNorm(momentum=0.9, use_fast_variance=False, dtype=dtype), x
      )
      x_np = np.asarray(x.astype(jnp.float32))
      torch_dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
      for label, last in (("torch NCHW", False), ("torch channels_last", True)):
        if x.ndim == 2 and last:
          continue
        calls[label] = torch_callables(x_np, last, torch_dtype)
      medians = measure(calls, args.reps)
      mib = lambda impl, key: f"{memory[impl][key] / 2**20:.1f}"  # noqa: E731
      for mode, passes in PASSES.items():
        ours = medians["jaxbn"][mode]
        gbps = passes * x.size * x.dtype.itemsize / ours / 1e9
        ratio = lambda impl: f"{medians[impl][mode] / ours:.2f}" if impl in medians else "-"  # noqa: E731
        row = (
            f"| {name.replace('N', str(args.batch), 1) if name.startswith('N') else name} | {dtype_name} | {mode}"
            f" | {ours * 1e3:.2f} | {gbps:.1f} | {ratio('flax fast')} | {ratio('flax two-pass')}"
            f" | {ratio('torch NCHW')} | {ratio('torch channels_last')}"
            f" | {mib('jaxbn', mode)}, {mib('flax two-pass', mode)}"
        )
        residuals = f"{mib('jaxbn', 'residuals')}, {mib('flax two-pass', 'residuals')}"
        row += f" | {residuals if mode == 'train fwd+bwd' else '-'} |"
        rows.append(row)
        print(row, flush=True)
  write_table(args.out, header, rows, "Ratios above 1: jaxbn is faster.")


if __name__ == "__main__":
  main()
