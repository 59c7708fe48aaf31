"""Compatibility layer: the only part of pureflax that imports flax or equinox.

``to_functional`` / ``from_functional`` move params and optimiser state between the
functional form, Equinox modules and Flax linen variables or ``TrainState``, exactly.
"""

from pureflax.compat.convert import ConversionError, from_functional, to_functional

__all__ = ["ConversionError", "from_functional", "to_functional"]
