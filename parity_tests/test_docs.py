"""The README's usage example and the docstring examples run as written."""

from __future__ import annotations

import doctest
import pathlib
import re

import pytest

from jaxbn._src import (batch_norm, folding, frozen, modes, nnx_batch_norm, nnx_freezing, nnx_frozen, normalization,
                        running, statistics, training)
from jaxbn.models import nnx as nnx_models
from jaxbn.models import resnet

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_usage_example_runs():
  code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert code, "README has no python example"
  namespace = {}
  exec(compile(code[0], "README.md", "exec"), namespace)
  assert int(namespace["batch_stats"]["num_batches_tracked"]) == 1
  assert namespace["y"].shape == (32, 56, 56, 64)


def test_readme_nnx_example_runs():
  code = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "jaxbn.models.nnx" in block]
  assert len(code) == 1, "README has no NNX example"
  namespace = {}
  exec(compile(code[0], "README.md", "exec"), namespace)
  assert int(namespace["model"].bn1.num_batches_tracked[...]) == 1
  assert int(namespace["state_dict"]["bn1.num_batches_tracked"]) == 1
  namespace["torch_model"].load_state_dict(namespace["state_dict"], strict=True)


def test_readme_port_example_runs():
  code = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "jaxbn.port(" in block]
  assert len(code) == 1, "README has no port example"
  namespace = {}
  exec(compile(code[0], "README.md", "exec"), namespace)
  assert namespace["logits"].shape == (4, 10)
  assert int(namespace["variables"]["batch_stats"]["features"]["0"]["1"]["num_batches_tracked"]) == 1


def test_readme_lists_what_the_port_supports_from_its_tables():
  from jaxbn._src.port import docs

  assert docs.block() in README.read_text(), "stale list: run python -m jaxbn._src.port.docs README.md"


MODULES = [batch_norm, folding, frozen, modes, nnx_batch_norm, nnx_freezing, nnx_frozen, nnx_models, normalization,
           resnet, running, statistics, training]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
  results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert results.attempted > 0 and results.failed == 0, results
