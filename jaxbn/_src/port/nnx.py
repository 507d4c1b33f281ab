"""``jaxbn.port(..., api="nnx")`` with ``custom_modules``, ``custom_ops`` or ``autocast``: the
ported Linen module as a Flax NNX module, through flax's own bridge, with NNX's mode switches
(without them the port builds native NNX classes: ``port/source``)."""

from __future__ import annotations

from flax import nnx

from jaxbn._src.port.interpreter import Ported


class PortedNNX(nnx.bridge.ToNNX):
  """A ported torch model as an NNX module: ``model.train()`` / ``model.eval()`` (or
  ``nnx.view(model, use_running_average=...)``) choose torch's mode, and training updates the
  running statistics in place. Variables: ``nnx.Param`` and ``nnx.BatchStat`` at the torch paths
  (``convert.from_torch`` / ``to_torch`` take the module); dropout draws from ``rngs``' dropout
  stream. ``parity.compare`` and the Linen tools take the Linen port (``api="linen"``).

  Example::

    >>> model, state = jaxbn.port(torch_model, x, api="nnx")   # doctest: +SKIP
    >>> model.train(); logits = model(x)   # statistics move, as torch's   # doctest: +SKIP
    >>> model.eval(); logits = model(x)                       # doctest: +SKIP
  """

  def __init__(self, module: Ported, *, rngs: nnx.Rngs):
    super().__init__(module, rngs=rngs)
    # The bridge takes every attribute for a variable but those named to_nnx__*.
    self.to_nnx__use_running_average = False  # training mode, as a new torch module

  def __call__(self, *inputs, use_running_average: bool | None = None, **named_inputs):
    evaluate = use_running_average if use_running_average is not None else self.to_nnx__use_running_average
    return super().__call__(*inputs, train=not evaluate, mutable=False if evaluate else ["batch_stats"], **named_inputs)

  @property
  def use_running_average(self) -> bool:
    """The mode: set by ``model.train()`` / ``model.eval()`` (flax's ``set_attributes``)."""
    return self.to_nnx__use_running_average

  @use_running_average.setter
  def use_running_average(self, value: bool):
    self.to_nnx__use_running_average = value

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view(model, use_running_average=...)``."""
    if use_running_average is not None:
      self.to_nnx__use_running_average = use_running_average
