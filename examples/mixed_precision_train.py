"""Train a ResNet in float16 as torch.autocast + GradScaler do, with flax's DynamicScale.

torch:                                          jaxbn:
  with torch.autocast("cuda", torch.float16):     model = jaxbn.models.resnet18(dtype=jnp.float16)
    loss = criterion(model(x), y)                 (convolutions and fc in float16; parameters,
                                                   BatchNorm statistics and updates in float32)
  scaler.scale(loss).backward()                   dynamic_scale.value_and_grad(loss_fn)(params)
  scaler.step(optimizer)  # skipped on inf/NaN    params = where(finite, new, old)
  scaler.update()         # halve, or grow        (inside DynamicScale: 0.5 on inf, 2x per 2000 steps)

On a skipped step torch keeps the forward's BatchNorm updates (the forward ran); so does this
step, unless they are not finite (a float16 forward that overflowed), where torch would write
inf or NaN into the running statistics: those keep their previous values and the step says so.

  python examples/mixed_precision_train.py [--steps 30] [--initial-scale 65536] [--size 32] [--blocks 2 2 2 2]
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training.dynamic_scale import DynamicScale

import jaxbn


class TrainState(struct.PyTreeNode):
  params: Any
  batch_stats: Any
  opt_state: Any
  dynamic_scale: DynamicScale


def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def make_step(model, tx):
  @jax.jit
  def step(state: TrainState, images, labels):
    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
      )
      # the loss in float32, as torch's autocast computes cross_entropy
      loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
      return loss, updates["batch_stats"]

    dynamic_scale, grads_finite, (loss, batch_stats), grads = state.dynamic_scale.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep_if = lambda ok, new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    stats_finite = all_finite(batch_stats)
    state = TrainState(
        params=keep_if(grads_finite, params, state.params),
        opt_state=keep_if(grads_finite, opt_state, state.opt_state),
        batch_stats=keep_if(stats_finite, batch_stats, state.batch_stats),
        dynamic_scale=dynamic_scale,
    )
    return state, loss, grads_finite, stats_finite

  return step


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--initial-scale", type=float, default=2.0**16, help="torch's GradScaler starts at 65536")
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--blocks", type=int, nargs=4, default=(2, 2, 2, 2), help="per stage: resnet18's by default")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 64)
  images = rng.standard_normal((64, args.size, args.size, 3)).astype(np.float32)
  images[..., 0] += labels[:, None, None]  # learnable: the class sets a channel's mean

  model = jaxbn.models.ResNet(jaxbn.models.BasicBlock, args.blocks, num_classes=4, dtype=jnp.float16)
  variables = jax.jit(model.init)(jax.random.key(0), images[:2])
  tx = optax.sgd(0.01, momentum=0.9)
  state = TrainState(
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      opt_state=tx.init(variables["params"]),
      # arrays from the start, so that the jitted step compiles once
      dynamic_scale=DynamicScale(scale=jnp.float32(args.initial_scale), fin_steps=jnp.int32(0)),
  )
  step = make_step(model, tx)
  skipped, unchanged_when_skipped, first_loss = 0, True, None
  for i in range(args.steps):
    batch = slice(16 * (i % 4), 16 * (i % 4 + 1))
    before = state
    state, loss, grads_finite, stats_finite = step(state, images[batch], labels[batch])
    first_loss = float(loss) if first_loss is None else first_loss
    if not grads_finite:
      skipped += 1
      same = jax.tree.map(
          lambda a, b: bool(jnp.array_equal(a, b)), (before.params, before.opt_state), (state.params, state.opt_state)
      )
      unchanged_when_skipped &= all(jax.tree.leaves(same))
    if not stats_finite:
      print(f"step {i}: the forward overflowed float16; running statistics kept from the step before")
  dtypes = sorted({str(v.dtype) for v in jax.tree.leaves((state.params, state.batch_stats)) if v.dtype.kind == "f"})
  print(
      f"steps: {args.steps}, skipped (non-finite gradients): {skipped}, loss scale now {float(state.dynamic_scale.scale):g}"
  )
  print(f"parameters and optimizer state unchanged on every skipped step: {unchanged_when_skipped}")
  print(
      f"variables after training: {', '.join(dtypes)}; running statistics finite: {bool(all_finite(state.batch_stats))}"
  )
  print(f"loss: first step {first_loss:.3f}, last step {float(loss):.3f}")


if __name__ == "__main__":
  main()
