"""jaxbn.port's contract: paths, modes, errors, extension hooks, hashability, the shared tools.

Whole-model parity is in test_port_models.py and each op's in test_port_ops.py. Tolerances here:
float32 outputs of small models within 1e-6 of the largest |output| (measured <= 3e-7).
"""

from __future__ import annotations

import math

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import jaxbn
from jaxbn._src.port.interpreter import Ported

RTOL = 1e-6


def relative(actual, expected) -> float:
  expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
  return float(np.max(np.abs(np.asarray(actual) - expected)) / max(np.max(np.abs(expected)), 1e-30))


class Block(nn.Module):

  def __init__(self):
    super().__init__()
    self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    self.bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.01)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class Small(nn.Module):

  def __init__(self, dropout=0.0):
    super().__init__()
    self.body = nn.Sequential(Block(), nn.Dropout(dropout))
    self.head = nn.Linear(4, 3)

  def forward(self, x):
    return self.head(self.body(x).mean((2, 3)))


def small(dropout=0.0):
  torch.manual_seed(0)
  model = Small(dropout)
  model.train()
  with torch.no_grad():  # running statistics away from their initial values
    for _ in range(3):
      model(torch.randn(4, 3, 8, 8))
  return model


X = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)


def test_paths_are_torch_names_and_batchnorm_config_is_torch():
  module, variables = jaxbn.port(small(), X)
  assert set(jax.tree_util.tree_map(lambda x: 0, variables["params"])["body"]["0"]) == {"conv", "bn"}
  bn = module.batchnorm_layers()["body.0.bn"]
  assert (bn.epsilon, bn.momentum, bn.axis) == (1e-3, 0.01, 1)
  assert jaxbn.parity.compare_config(small(), module, X) == []
  assert int(variables["batch_stats"]["body"]["0"]["bn"]["num_batches_tracked"]) == 3


def test_tracing_leaves_every_module_mode_as_it_was():
  model = small()
  model.train()
  model.body.eval()  # a partly frozen model: restored layer by layer, not from the root's flag
  with pytest.warns(jaxbn.TrainingRecipeWarning, match=r"1 BatchNorm layer\(s\) stay in eval while it trains \(body\)"):
    jaxbn.port(model, X)
  assert model.training and not model.body.training and not model.body[0].bn.training and model.head.training


def test_train_mode_updates_running_statistics_as_torch():
  model = small()
  module, variables = jaxbn.port(model, X)
  y, updates = module.apply(variables, X, train=True, mutable=["batch_stats"])
  model.train()
  expected = model(torch.from_numpy(X))
  assert relative(y, expected) <= RTOL
  ours = jaxbn.convert.to_state_dict({**variables, **updates})
  for key, value in model.state_dict().items():
    if "running" in key:
      assert relative(ours[key], value) <= RTOL, key
  assert int(ours["body.0.bn.num_batches_tracked"]) == 4


def test_unsupported_nodes_are_all_named_with_path_and_line():
  class Odd(nn.Module):

    def __init__(self):
      super().__init__()
      self.gate = nn.Parameter(torch.ones(3))
      self.rnn = nn.GRU(3, 3)

    def forward(self, x):
      x = torch.roll(x, 1, dims=2) * self.gate[:, None, None]
      return torch.fft.fft2(x).real, self.rnn

  class Model(nn.Module):

    def __init__(self):
      super().__init__()
      self.odd = Odd()
      self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
      a, _ = self.odd(self.conv(x))
      return self.odd.rnn(a.flatten(2))[0].cumprod(0)

  with pytest.raises(jaxbn.PortError) as error:
    jaxbn.port(Model(), X[:, :, :2, :2])
  message = str(error.value)
  assert "4 unsupported node(s)" in message  # odd.gate, read directly, is a variable (see below)
  for expected in (
      "function torch.roll  [in odd, test_port.py:",
      "torch.fft.fft2",
      "module torch.nn.GRU  [in odd.rnn",
      "method Tensor.cumprod  [in <top>, test_port.py:",
      "custom_modules=",
      "custom_ops=",
      "leaf_modules=",
  ):
    assert expected in message, expected


def test_extension_hooks_custom_ops_modules_and_leaves():
  class Scale(nn.Module):  # a parameter used in forward, ported here by the user's factory

    def __init__(self, channels):
      super().__init__()
      self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
      return x * self.weight[:, None, None]

  class FlaxScale(fnn.Module):

    @fnn.compact
    def __call__(self, x):
      return x * self.param("scale", fnn.initializers.ones, (x.shape[1],))[:, None, None]

  class Branchy(nn.Module):  # data-dependent control flow the port does not merge (a constant): a leaf

    def forward(self, x):
      return x * (1 if x.sum() > 0 else -1)

  class Model(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv, self.scale, self.branchy, self.bn = nn.Conv2d(3, 3, 1), Scale(3), Branchy(), nn.BatchNorm2d(3)

    def forward(self, x):
      return self.bn(self.branchy(torch.roll(self.scale(self.conv(x)), 1, dims=3)))

  model = Model().eval()
  with pytest.raises(jaxbn.PortError, match=r"(?s)a data-dependent branch.*leaf_modules=\(Branchy,\).*\[in branchy"):
    jaxbn.port(model, X)
  module, variables = jaxbn.port(
      model,
      X,
      leaf_modules=(Branchy,),
      custom_modules={Scale: lambda m: FlaxScale(), Branchy: lambda m: lambda x: jnp.where(jnp.sum(x) > 0, x, -x)},
      custom_ops={torch.roll: lambda x, shifts, dims: jnp.roll(x, shifts, dims)},
  )
  np.testing.assert_array_equal(variables["params"]["scale"]["scale"], model.scale.weight.detach().numpy())
  assert relative(module.apply(variables, X), model(torch.from_numpy(X))) <= RTOL


def test_module_is_hashable_for_jit_remat_and_static_arguments():
  module, variables = jaxbn.port(small(), X)
  again, _ = jaxbn.port(small(), X)
  assert hash(module) == hash(again) and module == again
  apply = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
  expected = module.apply(variables, X)
  np.testing.assert_allclose(apply(module, variables, X), expected, rtol=1e-6)
  apply(again, variables, X)
  assert apply._cache_size() == 1  # the equal module hits the same compilation
  fields = dict(train_program=module.train_program, eval_program=module.eval_program, leaves=module.leaves)
  for transform in (fnn.remat, fnn.jit):
    np.testing.assert_allclose(transform(Ported)(**fields).apply(variables, X), expected, rtol=1e-6)


def test_outputs_keep_torch_structure_under_jit():
  model = torchvision.models.googlenet(num_classes=5, aux_logits=True, init_weights=True)
  module, variables = jaxbn.port(model, np.zeros((2, 3, 64, 64), np.float32))
  train = jax.jit(
      lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
  )
  outputs, _ = train(variables, np.ones((2, 3, 64, 64), np.float32))
  assert type(outputs).__name__ == "GoogLeNetOutputs" and outputs.aux_logits1.shape == (2, 5)
  assert jax.jit(module.apply)(variables, np.ones((2, 3, 64, 64), np.float32)).shape == (2, 5)


def test_dropout_is_torch_dropout_in_train_and_identity_in_eval():
  model = small(dropout=0.5)
  module, variables = jaxbn.port(model, X)
  with pytest.raises(ValueError, match=r"rngs=\{'dropout': key\}"):
    module.apply(variables, X, train=True, mutable=["batch_stats"])
  assert relative(module.apply(variables, X), model.eval()(torch.from_numpy(X))) <= RTOL
  from jaxbn._src.port.ops import OPS, Context

  x = jnp.ones((200, 100))
  dropped = OPS[F.dropout].fn(Context(True, lambda: jax.random.key(1)), x, p=0.25, training=True)
  np.testing.assert_allclose(np.unique(np.asarray(dropped)), [0.0, 1 / 0.75], rtol=1e-6)
  assert abs(float(jnp.mean(dropped == 0)) - 0.25) < 0.01  # 20000 draws: 4 standard deviations


@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_channel_dropout_drops_whole_channels_as_torch(spatial):
  from jaxbn._src.port.ops import OPS, Context

  function = getattr(F, f"dropout{spatial}d")
  x = jnp.ones((100, 40) + (3,) * spatial)
  dropped = np.asarray(OPS[function].fn(Context(True, lambda: jax.random.key(3)), x, p=0.25, training=True))
  per_channel = dropped.reshape(100, 40, -1)
  assert np.all(per_channel == per_channel[..., :1])  # one draw per (sample, channel)
  np.testing.assert_allclose(np.unique(per_channel), [0.0, 1 / 0.75], rtol=1e-6)  # survivors scaled, as torch
  assert abs(float(np.mean(per_channel[..., 0] == 0)) - 0.25) < 0.03  # 4000 draws: 4 standard deviations
  for off in (Context(False, None), Context(True, None)):  # eval, or the module in eval (training=False)
    assert OPS[function].fn(off, x, p=0.25, training=off.train is False) is x
  torch_dropped = function(torch.ones(tuple(x.shape)), p=0.25, training=True).reshape(100, 40, -1)
  assert bool((torch_dropped == torch_dropped[..., :1]).all())  # torch's unit of dropping is the same


def test_stochastic_depth_drops_whole_samples():
  from torchvision.ops import stochastic_depth

  from jaxbn._src.port.ops import OPS, Context

  x = jnp.ones((4000, 3, 2, 2))
  dropped = OPS[stochastic_depth].fn(Context(True, lambda: jax.random.key(2)), x, p=0.2, mode="row")
  per_sample = np.asarray(dropped).reshape(4000, -1)
  assert np.all(per_sample == per_sample[:, :1])  # one draw per sample
  np.testing.assert_allclose(np.unique(per_sample), [0.0, 1.25], rtol=1e-6)
  assert abs(float(np.mean(per_sample[:, 0] == 0)) - 0.2) < 0.03  # 4 standard deviations
  assert OPS[stochastic_depth].fn(Context(False, None), x, p=0.2, mode="row") is x


def test_freeze_fold_mask_and_eval_mode_work_on_a_ported_model():
  model = small()
  module, variables = jaxbn.port(model, X)
  expected = module.apply(variables, X)
  frozen = module.with_batchnorm("frozen")
  np.testing.assert_allclose(frozen.apply(jaxbn.freeze(variables), X), expected, rtol=1e-6)
  assert module.batchnorm_producers() == {"body/0/bn": "body/0/conv"}
  folded = jaxbn.fold_batchnorm(variables, epsilon=module.batchnorm_epsilons(), producers=module.batchnorm_producers())
  assert relative(module.with_batchnorm("folded").apply(folded, X), expected) <= 1e-5
  mask = jaxbn.frozen_mask(variables, modules=["body.0"])
  assert mask["body"]["0"]["conv"]["kernel"] and not mask["head"]["kernel"]
  with jaxbn.eval_mode("body"):
    _, updates = module.apply(variables, X, train=True, mutable=["batch_stats"])
  assert int(updates["batch_stats"]["body"]["0"]["bn"]["num_batches_tracked"]) == 3


def test_timm_batchnorm_act_keeps_its_activation_when_frozen():
  timm = pytest.importorskip("timm", reason="timm is in the test extra")
  model = timm.create_model("mobilenetv3_small_050", num_classes=4).eval()
  x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
  module, variables = jaxbn.port(model, x)
  expected = model(torch.from_numpy(x))
  assert relative(jax.jit(module.apply)(variables, x), expected) <= 1e-5
  frozen = module.with_batchnorm("frozen")
  assert relative(jax.jit(frozen.apply)(jaxbn.freeze(variables), x), expected) <= 1e-5


def test_timm_same_padding_convolution_and_activation_modules_port():
  """timm's Conv2dSame (TF padding by max() on sizes: every tf_* model, nasnet) and a
  BatchNormAct2d with timm's own GELU module (efficientformerv2)."""
  timm = pytest.importorskip("timm", reason="timm is in the test extra")
  model = nn.Sequential(
      timm.layers.Conv2dSame(3, 4, 3, stride=2), timm.layers.BatchNormAct2d(4, act_layer=timm.layers.activations.GELU)
  )
  module, variables = jaxbn.port(model, X)
  odd = X[:, :, :7, :5]  # other paddings, same decisions
  assert relative(module.apply(variables, odd), model.eval()(torch.from_numpy(odd))) <= RTOL
  y, _ = module.apply(variables, X, train=True, mutable=["batch_stats"])
  assert relative(y, model.train()(torch.from_numpy(X))) <= RTOL


def test_conv_transpose_converts_both_ways():
  model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6))
  module, variables = jaxbn.port(model, np.zeros((1, 4, 5, 5), np.float32))
  assert variables["params"]["0"]["kernel"].shape == (3, 3, 3, 4)  # flax's transpose_kernel=True layout
  nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)).load_state_dict(
      jaxbn.convert.to_torch(variables), strict=True
  )


def test_sync_batchnorm_uses_axis_name():
  model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4))
  module, variables = jaxbn.port(model, X, axis_name="batch")
  assert module.batchnorm_layers()["1"].axis_name == "batch"
  step = jax.vmap(lambda x: module.apply(variables, x, train=True, mutable=["batch_stats"]), axis_name="batch")
  y, _ = step(X.reshape(2, 2, 3, 8, 8))
  whole, _ = jaxbn.port(model, X)[0].apply(variables, X, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(y).reshape(whole.shape), whole, rtol=1e-5, atol=1e-6)


def test_bad_input_is_refused_clearly():
  with pytest.raises(TypeError, match="torch.nn.Module"):
    jaxbn.port(lambda x: x, X)
  with pytest.raises(ValueError, match="api must be 'linen' or 'nnx'"):
    jaxbn.port(small(), X, api="jax")
  with pytest.raises(jaxbn.PortError, match=r"torch.nn.Sequential\(model\)"):
    jaxbn.port(nn.BatchNorm2d(3), X)


class Shallow(nn.Module):
  """smp's encoders at a smaller depth: stages and a head forward never calls keep their weights."""

  def __init__(self):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    self.deeper = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    self.head = nn.Conv2d(4, 2, 1)

  def forward(self, x):
    return self.head(self.stem(x))


class SharedTensors(nn.Module):
  """One convolution at two paths, and a head whose weight is tied to another module's
  (transformers ties PP-DocLayoutV3's decoder heads to its encoder's)."""

  def __init__(self):
    super().__init__()
    self.conv = nn.Conv2d(3, 3, 1)
    self.again = self.conv
    self.bn = nn.BatchNorm2d(3)
    self.head, self.tied = nn.Linear(3, 2), nn.Linear(3, 2)
    self.tied.weight = self.head.weight

  def forward(self, x):
    h = self.bn(self.again(self.conv(x))).mean((2, 3))
    return self.head(h) + self.tied(h)


def test_a_tensor_at_two_state_dict_keys_is_refused_naming_every_pair():
  """torch trains one tensor with both uses' gradients; a copy per key would train apart (verify
  measured the port's again.weight stale after one step) and write a stale value back."""
  with pytest.raises(jaxbn.PortError) as error:
    jaxbn.port(SharedTensors(), X)
  message = str(error.value)
  assert "SharedTensors holds 3 tensor(s) at more than one state_dict key" in message, message
  for pair in ("conv.weight is again.weight", "conv.bias is again.bias", "head.weight is tied.weight"):
    assert pair in message, pair


def test_modules_forward_never_calls_are_held_as_they_are_and_never_trained(tmp_path):
  torch.manual_seed(0)
  net = Shallow()
  with pytest.warns(jaxbn.TrainingRecipeWarning, match=r"4 parameter\(s\) torch never trains .*deeper"):
    port = jaxbn.port(net, X)
  assert port.recipe.frozen == ("deeper",)
  assert port.frozen_mask["deeper"]["1"]["weight"]["tensor"] and not port.frozen_mask["stem"]["1"]["scale"]
  ours, theirs = jaxbn.convert.to_state_dict(port.variables), net.state_dict()
  assert list(ours) == list(theirs)  # bit for bit, in torch's order
  for key, value in theirs.items():
    np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)
  # torch's AdamW skips them (no gradient); weight decay would move them if the port trained them
  result = jaxbn.verify(net, X, steps=2, optimizer=jaxbn.verification.AdamW(weight_decay=0.1))
  assert result.passed, result.summary()
  assert "deeper" not in jaxbn.port(net, X, strict=False).variables["params"]
  # emitted source holds them too (layers.Held), frozen in its recipe as the port's
  emitted = jaxbn.verify(net, X, steps=2, via="emit", optimizer=jaxbn.verification.AdamW(weight_decay=0.1))
  assert emitted.passed, emitted.summary()
  with pytest.warns(jaxbn.TrainingRecipeWarning, match="deeper"):
    assert "layers.Held(" in jaxbn.emit(net, X, tmp_path / "held").read_text()
  assert "deeper" not in jaxbn.emit(net, X, tmp_path / "left_out", strict=False).read_text()


def test_training_step_with_optax_matches_a_torch_step():
  model = small()
  module, variables = jaxbn.port(model, X)
  labels = np.array([0, 1, 2, 0])
  tx = optax.sgd(0.1)

  def loss(params):
    logits, updates = module.apply({**variables, "params": params}, X, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

  grads, _ = jax.grad(loss, has_aux=True)(variables["params"])
  params = optax.apply_updates(variables["params"], tx.update(grads, tx.init(variables["params"]))[0])
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
  model.train()
  F.cross_entropy(model(torch.from_numpy(X)), torch.from_numpy(labels)).backward()
  optimizer.step()
  ours = jaxbn.convert.to_state_dict({"params": params})
  for key, value in model.named_parameters():
    assert relative(ours[key], value) <= 1e-5, key


def test_nnx_port_switches_modes_and_trains_in_place_as_torch():
  from flax import nnx

  model = small()
  nnx_model, state = jaxbn.port(model, X, api="nnx")
  assert {type(v).__name__ for _, v in nnx.to_flat_state(state) if "rngs" not in str(_)} == {"Param", "BatchStat"}
  nnx_model.eval()
  assert relative(nnx_model(X), model.eval()(torch.from_numpy(X))) <= RTOL
  nnx_model.train()
  y = nnx.jit(lambda m, x: m(x))(nnx_model, X)
  assert relative(y, model.train()(torch.from_numpy(X))) <= RTOL
  ours = jaxbn.convert.to_state_dict(nnx_model)
  for key, value in model.state_dict().items():
    assert relative(ours[key], value) <= RTOL, key
  optimizer = nnx.Optimizer(nnx_model, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  kernel = np.asarray(nnx_model.head.kernel[...])
  step(nnx_model, optimizer, X)
  assert int(nnx_model.body[0].bn.num_batches_tracked[...]) == 5  # a native module: torch's attributes
  assert not np.array_equal(np.asarray(nnx_model.head.kernel[...]), kernel)


class _WithLargeConstant(nn.Module):
  """A non-persistent buffer too large for the source: the port's NNX class reads it from a file."""

  def __init__(self):
    super().__init__()
    self.body = small()
    self.register_buffer("offset", torch.linspace(-1, 1, 5000), persistent=False)

  def forward(self, x):
    return self.body(x) + self.offset[:10].sum()


def test_nnx_port_leaves_no_files_behind_and_its_source_stays_readable(tmp_path, monkeypatch):
  import inspect
  import tempfile

  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  model = _WithLargeConstant().eval()
  nnx_model, _ = jaxbn.port(model, X, api="nnx")
  assert list(tmp_path.iterdir()) == []  # was one directory per port, with the constants' file
  nnx_model.eval()
  assert relative(nnx_model(X), model(torch.from_numpy(X))) <= RTOL
  assert inspect.getsource(type(nnx_model).__call__).startswith("  def __call__(self, x"), "tracebacks show it"


def test_importing_jaxbn_does_not_import_torch():
  import subprocess
  import sys

  code = (
      "import sys, jaxbn; jaxbn.PortError; assert 'torch' not in sys.modules; jaxbn.port; assert 'torch' in sys.modules"
  )
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_compute_channels_last_gives_the_same_layer():
  """The layout knob the port sets on its BatchNorms: same outputs, statistics and mask handling."""
  x = jnp.asarray(np.random.default_rng(3).standard_normal((6, 4, 5, 3)).astype(np.float32)) * 3 + 1
  mask = jnp.arange(6)[:, None, None, None] < 4
  results = []
  for channels_last in (False, True):
    layer = jaxbn.BatchNorm(axis=1, momentum=0.3, compute_channels_last=channels_last)
    variables = layer.init(jax.random.key(0), x, use_running_average=True)
    y, updates = layer.apply(variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
    results.append((y, updates["batch_stats"]))
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
  for leaf in ("mean", "var"):
    np.testing.assert_allclose(results[1][1][leaf], results[0][1][leaf], rtol=1e-6)


class StraightThroughClamp(torch.autograd.Function):
  """A clamp whose backward passes the gradient straight through: fx would trace its forward only."""

  @staticmethod
  def forward(ctx, x):
    return x.clamp(-0.1, 0.1)

  @staticmethod
  def backward(ctx, grad):
    return grad


class Quantised(nn.Module):

  def __init__(self):
    super().__init__()
    self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

  def forward(self, x):
    return StraightThroughClamp.apply(self.body(x))


@jax.custom_vjp
def straight_through_clamp(x):
  return jnp.clip(x, -0.1, 0.1)


straight_through_clamp.defvjp(lambda x: (straight_through_clamp(x), None), lambda _, grad: (grad,))


def test_autograd_function_is_refused_unless_given_and_then_has_torchs_gradient():
  """fx inlines an autograd.Function's forward and drops its backward (a port whose gradient is
  34 where torch's is 1e-6): refused by name; with custom_ops the input gradient is torch's
  (float32, within 1e-6 of its largest value)."""
  torch.manual_seed(0)
  model = Quantised().train()
  with pytest.raises(
      jaxbn.PortError,
      match=r"torch.autograd.Function .*StraightThroughClamp: fx would trace"
      r" its forward and lose its backward; give custom_ops=\{StraightThroughClamp: jax_function\}",
  ):
    jaxbn.port(model, X)
  module, variables = jaxbn.port(model, X, custom_ops={StraightThroughClamp: straight_through_clamp})
  weights = np.random.default_rng(2).standard_normal((4, 4, 6, 6)).astype(np.float32)

  def loss(x):
    y, _ = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.sum(y * weights)

  x = torch.from_numpy(X).requires_grad_()
  (model(x) * torch.from_numpy(weights)).sum().backward()
  assert relative(jax.grad(loss)(X), x.grad) <= RTOL


def test_axis_name_without_sync_batchnorm_warns():
  with pytest.warns(UserWarning, match=r"has no SyncBatchNorm.*convert_sync_batchnorm\(model\)"):
    jaxbn.port(small(), X, axis_name="batch")


def test_stateless_factory_for_a_module_with_state_is_named():
  model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
  with pytest.raises(
      jaxbn.PortError, match=r"runs as a stateless call, so they have no place: 1 \(a torch.nn.BatchNorm2d\)"
  ):
    jaxbn.port(model, X, custom_modules={nn.BatchNorm2d: lambda module: lambda x: x})


def test_to_torch_like_a_model_carries_its_metadata():
  """MNASNet's loader reads torch's per-module versions (``_metadata``), which a state_dict from
  anywhere else lacks; ``like=`` carries them, and the model's key order."""
  model = torchvision.models.mnasnet0_5(num_classes=3)
  _, variables = jaxbn.port(model, np.zeros((1, 3, 32, 32), np.float32))
  state_dict = jaxbn.convert.to_torch(variables, like=model)
  assert list(state_dict) == list(model.state_dict()) and state_dict._metadata == model.state_dict()._metadata
  torchvision.models.mnasnet0_5(num_classes=3).load_state_dict(state_dict, strict=True)


def test_per_layer_comparison_of_an_activated_batchnorm_is_after_its_activation():
  """timm's BatchNormAct2d is BatchNorm then its activation, one module: torch's hook sees the
  activated output, so the port's layer is compared after its activation too (relative 1e-5)."""
  timm = pytest.importorskip("timm", reason="timm is in the test extra")
  torch.manual_seed(0)
  model = nn.Sequential(nn.Conv2d(3, 4, 3), timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU6)).train()
  module, variables = jaxbn.port(model, X)
  report = jaxbn.parity.compare(model, module, variables, [X, X[::-1].copy()], channels_last=False)
  assert {row.layer for row in report} == {"1"} and max(row.max_rel for row in report) <= 1e-5, report


def test_per_layer_comparison_follows_forwards_that_differ_by_mode():
  """A BatchNorm only the training forward runs (GoogLeNet's aux heads) is compared in train
  steps and left out of eval ones, not compared with its stale train output."""

  class AuxBatchNorm(nn.Module):

    def __init__(self):
      super().__init__()
      self.bn, self.aux = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
      y = self.bn(x)
      return (y, self.aux(x * 2)) if self.training else y

  model = AuxBatchNorm()
  module, variables = jaxbn.port(model, X)
  report = jaxbn.parity.compare(model, module, variables, [X, X[::-1].copy()], channels_last=False)
  assert [(row.layer, row.mode) for row in report] == [("bn", "train"), ("aux", "train"), ("bn", "eval")]
  assert max(row.max_rel for row in report) <= RTOL, report


class ReadsItsTensors(nn.Module):
  """Parameters and buffers used directly in forward, as timm's layer scale, blur pool and
  attention-bias tables do."""

  def __init__(self):
    super().__init__()
    self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
    self.gamma = nn.Parameter(torch.linspace(0.5, 2.0, 4).reshape(1, 4, 1, 1))  # layer scale
    self.register_buffer("filt", torch.tensor([[1.0, 2.0, 1.0]]).T @ torch.tensor([[1.0, 2.0, 1.0]]) / 16)
    self.register_buffer("order", torch.tensor([3, 1, 0, 2]))  # an int64 index table
    self.register_buffer("shift", torch.full((1, 4, 1, 1), 0.25), persistent=False)  # not in the state_dict

  def forward(self, x):
    y = self.bn(self.conv(x)) * self.gamma
    y = F.conv2d(y, self.filt.expand(4, 1, 3, 3), padding=1, groups=4)  # a fixed blur
    return y[:, self.order] + self.shift + torch.tensor(1.5)  # a tensor literal


def test_tensors_read_in_forward_are_variables_at_their_torch_names():
  """A parameter is ``params/<path>/<name>/tensor``, a buffer ``buffers/...`` (optimisers over
  params leave it alone), a non-persistent buffer or literal a constant. Train-mode outputs,
  every gradient (the layer scale's too) and the running statistics match torch within 1e-6 of
  their largest value; torch -> Flax -> torch is bit-exact and loads strictly."""
  torch.manual_seed(0)
  model = ReadsItsTensors().train()
  module, variables = jaxbn.port(model, X)
  assert variables["params"]["gamma"]["tensor"].shape == (1, 4, 1, 1)
  assert variables["buffers"]["order"]["tensor"].dtype == jnp.int32 and "shift" not in variables["buffers"]
  assert not hasattr(model, "_tensor_constant0")  # fx's literals are not left on the model
  back = jaxbn.convert.to_state_dict(variables)
  for key, value in model.state_dict().items():
    assert back[key].dtype == value.numpy().dtype, key
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
  ReadsItsTensors().load_state_dict(jaxbn.convert.to_torch(variables, like=model), strict=True)

  weights = np.random.default_rng(3).standard_normal((4, 4, 8, 8)).astype(np.float32)

  def loss(params):
    y, updates = module.apply({**variables, "params": params}, X, train=True, mutable=["batch_stats"])
    return jnp.sum(y * weights), (y, updates)

  grads, (y, updates) = jax.grad(loss, has_aux=True)(variables["params"])
  expected = model(torch.from_numpy(X))
  (expected * torch.from_numpy(weights)).sum().backward()
  assert relative(y, expected) <= RTOL
  assert relative(grads["gamma"]["tensor"], model.gamma.grad) <= RTOL
  assert relative(grads["conv"]["kernel"], model.conv.weight.grad.permute(2, 3, 1, 0)) <= RTOL
  assert relative(updates["batch_stats"]["bn"]["var"], model.bn.running_var) <= RTOL


class Windows(nn.Module):
  """Shape arithmetic and a shape assert, as timm's attention blocks write them."""

  def __init__(self, block=4):
    super().__init__()
    self.block, self.bn = block, nn.BatchNorm2d(3)

  def forward(self, x):
    torch._assert(x.shape[2] % self.block == 0, f"H must be a multiple of {self.block}")
    torch._assert(x.shape[1] == 3, "three channels")
    rows = math.ceil(x.shape[2] / self.block)
    return self.bn(x).reshape(x.shape[0], 3, rows, -1).mean(-1) * math.sqrt(x.shape[-1])


def test_shape_arithmetic_and_asserts_run_at_trace_time():
  model = Windows().train()
  module, variables = jaxbn.port(model, X)
  y, _ = module.apply(variables, X, train=True, mutable=["batch_stats"])
  assert relative(y, model(torch.from_numpy(X))) <= RTOL
  with pytest.raises(AssertionError, match="H must be a multiple of 3"):
    jaxbn.port(Windows(block=3), X)


class SamePadding(nn.Module):
  """Python decisions symbolic fx cannot take, as timm writes them: TF "same" padding through
  max() on sizes (Conv2dSame), a branch on a size, len(), and an attention-bias cache keyed by
  str(x.device) that eval fills (levit, efficientformer)."""

  def __init__(self):
    super().__init__()
    self.conv, self.bn, self.cache = nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), {}
    self.bias = nn.Parameter(torch.randn(4, 1, 1))

  def forward(self, x):
    ih, iw = x.size()[-2:]
    pad_h, pad_w = (max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0) for size in (ih, iw))
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    if x.shape[-1] > 6:
      x = x * 2
    if not self.training:
      self.cache.setdefault(str(x.device), self.bias * 1)
    bias = self.bias if self.training else self.cache[str(x.device)]
    return (self.bn(self.conv(x)) + bias).reshape(len(x), -1)


def test_python_decisions_on_shapes_are_taken_on_the_example_and_checked_where_it_runs():
  model = SamePadding()
  before = {k: v.clone() for k, v in model.state_dict().items()}
  module, variables = jaxbn.port(model, X)
  assert model.cache == {}  # tracing ran eval's forward: its cache holds no fx proxy
  for key, value in model.state_dict().items():  # torch ran train mode on the example: undone
    assert torch.equal(value, before[key]), key
  assert relative(module.apply(variables, X[:, :, :7, :7]), model.eval()(torch.from_numpy(X[:, :, :7, :7]))) <= RTOL
  y, _ = module.apply(variables, X, train=True, mutable=["batch_stats"])
  assert relative(y, model.train()(torch.from_numpy(X))) <= RTOL
  with pytest.raises(jaxbn.PortError, match=r"test_port.py:\d+: if x.shape\[-1\] > 6:: the port specialised"):
    module.apply(variables, X[:, :, :4, :4])  # 5 columns once padded: torch takes the other branch
  with pytest.raises(jaxbn.PortError, match=r"len\(\) was 4 there, 2 here"):
    module.apply(variables, X[:2])


def test_python_decisions_on_tensor_values_are_refused():
  class DataBranch(nn.Module):

    def __init__(self):
      super().__init__()
      self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
      return self.bn(x) if x.mean() > -100 else x

  with pytest.raises(
      jaxbn.PortError, match=r"Python bool\(\) of a tensor's values decides what runs.*x.mean\(\) > -100"
  ):
    jaxbn.port(DataBranch(), X)


def test_a_decision_needing_a_forward_that_torch_cannot_run_names_the_example():
  class Head(nn.Module):

    def __init__(self):
      super().__init__()
      self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
      y = self.bn(x)
      return y if len(y) > 1 else -y

  with pytest.raises(
      jaxbn.PortError, match=r"train-mode forward failed at bn: ValueError: Expected more than 1 value per channel.*"
  ):
    jaxbn.port(Head(), np.ones((1, 4), np.float32))


def test_tensor_attributes_beyond_shape_and_dtype_are_refused_when_tracing():
  class OnDevice(nn.Module):

    def __init__(self):
      super().__init__()
      self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
      return self.bn(x) * x.is_cuda

  with pytest.raises(jaxbn.PortError, match=r"reads .is_cuda of a tensor \(the port reads shape, ndim, dtype"):
    jaxbn.port(OnDevice(), X)
