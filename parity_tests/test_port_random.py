"""torch's random-number functions in a ported forward (``torch.rand`` / ``randn`` / ``rand_like``
/ ``randn_like`` / ``bernoulli`` / ``Tensor.bernoulli_``), as hand-written stochastic depth and
drop-connect use them: drawn from the port's rng stream (``rngs={"dropout": key}``), with torch's
shapes, dtypes and distributions; torch's values cannot be reproduced, so the distributions and
the semantics are what is tested. Eval forwards that draw nothing are torch's exactly.
"""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxbn


class Draws(torch.nn.Module):
  """Every random function the port supports, returned as drawn."""

  def forward(self, x):
    n = x.shape[0]
    return {
        "floor_mask": torch.floor(0.7 + torch.rand(n, 1, dtype=x.dtype, device=x.device)),
        "randn": torch.randn((n, 3)),
        "rand_like": torch.rand_like(x),
        "randn_like": torch.randn_like(x),
        "bernoulli": torch.bernoulli(x * 0 + 0.25),
        "bernoulli_": x.clone().bernoulli_(0.5),
    }


N = 4000  # draws per statistic: a proportion's standard deviation is at most 0.008


def test_random_functions_draw_torchs_distributions_from_the_ports_stream():
  x = np.zeros((N, 2), np.float32)
  module, variables = jaxbn.port(Draws(), x)
  draw = jax.jit(lambda key: module.apply(variables, x, train=True, rngs={"dropout": key}))
  out = {k: np.asarray(v) for k, v in draw(jax.random.key(0)).items()}
  assert set(np.unique(out["floor_mask"])) == {0.0, 1.0} and out["floor_mask"].shape == (N, 1)
  assert abs(out["floor_mask"].mean() - 0.7) < 0.04  # 5 standard deviations
  assert out["randn"].shape == (N, 3) and abs(out["randn"].mean()) < 0.05 and abs(out["randn"].std() - 1) < 0.05
  assert out["rand_like"].dtype == np.float32 and 0 <= out["rand_like"].min() and out["rand_like"].max() < 1
  assert abs(out["rand_like"].mean() - 0.5) < 0.03 and abs(out["randn_like"].std() - 1) < 0.05
  assert abs(out["bernoulli"].mean() - 0.25) < 0.04 and set(np.unique(out["bernoulli"])) == {0.0, 1.0}
  assert abs(out["bernoulli_"].mean() - 0.5) < 0.04
  again, other = draw(jax.random.key(0)), draw(jax.random.key(1))
  assert all(np.array_equal(out[k], again[k]) for k in out)  # the key decides: reproducible
  assert not np.array_equal(out["randn"], other["randn"])
  with pytest.raises(ValueError, match=r"rngs=\{'dropout': key\}"):
    module.apply(variables, x, train=True)


class DropConnect(torch.nn.Module):
  """EfficientNet-PyTorch's drop_connect, hand-written, in training only."""

  def __init__(self, p=0.3):
    super().__init__()
    self.p = p
    self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    self.bn = torch.nn.BatchNorm2d(4)

  def forward(self, x):
    y = F.relu(self.bn(self.conv(x)))
    if self.training:
      keep = 1 - self.p
      random_tensor = keep + torch.rand([y.shape[0], 1, 1, 1], dtype=y.dtype, device=y.device)
      y = y / keep * torch.floor(random_tensor)
    return y


def load_emitted(model, x, directory):
  path = jaxbn.emit(model, x, directory)
  spec = importlib.util.spec_from_file_location("emitted_drop_connect", path)
  source = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(source)
  return source.load()


@pytest.mark.parametrize("via", ["port", "emit"])
def test_hand_written_drop_connect_trains_as_torch_and_leaves_eval_alone(via, tmp_path):
  """Each sample is dropped whole or kept and scaled by 1 / keep, about p of them dropped; eval
  (no draws) is torch's within float32 rounding."""
  torch.manual_seed(0)
  model = DropConnect().double()
  x = np.random.default_rng(0).standard_normal((1000, 3, 4, 4))
  with jax.enable_x64(True):
    module, variables = jaxbn.port(model, x) if via == "port" else load_emitted(model, x, tmp_path / "net")
    model.eval()
    with torch.no_grad():
      expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(module.apply(variables, x), expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    model.train()
    model.p = 0.0  # torch's training forward without dropping: floor(1 + rand) is 1
    with torch.no_grad():
      undropped = model(torch.from_numpy(x)).numpy().reshape(1000, -1)
    out, _ = module.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
  out = np.asarray(out).reshape(1000, -1)
  dropped = np.all(out == 0, axis=1)
  scale = np.abs(undropped).max()  # float64: within 1e-12 of the largest output
  np.testing.assert_allclose(out[~dropped], undropped[~dropped] / 0.7, rtol=0, atol=1e-12 * scale)
  assert abs(dropped.mean() - 0.3) < 0.07  # 1000 samples: 5 standard deviations


def test_a_torch_generator_is_refused_by_name():
  from jaxbn._src.port.ops import OPS, Context

  with pytest.raises(ValueError, match="torch.Generator cannot drive JAX's random numbers"):
    OPS[torch.rand].fn(Context(True, lambda: jax.random.key(0)), 2, 3, generator=torch.Generator())


def test_native_nnx_port_draws_from_its_rngs():
  from flax import nnx

  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((1000, 3, 4, 4)).astype(np.float32)
  model = jaxbn.port(DropConnect(), x, api="nnx", rngs=nnx.Rngs(0, dropout=1)).module
  assert type(model).__name__ == "DropConnect"  # the native classes, not the bridge
  model.train()
  first, second = (np.asarray(model(x)).reshape(1000, -1) for _ in range(2))
  dropped = np.all(first == 0, axis=1)
  assert abs(dropped.mean() - 0.3) < 0.07  # 5 standard deviations
  assert not np.array_equal(dropped, np.all(second == 0, axis=1))  # the stream moves on


class AttentionDropout(torch.nn.Module):
  """nn.MultiheadAttention with attention dropout, returning its per-head weights."""

  def __init__(self):
    super().__init__()
    self.attn = torch.nn.MultiheadAttention(4, 2, dropout=0.4, batch_first=True)

  def forward(self, x):
    return self.attn(x, x, x, average_attn_weights=False)[1]


def test_attention_dropout_drops_weights_as_torch_in_training_only():
  """In training each attention weight is 0 or its eval value / (1 - p), as torch's (dropout on
  the softmax, before the values); the share dropped is p within 5 standard deviations; eval
  draws nothing and is torch's to float32 rounding (1e-6)."""
  torch.manual_seed(0)
  model = AttentionDropout()
  x = np.random.default_rng(0).standard_normal((50, 20, 4)).astype(np.float32)
  module, variables = jaxbn.port(model, x)
  kept = np.asarray(module.apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)}))
  plain = np.asarray(module.apply(variables, x, train=False))
  with torch.no_grad():
    expected = model.eval()(torch.from_numpy(x)).numpy()
  assert np.max(np.abs(plain - expected)) <= 1e-6 * np.max(np.abs(expected))
  dropped = kept == 0
  assert np.allclose(kept[~dropped], plain[~dropped] / 0.6, rtol=1e-6, atol=0)
  assert abs(dropped.mean() - 0.4) < 5 * np.sqrt(0.4 * 0.6 / dropped.size)
