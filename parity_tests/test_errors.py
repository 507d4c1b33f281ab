"""Bad input gets an error that names the problem and the fix (torch's wording where torch has one)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import torch

import jaxbn


def torch_message(module, x):
  with pytest.raises(ValueError) as info:
    module(torch.from_numpy(x))
  return str(info.value)


def test_one_value_per_channel_in_training_torch_wording():
  x = np.ones((1, 3), np.float32)
  expected = torch_message(torch.nn.BatchNorm1d(3), x)
  assert expected.startswith("Expected more than 1 value per channel when training")
  module = jaxbn.BatchNorm(use_running_average=False)
  with pytest.raises(
      ValueError, match=re.escape("Expected more than 1 value per channel when training, got input size (1, 3)")
  ):
    module.init(jax.random.key(0), x)
  variables = jaxbn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
    module.apply(variables, x, mutable=["batch_stats"])
  # eval with running statistics is fine on a single example, as in torch
  jaxbn.BatchNorm(use_running_average=True).apply(variables, x)


def test_one_value_per_channel_without_tracking_even_in_eval():
  x = np.ones((1, 3, 1, 1), np.float32)
  torch_message(torch.nn.BatchNorm2d(3, track_running_stats=False).eval(), x)
  module = jaxbn.BatchNorm(axis=1, track_running_stats=False, use_running_average=True)
  with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
    module.init(jax.random.key(0), x)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_nonpositive_eps_in_training_torch_wording(eps):
  x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
  expected = torch_message(torch.nn.BatchNorm1d(3, eps=eps), x)
  with pytest.raises(ValueError, match=re.escape(expected)):
    jaxbn.BatchNorm(epsilon=eps, use_running_average=False).init(jax.random.key(0), x)


def test_negative_eps_in_eval_torch_wording():
  x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
  expected = torch_message(torch.nn.BatchNorm1d(3, eps=-1.0).eval(), x)
  with pytest.raises(ValueError, match=re.escape(expected)):
    jaxbn.BatchNorm(epsilon=-1.0, use_running_average=True).init(jax.random.key(0), x)


def test_channel_count_that_does_not_fit_the_variables():
  variables = jaxbn.BatchNorm(use_running_average=True).init(jax.random.key(0), np.ones((2, 8)))
  with pytest.raises(ValueError) as info:
    jaxbn.BatchNorm(use_running_average=True).apply(variables, np.ones((2, 4, 4, 16)))
  message = str(info.value)
  for part in [
      "(2, 4, 4, 16)",
      "(16,) channels",
      "params/scale (8,)",
      "params/bias (8,)",
      "batch_stats/mean (8,)",
      "1 for NCHW",
  ]:
    assert part in message, (part, message)


def test_nchw_input_to_a_channels_last_layer_is_caught():
  """The common porting slip: torch-layout input, flax's default axis=-1."""
  variables = jaxbn.BatchNorm(axis=1, use_running_average=True).init(jax.random.key(0), np.ones((2, 3, 5, 5)))
  with pytest.raises(ValueError, match=r"\(5,\) channels on axis \(3,\).*params/scale \(3,\)"):
    jaxbn.BatchNorm(use_running_average=True).apply(variables, np.ones((2, 3, 5, 5)))


def test_axis_out_of_range():
  with pytest.raises(ValueError, match=r"axis=2 is out of range for an input of shape \(4, 3\).*-1 for channels-last"):
    jaxbn.BatchNorm(axis=2, use_running_average=True).init(jax.random.key(0), np.ones((4, 3)))


def test_input_without_a_batch_axis():
  with pytest.raises(ValueError, match=r"needs a batch axis.*shape \(3,\).*x\[None\]"):
    jaxbn.BatchNorm(use_running_average=True).init(jax.random.key(0), np.ones((3,)))


def test_use_running_average_must_be_given_once():
  with pytest.raises(ValueError, match="use_running_average"):
    jaxbn.BatchNorm().init(jax.random.key(0), np.ones((4, 3)))


# Path arguments never match nothing silently (a typo used to give an all-False mask or no effect).


def _resnet18_variables():
  model = jaxbn.models.resnet18(num_classes=4)
  x = np.zeros((2, 32, 32, 3), np.float32)
  return model, x, model.init(jax.random.key(0), x)


@pytest.mark.parametrize("option", ["modules", "batchnorm_affine"])
@pytest.mark.parametrize("typo", ["layer_1", "Layer1"])
def test_frozen_mask_path_that_matches_nothing(option, typo):
  _, _, variables = _resnet18_variables()
  with pytest.raises(
      ValueError, match=rf"frozen_mask\({option}=\.\.\.\): '{typo}' \(closest: layer1.*\) matches no module path"
  ):
    jaxbn.frozen_mask(variables, **{option: [typo]})


def test_frozen_mask_and_eval_mode_take_torch_dotted_paths():
  model, x, variables = _resnet18_variables()
  dotted, slashed = jaxbn.frozen_mask(variables, modules=["layer1.0"]), jaxbn.frozen_mask(
      variables, modules=["layer1/0"]
  )
  assert jax.tree.leaves(dotted) == jax.tree.leaves(slashed) and sum(jax.tree.leaves(dotted)) == 6
  with jaxbn.eval_mode("layer1.0"):
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert int(updates["batch_stats"]["layer1"]["0"]["bn1"]["num_batches_tracked"]) == 0
  assert int(updates["batch_stats"]["layer1"]["1"]["bn1"]["num_batches_tracked"]) == 1


def test_eval_mode_path_that_matches_no_layer():
  model, x, variables = _resnet18_variables()
  with pytest.raises(
      ValueError, match=r"eval_mode\('layer_1',\): 'layer_1' \(closest: layer1.*\) matches no module path"
  ):
    with jaxbn.eval_mode("layer_1"):
      model.apply(variables, x, train=True, mutable=["batch_stats"])


def test_eval_mode_around_a_compiled_function_warns():
  """eval_mode acts at trace time: around a call that hits jit's cache it cannot act at all."""
  model, x, variables = _resnet18_variables()
  step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  step(variables, x)
  with pytest.warns(UserWarning, match="no jaxbn.BatchNorm ran inside this context.*inside the function you jit"):
    with jaxbn.eval_mode("layer1"):
      step(variables, x)


def test_nchw_input_into_an_nhwc_resnet_names_input_layout():
  """Before: flax's ScopeParamShapeError about a (7, 7, 64, 64) kernel."""
  model, x, variables = _resnet18_variables()
  with pytest.raises(ValueError, match=r"\(2, 3, 32, 32\) looks like torch's NCHW layout.*input_layout='NCHW'"):
    model.apply(variables, np.zeros((2, 3, 32, 32), np.float32))
