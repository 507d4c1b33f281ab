"""Half-precision input with float32 parameters and statistics: torch's mixed-precision rule.

Statistics in float32, running statistics stay float32, the output (and input gradient) has the
INPUT's dtype. (flax.linen.BatchNorm returns float32 here unless ``dtype`` is set.)
Tolerances: outputs and input gradients within one unit in the last place of the half dtype;
running statistics 5e-7 relative (both compute them in float32 or better from the same values);
scale and bias gradients (float32 sums over n = 105 terms of half-rounded values) 2e-6 * sqrt(n).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxbn
from parity_tests.test_batch_norm_parity import assert_stats_close
from parity_tests.torch_reference import APIS, Config, jax_step, random_batch, torch_step, variables_from_torch

HALF = [np.float16, jnp.bfloat16]


def ulp(values: np.ndarray, dtype) -> np.ndarray:
  """One unit in the last place of each value, in ``dtype``."""
  info = ml_dtypes.finfo(dtype)
  exponent = np.floor(np.log2(np.maximum(np.abs(values.astype(np.float64)), float(info.smallest_normal))))
  return np.exp2(exponent) * float(info.eps)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
def test_half_input_float32_module(dtype, channels_last, api):
  config = Config(dtype=np.float32, channels_last=channels_last, api=api)
  rng = np.random.default_rng(0)
  torch_bn = config.torch_module(4)
  variables = variables_from_torch(torch_bn)
  module = config.jax_module()
  steps = {True: jax_step(module, train=True), False: jax_step(module, train=False)}
  for step in range(8):
    train = step < 6
    torch_bn.train(train)
    x = random_batch(rng, (3, 3, 5, 7), dtype)
    cotangent = rng.standard_normal(x.shape).astype(dtype)
    expected = torch_step(torch_bn, x, cotangent)
    y, batch_stats, dx, dparams = steps[train](variables, config.to_layout(x), config.to_layout(cotangent))
    y, dx = config.from_layout(np.asarray(y)), config.from_layout(np.asarray(dx))
    assert y.dtype == dx.dtype == np.dtype(dtype)
    for what, actual, reference in (("output", y, expected.y), ("input gradient", dx, expected.dx)):
      error = np.abs(actual.astype(np.float64) - reference.astype(np.float64))
      assert np.all(error <= ulp(reference, dtype)), f"{what} at step {step}: {error.max()}"
    for name, grad in expected.dparams.items():
      assert dparams[name].dtype == np.float32
      np.testing.assert_allclose(dparams[name], grad, atol=2e-6 * np.sqrt(105), rtol=0)
    if train:
      assert_stats_close(batch_stats, expected.batch_stats, 5e-7, step)
      assert batch_stats["mean"].dtype == batch_stats["var"].dtype == np.float32
      variables = {**variables, "batch_stats": batch_stats}


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
def test_dtype_field_overrides_output_dtype(dtype):
  x = random_batch(np.random.default_rng(1), (4, 3), dtype)
  module = jaxbn.BatchNorm(use_running_average=False, dtype=jnp.float32)
  y, _ = module.apply(module.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  assert y.dtype == jnp.float32
  flax_bn = nn.BatchNorm(use_running_average=False)  # the documented difference
  flax_y, _ = flax_bn.apply(flax_bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  assert flax_y.dtype == jnp.float32
  default = jaxbn.BatchNorm(use_running_average=False)
  y_default, _ = default.apply(default.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  assert y_default.dtype == np.dtype(dtype)
