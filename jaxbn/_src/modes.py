"""Per-subtree eval mode: torch's ``model.train(); model.apply(set_bn_eval)`` for Flax."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

_EVAL_PREFIXES: contextvars.ContextVar[tuple[tuple[str, ...], ...]] = contextvars.ContextVar(
    "jaxbn_eval_prefixes", default=()
)


def split_path(path: str | Sequence[str]) -> tuple[str, ...]:
  """'backbone/layer1' -> ('backbone', 'layer1'); '' -> () (the whole model)."""
  if isinstance(path, str):
    return tuple(part for part in path.split("/") if part)
  return tuple(path)


def under(path: Sequence[str], prefixes: Sequence[tuple[str, ...]]) -> bool:
  return any(tuple(path[: len(p)]) == p for p in prefixes)


@contextlib.contextmanager
def eval_mode(*paths: str) -> Iterator[None]:
  """Within this context, every jaxbn.BatchNorm under one of ``paths`` (module paths such as
  ``'backbone/layer1'``) normalises with its running statistics and updates nothing, whatever
  ``use_running_average`` the model passes. Use it inside the function you jit: it acts while
  the model is traced.

  Example::

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxbn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = jaxbn.BatchNorm(use_running_average=not train, name='backbone')(x)
    ...     return jaxbn.BatchNorm(use_running_average=not train, name='head')(x)
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> with jaxbn.eval_mode('backbone'):
    ...   _, updates = Net().apply(variables, x, train=True, mutable=['batch_stats'])
    >>> int(updates['batch_stats']['backbone']['num_batches_tracked'])
    0
    >>> int(updates['batch_stats']['head']['num_batches_tracked'])
    1
  """
  token = _EVAL_PREFIXES.set(_EVAL_PREFIXES.get() + tuple(split_path(p) for p in paths))
  try:
    yield
  finally:
    _EVAL_PREFIXES.reset(token)


def forced_eval(module_path: Sequence[str]) -> bool:
  return under(module_path, _EVAL_PREFIXES.get())
