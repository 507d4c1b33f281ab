"""Whole-model training speed: jaxbn ResNets vs the same Flax model with flax.linen.BatchNorm vs
torchvision in torch (eager channels_last, and torch.compile where it works), images/s. With
``--port``, also the torchvision model through ``jaxbn.port`` (NCHW input) and through
``jaxbn.emit(layout="NHWC")``'s source (NHWC input) against
``jaxbn.models`` with ``input_layout="NCHW"``. With ``--autocast``, mixed precision: jaxbn.models with
``dtype=jnp.bfloat16`` (and the port with ``autocast=jnp.bfloat16`` under ``--port``) against
torch eager inside ``torch.autocast("cpu", torch.bfloat16)``, beside the float32 rows.

One SGD step (softmax cross-entropy, momentum 0.9) on random images; the JAX steps are jitted and
donate params, batch_stats and optimiser state, as a training loop would. Implementations are
timed round-robin in one run (batchnorm_bench.measure: shuffled, the first step of each turn
untimed), so drift of the machine hits all alike; medians are reported.

  python benchmarks/resnet_step.py [--models resnet18 resnet50] [--batch 8] [--size 112] [--reps 7] [--port] [--autocast]
"""

from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torchvision
from batchnorm_bench import machine, measure, write_table  # the same timing and reporting

import jaxbn
import jaxbn.models


def jax_step(model, x, labels):
  """A zero-argument callable running one donated, jitted train step in place."""
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), x, train=False)
  tx = optax.sgd(0.01, momentum=0.9)
  state = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, batch_stats, opt_state, x, labels):
    def loss(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
      )
      logits = logits.astype(jnp.float32)  # the loss in float32 (a no-op unless mixed precision)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    grads, updates = jax.grad(loss, has_aux=True)(params)
    param_updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, param_updates), updates["batch_stats"], opt_state

  def run():
    state[:] = jax.block_until_ready(step(*state, x, labels))

  return run


def emitted_nhwc(name, x_nchw):
  """torchvision's model as jaxbn.emit's channels-last Linen source (nn.Conv, NHWC), loaded."""
  import importlib.util
  import tempfile

  path = jaxbn.emit(getattr(torchvision.models, name)(), x_nchw, tempfile.mkdtemp(), layout="NHWC")
  spec = importlib.util.spec_from_file_location(f"emitted_{name}", path)
  source = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(source)
  return source.load()[0]


def torch_step(name, x_nchw, labels, compiled, autocast=False):
  model = getattr(torchvision.models, name)().to(memory_format=torch.channels_last).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  x = torch.from_numpy(x_nchw).contiguous(memory_format=torch.channels_last)
  y = torch.from_numpy(labels).long()
  forward = torch.compile(model) if compiled else model

  def run():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      logits = forward(x)
    torch.nn.functional.cross_entropy(logits.float(), y).backward()
    optimizer.step()

  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=112)
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
  parser.add_argument("--port", action="store_true", help="add jaxbn.port and jaxbn.models with NCHW input")
  parser.add_argument("--autocast", action="store_true", help="add bfloat16 mixed precision (torch.autocast)")
  parser.add_argument(
      "--only", nargs="+", help="run the implementations whose names contain one of these (jaxbn.BatchNorm always runs)"
  )
  parser.add_argument("--out", help="also write the markdown table here")
  args = parser.parse_args()
  header = (
      f"{machine()}; train step, batch {args.batch} at {args.size}x{args.size},"
      f" {'float32 and bfloat16 autocast' if args.autocast else 'float32'}, medians of"
      f" {args.reps} interleaved turns of one timed step (after one untimed)."
  )
  rows = ["| model | implementation | ms / step | images/s | jaxbn speed-up |", "|---|---|---|---|---|"]
  print(header)
  rng = np.random.default_rng(0)
  x_nchw = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
  labels = rng.integers(0, 1000, args.batch).astype(np.int32)
  x = jnp.asarray(np.moveaxis(x_nchw, 1, -1))
  for name in args.models:
    build = getattr(jaxbn.models, name)
    nchw = jnp.asarray(x_nchw)
    candidates = {  # built only when selected: each compiles a train step
        "jaxbn.BatchNorm": lambda: jax_step(build(), x, labels),
        "flax.linen.BatchNorm (fast variance, its default)": lambda: jax_step(
            build(norm=functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)), x, labels
        ),
        "flax.linen.BatchNorm (two-pass variance)": lambda: jax_step(
            build(norm=functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5, use_fast_variance=False)), x, labels
        ),
        "torch eager channels_last": lambda: torch_step(name, x_nchw, labels, compiled=False),
    }
    if args.port:
      candidates["jaxbn.models, input_layout=NCHW"] = lambda: jax_step(build(input_layout="NCHW"), nchw, labels)
      candidates["jaxbn.port of torchvision (NCHW)"] = lambda: jax_step(
          jaxbn.port(getattr(torchvision.models, name)(), x_nchw).module, nchw, labels
      )
      candidates["jaxbn.emit of torchvision, layout=NHWC"] = lambda: jax_step(emitted_nhwc(name, x_nchw), x, labels)
    if args.autocast:
      candidates["jaxbn.models, dtype=bfloat16 (autocast)"] = lambda: jax_step(build(dtype=jnp.bfloat16), x, labels)
      candidates["torch eager channels_last, autocast bfloat16"] = lambda: torch_step(
          name, x_nchw, labels, False, autocast=True
      )
      if args.port:
        candidates["jaxbn.port of torchvision (NCHW), autocast=bfloat16"] = lambda: jax_step(
            jaxbn.port(getattr(torchvision.models, name)(), x_nchw, autocast=jnp.bfloat16).module, nchw, labels
        )
    calls = {
        impl: make()
        for impl, make in candidates.items()
        if impl == "jaxbn.BatchNorm" or not args.only or any(part in impl for part in args.only)
    }
    compiled_name = "torch.compile channels_last"
    if not args.no_compile and (not args.only or any(part in compiled_name for part in args.only)):
      try:
        compiled = torch_step(name, x_nchw, labels, compiled=True)
        compiled()
        calls[compiled_name] = compiled
      except Exception as error:  # noqa: BLE001 - inductor needs a working C++ toolchain
        print(f"torch.compile unavailable: {type(error).__name__}: {error}")
    medians = {
        impl: modes["step"]
        for impl, modes in measure({impl: {"step": call} for impl, call in calls.items()}, args.reps, burst=2).items()
    }
    ours = medians["jaxbn.BatchNorm"]
    for impl, seconds in medians.items():
      row = f"| {name} | {impl} | {seconds * 1e3:.0f} | {args.batch / seconds:.1f} |" f" {seconds / ours:.2f} |"
      rows.append(row)
      print(row, flush=True)
  write_table(
      args.out, header, rows, "jaxbn speed-up: that implementation's time / jaxbn's (above 1: jaxbn is faster)."
  )


if __name__ == "__main__":
  main()
