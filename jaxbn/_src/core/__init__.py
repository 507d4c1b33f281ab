"""The functional core: batch statistics, normalisation, running update, training gradient, checks and
the one BatchNorm call. Arrays in, arrays out; imports jax and numpy only."""
