"""What ``jaxbn.verify`` found: every check with its bound and the arbiter that decided it, where
the port first diverged from torch, and per-layer figures for a plot.

``Verification.to_json()`` is one JSON object (``SCHEMA_VERSION`` 1)::

  {
    "schema": 1,
    "passed": bool,
    "target": str,                 # what was verified, e.g. "jaxbn.port (api='linen')"
    "optimizer": str,              # e.g. "SGD(lr=0.001, momentum=0.9, weight_decay=0.0, nesterov=False)"
    "loss": str,                   # "mean_square" or "cross_entropy"
    "steps": int,                  # optimiser steps in float64 lock-step (the first also in float32)
    "checks": [                    # in the order they ran
      {"name": str, "dtype": "float32" | "float64", "step": int | null,
       "error": float, "bound": float, "arbiter": str, "passed": bool, "where": str | null}
    ],
    "divergence": null | {         # the first place jaxbn and torch part (when a check failed)
      "phase": "round trip" | "eval" | "forward" | "backward" | "statistics" | "update",
      "step": int | null, "dtype": str, "layer": str, "tensor": str | null,
      "error": float, "bound": float
    },
    "layers": [                    # per torch module (model order): the worst over the run
      {"layer": str, "output": float | null, "gradient": float | null,
       "update": float | null, "statistics": float | null}
    ],
    "seconds": {str: float},       # "build", "torch", "jax", "total"
    "notes": [str]                 # how a bound was chosen, where it is not the default
  }

Arbiters: ``"exact"`` (bit for bit; the round trip and counters), ``"tolerance"`` (within the
bound), ``"tracks torch float32"`` (float32: jaxbn's L2 distance to torch float64 within twice
torch float32's plus the floor), ``"torch float32 spread"`` / ``"torch float64 spread"`` (within
10x torch's own difference with every input, parameter and buffer one ulp away, or in
channels_last memory format: the larger), ``"float64"``
(a float32 figure beyond its floor, decided by the same comparison in float64).
"""

from __future__ import annotations

import dataclasses
import math

SCHEMA_VERSION = 1
PHASES = ("round trip", "eval", "forward", "backward", "statistics", "update")


@dataclasses.dataclass(frozen=True)
class Check:
  """One comparison: ``error`` against ``bound``, decided by ``arbiter``."""

  name: str
  dtype: str
  step: int | None
  error: float
  bound: float
  arbiter: str
  passed: bool
  where: str | None = None  # the worst tensor or output


@dataclasses.dataclass(frozen=True)
class Divergence:
  """Where jaxbn first parts from torch: the phase of which step, in which layer (torch's module
  name) and, for gradients and updates, which tensor."""

  phase: str
  step: int | None
  dtype: str
  layer: str
  tensor: str | None
  error: float
  bound: float

  def describe(self) -> str:
    at = f"step {self.step}, " if self.step is not None else ""
    tensor = f" ({self.tensor})" if self.tensor and self.tensor != self.layer else ""
    what = {
        "round trip": "the variables do not convert back to torch's state_dict",
        "eval": "the eval forward differs",
        "forward": "the training forward differs",
        "backward": "the gradients differ (layers after it in the forward agree: its backward, or that of"
        " the ops just after it, is wrong)",
        "statistics": "the running statistics differ after the forward (momentum, counters, or an update dropped)",
        "update": "the parameters differ after the optimiser step while their gradients agree (a parameter"
        " torch does not train, or another optimiser)",
    }[self.phase]
    return (
        f"first divergence: {self.layer}{tensor}, {at}{self.phase} in {self.dtype}: {what};"
        f" error {self.error:.3g} > {self.bound:.3g}"
    )


@dataclasses.dataclass(frozen=True)
class LayerFigures:
  """One torch module's worst relative differences over the run (None where it has none)."""

  layer: str
  output: float | None = None  # BatchNorm layers' outputs, float32 (first step, eval)
  gradient: float | None = None  # float64, per tensor
  update: float | None = None  # parameters after each step, float64
  statistics: float | None = None  # running statistics, float64, relative to max(|value|, 1)


@dataclasses.dataclass(frozen=True)
class Verification:
  """The result of ``jaxbn.verify``; ``bool(result)`` is ``result.passed``."""

  target: str
  optimizer: str
  loss: str
  steps: int
  checks: tuple[Check, ...]
  divergence: Divergence | None
  layers: tuple[LayerFigures, ...]
  seconds: dict[str, float]
  notes: tuple[str, ...] = ()  # how a bound was chosen, where it is not the default

  @property
  def passed(self) -> bool:
    return all(check.passed for check in self.checks)

  def __bool__(self) -> bool:
    return self.passed

  @property
  def worst(self) -> Check:
    """The check closest to (or furthest past) its bound."""

    def ratio(check):
      return math.inf if not math.isfinite(check.error) else check.error / max(check.bound, 1e-300)

    return max(self.checks, key=ratio)

  @property
  def failed(self) -> tuple[Check, ...]:
    return tuple(check for check in self.checks if not check.passed)

  def summary(self) -> str:
    """A few lines for a person: the verdict, the worst check, the first divergence."""
    worst = self.worst
    verdict = "trains like torch" if self.passed else f"differs from torch in {len(self.failed)} of"
    lines = [
        f"{'OK' if self.passed else 'FAILED'}: {self.target} {verdict} {len(self.checks)} checks"
        f" ({self.steps} steps of {self.optimizer}, {self.loss} loss)"
    ]
    for check in self.failed:
      lines.append(f"  failed: {_describe(check)}")
    if self.passed:
      lines.append(f"  closest to its bound: {_describe(worst)}")
    if self.divergence is not None:
      lines.append(f"  {self.divergence.describe()}")
    lines += [f"  note: {note}" for note in self.notes]
    return "\n".join(lines)

  def to_json(self) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "passed": self.passed,
        "target": self.target,
        "optimizer": self.optimizer,
        "loss": self.loss,
        "steps": self.steps,
        "checks": [_finite(dataclasses.asdict(check)) for check in self.checks],
        "divergence": None if self.divergence is None else _finite(dataclasses.asdict(self.divergence)),
        "layers": [_finite(dataclasses.asdict(layer)) for layer in self.layers],
        "seconds": dict(self.seconds),
        "notes": list(self.notes),
    }


def _describe(check: Check) -> str:
  step = f" step {check.step}" if check.step is not None else ""
  where = f" at {check.where}" if check.where else ""
  return f"{check.name} ({check.dtype}{step}): {check.error:.3g} vs bound {check.bound:.3g} [{check.arbiter}]{where}"


def _finite(record: dict) -> dict:
  """JSON has no NaN or infinity: non-finite figures become strings ("nan", "inf")."""
  return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
