"""The README's usage example and the docstring examples run as written."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import re

import jax
import numpy as np
import pytest

import jaxbn

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_usage_example_runs():
  code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert code, "README has no python example"
  namespace = {}
  exec(compile(code[0], "README.md", "exec"), namespace)
  assert int(namespace["batch_stats"]["num_batches_tracked"]) == 1
  assert namespace["y"].shape == (32, 56, 56, 64)


def test_readme_nnx_example_runs():
  code = [
      block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "jaxbn.models.nnx" in block
  ]
  assert len(code) == 1, "README has no NNX example"
  namespace = {}
  exec(compile(code[0], "README.md", "exec"), namespace)
  assert int(namespace["model"].bn1.num_batches_tracked[...]) == 1
  assert int(namespace["state_dict"]["bn1.num_batches_tracked"]) == 1
  namespace["torch_model"].load_state_dict(namespace["state_dict"], strict=True)


def test_readme_port_example_runs():
  code = [
      block
      for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
      if "module, variables = jaxbn.port(" in block
  ]
  assert len(code) == 1, "README has no port example"
  namespace = {}
  exec(compile(code[0], "README.md", "exec"), namespace)
  assert namespace["logits"].shape == (4, 10)
  assert int(namespace["variables"]["batch_stats"]["features"]["0"]["1"]["num_batches_tracked"]) == 1


def test_readme_training_recipe_example_runs():
  code = [
      block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "port.frozen_mask" in block
  ]
  assert len(code) == 1, "README has no training-recipe example"
  namespace = {}
  with pytest.warns(jaxbn.TrainingRecipeWarning, match="20 BatchNorm layer"):
    exec(compile(code[0], "README.md", "exec"), namespace)
  port = namespace["port"]
  assert port.recipe == jaxbn.TrainingRecipe(("bn1", "layer1", "layer2", "layer3", "layer4"), ("layer1",))
  updated, original = (jax.tree.leaves(v) for v in (namespace["updates"]["batch_stats"], port.variables["batch_stats"]))
  assert all(np.array_equal(a, b) for a, b in zip(updated, original, strict=True))  # all in eval: nothing moved
  assert all(jax.tree.leaves(port.frozen_mask["layer1"])) and not any(jax.tree.leaves(port.frozen_mask["fc"]))


def test_readme_lists_what_the_port_supports_from_its_tables():
  from jaxbn._src.port import docs

  assert docs.block() in README.read_text(), "stale list: run python -m jaxbn._src.port.docs README.md"


PACKAGE = pathlib.Path(jaxbn.__file__).parent


def _runs_examples(name: str) -> bool:
  """Whether a module's docstrings hold an example that runs (not every line marked +SKIP)."""
  tests = doctest.DocTestFinder().find(importlib.import_module(name))
  return any(not example.options.get(doctest.SKIP) for test in tests for example in test.examples)


# Every jaxbn module whose docstrings hold an example that runs, found by its source, so a new one
# is run too (examples that need a model or a file at hand are marked +SKIP).
MODULES = sorted(
    name
    for name in (
        ".".join(("jaxbn", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        for path in PACKAGE.rglob("*.py")
        if ">>> " in path.read_text()
    )
    if _runs_examples(name)
)


def test_the_examples_are_found():
  assert {"jaxbn._src.linen.batch_norm", "jaxbn._src.nnx.freezing", "jaxbn.models.resnet"} <= set(MODULES), MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  results = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert results.attempted > 0 and results.failed == 0, results


def _resolves(dotted: str) -> bool:
  target = jaxbn
  for name in dotted.split("."):
    if not hasattr(target, name):
      return False
    target = getattr(target, name)
  return callable(target)


def test_every_jaxbn_call_the_docs_name_exists():
  """``jaxbn.something(...)`` in the README or a docstring names a public callable that exists."""
  texts = {"README.md": README.read_text(), **{str(path): path.read_text() for path in PACKAGE.rglob("*.py")}}
  calls = {
      (source, match)
      for source, text in texts.items()
      for match in re.findall(r"(?<![\w.])jaxbn\.((?!_src)[A-Za-z_][\w.]*)\(", text)
  }
  assert len(calls) > 50, "the pattern finds the calls the docs make"
  unknown = sorted(f"{source}: jaxbn.{call}()" for source, call in calls if not _resolves(call))
  assert not unknown, unknown


def test_readme_verify_example_runs():
  code = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "jaxbn.verify(" in block]
  assert len(code) == 1, "README has no jaxbn.verify example"
  namespace = {}
  exec(compile(code[0], "README.md", "exec"), namespace)
  result = namespace["result"]
  assert result.passed and result.steps == 1
  # layer1 is frozen: its parameters are compared after the update (and must not have moved)
  assert any(c.name == "parameters after the update" and c.passed for c in result.checks)
