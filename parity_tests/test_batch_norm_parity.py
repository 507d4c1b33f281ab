"""jaxbn.BatchNorm (Linen) and jaxbn.nnx.BatchNorm against real torch.nn.BatchNorm{1,2,3}d,
checked after every step. Every test runs both APIs (``api``) with the same tolerances.

Each run: >= 20 training steps on different batches (different sizes too), then eval steps.
After every step: outputs, gradients w.r.t. input, scale and bias under a random cotangent,
running_mean, running_var, num_batches_tracked.

Tolerances (absolute, on unit-scale data; running statistics relative to max(|value|, 1)):
  float32: outputs and gradients 2e-6, running statistics 5e-7.
  float64: outputs and gradients 2e-14, running statistics 4e-15.
torch's CPU kernel accumulates float32 statistics in float64 and computes ``x * a + b`` with
``a = scale / sqrt(var + eps)``; jaxbn accumulates in float32 around a shift and computes
``(x - mean) * a + bias``: a few float32 ulps apart. torch's form rounds at the magnitude of
``x * a``, so where a channel's gain ``|a|`` exceeds 1 (a batch variance near eps, which n = 2
batches hit) that channel's output and parameter-gradient tolerances are multiplied by ``|a|``, and
its input-gradient tolerance by ``|a|**2`` (dx is ``a`` times terms in x-hat, itself off by ~``|a|``
ulps). Such channels are rare; everywhere else the plain bounds hold. Gradients w.r.t. scale and
bias are sums of n unit-scale terms per channel, so their tolerance is multiplied by sqrt(n).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from parity_tests.torch_reference import APIS, Config, jax_step, random_batch, torch_step, variables_from_torch

TOLERANCE = {
    np.dtype(np.float32): dict(values=2e-6, stats=5e-7),
    np.dtype(np.float64): dict(values=2e-14, stats=4e-15),
}

# Input shapes in torch's layout, by rank; sizes vary from step to step, spatial sizes are odd.
SHAPES = {
    2: [(8, 3), (5, 3), (2, 3)],
    3: [(4, 3, 7), (3, 3, 5), (2, 3, 1)],
    4: [(4, 3, 5, 7), (3, 3, 3, 3), (2, 3, 1, 1)],
    5: [(2, 3, 3, 5, 3), (3, 3, 1, 3, 1), (2, 3, 1, 1, 1)],
}


def assert_close(actual, expected, atol, what, step):
  """``atol`` may be an array broadcastable to the values (a per-channel tolerance)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f"{what} at step {step}: shape {actual.shape} != {expected.shape}"
  excess = np.abs(actual - expected) / atol
  worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else ()
  assert excess.size == 0 or excess[worst] <= 1, (
      f"{what} at step {step}: error {np.abs(actual - expected)[worst]:.3g} at {worst} exceeds its"
      f" tolerance {np.broadcast_to(atol, excess.shape)[worst]:.3g}"
  )


def channel_gain(torch_bn, x, train):
  """|scale| / sqrt(var + eps) per channel, shaped to broadcast over torch-layout ``x``."""
  if train or torch_bn.running_var is None:
    var = np.var(x.astype(np.float64), axis=tuple(i for i in range(x.ndim) if i != 1))
  else:
    var = torch_bn.running_var.double().numpy()
  gain = 1 / np.sqrt(var + torch_bn.eps)
  if torch_bn.weight is not None:
    gain = gain * np.abs(torch_bn.weight.detach().double().numpy())
  return gain.reshape((1, -1) + (1,) * (x.ndim - 2))


def assert_stats_close(jax_stats, torch_stats, rtol, step):
  assert (jax_stats is None) == (torch_stats is None), f"step {step}: tracking differs"
  if torch_stats is None:
    return
  for name in ("mean", "var"):
    scale = np.maximum(np.abs(torch_stats[name]).astype(np.float64), 1.0)
    error = np.max(np.abs(np.asarray(jax_stats[name], np.float64) - torch_stats[name]) / scale)
    assert error <= rtol, f"running {name} at step {step}: relative error {error:.3g} > {rtol:.3g}"
    assert np.asarray(jax_stats[name]).dtype == torch_stats[name].dtype
  assert int(jax_stats["num_batches_tracked"]) == int(torch_stats["num_batches_tracked"]), step


def check_step(torch_bn, jax_step_fn, variables, x, cotangent, config, train, step, values_atol=None, stats_rtol=None):
  """One step in both frameworks on the same batch; asserts parity; returns jaxbn's new variables."""
  tolerance = TOLERANCE[np.dtype(config.dtype)]
  values_atol = values_atol or tolerance["values"]
  stats_rtol = stats_rtol or tolerance["stats"]
  torch_bn.train(train)
  gain = np.maximum(channel_gain(torch_bn, x, train), 1.0)
  atol = values_atol * gain
  expected = torch_step(torch_bn, x, cotangent)
  y, batch_stats, dx, dparams = jax_step_fn(variables, config.to_layout(x), config.to_layout(cotangent))
  assert_close(config.from_layout(y), expected.y, atol, "output", step)
  assert_close(config.from_layout(dx), expected.dx, atol * gain, "input gradient", step)
  per_channel = x.size // x.shape[1]
  for name, grad in expected.dparams.items():
    assert_close(dparams[name], grad, atol.reshape(-1) * np.sqrt(per_channel), f"{name} gradient", step)
  assert_stats_close(batch_stats, expected.batch_stats, stats_rtol, step)
  return variables if batch_stats is None else {**variables, "batch_stats": batch_stats}


def run_parity(
    config: Config, rank: int, train_steps: int = 20, eval_steps: int = 3, seed: int = 0, shapes=None, **tolerances
):
  """Trains both layers on the same batches, then evaluates; asserts parity after every step."""
  shapes = shapes or SHAPES[rank]
  rng = np.random.default_rng(seed)
  torch_bn = config.torch_module(rank)
  variables = variables_from_torch(torch_bn)
  module = config.jax_module()
  steps = {True: jax_step(module, train=True), False: jax_step(module, train=False)}
  for step in range(train_steps + eval_steps):
    train = step < train_steps
    x = random_batch(rng, shapes[step % len(shapes)], config.dtype)
    cotangent = rng.standard_normal(x.shape).astype(config.dtype)
    variables = check_step(torch_bn, steps[train], variables, x, cotangent, config, train, step, **tolerances)


RANK_NAMES = {2: "1d-NC", 3: "1d-NCL", 4: "2d", 5: "3d"}
# (N, C) input has one layout: axis=1 and axis=-1 are the same axis.
LAYOUTS = [
    (rank, channels_last) for rank in (2, 3, 4, 5) for channels_last in (False, True) if rank > 2 or not channels_last
]


api = pytest.mark.parametrize("api", APIS)


@api
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "rank, channels_last",
    LAYOUTS,
    ids=[f"{RANK_NAMES[r]}-{'NHWC' if c else 'NCHW'}" for r, c in LAYOUTS],
)
def test_ranks_layouts_dtypes(rank, channels_last, dtype, api):
  with jax.enable_x64(dtype == np.float64):
    run_parity(Config(dtype=dtype, channels_last=channels_last, api=api), rank)


@api
@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.0, 1.0, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_momentum(momentum, dtype, api):
  with jax.enable_x64(dtype == np.float64):
    run_parity(Config(momentum=momentum, dtype=dtype, channels_last=True, api=api), rank=4)


@api
@pytest.mark.parametrize(
    "options",
    [
        dict(affine=False),
        dict(track_running_stats=False),
        dict(affine=False, track_running_stats=False),
        dict(eps=1e-3),
        dict(eps=0.5, momentum=None, channels_last=True),
    ],
    ids=repr,
)
def test_options(options, api):
  run_parity(Config(**options, api=api), rank=4)


@api
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_two_values_per_channel(dtype, api):
  """n = 2, the smallest batch torch trains on: the Bessel factor n / (n - 1) is 2."""
  with jax.enable_x64(dtype == np.float64):
    run_parity(Config(dtype=dtype, api=api), rank=2, shapes=[(2, 3)])
    run_parity(Config(dtype=dtype, channels_last=True, api=api), rank=4, shapes=[(1, 3, 1, 2), (2, 3, 1, 1)])


@api
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_with_zero_eps(dtype, api):
  """eps = 0 is legal in eval (some torchvision detection weights use it)."""
  with jax.enable_x64(dtype == np.float64):
    rng = np.random.default_rng(1)
    trained = Config(dtype=dtype).torch_module(4)
    for _ in range(3):  # non-trivial running statistics
      trained(torch.from_numpy(random_batch(rng, (4, 3, 5, 5), dtype)))
    config = Config(dtype=dtype, eps=0.0, api=api)
    torch_bn = config.torch_module(4)
    torch_bn.load_state_dict(trained.state_dict())
    x = random_batch(rng, (4, 3, 5, 5), dtype)
    cotangent = rng.standard_normal(x.shape).astype(dtype)
    step = jax_step(config.jax_module(), train=False)
    check_step(torch_bn, step, variables_from_torch(torch_bn), x, cotangent, config, False, 0)
