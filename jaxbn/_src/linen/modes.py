"""Per-subtree eval mode: torch's ``model.train(); model.apply(set_bn_eval)`` for Flax."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from jaxbn._src.variables.paths import check_prefixes_match, split_path, under


@dataclasses.dataclass
class _EvalScope:
  """One ``eval_mode`` context: its path prefixes and the BatchNorm layers that consulted it."""

  prefixes: tuple[tuple[str, ...], ...]
  consulted: set[tuple[str, ...]] = dataclasses.field(default_factory=set)


_EVAL_SCOPES: contextvars.ContextVar[tuple[_EvalScope, ...]] = contextvars.ContextVar("jaxbn_eval_scopes", default=())


@contextlib.contextmanager
def eval_mode(*paths: str, within: Any = None) -> Iterator[None]:
  """Within this context, every jaxbn.BatchNorm under one of ``paths`` (module paths such as
  ``'backbone/layer1'``) normalises with its running statistics and updates nothing, whatever
  ``use_running_average`` the model passes. Use it inside the function you jit: it acts while
  the model is traced. ``within``: a bound Linen module whose own path the paths are relative
  to (``within=self`` inside a module's ``__call__``: what ``jaxbn.emit`` writes for a torch
  model that keeps layers in eval while it trains).

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
  root = tuple(within.scope.path) if within is not None else ()
  scope = _EvalScope(tuple(root + split_path(p) for p in paths))
  token = _EVAL_SCOPES.set(_EVAL_SCOPES.get() + (scope,))
  try:
    yield
  finally:
    _EVAL_SCOPES.reset(token)
  if not scope.consulted:
    warnings.warn(
        "jaxbn.eval_mode: no jaxbn.BatchNorm ran inside this context, so it had no effect. It acts"
        " while the model is traced: put it inside the function you jit, not around a call of a"
        " function that is already compiled.",
        stacklevel=3,
    )
  else:
    check_prefixes_match(scope.prefixes, scope.consulted, f"jaxbn.eval_mode{tuple(paths)}")


def forced_eval(module_path: Sequence[str]) -> bool:
  path = tuple(module_path)
  scopes = _EVAL_SCOPES.get()
  for scope in scopes:
    scope.consulted.add(path)
  return any(under(path, scope.prefixes) for scope in scopes)
