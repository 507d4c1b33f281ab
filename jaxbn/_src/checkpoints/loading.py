"""One call from a checkpoint file to a Flax model's variables, configuration checked."""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax

from jaxbn._src.checkpoints import config as layer_config
from jaxbn._src.checkpoints.files import load_state_dict, read_batchnorm_config
from jaxbn._src.checkpoints.rules import Converted, Rename, from_torch, renamer


def load(
    path: str | os.PathLike,
    model: nn.Module,
    example_input,
    *,
    rename: Rename = None,
    strict: bool = True,
    dtype: Any = None,
    **apply_kwargs,
) -> Converted:
  """A torch checkpoint as ``model``'s variables: ``load_state_dict``, the template from
  ``jax.eval_shape(model.init, ...)``, ``from_torch``, and then the BatchNorm configuration the
  file records (``jaxbn.save_state_dict``, ``jaxbn convert``) checked against ``model``'s
  layers: one ConfigMismatchError listing every differing layer and field, or a warning with
  ``strict=False``. Files without a record load as before. ``apply_kwargs`` are the model's call
  arguments at init (e.g. ``train=False``). Example::

    >>> model = jaxbn.models.resnet18()                                           # doctest: +SKIP
    >>> variables = jaxbn.convert.load("resnet18.safetensors", model, x).variables  # doctest: +SKIP
  """
  state_dict = load_state_dict(path)
  template = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **apply_kwargs), example_input)
  converted = from_torch(state_dict, template, rename=rename, strict=strict, dtype=dtype)
  recorded = read_batchnorm_config(path)
  if recorded is not None:
    renamed = renamer(rename)
    layer_config.check(
        {renamed(name): config for name, config in recorded.items()},
        layer_config.flax_configs(model, example_input, **apply_kwargs),
        strict=strict,
        source=str(path),
    )
  return converted
