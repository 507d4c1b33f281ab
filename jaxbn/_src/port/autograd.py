"""A ``torch.autograd.Function`` ported through its forward, where the user says its backward is
the derivative of its forward (a memory-efficient swish, recomputing instead of saving): the
claim checked at port time, on the example's values, against torch's own backward.

Without the opt-in (``port(..., through_forward=(Function,))``) a Function is refused by name:
the port cannot know its backward is not something else (a straight-through estimator), and fx
inlining the forward would lose it silently.
"""

from __future__ import annotations

from typing import Any

import torch

from jaxbn._src.errors import PortError

# float64 on the example: a backward that is the forward's derivative agrees to rounding (1e-15
# of the largest gradient); a different rule (straight-through, a clipped or scaled gradient) is
# off by its own size
RTOL = 1e-8


def no_grad_value(value):
  """A value torch computed under ``torch.no_grad()`` in forward, as the tracer records it: its
  tensors detached (the port: ``jaxbn.ops.detach``, no gradient through it)."""
  return torch.utils._pytree.tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, value)


class NoContext:
  """The ``ctx`` a forward gets when it is traced through: what it saves is not needed (JAX
  differentiates the forward itself)."""

  def save_for_backward(self, *tensors):
    del tensors

  def mark_non_differentiable(self, *tensors):
    del tensors

  def set_materialize_grads(self, value):
    del value


def _takes_ctx(function: type) -> bool:
  """Old-style forward(ctx, ...) rather than forward(...) with a separate setup_context."""
  return function.setup_context is torch.autograd.Function.setup_context


def forward(function: type, *args, **kwargs):
  """``function``'s forward on ``args`` (traced values, when the tracer calls it)."""
  if _takes_ctx(function):
    return function.forward(NoContext(), *args, **kwargs)
  return function.forward(*args, **kwargs)


def _tensors(output) -> list[torch.Tensor]:
  leaves = output if isinstance(output, (tuple, list)) else (output,)
  return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def check_backward(function: type, apply, args: tuple, kwargs: dict) -> None:
  """Refuses ``function`` unless its backward (``apply``: torch's own ``function.apply``) gives,
  on ``args`` (the example's values) in float64, the gradients torch's autograd takes of its
  forward, within RTOL of the largest gradient."""

  def run(call):
    inputs = [
        a.detach().double().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    ]
    differentiable = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
    with torch.enable_grad():
      outputs = _tensors(call(*inputs))
      generator = torch.Generator().manual_seed(0)
      # Tensor.normal_, not torch.randn: while tracing, the tracer records torch.randn as a node
      cotangents = [torch.empty(o.shape, dtype=o.dtype).normal_(generator=generator) for o in outputs]
      return torch.autograd.grad(outputs, differentiable, cotangents, allow_unused=True)

  name = f"{function.__module__}.{function.__qualname__}"
  try:
    own = run(lambda *a: apply(*a, **kwargs))
    derived = run(lambda *a: forward(function, *a, **kwargs))
  except RuntimeError as error:
    raise PortError(
        f"through_forward: torch.autograd.Function {name} could not be checked on the example in float64"
        f" ({str(error).splitlines()[0]}); port it with custom_ops={{{function.__qualname__}: jax_function}}"
    ) from None
  largest = max((float(g.abs().max()) for g in derived if g is not None), default=0.0)
  for index, (a, b) in enumerate(zip(own, derived, strict=True)):
    a = torch.zeros(()) if a is None else a
    b = torch.zeros(()) if b is None else b
    error = float((a - b).abs().max()) / max(largest, 1e-300)
    if not error <= RTOL:
      raise PortError(
          f"through_forward: the backward of torch.autograd.Function {name} is not the derivative of its"
          f" forward on the example (input {index}: gradients differ by {error:.2g} of the largest, bound"
          f" {RTOL:g}); tracing its forward would train it otherwise. Port it with"
          f" custom_ops={{{function.__qualname__}: jax_function}} (jax.custom_vjp for its backward)."
      )


def concrete(value: Any, tracer) -> Any:
  """A traced argument's value on the example (proxies resolved by the tracer)."""
  import torch.fx as fx

  return tracer.value(value.node) if isinstance(value, fx.Proxy) else value
