"""The README's usage example and the docstring examples run as written."""

from __future__ import annotations

import doctest
import pathlib
import re

import pytest

from jaxbn._src import batch_norm, folding, frozen, modes, normalization, running, statistics, training
from jaxbn.models import resnet

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_usage_example_runs():
  code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert code, "README has no python example"
  namespace = {}
  exec(compile(code[0], "README.md", "exec"), namespace)
  assert int(namespace["batch_stats"]["num_batches_tracked"]) == 1
  assert namespace["y"].shape == (32, 56, 56, 64)


@pytest.mark.parametrize("module", [batch_norm, folding, frozen, modes, normalization, resnet, running, statistics, training], ids=lambda m: m.__name__)
def test_docstring_examples(module):
  results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert results.attempted > 0 and results.failed == 0, results
