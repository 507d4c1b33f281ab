"""Module paths as users write them (``'layer1/0'`` or torch's ``'layer1.0'``), matched against
the paths a model has: a path that matches nothing is a typo, reported with the closest ones."""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Sequence


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
  raise ValueError(
      f"{what}: {'; '.join(lines)} match{'es' if len(lines) == 1 else ''} no module path."
      f" Paths are module paths, 'layer1/0' or torch's 'layer1.0'; the model has"
      f" {', '.join(known[:12])}{', ...' if len(known) > 12 else ''}."
  )


def under(path: Sequence[str], prefixes: Sequence[tuple[str, ...]]) -> bool:
  return any(tuple(path[: len(p)]) == p for p in prefixes)
