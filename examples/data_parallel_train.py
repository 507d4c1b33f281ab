"""Data-parallel training of a small CNN over all local devices, BatchNorm synced like torch's
SyncBatchNorm (jaxbn.BatchNorm(axis_name=...)), in a jitted shard_map step.

The last batch of each epoch is short: it is padded to fill every device and the padding is
masked, so its statistics are exactly those of the real examples (uneven per-device batches).
At the end, the running statistics are checked against one device computing on the whole batch.

  python examples/data_parallel_train.py [--devices 8] [--epochs 2]

--devices N simulates N CPU devices when the machine has fewer (sets XLA_FLAGS before JAX starts).
"""

from __future__ import annotations

import argparse
import os


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--batch", type=int, default=64, help="global batch size")
  return parser.parse_args()


ARGS = parse_args()
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={ARGS.devices}"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxbn  # noqa: E402


class CNN(nn.Module):
  axis_name: str | None = "data"

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    norm = lambda name: jaxbn.BatchNorm(use_running_average=not train, axis_name=self.axis_name, name=name)  # noqa: E731
    for i, features in enumerate((16, 32)):
      x = nn.Conv(features, (3, 3), strides=2, use_bias=False, name=f"conv{i}")(x)
      x = nn.relu(norm(f"bn{i}")(x, mask=mask))
    return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))


def main() -> None:
  devices = jax.devices()[: ARGS.devices]
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
  sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 1003)  # 1003: the last batch does not split evenly
  images = rng.standard_normal((len(labels), 16, 16, 3)).astype(np.float32) + 3.0
  images[..., 0] += labels[:, None, None] * 0.3  # a learnable signal

  model = CNN()
  variables = CNN(axis_name=None).init(jax.random.key(0), images[:2], train=False)
  tx = optax.sgd(0.05, momentum=0.9)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  def device_step(params, batch_stats, opt_state, x, y, valid):
    mask = valid[:, None, None, None]

    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, x, train=True, mask=mask, mutable=["batch_stats"]
      )
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      total = jax.lax.psum(jnp.sum(jnp.where(valid, losses, 0.0)), "data")
      return total / jax.lax.psum(jnp.sum(valid), "data"), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  train_step = jax.jit(
      jax.shard_map(
          device_step,
          mesh=mesh,
          in_specs=(P(), P(), P(), P("data"), P("data"), P("data")),
          out_specs=(P(), P(), P(), P()),
      ),
      donate_argnums=(0, 1, 2),
  )
  params, batch_stats, opt_state = jax.device_put((params, batch_stats, opt_state), replicated)

  for epoch in range(ARGS.epochs):
    order = rng.permutation(len(images))
    for start in range(0, len(images), ARGS.batch):
      rows = order[start : start + ARGS.batch]
      pad = (-len(rows)) % len(devices)  # fill every device; the padding is masked out
      x = np.concatenate([images[rows], np.zeros((pad, *images.shape[1:]), np.float32)])
      y = np.concatenate([labels[rows], np.zeros(pad, labels.dtype)])
      valid = np.arange(len(x)) < len(rows)
      params, batch_stats, opt_state, loss = train_step(
          params, batch_stats, opt_state, *jax.device_put((x, y, valid), sharded)
      )
    print(
        f"epoch {epoch}: last batch {len(rows)} examples on {len(devices)} devices"
        f" (+{pad} masked), loss {float(loss):.4f},"
        f" bn0 num_batches_tracked {int(batch_stats['bn0']['num_batches_tracked'])}"
    )

  # The synced statistics equal those of one device seeing the whole (unpadded) last batch.
  single = CNN(axis_name=None)
  before = {"params": params, "batch_stats": batch_stats}
  _, expected = single.apply(jax.device_get(before), images[rows], train=True, mutable=["batch_stats"])
  x = np.concatenate([images[rows], np.zeros((pad, *images.shape[1:]), np.float32)])
  sync_step = jax.jit(
      jax.shard_map(
          lambda v, x, valid: model.apply(v, x, train=True, mask=valid[:, None, None, None], mutable=["batch_stats"])[
              1
          ],
          mesh=mesh,
          in_specs=(P(), P("data"), P("data")),
          out_specs=P(),
      )
  )
  synced = sync_step(before, *jax.device_put((x, np.arange(len(x)) < len(rows)), sharded))
  error = max(
      float(jnp.max(jnp.abs(a - b) / jnp.maximum(jnp.abs(b), 1)))
      for a, b in zip(jax.tree.leaves(synced), jax.tree.leaves(expected), strict=True)
  )
  print(f"synced running statistics vs one device on the whole batch: max relative difference {error:.1e}")
  assert error < 1e-5


if __name__ == "__main__":
  main()
