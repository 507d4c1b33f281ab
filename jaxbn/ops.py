"""torch's functions and Tensor methods as JAX functions, with torch's arguments and channels-first
layout: the op table ``jaxbn.port`` runs and ``jaxbn.emit``'s source calls (``ops.max_pool2d(x,
kernel_size=3, stride=2, padding=1)`` is ``F.max_pool2d``'s result, to the rounding)."""

from jaxbn._src.torchlike.functional import *  # noqa: F403 (the table's functions: __all__ lists them)
from jaxbn._src.torchlike.functional import __all__  # noqa: F401
