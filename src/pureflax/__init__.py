"""pureflax: the Flax + Optax + Orbax VAE tutorial as pure functions over PyTrees.

Modules: ``nn`` (layers), ``vae`` (the model), ``state`` (TrainState), ``optim``
(optimiser from config), ``losses``, ``step`` (the shared train/eval step), ``data``
(MNIST), ``checkpoint`` (orbax), ``viz`` (pictures), ``train`` (the run), ``cli`` (the
scripts' flags).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pureflax.state import TrainState

__all__ = ["TrainState"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # imported on first use, so that ``pureflax.cli`` (a script's flags) loads without JAX
    if name == "TrainState":
        from pureflax.state import TrainState

        return TrainState
    raise AttributeError(f"module 'pureflax' has no attribute {name!r}")
