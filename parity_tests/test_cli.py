"""The jaxbn command: ``check`` end to end on a small resnet18, ``convert`` both ways."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
import torchvision

import jaxbn


def jaxbn_command(*args):
  result = subprocess.run([sys.executable, "-m", "jaxbn.cli", *args], capture_output=True, text=True, timeout=600)
  return result.returncode, result.stdout + result.stderr


def test_check_reports_every_batchnorm_layer_and_passes():
  code, out = jaxbn_command("check", "--model", "resnet18", "--steps", "2", "--size", "32", "--num-classes", "10")
  assert code == 0, out
  assert "all layers match" in out and "20 BatchNorm layers, 3 steps" in out and "OK: worst relative" in out
  assert "layer4.1.bn2" in out and "convert (rules)" in out


def test_check_runs_the_nnx_model():
  code, out = jaxbn_command("check", "--api", "nnx", "--steps", "2", "--size", "32", "--num-classes", "10")
  assert code == 0, out
  assert "all layers match" in out and "20 BatchNorm layers, 3 steps" in out and "build the NNX module" in out


def test_check_fails_when_tolerance_is_not_met():
  code, out = jaxbn_command("check", "--steps", "1", "--size", "32", "--num-classes", "10", "--tolerance", "1e-12")
  assert code == 1 and "FAILED: worst relative difference" in out


def test_check_takes_a_weights_file(tmp_path):
  torch.manual_seed(1)
  model = torchvision.models.resnet18(num_classes=10)
  torch.save(model.state_dict(), tmp_path / "weights.pth")
  code, out = jaxbn_command("check", "--weights", str(tmp_path / "weights.pth"), "--steps", "1", "--size", "32",
                            "--num-classes", "10")
  assert code == 0 and "weights from" in out, out


def test_convert_round_trips_through_flax_formats(tmp_path):
  torch.manual_seed(0)
  model = torchvision.models.resnet18(num_classes=10)
  model.train()
  model(torch.randn(2, 3, 32, 32))  # non-trivial statistics and counters
  torch.save(model.state_dict(), tmp_path / "model.pth")
  original = jaxbn.load_state_dict(tmp_path / "model.pth")
  for flax_file, options in (("model.msgpack", ["--model", "resnet18"]), ("model.safetensors", []),
                             ("orbax-checkpoint", ["--model", "resnet18"])):
    code, out = jaxbn_command("convert", str(tmp_path / "model.pth"), str(tmp_path / flax_file), *options)
    assert code == 0, out
    back = tmp_path / f"back-{flax_file}.pth"
    code, out = jaxbn_command("convert", str(tmp_path / flax_file), str(back))
    assert code == 0, out
    restored = jaxbn.load_state_dict(back)
    assert restored.keys() == original.keys()
    for key, value in original.items():
      assert restored[key].dtype == value.dtype and restored[key].shape == value.shape, key
      np.testing.assert_array_equal(restored[key], value, err_msg=key)


def test_user_errors_are_one_line_and_exit_2(tmp_path):
  """No traceback for a user mistake: the problem and the fix in one line, status 2."""
  torch.manual_seed(0)
  torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
  (tmp_path / "taken").mkdir()
  cases = [
      (("convert", str(tmp_path / "r18.pth"), str(tmp_path / "taken"), "--model", "resnet18"),
       "taken exists already; pass --overwrite"),
      (("convert", str(tmp_path / "r18.pth"), str(tmp_path / "x.msgpack"), "--model", "resnet50"),
       "r18.pth does not fit resnet50: "),
      (("convert", str(tmp_path / "r18.pth"), str(tmp_path / "x.msgpack"), "--model", "mobilenet_v3_small"),
       "--model 'mobilenet_v3_small': give a jaxbn.models ResNet name (resnet18, ...), torchvision:NAME"),
      (("check", "--model", "resnet34", "--weights", str(tmp_path / "r18.pth"), "--num-classes", "10"),
       "r18.pth does not fit resnet34(num_classes=10)"),
  ]
  for args, expected in cases:
    code, out = jaxbn_command(*args)
    assert code == 2 and expected in out and "Traceback" not in out, (args, out)
  code, out = jaxbn_command("convert", str(tmp_path / "r18.pth"), str(tmp_path / "taken"), "--model", "resnet18",
                            "--overwrite")
  assert code == 0, out


def test_model_spec_errors_are_one_line_and_exit_2(tmp_path, capsys):
  from jaxbn import cli

  cases = [
      (("check", "--model", "timm:no_such_net"), "timm has no model 'no_such_net'"),
      (("check", "--model", "torchvision:no_such_net"), "torchvision.models has no 'no_such_net'"),
      (("check", "--model", str(tmp_path / "missing.py") + ":make"), "is not a .py file"),
      (("check", "--model", "torchvision:mobilenet_v3_small", "--api", "nnx"), "--api nnx checks the"),
  ]
  for args, expected in cases:  # in-process: each fails before any model runs
    assert cli.main(list(args)) == 2, args
    assert expected in capsys.readouterr().err, args


def test_check_ports_any_model_and_shows_the_flax_linen_trap(tmp_path):
  code, out = jaxbn_command("check", "--model", "torchvision:mobilenet_v3_small", "--steps", "1", "--size", "32",
                            "--num-classes", "10", "--plot", str(tmp_path / "drift.png"))
  assert code == 0, out
  assert "ported with jaxbn.port" in out and "all layers match" in out and "OK: worst relative" in out
  assert "torch sets eps != 1e-5 in 34 of 34 BatchNorm layers (e.g. features.0.1: eps=0.001)" in out
  naive = float(out.split("eval output: worst relative difference ")[1].split(";")[0])
  worst = float(out.split("OK: worst relative difference ")[1].split()[0])
  assert naive > 1e3 * worst  # eps 1e-5 instead of 1e-3 moves the outputs by percents
  assert (tmp_path / "drift.png").read_bytes()[:4] == b"\x89PNG"


def test_check_takes_a_model_from_a_python_file(tmp_path):
  (tmp_path / "net.py").write_text(
      "import torch\n"
      "def make():\n"
      "  return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=None),\n"
      "                             torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),\n"
      "                             torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5))\n")
  code, out = jaxbn_command("check", "--model", f"{tmp_path / 'net.py'}:make", "--steps", "2", "--size", "16")
  assert code == 0, out
  assert "2 BatchNorm layers, 3 steps" in out and "momentum != 0.1 in 1" in out


def test_convert_takes_a_ported_model(tmp_path):
  torch.manual_seed(0)
  model = torchvision.models.mobilenet_v3_small(num_classes=10)
  model.train()
  model(torch.randn(2, 3, 32, 32))
  torch.save(model.state_dict(), tmp_path / "model.pth")
  code, out = jaxbn_command("convert", str(tmp_path / "model.pth"), str(tmp_path / "model.msgpack"), "--model",
                            "torchvision:mobilenet_v3_small", "--num-classes", "10")
  assert code == 0 and "BatchNorm configuration of 34 layers recorded" in out, out
  code, out = jaxbn_command("convert", str(tmp_path / "model.msgpack"), str(tmp_path / "back.pth"))
  assert code == 0, out
  back = jaxbn.load_state_dict(tmp_path / "back.pth")
  for key, value in model.state_dict().items():
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
  from jaxbn import cli

  monkeypatch.setitem(sys.modules, "matplotlib", None)
  try:
    cli.plot_report([], "x.png", "model")
  except cli.UsageError as error:
    assert "pip install 'jaxbn[plot]'" in str(error)
  else:
    raise AssertionError("no UsageError")
