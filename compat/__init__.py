"""Compatibility layer: the only part of pureflax that imports flax or equinox.

``to_functional`` / ``from_functional`` move params and optimiser state between the
functional form, Equinox modules, Flax linen variables or ``TrainState`` and Flax NNX
modules with their ``nnx.Optimizer``, exactly; ``migrate`` does both in one call (Linen to NNX,
say, from an object or a checkpoint written the tutorial's way); ``load`` gives a trained run's
params or train state in any form. ``variables_to_functional`` / ``variables_from_functional``
do the same for a model with BatchNorm statistics: Linen ``{'params', 'batch_stats'}``, an
Equinox ``(model, eqx.nn.State)`` pair, an NNX module holding ``nnx.BatchStat``.
"""

from pureflax.compat.convert import (
    ConversionError,
    from_functional,
    plan,
    register_layer,
    to_functional,
    variables_from_functional,
    variables_to_functional,
)
from pureflax.compat.trained import load, migrate

__all__ = ["ConversionError", "from_functional", "load", "migrate", "plan", "register_layer", "to_functional",
           "variables_from_functional", "variables_to_functional"]
