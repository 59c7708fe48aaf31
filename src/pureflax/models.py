"""The models pureflax trains, behind one interface: ``mlp`` (the tutorial's VAE) and ``conv``.

:func:`of` gives a :class:`Model` for a config: pure functions over the functional params
and the model state (Flax's ``batch_stats``; ``{}`` for the MLP, which has none). Training,
evaluation and the pictures go through it, so they do not care which model it is.

Examples:
    >>> import jax, jax.numpy as jnp
    >>> from pureflax import convvae
    >>> model = of(convvae.ConvVAEConfig(latent_dim=4))
    >>> params, state = model.init(jax.random.key(0)), model.init_state()
    >>> model.kind, sorted(state['encoder']['norm_0'])
    ('conv', ['mean', 'var'])
    >>> model.sample(params, state, jnp.arange(3), jax.random.key(1)).shape
    (3, 784)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

from pureflax import convvae, vae
from pureflax.config import MODEL_KINDS
from pureflax.step import stateless

ModelConfig = vae.VAEConfig | convvae.ConvVAEConfig
# --model NAME -> its config, keyed by the names pureflax.config lists (which the script offers without importing JAX)
KINDS: dict[str, type] = dict(zip(MODEL_KINDS, (vae.VAEConfig, convvae.ConvVAEConfig), strict=True))


class Model(NamedTuple):
    """One model's pure functions, its config bound."""

    kind: str  # 'mlp' or 'conv'
    config: Any
    init: Callable[[Any], Any]  # key -> params
    init_state: Callable[[], Any]  # () -> model state ({} when stateless)
    apply: Callable[..., Any]  # (params, model_state, x, c, key, *, train) -> ((recon, mean, logvar), model_state)
    sample: Callable[..., Any]  # (params, model_state, labels, key) -> images (batch, features)
    reconstruct: Callable[..., Any]  # (params, model_state, x, c) -> images: the decoded latent mean


def kind_of(config: ModelConfig) -> str:
    """``'mlp'`` or ``'conv'``: the ``--model`` that builds ``config``."""
    for kind, cls in KINDS.items():
        if isinstance(config, cls):
            return kind
    raise TypeError(f"not a model config: {type(config).__name__} (expected one of {', '.join(c.__name__ for c in KINDS.values())})")


def _mlp_reconstruct(params, model_state, x, c, *, config: vae.VAEConfig):
    del model_state
    mean, _ = vae.encode(params, x, config)
    return vae.decode(params, mean, c, config)


@functools.cache
def of(config: ModelConfig) -> Model:
    """The :class:`Model` of ``config`` (cached: one per config, so jitted users compile once)."""
    if kind_of(config) == "mlp":
        return Model("mlp", config, partial(vae.init, config=config), dict,
                     stateless(partial(vae.apply, config=config)),
                     lambda params, model_state, labels, key: vae.sample(params, labels, key, config),
                     partial(_mlp_reconstruct, config=config))
    return Model("conv", config, partial(convvae.init, config=config), partial(convvae.init_state, config),
                 partial(convvae.apply, config=config),
                 partial(convvae.sample, config=config), partial(convvae.reconstruct, config=config))
