"""Statistics across a mapped axis (``axis_name``) equal torch BatchNorm over the concatenated
global batch, which is what torch's SyncBatchNorm computes. Tolerances as test_batch_norm_parity:
outputs and input gradients 2e-6, running statistics 5e-7 relative, counter exact."""

from __future__ import annotations

import jax
import numpy as np
import torch

import jaxbn
from parity_tests.torch_reference import random_batch, to_torch, variables_from_torch


def test_vmapped_devices_match_torch_on_the_global_batch():
  devices, per_device, channels = 4, 3, 5
  rng = np.random.default_rng(0)
  torch_bn = torch.nn.BatchNorm2d(channels)
  module = jaxbn.BatchNorm(axis=-1, axis_name="devices")
  variables = variables_from_torch(torch_bn)

  def device_step(variables, x, cotangent):
    def forward(x, params):
      return module.apply({**variables, "params": params}, x, use_running_average=False,
                          mutable=["batch_stats"])

    y, vjp, updates = jax.vjp(forward, x, variables["params"], has_aux=True)
    dx, _ = vjp(cotangent)
    return y, dx, updates["batch_stats"]

  step = jax.jit(jax.vmap(device_step, in_axes=(None, 0, 0), axis_name="devices"))
  for _ in range(4):
    x = random_batch(rng, (devices * per_device, channels, 3, 5), np.float32)  # torch layout
    cotangent = rng.standard_normal(x.shape).astype(np.float32)
    xt = to_torch(x).requires_grad_(True)
    torch_y = torch_bn(xt)
    (torch_y * to_torch(cotangent)).sum().backward()

    def shard(a):
      return np.moveaxis(a, 1, -1).reshape(devices, per_device, 3, 5, channels)

    y, dx, stats = step(variables, shard(x), shard(cotangent))
    np.testing.assert_allclose(y, shard(torch_y.detach().numpy()), atol=2e-6, rtol=0)
    np.testing.assert_allclose(dx, shard(xt.grad.numpy()), atol=2e-6, rtol=0)
    for d in range(devices):  # every device holds the same, global, running statistics
      np.testing.assert_allclose(stats["mean"][d], torch_bn.running_mean.numpy(), rtol=5e-7, atol=5e-7)
      np.testing.assert_allclose(stats["var"][d], torch_bn.running_var.numpy(), rtol=5e-7, atol=5e-7)
      assert int(stats["num_batches_tracked"][d]) == int(torch_bn.num_batches_tracked)
    variables = {**variables, "batch_stats": jax.tree.map(lambda a: a[0], stats)}
