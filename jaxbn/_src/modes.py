"""Per-subtree eval mode: torch's ``model.train(); model.apply(set_bn_eval)`` for Flax."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import re
import warnings
from typing import Collection, Iterator, Sequence


@dataclasses.dataclass
class _EvalScope:
  """One ``eval_mode`` context: its path prefixes and the BatchNorm layers that consulted it."""

  prefixes: tuple[tuple[str, ...], ...]
  consulted: set[tuple[str, ...]] = dataclasses.field(default_factory=set)


_EVAL_SCOPES: contextvars.ContextVar[tuple[_EvalScope, ...]] = contextvars.ContextVar("jaxbn_eval_scopes", default=())


def split_path(path: str | Sequence[str]) -> tuple[str, ...]:
  """'backbone/layer1' or torch's 'backbone.layer1' -> ('backbone', 'layer1'); '' -> () (the
  whole model)."""
  if isinstance(path, str):
    return tuple(part for part in re.split(r"[/.]", path) if part)
  return tuple(path)


def check_prefixes_match(prefixes: Sequence[tuple[str, ...]], paths: Collection[tuple[str, ...]], what: str) -> None:
  """A path argument that matches none of ``paths`` (module paths) is a typo, not a no-op:
  raise, naming the closest module paths that exist."""
  unmatched = [p for p in prefixes if p and not any(tuple(path[: len(p)]) == p for path in paths)]
  if not unmatched:
    return
  known = sorted({"/".join(path[:i]) for path in paths for i in range(1, len(path) + 1)})
  lines = []
  for prefix in unmatched:
    close = difflib.get_close_matches("/".join(prefix), known, n=3, cutoff=0.5)
    lines.append(f"'{'/'.join(prefix)}'" + (f" (closest: {', '.join(close)})" if close else ""))
  raise ValueError(f"{what}: {'; '.join(lines)} match{'es' if len(lines) == 1 else ''} no module path."
                   f" Paths are module paths, 'layer1/0' or torch's 'layer1.0'; the model has"
                   f" {', '.join(known[:12])}{', ...' if len(known) > 12 else ''}.")


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
  scope = _EvalScope(tuple(split_path(p) for p in paths))
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
