"""Fine-tune a converted torch ResNet-18 in Flax NNX with its BatchNorm frozen.

1. A torchvision resnet18 "pretrained" for a few steps (random init; no downloads), converted
   into jaxbn.models.nnx.resnet18 in place: every tensor and counter, eps and momentum checked.
2. jaxbn.nnx.freeze(model): every BatchNorm becomes a FrozenBatchNorm holding the same arrays as
   jaxbn.nnx.Frozen variables, which nnx.Optimizer(wrt=nnx.Param) never sees.
3. Train layer4 and fc only (jaxbn.nnx.trainable filter) with adamw (weight decay 0.1) in an
   nnx.jit step; check that frozen arrays and the untrained stages are bit-identical.

  python examples/nnx_finetune_frozen_backbone.py [--steps 60]
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
import optax
import torch
import torchvision
from flax import nnx, traverse_util

import jaxbn


def synthetic_data(rng: np.random.Generator, n: int, classes: int = 4):
  """Images whose class sets the mean of one colour channel: learnable from pooled features."""
  labels = rng.integers(0, classes, n)
  images = rng.standard_normal((n, 32, 32, 3)).astype(np.float32)
  images[..., 0] += labels[:, None, None] * 0.5
  return jnp.asarray(images), jnp.asarray(labels)


def pretrained_torch_model(classes: int) -> torch.nn.Module:
  torch.manual_seed(0)
  model = torchvision.models.resnet18(num_classes=classes)
  model.train()
  with torch.no_grad():  # stands in for pretraining: running statistics move away from (0, 1)
    for _ in range(3):
      model(torch.randn(8, 3, 32, 32) * 2 + 0.5)
  return model


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=60)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  images, labels = synthetic_data(rng, 256)

  torch_model = pretrained_torch_model(classes=4)
  model = jaxbn.models.nnx.resnet18(4, rngs=nnx.Rngs(0))
  jaxbn.convert.from_torch(torch_model.state_dict(), model)  # strict: every key, in place
  mismatches = jaxbn.parity.compare_config(torch_model, model)
  print(f"converted {len(torch_model.state_dict())} tensors; BatchNorm settings that differ: {len(mismatches)}")

  jaxbn.nnx.freeze(model)
  wrt = jaxbn.nnx.trainable(model, modules=["conv1", "layer1", "layer2", "layer3"])
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=0.1), wrt=wrt)
  start = traverse_util.flatten_dict(jaxbn.nnx.to_variables(model), sep="/")

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    return loss

  model.train()  # frozen layers stay frozen: they have no training mode
  for step in range(args.steps):
    batch = rng.choice(len(images), 32, replace=False)
    loss = train_step(model, optimizer, images[batch], labels[batch])
    if step % 20 == 0 or step == args.steps - 1:
      print(f"step {step:4d}  loss {float(loss):.4f}")

  model.eval()
  accuracy = float(jnp.mean(jnp.argmax(model(images), -1) == labels))
  print(f"training accuracy {accuracy:.2f}")
  end = traverse_util.flatten_dict(jaxbn.nnx.to_variables(model), sep="/")
  frozen = [k for k in start if k.rsplit("/", 1)[-1] in ("mean", "var") and k.startswith("params/")]
  untrained = [k for k in start if k.split("/")[1] in ("conv1", "layer1", "layer2", "layer3")]
  for what, keys in (("frozen BatchNorm arrays", frozen), ("untrained stage arrays", untrained)):
    same = all(np.array_equal(start[k], end[k]) for k in keys)
    print(f"{len(keys)} {what} bit-identical after {args.steps} adamw steps: {same}")
    assert same, what
  moved = float(jnp.max(jnp.abs(end["params/fc/kernel"] - start["params/fc/kernel"])))
  print(f"fc kernel moved by up to {moved:.3f}")


if __name__ == "__main__":
  main()
