"""BatchNorm configuration travels with the weights, and bad running statistics are flagged.

eps and momentum decide whether a converted model behaves like the original, and a state_dict
holds neither: jaxbn records them (with affine, track_running_stats and the class) in the
.safetensors header, or in a batchnorm.json beside orbax and msgpack outputs, and checks them
when loading into a Flax model.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

import jaxbn
from jaxbn.convert import ConfigMismatchError, LayerConfig
from parity_tests.test_parity_report import Net, X, torch_net


def test_torch_module_configuration_is_recorded_in_safetensors(tmp_path):
  model = torch.nn.Sequential(
      torch.nn.BatchNorm2d(3, eps=1e-3, momentum=0.01),
      torch.nn.BatchNorm1d(2, affine=False),
      torch.nn.BatchNorm2d(3, momentum=None, track_running_stats=False),
      FrozenBatchNorm2d(3, eps=0.0),
  )
  jaxbn.save_state_dict(model, tmp_path / "model.safetensors")
  assert jaxbn.read_batchnorm_config(tmp_path / "model.safetensors") == {
      "0": LayerConfig("BatchNorm", 1e-3, 0.01, True, True),
      "1": LayerConfig("BatchNorm", 1e-5, 0.1, False, True),
      "2": LayerConfig("BatchNorm", 1e-5, None, True, False),
      "3": LayerConfig("FrozenBatchNorm", 0.0),
  }
  assert jaxbn.load_state_dict(tmp_path / "model.safetensors").keys() == model.state_dict().keys()


def test_files_without_a_record_load_as_before(tmp_path):
  jaxbn.save_state_dict({k: v.numpy() for k, v in torch_net().state_dict().items()}, tmp_path / "plain.safetensors")
  torch.save(torch_net().state_dict(), tmp_path / "plain.pth")
  for name in ("plain.safetensors", "plain.pth"):
    assert jaxbn.read_batchnorm_config(tmp_path / name) is None
    variables = jaxbn.convert.load(tmp_path / name, Net(), X).variables
    assert variables["batch_stats"]["bn"]["var"].shape == (4,)


def test_load_checks_every_layer_and_field_against_the_model(tmp_path):
  """A mobilenet-style layer (eps 1e-3, momentum 0.01) loaded into a Flax layer built with
  torch's defaults: one error naming the layer and both fields; a warning with strict=False;
  a model built with the recorded values loads silently."""
  jaxbn.save_state_dict(torch_net(eps=1e-3, momentum=0.01), tmp_path / "m.safetensors")
  with pytest.raises(ConfigMismatchError) as info:
    jaxbn.convert.load(tmp_path / "m.safetensors", Net(), X)
  message = str(info.value)
  for part in (
      "2 BatchNorm setting(s) differ",
      "bn: eps recorded 0.001, model 1e-05",
      "bn: momentum recorded 0.01, model 0.1",
      "jaxbn.BatchNorm(epsilon=...",
  ):
    assert part in message, (part, message)
  with pytest.warns(UserWarning, match="bn: eps recorded 0.001"):
    jaxbn.convert.load(tmp_path / "m.safetensors", Net(), X, strict=False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jaxbn.convert.load(tmp_path / "m.safetensors", Net(eps=1e-3, momentum=0.01), X)


def test_flax_batchnorm_and_frozen_class_are_mismatches(tmp_path):
  import flax.linen as nn

  jaxbn.save_state_dict(torch_net(), tmp_path / "m.safetensors")
  with pytest.warns(UserWarning, match=r"bn: class recorded 'BatchNorm', model 'flax.linen.BatchNorm"):
    jaxbn.convert.load(tmp_path / "m.safetensors", Net(norm=nn.BatchNorm), X, strict=False)
  model = torch_net()
  frozen = torch.nn.Sequential()
  frozen.add_module("conv", model.conv)
  frozen.add_module("bn", FrozenBatchNorm2d(4))
  jaxbn.save_state_dict(frozen, tmp_path / "frozen.safetensors")
  with pytest.raises(ConfigMismatchError, match="bn: class recorded 'FrozenBatchNorm', model 'BatchNorm'"):
    jaxbn.convert.load(tmp_path / "frozen.safetensors", Net(), X)


def test_cli_carries_the_record_through_every_format_and_checks_it(jaxbn_cli, tmp_path):
  """torch .safetensors -> orbax / msgpack / safetensors -> torch .safetensors keeps the record;
  converting into a --model whose layers differ is refused (exit 2, one message)."""
  torch.manual_seed(0)
  model = torchvision.models.resnet18(num_classes=10)
  jaxbn.save_state_dict(model, tmp_path / "r18.safetensors")
  expected = jaxbn.read_batchnorm_config(tmp_path / "r18.safetensors")
  assert len(expected) == 20
  for flax_file in ("flax-orbax", "flax.msgpack", "flax.safetensors"):
    code, out, err = jaxbn_cli(
        "convert", str(tmp_path / "r18.safetensors"), str(tmp_path / flax_file), "--model", "resnet18"
    )
    assert code == 0, err
    assert jaxbn.read_batchnorm_config(tmp_path / flax_file) == expected, flax_file
    code, out, err = jaxbn_cli("convert", str(tmp_path / flax_file), str(tmp_path / f"back-{flax_file}.safetensors"))
    assert code == 0, err
    assert jaxbn.read_batchnorm_config(tmp_path / f"back-{flax_file}.safetensors") == expected, flax_file

  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.eps = 1e-3
  jaxbn.save_state_dict(model, tmp_path / "eps.safetensors")
  code, out, err = jaxbn_cli(
      "convert", str(tmp_path / "eps.safetensors"), str(tmp_path / "x.msgpack"), "--model", "resnet18"
  )
  assert code == 2 and "20 BatchNorm setting(s) differ" in err and "layer4.1.bn2: eps recorded 0.001" in err, err
  assert "Traceback" not in err and not (tmp_path / "x.msgpack").exists()


def test_inspect_flags_bad_running_statistics(jaxbn_cli, tmp_path):
  torch.manual_seed(0)
  model = torch.nn.Sequential(
      torch.nn.Conv2d(3, 4, 3),
      torch.nn.BatchNorm2d(4),
      torch.nn.BatchNorm2d(4),
      torch.nn.BatchNorm2d(4),
      torch.nn.BatchNorm2d(4),
      torch.nn.BatchNorm2d(4),
  )
  model.train()
  model(torch.randn(2, 3, 5, 5))
  with torch.no_grad():
    model[2].running_var[1] = float("nan")
    model[3].running_var[0] = -1.0
    model[4].running_var.zero_()
    model[5].num_batches_tracked.zero_()
  jaxbn.save_state_dict(model, tmp_path / "m.safetensors")
  code, out, err = jaxbn_cli("inspect", str(tmp_path / "m.safetensors"))
  assert code == 1, out + err
  rows = {line.split()[0]: line for line in out.splitlines()[2:] if line[:1].isdigit() and "layer(s)" not in line}
  assert rows["1"].endswith("ok") and "BatchNorm" in rows["1"] and "1e-05" in rows["1"]
  assert "non-finite running_var in channel 1" in rows["2"]
  assert "negative running_var in channel 0" in rows["3"]
  assert "running_var is 0 in every channel" in rows["4"]
  assert "num_batches_tracked is 0 but the statistics" in rows["5"]
  assert "4 layer(s) with suspicious running statistics: 2, 3, 4, 5" in out

  model[2].running_var[1] = 1.0
  for layer in model[3:]:
    layer.reset_running_stats()
  torch.save(model.state_dict(), tmp_path / "fine.pth")
  code, out, err = jaxbn_cli("inspect", str(tmp_path / "fine.pth"))
  assert code == 0 and "configuration not recorded" in out, out + err


def test_check_fails_on_non_finite_running_statistics(jaxbn_cli, tmp_path):
  """A checkpoint with a NaN in a running variance: torch and jaxbn both carry it (torch
  propagates NaN into its buffers, jaxbn matches), so the comparison cannot flag it by
  difference; jaxbn check names the layer and fails."""
  torch.manual_seed(0)
  model = torchvision.models.resnet18(num_classes=10)
  with torch.no_grad():
    model.layer2[0].bn1.running_var[5] = float("nan")
  jaxbn.save_state_dict(model, tmp_path / "nan.safetensors")
  code, out, err = jaxbn_cli(
      "check", "--weights", str(tmp_path / "nan.safetensors"), "--steps", "1", "--size", "32", "--num-classes", "10"
  )
  assert code == 1 and "FAILED: non-finite running statistics" in out, out + err
  assert "checkpoint layer2.0.bn1: non-finite running_var in channel 5" in out


def test_safetensors_outputs_follow_the_umask(tmp_path):
  jaxbn.save_state_dict({"w": np.ones(2, np.float32)}, tmp_path / "w.safetensors")
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(tmp_path / "w.safetensors").st_mode & 0o777 == 0o666 & ~umask
