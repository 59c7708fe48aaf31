"""A backend: what one form of the model (functional, Equinox, Flax) supplies to training.

Everything else — the train step, loss, optimiser, data, logging, checkpoints and
pictures — is shared. The functional backend is here; the Equinox and Flax ones are in
``pureflax.compat.backends`` (the only place that imports those libraries).

Example:
    >>> import jax
    >>> from pureflax import vae
    >>> backend = functional_backend(vae.VAEConfig(latent_dim=4))
    >>> params = backend.init_params(jax.random.PRNGKey(0), False)
    >>> backend.param_names(params)['encoder']['Dense_0']['kernel']
    'encoder/Dense_0/kernel'
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import optax

from pureflax import optim, vae
from pureflax.state import TrainState
from pureflax.step import ApplyFn, default_apply_gradients


class Backend(NamedTuple):
    """The adapter of one model form; every field is a pure function."""

    name: str
    init_params: Callable[[jax.Array, bool], Any]  # (key, native) -> params in this form
    param_names: Callable[[Any], Any]  # params -> same tree of functional paths ('encoder/Dense_0/kernel')
    create_state: Callable[[Any, optax.GradientTransformation], Any]  # (params, tx) -> state
    apply: ApplyFn  # (state.params, x, c, key) -> (recon, mean, logvar), batched
    apply_gradients: Callable[[optax.GradientTransformation], Callable[[Any, Any], Any]]  # tx -> (state, grads) -> state
    to_functional: Callable[[Any], Any]  # state or params -> functional TrainState or params dict
    from_functional: Callable[[Any, Any], Any]  # (functional tree, like) -> like's form


@functools.cache
def functional_init(config: vae.VAEConfig) -> Callable[[jax.Array], Any]:
    """``vae.init`` jitted for ``config``: one compiled program rather than many eager ops.

    Cached per config, so every backend of one config shares the compiled init.
    """
    return jax.jit(partial(vae.init, config=config))


def functional_backend(config: vae.VAEConfig) -> Backend:
    """The core form: params are the functional dict, state a :class:`pureflax.TrainState`."""
    init = functional_init(config)

    def init_params(key: jax.Array, native: bool) -> Any:
        del native  # the functional init is Flax's own: there is no other
        return init(key)

    def names(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda path, _: optim.path_str(path), params)

    def from_functional(tree: Any, like: Any) -> Any:
        del like  # already in this form
        return tree

    return Backend(
        name="functional",
        init_params=init_params,
        param_names=names,
        create_state=TrainState.create,
        apply=partial(vae.apply, config=config),
        apply_gradients=default_apply_gradients,
        to_functional=lambda obj: obj,
        from_functional=from_functional,
    )
