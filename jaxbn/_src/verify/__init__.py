"""Proof that a Flax port trains like its torch model (``jaxbn.verify``)."""
