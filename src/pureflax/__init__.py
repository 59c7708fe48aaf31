"""pureflax: the Flax + Optax + Orbax VAE tutorial as pure functions over PyTrees.

Modules: ``nn`` (layers), ``vae`` (the model), ``state`` (TrainState), ``optim``
(optimiser from config), ``losses``, ``step`` (the shared train/eval step), ``data``
(MNIST), ``checkpoint`` (orbax), ``viz`` (pictures), ``train`` (the run).
"""

from pureflax.state import TrainState

__all__ = ["TrainState"]
__version__ = "0.1.0"
