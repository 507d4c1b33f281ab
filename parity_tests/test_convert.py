"""jaxbn.convert and jaxbn.load_state_dict: layouts, rules, reports and bad checkpoints.

Layout tests run real torch modules and the converted Flax modules on the same input; outputs
agree to 2e-5 absolute on unit-scale data (float32 convolutions summing up to 27 products).
"""

from __future__ import annotations

import collections
import pickle
import subprocess
import sys

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

import jaxbn
from jaxbn.convert import ConversionError

ATOL = 2e-5


def convert_module(torch_module, flax_module, x_nchw):
  """Converts one torch module into ``flax_module``'s variables; returns both outputs."""
  state_dict = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
  x = np.moveaxis(x_nchw, 1, -1)
  template = jax.eval_shape(flax_module.init, jax.random.key(0), x)
  variables = jaxbn.convert.from_torch(state_dict, template).variables
  expected = np.moveaxis(torch_module(torch.from_numpy(x_nchw)).detach().numpy(), 1, -1)
  return np.asarray(flax_module.apply(variables, x)), expected, variables


class Wrap(nn.Module):
  """Puts a Flax layer at path ``layer`` (torch: ``Sequential(OrderedDict(layer=...))``)."""

  layer: nn.Module

  @nn.compact
  def __call__(self, x):
    return self.layer(x)  # a Module field is adopted as the child "layer"


@pytest.mark.parametrize(
    "torch_layer, flax_layer, shape",
    [
        (lambda: torch.nn.Conv1d(4, 6, 3, padding=1), nn.Conv(6, (3,), padding=1), (2, 4, 9)),
        (lambda: torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv(6, (3, 3), 2, padding=1), (2, 4, 7, 9)),
        (
            lambda: torch.nn.Conv2d(4, 8, 3, padding=1, groups=2),
            nn.Conv(8, (3, 3), padding=1, feature_group_count=2),
            (2, 4, 5, 5),
        ),
        (
            lambda: torch.nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
            nn.Conv(4, (3, 3), padding=1, feature_group_count=4, use_bias=False),
            (2, 4, 5, 5),
        ),
        (lambda: torch.nn.Conv3d(3, 5, 3, padding=1), nn.Conv(5, (3, 3, 3), padding=1), (2, 3, 4, 5, 3)),
        (lambda: torch.nn.Linear(5, 3), nn.Dense(3), (4, 5)),
    ],
    ids=["conv1d", "conv2d", "grouped", "depthwise", "conv3d", "linear"],
)
def test_kernel_layouts(torch_layer, flax_layer, shape):
  torch.manual_seed(0)
  torch_module = torch.nn.Sequential(collections.OrderedDict(layer=torch_layer()))
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  if len(shape) == 2:  # linear: no channel axis to move
    state_dict = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    template = jax.eval_shape(Wrap(flax_layer).init, jax.random.key(0), x)
    variables = jaxbn.convert.from_torch(state_dict, template).variables
    actual, expected = Wrap(flax_layer).apply(variables, x), torch_module(torch.from_numpy(x)).detach().numpy()
  else:
    actual, expected, variables = convert_module(torch_module, Wrap(flax_layer), x)
  np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=0)
  back = jaxbn.convert.to_state_dict(variables)
  for key, value in torch_module.state_dict().items():
    np.testing.assert_array_equal(back[key], value.numpy())


def trained_bn(channels=4):
  torch.manual_seed(0)
  bn = torch.nn.BatchNorm2d(channels)
  for _ in range(3):
    bn(torch.randn(4, channels, 3, 3) * 2 + 1)
  return bn.eval()


@pytest.mark.parametrize("source", ["BatchNorm2d", "FrozenBatchNorm2d"])
def test_into_frozen_batchnorm(source):
  """A BatchNorm2d or FrozenBatchNorm2d state_dict fills a FrozenBatchNorm; the counter of the
  former is dropped, as torchvision's FrozenBatchNorm2d does."""
  bn = trained_bn()
  torch_module = bn
  if source == "FrozenBatchNorm2d":
    torch_module = FrozenBatchNorm2d(4)
    torch_module.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
  wrapped = torch.nn.Sequential(collections.OrderedDict(layer=torch_module))
  x = np.random.default_rng(1).standard_normal((2, 4, 3, 3)).astype(np.float32)
  actual, expected, variables = convert_module(wrapped, Wrap(jaxbn.FrozenBatchNorm()), x)
  np.testing.assert_allclose(actual, expected, atol=2e-6, rtol=0)
  assert set(variables) == {"params"}


def test_old_checkpoint_without_counter_gets_zero():
  bn = trained_bn()
  state_dict = {k: v.numpy() for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
  template = jax.eval_shape(jaxbn.BatchNorm(use_running_average=True).init, jax.random.key(0), np.ones((2, 4)))
  converted = jaxbn.convert.from_torch(state_dict, template)
  assert int(converted.variables["batch_stats"]["num_batches_tracked"]) == 0
  assert converted.missing == [] and converted.unexpected == []


def test_counter_is_kept():
  bn = trained_bn()
  template = jax.eval_shape(jaxbn.BatchNorm(use_running_average=True).init, jax.random.key(0), np.ones((2, 4)))
  variables = jaxbn.convert.from_torch({k: v.numpy() for k, v in bn.state_dict().items()}, template).variables
  assert int(variables["batch_stats"]["num_batches_tracked"]) == 3
  assert jaxbn.convert.to_state_dict(variables)["num_batches_tracked"].dtype == np.int64


class Two(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name="conv")(x)
    return jaxbn.BatchNorm(use_running_average=True, name="bn")(x)


def two_state_dict():
  return {
      "conv.weight": np.zeros((4, 3, 3, 3), np.float32),
      "conv.bias": np.zeros(4, np.float32),
      "bn.weight": np.ones(4, np.float32),
      "bn.bias": np.zeros(4, np.float32),
      "bn.running_mean": np.zeros(4, np.float32),
      "bn.running_var": np.ones(4, np.float32),
      "bn.num_batches_tracked": np.array(0),
  }


def test_strict_reports_every_problem_at_once():
  template = jax.eval_shape(Two().init, jax.random.key(0), np.ones((1, 5, 5, 3)))
  state_dict = two_state_dict()
  del state_dict["bn.bias"]  # missing
  state_dict["head.weight"] = np.zeros((2, 4), np.float32)  # unexpected
  state_dict["conv.weight"] = np.zeros((4, 2, 3, 3), np.float32)  # wrong shape
  with pytest.raises(ConversionError) as info:
    jaxbn.convert.from_torch(state_dict, template)
  message = str(info.value)
  for part in [
      "missing (1",
      "params/bn/bias",
      "unexpected (1",
      "head.weight",
      "shape mismatch: conv.weight (4, 2, 3, 3) -> params/conv/kernel expects (3, 3, 3, 4)"
      " (torch layout (4, 3, 3, 3))",
      "these do not, e.g. head.weight",
      "rename=",
  ]:
    assert part in message, (part, message)
  report = jaxbn.convert.from_torch(state_dict, template, strict=False)
  assert report.unexpected == ["head.weight"]
  assert report.missing == ["params/bn/bias"]  # the wrongly shaped kernel is reported as that only
  assert report.mismatched == [("conv.weight", (4, 2, 3, 3), "params/conv/kernel", (3, 3, 3, 4))]


def test_rename_hint_only_when_paths_differ():
  template = jax.eval_shape(Two().init, jax.random.key(0), np.ones((1, 5, 5, 3)))
  state_dict = two_state_dict()
  state_dict["conv.weight"] = np.zeros((4, 2, 3, 3), np.float32)
  with pytest.raises(ConversionError) as info:
    jaxbn.convert.from_torch(state_dict, template)
  assert "rename=" not in str(info.value) and "missing" not in str(info.value), str(info.value)


def test_flax_linen_batchnorm_in_the_template_is_named():
  """Its num_batches_tracked has no place: say why, and name jaxbn.BatchNorm."""

  class FlaxBN(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=True, name="bn")(nn.Conv(4, (3, 3), name="conv")(x))

  template = jax.eval_shape(FlaxBN().init, jax.random.key(0), np.ones((1, 5, 5, 3)))
  with pytest.raises(
      ConversionError,
      match=r"bn: the Flax layer keeps batch_stats without num_batches_tracked, as"
      r" flax.linen.BatchNorm does.*jaxbn.BatchNorm",
  ) as info:
    jaxbn.convert.from_torch(two_state_dict(), template)
  assert "rename=" not in str(info.value)


def test_rename_maps_paths_that_differ():
  template = jax.eval_shape(Two().init, jax.random.key(0), np.ones((1, 5, 5, 3)))
  state_dict = {k.replace("conv.", "features.0.").replace("bn.", "features.1."): v for k, v in two_state_dict().items()}
  by_rules = jaxbn.convert.from_torch(
      state_dict, template, rename=[(r"^features\.0$", "conv"), (r"^features\.1$", "bn")]
  )
  by_function = jaxbn.convert.from_torch(state_dict, template, rename={"features.0": "conv", "features.1": "bn"}.get)
  assert jax.tree.structure(by_rules.variables) == jax.tree.structure(by_function.variables)
  back = jaxbn.convert.to_state_dict(by_rules.variables, rename={"conv": "features.0", "bn": "features.1"}.get)
  assert back.keys() == state_dict.keys()


def test_dtype_cast_and_bfloat16_round_trip(tmp_path):
  bn = trained_bn().to(torch.bfloat16)
  torch.save(bn.state_dict(), tmp_path / "bf16.pth")
  state_dict = jaxbn.load_state_dict(tmp_path / "bf16.pth")
  assert state_dict["weight"].dtype == ml_dtypes.bfloat16 and state_dict["num_batches_tracked"].dtype == np.int64
  template = jax.eval_shape(jaxbn.BatchNorm(use_running_average=True).init, jax.random.key(0), np.ones((2, 4)))
  variables = jaxbn.convert.from_torch(state_dict, template).variables
  assert variables["params"]["scale"].dtype == ml_dtypes.bfloat16
  restored = jaxbn.convert.to_torch(variables)
  for key, value in bn.state_dict().items():
    assert restored[key].dtype == value.dtype and restored[key].shape == value.shape, key
    assert torch.equal(restored[key], value), key
  cast = jaxbn.convert.from_torch(state_dict, template, dtype=np.float32).variables
  assert cast["params"]["scale"].dtype == np.float32


def test_to_state_dict_names_unknown_variables():
  with pytest.raises(ConversionError, match="no torch name for 1 Flax variable.*params/layer/weird"):
    jaxbn.convert.to_state_dict({"params": {"layer": {"weird": np.zeros(2)}}})


# --- checkpoint files ---------------------------------------------------------------------------


class RunsCode:

  def __reduce__(self):
    return (print, ("this pickle ran code",))


def test_code_running_pickle_is_refused(tmp_path, capsys):
  path = tmp_path / "evil.pth"
  with open(path, "wb") as f:
    pickle.dump({"weight": torch.zeros(2), "payload": RunsCode()}, f, protocol=2)
  with pytest.raises(jaxbn.CheckpointError, match="refused to unpickle.*could run code.*weights_only=False"):
    jaxbn.load_state_dict(path)
  assert "this pickle ran code" not in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_checkpoint(tmp_path, suffix):
  full = tmp_path / f"full{suffix}"
  jaxbn.save_state_dict({"weight": np.arange(1000, dtype=np.float32)}, full)
  truncated = tmp_path / f"truncated{suffix}"
  truncated.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
  with pytest.raises(jaxbn.CheckpointError, match="truncated or corrupt"):
    jaxbn.load_state_dict(truncated)


def test_missing_file_and_unknown_suffix(tmp_path):
  with pytest.raises(jaxbn.CheckpointError, match="no such file"):
    jaxbn.load_state_dict(tmp_path / "absent.pth")
  (tmp_path / "model.ckpt").write_bytes(b"")
  with pytest.raises(jaxbn.CheckpointError, match="unknown checkpoint type '.ckpt'"):
    jaxbn.load_state_dict(tmp_path / "model.ckpt")


def test_state_dict_nested_in_a_training_checkpoint(tmp_path):
  bn = trained_bn()
  torch.save({"state_dict": bn.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
  assert set(jaxbn.load_state_dict(tmp_path / "ckpt.pth")) == set(bn.state_dict())
  torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "other.pth")
  with pytest.raises(jaxbn.CheckpointError, match="not a state_dict.*top-level keys: \\['epoch', 'lr'\\]"):
    jaxbn.load_state_dict(tmp_path / "other.pth")


def test_safetensors_load_without_torch(tmp_path):
  path = tmp_path / "model.safetensors"
  jaxbn.save_state_dict({"bn.weight": np.ones(3, ml_dtypes.bfloat16), "bn.num_batches_tracked": np.array(5)}, path)
  code = (
      "import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
      "import jaxbn, ml_dtypes\n"
      f"sd = jaxbn.load_state_dict({str(path)!r})\n"
      "assert sd['bn.weight'].dtype == ml_dtypes.bfloat16 and int(sd['bn.num_batches_tracked']) == 5\n"
      "print('ok')\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_converted_variables_do_not_alias_torch_buffers():
  """``{k: t.numpy()}`` shares memory with torch; training torch on must not change jaxbn's copy."""
  bn = torch.nn.BatchNorm2d(4)
  template = jax.eval_shape(jaxbn.BatchNorm(use_running_average=True).init, jax.random.key(0), np.ones((2, 4)))
  variables = jaxbn.convert.from_torch({k: t.numpy() for k, t in bn.state_dict().items()}, template).variables
  bn(torch.randn(8, 4, 3, 3) + 5)  # updates running_mean in place
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)


@pytest.mark.parametrize("build", [torchvision.models.resnet18, torchvision.models.mobilenet_v3_small])
def test_to_state_dict_writes_keys_in_torchs_order(build):
  """Without ``like=``, each module's parameters then its buffers, in module order: the order of
  ``model.state_dict()`` (Flax keeps parameters and statistics in separate collections)."""
  model = build(num_classes=10)
  variables = jaxbn.port(model, np.zeros((1, 3, 32, 32), np.float32)).variables
  assert list(jaxbn.convert.to_state_dict(variables)) == list(model.state_dict())
  assert list(jaxbn.convert.to_torch(variables)) == list(model.state_dict())
