"""Edge batches and bad inputs never corrupt the running statistics; real torch is the reference.

What torch 2.14 does, read from its source and checked here against the installed build:
- ``_BatchNorm.forward`` (torch/nn/modules/batchnorm.py) increments ``num_batches_tracked``
  before it calls ``F.batch_norm``;
- ``F.batch_norm`` (torch/nn/functional.py, ``_verify_batch_size``) then raises ValueError when
  training on one value per channel: the batch is counted, the statistics are untouched;
- aten's ``_batch_norm_impl_index`` (Normalization.cpp) returns ``input.clone() * weight[0] +
  bias[0]`` for an empty input without touching the running statistics.
So an empty batch, or one value per channel, leaves mean and var as they were and counts the
batch. jaxbn does the same where the count is known only at run time (``mask``, ``axis_name``),
and raises torch's error where it is static.

Tolerances as test_batch_norm_parity (float32): outputs 2e-6 times the channel gain ``|a|``
(at least 1), plus four float32 ulps of ``|x * a|`` and of the output: torch CPU computes
``x * a + (bias - mean * a)``, which rounds at the size of ``x * a`` (an all-equal channel of
value 100 with variance 0 has ``|x * a|`` = 3e4, and torch's output is 1e-3 off the exact
``bias`` that jaxbn returns); running statistics 5e-7 relative to max(|value|, 1); statistics that must stay unchanged are compared
bit for bit. Non-finite values (NaN and inf inputs, eps = 0 on a zero variance) must be
non-finite in the same places as torch's: torch gives ``inf`` for a mean where jaxbn's shifted
sums give NaN, and the output of ``x * inf + b`` is NaN in torch where jaxbn's
``(x - mean) * inf`` is ``inf``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

import jaxbn
from parity_tests.test_batch_norm_parity import channel_gain
from parity_tests.torch_reference import Config, random_batch, to_numpy, variables_from_torch

ATOL, STATS_RTOL, OUTPUT_ULPS = 2e-6, 5e-7, 4 * np.finfo(np.float32).eps


def trained_torch(config: Config, rank: int, seed=0) -> torch.nn.Module:
  """A torch BatchNorm whose running statistics have moved (so 'unchanged' means something)."""
  torch_bn = config.torch_module(rank)
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    torch_bn(torch.from_numpy(random_batch(rng, (4, config.channels) + (3,) * (rank - 2), np.float32)))
  return torch_bn


def torch_train_step(torch_bn, x):
  """torch's output on ``x`` in training, or None where torch raises (one value per channel)."""
  torch_bn.train()
  try:
    with torch.no_grad():
      return to_numpy(torch_bn(torch.from_numpy(x)))
  except ValueError as error:
    assert "Expected more than 1 value per channel when training" in str(error)
    return None


def assert_stats(actual, expected, *, exact=False):
  for name in ("mean", "var"):
    ours, theirs = np.asarray(actual[name], np.float64), np.asarray(expected[name], np.float64)
    assert np.array_equal(np.isfinite(ours), np.isfinite(theirs)), (name, ours, theirs)
    finite = np.isfinite(theirs)
    if exact:
      assert np.array_equal(ours[finite], theirs[finite]), (name, ours, theirs)
    else:
      error = np.abs(ours - theirs)[finite] / np.maximum(np.abs(theirs[finite]), 1.0)
      assert error.size == 0 or error.max() <= STATS_RTOL, (name, error.max())
  assert int(actual["num_batches_tracked"]) == int(expected["num_batches_tracked"])


def assert_outputs(actual, expected, x, torch_bn, train):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  assert np.array_equal(np.isfinite(actual), np.isfinite(expected))
  finite = np.isfinite(expected)
  with np.errstate(all="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # np.var of an empty or non-finite batch
    gain = np.nan_to_num(np.maximum(channel_gain(torch_bn, x, train), 1.0), nan=np.inf)
    tolerance = ATOL * gain + OUTPUT_ULPS * (np.abs(x) * gain + np.abs(expected))
  excess = (np.abs(actual - expected) / tolerance)[finite]
  assert excess.size == 0 or excess.max() <= 1, excess.max()


def train_apply(module, variables, x, mask=None):
  return module.apply(variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"])


@pytest.mark.parametrize("momentum", [0.3, None])
@pytest.mark.parametrize("rank, channels_last", [(2, False), (4, False), (4, True)])
def test_empty_batch_counts_and_changes_nothing(momentum, rank, channels_last):
  """N = 0 in training: empty output of the input's shape and dtype, statistics unchanged (bit
  for bit), counter + 1; a next real batch then uses torch's cumulative factor, which counted
  the empty one. Gradients are zero and finite."""
  config = Config(momentum=momentum, channels_last=channels_last)
  torch_bn = trained_torch(config, rank)
  variables = variables_from_torch(torch_bn)
  module = config.jax_module()
  empty = np.zeros((0, 3) + (3,) * (rank - 2), np.float32)
  expected = torch_train_step(torch_bn, empty)
  y, updates = jax.jit(lambda v, x: train_apply(module, v, x))(variables, config.to_layout(empty))
  assert y.shape == config.to_layout(expected).shape and y.dtype == jnp.float32
  assert_stats(updates["batch_stats"], variables_from_torch(torch_bn)["batch_stats"], exact=True)
  assert int(updates["batch_stats"]["num_batches_tracked"]) == 2

  grads = jax.grad(lambda p, x: train_apply(module, {**variables, "params": p}, x)[0].sum(), argnums=(0, 1))(
      variables["params"], config.to_layout(empty)
  )
  for grad in jax.tree.leaves(grads):
    assert np.all(np.asarray(grad) == 0)

  x = random_batch(np.random.default_rng(1), (4, 3) + (3,) * (rank - 2), np.float32)
  expected = torch_train_step(torch_bn, x)
  y, updates = train_apply(module, {**variables, **updates}, config.to_layout(x))
  assert_outputs(config.from_layout(y), expected, x, torch_bn, train=True)
  assert_stats(updates["batch_stats"], variables_from_torch(torch_bn)["batch_stats"])


def test_empty_batch_in_eval_and_in_frozen_layers():
  x = np.zeros((0, 3, 2, 2), np.float32)
  variables = jaxbn.BatchNorm(axis=1, use_running_average=True).init(jax.random.key(0), x)
  assert jaxbn.BatchNorm(axis=1, use_running_average=True).apply(variables, x).shape == x.shape
  frozen = jaxbn.FrozenBatchNorm(axis=1)
  assert frozen.apply(frozen.init(jax.random.key(0), x), x).shape == x.shape


@pytest.mark.parametrize("valid", [0, 1, 2, 3])
def test_masked_counts_of_zero_one_two(valid):
  """A mask with 0 or 1 valid examples (n = 0 or 1 per channel, known only at run time): torch
  on the valid rows returns an empty batch or raises; jaxbn leaves the statistics exactly as
  torch leaves them and counts the batch. 2 and 3 valid rows match torch's update."""
  config = Config(momentum=0.3)
  torch_bn = trained_torch(config, rank=2)
  variables = variables_from_torch(torch_bn)
  rng = np.random.default_rng(valid)
  x = random_batch(rng, (5, 3), np.float32)
  x[valid:] = np.nan  # padding: must not reach the statistics
  mask = np.arange(5) < valid
  expected = torch_train_step(torch_bn, x[:valid])
  y, updates = jax.jit(lambda v, x, m: train_apply(config.jax_module(), v, x, m[:, None]))(variables, x, mask)
  assert_stats(updates["batch_stats"], variables_from_torch(torch_bn)["batch_stats"], exact=valid < 2)
  if valid >= 2:
    assert_outputs(y[:valid], expected, x[:valid], torch_bn, train=True)
  else:
    assert int(updates["batch_stats"]["num_batches_tracked"]) == 2


@pytest.mark.parametrize("valid", [0, 1])
def test_synced_global_count_of_zero_or_one(valid):
  """Across 8 devices (vmap with axis_name) with ``valid`` examples in the whole global batch:
  no NaN reaches any device's statistics; all of them stay as torch leaves them."""
  config = Config(momentum=0.3)
  torch_bn = trained_torch(config, rank=2)
  variables = variables_from_torch(torch_bn)
  x = random_batch(np.random.default_rng(0), (8, 2, 3), np.float32)
  mask = np.zeros((8, 2, 1), bool)
  mask[3, 0] = valid == 1
  torch_train_step(torch_bn, x[3, :valid])
  module = jaxbn.BatchNorm(momentum=0.3, axis_name="devices")
  _, updates = jax.vmap(lambda x, m: train_apply(module, variables, x, m), axis_name="devices")(x, mask)
  for device in range(8):
    assert_stats(
        jax.tree.map(lambda a: a[device], updates["batch_stats"]),
        variables_from_torch(torch_bn)["batch_stats"],
        exact=True,
    )


def test_runtime_checks_give_torchs_error_under_checkify():
  """Opt-in: ``runtime_checks=True`` turns a run-time count of 1 into torch's ValueError text
  through checkify; a count of 2 passes; without the flag nothing is checked."""
  x = random_batch(np.random.default_rng(0), (4, 3), np.float32)
  variables = jaxbn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)

  def errors(runtime_checks, valid):
    module = jaxbn.BatchNorm(runtime_checks=runtime_checks)
    step = checkify.checkify(jax.jit(lambda x, m: train_apply(module, variables, x, m)), errors=checkify.user_checks)
    error, _ = step(x, (np.arange(4) < valid)[:, None])
    return error.get()

  message = errors(True, valid=1)
  assert "Expected more than 1 value per channel when training" in message and "BatchNorm '<root>'" in message
  assert errors(True, valid=2) is None
  assert errors(True, valid=0) is None  # torch does not raise on an empty batch
  assert errors(False, valid=1) is None


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_, np.complex64])
@pytest.mark.parametrize("layer", [jaxbn.BatchNorm, jaxbn.FrozenBatchNorm, jaxbn.FoldedBatchNorm])
def test_non_float_input_is_refused_with_torchs_wording(dtype, layer):
  """torch: NotImplementedError '"batch_norm" not implemented for 'Long''; jaxbn: a TypeError
  with torch's text, the layer, the dtype and the cast that fixes it. Before: int in, a
  normalised float silently truncated back to int out."""
  x = np.ones((4, 3), dtype)
  with pytest.raises(NotImplementedError) as torch_error:
    torch.nn.BatchNorm1d(3)(torch.from_numpy(x))
  variables = layer(use_running_average=True).init(jax.random.key(0), np.ones((4, 3), np.float32))
  with pytest.raises(TypeError) as ours:
    layer(use_running_average=False).apply(variables, x, mutable=["batch_stats"])
  for part in (str(torch_error.value), f"input dtype {np.dtype(dtype).name}", "x.astype(jnp.float32)", layer.__name__):
    assert part in str(ours.value), (part, str(ours.value))


def test_float16_input_whose_variance_overflows_float16():
  """|x| up to 6e4 in float16: the variance (~1e9) exceeds float16's range but not float32's.
  torch CPU accumulates half input in float32 and so does jaxbn: outputs equal torch's within
  one float16 ulp, running variance (float32) within 5e-7."""
  x = np.random.default_rng(0).uniform(-6e4, 6e4, (64, 3)).astype(np.float16)
  torch_bn = Config().torch_module(2)
  variables = variables_from_torch(torch_bn)
  expected = torch_train_step(torch_bn, x)
  y, updates = train_apply(Config().jax_module(), variables, x)
  assert y.dtype == jnp.float16 and np.all(np.isfinite(np.asarray(y, np.float32)))
  np.testing.assert_allclose(np.asarray(y, np.float32), expected.astype(np.float32), atol=0, rtol=2**-10)
  assert float(updates["batch_stats"]["var"].min()) > 1e8
  assert_stats(updates["batch_stats"], variables_from_torch(torch_bn)["batch_stats"])


def test_variance_beyond_float32_range_is_the_documented_difference():
  """std ~1e30 in float32: the variance 1e60 exceeds float32. torch's running_var becomes inf as
  well (it stores float32), so both buffers are inf; torch's training output stays finite
  (float64 accumulation) where jaxbn's is ``bias`` (``(x - mean) * 0``): the one documented
  difference, and ``jaxbn inspect`` flags the inf."""
  x = (random_batch(np.random.default_rng(0), (4, 3), np.float32) * 1e30).astype(np.float32)
  config = Config(momentum=0.3)
  torch_bn = config.torch_module(2)
  variables = variables_from_torch(torch_bn)
  expected = torch_train_step(torch_bn, x)
  y, updates = train_apply(config.jax_module(), variables, x)
  assert np.all(np.isinf(torch_bn.running_var.numpy())) and np.all(np.isinf(updates["batch_stats"]["var"]))
  assert np.all(np.isfinite(expected))
  np.testing.assert_array_equal(y, np.broadcast_to(variables["params"]["bias"], y.shape))


@st.composite
def edge_cases(draw):
  rank = draw(st.sampled_from([2, 4]))
  shape = (draw(st.integers(0, 4)), 3) + (draw(st.integers(1, 2)),) * (rank - 2)
  valid = draw(st.integers(0, shape[0]))
  data = draw(st.sampled_from(["normal", "constant", "subnormal", "nan", "inf"]))
  exponent = draw(st.integers(-30, 18))  # beyond 1e18 the variance leaves float32's range
  momentum = draw(st.sampled_from([0.1, 1.0, None]))
  eval_eps = draw(st.sampled_from([1e-5, 0.0]))
  return rank, shape, valid, data, exponent, momentum, eval_eps, draw(st.integers(0, 2**16))


def make_batch(rng, shape, data, exponent):
  x = random_batch(rng, shape, np.float64) * 10.0**exponent
  if data == "constant":  # one value per channel: batch variance 0
    x[...] = rng.standard_normal((1, shape[1]) + (1,) * (len(shape) - 2)) * 10.0**exponent
  elif data == "subnormal":
    x = random_batch(rng, shape, np.float64) * 1e-40
  elif data in ("nan", "inf") and x.size:
    x.reshape(-1)[rng.integers(x.size)] = np.nan if data == "nan" else np.inf
  return x.astype(np.float32)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(edge_cases())
def test_edge_batches_match_torch(case):
  """Random edge batches under a mask (the padded rows NaN), against torch on the valid rows:
  empty batches, counts of 1 and 2, all-equal channels, magnitudes 1e-30 to 1e18, subnormals,
  NaN and inf. One training step, then eval (eps possibly 0, running variance possibly 0)."""
  rank, shape, valid, data, exponent, momentum, eval_eps, seed = case
  rng = np.random.default_rng(seed)
  config = Config(momentum=momentum)
  torch_bn = trained_torch(config, rank, seed)
  variables = variables_from_torch(torch_bn)
  x = make_batch(rng, shape, data, exponent)
  padded = np.concatenate([x, np.full((2,) + shape[1:], np.nan, np.float32)])
  mask = (np.arange(shape[0] + 2) < valid).reshape((-1,) + (1,) * (rank - 1))

  expected = torch_train_step(torch_bn, x[:valid])
  y, updates = train_apply(config.jax_module(), variables, padded, mask)
  if expected is not None:
    assert_outputs(y[:valid], expected, x[:valid], torch_bn, train=True)
  assert_stats(
      updates["batch_stats"], variables_from_torch(torch_bn)["batch_stats"], exact=valid * int(np.prod(shape[2:])) < 2
  )

  torch_bn.eval()
  torch_bn.eps = eval_eps
  x_eval = make_batch(rng, (3,) + shape[1:], "normal", 0)
  with torch.no_grad():
    expected = to_numpy(torch_bn(torch.from_numpy(x_eval)))
  eval_module = jaxbn.BatchNorm(axis=1, epsilon=eval_eps, use_running_average=True)
  y = eval_module.apply({**variables, **updates}, x_eval)
  assert_outputs(y, expected, x_eval, torch_bn, train=False)
