"""jaxbn.emit: a torch model as Flax source, loaded and checked against real torch.

The emitted ``model.py`` goes through the port's harness (port_harness.run: conversion round trip
with strict loading, eval and train-mode outputs, every running statistic and counter over 2 SGD
steps, float64 gradients, with the port's tolerances) in place of ``jaxbn.port``'s module; a
process where ``import torch`` fails loads it and gets the same eval output, bit for bit (the
same program on the same machine). CI runs the hand-written model and a one-block-per-stage
torchvision ResNet; ``make test-models`` runs every model of test_port_models.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
import torchvision

import jaxbn
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


EMIT_CI = {"handwritten": CI["handwritten"], "torchvision:resnet-1-1-1-1": Case(small_resnet, image(32), floor=1e-4)}


@pytest.mark.parametrize("name", list(EMIT_CI))
def test_emitted_source_passes_the_port_harness(name, tmp_path):
  port_harness.run(EMIT_CI[name], port=emitted_port(tmp_path))


@pytest.mark.full_models
@pytest.mark.parametrize("name", [n for n in {**CI, **FULL} if n not in EMIT_CI])
def test_emitted_source_passes_the_port_harness_full(name, tmp_path):
  port_harness.run({**CI, **FULL}[name], port=emitted_port(tmp_path))


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
  assert '"""torchvision.models.resnet.Bottleneck in torch."""' in text


def test_emit_refuses_autocast(tmp_path):
  with pytest.raises(jaxbn.PortError, match="autocast"):
    jaxbn.emit(small_resnet(), np.zeros((1, 3, 32, 32), np.float32), tmp_path, autocast=jax.numpy.bfloat16)
