"""The training path, jaxbn.functional.batch_normalize: its hand-written gradient against torch
autograd, what it keeps for the backward, and that a jitted step traces once.

The loss reads the output and the returned batch mean and variance, so every term of the custom
VJP is exercised: torch differentiates ``F.batch_norm(training=True)`` plus ``torch.var_mean``.
With a mask, torch sees only the valid examples, and masked-out inputs must get exactly zero.

Tolerances (absolute; unit-scale data, channel gains below 2): float64 1e-13; float32 2e-6 for
the input gradient, times sqrt(n) for scale and bias gradients (sums of n terms), as in
test_batch_norm_parity.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn.functional import batch_normalize

TOLERANCE = {np.float64: 1e-13, np.float32: 2e-6}


def torch_gradients(x_nchw, weight, bias, cotangents, eps):
  """(dx, dweight, dbias) of sum(y * cy) + sum(mean * cm) + sum(var * cv), in torch layout."""
  cy, cm, cv = (torch.from_numpy(c) for c in cotangents)
  x, w, b = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (x_nchw, weight, bias))
  dims = [0] + list(range(2, x.ndim))
  y = torch.nn.functional.batch_norm(x, None, None, w, b, training=True, eps=eps)
  var, mean = torch.var_mean(x, dim=dims, unbiased=False)
  ((y * cy).sum() + (mean * cm).sum() + (var * cv).sum()).backward()
  return x.grad.numpy(), w.grad.numpy(), b.grad.numpy()


def jax_gradients(x_nhwc, weight, bias, cotangents, eps, mask=None):
  cy, cm, cv = cotangents

  def loss(x, weight, bias):
    y, stats = batch_normalize(x, tuple(range(x.ndim - 1)), weight, bias, eps, mask=mask)
    return jnp.sum(y * cy) + jnp.sum(stats.mean.ravel() * cm) + jnp.sum(stats.var.ravel() * cv)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x_nhwc, weight, bias)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradients_of_output_and_statistics_match_torch(dtype):
  rng = np.random.default_rng(0)
  n, channels, spatial = 6, 4, (5, 3)
  x = (rng.standard_normal((n, channels, *spatial)) * 2 + 3).astype(dtype)
  weight = np.linspace(0.5, 1.5, channels).astype(dtype)
  bias = np.linspace(-1, 1, channels).astype(dtype)
  cy = rng.standard_normal(x.shape).astype(dtype)
  cm, cv = rng.standard_normal((2, channels)).astype(dtype)
  expected = torch_gradients(x, weight, bias, (cy, cm, cv), 1e-5)
  with jax.enable_x64(dtype == np.float64):
    dx, dw, db = jax_gradients(np.moveaxis(x, 1, -1), weight, bias, (np.moveaxis(cy, 1, -1), cm, cv), 1e-5)
    assert dx.dtype == dtype
  tol = TOLERANCE[dtype]
  count = x.size // channels
  np.testing.assert_allclose(np.moveaxis(np.asarray(dx), -1, 1), expected[0], atol=tol, rtol=0)
  np.testing.assert_allclose(dw, expected[1], atol=tol * np.sqrt(count), rtol=0)
  np.testing.assert_allclose(db, expected[2], atol=tol * np.sqrt(count), rtol=0)


def test_masked_gradients_match_torch_on_the_valid_examples():
  rng = np.random.default_rng(1)
  valid, padded, channels = 5, 8, 3
  x = rng.standard_normal((padded, channels, 4, 4)).astype(np.float32)
  x[valid:] = 1e3  # padding junk, outside the statistics
  weight, bias = np.float32([0.5, 1.0, 1.5]), np.float32([0.1, 0.0, -0.1])
  cy = rng.standard_normal(x.shape).astype(np.float32)
  cm, cv = rng.standard_normal((2, channels)).astype(np.float32)
  expected = torch_gradients(x[:valid], weight, bias, (cy[:valid], cm, cv), 1e-5)
  mask = (np.arange(padded) < valid)[:, None, None, None]
  dx, dw, db = jax_gradients(np.moveaxis(x, 1, -1), weight, bias, (np.moveaxis(cy, 1, -1), cm, cv), 1e-5, mask)
  dx = np.moveaxis(np.asarray(dx), -1, 1)
  assert np.all(dx[valid:] == 0)
  tol = TOLERANCE[np.float32]
  np.testing.assert_allclose(dx[:valid], expected[0], atol=tol, rtol=0)
  np.testing.assert_allclose(dw, expected[1], atol=tol * np.sqrt(valid * 16), rtol=0)
  np.testing.assert_allclose(db, expected[2], atol=tol * np.sqrt(valid * 16), rtol=0)


def test_synced_gradients_match_torch_on_the_global_batch():
  """Eight devices under shard_map, each with a shard of the batch and replicated parameters: the
  input gradient (stats cotangents included) equals torch's on the whole batch, and the
  parameter gradients arrive summed over devices, as autodiff gives them."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  devices = 8
  rng = np.random.default_rng(4)
  x = (rng.standard_normal((2 * devices, 3, 4, 4)) * 2 + 3).astype(np.float32)
  weight, bias = np.float32([0.5, 1.0, 1.5]), np.float32([0.1, 0.0, -0.1])
  cy = rng.standard_normal(x.shape).astype(np.float32)
  cm, cv = rng.standard_normal((2, 3)).astype(np.float32)
  expected = torch_gradients(x, weight, bias, (cy, cm, cv), 1e-5)

  def loss(x, weight, bias, cy):
    y, stats = batch_normalize(x, (0, 1, 2), weight, bias, 1e-5, axis_name="data")
    # Every device holds the same statistics: each adds 1/devices of their terms.
    stats_terms = jnp.sum(stats.mean.ravel() * cm) + jnp.sum(stats.var.ravel() * cv)
    return jnp.sum(y * cy) + stats_terms / devices

  mesh = jax.make_mesh((devices,), ("data",))
  grads = jax.jit(
      jax.shard_map(
          jax.grad(loss, argnums=(0, 1, 2)),
          mesh=mesh,
          in_specs=(P("data"), P(), P(), P("data")),
          out_specs=(P("data"), P(), P()),
      )
  )
  sharded = NamedSharding(mesh, P("data"))
  dx, dw, db = grads(
      jax.device_put(np.moveaxis(x, 1, -1), sharded), weight, bias, jax.device_put(np.moveaxis(cy, 1, -1), sharded)
  )
  tol = TOLERANCE[np.float32]
  np.testing.assert_allclose(np.moveaxis(np.asarray(dx), -1, 1), expected[0], atol=tol, rtol=0)
  np.testing.assert_allclose(dw, expected[1], atol=tol * np.sqrt(x.size // 3), rtol=0)
  np.testing.assert_allclose(db, expected[2], atol=tol * np.sqrt(x.size // 3), rtol=0)


def test_half_input_keeps_its_dtype_and_matches_the_float32_gradient():
  """bfloat16 in: statistics in float32, the gradient returned in bfloat16, equal to the float32
  computation on the same values up to bfloat16 rounding (relative 2**-8)."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((8, 4, 4, 3)), jnp.bfloat16)
  cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def grad(x):
    return jax.grad(lambda x: jnp.sum(batch_normalize(x, (0, 1, 2), None, None, 1e-5)[0] * cotangent))(x)

  y, stats = batch_normalize(x, (0, 1, 2), None, None, 1e-5)
  assert y.dtype == stats.var.dtype == jnp.float32
  dx_half, dx_float = grad(x), grad(x.astype(jnp.float32))
  assert dx_half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dx_half, np.float32), dx_float, rtol=2**-8, atol=1e-6)


def residual_bytes(module, x):
  """Bytes the backward of a training-mode call keeps (the leaves of the vjp closure)."""
  variables = module.init(jax.random.key(0), x, use_running_average=True)

  def forward(x, params):
    return module.apply({**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"])

  leaves = jax.eval_shape(lambda x: jax.tree.leaves(jax.vjp(forward, x, variables["params"], has_aux=True)[1]), x)
  return sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backward_keeps_only_the_input_and_per_channel_vectors(dtype):
  """x in its own dtype plus a few per-channel vectors; flax.linen.BatchNorm keeps more."""
  x = jnp.zeros((16, 8, 8, 32), dtype)
  kept = residual_bytes(jaxbn.BatchNorm(), x)
  per_channel_bytes = 32 * 4
  assert x.nbytes <= kept <= x.nbytes + 10 * per_channel_bytes
  assert kept < residual_bytes(nn.BatchNorm(use_fast_variance=False), x)


def test_a_jitted_train_step_traces_once():
  """Running statistics and the batch counter change every step without a retrace."""
  module = jaxbn.BatchNorm(momentum=None)  # the cumulative average reads num_batches_tracked
  x = jnp.asarray(np.random.default_rng(3).standard_normal((8, 4, 4, 3)), jnp.float32)
  variables = module.init(jax.random.key(0), x, use_running_average=True)
  traces = []

  @jax.jit
  def step(variables, x):
    traces.append(None)

    def loss(params):
      y, updates = module.apply({**variables, "params": params}, x, use_running_average=False, mutable=["batch_stats"])
      return jnp.sum(y**3), updates

    grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
    return {"params": jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads), **updates}

  for i in range(4):
    variables = step(variables, x + i)
  assert int(variables["batch_stats"]["num_batches_tracked"]) == 4
  assert len(traces) == 1
