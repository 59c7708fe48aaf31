"""The Equinox, Flax linen and Flax NNX backends, and the registry of all four.

Each backend initialises through the functional init and converts, so the same seed
gives the same starting weights in every form; ``native=True`` uses the library's own
initialiser instead (for Flax that is the same numbers; for Equinox it is
``eqx.nn.Linear``'s uniform init).

Example:
    >>> import jax
    >>> from pureflax import vae
    >>> backend = get_backend("equinox", vae.VAEConfig(latent_dim=4))
    >>> model = backend.init_params(jax.random.PRNGKey(0), False)
    >>> model.encoder.layers[0].weight.shape
    (256, 784)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx
from flax.training.train_state import TrainState as FlaxTrainState

from pureflax import nn, vae
from pureflax.backend import Backend, functional_backend, functional_init
from pureflax.compat import convert, equinox_models, flax_models, nnx_models
from pureflax.state import TrainState


def module_sizes(config: vae.VAEConfig) -> dict:
    """The keyword arguments of the Equinox and NNX ``VAE`` constructors for ``config``."""
    return dict(
        latent_dim=config.latent_dim,
        encoder_dimensions=config.encoder_dimensions,
        decoder_dimensions=config.decoder_dimensions,
        num_classes=config.num_classes,
        input_dim=config.input_dim,
        activation_fn=nn.activation(config.activation),
    )


def equinox_backend(config: vae.VAEConfig) -> Backend:
    """Params are an ``equinox_models.VAE``; state a :class:`pureflax.TrainState` holding it."""
    init = functional_init(config)

    def build(key: jax.Array) -> equinox_models.VAE:
        return equinox_models.VAE(**module_sizes(config), key=key)

    def init_params(key: jax.Array, native: bool) -> equinox_models.VAE:
        if native:
            return build(key)
        skeleton = eqx.filter_eval_shape(build, key)  # shapes only: eqx's own init never runs
        return convert.from_functional(init(key), like=skeleton)

    return Backend(
        name="equinox",
        init_params=init_params,
        param_names=convert.param_names,
        create_state=TrainState.create,
        apply=equinox_models.batched_apply,
        apply_gradients=lambda tx: (lambda state, grads: state.apply_gradients(grads=grads, tx=tx)),
        to_functional=convert.to_functional,
        from_functional=convert.from_functional,
    )


def flax_backend(config: vae.VAEConfig) -> Backend:
    """Params are Flax variables ``{'params': ...}``; state Flax's own ``TrainState``."""
    init = functional_init(config)
    model = flax_models.VAE(
        encoder_dimensions=config.encoder_dimensions,
        decoder_dimensions=config.decoder_dimensions,
        latent_dim=config.latent_dim,
        activation_fn=nn.activation(config.activation),
    )

    def init_params(key: jax.Array, native: bool) -> dict:
        if native:
            x = jnp.zeros((1, config.input_dim))
            c = jnp.zeros((1, config.num_classes))
            return jax.jit(model.init)(key, x, c, jax.random.PRNGKey(0))  # the tutorial's model.init
        return {"params": init(key)}

    def create_state(params: dict, tx) -> FlaxTrainState:
        return FlaxTrainState.create(apply_fn=model.apply, params=params, tx=tx)

    return Backend(
        name="flax",
        init_params=init_params,
        param_names=convert.param_names,
        create_state=create_state,
        apply=model.apply,
        apply_gradients=lambda tx: (lambda state, grads: state.apply_gradients(grads=grads)),  # tx lives in the state
        to_functional=convert.to_functional,
        from_functional=convert.from_functional,
    )


def nnx_model(config: vae.VAEConfig, rngs: nnx.Rngs) -> nnx_models.VAE:
    """The NNX VAE of ``config``'s sizes."""
    return nnx_models.VAE(**module_sizes(config), rngs=rngs)


def nnx_backend(config: vae.VAEConfig) -> Backend:
    """Params are the NNX VAE's params ``State`` (pure arrays); the module is split once.

    ``nnx.split`` of a shapes-only module gives the graph; ``apply`` merges it with the
    params inside the shared jitted step, so the step runs on a plain pytree, as every form's.
    """
    init = functional_init(config)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: nnx_model(config, nnx.Rngs(0))), nnx.Param)
    like = nnx.as_pure(abstract)

    def init_params(key: jax.Array, native: bool) -> Any:
        if native:  # nnx.Linear's own init from an nnx.Rngs stream: other numbers than Linen's from one key
            return nnx.as_pure(nnx.state(nnx_model(config, nnx.Rngs(params=key)), nnx.Param))
        return convert.from_functional(init(key), like=like)

    def apply(params: Any, x, c, key):
        return nnx.merge(graphdef, params)(x, c, key)

    return Backend(
        name="nnx",
        init_params=init_params,
        param_names=convert.param_names,
        create_state=TrainState.create,
        apply=apply,
        apply_gradients=lambda tx: (lambda state, grads: state.apply_gradients(grads=grads, tx=tx)),
        to_functional=convert.to_functional,
        from_functional=convert.from_functional,
    )


BACKENDS: dict[str, Callable[[vae.VAEConfig], Backend]] = {
    "functional": functional_backend,
    "equinox": equinox_backend,
    "flax": flax_backend,
    "nnx": nnx_backend,
}


def get_backend(name: str, config: vae.VAEConfig) -> Backend:
    """The backend called ``name`` for a model of ``config``'s sizes."""
    try:
        return BACKENDS[name](config)
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
