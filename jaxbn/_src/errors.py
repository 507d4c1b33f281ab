"""jaxbn's error types, in the lowest layer so that every layer raises and catches them without
an import circle (and without importing torch: ``except jaxbn.PortError`` works anywhere)."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be read safely or completely."""


class ConversionError(ValueError):
  """A state_dict that does not fit the Flax variables; lists every problem at once."""


class ConfigMismatchError(ConversionError):
  """BatchNorm layers configured differently from the checkpoint's record; lists all of them."""


class PortError(ValueError):
  """A torch model the port cannot run; names every unsupported node and how to extend the port."""
