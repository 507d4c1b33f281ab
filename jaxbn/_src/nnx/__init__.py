"""The flax.nnx modules over the same ``core.layer`` call, and their in-place freezing tools."""
