"""jaxbn.nnx as a specification: modes, freezing, eval pinning, optimiser filters, folding and
conversion on NNX modules and states. (Numerical parity with torch runs both APIs in
test_batch_norm_parity, test_dtypes, test_sync, test_freeze_training_parity, test_resnet_parity.)
Exact comparisons are bit for bit; folded logits within 2e-5 of the largest |logit| (as
test_folding: float32 rounding of the folded kernel)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torchvision
from flax import nnx, traverse_util

import jaxbn


def trained_resnet(steps=2, **kwargs):
  """An NNX resnet18 converted from a torch one trained ``steps`` steps (non-trivial stats, counters)."""
  torch.manual_seed(0)
  torch_model = torchvision.models.resnet18(num_classes=5)
  with torch.no_grad():
    for _ in range(steps):
      torch_model(torch.randn(4, 3, 32, 32))
  model = jaxbn.models.nnx.resnet18(5, rngs=nnx.Rngs(0), **kwargs)
  jaxbn.convert.from_torch(torch_model.state_dict(), model)
  return torch_model, model


def flat(module_or_variables) -> dict:
  variables = (
      jaxbn.nnx.to_variables(module_or_variables)
      if isinstance(module_or_variables, nnx.Module)
      else module_or_variables
  )
  return traverse_util.flatten_dict(variables, sep="/")


def assert_same(actual: dict, expected: dict):
  assert actual.keys() == expected.keys()
  for key, value in expected.items():
    assert np.asarray(actual[key]).dtype == np.asarray(value).dtype, key
    np.testing.assert_array_equal(actual[key], value, err_msg=key)


X = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)


def test_modes_follow_train_eval_view_and_the_call_argument():
  bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  x = jnp.asarray(X)
  bn(x)  # constructed in training mode, as flax's layer
  assert int(bn.num_batches_tracked[...]) == 1
  bn.eval()
  bn(x)
  assert int(bn.num_batches_tracked[...]) == 1
  nnx.view(bn, use_running_average=False)(x)  # a view shares the arrays
  assert int(bn.num_batches_tracked[...]) == 2
  bn(x, use_running_average=False)  # the call argument wins
  assert int(bn.num_batches_tracked[...]) == 3
  bn.train()
  bn(x)
  assert int(bn.num_batches_tracked[...]) == 4


def test_errors_name_the_problem():
  bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"has \(4,\) channels.*num_features \(3,\)"):
    bn(jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
    bn(jnp.ones((1, 3)))
  with pytest.raises(TypeError, match="not implemented for 'Long'"):
    bn(np.ones((2, 3), np.int64))
  with pytest.warns(jaxbn.MomentumConventionWarning):
    jaxbn.nnx.BatchNorm(3, momentum=0.97, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="unexpected keyword argument.*momentun"):
    jaxbn.nnx.FrozenBatchNorm(3, momentun=0.1)
  # An error leaves the layer as it was (torch counts the refused batch first; an exception in
  # jitted NNX code could not write anything back, so eager code does not either).
  assert int(bn.num_batches_tracked[...]) == 0


def test_freeze_unfreeze_is_bit_exact_and_keeps_counters_and_options():
  _, model = trained_resnet()
  model.layer1[0].bn1.momentum = None  # an option the round trip must keep
  before = flat(model)
  x = jnp.asarray(X)
  model.eval()
  logits = model(x)
  jaxbn.nnx.freeze(model)
  assert isinstance(model.layer2[0].downsample[1], jaxbn.nnx.FrozenBatchNorm)
  assert isinstance(model.bn1.mean, jaxbn.nnx.Frozen)
  np.testing.assert_array_equal(model(x), logits)
  jaxbn.nnx.unfreeze(model)
  assert_same(flat(model), before)
  assert model.layer1[0].bn1.momentum is None and model.bn1.momentum == 0.1


def test_freeze_paths_and_unfrozen_torchvision_layers():
  _, model = trained_resnet()
  jaxbn.nnx.freeze(model, "layer1.0")  # torch's dotted form works too
  kinds = {path: type(m).__name__ for path, m in nnx.iter_modules(model) if path and "bn" in str(path[-1])}
  assert kinds[("layer1", 0, "bn1")] == "FrozenBatchNorm" and kinds[("layer1", 1, "bn1")] == "BatchNorm"
  with pytest.raises(ValueError, match="'layer9' .closest: layer4.*matches no module path"):
    jaxbn.nnx.freeze(model, "layer9")
  frozen = nnx.Sequential(jaxbn.nnx.FrozenBatchNorm(3))  # e.g. from torchvision's FrozenBatchNorm2d
  jaxbn.nnx.unfreeze(frozen)
  assert int(frozen.layers[0].num_batches_tracked[...]) == 0


def test_adamw_never_moves_frozen_arrays():
  _, model = trained_resnet()
  jaxbn.nnx.freeze(model, "layer1")
  frozen_before = {k: v for k, v in flat(model).items() if k.startswith("params/layer1/0/bn1")}
  optimizer = nnx.Optimizer(model, optax.adamw(1e-1, weight_decay=0.5), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda model: (model(jnp.asarray(X)) ** 2).mean())(model))

  for _ in range(3):
    step(model, optimizer)
  after = flat(model)
  assert_same({k: after[k] for k in frozen_before}, frozen_before)
  assert not np.array_equal(after["params/fc/kernel"], flat(trained_resnet()[1])["params/fc/kernel"])


def test_trainable_filter_leaves_out_modules_and_batchnorm_affine():
  _, model = trained_resnet()
  wrt = jaxbn.nnx.trainable(model, modules=["layer1"], batchnorm_affine=[""])
  names = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, wrt))}
  assert "fc/kernel" in names and "layer2/0/conv1/kernel" in names
  assert not any(n.startswith("layer1/") for n in names)
  assert not any(n.endswith(("bn1/scale", "bn2/bias", "downsample/1/scale")) for n in names)
  with pytest.raises(ValueError, match="'layer1/bnn' .closest: .*matches no module path"):
    jaxbn.nnx.trainable(model, batchnorm_affine=["layer1/bnn"])


def test_keep_eval_survives_model_train():
  _, model = trained_resnet()
  jaxbn.nnx.keep_eval(model, "layer1")
  model.train()
  model(jnp.asarray(X))
  assert int(model.layer1[0].bn1.num_batches_tracked[...]) == 2  # untouched: pinned to eval
  assert int(model.layer2[0].bn1.num_batches_tracked[...]) == 3
  jaxbn.nnx.keep_eval(model, "layer1", keep=False)
  model(jnp.asarray(X))
  assert int(model.layer1[0].bn1.num_batches_tracked[...]) == 3


def test_fold_batchnorm_in_place():
  _, model = trained_resnet()
  model.eval()
  expected = model(jnp.asarray(X))
  jaxbn.nnx.fold_batchnorm(model)
  assert isinstance(model.layer1[0].bn2, jaxbn.nnx.FoldedBatchNorm)
  assert "batch_stats" not in jaxbn.nnx.to_variables(model)
  np.testing.assert_allclose(model(jnp.asarray(X)), expected, atol=2e-5 * np.max(np.abs(expected)), rtol=0)


def test_conversion_round_trip_on_a_state_and_on_a_bridged_linen_model():
  torch_model, model = trained_resnet()
  state_dict = torch_model.state_dict()
  fresh = nnx.state(jaxbn.models.nnx.resnet18(5, rngs=nnx.Rngs(1)))
  converted = jaxbn.convert.from_torch(state_dict, fresh).variables
  assert isinstance(converted, nnx.State)
  back = jaxbn.convert.to_torch(converted)
  for key, value in state_dict.items():  # bit for bit, int64 counters included
    assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
  torchvision.models.resnet18(num_classes=5).load_state_dict(back, strict=True)
  # A Linen jaxbn model used from NNX code through nnx.bridge: the same tools take its state.
  bridged = nnx.bridge.ToNNX(jaxbn.models.resnet18(num_classes=5), rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(bridged, jnp.asarray(X))
  jaxbn.convert.from_torch(state_dict, bridged)
  back = jaxbn.convert.to_torch(bridged)
  assert all(torch.equal(back[key], value) for key, value in state_dict.items())


def test_frozen_mask_and_keep_frozen_on_a_bridged_linen_model():
  bridged = nnx.bridge.ToNNX(jaxbn.models.resnet18(num_classes=5, norm=jaxbn.FrozenBatchNorm), rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(bridged, jnp.asarray(X))
  tx = jaxbn.keep_frozen(optax.adamw(1e-1, weight_decay=0.5), jaxbn.frozen_mask(bridged, modules=["layer1"]))
  optimizer = nnx.Optimizer(bridged, tx, wrt=nnx.Param)
  before = flat(jaxbn.nnx.to_variables(bridged))
  optimizer.update(bridged, nnx.grad(lambda m: (m(jnp.asarray(X)) ** 2).mean())(bridged))
  after = flat(jaxbn.nnx.to_variables(bridged))
  for key in before:
    moved = not np.array_equal(before[key], after[key])
    frozen = (
        key.startswith("params/layer1/")
        or key.rsplit("/", 1)[-1] in ("mean", "var")
        or "bn" in key
        or "downsample/1" in key
    )
    assert moved != frozen, key


def test_compare_and_compare_config_take_nnx_modules():
  torch_model, model = trained_resnet()
  assert jaxbn.parity.compare_config(torch_model, model) == []
  wrong = jaxbn.models.nnx.resnet18(5, rngs=nnx.Rngs(0), norm=functools.partial(jaxbn.nnx.BatchNorm, epsilon=1e-3))
  assert {m.field for m in jaxbn.parity.compare_config(torch_model, wrong)} == {"eps"}
  rng = np.random.default_rng(1)
  batches = [rng.standard_normal((4, 3, 32, 32)).astype(np.float32) for _ in range(2)]
  counter = int(model.bn1.num_batches_tracked[...])
  report = jaxbn.parity.compare(torch_model, model, None, batches)
  assert len(report) == 2 * 20 and int(model.bn1.num_batches_tracked[...]) == counter  # model untouched
  # resnet18's 1x1 layer4 maps at batch 4: 4 values per channel, as in test_resnet_parity (1e-5 on logits).
  assert max(r.max_rel for r in report) <= 1e-3
  assert max(r.mean_drift for r in report if r.mean_drift is not None) <= 1e-6  # one float32 update


def test_models_nnx_paths_are_torchvision_state_dict_paths():
  torch_keys = set(torchvision.models.resnet50(num_classes=7).state_dict())
  model = jaxbn.models.nnx.resnet50(7, rngs=nnx.Rngs(0))
  assert set(jaxbn.convert.to_state_dict(model)) == torch_keys
  with pytest.raises(ValueError, match="input_layout='NCHW'"):
    model(jnp.ones((1, 3, 32, 32)))


def test_linen_tools_refuse_an_nnx_module_naming_the_nnx_function():
  _, model = trained_resnet()
  with pytest.raises(TypeError, match=r"jaxbn.nnx.freeze\(model\)"):
    jaxbn.freeze(model)
  frozen = jaxbn.freeze(nnx.state(model))  # a state gives Linen variables
  assert "mean" in frozen["params"]["bn1"]
