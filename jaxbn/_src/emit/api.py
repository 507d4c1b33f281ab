"""``jaxbn.emit``: a torch model as Flax source a person can read, edit and own, with its weights."""

from __future__ import annotations

import pathlib
from typing import Any

import torch

from jaxbn._src.checkpoints.files import save_state_dict
from jaxbn._src.errors import PortError
from jaxbn._src.port.api import traced_port
from jaxbn._src.port.source.build import model_source, write
from jaxbn._src.port.source.linen import WEIGHTS_NAME


def emit(
    torch_model: torch.nn.Module,
    example_input: Any,
    out_dir,
    *,
    api: str = "linen",
    layout: str = "NCHW",
    **port_options,
) -> pathlib.Path:
  """Writes ``out_dir/model.py``, Flax source of the torch model, and ``out_dir/model.safetensors``,
  its state_dict with the BatchNorm configuration recorded.

  The source has one class per torch module class (``Bottleneck``), shared by the repeated blocks,
  with what differs between them (channels, strides, an optional ``downsample``) as fields; layers
  sit at torch's attribute names, so ``jaxbn.convert`` maps the state_dict onto them; BatchNorm is
  ``jaxbn.BatchNorm`` / ``jaxbn.nnx.BatchNorm`` with each layer's eps and momentum; ops are
  ``jaxbn.ops`` (the port's op table), ``jnp`` and Python operators. It imports jax, flax, numpy
  and jaxbn, never torch.

  ``api="linen"``: ``model.load()`` returns ``(module, variables)`` with ``jaxbn.port``'s contract:
  ``module.apply(variables, x)`` is torch's eval forward, ``module.apply(variables, x, train=True,
  mutable=["batch_stats"])`` its train forward. ``api="nnx"``: ``model.load()`` returns the
  ``nnx.Module``, in training mode as a new torch module (``model.eval()``, ``model.train()``).

  The torch model's training recipe (``jaxbn.port``'s ``Port.recipe``: layers it keeps in eval while
  it trains, parameters with ``requires_grad=False``) is written as the lists ``KEEP_EVAL`` and
  ``FROZEN``, which the model and ``frozen_mask(variables)`` (Linen) / ``trainable(model)`` (NNX)
  in ``model.py`` use: edit them to train otherwise.

  ``layout="NHWC"``: channels-last source, as a Flax engineer writes it: Flax's own
  ``nn.Conv`` / ``nn.Dense`` (NNX: ``nnx.Conv`` / ``nnx.Linear``), ``jaxbn.BatchNorm(axis=-1)``,
  every op's axes in that layout (a transpose only where torch's order decides the result: a
  flatten of channels and space before a Linear). The same variables, so the same
  ``model.safetensors``; ``INPUT_AXES`` and ``OUTPUT_AXES`` in ``model.py`` say how inputs and
  outputs relate to torch's (``jnp.transpose(x, axes)``).

  ``port_options`` are ``jaxbn.port``'s (``custom_ops``, ``leaf_modules``, ``dtype``, and for Linen
  ``custom_modules``): what they give is imported by reference, from the module that defines it.

  Example::

    >>> jaxbn.emit(torchvision.models.resnet18(), torch.zeros(1, 3, 64, 64), "resnet18")  # doctest: +SKIP
    >>> from resnet18.model import load                                                  # doctest: +SKIP
    >>> module, variables = load()                                                       # doctest: +SKIP

  Returns the path of ``model.py``. Raises PortError for what the port refuses, and for what the
  source cannot say (naming it).
  """
  if api not in ("linen", "nnx"):
    raise ValueError(f"emit: api must be 'linen' or 'nnx', not {api!r}")
  if port_options.get("autocast") is not None:
    raise PortError(
        "emit: autocast is not written into source; emit the float32 model, and use jaxbn.port(autocast=) for mixed"
        " precision"
    )
  ported, traced = traced_port(torch_model, example_input, **port_options)
  text, _, constants = model_source(traced, torch_model, example_input, api, ported.recipe, layout)
  path = write(pathlib.Path(out_dir), text, constants)
  save_state_dict(torch_model, path.parent / WEIGHTS_NAME)
  return path
