"""Fine-tune a small CNN's head on top of a frozen backbone, the jaxbn way.

1. "Pretrain" a CNN built with jaxbn.BatchNorm (a few steps, so its statistics are non-trivial).
2. jaxbn.freeze: the same variables for the model built with jaxbn.FrozenBatchNorm.
3. Train with adamw (weight decay 0.1) wrapped by jaxbn.keep_frozen(frozen_mask), in a jitted step.
4. Check that every frozen array is bit-identical and the head learned.

  python examples/finetune_frozen_backbone.py [--steps 100]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn


class CNN(nn.Module):
  norm: type = jaxbn.BatchNorm  # the backbone's norm class: BatchNorm or FrozenBatchNorm
  classes: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    for i, features in enumerate((16, 32)):
      x = nn.Conv(features, (3, 3), strides=2, use_bias=False, name=f"conv{i}")(x)
      x = self.norm(use_running_average=not train, name=f"bn{i}")(x)
      x = nn.relu(x)
    return nn.Dense(self.classes, name="head")(x.mean(axis=(1, 2)))


def synthetic_data(rng: np.random.Generator, n: int, classes: int = 4):
  """Images whose class sets the mean of one colour channel: learnable from pooled features."""
  labels = rng.integers(0, classes, n)
  images = rng.standard_normal((n, 16, 16, 3)).astype(np.float32)
  images[..., 0] += labels[:, None, None] * 0.5
  return jnp.asarray(images), jnp.asarray(labels)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=100)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  images, labels = synthetic_data(rng, 256)

  variables = CNN().init(jax.random.key(0), images[:8], train=False)
  for i in range(5):  # stands in for pretraining: running statistics move away from (0, 1)
    _, updates = CNN().apply(variables, images[32 * i : 32 * (i + 1)], train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}

  frozen = jaxbn.freeze(variables)
  params = frozen["params"]
  model = CNN(norm=jaxbn.FrozenBatchNorm)
  tx = jaxbn.keep_frozen(optax.adamw(3e-3, weight_decay=0.1), jaxbn.frozen_mask(frozen))
  opt_state = tx.init(params)

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x, train=True)  # train=True: still frozen
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = params
  for step in range(args.steps):
    batch = rng.choice(len(images), 32, replace=False)
    params, opt_state, loss = train_step(params, opt_state, images[batch], labels[batch])
    if step % 25 == 0 or step == args.steps - 1:
      print(f"step {step:4d}  loss {float(loss):.4f}")

  accuracy = float(jnp.mean(jnp.argmax(model.apply({"params": params}, images, train=False), -1) == labels))
  print(f"training accuracy {accuracy:.2f}")
  for layer in ("bn0", "bn1"):
    for name in ("scale", "bias", "mean", "var"):
      same = bool(jnp.array_equal(params[layer][name], start[layer][name]))
      print(f"frozen {layer}/{name:<5} bit-identical after {args.steps} adamw steps: {same}")
      assert same, f"{layer}/{name} moved"
  moved = float(jnp.max(jnp.abs(params["head"]["kernel"] - start["head"]["kernel"])))
  print(f"head kernel moved by up to {moved:.3f}; conv kernels trained too (not frozen here)")


if __name__ == "__main__":
  main()
