"""``--model``: the torch model a spec names, and the class count a weights file implies."""

from __future__ import annotations

import difflib
import pathlib
from collections.abc import Mapping

from jaxbn._src.checkpoints.files import load_state_dict, numpy_to_torch
from jaxbn._src.checkpoints.flax_files import is_flax_file
from jaxbn.cli.errors import UsageError, does_not_fit
from jaxbn.models import MODELS

MODEL_FORMS = "a jaxbn.models ResNet name (resnet18, ...), torchvision:NAME, timm:NAME or path/to/file.py:factory"
DEFAULT_CLASSES = 1000  # torchvision's and timm's
SOURCES = ("torchvision", "timm")


def torch_model_from_spec(spec: str, num_classes: int = DEFAULT_CLASSES):
  """The torch model a ``--model`` names, and whether jaxbn.port builds its Flax twin (else it is
  one of jaxbn.models' ResNets)."""
  import torchvision

  if spec in MODELS:
    return getattr(torchvision.models, spec)(num_classes=num_classes), False
  source, _, name = spec.partition(":")
  if not name:
    raise UsageError(f"--model {spec!r}: give {MODEL_FORMS}.")
  close = difflib.get_close_matches(source, SOURCES, n=1, cutoff=0.7)
  if source not in SOURCES and not source.endswith(".py") and close:
    raise UsageError(f"--model {spec!r}: no source {source!r}; did you mean {close[0]}:{name}?")
  if source == "torchvision":
    builder = getattr(torchvision.models, name, None) or getattr(torchvision.models.detection, name, None)
    if builder is None:
      raise UsageError(f"torchvision.models has no {name!r}; see torchvision.models.list_models().")
    return builder(num_classes=num_classes), True
  if source == "timm":
    try:
      import timm
    except ImportError as error:
      raise UsageError("--model timm:... needs timm: pip install timm (or jaxbn[test]).") from error
    if name not in timm.list_models():
      raise UsageError(f"timm has no model {name!r}; see timm.list_models().")
    return timm.create_model(name, pretrained=False, num_classes=num_classes), True
  path = pathlib.Path(source)
  if path.suffix != ".py" or not path.exists():
    raise UsageError(f"--model {spec!r}: {source} is not a .py file; give {MODEL_FORMS}.")
  import importlib.util

  module_spec = importlib.util.spec_from_file_location(path.stem, path)
  user_module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(user_module)
  factory = getattr(user_module, name, None)
  if not callable(factory):
    raise UsageError(f"{path} has no function {name!r} that builds the torch model.")
  return factory(), True


def shape_differences(state_dict: Mapping, torch_model) -> tuple[list[str], list[str], list[str]]:
  """Keys the model has and ``state_dict`` lacks, keys it has beyond the model's, and shapes that
  differ (``'key (shape) != (model's shape)'``)."""
  expected = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
  missing = sorted(expected.keys() - state_dict.keys())
  unexpected = sorted(state_dict.keys() - expected.keys())
  mismatched = [
      f"{k} {tuple(state_dict[k].shape)} != {expected[k]}"
      for k in sorted(state_dict.keys() & expected.keys())
      if tuple(state_dict[k].shape) != expected[k]
  ]
  return missing, unexpected, mismatched


def model_for_weights(spec: str, state_dict: Mapping, num_classes: int | None):
  """``torch_model_from_spec`` with ``num_classes`` given, or else read from the weights: the one
  class count that the tensors sized for 1000 classes (the classifier's weight and bias) hold."""
  torch_model, ported = torch_model_from_spec(spec, num_classes or DEFAULT_CLASSES)
  if num_classes is not None or spec.partition(":")[0].endswith(".py"):  # a factory takes no class count
    return torch_model, ported
  expected = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
  counts = {
      state_dict[k].shape[0]
      for k, shape in expected.items()
      if k in state_dict
      and tuple(state_dict[k].shape) != shape
      and shape[:1] == (DEFAULT_CLASSES,)
      and tuple(state_dict[k].shape[1:]) == shape[1:]
  }
  if len(counts) == 1:
    return torch_model_from_spec(spec, counts.pop())
  return torch_model, ported


def read_weights(path: str | None) -> dict | None:
  """``--weights``: a torch state_dict (a Flax file is refused, naming the conversion), or None."""
  if not path:
    return None
  weights = pathlib.Path(path)
  if weights.exists() and is_flax_file(weights):
    raise UsageError(
        f"--weights {weights} holds Flax variables; --weights takes a torch state_dict. Convert it"
        f" first: jaxbn convert {weights} weights.safetensors"
    )
  return load_state_dict(weights)


def model_with_weights(spec: str, weights: Mapping | None, path: str | None, num_classes: int | None):
  """The torch model ``--model`` names with ``--weights`` loaded strictly (random init without),
  and whether jaxbn.port builds its Flax twin."""
  if weights is None:
    return torch_model_from_spec(spec, num_classes or DEFAULT_CLASSES)
  torch_model, ported = model_for_weights(spec, weights, num_classes)
  missing, unexpected, mismatched = shape_differences(weights, torch_model)
  if missing or unexpected or mismatched:
    raise does_not_fit(
        path,
        spec,
        missing,
        unexpected,
        mismatched,
        "Pass the --model the weights were saved from (and its --num-classes).",
    )
  torch_model.load_state_dict(numpy_to_torch(weights), strict=True)
  return torch_model, ported
