"""jaxbn.emit: a torch model as Flax source, loaded and checked against real torch.

The emitted ``model.py`` goes through the port's harness (port_harness.run, that is
``jaxbn.verify(..., via="emit")``: conversion round trip with strict loading, eval and train-mode
outputs, and over 2 SGD steps every gradient, running statistic, counter and updated parameter in
float64 lock-step with torch, with the port's tolerances) in place of ``jaxbn.port``'s module; a
process where ``import torch`` fails loads it and gets the same eval output, bit for bit (the
same program on the same machine). CI runs the hand-written model and a one-block-per-stage
torchvision ResNet; ``make test-models`` runs every model of test_port_models.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import re
import subprocess
import sys
import textwrap

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
import torchvision
from flax import nnx

import jaxbn
from jaxbn._src.port.source import naming
from jaxbn._src.verify.measures import max_relative
from jaxbn._src.verify.runs import output_leaves
from parity_tests import port_harness
from parity_tests.port_harness import Case
from parity_tests.test_port_models import CI, FULL, HandWritten, image


def load_source(path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def emitted_port(directory):
  """``jaxbn.port``'s signature, through emitted source: emit, import ``model.py``, ``load()``."""
  count = itertools.count()

  def port(model, x, dtype=None, strict=True):
    index = next(count)
    path = jaxbn.emit(model, x, directory / f"emitted{index}", dtype=dtype)
    return load_source(path, f"emitted_model_{id(directory)}_{index}").load(strict=strict)

  return port


def small_resnet():
  """torchvision's ResNet with one BasicBlock per stage: every stage but the first downsamples."""
  return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)


# CI: the hand-written model (train and eval forwards differ, a namedtuple of a dict, functional
# ops, momentum=None, FrozenBatchNorm2d, BatchNorm1d) through the whole harness, for each API; the
# one-block-per-stage ResNet (repeated blocks as one class, an optional downsample, Sequential)
# through eval and a training forward in CI (test_emitted_resnet_...) and the harness in test-models.
EMIT_CI = {"handwritten": CI["handwritten"]}
EMIT_FULL = {"torchvision:resnet-1-1-1-1": Case(small_resnet, image(32), floor=1e-4), **CI, **FULL}
PORTS = {"linen": lambda directory: emitted_port(directory), "nnx": lambda directory: emitted_nnx_port(directory)}


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("api", list(PORTS))
@pytest.mark.parametrize("name", list(EMIT_CI))
def test_emitted_source_passes_the_port_harness(name, api, layout):
  port_harness.run(EMIT_CI[name], via="emit", api=api, layout=layout)


@pytest.mark.full_models
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("api", list(PORTS))
@pytest.mark.parametrize("name", [n for n in EMIT_FULL if n not in EMIT_CI])
def test_emitted_source_passes_the_port_harness_full(name, api, layout):
  port_harness.run(EMIT_FULL[name], via="emit", api=api, layout=layout)


def eval_and_training_forward(model, x, port) -> tuple[float, float, float]:
  """The emitted model against torch float32 from identical parameters: eval output, then a
  train-mode forward and its running statistics. Relative to the largest output, and to
  max(|statistic|, 1)."""
  module, variables = port(model, x)
  apply = jax.jit(module.apply, static_argnames=("train", "mutable"))
  model.eval()
  with torch.no_grad():
    expected = output_leaves(model(torch.from_numpy(x)))
  eval_rel = max_relative(output_leaves(apply(variables, x)), expected)
  model.train()
  with torch.no_grad():
    expected = output_leaves(model(torch.from_numpy(x)))
  output, updates = apply(variables, x, train=True, mutable=("batch_stats",))
  train_rel = max_relative(output_leaves(output), expected)
  ours = jaxbn.convert.to_state_dict({**variables, **updates})
  stats_rel = 0.0
  for key, value in model.state_dict().items():
    if "running" in key or "num_batches" in key:
      value = value.numpy()
      stats_rel = max(stats_rel, float(np.max(np.abs(ours[key] - value) / np.maximum(np.abs(value), 1))))
  return eval_rel, train_rel, stats_rel


@pytest.mark.parametrize("api", list(PORTS))
def test_emitted_resnet_matches_torch_in_eval_and_a_training_forward(api, tmp_path):
  """Within 1e-4 of the largest output (a deep net's float32 rounding: the harness's floor) and
  1e-5 relative to max(|statistic|, 1)."""
  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
  eval_rel, train_rel, stats_rel = eval_and_training_forward(small_resnet(), x, PORTS[api](tmp_path))
  assert eval_rel <= 1e-4 and train_rel <= 1e-4, (eval_rel, train_rel)
  assert stats_rel <= 1e-5, stats_rel


def test_emitted_model_runs_where_torch_cannot_be_imported(tmp_path):
  torch.manual_seed(0)
  model = HandWritten()
  x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
  path = jaxbn.emit(model, x, tmp_path / "handwritten")
  np.save(tmp_path / "x.npy", x)
  script = textwrap.dedent(f"""
      import sys
      sys.modules["torch"] = None  # import torch raises ImportError
      sys.path.insert(0, {str(tmp_path)!r})
      import numpy as np
      from handwritten.model import load
      module, variables = load()
      np.save({str(tmp_path / "y.npy")!r}, np.asarray(module.apply(variables, np.load({str(tmp_path / "x.npy")!r}))))
      assert not any(name == "torch" or name.startswith("torch.") for name in sys.modules if sys.modules[name])
  """)
  subprocess.run([sys.executable, "-c", script], check=True)
  module, variables = load_source(path, "handwritten_in_process").load()
  np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.asarray(module.apply(variables, x)))
  model.eval()
  with torch.no_grad():
    expected = model(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def code_lines(text: str) -> list[str]:
  """Lines of code: not blank, not comments, not inside docstrings."""
  text = re.sub(r'"""(.|\n)*?"""', "", text)
  return [line for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_resnet50_source_is_one_bottleneck_class_within_250_lines(tmp_path):
  path = jaxbn.emit(torchvision.models.resnet50(num_classes=10), np.zeros((1, 3, 32, 32), np.float32), tmp_path)
  text = path.read_text()
  classes = re.findall(r"^class (\w+)\(nn\.Module\):", text, re.M)
  assert classes == ["Bottleneck", "ResNet"], classes
  assert len(code_lines(text)) <= 250, len(code_lines(text))
  assert "import torch" not in text
  # what differs between the 16 blocks is fields; the first block of a stage has the downsample
  assert re.search(r"^  with_downsample: bool = False$", text, re.M)
  assert text.count("with_downsample=True") == 4
  # the blocks after each stage's first are made the same way: a loop, as torchvision's
  assert re.findall(r"for _ in range\((\d+)\)", text) == ["2", "3", "5", "2"]
  assert '"""torchvision.models.resnet.Bottleneck in torch."""' in text


def test_emit_refuses_autocast(tmp_path):
  with pytest.raises(jaxbn.PortError, match="autocast"):
    jaxbn.emit(small_resnet(), np.zeros((1, 3, 32, 32), np.float32), tmp_path, autocast=jax.numpy.bfloat16)


class NnxAsLinen:
  """An NNX model behind the harness's Linen interface: ``apply(variables, x, train=...,
  mutable=[...])`` merges a copy of the model, writes ``variables`` into it (jaxbn.nnx.update),
  sets torch's mode (``model.train()`` / ``model.eval()``) and calls it."""

  def __init__(self, model):
    self.graphdef, self.state = nnx.split(model)

  def apply(self, variables, *inputs, train=False, mutable=(), rngs=None):
    del rngs  # the harness runs without dropout
    model = nnx.merge(self.graphdef, jax.tree.map(lambda value: value, self.state))  # Variables of this trace
    jaxbn.nnx.update(model, variables)
    model.train() if train else model.eval()
    output = model(*inputs)
    return (output, {"batch_stats": jaxbn.nnx.to_variables(model)["batch_stats"]}) if mutable else output


def emitted_nnx_port(directory):
  """``jaxbn.port``'s signature through NNX source: the loaded model, behind ``NnxAsLinen``."""
  count = itertools.count()

  def port(model, x, dtype=None, strict=True):
    index = next(count)
    path = jaxbn.emit(model, x, directory / f"emitted{index}", api="nnx", dtype=dtype)
    loaded = load_source(path, f"emitted_nnx_{id(directory)}_{index}").load(strict=strict)
    return NnxAsLinen(loaded), jaxbn.nnx.to_variables(loaded)

  return port


def test_native_nnx_model_works_with_every_jaxbn_nnx_tool():
  """``jaxbn.port(api="nnx")`` builds the classes ``emit(api="nnx")`` writes: torch's attributes,
  NNX's modes, and each jaxbn.nnx tool (freeze, unfreeze, keep_eval, trainable, fold_batchnorm)."""
  torch.manual_seed(0)
  torch_model = small_resnet()
  x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
  model, _ = jaxbn.port(torch_model, x, api="nnx")
  assert isinstance(model.layer2[0].downsample[1], jaxbn.nnx.BatchNorm) and model.layer1[0].downsample is None
  assert isinstance(model.layer1[0].bn1.mean, nnx.BatchStat)

  def arrays(module, kind=nnx.Variable):
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(module, kind))}

  forward = nnx.jit(lambda model, x: model(x))

  @nnx.jit(static_argnames="wrt")
  def step(model, optimizer, x, wrt=nnx.Param):
    optimizer.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, wrt))(model))

  # keep_eval: layer1's statistics stay while the rest trains
  jaxbn.nnx.keep_eval(model, "layer1")
  model.train()
  before = arrays(model.layer1)
  forward(model, x)
  assert all(np.array_equal(before[k], v) for k, v in arrays(model.layer1).items())
  assert int(model.bn1.num_batches_tracked[...]) == 1
  jaxbn.nnx.keep_eval(model, "layer1", keep=False)

  # trainable: an optimiser over the filter leaves layer1 and every BatchNorm's affine alone
  wrt = jaxbn.nnx.trainable(model, modules=["layer1"], batchnorm_affine=[""])
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=wrt)
  fixed = {**arrays(model.layer1, nnx.Param), **{("bn1", "scale"): np.asarray(model.bn1.scale[...])}}
  moving = np.asarray(model.fc.kernel[...])
  step(model, optimizer, x, wrt)
  assert all(np.array_equal(v, arrays(model.layer1, nnx.Param)[k]) for k, v in fixed.items() if k[0] != "bn1")
  assert np.array_equal(fixed[("bn1", "scale")], np.asarray(model.bn1.scale[...]))
  assert not np.array_equal(moving, np.asarray(model.fc.kernel[...]))

  # freeze: FrozenBatchNorm with the same arrays, untouched by a training step; unfreeze restores
  model.eval()
  expected = np.asarray(forward(model, x))
  jaxbn.nnx.freeze(model)
  assert isinstance(model.layer2[0].downsample[1], jaxbn.nnx.FrozenBatchNorm)
  model.train()
  np.testing.assert_array_equal(np.asarray(forward(model, x)), expected)  # frozen: eval statistics in training too
  frozen = arrays(model, jaxbn.nnx.Frozen)
  step(model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param), x)
  assert all(np.array_equal(v, arrays(model, jaxbn.nnx.Frozen)[k]) for k, v in frozen.items())
  jaxbn.nnx.unfreeze(model)
  assert isinstance(model.layer2[0].downsample[1], jaxbn.nnx.BatchNorm)

  # fold_batchnorm: each norm into the convolution before it; eval output within float32 rounding
  model.eval()
  expected = np.asarray(forward(model, x))
  jaxbn.nnx.fold_batchnorm(model)
  assert isinstance(model.layer1[0].bn1, jaxbn.nnx.FoldedBatchNorm)
  folded = np.asarray(forward(model, x))
  assert np.max(np.abs(folded - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_cli_emits_a_checkpoint_as_source_that_matches_torch(tmp_path, capsys):
  """``jaxbn emit --model file.py:factory --weights``: the weights loaded strictly into the model,
  the source's eval output within 1e-6 of torch's largest (float32 rounding); an existing model.py
  is refused (status 2) without --overwrite."""
  from jaxbn.cli import main

  torch.manual_seed(0)
  model = Tiny().eval()
  jaxbn.save_state_dict(model, tmp_path / "weights.safetensors")
  factory = tmp_path / "tiny.py"
  factory.write_text("from parity_tests.test_emit import Tiny\n\n\ndef build():\n  return Tiny()\n")
  argv = ["emit", "--model", f"{factory}:build", "--weights", str(tmp_path / "weights.safetensors")]
  argv += ["--out", str(tmp_path / "tiny"), "--size", "8", "--api", "nnx"]
  assert main(argv) == 0
  assert "from tiny.model import load" in capsys.readouterr().out
  loaded = load_source(tmp_path / "tiny" / "model.py", "cli_tiny").load()
  loaded.eval()
  x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
  with torch.no_grad():
    expected = model(torch.from_numpy(x)).numpy()
  assert np.max(np.abs(np.asarray(loaded(x)) - expected)) <= 1e-6 * np.max(np.abs(expected))
  assert main(argv) == 2
  assert "exists; pass --overwrite" in capsys.readouterr().err


def test_cli_emits_channels_last_source(tmp_path, capsys):
  """``jaxbn emit --layout NHWC``: source that takes NHWC input (its ``INPUT_AXES``) and gives
  torch's eval output within 1e-6 of torch's largest (float32 rounding), Flax's own Conv."""
  from jaxbn.cli import main

  torch.manual_seed(0)
  model = Tiny().eval()
  jaxbn.save_state_dict(model, tmp_path / "weights.safetensors")
  factory = tmp_path / "tiny_nhwc.py"
  factory.write_text("from parity_tests.test_emit import Tiny\n\n\ndef build():\n  return Tiny()\n")
  argv = ["emit", "--model", f"{factory}:build", "--weights", str(tmp_path / "weights.safetensors")]
  assert main([*argv, "--out", str(tmp_path / "tiny"), "--size", "8", "--layout", "NHWC"]) == 0
  assert "channels-last: inputs NHWC" in capsys.readouterr().out
  source = load_source(tmp_path / "tiny" / "model.py", "cli_tiny_nhwc")
  assert source.INPUT_AXES == [(0, 2, 3, 1)] and "nn.Conv(" in (tmp_path / "tiny" / "model.py").read_text()
  module, variables = source.load()
  x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
  with torch.no_grad():
    expected = model(torch.from_numpy(x)).numpy()
  actual = np.transpose(np.asarray(module.apply(variables, x.transpose(0, 2, 3, 1))), np.argsort(source.OUTPUT_AXES[0]))
  assert np.max(np.abs(actual - expected)) <= 1e-6 * np.max(np.abs(expected))


class Scale(torch.nn.Module):

  def __init__(self, channels):
    super().__init__()
    self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, channels))

  def forward(self, x):
    return x * self.weight[:, None, None]


class FlaxScale(flax.linen.Module):
  """Scale's Linen twin, given to the port through custom_modules."""

  @flax.linen.compact
  def __call__(self, x):
    return x * self.param("scale", flax.linen.initializers.ones, (x.shape[1],))[:, None, None]


def roll(x, shifts, dims):
  return jnp.roll(x, shifts, dims)


class WithCustomParts(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.conv, self.scale, self.bn = torch.nn.Conv2d(3, 3, 1), Scale(3), torch.nn.BatchNorm2d(3)

  def forward(self, x):
    return self.bn(torch.roll(self.scale(self.conv(x)), 1, dims=3))


def test_custom_modules_and_ops_are_imported_by_reference(tmp_path):
  """What custom_modules and custom_ops give is imported from its module, with a comment; the
  source then matches torch (eval, float32: 1e-6 of the largest output). A local function cannot
  be imported: refused by name. NNX source cannot build a Linen custom module: refused."""
  torch.manual_seed(0)
  model = WithCustomParts().eval()
  x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
  options = dict(custom_modules={Scale: lambda m: FlaxScale()}, custom_ops={torch.roll: roll})
  path = jaxbn.emit(model, x, tmp_path / "custom", **options)
  text = path.read_text()
  assert "import parity_tests.test_emit  # custom_modules / custom_ops: imported from where they are defined" in text
  assert "parity_tests.test_emit.FlaxScale(" in text and "parity_tests.test_emit.roll(" in text
  module, variables = load_source(path, "custom_parts").load()
  with torch.no_grad():
    expected = model(torch.from_numpy(x)).numpy()
  assert np.max(np.abs(np.asarray(module.apply(variables, x)) - expected)) <= 1e-6 * np.max(np.abs(expected))
  with pytest.raises(jaxbn.PortError, match=r"not importable; define it in a module"):
    jaxbn.emit(
        model,
        x,
        tmp_path / "local",
        custom_modules=options["custom_modules"],
        custom_ops={torch.roll: lambda x, shifts, dims: jnp.roll(x, shifts, dims)},
    )
  with pytest.raises(jaxbn.PortError, match=r"emit\(api='nnx'\): scale is a FlaxScale from custom_modules"):
    jaxbn.emit(model, x, tmp_path / "nnx", api="nnx", **options)


class Tiny(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.conv, self.bn, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 10)

  def forward(self, x):
    return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_edited_source_loads_what_still_fits(api, tmp_path):
  """The README's edit: a new head (the model's ``num_classes`` field, its last Linear's size),
  then ``load(strict=False)``: every weight that fits is the file's, bit for bit; the new head has
  fresh values; ``from_torch(strict=False)`` names what did not fit."""
  torch.manual_seed(0)
  path = jaxbn.emit(Tiny(), np.zeros((1, 3, 8, 8), np.float32), tmp_path / "net", api=api)
  linen_head, nnx_head = (
      ("  num_classes: int = 10\n", 'layers.Linear(features=self.num_classes, name="fc")'),
      (
          "def __init__(self, num_classes: int = 10, *,",
          "jaxbn.nnx.Linear(in_features=4, features=num_classes, rngs=rngs)",
      ),
  )
  field, head = linen_head if api == "linen" else nnx_head
  text = path.read_text()
  assert field in text and head in text
  path.write_text(text.replace(field, field.replace("10", "5")))
  loaded = load_source(path, f"edited_{api}").load(strict=False)
  variables = loaded[1] if api == "linen" else loaded
  state_dict = jaxbn.load_state_dict(tmp_path / "net" / "model.safetensors")
  ours = jaxbn.convert.to_state_dict(variables)
  assert ours["fc.weight"].shape == (5, 4)
  for key, value in state_dict.items():
    if not key.startswith("fc."):
      np.testing.assert_array_equal(ours[key], value, err_msg=key)
  report = jaxbn.convert.from_torch(state_dict, variables, strict=False)
  assert [m[0] for m in report.mismatched] == ["fc.bias", "fc.weight"]
  # the fresh head is the model's own initialisation (key 0 / nnx.Rngs(0)), made alone under jit
  if api == "linen":
    initial = loaded[0].init(jax.random.key(0), jnp.zeros((1, 3, 8, 8)))
  else:
    initial = load_source(path, f"edited_{api}_again").Tiny(rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(ours["fc.weight"], jaxbn.convert.to_state_dict(initial)["fc.weight"])


class CallsMembers(torch.nn.Module):
  """A ModuleList iterated and a ModuleDict indexed in forward: members called one by one, in
  forwards that differ between train and eval (ultralytics' detection models)."""

  def __init__(self):
    super().__init__()
    self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
    self.blocks = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        for _ in range(3)
    )
    self.norms = torch.nn.ModuleDict({"a": torch.nn.BatchNorm2d(8), "b": torch.nn.BatchNorm2d(8, momentum=None)})

  def forward(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = x + block(x)
    pooled = self.norms["b"](self.norms["a"](x)).mean((2, 3))
    return {"pooled": pooled, "features": x} if self.training else pooled


@pytest.mark.parametrize("api", list(PORTS))
def test_members_of_containers_called_one_by_one(api, tmp_path):
  """ModuleList / ModuleDict members at torch's paths (``blocks.1.0``, ``norms.b``) in a
  ``layers.ModuleList`` / ``nnx.Dict``; eval, a training forward and its statistics within float32
  rounding of torch (1e-6 of the largest output, statistics 1e-6 relative to max(|value|, 1))."""
  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
  eval_rel, train_rel, stats_rel = eval_and_training_forward(CallsMembers(), x, PORTS[api](tmp_path))
  assert eval_rel <= 1e-6 and train_rel <= 1e-6 and stats_rel <= 1e-6, (eval_rel, train_rel, stats_rel)
  text = (tmp_path / "emitted0" / "model.py").read_text()
  assert ("layers.ModuleList(" if api == "linen" else "nnx.Dict(") in text


class Fused(torch.nn.Module):
  """timm's HRNet fuse layers: a ModuleList of ModuleLists, members called as ``fuse[i][j]``
  (Sequentials and an Identity), never the inner lists themselves."""

  def __init__(self):
    super().__init__()
    self.branches = torch.nn.ModuleList(torch.nn.Conv2d(4, 4, 3, padding=1) for _ in range(2))
    self.fuse = torch.nn.ModuleList(
        torch.nn.ModuleList(
            torch.nn.Identity() if i == j else torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4))
            for j in range(2)
        )
        for i in range(2)
    )

  def forward(self, x):
    xs = [branch(x) for branch in self.branches]
    return [sum(self.fuse[i][j](xs[j]) for j in range(2)) for i in range(2)]


@pytest.mark.parametrize("api", list(PORTS))
def test_members_of_containers_in_containers(api, tmp_path):
  """``fuse[i][j]`` at torch's paths (``fuse.0.1.0``): nested ``layers.ModuleList`` / ``nnx.Dict``
  (was refused); eval, a training forward and its statistics within float32 rounding (1e-6)."""
  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((4, 4, 6, 6)).astype(np.float32)
  eval_rel, train_rel, stats_rel = eval_and_training_forward(Fused(), x, PORTS[api](tmp_path))
  assert eval_rel <= 1e-6 and train_rel <= 1e-6 and stats_rel <= 1e-6, (eval_rel, train_rel, stats_rel)
  text = (tmp_path / "emitted0" / "model.py").read_text()
  nested = 'fuse("0.1", ' if api == "linen" else 'self.fuse["0"]["1"]('
  assert nested in text, text
  # Python's sum() of the levels, which the trace records as 0 + a + b: the same additions, one line
  assert text.count("sum([") == 2 and " = 0 + " not in text, text


class ClassifyOrFeatures(torch.nn.Module):
  """ultralytics' Classify: its logits in train, and the features too in eval."""

  def __init__(self):
    super().__init__()
    self.linear = torch.nn.Linear(4, 3)

  def forward(self, x):
    y = self.linear(x.mean((2, 3)))
    return y if self.training else (y, x)


class IteratedWithAHeadThatDiffers(torch.nn.Module):
  """A container iterated member by member: a chain in train, not in eval (its last member returns two
  values there)."""

  def __init__(self):
    super().__init__()
    self.model = torch.nn.ModuleList(
        [torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), ClassifyOrFeatures()]
    )

  def forward(self, x):
    for module in self.model:
      x = module(x)
    return x


@pytest.mark.parametrize("api", list(PORTS))
def test_a_container_chained_in_one_mode_only_is_one_container(api, tmp_path):
  """Was a ``layers.Sequential`` named ``model`` in the train branch beside the ``layers.ModuleList``
  named ``model`` that eval's calls use (flax: NameInUseError; NNX: a Dict called). Now one
  container, its members called once above the branch where the modes part; through the harness
  (float64 lock-step within its 1e-9)."""
  port_harness.run(Case(IteratedWithAHeadThatDiffers, (4, 3, 6, 6), floor=1e-5), via="emit", api=api)
  text = jaxbn.emit(IteratedWithAHeadThatDiffers(), torch.zeros(2, 3, 6, 6), tmp_path / "e", api=api).read_text()
  model = text.split("class IteratedWithAHeadThatDiffers(")[1]
  member = 'model("1", ' if api == "linen" else 'self.model["1"]('
  mode = "if train:" if api == "linen" else "if not self.deterministic:"
  assert model.count(member) == 1 and model.index(member) < model.index(mode), model
  assert "Sequential" not in model, model


class AuxiliaryInTrain(torch.nn.Module):
  """ultralytics' SemanticSegment: reads its second level only in train (an auxiliary head)."""

  def __init__(self):
    super().__init__()
    self.main, self.aux = torch.nn.Conv2d(4, 2, 1), torch.nn.Conv2d(4, 2, 1)

  def forward(self, levels):
    y = self.main(levels[0])
    return (y, self.aux(levels[1])) if self.training else y


class Segmenter(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    self.head = AuxiliaryInTrain()

  def forward(self, x):
    x = self.stem(x)
    return self.head([x, F.avg_pool2d(x, 2)])


@pytest.mark.parametrize("api", list(PORTS))
def test_a_module_that_reads_other_inputs_in_eval_is_written_inline(api, tmp_path):
  """One class has one signature: a module that reads more values in train than in eval is its
  caller's code in both modes (was refused: "a module takes different inputs in train and eval
  mode"), its children at torch's paths below it. Through the harness (float64 lock-step within
  its 1e-9)."""
  port_harness.run(Case(Segmenter, (4, 3, 8, 8), floor=1e-5), via="emit", api=api)
  text = jaxbn.emit(Segmenter(), torch.zeros(2, 3, 8, 8), tmp_path / "e", api=api).read_text()
  aux = 'head("aux", ' if api == "linen" else 'self.head["aux"]('
  assert "class AuxiliaryInTrain" not in text and aux in text, text


class LossInTrain(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.bn = torch.nn.BatchNorm1d(4)

  def forward(self, x, target=None):
    y = self.bn(x)
    return (y - target).square().mean() if self.training else y


def test_a_model_that_reads_an_input_in_one_mode_only_is_refused_naming_it(tmp_path):
  """The source's model has one signature; the error names the input and the way out."""
  with pytest.raises(jaxbn.PortError, match=r"reads inputs in one mode only \(target\).*emit a wrapper"):
    jaxbn.emit(LossInTrain(), (torch.zeros(4, 4), torch.zeros(4, 4)), tmp_path / "e")


class Decoder(torch.nn.Module):
  """Calls its own layers and the heads and position encoding its caller passes it."""

  def __init__(self):
    super().__init__()
    self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

  def forward(self, x, heads, position):
    outputs = []
    for layer, head in zip(self.layers, heads, strict=True):
      x = layer(x + position(x))
      if self.training or head is heads[-1]:  # eval: the last head only
        outputs.append(head(x))
    return torch.stack(outputs)


class HeadsAsArguments(torch.nn.Module):
  """ultralytics' RT-DETR: the model passes its heads to its decoder, whose forward calls them."""

  def __init__(self):
    super().__init__()
    self.bn, self.decoder = torch.nn.BatchNorm1d(4), Decoder()
    self.heads = torch.nn.ModuleList(torch.nn.Linear(4, 2) for _ in range(2))
    self.position = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())

  def forward(self, x):
    return self.decoder(self.bn(x), self.heads, self.position)


# inlining happens in the call tree, after the layout pass: NHWC in the full run (make test-models)
@pytest.mark.parametrize("layout", ["NCHW", pytest.param("NHWC", marks=pytest.mark.full_models)])
@pytest.mark.parametrize("api", list(PORTS))
def test_a_module_that_calls_modules_it_is_passed_is_written_inline(api, layout, tmp_path):
  """A class for the decoder could not hold the heads at torch's paths (was refused): its code is
  written in its caller, its layers a container at ``decoder``. The modes differ only from the
  first head on: what both run is written once, above one ``if`` on the mode. Through the harness
  (strict round trip, float64 lock-step within its 1e-9, float32 within 1e-5) and, in the model's
  source, ``num_classes`` (the last head's size) as the model's field."""
  port_harness.run(Case(HeadsAsArguments, (4, 4), floor=1e-5), via="emit", api=api, layout=layout)
  text = jaxbn.emit(HeadsAsArguments(), torch.zeros(4, 4), tmp_path / "emitted", api=api, layout=layout).read_text()
  model = text.split("class HeadsAsArguments(")[1]
  assert "class Decoder" not in text and model.count("BatchNorm(") == 1, model
  layer = 'decoder("layers.0", ' if api == "linen" else 'self.decoder["layers"]["0"]('
  mode = "if train:" if api == "linen" else "if not self.deterministic:"
  assert model.index(layer) < model.index(mode) and model.count(mode) == 1 and "else:" in model, model
  # the last head is the classifier in both branches: num_classes sizes it (was a field no layer read)
  assert ("features=self.num_classes" if api == "linen" else "features=num_classes") in model, model
  assert "for i in range(2)" in model, model  # the decoder's layers, built alike


class CalledTwice(torch.nn.Module):
  """A child called more than once in one forward: a convolution shared by two levels and a
  stateless position encoding per level (EdgeTAM's neck), in train and eval."""

  def __init__(self):
    super().__init__()
    self.shared, self.bn = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
    self.encoding = torch.nn.Hardswish()

  def forward(self, x):
    levels = [x, F.avg_pool2d(x, 2)]
    return [self.bn(self.shared(level)) + self.encoding(level) for level in levels]


@pytest.mark.parametrize("api", list(PORTS))
def test_a_child_called_twice_is_built_once(api, tmp_path):
  """Linen names a submodule where it is built: the source builds it once above its calls;
  eval, a training forward and its statistics within float32 rounding of torch (1e-6)."""
  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32)
  eval_rel, train_rel, stats_rel = eval_and_training_forward(CalledTwice(), x, PORTS[api](tmp_path))
  assert eval_rel <= 1e-6 and train_rel <= 1e-6 and stats_rel <= 1e-6, (eval_rel, train_rel, stats_rel)
  if api == "linen":
    text = (tmp_path / "emitted0" / "model.py").read_text()
    assert text.count('name="shared"') == 1 and "shared(x" in text, text


class Block(torch.nn.Module):
  """MobileNetV2's InvertedResidual, trimmed: an expansion layer in some, a skip in others."""

  def __init__(self, channels, out, stride, expand):
    super().__init__()
    expansion = [torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 1), torch.nn.ReLU())] if expand else []
    self.conv = torch.nn.Sequential(
        *expansion,
        torch.nn.Conv2d(channels, out, 3, stride, 1, groups=math.gcd(channels, out)),
        torch.nn.BatchNorm2d(out),
    )
    self.skip = channels == out and stride == 1

  def forward(self, x):
    return x + self.conv(x) if self.skip else self.conv(x)


class Variants(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.blocks = torch.nn.Sequential(
        Block(3, 3, 1, False), Block(3, 6, 2, True), Block(6, 6, 1, True), Block(6, 6, 1, True)
    )
    self.head = torch.nn.Linear(6, 7)

  def forward(self, x):
    return self.head(self.blocks(x).mean((2, 3)))


@pytest.mark.parametrize("api", list(PORTS))
def test_classes_are_named_for_what_differs_and_hold_their_sizes_as_fields(api, tmp_path):
  """One torch class in three shapes: named for what differs (a skip; a Sequential of 2 where the
  others have 3), not by a counter; every class's sizes are fields; the model's head is
  ``num_classes``. Parity as in the test above (1e-6)."""
  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
  eval_rel, train_rel, stats_rel = eval_and_training_forward(Variants(), x, PORTS[api](tmp_path))
  assert eval_rel <= 1e-6 and train_rel <= 1e-6 and stats_rel <= 1e-6, (eval_rel, train_rel, stats_rel)
  text = (tmp_path / "emitted0" / "model.py").read_text()
  classes = re.findall(r"^class (\w+)\(", text, re.M)
  assert classes == ["BlockWithSkipWith2Conv", "Block", "BlockWithSkip", "Variants"], classes
  once = text.split("class BlockWithSkipWith2Conv(")[1].split("\nclass ")[0]  # called once: sizes still fields
  assert re.search(r"conv_0_(in_|out_)?features", once) and "groups=3" not in once
  assert "num_classes: int = 7" in text
  assert re.search(r"\*\(BlockWithSkip\(conv_0_0_(in_)?features=6(, rngs=rngs)?\) for _ in range\(2\)\)", text)


class LoopedStage(torch.nn.Module):
  """transformers' ResNetStage: a first block, then ``depth - 1`` alike, iterated in forward."""

  def __init__(self, channels: int, out: int, depth: int):
    super().__init__()
    self.layers = torch.nn.Sequential(
        Block(channels, out, 2, True), *(Block(out, out, 1, True) for _ in range(depth - 1))
    )

  def forward(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class LoopedStages(torch.nn.Module):
  """Stages of depth 2, 3 and 4 in a ModuleList, iterated too."""

  def __init__(self):
    super().__init__()
    self.stages = torch.nn.ModuleList([LoopedStage(3, 4, 2), LoopedStage(4, 6, 3), LoopedStage(6, 6, 4)])

  def forward(self, x):
    for stage in self.stages:
      x = stage(x)
    return x.mean((2, 3))


@pytest.mark.parametrize(("api", "layout"), [("linen", "NCHW"), ("nnx", "NHWC")])
def test_looped_stages_source_passes_the_port_harness(api, layout):
  """The next test's model through the port's harness (float64 lock-step over 2 steps; outputs
  within 1e-5 of the largest, float32): each API and each layout once."""
  port_harness.run(
      Case(LoopedStages, (4, 3, 16, 16), floor=1e-5, loss="mean_square"), via="emit", api=api, layout=layout
  )


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("api", list(PORTS))
def test_a_container_iterated_in_forward_is_a_sequential_and_its_depth_a_field(api, layout, tmp_path):
  """``for layer in self.layers: x = layer(x)`` is the container called as a Sequential; stages
  that differ only in how many blocks repeat are one class with that count a field (transformers'
  ResNet: was a class per depth, and NNX refused the deeper one's optional member)."""
  path = jaxbn.emit(LoopedStages(), torch.zeros(1, 3, 16, 16), tmp_path / "looped", api=api, layout=layout)
  text = path.read_text()
  classes = re.findall(r"^class (\w+)\(", text, re.M)
  assert classes == ["Block", "BlockWithSkip", "LoopedStage", "LoopedStages"], classes
  assert re.search(r"BlockWithSkip\([^()]*\)\s+for _ in range\((self\.)?layers_1_repeats\)", text), text
  assert "ModuleList" not in text and "nnx.Dict" not in text


class ResidualStage(torch.nn.Module):
  """A ModuleList iterated, the first member's value read again at the end: no Sequential."""

  def __init__(self, depth: int):
    super().__init__()
    self.blocks = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)) for _ in range(depth)
    )

  def forward(self, x):
    first = x = self.blocks[0](x)
    for block in self.blocks[1:]:
      x = block(x)
    return x + first


class ResidualStages(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.a, self.b = ResidualStage(2), ResidualStage(3)

  def forward(self, x):
    return self.b(self.a(x))


@pytest.mark.parametrize("api", list(PORTS))
def test_a_member_some_calls_of_a_class_have_is_behind_a_flag(api, tmp_path):
  """Stages of 2 and 3 members: one class, the third member behind a flag (NNX refused it: an
  ``nnx.Dict`` member that is None where the flag is off). Eval, a training forward and its
  statistics within float32 rounding of torch (1e-6)."""
  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32)
  eval_rel, train_rel, stats_rel = eval_and_training_forward(ResidualStages(), x, PORTS[api](tmp_path))
  assert eval_rel <= 1e-6 and train_rel <= 1e-6 and stats_rel <= 1e-6, (eval_rel, train_rel, stats_rel)
  text = (tmp_path / "emitted0" / "model.py").read_text()
  assert re.findall(r"^class (\w+)\(", text, re.M) == ["ResidualStage", "ResidualStages"], text
  assert "with_blocks_2" in text


class Uncalled(torch.nn.Module):
  """A child whose forward leaves out a Linear and a Sequential (RT-DETR's denoising head, smp's
  shallower encoders), and a BatchNorm the model's own forward never calls."""

  def __init__(self):
    super().__init__()
    self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
    self.unused = torch.nn.Linear(4, 5)
    self.extra = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4))

  def forward(self, x):
    return self.bn(self.conv(x))


class HoldsUncalled(torch.nn.Module):
  """And a ModuleList whose forward runs the first two stages of three (smp's shallower encoders)."""

  def __init__(self):
    super().__init__()
    self.inner, self.spare, self.head = Uncalled(), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 3)
    self.stages = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)) for _ in range(3)
    )

  def forward(self, x):
    x = self.inner(x)
    for stage in self.stages[:2]:
      x = stage(x)
    return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("api", list(PORTS))
def test_modules_forward_never_calls_are_held_at_their_paths(api, layout, tmp_path):
  """Their tensors are a ``Held`` in the class of the nearest module forward calls, at torch's
  paths below it (was refused): the harness's strict round trip keeps them bit for bit, and over 2
  steps in float64 lock-step they never move (frozen, as torch's optimiser leaves them)."""
  port_harness.run(Case(HoldsUncalled, (4, 3, 8, 8), floor=1e-5), via="emit", api=api, layout=layout)
  with pytest.warns(jaxbn.TrainingRecipeWarning, match="never calls: inner/unused, inner/extra, spare"):
    text = jaxbn.emit(HoldsUncalled(), torch.zeros(1, 3, 8, 8), tmp_path / "held", api=api, layout=layout).read_text()
  inner = text.split("class Uncalled(")[1].split("\nclass ")[0]
  held = "layers.Held(" if api == "linen" else "jaxbn.nnx.Held("
  assert inner.count(held) == 2 and '"1.running_var": ((4,), "float32", "buffers")' in inner, inner
  model = text.split("class HoldsUncalled(")[1]
  assert "torch's forward never calls spare" in model and f'"2": {held}' in model, model


class Staged(torch.nn.Module):
  """timm's efficientnet shape: ``blocks``, a Sequential of stages, each a Sequential of blocks."""

  def __init__(self):
    super().__init__()
    self.blocks = torch.nn.Sequential(
        torch.nn.Sequential(Block(3, 6, 2, True)),
        torch.nn.Sequential(Block(6, 6, 1, True), Block(6, 6, 1, True)),
        torch.nn.Sequential(Block(6, 8, 2, True), Block(8, 8, 1, True)),
    )
    self.head = torch.nn.Linear(8, 5)

  def forward(self, x):
    return self.head(self.blocks(x).mean((2, 3)))


@pytest.mark.parametrize("api", list(PORTS))
def test_stages_of_blocks_are_a_table_and_a_loop(api, tmp_path):
  """A Sequential of stages is built from a module-level table of each stage's runs of blocks
  ``(class, how many, fields)`` (timm's efficientnet_b0: 342 lines of source before, 243 after);
  parity as in the tests above (1e-6)."""
  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
  eval_rel, train_rel, stats_rel = eval_and_training_forward(Staged(), x, PORTS[api](tmp_path))
  assert eval_rel <= 1e-6 and train_rel <= 1e-6 and stats_rel <= 1e-6, (eval_rel, train_rel, stats_rel)
  text = (tmp_path / "emitted0" / "model.py").read_text()
  assert "BLOCKS = (\n    ((Block, 1, dict(" in text
  assert "    ((BlockWithSkip, 2, dict(" in text  # a stage of one run of two blocks made the same way
  loop = "stage(runs, rngs) for runs in BLOCKS" if api == "nnx" else "stage(runs) for runs in BLOCKS"
  assert loop in text and "\ndef stage(runs" in text


class Stage(torch.nn.Module):
  """torchvision's regnet names its blocks ``block1-0``: some stages here have one, others not."""

  def __init__(self, extra: bool):
    super().__init__()
    self.conv = torch.nn.Conv2d(4, 4, 1)
    if extra:
      self.add_module("block1-0", torch.nn.Conv2d(4, 4, 1))

  def forward(self, x):
    for module in self.children():
      x = module(x)
    return x


class Stages(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.a, self.b, self.bn = Stage(False), Stage(True), torch.nn.BatchNorm2d(4)

  def forward(self, x):
    return self.bn(self.b(self.a(x)))


def test_a_class_named_for_a_child_that_is_no_identifier_is_one(tmp_path):
  """The variant with ``block1-0`` is ``StageWithBlock1_0`` (was ``StageWithBlock1-0``: source that
  did not parse, torchvision's regnet); eval and a training forward as in the tests above (1e-6)."""
  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
  eval_rel, train_rel, stats_rel = eval_and_training_forward(Stages(), x, PORTS["linen"](tmp_path))
  assert eval_rel <= 1e-6 and train_rel <= 1e-6 and stats_rel <= 1e-6, (eval_rel, train_rel, stats_rel)
  classes = re.findall(r"^class (\w+)\(", (tmp_path / "emitted0" / "model.py").read_text(), re.M)
  assert classes == ["Stage", "StageWithBlock1_0", "Stages"], classes


class NumberedStage(torch.nn.Module):
  """DenseNet's ``denselayer1`` .. and regnet's ``block3-0`` ..: children numbered by
  ``add_module``, as many as the stage is deep."""

  def __init__(self, name: str, depth: int):
    super().__init__()
    for i in range(depth):
      self.add_module(name.format(i + 1), torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)))

  def forward(self, x):
    for module in self.children():
      x = module(x)
    return x


class Projected(torch.nn.Module):
  """ResNet's block: a projection where the width changes."""

  def __init__(self, channels, out):
    super().__init__()
    self.conv = torch.nn.Conv2d(channels, out, 1)
    self.proj = (
        torch.nn.Sequential(torch.nn.Conv2d(channels, out, 1), torch.nn.BatchNorm2d(out)) if channels != out else None
    )

  def forward(self, x):
    out = self.conv(x)
    return out + (x if self.proj is None else self.proj(x))


class Head(torch.nn.Module):
  """Its caller calls one block without ``proj``; its last layer has one output, its first no groups."""

  def __init__(self):
    super().__init__()
    self.blocks = torch.nn.Sequential(Projected(4, 4), Projected(4, 6))
    self.mix = torch.nn.Conv2d(6, 6, 1, groups=1)
    self.out = torch.nn.Conv2d(6, 1, 1)

  def forward(self, x):
    return self.out(self.mix(self.blocks(x)))


class NumberedStages(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.dense = torch.nn.Sequential(*(NumberedStage("denselayer{}", depth) for depth in (2, 3, 2, 4)))
    self.stages = torch.nn.Sequential(*(NumberedStage(f"block{i}-{{}}", depth) for i, depth in ((1, 2), (2, 2))))
    self.head = Head()

  def forward(self, x):
    return self.head(self.stages(self.dense(x)))


def test_numbered_children_name_their_class_by_how_many_or_which(tmp_path):
  """A torch class whose calls differ in a numbered series of children is named by the series: how
  many (``NumberedStageWith4Denselayer``; was every layer it has that another has not: 680
  characters for DenseNet-201), or which (``NumberedStageWithBlock2``, was ``...WithBlock2_0``).
  A class's fields are sizes it sets: not ``groups=1`` that equals a layer's one output (was a
  ``mix_groups`` field that ``out`` read, ultralytics' Detect). Eval and a training forward as in
  the tests above."""
  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
  eval_rel, train_rel, stats_rel = eval_and_training_forward(NumberedStages(), x, PORTS["linen"](tmp_path))
  # train: 15 BatchNorms in a row, then one output channel summing six: 2e-6 of its largest value
  assert eval_rel <= 1e-6 and train_rel <= 2e-6 and stats_rel <= 1e-6, (eval_rel, train_rel, stats_rel)
  text = (tmp_path / "emitted0" / "model.py").read_text()
  classes = re.findall(r"^class (\w+)\(", text, re.M)
  assert sorted(classes) == [
      "Head",
      "NumberedStageWith3Denselayer",  # 2 or 3 deep: denselayer3 optional
      "NumberedStageWith4Denselayer",
      "NumberedStageWithBlock1",
      "NumberedStageWithBlock2",
      "NumberedStages",
      "Projected",
  ], classes
  head = text.split("class Head(")[1].split("\nclass ")[0]
  fields = re.findall(r"^  (\w+): ", head, re.M)
  assert "groups" not in head and all(field.endswith("features") for field in fields), (fields, head)


class PooledStage(torch.nn.Module):
  """timm's OsaStage: a MaxPool2d (a stateless module, an op in the source) where it downsamples."""

  def __init__(self, downsample: bool):
    super().__init__()
    self.pool = torch.nn.MaxPool2d(2) if downsample else None
    self.conv, self.bn = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)

  def forward(self, x):
    if self.pool is not None:
      x = self.pool(x)
    return self.bn(self.conv(x))


class SharedActivation(torch.nn.Module):
  """ultralytics' Conv: ``self.act = self.default_act``, one SiLU module for every Conv, whose torch
  path is the first Conv's (``model.0.act``) wherever it runs."""

  default_act = torch.nn.SiLU()

  def __init__(self):
    super().__init__()
    self.conv, self.bn, self.act = torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4), self.default_act

  def forward(self, x):
    return self.act(self.bn(self.conv(x)))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_a_class_that_runs_a_stateless_module_is_named_for_it(layout, tmp_path):
  """Two calls of a torch class that differ only in a MaxPool2d, run as an op: named for it
  (``PooledStageWithPool``; was ``PooledStage1``, a counter, as timm's ``OsaStage1``), in both
  layouts (channels-last writes Flax's pool for torch's). A stateless module another module holds
  (ultralytics' shared activation) names nothing, and is no refusal (the first version of this
  refused every ultralytics model: ``model.1 calls model.0.act, which it does not hold``)."""
  model = torch.nn.Sequential(PooledStage(False), PooledStage(True))
  text = jaxbn.emit(model, torch.zeros(2, 4, 8, 8), tmp_path / "e", layout=layout).read_text()
  assert re.findall(r"^class (\w+)\(", text, re.M) == ["PooledStage", "PooledStageWithPool", "Sequential"], text
  shared = torch.nn.Sequential(SharedActivation(), SharedActivation())
  text = jaxbn.emit(shared, torch.zeros(2, 4, 8, 8), tmp_path / "shared", layout=layout).read_text()
  assert re.findall(r"^class (\w+)\(", text, re.M) == ["SharedActivation", "Sequential"], text


class Levels(torch.nn.Module):
  """ultralytics' Detect: members of a container built alike, and a last layer whose size equals
  theirs by chance (Detect's class count and its hidden width, both 80)."""

  def __init__(self):
    super().__init__()
    self.levels = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), torch.nn.BatchNorm2d(8)) for _ in range(2)
    )
    self.out = torch.nn.Conv2d(8, 8, 1)

  def forward(self, x):
    return self.out(self.levels[0](x) + self.levels[1](x))


@pytest.mark.parametrize("api", list(PORTS))
def test_a_class_called_once_has_a_field_for_each_size_it_sets(api, tmp_path):
  """In a class called once, equal sizes say nothing of design: each layer's output size is a
  field of its own (``out``'s; was the members' field, as DenseNet's ``transition1`` read the dense
  layers' bottleneck width where both were 128), but for one layer in members built alike (one
  field), and an input size reads the output size it equals (NNX). Eval and a training forward
  within 1e-6 of torch."""
  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
  model = torch.nn.Sequential(Levels())
  eval_rel, train_rel, stats_rel = eval_and_training_forward(model, x, PORTS[api](tmp_path))
  assert eval_rel <= 1e-6 and train_rel <= 1e-6 and stats_rel <= 1e-6, (eval_rel, train_rel, stats_rel)
  text = (tmp_path / "emitted0" / "model.py").read_text()
  levels = text.split("class Levels(")[1].split("\nclass ")[0]
  if api == "linen":
    assert re.findall(r"^  (\w+): ", levels, re.M) == ["levels_0_0_features", "out_features"], levels
  else:
    signature = levels.split("def __init__(")[1].split("*,")[0]
    fields = re.findall(r"(\w+): int", signature)
    assert fields == ["levels_0_0_in_features", "levels_0_0_features", "out_features"], levels
    assert "in_features=levels_0_0_features, features=out_features" in levels, levels


class Encoder(torch.nn.Module):
  """smp's segmentation models: a torchvision ResNet below the model, its sizes fields."""

  def __init__(self):
    super().__init__()
    self.encoder = torchvision.models.resnet18(num_classes=3)

  def forward(self, x):
    return self.encoder(x)


def test_a_class_holds_no_field_of_value_none(tmp_path):
  """BatchNorm's ``axis_index_groups=None`` was a field of every ResNet below the model (smp's
  encoders, timm's tresnet: ``bn1_axis_index_groups: Any``, passed None), and so was the size of a
  layer that no call of a class has; neither is a field."""
  text = jaxbn.emit(Encoder().eval(), torch.zeros(1, 3, 32, 32), tmp_path / "e").read_text()
  resnet = text.split("class ResNet(")[1].split("\nclass ")[0]
  call = text.split("ResNet(")[-1].split(")(")[0]
  assert "axis_index_groups" not in text and ": Any" not in resnet and "None" not in call, (resnet, call)


def test_a_long_class_name_keeps_what_tells_it_apart():
  """A name past ``LONGEST`` keeps the fewest parts that say, against every other variant, what
  it has that the other has not (TextNet's four ``RepConvLayer`` variants ran to 112 characters);
  a short one keeps all (``BlockWithSkipWith2Conv`` above)."""
  assert naming.LONGEST == 64
  base, parts = "Layer", {
      "all": ["WithHorizontalBatchNorm", "WithHorizontalConv", "WithRbrIdentity", "WithVerticalBatchNorm"],
      "no identity": ["WithHorizontalBatchNorm", "WithHorizontalConv", "WithVerticalBatchNorm"],
      "vertical": ["WithRbrIdentity", "WithVerticalBatchNorm"],
      "short": ["WithSkip"],
  }
  chosen = naming._shortest(base, parts)
  assert chosen == {
      "all": "LayerWithHorizontalBatchNormWithRbrIdentity",
      "no identity": "LayerWithHorizontalBatchNorm",  # what "all" has more is not its to say
      "vertical": "LayerWithRbrIdentityWithVerticalBatchNorm",
      "short": "LayerWithSkip",
  }, chosen


class ChunkList(torch.nn.Module):
  """ultralytics' C2f: ``list(x.chunk(2, 1))``, whose length the trace checks twice."""

  def __init__(self):
    super().__init__()
    self.conv, self.bn = torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(6)

  def forward(self, x):
    y = list(self.conv(x).chunk(2, 1))
    y.append(y[-1] * 2)
    return self.bn(torch.cat(y, 1))


def test_a_check_the_trace_took_twice_is_written_once(tmp_path):
  """``list(x.chunk(2, 1))`` checks the chunk count twice (two ``assert y == 2`` lines, in every
  ultralytics C2f and C3k2): once. Eval and a training forward within float32 rounding (1e-6)."""
  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
  eval_rel, train_rel, stats_rel = eval_and_training_forward(ChunkList(), x, PORTS["linen"](tmp_path))
  assert eval_rel <= 1e-6 and train_rel <= 1e-6 and stats_rel <= 1e-6, (eval_rel, train_rel, stats_rel)
  text = (tmp_path / "emitted0" / "model.py").read_text()
  assert text.count("assert ") == 1 and "# torch: test_emit.py:" in text and "assert len(" in text, text


class WidthBranch(torch.nn.Module):
  """A Python branch on the input's shape (ultralytics' Detect: ``if self.shape != shape:``)."""

  def __init__(self):
    super().__init__()
    self.bn = torch.nn.BatchNorm2d(3)

  def forward(self, x):
    if x.shape[-1] != 8:
      x = x * 2
    return self.bn(x)


@pytest.mark.parametrize("api", list(PORTS))
def test_a_decision_on_a_shape_is_an_assert_of_the_comparison(api, tmp_path):
  """The trace took ``if x.shape[-1] != 8:`` as false on the example: the source checks the
  comparison it decided, ``assert x.shape[-1] == 8`` (was three lines: the comparison, ``bool()`` of
  it, and ``assert y == False``), torch's line a comment above; another width fails there, by that
  message."""
  x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
  eval_rel, train_rel, stats_rel = eval_and_training_forward(WidthBranch(), x, PORTS[api](tmp_path))
  assert eval_rel <= 1e-6 and train_rel <= 1e-6 and stats_rel <= 1e-6, (eval_rel, train_rel, stats_rel)
  path = tmp_path / "emitted0" / "model.py"
  text = path.read_text()
  check = r"# torch: test_emit\.py:\d+: if x\.shape\[-1\] != 8:\n *assert x\.shape\[-1\] == 8, \"specialised to the example input\""
  assert re.search(check, text) and "== False" not in text and "bool(" not in text, text
  loaded = load_source(path, f"emitted_branch_{api}").load()
  with pytest.raises(AssertionError, match="specialised to the example input"):
    loaded[0].apply(loaded[1], x[..., :6]) if api == "linen" else loaded(x[..., :6])


class NormAct(torch.nn.Module):

  def __init__(self, act_layer):
    super().__init__()
    from timm.layers import BatchNormAct2d

    self.conv, self.bn = torch.nn.Conv2d(8, 8, 3, padding=1), BatchNormAct2d(8, act_layer=act_layer)

  def forward(self, x):
    return self.bn(self.conv(x))


class TwoActivations(torch.nn.Module):
  """One block class, two calls whose timm BatchNormAct2d differ only in their activation."""

  def __init__(self):
    super().__init__()
    self.a, self.b = NormAct(torch.nn.ReLU), NormAct(torch.nn.Hardswish)

  def forward(self, x):
    return self.b(self.a(x))


@pytest.mark.parametrize("api", list(PORTS))
def test_a_field_holds_the_activation_where_calls_differ_in_it(api, tmp_path):
  """The activation of a BatchNormAct2d is a field of the class when its calls differ in it (a
  first version used the first call's activation for all: hardcorenas_b's eval output was 30x off);
  eval, a training forward and its statistics within float32 rounding of torch (1e-6)."""
  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((4, 8, 6, 6)).astype(np.float32)
  eval_rel, train_rel, stats_rel = eval_and_training_forward(TwoActivations(), x, PORTS[api](tmp_path))
  assert eval_rel <= 1e-6 and train_rel <= 1e-6 and stats_rel <= 1e-6, (eval_rel, train_rel, stats_rel)
  text = (tmp_path / "emitted0" / "model.py").read_text()
  assert "layers.chain(" in text and re.search(r"\bbn_after\b", text)


class IndexTable(torch.nn.Module):
  """A non-persistent buffer of 20 values read in forward (timm's attention-bias index tables,
  ultralytics' anchors)."""

  def __init__(self):
    super().__init__()
    self.bn = torch.nn.BatchNorm1d(4)
    self.register_buffer("index", torch.arange(20).remainder(7).reshape(4, 5), persistent=False)
    self.bias = torch.nn.Parameter(torch.linspace(-1, 1, 7))

  def forward(self, x):
    return self.bn(x)[:, :, None] + self.bias[self.index].sum()


@pytest.mark.parametrize("api", list(PORTS))
def test_large_constants_go_to_a_file_beside_the_source(api, tmp_path):
  """A tensor of over 16 values (``INLINE_CONSTANT``) is written to constants.safetensors, which
  model.py loads, not into the source (pyink wrote 4096 values one a line); the port's native NNX
  module gets it the same way. Outputs within 1e-6 of torch's largest: the forward sums 20 float32
  values, maybe in another order than torch; statistics 1e-6."""
  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
  eval_rel, train_rel, stats_rel = eval_and_training_forward(IndexTable(), x, PORTS[api](tmp_path))
  assert eval_rel <= 1e-6 and train_rel <= 1e-6 and stats_rel <= 1e-6, (eval_rel, train_rel, stats_rel)
  assert (tmp_path / "emitted0" / "constants.safetensors").exists()
  text = (tmp_path / "emitted0" / "model.py").read_text()
  assert "CONSTANTS = jaxbn.load_state_dict(" in text and "np.array(" not in text, text
  if api == "nnx":
    model, _ = jaxbn.port(IndexTable(), x, api="nnx")
    assert np.asarray(model(x)).shape == (6, 4, 1)


class NumberedChild(torch.nn.Module):
  """A child named ``0`` outside any Sequential (torchvision's regnet names blocks ``block1-0``)."""

  def __init__(self):
    super().__init__()
    self.add_module("0", torch.nn.Conv2d(3, 4, 1))
    self.bn = torch.nn.BatchNorm2d(4)

  def forward(self, x):
    return self.bn(getattr(self, "0")(x))


@pytest.mark.parametrize("api", list(PORTS))
def test_a_child_whose_name_is_no_identifier_keeps_torchs_name(api, tmp_path):
  """A child named ``0`` (regnet's ``block1-0``): NNX source builds it with ``setattr`` and calls
  it with ``getattr`` at torch's name (was refused), Linen names it; eval and a training forward
  within float32 rounding of torch (1e-6); port(api="nnx") is now the native NNX module."""
  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
  eval_rel, train_rel, stats_rel = eval_and_training_forward(NumberedChild(), x, PORTS[api](tmp_path))
  assert eval_rel <= 1e-6 and train_rel <= 1e-6 and stats_rel <= 1e-6, (eval_rel, train_rel, stats_rel)
  text = (tmp_path / "emitted0" / "model.py").read_text()
  if api == "nnx":
    assert 'setattr(self, "0", jaxbn.nnx.Conv(' in text and 'x = getattr(self, "0")(x)' in text
    ported, _ = jaxbn.port(NumberedChild(), x, api="nnx")
    assert type(ported).__name__ == "NumberedChild"
  else:
    assert "name='0'" in text or 'name="0"' in text


def test_variants_that_differ_in_their_inputs_are_named_for_them(tmp_path):
  """Two calls of nn.MultiheadAttention, one with a mask: ``MultiheadAttention`` and
  ``MultiheadAttentionWith3Inputs`` (was ``MultiheadAttention1``). The module traced through, its
  forward one op on its torch-named tensors."""
  from parity_tests.test_port_ops import DetectionQueries

  torch.manual_seed(0)
  x = np.random.default_rng(0).standard_normal((2, 3, 6, 7)).astype(np.float32)
  text = jaxbn.emit(DetectionQueries(), x, tmp_path / "queries").read_text()
  classes = re.findall(r"^class (\w+)\(", text, re.M)
  assert classes == ["MultiheadAttention", "MultiheadAttentionWith3Inputs", "DetectionQueries"], classes
  assert "ops.multi_head_attention_forward(" in text and "ops.grid_sample(" in text


class SamePadding(torch.nn.Module):
  """transformers' MobileNetV2 layers: TensorFlow's "same" padding from the input's size, read as
  Python ints (a decision the trace takes on the example's shapes)."""

  def __init__(self, stride):
    super().__init__()
    self.conv, self.bn = torch.nn.Conv2d(4, 4, 3, stride), torch.nn.BatchNorm2d(4)

  def forward(self, x):
    in_height = int(x.shape[-2])
    in_width = int(x.shape[-1])
    pad_height, pad_width = max(3 - in_height % 2, 0), max(3 - in_width % 2, 0)
    x = F.pad(x, (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2))
    return self.bn(self.conv(x))


class SamePaddingStages(torch.nn.Sequential):

  def __init__(self):
    super().__init__(SamePadding(2), SamePadding(1), SamePadding(1))


@pytest.mark.parametrize(("api", "layout"), [("linen", "NCHW"), ("nnx", "NHWC")])
def test_calls_specialised_to_other_sizes_are_one_class_with_the_sizes_as_fields(api, layout, tmp_path):
  """A layer that reads its input's size as Python ints is specialised to the example's sizes
  (asserted where it runs); its calls at other sizes are one class, each size a field named for
  torch's variable, height and width apart where they are equal (was one class per size:
  ``SamePadding1``, as transformers' MobileNetV2's ``MobileNetV2ConvLayer1`` .. ``4``). Through
  the harness (float64 lock-step within its 1e-9)."""
  port_harness.run(Case(SamePaddingStages, (4, 4, 9, 9), floor=1e-5), via="emit", api=api, layout=layout)
  text = jaxbn.emit(SamePaddingStages(), torch.zeros(2, 4, 9, 9), tmp_path / "e", api=api, layout=layout).read_text()
  assert [c for c in re.findall(r"^class (\w+)\(", text, re.M) if c.startswith("Same")] == [
      "SamePadding",
      "SamePaddingStages",
  ], text
  for name in ("in_height", "in_width"):
    assert re.search(rf"assert int\(\w+\) == self\.{name}, \"specialised to the example input\"", text), text
  assert text.count("in_height=5") == 2 and text.count("in_height=9") == 1, text  # 9, then 5 after stride 2


class ActivatedBlock(torch.nn.Module):
  """MobileNetV3's blocks: torchvision's Conv2dNormActivation (a Sequential) with the block's activation."""

  def __init__(self, activation):
    super().__init__()
    self.conv = torchvision.ops.Conv2dNormActivation(4, 4, 3, activation_layer=activation)

  def forward(self, x):
    return self.conv(x)


class TwoActivatedBlocks(torch.nn.Sequential):

  def __init__(self):
    super().__init__(ActivatedBlock(torch.nn.ReLU), ActivatedBlock(torch.nn.Hardswish))


def test_variants_that_differ_in_the_functions_they_run_are_named_for_them(tmp_path):
  """Two calls of one block class whose Sequentials end in another activation: named for it,
  ``ActivatedBlockWithRelu`` and ``ActivatedBlockWithHardswish`` (was ``ActivatedBlock1``, as
  torchvision's MobileNetV3 ``InvertedResidual1``)."""
  x = np.zeros((2, 4, 6, 6), np.float32)
  text = jaxbn.emit(TwoActivatedBlocks(), x, tmp_path / "blocks").read_text()
  classes = re.findall(r"^class (\w+)\(", text, re.M)
  assert classes[:2] == ["ActivatedBlockWithRelu", "ActivatedBlockWithHardswish"], classes


@pytest.mark.parametrize("api", list(PORTS))
def test_a_module_that_takes_a_list_is_one_class_taking_its_items(api, tmp_path):
  """DenseNet's layer takes the list of every feature map before it: one class, ``__call__(self,
  *xs)``, for every length (was one class per count, ``_DenseLayerWith2Inputs`` .. ``With48Inputs``
  in DenseNet-201). Its block, which calls ``denselayer1`` .. on the growing list, is torch's loop,
  one class with the count a field for blocks of 3 and 2 layers (was one class per count, each
  layer a statement: ``_DenseBlockWith24Denselayer``); NNX builds the layers in a loop too, each
  one's input size ``denselayer_norm1_num_features + i * growth``. Eval and a training forward
  within float32 rounding of torch (1e-6)."""
  torch.manual_seed(0)
  densenet = torchvision.models.DenseNet(growth_rate=4, block_config=(3, 2), num_init_features=8, num_classes=5)
  x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
  eval_rel, train_rel, stats_rel = eval_and_training_forward(densenet, x, PORTS[api](tmp_path))
  assert eval_rel <= 1e-6 and train_rel <= 1e-6 and stats_rel <= 1e-6, (eval_rel, train_rel, stats_rel)
  text = (tmp_path / "emitted0" / "model.py").read_text()
  classes = [name for name in re.findall(r"^class (\w+)\(", text, re.M) if name.startswith("_Dense")]
  assert classes == ["_DenseLayer", "_DenseBlock"], classes
  layer = text.split("class _DenseLayer(")[1].split("\nclass ")[0]
  assert "def __call__(self, *xs" in layer and "x = ops.cat(xs, 1)" in layer, layer
  block = text.split("class _DenseBlock(")[1].split("\nclass ")[0]
  assert "num_denselayers: int" in block, block
  assert "features = [x]" in block and "x = ops.cat(features, 1)" in block, block
  assert block.count("_DenseLayer(") == 1 and 'f"denselayer{i + 1}"' in block, block
  if api == "nnx":
    growing = r"norm1_num_features=denselayer_norm1_num_features \+ i \* denselayer_conv2_features,"
    assert re.search(growing, block), block
  assert text.count("num_denselayers=3") == 1 and text.count("num_denselayers=2") == 1, text


class ConvBnAct(torch.nn.Sequential):

  def __init__(self, inputs, outputs, kernel_size=1):
    super().__init__(
        torch.nn.Conv2d(inputs, outputs, kernel_size, padding=kernel_size // 2, bias=False),
        torch.nn.BatchNorm2d(outputs),
        torch.nn.SiLU(),
    )


class Bottleneck(torch.nn.Module):

  def __init__(self, channels, shortcut):
    super().__init__()
    self.cv1, self.cv2 = ConvBnAct(channels, channels, 3), ConvBnAct(channels, channels, 3)
    self.add = shortcut

  def forward(self, x):
    return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(torch.nn.Module):
  """ultralytics' C2f: each of ``m``'s blocks reads the last value of a list, the list then read whole."""

  def __init__(self, inputs, outputs, depth, shortcut=True):
    super().__init__()
    hidden = outputs // 2
    self.cv1 = ConvBnAct(inputs, 2 * hidden)
    self.m = torch.nn.ModuleList(Bottleneck(hidden, shortcut) for _ in range(depth))
    self.cv2 = ConvBnAct((2 + depth) * hidden, outputs)

  def forward(self, x):
    y = list(self.cv1(x).chunk(2, 1))
    y.extend(m(y[-1]) for m in self.m)
    return self.cv2(torch.cat(y, 1))


class ConvUnit(torch.nn.Module):

  def __init__(self, inputs, outputs):
    super().__init__()
    self.conv, self.bn = torch.nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), torch.nn.BatchNorm2d(outputs)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class HGBlock(torch.nn.Module):
  """ultralytics' HGBlock: the list starts with the input, which the first member reads (NNX: an
  input size the other members do not have)."""

  def __init__(self, inputs, hidden, outputs, depth):
    super().__init__()
    self.m = torch.nn.ModuleList(ConvUnit(inputs if i == 0 else hidden, hidden) for i in range(depth))
    self.ec = ConvBnAct(inputs + depth * hidden, outputs)

  def forward(self, x):
    y = [x]
    y.extend(m(y[-1]) for m in self.m)
    return self.ec(torch.cat(y, 1))


class ChainedStages(torch.nn.Sequential):

  def __init__(self):
    super().__init__(
        ConvBnAct(3, 8, 3),
        C2f(8, 8, 1),
        C2f(8, 12, 2),
        C2f(12, 8, 3),
        C2f(8, 8, 1, shortcut=False),
        HGBlock(8, 4, 8, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )


@pytest.mark.parametrize(("api", "layout"), [("linen", "NCHW"), ("nnx", "NHWC")])
def test_chained_stages_source_passes_the_port_harness(api, layout):
  """The source of the next test's model: both APIs, both layouts, through the harness (float64
  lock-step within its 1e-9)."""
  port_harness.run(Case(ChainedStages, (4, 3, 8, 8), floor=1e-5), via="emit", api=api, layout=layout)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("api", list(PORTS))
def test_a_container_whose_members_each_read_the_last_value_of_a_list_is_a_loop(api, layout, tmp_path):
  """ultralytics' C2f (``y.extend(m(y[-1]) for m in self.m)``, then ``torch.cat(y, 1)``) is torch's
  loop over its ModuleList, one class with the depth a field for depths 1, 2 and 3 (was one class
  per depth, each member a statement: ``C2fWith2M``, ``C2fWith3M``; depth 1 a one-member
  Sequential); the class of the C2f whose blocks add no shortcut, of depth 1 wherever it is
  called, loops too, its depth a field (not ``range(1)``). A loop builds every member of its
  container (a loop from the second member was a second ``self.m = nnx.Dict(...)`` for the first,
  which replaced the loop's, and did not load): where the first member's sizes differ (HGBlock's
  input size in NNX) the loop writes torch's ``inputs if i == 0 else hidden`` (was every member
  written out)."""
  text = jaxbn.emit(ChainedStages(), torch.zeros(2, 3, 8, 8), tmp_path / "e", api=api, layout=layout).read_text()
  classes = [name for name in re.findall(r"^class (\w+)\(", text, re.M) if name.startswith("C2f")]
  assert len(classes) == 2, classes  # blocks with and without the shortcut
  for name in classes:
    block = text.split(f"class {name}(")[1].split("\nclass ")[0]
    loop = r"features = \[y, x\]\n *for i in range\(self\.num_m\):\n *features\.append\("
    assert re.search(loop, block) and "features[-1]" in block and "ops.cat(features, " in block, block
    built = (
        r"ModuleList\(\s*\{\s*str\(i\): Bottleneck"
        if api == "linen"
        else r"self\.m = nnx\.Dict\(\s*\{\s*str\(i\): Bottleneck"
    )
    assert block.count("Bottleneck") == 1 and re.search(built, block) and "for i in range(" in block, block
  assert [text.count(f"num_m={depth}") for depth in (1, 2, 3)] == [2, 1, 2], text  # HGBlock's num_m=3 too
  block = text.split("class HGBlock(")[1].split("\nclass ")[0]
  assert block.count("ModuleList(" if api == "linen" else "nnx.Dict(") == 1, block
  assert "features.append(" in block and block.count("ConvUnit(") == 1, block
  if api == "nnx":  # m.0's input size differs from the others'
    assert re.search(r"conv_in_features=m_0_conv_in_features if i == 0 else m_conv_(out_)?features,", block), block


class Embedding(torch.nn.Module):
  """A positional encoding whose buffer its owner reads too (EdgeTAM's shared image embedding)."""

  def __init__(self):
    super().__init__()
    self.register_buffer("positional_embedding", torch.randn(2, 4))

  def forward(self, coordinates):
    return coordinates @ self.positional_embedding


class ReadsInsideAChild(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.embedding, self.bn = Embedding(), torch.nn.BatchNorm1d(4)

  def forward(self, x):
    grid = torch.ones(x.shape[0], 2, dtype=self.embedding.positional_embedding.dtype)
    return self.bn(self.embedding(grid) + x)


@pytest.mark.parametrize("api", list(PORTS))
def test_a_tensor_read_inside_a_child_the_model_calls_is_written_inline(api, tmp_path):
  """A class for the child and a container for what the model reads inside it would be two modules
  at one name (flax's NameInUseError when it loaded EdgeTAM's source; then refused by name): the
  child's code is written in the model, its buffer a container's member at its torch path. Through
  the harness (float64 lock-step within its 1e-9)."""
  port_harness.run(Case(ReadsInsideAChild, (4, 4), floor=1e-5), via="emit", api=api)
  text = jaxbn.emit(ReadsInsideAChild(), torch.zeros(4, 4), tmp_path / "e", api=api).read_text()
  read = 'embedding("positional_embedding")' if api == "linen" else 'self.embedding["positional_embedding"]'
  assert "class Embedding" not in text and read in text, text
