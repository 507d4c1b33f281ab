"""The BatchNorm traps that make ported models lose accuracy silently, one named test each.

Every expectation comes from running real torch on the same data. Tolerances: float32 outputs
2e-6 absolute, running statistics 5e-7 relative (see test_batch_norm_parity).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from parity_tests.torch_reference import random_batch, to_torch, variables_from_torch

OUTPUT_ATOL = 2e-6
STATS_RTOL = 5e-7


def train_both(torch_bn, module, batches, variables=None):
  """Train-mode steps in both frameworks; returns jaxbn's variables and the last outputs."""
  torch_bn.train()
  variables = variables or variables_from_torch(torch_bn)
  for x in batches:
    expected = torch_bn(to_torch(x)).detach().numpy()
    y, updates = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    variables = {**variables, **updates}
  return variables, np.asarray(y), expected


def assert_stats_match(variables, torch_bn):
  stats = variables["batch_stats"]
  np.testing.assert_allclose(stats["mean"], torch_bn.running_mean.numpy(), rtol=STATS_RTOL, atol=STATS_RTOL)
  np.testing.assert_allclose(stats["var"], torch_bn.running_var.numpy(), rtol=STATS_RTOL, atol=STATS_RTOL)
  assert int(stats["num_batches_tracked"]) == int(torch_bn.num_batches_tracked)


def test_momentum_convention_is_torchs():
  """jaxbn's momentum=0.1 is torch's 0.1; flax needs 0.9 for the same update."""
  rng = np.random.default_rng(0)
  batches = [random_batch(rng, (8, 4, 3, 3), np.float32) for _ in range(5)]
  torch_bn = torch.nn.BatchNorm2d(4, momentum=0.1)
  variables, _, _ = train_both(torch_bn, jaxbn.BatchNorm(axis=1, momentum=0.1), batches)
  assert_stats_match(variables, torch_bn)

  flax_bn = nn.BatchNorm(axis=1, momentum=0.1)  # the mistaken translation: flax keeps 0.1 of the OLD
  flax_vars = flax_bn.init(jax.random.key(0), batches[0], use_running_average=True)
  for x in batches:
    _, updates = flax_bn.apply(flax_vars, x, use_running_average=False, mutable=["batch_stats"])
    flax_vars = {**flax_vars, **updates}
  assert np.max(np.abs(flax_vars["batch_stats"]["mean"] - torch_bn.running_mean.numpy())) > 0.1


def test_flax_style_momentum_warns():
  jaxbn._src.core.checks._warned_momenta.discard(0.9)
  with pytest.warns(jaxbn.MomentumConventionWarning, match="flax's momentum m is jaxbn's 1 - m"):
    jaxbn.BatchNorm(momentum=0.9)


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_momentum_outside_unit_interval_is_an_error(momentum):
  with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\]"):
    jaxbn.BatchNorm(momentum=momentum)


def test_momentum_zero_in_train_mode_still_uses_batch_statistics():
  """torch: momentum=0 freezes the running stats, but train() still normalises with the batch's."""
  rng = np.random.default_rng(1)
  torch_bn = torch.nn.BatchNorm2d(4, momentum=0.0)
  with torch.no_grad():
    torch_bn.running_mean.fill_(3.0)
    torch_bn.running_var.fill_(9.0)
  batches = [random_batch(rng, (8, 4, 3, 3), np.float32) for _ in range(3)]
  variables, y, expected = train_both(torch_bn, jaxbn.BatchNorm(axis=1, momentum=0.0), batches)
  np.testing.assert_allclose(y, expected, atol=OUTPUT_ATOL, rtol=0)
  assert_stats_match(variables, torch_bn)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 3.0)  # never moved
  assert int(variables["batch_stats"]["num_batches_tracked"]) == 3  # but counted
  eval_y = jaxbn.BatchNorm(axis=1, use_running_average=True).apply(variables, batches[-1])
  assert np.max(np.abs(eval_y - y)) > 0.5  # train mode did NOT use the frozen statistics


def test_track_running_stats_false_uses_batch_statistics_in_eval():
  rng = np.random.default_rng(2)
  torch_bn = torch.nn.BatchNorm2d(4, track_running_stats=False).eval()
  module = jaxbn.BatchNorm(axis=1, track_running_stats=False, use_running_average=True)
  x = random_batch(rng, (8, 4, 3, 3), np.float32)
  variables = module.init(jax.random.key(0), x)
  assert "batch_stats" not in variables
  np.testing.assert_allclose(
      module.apply(variables, x), torch_bn(to_torch(x)).detach().numpy(), atol=OUTPUT_ATOL, rtol=0
  )


def test_track_running_stats_switched_off_keeps_existing_buffers_for_eval():
  """torch: setting track_running_stats=False on a trained module keeps its buffers for eval and
  stops updating them in train."""
  rng = np.random.default_rng(3)
  torch_bn = torch.nn.BatchNorm2d(4)
  variables, _, _ = train_both(
      torch_bn, jaxbn.BatchNorm(axis=1), [random_batch(rng, (8, 4, 3, 3), np.float32) for _ in range(3)]
  )
  torch_bn.track_running_stats = False
  untracked = jaxbn.BatchNorm(axis=1, track_running_stats=False)
  trained_stats = jax.tree.map(np.asarray, variables["batch_stats"])
  variables, y, expected = train_both(torch_bn, untracked, [random_batch(rng, (8, 4, 3, 3), np.float32)], variables)
  np.testing.assert_allclose(y, expected, atol=OUTPUT_ATOL, rtol=0)
  jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"], trained_stats)
  torch_bn.eval()
  x = random_batch(rng, (8, 4, 3, 3), np.float32)
  np.testing.assert_allclose(
      untracked.apply(variables, x, use_running_average=True),
      torch_bn(to_torch(x)).detach().numpy(),
      atol=OUTPUT_ATOL,
      rtol=0,
  )


def test_bessel_correction_in_running_variance():
  """Running var takes the UNBIASED batch variance; flax keeps the biased one (0.95% off here)."""
  rng = np.random.default_rng(4)
  x = random_batch(rng, (2, 4, 3, 3), np.float32)  # n = 18 per channel
  torch_bn = torch.nn.BatchNorm2d(4, momentum=1.0)
  jaxbn._src.core.checks._warned_momenta.discard(1.0)  # warned once per process; make it warn here
  with pytest.warns(jaxbn.MomentumConventionWarning):
    module = jaxbn.BatchNorm(axis=1, momentum=1.0)
  variables, _, _ = train_both(torch_bn, module, [x])
  assert_stats_match(variables, torch_bn)
  unbiased = x.astype(np.float64).var(axis=(0, 2, 3), ddof=1)
  np.testing.assert_allclose(variables["batch_stats"]["var"], unbiased, rtol=STATS_RTOL)
  biased = x.astype(np.float64).var(axis=(0, 2, 3))
  assert np.all(np.abs(variables["batch_stats"]["var"] / biased - 18 / 17) < 1e-6)


def test_cumulative_average_when_momentum_is_none():
  """momentum=None: the running mean is the plain average of the batch means seen so far."""
  rng = np.random.default_rng(5)
  batches = [random_batch(rng, (8, 4, 3, 3), np.float32) for _ in range(4)]
  torch_bn = torch.nn.BatchNorm2d(4, momentum=None)
  variables, _, _ = train_both(torch_bn, jaxbn.BatchNorm(axis=1, momentum=None), batches)
  assert_stats_match(variables, torch_bn)
  average = np.mean([b.astype(np.float64).mean(axis=(0, 2, 3)) for b in batches], axis=0)
  np.testing.assert_allclose(variables["batch_stats"]["mean"], average, rtol=STATS_RTOL, atol=STATS_RTOL)


def test_init_does_not_count_a_batch():
  x = np.ones((4, 3), np.float32) * np.arange(4)[:, None]
  variables = jaxbn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)
  assert int(variables["batch_stats"]["num_batches_tracked"]) == 0


def test_training_without_mutable_batch_stats_is_an_error_not_a_silent_no_update():
  """flax.linen.BatchNorm raises here too. Before: batch statistics used, running statistics
  silently never updated, the counter stuck at 0. The opt-out says so explicitly."""
  module = jaxbn.BatchNorm(use_running_average=False)
  x = random_batch(np.random.default_rng(6), (8, 3), np.float32, channel_axis=1)
  variables = module.init(jax.random.key(0), x)
  with pytest.raises(
      ValueError, match=r"""BatchNorm '<root>'.*not mutable.*mutable=\["batch_stats"\].*update_stats=False"""
  ):
    module.apply(variables, x)
  y_mutable, updates = module.apply(variables, x, mutable=["batch_stats"])
  assert int(updates["batch_stats"]["num_batches_tracked"]) == 1
  y = jaxbn.BatchNorm(use_running_average=False, update_stats=False).apply(variables, x)  # batch statistics, no update
  np.testing.assert_array_equal(y, y_mutable)
  _, unchanged = jaxbn.BatchNorm(use_running_average=False, update_stats=False).apply(
      variables, x, mutable=["batch_stats"]
  )
  assert int(unchanged["batch_stats"]["num_batches_tracked"]) == 0
  jaxbn.BatchNorm(use_running_average=False, track_running_stats=False).apply({"params": variables["params"]}, x)


def test_jitted_training_loop_matches_torch():
  """The README's usage: a jitted train step carrying batch_stats, against torch's train()."""
  rng = np.random.default_rng(7)
  module = jaxbn.BatchNorm(axis=-1)
  torch_bn = torch.nn.BatchNorm2d(4)
  variables = variables_from_torch(torch_bn)

  @jax.jit
  def step(variables, x):
    y, updates = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    return y, {**variables, **updates}

  for _ in range(5):
    x = random_batch(rng, (8, 4, 3, 3), np.float32)
    expected = torch_bn(to_torch(x)).detach().numpy()
    y, variables = step(variables, jnp.moveaxis(x, 1, -1))
    np.testing.assert_allclose(np.moveaxis(np.asarray(y), -1, 1), expected, atol=OUTPUT_ATOL, rtol=0)
  assert_stats_match(variables, torch_bn)
