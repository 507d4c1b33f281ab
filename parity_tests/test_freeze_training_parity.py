"""A small conv net trained 20 steps in torch (SGD, momentum 0.9, weight decay) with its
backbone's BatchNorm frozen three ways, against the jaxbn equivalent of each:

  torch                                               jaxbn
  FrozenBatchNorm2d in the backbone                   FrozenBatchNorm + keep_frozen(frozen_mask)
  bn.eval() after model.train(), requires_grad False  eval_mode('backbone') + frozen_mask(batchnorm_affine)
  momentum=0 + requires_grad False, left in train()   BatchNorm(momentum=0) + frozen_mask(batchnorm_affine)
                                                      (the trap: batch statistics still normalise)

and the same in NNX (``api="nnx"``), an nnx.jit step with nnx.Optimizer:
  FrozenBatchNorm2d                                   jaxbn.nnx.FrozenBatchNorm, wrt=nnx.Param
  bn.eval() + requires_grad False                     jaxbn.nnx.keep_eval(model, 'backbone') (survives
                                                      model.train()) + wrt=trainable(batchnorm_affine)
  momentum=0 + requires_grad False                    jaxbn.nnx.BatchNorm(momentum=0) + the same wrt

After every step: logits, every parameter, running statistics and counters.
Tolerances: logits 4e-6 absolute, parameters 1e-5 absolute, running statistics 4e-6 relative.
Measured worst over the 20 steps: logits 1.3e-6, parameters 4.1e-6, head running mean 1.1e-6 (the
two frameworks' float32 rounding of the gradients accumulates in SGD's momentum, so it grows about
linearly with steps, and the trainable BatchNorm's statistics see the drifting parameters).
Frozen arrays are compared bit for bit.
"""

from __future__ import annotations

import collections

import flax.linen as nn
import numpy as np
import optax
import pytest
import torch
from flax import nnx, traverse_util
from torchvision.ops import FrozenBatchNorm2d

import jaxbn
from parity_tests.torch_reference import classification_train_step, variables_from_torch

LR, MOMENTUM, WEIGHT_DECAY, STEPS = 0.05, 0.9, 1e-3, 20
LOGITS_ATOL, PARAMS_ATOL, STATS_RTOL = 4e-6, 1e-5, 4e-6


def torch_net(norm):
  torch.manual_seed(0)
  backbone = torch.nn.Sequential(
      collections.OrderedDict(
          conv0=torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
          bn0=norm(8),
          relu0=torch.nn.ReLU(),
          conv1=torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
          bn1=norm(8),
          relu1=torch.nn.ReLU(),
      )
  )
  net = torch.nn.Sequential(
      collections.OrderedDict(
          backbone=backbone,
          norm=torch.nn.BatchNorm2d(8),  # the trainable part keeps a training BatchNorm
          pool=torch.nn.AdaptiveAvgPool2d(1),
          flatten=torch.nn.Flatten(),
          head=torch.nn.Linear(8, 4),
      )
  )
  with torch.no_grad():  # non-trivial statistics and affine in the frozen layers
    for module in backbone.modules():
      if isinstance(module, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
  return net


class Backbone(nn.Module):
  norm: type
  momentum: float | None

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(2):
      x = nn.Conv(8, (3, 3), padding=1, use_bias=False, name=f"conv{i}")(x)
      x = self.norm(use_running_average=not train, momentum=self.momentum, name=f"bn{i}")(x)
      x = nn.relu(x)
    return x


class Net(nn.Module):
  """The model takes its backbone's norm class as an argument (torchvision's norm_layer idiom)."""

  backbone_norm: type = jaxbn.BatchNorm
  backbone_momentum: float | None = 0.1

  @nn.compact
  def __call__(self, x, train: bool):
    x = Backbone(self.backbone_norm, self.backbone_momentum, name="backbone")(x, train)
    x = jaxbn.BatchNorm(use_running_average=not train, name="norm")(x).mean(axis=(1, 2))
    return nn.Dense(4, name="head")(x)


class NNXBackbone(nnx.Module):

  def __init__(self, norm, momentum, rngs):
    self.conv0 = nnx.Conv(3, 8, (3, 3), padding=1, use_bias=False, rngs=rngs)
    self.bn0 = norm(8, momentum=momentum, rngs=rngs)
    self.conv1 = nnx.Conv(8, 8, (3, 3), padding=1, use_bias=False, rngs=rngs)
    self.bn1 = norm(8, momentum=momentum, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn1(self.conv1(nnx.relu(self.bn0(self.conv0(x))))))


class NNXNet(nnx.Module):

  def __init__(self, backbone_norm, backbone_momentum, rngs):
    self.backbone = NNXBackbone(backbone_norm, backbone_momentum, rngs)
    self.norm = jaxbn.nnx.BatchNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(self.norm(self.backbone(x)).mean(axis=(1, 2)))


NNX_NORMS = {"frozen": jaxbn.nnx.FrozenBatchNorm, "eval": jaxbn.nnx.BatchNorm, "momentum0": jaxbn.nnx.BatchNorm}


def nnx_trainer(how, net):
  """The NNX model converted from ``net`` and a jitted step ``(model, optimizer, x, labels) ->
  logits`` that updates both in place."""
  norm = NNX_NORMS[how]
  model = NNXNet(norm, JAX_SETUPS[how][1], nnx.Rngs(0))
  jaxbn.convert.from_torch(net.state_dict(), model)
  wrt = nnx.Param
  if how == "eval":
    jaxbn.nnx.keep_eval(model, "backbone")
  if how in ("eval", "momentum0"):
    wrt = jaxbn.nnx.trainable(model, batchnorm_affine=["backbone"])
  tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)

  @nnx.jit
  def step(model, optimizer, x, labels):
    def loss(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    grads, logits = nnx.grad(loss, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
    optimizer.update(model, grads)
    return logits

  return model, optimizer, step


def variables_from_torch_net(net) -> dict:
  """Test plumbing (the converter proper is jaxbn's conversion feature): conv OIHW -> HWIO,
  linear (out, in) -> (in, out), BatchNorm via variables_from_torch, FrozenBatchNorm2d -> params."""
  flat = {}
  for name, module in net.named_modules():
    path = tuple(name.split(".")) if name else ()
    if isinstance(module, torch.nn.Conv2d):
      flat[("params", *path, "kernel")] = module.weight.detach().permute(2, 3, 1, 0).numpy().copy()
    elif isinstance(module, torch.nn.Linear):
      flat[("params", *path, "kernel")] = module.weight.detach().T.numpy().copy()
      flat[("params", *path, "bias")] = module.bias.detach().numpy().copy()
    elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
      for collection, values in variables_from_torch(module).items():
        flat.update({(collection, *path, k): v for k, v in values.items()})
    elif isinstance(module, FrozenBatchNorm2d):
      for torch_name, flax_name in [
          ("weight", "scale"),
          ("bias", "bias"),
          ("running_mean", "mean"),
          ("running_var", "var"),
      ]:
        flat[("params", *path, flax_name)] = getattr(module, torch_name).numpy().copy()
  return traverse_util.unflatten_dict(flat)


def freeze_torch(net, how):
  """Applies torch's idiom after net.train(); returns the parameters the optimiser gets."""
  net.train()
  if how in ("eval", "momentum0"):
    for module in net.backbone.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.requires_grad_(False)
        module.bias.requires_grad_(False)
        if how == "eval":
          module.eval()  # the set_bn_eval idiom, re-applied after every .train()
  return [p for p in net.parameters() if p.requires_grad]


JAX_SETUPS = {
    # how: (backbone norm class, momentum, eval_mode prefixes, frozen_mask arguments)
    "frozen": (jaxbn.FrozenBatchNorm, 0.1, (), {}),
    "eval": (jaxbn.BatchNorm, 0.1, ("backbone",), {"batchnorm_affine": ["backbone"]}),
    "momentum0": (jaxbn.BatchNorm, 0.0, (), {"batchnorm_affine": ["backbone"]}),
}
TORCH_NORMS = {
    "frozen": FrozenBatchNorm2d,
    "eval": torch.nn.BatchNorm2d,
    "momentum0": lambda c: torch.nn.BatchNorm2d(c, momentum=0.0),
}


def torch_step(net, optimizer, x, labels) -> np.ndarray:
  logits = net(torch.from_numpy(x))
  optimizer.zero_grad()
  torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
  optimizer.step()
  return logits.detach().numpy()


def assert_tree_close(actual, expected, what, step):
  flat_actual = traverse_util.flatten_dict(actual)
  flat_expected = traverse_util.flatten_dict(expected)
  assert flat_actual.keys() == flat_expected.keys(), what
  for path, value in flat_expected.items():
    got = np.asarray(flat_actual[path])
    if path[-1] == "num_batches_tracked":
      assert int(got) == int(value), (what, path, step)
    elif path[-1] in ("mean", "var") and what == "batch_stats":
      error = np.max(np.abs(got - value) / np.maximum(np.abs(value), 1.0))
      assert error <= STATS_RTOL, f"{what} {'/'.join(path)} step {step}: {error:.3g}"
    else:
      error = np.max(np.abs(got - value))
      assert error <= PARAMS_ATOL, f"{what} {'/'.join(path)} step {step}: {error:.3g}"


@pytest.mark.parametrize("how", ["frozen", "eval", "momentum0"])
def test_frozen_backbone_training_matches_torch_nnx(how):
  net = torch_net(TORCH_NORMS[how])
  torch_opt = torch.optim.SGD(freeze_torch(net, how), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  model, optimizer, step = nnx_trainer(how, net)
  frozen_at_start = {k: jaxbn.nnx.to_variables(model)["params"]["backbone"][k] for k in ("bn0", "bn1")}
  rng = np.random.default_rng(0)
  for i in range(STEPS):
    x = rng.standard_normal((6, 3, 5, 5)).astype(np.float32)
    labels = rng.integers(0, 4, 6)
    logits_torch = torch_step(net, torch_opt, x, labels)
    model.train()  # as torch's loop would: keep_eval must survive it
    logits = step(model, optimizer, np.moveaxis(x, 1, -1), labels)
    np.testing.assert_allclose(logits, logits_torch, atol=LOGITS_ATOL, rtol=0)
    expected, ours = variables_from_torch_net(net), jaxbn.nnx.to_variables(model)
    assert_tree_close(ours["params"], expected["params"], "params", i)
    assert_tree_close(ours["batch_stats"], expected["batch_stats"], "batch_stats", i)
  params = jaxbn.nnx.to_variables(model)["params"]
  for layer, arrays in frozen_at_start.items():  # frozen arrays: bit-identical after 20 steps
    for name, value in arrays.items():
      np.testing.assert_array_equal(params["backbone"][layer][name], value)
  if how == "momentum0":
    assert int(model.backbone.bn0.num_batches_tracked[...]) == STEPS


@pytest.mark.parametrize("how", ["frozen", "eval", "momentum0"])
def test_frozen_backbone_training_matches_torch(how):
  net = torch_net(TORCH_NORMS[how])
  torch_opt = torch.optim.SGD(freeze_torch(net, how), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  variables = variables_from_torch_net(net)
  norm, momentum, eval_prefixes, mask_args = JAX_SETUPS[how]
  model = Net(backbone_norm=norm, backbone_momentum=momentum)
  params, batch_stats = variables["params"], variables["batch_stats"]
  frozen_at_start = {k: params["backbone"][k] for k in ("bn0", "bn1")}
  # torch's weight_decay adds wd * p to the gradient before momentum: optax's order is the same.
  tx = jaxbn.keep_frozen(
      optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM)),
      jaxbn.frozen_mask(variables, **mask_args),
  )
  opt_state = tx.init(params)

  step = classification_train_step(model, tx, eval_prefixes)

  rng = np.random.default_rng(0)
  for i in range(STEPS):
    x = rng.standard_normal((6, 3, 5, 5)).astype(np.float32)
    labels = rng.integers(0, 4, 6)
    logits_torch = torch_step(net, torch_opt, x, labels)
    params, batch_stats, opt_state, logits, _ = step(params, batch_stats, opt_state, np.moveaxis(x, 1, -1), labels)
    np.testing.assert_allclose(logits, logits_torch, atol=LOGITS_ATOL, rtol=0)
    expected = variables_from_torch_net(net)
    assert_tree_close(params, expected["params"], "params", i)
    assert_tree_close(batch_stats, expected["batch_stats"], "batch_stats", i)

  for layer, arrays in frozen_at_start.items():  # frozen arrays: bit-identical after 20 steps
    for name, value in arrays.items():
      np.testing.assert_array_equal(params["backbone"][layer][name], value)
  if how == "momentum0":  # the trap: statistics frozen, yet every step counted a batch
    assert int(batch_stats["backbone"]["bn0"]["num_batches_tracked"]) == STEPS
