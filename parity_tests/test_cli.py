"""The jaxbn command: ``check`` end to end, ``convert`` both ways, and every user mistake as one
line on stderr with exit status 2, found before the expensive work. In-process (the
``jaxbn_cli`` fixture) except where the real entry point is the point."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from safetensors.numpy import save_file

import jaxbn
from jaxbn._src.checkpoints.flax_files import write_flax


def test_the_installed_entry_point_runs_check():
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "jaxbn.cli",
          "check",
          "--model",
          "resnet18",
          "--steps",
          "2",
          "--size",
          "32",
          "--num-classes",
          "10",
      ],
      capture_output=True,
      text=True,
      timeout=600,
  )
  out = result.stdout
  assert result.returncode == 0, out + result.stderr
  assert "all layers match" in out and "20 BatchNorm layers, 3 steps" in out and "OK: worst relative" in out
  assert "layer4.1.bn2" in out and "convert (rules)" in out
  # Only jaxbn's own steps are timed: torch measured beside JAX in one process is not fair.
  assert "eval forward" not in out and "torch" not in out.split("Timings (this machine):")[1]


def test_check_runs_the_nnx_model(jaxbn_cli):
  code, out, err = jaxbn_cli("check", "--api", "nnx", "--steps", "2", "--size", "32", "--num-classes", "10")
  assert code == 0, out + err
  assert "all layers match" in out and "20 BatchNorm layers, 3 steps" in out and "build the NNX module" in out


def test_check_fails_when_tolerance_is_not_met(jaxbn_cli):
  code, out, err = jaxbn_cli("check", "--steps", "1", "--size", "32", "--num-classes", "10", "--tolerance", "1e-12")
  assert code == 1 and "FAILED: worst relative difference" in out, out + err


def test_check_takes_a_weights_file_and_reads_its_class_count(jaxbn_cli, tmp_path):
  torch.manual_seed(1)
  torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "weights.pth")
  code, out, err = jaxbn_cli("check", "--weights", tmp_path / "weights.pth", "--steps", "1", "--size", "32")
  assert code == 0 and "weights from" in out, out + err


def test_convert_round_trips_through_flax_formats(jaxbn_cli, tmp_path):
  torch.manual_seed(0)
  model = torchvision.models.resnet18(num_classes=10)
  model.train()
  model(torch.randn(2, 3, 32, 32))  # non-trivial statistics and counters
  torch.save(model.state_dict(), tmp_path / "model.pth")
  original = jaxbn.load_state_dict(tmp_path / "model.pth")
  for flax_file, options in (
      ("model.msgpack", ["--model", "resnet18"]),  # the class count read from the checkpoint
      ("model.safetensors", []),
      ("orbax-checkpoint", ["--model", "resnet18", "--num-classes", "10"]),
  ):
    code, out, err = jaxbn_cli("convert", tmp_path / "model.pth", tmp_path / flax_file, *options)
    assert code == 0, out + err
    back = tmp_path / f"back-{flax_file}.pth"
    code, out, err = jaxbn_cli("convert", tmp_path / flax_file, back)
    assert code == 0, out + err
    restored = jaxbn.load_state_dict(back)
    assert restored.keys() == original.keys()
    for key, value in original.items():
      assert restored[key].dtype == value.dtype and restored[key].shape == value.shape, key
      np.testing.assert_array_equal(restored[key], value, err_msg=key)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A resnet18 checkpoint, a Flax-variables folder, a truncated .safetensors, a text file named
  .pth and random bytes named .pth."""
  root = tmp_path_factory.mktemp("files")
  torch.manual_seed(0)
  torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), root / "r18.pth")
  (root / "taken").mkdir()
  (root / "empty-dir").mkdir()
  write_flax({"params": {"conv": {"kernel": np.ones((3, 3, 2, 4), np.float32)}}}, root / "flax-dir", None)
  (root / "truncated.pth").write_bytes((root / "r18.pth").read_bytes()[:4000])
  save_file({"params/conv/kernel": np.ones((3, 3, 2, 4), np.float32)}, str(root / "whole.safetensors"))
  (root / "truncated.safetensors").write_bytes((root / "whole.safetensors").read_bytes()[:60])
  (root / "text.pth").write_text("hello world\n")
  (root / "random.pth").write_bytes(np.random.default_rng(0).bytes(300))
  return root


# (arguments, what the one line on stderr says); {f} is the folder of the ``files`` fixture.
USER_ERRORS = [
    (("check", "--steps", "-2"), "argument --steps: must be at least 1, got -2"),
    (("check", "--size", "0"), "argument --size: must be at least 1, got 0"),
    (("check", "--batch", "0"), "argument --batch: must be at least 1, got 0"),
    (("check", "--tolerance", "-1"), "argument --tolerance: must be positive"),
    (
        ("check", "--batch", "1", "--size", "32", "--num-classes", "10"),
        "resnet18 cannot take a 1x3x32x32 batch in training mode: torch says 'Expected more than 1 value per channel"
        " when training, got input size torch.Size([1, 512, 1, 1])'. Choose a larger --size or --batch.",
    ),
    (
        ("check", "--weights", "{f}/flax-dir"),
        "holds Flax variables; --weights takes a torch state_dict. Convert it" " first: jaxbn convert",
    ),
    (("check", "--weights", "{f}/missing.pth"), "missing.pth: no such file"),
    (("check", "--plot", "{f}/no/such/dir/x.png"), "no folder"),
    (("check", "--plot", "{f}/drift.nope"), "matplotlib writes"),
    (("check", "--model", "resnet34", "--weights", "{f}/r18.pth"), "r18.pth does not fit resnet34: "),
    (("inspect", "{f}/truncated.safetensors"), "truncated.safetensors: not a readable .safetensors file"),
    (
        ("convert", "{f}/truncated.safetensors", "{f}/out.pth"),
        "truncated.safetensors: not a readable .safetensors file",
    ),
    (("inspect", "{f}/text.pth"), "text.pth: not a torch checkpoint: torch.save writes a zip archive"),
    (("inspect", "{f}/random.pth"), "random.pth: not a torch checkpoint"),
    (
        ("convert", "{f}/flax-dir", "{f}/out.msgpack"),
        "holds Flax variables and {f}/out.msgpack would too: convert goes" " between torch and Flax",
    ),
    (("convert", "{f}/r18.pth", "{f}/out.pth"), "r18.pth is a torch state_dict; write its Flax variables to"),
    (("convert", "{f}/r18.pth", "{f}/no/such/dir/out.msgpack"), "no folder"),
    (("convert", "{f}/r18.pth", "{f}/taken", "--model", "resnet18"), "taken exists already; pass --overwrite"),
    (("convert", "{f}/r18.pth", "{f}/x.msgpack", "--model", "resnet50"), "r18.pth does not fit resnet50: "),
    (
        ("convert", "{f}/r18.pth", "{f}/x.msgpack", "--model", "mobilenet_v3_small"),
        "--model 'mobilenet_v3_small': give a jaxbn.models ResNet name (resnet18, ...), torchvision:NAME",
    ),
    (("convert", "{f}/missing.pth", "{f}/x.msgpack"), "missing.pth: no such file or directory"),
    (
        ("convert", "{f}/r18.pth", "{f}/x.msgpack", "--model", "resnet50"),
        "(64, 64, 3, 3) != (64, 64, 1, 1) in the model",
    ),
    (("inspect", "{f}/empty-dir"), "empty-dir: a directory, but not an orbax checkpoint (no _METADATA in it"),
    (("convert", "{f}/empty-dir", "{f}/x.msgpack"), "empty-dir: a directory, but not an orbax checkpoint"),
    (("check", "--weights", "{f}/empty-dir"), "empty-dir: a directory, but not an orbax checkpoint"),
    (
        ("inspect", "{f}/truncated.pth"),
        "truncated.pth: not a readable torch checkpoint (truncated or corrupt?): torch said",
    ),
    (
        ("emit", "--model", "torchvision:resnet18", "--out", "{f}/text.pth"),
        "text.pth: a file; --out names the directory",
    ),
    (("check", "--model", "torchvison:resnet18"), "no source 'torchvison'; did you mean torchvision:resnet18?"),
    (("check", "--model", "tim:resnet18"), "did you mean timm:resnet18?"),
]


@pytest.mark.parametrize("args, expected", USER_ERRORS, ids=[" ".join(a).replace("{f}/", "") for a, _ in USER_ERRORS])
def test_user_errors_are_one_line_and_exit_2(jaxbn_cli, files, args, expected):
  """No traceback for a user mistake: the problem and the fix in one line on stderr, status 2."""
  code, out, err = jaxbn_cli(*(arg.format(f=files) for arg in args))
  assert code == 2 and expected.format(f=files) in err, err
  assert len(err.strip().splitlines()) == 1 and out == "", (out, err)
  assert "\x1b" not in err  # torch's messages are styled for a terminal; ours are plain text


def test_a_missing_weights_file_is_reported_before_torch_is_imported():
  script = (
      "import sys; from jaxbn.cli.main import main; code = main(['check', '--weights', 'no/such.pth']);"
      " assert code == 2, code; assert 'torch' not in sys.modules, 'imported torch first'"
  )
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "--weights no/such.pth: no such file or directory." in result.stderr


def test_inspect_stops_quietly_when_the_reader_leaves(tmp_path):
  """``jaxbn inspect f | head -1``: a closed pipe ends the command without a message."""
  layers = 3000  # about 250 kB of table, more than a pipe holds
  stats = {f"bn{i}.{leaf}": np.ones(1, np.float32) for i in range(layers) for leaf in ("running_mean", "running_var")}
  save_file(stats, str(tmp_path / "many.safetensors"))
  process = subprocess.Popen(
      [sys.executable, "-m", "jaxbn.cli", "inspect", str(tmp_path / "many.safetensors")],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
  )
  assert b"3000 BatchNorm layers" in process.stdout.readline()
  process.stdout.close()
  err = process.stderr.read().decode()
  assert process.wait(timeout=120) == 1 and err == "", err


def test_model_spec_errors_are_one_line_and_exit_2(jaxbn_cli, tmp_path):
  cases = [
      (("check", "--model", "timm:no_such_net"), "timm has no model 'no_such_net'"),
      (("check", "--model", "torchvision:no_such_net"), "torchvision.models has no 'no_such_net'"),
      (("check", "--model", str(tmp_path / "missing.py") + ":make"), "is not a .py file"),
      (("check", "--model", "resnet18", "--emit"), "--emit checks what jaxbn.port / jaxbn.emit make"),
      (("check", "--model", "resnet18", "--train-steps", "1"), "use --model torchvision:resnet18"),
      (("check", "--layout", "NHWC"), "--layout NHWC is the emitted source's layout"),
      (("check", "--json", str(tmp_path / "no" / "dir" / "x.json")), "--json"),
  ]
  for args, expected in cases:  # each fails before any model runs
    code, out, err = jaxbn_cli(*args)
    assert code == 2 and expected in err and len(err.splitlines()) == 1, (args, err)


def test_check_ports_any_model_and_shows_the_flax_linen_trap(jaxbn_cli, tmp_path):
  code, out, err = jaxbn_cli(
      "check",
      "--model",
      "torchvision:mobilenet_v3_small",
      "--steps",
      "1",
      "--size",
      "32",
      "--num-classes",
      "10",
      "--plot",
      tmp_path / "drift.png",
  )
  assert code == 0, out + err
  assert "ported with jaxbn.port" in out and "all layers match" in out and "OK: worst relative" in out
  assert "torch sets eps != 1e-5 in 34 of 34 BatchNorm layers (e.g. features.0.1: eps=0.001)" in out
  naive = float(out.split("eval output: worst relative difference ")[1].split(";")[0])
  worst = float(out.split("OK: worst relative difference ")[1].split()[0])
  assert naive > 1e3 * worst  # eps 1e-5 instead of 1e-3 moves the outputs by percents
  assert (tmp_path / "drift.png").read_bytes()[:4] == b"\x89PNG"


def test_check_takes_a_model_from_a_python_file(jaxbn_cli, tmp_path):
  (tmp_path / "net.py").write_text(
      "import torch\n"
      "def make():\n"
      "  return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=None),\n"
      "                             torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),\n"
      "                             torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5))\n"
  )
  code, out, err = jaxbn_cli("check", "--model", f"{tmp_path / 'net.py'}:make", "--steps", "2", "--size", "16")
  assert code == 0, out + err
  assert "2 BatchNorm layers, 3 steps" in out and "momentum != 0.1 in 1" in out
  # Below float32's resolution, float64 decides: rounding passes, and a float64 difference fails.
  model = ("--model", f"{tmp_path / 'net.py'}:make", "--steps", "1", "--size", "16")
  code, out, err = jaxbn_cli("check", *model, "--tolerance", "1e-12")
  assert code == 0 and "float32 rounding" in out and "OK: worst relative difference" in out, out + err
  code, out, err = jaxbn_cli("check", *model, "--tolerance", "1e-30")
  assert code == 1 and "not float32 rounding" in out and "FAILED" in out, out + err


def test_convert_takes_a_ported_model(jaxbn_cli, tmp_path):
  torch.manual_seed(0)
  model = torchvision.models.mobilenet_v3_small(num_classes=10)
  model.train()
  model(torch.randn(2, 3, 32, 32))
  torch.save(model.state_dict(), tmp_path / "model.pth")
  code, out, err = jaxbn_cli(
      "convert", tmp_path / "model.pth", tmp_path / "model.msgpack", "--model", "torchvision:mobilenet_v3_small"
  )  # 10 classes, read from the checkpoint
  assert code == 0 and "BatchNorm configuration of 34 layers recorded" in out, out + err
  code, out, err = jaxbn_cli("convert", tmp_path / "model.msgpack", tmp_path / "back.pth")
  assert code == 0, out + err
  back = jaxbn.load_state_dict(tmp_path / "back.pth")
  for key, value in model.state_dict().items():
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_plot_without_matplotlib_names_the_extra(jaxbn_cli, monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  code, out, err = jaxbn_cli("check", "--plot", tmp_path / "x.png")  # refused before any model runs
  assert code == 2 and "--plot needs matplotlib: pip install 'jaxbn[plot]'" in err, err


NET = """
import torch


class Net(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(3, 4, 3)
    self.bn = torch.nn.BatchNorm2d(4, momentum=None)
    self.fc = torch.nn.Linear(4, 5)
    self.bn_head = torch.nn.BatchNorm1d(5)

  def forward(self, x):
    return self.bn_head(self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


def make():
  return Net()
"""


@pytest.mark.parametrize(
    "options", [(), ("--api", "nnx"), ("--emit",), ("--emit", "--api", "nnx"), ("--emit", "--layout", "NHWC")]
)
def test_check_trains_side_by_side_and_writes_json(jaxbn_cli, tmp_path, options):
  """``--train-steps``: jaxbn.verify on what is checked (the port or emitted source, Linen or NNX,
  channels-last with ``--layout NHWC``: per-layer outputs compared as NHWC); ``--json``: one
  object with the per-layer rows and verify's result."""
  import json

  (tmp_path / "net.py").write_text(NET)
  model = ("--model", f"{tmp_path / 'net.py'}:make", "--steps", "1", "--size", "16")
  code, out, err = jaxbn_cli("check", *model, *options, "--train-steps", "2", "--json", tmp_path / "r.json")
  assert code == 0, out + err
  assert "Trained side by side (2 optimiser steps; jaxbn.verify)" in out and "trains like torch" in out
  document = json.loads((tmp_path / "r.json").read_text())
  assert document["passed"] is True and document["status"] == 0 and document["schema"] == 1
  assert ("emit" in document["checked"]) == ("--emit" in options)
  assert ("'nnx'" in document["checked"]) == ("nnx" in options)
  assert {row["layer"] for row in document["layers"]} == {"bn", "bn_head"}
  assert document["verify"]["passed"] is True and document["verify"]["steps"] == 2
  assert document["verify"]["target"].startswith("jaxbn.emit" if "--emit" in options else "jaxbn.port")
  assert ("layout='NHWC'" in document["checked"] + document["verify"]["target"]) == ("NHWC" in options)


def test_check_fails_when_verify_fails(jaxbn_cli, tmp_path, monkeypatch):
  """A port that differs only in training (here: one BatchNorm's momentum) passes the forward
  comparison and fails verify: exit status 1, the layer named, the JSON says so."""
  import json

  real = jaxbn.verify

  def broken_momentum(torch_model, x, **options):
    def build(model, inputs, dtype):
      def factory(module):
        return jaxbn.BatchNorm(axis=1, momentum=0.3, epsilon=module.eps, param_dtype=dtype or np.float32)

      return jaxbn.port(model, inputs[0], dtype=dtype, custom_modules={torch.nn.BatchNorm2d: factory})

    options.pop("via"), options.pop("api")
    return real(torch_model, x, build=build, **options)

  monkeypatch.setattr(jaxbn, "verify", broken_momentum)
  (tmp_path / "net.py").write_text(NET)
  model = ("--model", f"{tmp_path / 'net.py'}:make", "--steps", "1", "--size", "16")
  code, out, err = jaxbn_cli("check", *model, "--train-steps", "1", "--json", tmp_path / "r.json")
  assert code == 1, out + err
  assert "OK: worst relative difference" in out  # the forward comparison cannot see it
  assert "FAILED: jaxbn.verify: first divergence: bn, step 0, statistics" in out
  document = json.loads((tmp_path / "r.json").read_text())
  assert document["passed"] is False and document["verify"]["divergence"]["layer"] == "bn"
