"""jaxbn.port keeps the torch model's training recipe: what torch keeps in eval() while the model
trains, and which parameters it does not train (requires_grad=False).

A small model of torchvision's BasicBlocks (stem, layer1, layer2 with a downsample, dropout, a head)
is configured three ways, as the freezing literature does it:

  bn_eval           model.train(); model.apply(set_bn_eval) (every BatchNorm back in eval)
  frozen_backbone   norm_layer=FrozenBatchNorm2d; conv1, bn1, layer1 requires_grad_(False)
  mixed             bn1 and layer1's BatchNorms in eval, layer2's training; layer1 and fc.bias frozen

(and in each the dropout put back into eval, a recipe of its own: p=0.5 would drop otherwise), then
trained 3 SGD steps (momentum 0.9, weight decay 1e-3, torch's optimiser over the parameters with
requires_grad) in float64, in lock-step with the port trained with its own recipe object:
``jaxbn.keep_frozen(tx, port.frozen_mask)`` (Linen + optax) and ``nnx.Optimizer(model, tx,
wrt=port.trainable)`` (NNX). After every step: the training outputs, every parameter, running
statistic and counter (relative L2 over all of them within FLOAT64_RTOL; measured <= 3e-15),
and the frozen arrays bit for bit equal to their values before training.
"""

from __future__ import annotations

import copy
import warnings

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1
from torchvision.ops import FrozenBatchNorm2d

import jaxbn
from jaxbn._src.checkpoints.recipe import read as read_recipe

LR, MOMENTUM, WEIGHT_DECAY, STEPS = 0.05, 0.9, 1e-3, 3
FLOAT64_RTOL = 1e-12  # relative L2; float64 rounding through 3 updates of a 7-layer net measures <= 3e-15
X_SHAPE = (4, 3, 8, 8)


class Backbone(nn.Module):

  def __init__(self, norm=nn.BatchNorm2d):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    self.bn1 = norm(8)
    self.relu = nn.ReLU()
    self.layer1 = nn.Sequential(BasicBlock(8, 8, norm_layer=norm))
    self.layer2 = nn.Sequential(BasicBlock(8, 16, 2, nn.Sequential(conv1x1(8, 16, 2), norm(16)), norm_layer=norm))
    self.dropout = nn.Dropout(0.5)
    self.fc = nn.Linear(16, 5)

  def forward(self, x):
    x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
    return self.fc(self.dropout(x.mean((2, 3))))


def set_bn_eval(module):
  if isinstance(module, nn.modules.batchnorm._BatchNorm):
    module.eval()


def configured(recipe: str) -> nn.Module:
  """The model in float64 with non-trivial statistics, configured as ``recipe``."""
  torch.manual_seed(0)
  model = Backbone(FrozenBatchNorm2d if recipe == "frozen_backbone" else nn.BatchNorm2d).double()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
  model.train()
  if recipe == "bn_eval":
    model.apply(set_bn_eval)
  elif recipe == "frozen_backbone":
    for frozen in (model.conv1, model.bn1, model.layer1):
      frozen.requires_grad_(False)
  elif recipe == "mixed":
    model.bn1.eval()
    model.layer1.apply(set_bn_eval)
    model.layer1.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
  model.dropout.eval()
  return model


EXPECTED = {  # recipe: (keep_eval, frozen), in Flax paths
    "bn_eval": (("bn1", "layer1", "layer2"), ()),
    "frozen_backbone": ((), ("conv1", "layer1")),  # bn1 is a FrozenBatchNorm2d: buffers, no parameters
    "mixed": (("bn1", "layer1"), ("layer1", "fc/bias")),
}


def batches(steps: int):
  rng = np.random.default_rng(1)
  return [(rng.standard_normal(X_SHAPE), rng.integers(0, 5, X_SHAPE[0])) for _ in range(steps)]


def torch_training(model):
  """Each step's training output and the state_dict after it, with torch's optimiser over what
  requires grad."""
  optimizer = torch.optim.SGD(
      [p for p in model.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
  )
  history = []
  for x, labels in batches(STEPS):
    output = model(torch.from_numpy(x))  # the model as configured: no model.train() here
    optimizer.zero_grad()
    nn.functional.cross_entropy(output, torch.from_numpy(labels)).backward()
    optimizer.step()
    history.append((output.detach().numpy().copy(), {k: v.numpy().copy() for k, v in model.state_dict().items()}))
  return history


def tx():
  return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))


def linen_training(port):
  module, variables = port
  optimizer = jaxbn.keep_frozen(tx(), port.frozen_mask)

  @jax.jit
  def step(variables, opt_state, x, labels):
    def loss(params):
      output, updates = module.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(output, labels).mean(), (output, updates)

    grads, (output, updates) = jax.grad(loss, has_aux=True)(variables["params"])
    changes, opt_state = optimizer.update(grads, opt_state, variables["params"])
    return {**variables, **updates, "params": optax.apply_updates(variables["params"], changes)}, opt_state, output

  opt_state = optimizer.init(variables["params"])
  history = []
  for x, labels in batches(STEPS):
    variables, opt_state, output = step(variables, opt_state, x, labels)
    history.append((np.asarray(output), jaxbn.convert.to_state_dict(variables)))
  return history


def nnx_training(port):
  model = port.module
  wrt = port.trainable
  optimizer = nnx.Optimizer(model, tx(), wrt=wrt)

  @nnx.jit
  def step(model, optimizer, x, labels):
    def loss(model):
      output = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(output, labels).mean(), output

    grads, output = nnx.grad(loss, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
    optimizer.update(model, grads)
    return output

  model.train()
  history = []
  for x, labels in batches(STEPS):
    output = step(model, optimizer, jnp.asarray(x), jnp.asarray(labels))
    history.append((np.asarray(output), jaxbn.convert.to_state_dict(model)))
  return history


def relative_l2(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("recipe", list(EXPECTED))
def test_port_trains_with_the_torch_models_recipe_in_float64_lock_step(recipe, api):
  with jax.enable_x64(True):
    model = configured(recipe)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    frozen |= {
        f"{name}.{leaf}"
        for name, m in model.named_modules()
        if isinstance(m, FrozenBatchNorm2d)
        for leaf in m.state_dict()
    }
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    modes = read_recipe(model).modes
    with pytest.warns(jaxbn.TrainingRecipeWarning, match="not plain model.train()"):
      port = jaxbn.port(model, np.zeros(X_SHAPE), api=api, dtype=jnp.float64)
    assert (port.recipe.keep_eval, port.recipe.frozen) == EXPECTED[recipe]
    assert read_recipe(model).modes == modes  # the port left every flag as it found it
    ours = (linen_training if api == "linen" else nnx_training)(port)
    theirs = torch_training(model)
  kept = {name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and not m.training}
  assert frozen or kept, "each recipe freezes something or keeps layers in eval"
  for step, ((output, state), (expected_output, expected_state)) in enumerate(zip(ours, theirs, strict=True)):
    assert relative_l2(output, expected_output) <= FLOAT64_RTOL, (recipe, step)
    assert state.keys() == expected_state.keys()
    worst = max(relative_l2(state[key], value) for key, value in expected_state.items())
    assert worst <= FLOAT64_RTOL, (recipe, step, worst)
    for key in frozen:
      if key in before:
        np.testing.assert_array_equal(state[key], before[key], err_msg=f"{key} moved")
        np.testing.assert_array_equal(expected_state[key], before[key])
  for name in kept:  # a BatchNorm torch kept in eval counts no batch and keeps its statistics
    for leaf in ("running_mean", "running_var", "num_batches_tracked"):
      np.testing.assert_array_equal(ours[-1][1][f"{name}.{leaf}"], before[f"{name}.{leaf}"])


def test_plain_recipe_is_model_train_with_every_parameter_trained():
  model = jaxbn.parity.without_dropout(configured("mixed").float())  # plain train() would drop
  x = np.random.default_rng(0).standard_normal(X_SHAPE).astype(np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no notice for the plain recipe
    port = jaxbn.port(model, x, recipe="plain")
  assert port.recipe.is_plain and port.module.keep_eval == ()
  assert not any(jax.tree.leaves(port.frozen_mask))
  _, updates = port.module.apply(port.variables, x, train=True, mutable=["batch_stats"])
  assert int(updates["batch_stats"]["bn1"]["num_batches_tracked"]) == 1  # torch's plain train() counts it
  with pytest.raises(ValueError, match="recipe must be one of"):
    jaxbn.port(model, x, recipe="configured")


def test_notice_names_the_counts_and_the_attribute_to_use():
  model = configured("mixed").float()
  with pytest.warns(jaxbn.TrainingRecipeWarning) as record:
    jaxbn.port(model, np.zeros(X_SHAPE, np.float32))
  assert len(record) == 1
  text = str(record[0].message)
  # bn1, layer1's two BatchNorms; layer1's 2 convs and 2 BatchNorms' weight and bias, and fc.bias
  assert "3 BatchNorm layer(s) stay in eval" in text and "7 parameter(s) torch never trains" in text
  assert "jaxbn.keep_frozen(tx, port.frozen_mask)" in text and "recipe='plain'" in text


def test_a_model_in_eval_with_modules_in_train_is_said_to_port_as_model_eval():
  model = configured("bn_eval").float()
  model.eval()
  model.dropout.train()  # MC dropout at inference
  with pytest.warns(jaxbn.TrainingRecipeWarning, match=r"is in eval\(\) but 1 of its modules are in train\(\)"):
    port = jaxbn.port(model, np.zeros(X_SHAPE, np.float32))
  assert port.recipe.is_plain


def test_parity_compare_checks_the_model_as_configured_and_leaves_its_flags():
  model = jaxbn.parity.without_dropout(configured("mixed").float())  # the plain port would drop
  x = [np.random.default_rng(i).standard_normal(X_SHAPE).astype(np.float32) for i in range(3)]
  modes = read_recipe(model).modes
  with pytest.warns(jaxbn.TrainingRecipeWarning):
    module, variables = jaxbn.port(model, x[0])
  plain, plain_variables = jaxbn.port(model, x[0], recipe="plain")
  report = jaxbn.parity.compare(copy.deepcopy(model), module, variables, x, channels_last=False)
  assert max(row.max_rel for row in report) <= 1e-5  # float32; measured 3e-7
  wrong = jaxbn.parity.compare(model, plain, plain_variables, x, channels_last=False)
  assert max(row.max_rel for row in wrong) > 1e-2  # the plain port is another model: compare says so
  assert read_recipe(model).modes == modes


def test_what_a_trace_would_drop_is_refused_by_name():
  def model():
    torch.manual_seed(0)
    return Backbone().float()

  x = np.zeros(X_SHAPE, np.float32)
  hooked = model()
  hooked.bn1.register_forward_hook(lambda m, i, o: o * 2)
  hooked.layer1[0].register_full_backward_hook(lambda m, gi, go: gi)
  hooked.fc.weight.register_hook(lambda g: g * 0.5)
  torch.nn.utils.parametrizations.weight_norm(hooked.layer2[0].conv1)
  with pytest.raises(jaxbn.PortError) as error:
    jaxbn.port(hooked, x)
  text = str(error.value)
  assert "4 thing(s) torch runs that the port would drop silently" in text
  assert "bn1 (BatchNorm2d): forward hook(s)" in text and "handle.remove()" in text
  assert "layer1.0 (BasicBlock): backward hook(s)" in text
  assert "parameter fc.weight: gradient hook(s)" in text
  assert "layer2.0.conv1 (ParametrizedConv2d): parametrized weight" in text and "remove_parametrizations" in text


def test_a_forward_hook_on_a_traced_module_is_part_of_the_port():
  torch.manual_seed(0)
  model = Backbone().float().eval()
  model.layer1.register_forward_hook(lambda m, i, o: o * 2)  # fx traces through layer1's __call__
  x = np.random.default_rng(0).standard_normal(X_SHAPE).astype(np.float32)
  module, variables = jaxbn.port(model, x)
  with torch.no_grad():
    expected = model(torch.from_numpy(x)).numpy()
  assert np.max(np.abs(np.asarray(module.apply(variables, x)) - expected)) <= 1e-6 * np.max(np.abs(expected))


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_emitted_source_holds_the_recipe_as_lists_and_trains_like_the_port(api, tmp_path):
  import importlib.util

  model = configured("mixed").float()
  x = np.random.default_rng(0).standard_normal(X_SHAPE).astype(np.float32)
  with pytest.warns(jaxbn.TrainingRecipeWarning):
    path = jaxbn.emit(model, x, tmp_path, api=api)
  text = path.read_text()
  assert "KEEP_EVAL = ('bn1', 'layer1')" in text.replace('"', "'")
  assert "FROZEN = ('layer1', 'fc/bias')" in text.replace('"', "'")
  spec = importlib.util.spec_from_file_location(f"emitted_{api}", path)
  source = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(source)
  counts = {name: int(m.num_batches_tracked) for name, m in model.named_modules() if hasattr(m, "num_batches_tracked")}
  with torch.no_grad():
    expected = model(torch.from_numpy(x)).numpy()  # torch's training forward, as configured
  if api == "linen":
    module, variables = source.load()
    output, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    stats = updates["batch_stats"]
    mask = source.frozen_mask(variables)
    assert jax.tree.map(bool, mask["fc"]) == {"kernel": False, "bias": True}
    assert all(jax.tree.leaves(mask["layer1"])) and not any(jax.tree.leaves(mask["layer2"]))
  else:
    emitted = source.load()
    emitted.train()
    output = emitted(x)
    stats = jaxbn.convert.to_state_dict(emitted)
    trained = nnx.state(emitted, source.trainable(emitted))
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trained)}
    assert "fc/kernel" in paths and "fc/bias" not in paths and not any(p.startswith("layer1") for p in paths)
  assert np.max(np.abs(np.asarray(output) - expected)) <= 1e-6 * np.max(np.abs(expected))
  counters = jaxbn.convert.to_state_dict({"batch_stats": stats}) if api == "linen" else stats
  for name in counts:  # kept in eval: not counted; training: one batch more, as torch's
    assert int(counters[f"{name}.num_batches_tracked"]) == int(dict(model.named_modules())[name].num_batches_tracked)
  assert counts["bn1"] == int(model.bn1.num_batches_tracked) and counts["layer2.0.bn1"] + 1 == int(
      model.layer2[0].bn1.num_batches_tracked
  )


def test_eval_mode_within_a_module_takes_paths_relative_to_it():
  class Inner(fnn.Module):

    @fnn.compact
    def __call__(self, x, train):
      with jaxbn.eval_mode("a", within=self):
        x = jaxbn.BatchNorm(use_running_average=not train, name="a")(x)
        return jaxbn.BatchNorm(use_running_average=not train, name="b")(x)

  class Outer(fnn.Module):

    @fnn.compact
    def __call__(self, x, train):
      return Inner(name="backbone")(x, train)

  x = jnp.arange(12.0).reshape(4, 3)
  variables = Outer().init(jax.random.key(0), x, train=False)
  _, updates = Outer().apply(variables, x, train=True, mutable=["batch_stats"])
  stats = updates["batch_stats"]["backbone"]
  assert (int(stats["a"]["num_batches_tracked"]), int(stats["b"]["num_batches_tracked"])) == (0, 1)


def test_parameter_paths_freeze_single_parameters_and_typos_are_named():
  model = jaxbn.models.resnet18(num_classes=3)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  mask = jaxbn.frozen_mask(variables, parameters=["fc/bias", "layer1"])
  assert (bool(mask["fc"]["bias"]), bool(mask["fc"]["kernel"])) == (True, False)
  assert all(jax.tree.leaves(mask["layer1"])) and not any(jax.tree.leaves(mask["layer2"]))
  with pytest.raises(ValueError, match="'fc/biass' .*closest: fc/bias"):
    jaxbn.frozen_mask(variables, parameters=["fc/biass"])
  nnx_model = jaxbn.models.nnx.resnet18(3, rngs=nnx.Rngs(0))
  wrt = jaxbn.nnx.trainable(nnx_model, parameters=["fc/bias", "layer1"])
  trained = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(nnx_model, wrt))}
  assert "fc/kernel" in trained and "fc/bias" not in trained and not any(p.startswith("layer1") for p in trained)
  with pytest.raises(ValueError, match="'fc/biass'"):
    jaxbn.nnx.trainable(nnx_model, parameters=["fc/biass"])


def test_the_recipe_is_a_prefix_list_in_torch_order():
  from jaxbn._src.port.recipe import covering_prefixes

  paths = [("a", "x"), ("a", "y"), ("b", "0", "x"), ("b", "1", "x"), ("c",)]
  assert covering_prefixes({("a", "x"), ("a", "y"), ("b", "1", "x")}, paths) == (("a",), ("b", "1"))
  assert covering_prefixes(set(paths), paths) == (("a",), ("b",), ("c",))  # never the whole model
  assert covering_prefixes(set(), paths) == ()
  port = jaxbn.port(configured("bn_eval").float(), np.zeros(X_SHAPE, np.float32), recipe="plain")
  assert isinstance(port, jaxbn.Port) and len(tuple(port)) == 2  # unpacks as (module, variables)
  assert port.recipe == jaxbn.TrainingRecipe() and hash(port.recipe) == hash(jaxbn.TrainingRecipe())
