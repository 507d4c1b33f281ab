"""The Linen modules, thin holders of variables over ``core.layer``: BatchNorm, FrozenBatchNorm,
FoldedBatchNorm, and ``eval_mode``."""
