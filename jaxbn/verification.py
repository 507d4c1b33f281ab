"""``jaxbn.verify`` and what it takes and returns: proof, on the user's own model, that its port
(or emitted source) trains like torch: gradients, optimiser updates, running statistics.

Example::

  result = jaxbn.verify(model, x, optimizer=jaxbn.verification.AdamW(lr=1e-4), steps=2)
  print(result.summary())
  json.dump(result.to_json(), open("verify.json", "w"))  # the schema: Verification.to_json

Needs torch (``jaxbn[torch]``).
"""

from jaxbn._src.verify.api import FLOOR, RTOL, verify
from jaxbn._src.verify.optimizers import SGD, Adam, AdamW
from jaxbn._src.verify.result import SCHEMA_VERSION, Check, Divergence, LayerFigures, Verification
from jaxbn._src.verify.warm_up import warm_up

__all__ = [
    "FLOOR",
    "RTOL",
    "SCHEMA_VERSION",
    "SGD",
    "Adam",
    "AdamW",
    "Check",
    "Divergence",
    "LayerFigures",
    "Verification",
    "verify",
    "warm_up",
]
