"""Compatibility layer: the only part of pureflax that imports flax or equinox.

``to_functional`` / ``from_functional`` move params and optimiser state between the
functional form, Equinox modules and Flax linen variables or ``TrainState``, exactly;
``load`` gives a trained run's params or train state in any form.
"""

from pureflax.compat.convert import ConversionError, from_functional, to_functional
from pureflax.compat.trained import load

__all__ = ["ConversionError", "from_functional", "load", "to_functional"]
