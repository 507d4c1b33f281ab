"""jaxbn.FrozenBatchNorm against torchvision.ops.FrozenBatchNorm2d; freeze/unfreeze; masks.

Tolerances: float32 outputs and input gradients 2e-6 absolute, float64 2e-14 (unit-scale data;
torchvision computes ``x * scale + shift``, jaxbn ``(x - mean) * scale + bias``: a few ulps);
float16 input: within one float16 ulp of torchvision's float32 output.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

import jaxbn
from parity_tests.test_dtypes import ulp
from parity_tests.torch_reference import random_batch, to_torch

ATOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 2e-14}


def torchvision_frozen(channels, eps, dtype, seed=0):
  generator = torch.Generator().manual_seed(seed)
  layer = FrozenBatchNorm2d(channels, eps=eps)
  layer.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
  layer.bias.copy_(torch.randn(channels, generator=generator))
  layer.running_mean.copy_(torch.randn(channels, generator=generator))
  layer.running_var.copy_(torch.rand(channels, generator=generator) + 0.1)
  return layer.to(dtype)


def frozen_params(layer):
  return {
      "params": {
          "scale": layer.weight.numpy().copy(),
          "bias": layer.bias.numpy().copy(),
          "mean": layer.running_mean.numpy().copy(),
          "var": layer.running_var.numpy().copy(),
      }
  }


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("eps", [1e-5, 0.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_torchvision(dtype, eps, channels_last):
  with jax.enable_x64(dtype == np.float64):
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    layer = torchvision_frozen(5, eps, torch_dtype)
    rng = np.random.default_rng(0)
    x = random_batch(rng, (3, 5, 4, 7), dtype)
    cotangent = rng.standard_normal(x.shape).astype(dtype)
    xt = to_torch(x).requires_grad_(True)
    expected = layer(xt)
    (expected * to_torch(cotangent)).sum().backward()

    module = jaxbn.FrozenBatchNorm(axis=-1 if channels_last else 1, epsilon=eps, param_dtype=dtype)
    layout = (lambda a: np.moveaxis(a, 1, -1)) if channels_last else (lambda a: a)
    variables = frozen_params(layer)
    y, vjp = jax.vjp(lambda x, p: module.apply({"params": p}, x), layout(x), variables["params"])
    dx, dparams = vjp(layout(cotangent))
    np.testing.assert_allclose(y, layout(expected.detach().numpy()), atol=ATOL[np.dtype(dtype)], rtol=0)
    np.testing.assert_allclose(dx, layout(xt.grad.numpy()), atol=ATOL[np.dtype(dtype)], rtol=0)
    for name, grad in dparams.items():  # constants: exactly zero, not merely small
      np.testing.assert_array_equal(grad, 0.0, err_msg=name)


def test_float16_input_keeps_its_dtype():
  """torchvision promotes half input to float32; jaxbn keeps the input's dtype (one ulp apart)."""
  layer = torchvision_frozen(5, 1e-5, torch.float32)
  x = random_batch(np.random.default_rng(1), (3, 5, 4, 7), np.float16)
  expected = layer(to_torch(x)).numpy()
  assert expected.dtype == np.float32
  y = np.asarray(jaxbn.FrozenBatchNorm(axis=1).apply(frozen_params(layer), x))
  assert y.dtype == np.float16
  assert np.all(np.abs(y.astype(np.float64) - expected) <= ulp(expected, np.float16))


def test_apply_needs_only_params():
  x = jnp.ones((2, 3, 3, 4))
  variables = jaxbn.FrozenBatchNorm().init(jax.random.key(0), x)
  assert set(variables) == {"params"}
  jaxbn.FrozenBatchNorm().apply({"params": variables["params"]}, x)  # no mutable, no batch_stats


def test_channel_mismatch_is_reported():
  variables = jaxbn.FrozenBatchNorm().init(jax.random.key(0), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"\(6,\) channels.*params/mean \(4,\)"):
    jaxbn.FrozenBatchNorm().apply(variables, jnp.ones((2, 6)))


class Block(nn.Module):
  """A model that takes its norm class as an argument (torchvision's norm_layer idiom)."""

  norm: type = jaxbn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(6, name="dense")(x)
    x = self.norm(use_running_average=not train, name="bn")(x)
    return self.norm(use_running_average=not train, use_scale=False, name="bn_no_scale")(nn.relu(x))


def trained_block_variables(steps=3):
  rng = np.random.default_rng(2)
  x = random_batch(rng, (8, 4), np.float32)
  variables = Block().init(jax.random.key(0), x)
  for _ in range(steps):
    _, updates = Block().apply(variables, random_batch(rng, (8, 4), np.float32), train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
  return variables, x


def test_freeze_gives_variables_of_the_frozen_model_with_the_same_eval_output():
  variables, x = trained_block_variables()
  frozen = jaxbn.freeze(variables)
  assert set(frozen["params"]["bn"]) == {"scale", "bias", "mean", "var"}
  assert set(frozen["params"]["bn_no_scale"]) == {"bias", "mean", "var"}
  eval_output = Block().apply(variables, x)
  frozen_output = Block(norm=jaxbn.FrozenBatchNorm).apply({"params": frozen["params"]}, x, train=True)
  np.testing.assert_array_equal(frozen_output, eval_output)


def test_freeze_unfreeze_round_trip_is_lossless():
  variables, _ = trained_block_variables()
  restored = jaxbn.unfreeze(jaxbn.freeze(variables))
  assert jax.tree.structure(restored) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(variables), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert int(restored["batch_stats"]["bn"]["num_batches_tracked"]) == 3


def test_unfreeze_of_torchvision_style_variables_starts_the_counter_at_zero():
  frozen = Block(norm=jaxbn.FrozenBatchNorm).init(jax.random.key(0), jnp.ones((2, 4)))
  variables = jaxbn.unfreeze(frozen)
  assert int(variables["batch_stats"]["bn"]["num_batches_tracked"]) == 0
  Block().apply(variables, jnp.ones((2, 4)))


def test_adamw_never_moves_frozen_arrays():
  """100 adamw steps with weight_decay=0.1: frozen arrays bit-identical, the rest trained."""
  variables, x = trained_block_variables()
  params = jaxbn.freeze(variables)["params"]
  model = Block(norm=jaxbn.FrozenBatchNorm)
  tx = jaxbn.keep_frozen(optax.adamw(1e-2, weight_decay=0.1), jaxbn.frozen_mask({"params": params}))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: jnp.mean((model.apply({"params": p}, x) - 1.0) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grads

  start = params
  for _ in range(100):
    params, opt_state, grads = step(params, opt_state)
  for layer in ("bn", "bn_no_scale"):
    for name, value in params[layer].items():
      np.testing.assert_array_equal(value, start[layer][name], err_msg=f"{layer}/{name}")
      np.testing.assert_array_equal(grads[layer][name], 0.0)
  assert np.max(np.abs(params["dense"]["kernel"] - start["dense"]["kernel"])) > 1e-2


def test_masks_for_batchnorm_affine_and_whole_modules():
  variables, _ = trained_block_variables()
  affine = jaxbn.frozen_mask(variables, batchnorm_affine=["bn"])
  assert affine == {
      "dense": {"kernel": False, "bias": False},
      "bn": {"scale": True, "bias": True},
      "bn_no_scale": {"bias": False},
  }
  everywhere = jaxbn.frozen_mask(variables, batchnorm_affine=[""])
  assert everywhere["bn_no_scale"] == {"bias": True} and everywhere["dense"]["kernel"] is False
  modules = jaxbn.frozen_mask(variables, modules=["dense"])
  assert modules["dense"] == {"kernel": True, "bias": True} and modules["bn"]["scale"] is False


class TwoStage(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    x = jaxbn.BatchNorm(use_running_average=not train, name="backbone")(x)
    return jaxbn.BatchNorm(name="head")(x, use_running_average=not train)


def test_eval_mode_keeps_one_subtree_in_eval_while_the_rest_trains():
  rng = np.random.default_rng(3)
  x = random_batch(rng, (8, 4), np.float32) + 5.0
  variables = TwoStage().init(jax.random.key(0), x, train=False)

  @jax.jit
  def train_step(variables, x):
    with jaxbn.eval_mode("backbone"):
      return TwoStage().apply(variables, x, train=True, mutable=["batch_stats"])

  y, updates = train_step(variables, x)
  backbone_eval = jaxbn.BatchNorm(use_running_average=True).apply(
      {"params": variables["params"]["backbone"], "batch_stats": variables["batch_stats"]["backbone"]}, x
  )
  head_train, _ = jaxbn.BatchNorm(use_running_average=False).apply(
      {"params": variables["params"]["head"], "batch_stats": variables["batch_stats"]["head"]},
      backbone_eval,
      mutable=["batch_stats"],
  )
  np.testing.assert_allclose(y, head_train, atol=1e-6, rtol=0)
  jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"]["backbone"], variables["batch_stats"]["backbone"])
  assert int(updates["batch_stats"]["head"]["num_batches_tracked"]) == 1
  _, outside = TwoStage().apply(variables, x, train=True, mutable=["batch_stats"])  # context ended
  assert int(outside["batch_stats"]["backbone"]["num_batches_tracked"]) == 1
