"""The Equinox, Flax linen and Flax NNX backends, and the registry of all four.

Each backend initialises through the functional init and converts, so the same seed
gives the same starting weights in every form; ``native=True`` uses the library's own
initialiser instead (for Flax that is the same numbers; for Equinox it is
``eqx.nn.Linear``'s uniform init).

Examples:
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

from pureflax import convvae, models, nn, vae
from pureflax.backend import Backend, functional_backend
from pureflax.config import FORMS
from pureflax.compat import convert, equinox_models, flax_models, nnx_models
from pureflax.state import TrainState
from pureflax.step import BATCH_STATS, NO_MODEL_STATE, default_apply_gradients, stateless


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


def conv_sizes(config: convvae.ConvVAEConfig) -> dict:
    """The keyword arguments of the Equinox, NNX and Linen ``ConvVAE`` constructors for ``config``."""
    return dict(latent_dim=config.latent_dim, features=config.features, num_classes=config.num_classes,
                image_size=config.image_size, activation_fn=nn.activation(config.activation),
                momentum=config.momentum, epsilon=config.epsilon)


def equinox_backend(config: models.ModelConfig) -> Backend:
    """Params are an ``equinox_models.VAE``; state a :class:`pureflax.TrainState` holding it."""
    if models.kind_of(config) == "conv":
        return _equinox_conv_backend(config)
    init = models.of(config).init

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
        apply=stateless(equinox_models.batched_apply),
        apply_gradients=default_apply_gradients,
        to_functional=convert.to_functional,
        from_functional=convert.from_functional,
    )


def _equinox_conv_backend(config: convvae.ConvVAEConfig) -> Backend:
    """Params are an ``equinox_models.ConvVAE``; its BatchNorm statistics an ``eqx.nn.State`` in ``model_state``."""
    functional = models.of(config)
    init = functional.init

    def build(key: jax.Array):
        return eqx.nn.make_with_state(equinox_models.ConvVAE)(**conv_sizes(config), key=key)

    skeleton, state_skeleton = eqx.filter_eval_shape(build, jax.random.PRNGKey(0))

    def init_params(key: jax.Array, native: bool) -> equinox_models.ConvVAE:
        return build(key)[0] if native else convert.from_functional(init(key), like=skeleton)

    def apply(params, model_state, x, c, key, *, train: bool):
        return equinox_models.batched_apply_stateful(params, model_state, x, c, key, train=train)

    return Backend(
        name="equinox", init_params=init_params, param_names=convert.param_names, create_state=TrainState.create,
        apply=apply, apply_gradients=default_apply_gradients,
        to_functional=convert.to_functional, from_functional=convert.from_functional,
        init_model_state=lambda: convert.state_from_functional(functional.init_state(), state_skeleton, skeleton),
    )


def flax_apply_gradients(tx) -> Callable[[Any, Any], Any]:
    """How Flax's ``TrainState`` takes gradients: its own ``apply_gradients``, through ``tx``.

    The state carries a ``tx`` of its own (a static field); in a run it is ``tx`` itself. A sweep's
    step builds ``tx`` from each member's traced learning rate, so the state lends it that ``tx``
    for the update and keeps its own.
    """
    return lambda state, grads: state.replace(tx=tx).apply_gradients(grads=grads).replace(tx=state.tx)


def flax_backend(config: models.ModelConfig) -> Backend:
    """Params are Flax variables ``{'params': ...}``; state Flax's own ``TrainState``."""
    if models.kind_of(config) == "conv":
        return _flax_conv_backend(config)
    init = models.of(config).init
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

    def create_state(params: dict, tx, model_state: Any = None) -> FlaxTrainState:
        del model_state  # the MLP has none
        return FlaxTrainState.create(apply_fn=model.apply, params=params, tx=tx)

    return Backend(
        name="flax",
        init_params=init_params,
        param_names=convert.param_names,
        create_state=create_state,
        apply=stateless(model.apply),
        apply_gradients=flax_apply_gradients,
        to_functional=convert.to_functional,
        from_functional=convert.from_functional,
        slot=NO_MODEL_STATE,
    )


def _flax_conv_backend(config: convvae.ConvVAEConfig) -> Backend:
    """Params are ``{'params': ...}``; state ``flax_models.TrainState``, BatchNorm's statistics in its ``batch_stats``."""
    functional = models.of(config)
    init = functional.init
    model = flax_models.ConvVAE(**conv_sizes(config))

    def init_params(key: jax.Array, native: bool) -> dict:
        if native:
            x, c = jnp.zeros((1, config.input_dim)), jnp.zeros((1, config.num_classes))
            return {"params": jax.jit(model.init)(key, x, c, jax.random.PRNGKey(0))["params"]}
        return {"params": init(key)}

    def create_state(params: dict, tx, model_state: Any = None) -> flax_models.TrainState:
        return flax_models.TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats=model_state)

    def apply(params, model_state, x, c, key, *, train: bool):
        variables = {**params, "batch_stats": model_state}
        if not train:
            return model.apply(variables, x, c, key, train=False), model_state
        out, updates = model.apply(variables, x, c, key, train=True, mutable=["batch_stats"])
        return out, updates["batch_stats"]

    return Backend(
        name="flax", init_params=init_params, param_names=convert.param_names, create_state=create_state,
        apply=apply, apply_gradients=flax_apply_gradients,
        to_functional=convert.to_functional, from_functional=convert.from_functional,
        init_model_state=functional.init_state, slot=BATCH_STATS,
    )


def nnx_model(config: models.ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The NNX VAE (MLP or conv) of ``config``'s sizes."""
    if models.kind_of(config) == "conv":
        return nnx_models.ConvVAE(**conv_sizes(config), rngs=rngs)
    return nnx_models.VAE(**module_sizes(config), rngs=rngs)


def nnx_backend(config: models.ModelConfig) -> Backend:
    """Params are the NNX VAE's params ``State`` (pure arrays); the module is split once.

    ``nnx.split`` of a shapes-only module gives the graph; ``apply`` merges it with the
    params inside the shared jitted step, so the step runs on a plain pytree, as every form's.
    The conv VAE's ``nnx.BatchStat`` variables are split off as the model state.
    """
    if models.kind_of(config) == "conv":
        return _nnx_conv_backend(config)
    init = models.of(config).init
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: nnx_model(config, nnx.Rngs(0))), nnx.Param)
    like = nnx.as_pure(abstract)

    def init_params(key: jax.Array, native: bool) -> Any:
        if native:  # nnx.Linear's own init from an nnx.Rngs stream: other numbers than Linen's from one key
            return nnx.as_pure(nnx.state(nnx_model(config, nnx.Rngs(params=key)), nnx.Param))
        return convert.from_functional(init(key), like=like)

    @stateless
    def apply(params: Any, x, c, key):
        return nnx.merge(graphdef, params)(x, c, key)

    return Backend(
        name="nnx",
        init_params=init_params,
        param_names=convert.param_names,
        create_state=TrainState.create,
        apply=apply,
        apply_gradients=default_apply_gradients,
        to_functional=convert.to_functional,
        from_functional=convert.from_functional,
    )


def _nnx_conv_backend(config: convvae.ConvVAEConfig) -> Backend:
    """Params the ``nnx.Param`` State, model state the ``nnx.BatchStat`` State, both pure arrays."""
    functional = models.of(config)
    init = functional.init
    graphdef, abstract, abstract_stats = nnx.split(nnx.eval_shape(lambda: nnx_model(config, nnx.Rngs(0))), nnx.Param, nnx.BatchStat)
    like, like_stats = nnx.as_pure(abstract), nnx.as_pure(abstract_stats)

    def init_params(key: jax.Array, native: bool) -> Any:
        if native:
            return nnx.as_pure(nnx.state(nnx_model(config, nnx.Rngs(params=key)), nnx.Param))
        return convert.from_functional(init(key), like=like)

    def apply(params, model_state, x, c, key, *, train: bool):
        model = nnx.merge(graphdef, params, model_state)
        out = model(x, c, key, train=train)
        return out, nnx.as_pure(nnx.state(model, nnx.BatchStat))

    return Backend(
        name="nnx", init_params=init_params, param_names=convert.param_names, create_state=TrainState.create,
        apply=apply, apply_gradients=default_apply_gradients,
        to_functional=convert.to_functional, from_functional=convert.from_functional,
        init_model_state=lambda: convert.state_from_functional(functional.init_state(), like_stats, None),
    )


# keyed by the names pureflax.config lists (which the script offers without importing JAX)
BACKENDS: dict[str, Callable[[models.ModelConfig], Backend]] = dict(
    zip(FORMS, (functional_backend, equinox_backend, flax_backend, nnx_backend), strict=True))


def get_backend(name: str, config: models.ModelConfig) -> Backend:
    """The backend called ``name`` for a model of ``config``'s sizes."""
    try:
        return BACKENDS[name](config)
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
