"""The functional core every jaxbn layer calls: statistics, normalisation, running update.

Use these to build a BatchNorm variant (NNX, Equinox, a custom layer) with jaxbn's semantics
without a second copy of the maths.
"""

from jaxbn._src.core.normalization import normalize
from jaxbn._src.core.running import RunningStats, update_factor, update_running_stats
from jaxbn._src.core.statistics import BatchStats, batch_statistics, replicated
from jaxbn._src.core.training import batch_normalize

__all__ = [
    "BatchStats",
    "RunningStats",
    "batch_normalize",
    "batch_statistics",
    "normalize",
    "replicated",
    "update_factor",
    "update_running_stats",
]
