"""jaxbn.fold_batchnorm: the folded model computes what the unfolded one computes in eval.

Tolerance: logits within 2e-5 of the largest |logit| (float32: folding reorders
``(conv(x) - mean) * s`` into ``conv(x, W * s)``; measured 4e-7 on resnet18). Also against torch.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import torchvision

import jaxbn

RTOL = 2e-5


def trained_resnet18():
  torch.manual_seed(0)
  torch_model = torchvision.models.resnet18(num_classes=10)
  torch_model.train()
  with torch.no_grad():
    for _ in range(3):
      torch_model(torch.randn(4, 3, 32, 32) * 2 + 0.5)
  return torch_model.eval()


def close(actual, expected):
  return np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected))


@pytest.mark.parametrize("norm", [jaxbn.BatchNorm, jaxbn.FrozenBatchNorm], ids=lambda n: n.__name__)
def test_folded_resnet18_matches_unfolded_and_torch(norm):
  torch_model = trained_resnet18()
  x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
  model = jaxbn.models.resnet18(num_classes=10, norm=norm)
  template = jax.eval_shape(model.init, jax.random.key(0), np.moveaxis(x, 1, -1))
  variables = jaxbn.convert.from_torch({k: v.numpy() for k, v in torch_model.state_dict().items()}, template).variables
  folded = jaxbn.fold_batchnorm(variables)
  assert "batch_stats" not in folded
  assert set(folded["params"]["layer1"]["0"]["bn1"]) == {"bias"}
  folded_model = jaxbn.models.resnet18(num_classes=10, norm=jaxbn.FoldedBatchNorm)
  expected = model.apply(variables, np.moveaxis(x, 1, -1))
  assert close(folded_model.apply(folded, np.moveaxis(x, 1, -1)), np.asarray(expected)) <= RTOL
  assert (
      close(folded_model.apply(folded, np.moveaxis(x, 1, -1)), torch_model(torch.from_numpy(x)).detach().numpy())
      <= RTOL
  )


class DenseNet(nn.Module):
  norm: type = jaxbn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(5, name="dense")(x)  # with a bias of its own
    return self.norm(use_running_average=not train, name="norm")(x)


def test_dense_with_bias_and_explicit_producer():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((6, 4)).astype(np.float32)
  variables = DenseNet().init(jax.random.key(0), x)
  _, updates = DenseNet().apply(variables, x * 3 + 1, train=True, mutable=["batch_stats"])
  variables = {**variables, **updates}
  folded = jaxbn.fold_batchnorm(variables, producers={"norm": "dense"})
  expected = DenseNet().apply(variables, x)
  assert close(DenseNet(norm=jaxbn.FoldedBatchNorm).apply(folded, x), np.asarray(expected)) <= RTOL
  with pytest.raises(ValueError, match="no preceding kernel found for norm.*producers="):
    jaxbn.fold_batchnorm(variables)
