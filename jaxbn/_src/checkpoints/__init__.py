"""Files and conversion: state_dicts read and written, torch <-> Flax by rule, the BatchNorm
configuration record, ``convert.load``, Flax checkpoint files, inspection."""
