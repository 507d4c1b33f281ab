"""jaxbn.parity: the configuration check and the per-layer report, including that they catch
what they are for."""

from __future__ import annotations

import collections

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

import jaxbn
import jaxbn.parity


def torch_net(eps=1e-5, momentum=0.1):
  torch.manual_seed(0)
  return torch.nn.Sequential(
      collections.OrderedDict(
          conv=torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), bn=torch.nn.BatchNorm2d(4, eps=eps, momentum=momentum)
      )
  )


class Net(nn.Module):
  norm: type = jaxbn.BatchNorm
  eps: float = 1e-5
  momentum: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), padding=1, use_bias=False, name="conv")(x)
    if self.norm is nn.BatchNorm:
      return nn.BatchNorm(use_running_average=not train, name="bn")(x)
    return self.norm(use_running_average=not train, epsilon=self.eps, momentum=self.momentum, name="bn")(x)


X = np.zeros((2, 5, 5, 3), np.float32)


def test_config_check_reports_eps_momentum_and_flax_batchnorm():
  assert jaxbn.parity.compare_config(torch_net(), Net(), X) == []
  mobilenet_style = jaxbn.parity.compare_config(torch_net(eps=1e-3, momentum=0.01), Net(), X)
  assert {(m.field, m.torch, m.flax) for m in mobilenet_style} == {("eps", 1e-3, 1e-5), ("momentum", 0.01, 0.1)}
  (flax_bn,) = jaxbn.parity.compare_config(torch_net(), Net(norm=nn.BatchNorm), X)
  assert flax_bn.field == "class" and "flax.linen.BatchNorm" in flax_bn.flax
  (frozen,) = jaxbn.parity.compare_config(torch_net(), Net(norm=jaxbn.FrozenBatchNorm), X)
  assert (frozen.field, frozen.flax) == ("class", "FrozenBatchNorm")


def test_report_is_small_for_a_faithful_port_and_flags_a_wrong_statistic():
  torch_model = torch_net()
  rng = np.random.default_rng(0)
  batches = [rng.standard_normal((4, 3, 5, 5)).astype(np.float32) for _ in range(3)]
  template = jax.eval_shape(Net().init, jax.random.key(0), X)
  state = {k: v.numpy().copy() for k, v in torch_model.state_dict().items()}
  variables = jaxbn.convert.from_torch(state, template).variables
  report = jaxbn.parity.compare(torch_net(), Net(), variables, batches)
  assert [(r.layer, r.mode, r.step) for r in report] == [("bn", "train", 0), ("bn", "train", 1), ("bn", "eval", 2)]
  assert max(r.max_rel for r in report) < 1e-5 and max(r.var_drift for r in report if r.var_drift is not None) < 1e-6
  assert "bn" in jaxbn.parity.format_table(report)

  wrong = jax.tree.map(np.copy, variables)
  wrong["batch_stats"]["bn"]["var"] = wrong["batch_stats"]["bn"]["var"] * 1.05  # a 5% error
  report = jaxbn.parity.compare(torch_net(), Net(), wrong, batches)
  assert report[0].var_drift > 1e-3 and report[-1].max_rel > 1e-3


def test_resnet_accepts_nchw_input():
  x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
  nhwc = jaxbn.models.resnet18(num_classes=5)
  variables = nhwc.init(jax.random.key(0), np.moveaxis(x, 1, -1))
  nchw = jaxbn.models.resnet18(num_classes=5, input_layout="NCHW")
  np.testing.assert_array_equal(nchw.apply(variables, x), nhwc.apply(variables, np.moveaxis(x, 1, -1)))


@pytest.mark.parametrize("factory, last", [(jaxbn.models.resnet18, "bn2"), (jaxbn.models.resnet50, "bn3")])
def test_zero_init_residual_zeroes_each_blocks_last_norm_scale(factory, last):
  variables = factory(num_classes=3, zero_init_residual=True).init(
      jax.random.key(0), np.ones((1, 32, 32, 3), np.float32)
  )
  block = variables["params"]["layer1"]["0"]
  np.testing.assert_array_equal(block[last]["scale"], 0.0)
  np.testing.assert_array_equal(block["bn1"]["scale"], 1.0)
  np.testing.assert_array_equal(variables["params"]["bn1"]["scale"], 1.0)


def test_jaxbn_parity_comes_with_import_jaxbn_and_compare_takes_the_model_flag():
  """``import jaxbn`` alone gives ``jaxbn.parity`` (the README's spelling); a model whose mode
  flag is not called ``train`` is compared through train_kwargs / eval_kwargs."""
  import subprocess
  import sys

  code = "import jaxbn; print(jaxbn.parity.compare_config.__name__)"
  assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "compare_config"

  class Flagged(nn.Module):

    @nn.compact
    def __call__(self, x, use_running_average: bool):
      x = nn.Conv(4, (3, 3), padding=1, use_bias=False, name="conv")(x)
      return jaxbn.BatchNorm(name="bn")(x, use_running_average=use_running_average)

  rng = np.random.default_rng(0)
  batches = [rng.standard_normal((4, 3, 5, 5)).astype(np.float32) for _ in range(3)]
  template = jax.eval_shape(lambda x: Flagged().init(jax.random.key(0), x, use_running_average=True), X)
  state = {k: v.numpy().copy() for k, v in torch_net().state_dict().items()}
  variables = jaxbn.convert.from_torch(state, template).variables
  report = jaxbn.parity.compare(
      torch_net(),
      Flagged(),
      variables,
      batches,
      train_kwargs={"use_running_average": False},
      eval_kwargs={"use_running_average": True},
  )
  assert [(r.mode, r.step) for r in report] == [("train", 0), ("train", 1), ("eval", 2)]
  assert max(r.max_rel for r in report) < 1e-5
