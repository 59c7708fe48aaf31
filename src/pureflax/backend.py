"""A backend: what one form of the model (functional, Equinox, Flax) supplies to training.

Everything else — the train step, loss, optimiser, data, logging, checkpoints and
pictures — is shared. The functional backend is here; the Equinox and Flax ones are in
``pureflax.compat.backends`` (the only place that imports those libraries).

Examples:
    >>> import jax
    >>> from pureflax import vae
    >>> backend = functional_backend(vae.VAEConfig(latent_dim=4))
    >>> params = backend.init_params(jax.random.PRNGKey(0), False)
    >>> backend.param_names(params)['encoder']['Dense_0']['kernel']
    'encoder/Dense_0/kernel'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from pureflax import models, optim
from pureflax.state import TrainState
from pureflax.step import MODEL_STATE, ApplyFn, StateSlot, default_apply_gradients


class Backend(NamedTuple):
    """The adapter of one model form; every field is a pure function."""

    name: str
    init_params: Callable[[jax.Array, bool], Any]  # (key, native) -> params in this form
    param_names: Callable[[Any], Any]  # params -> same tree of functional paths ('encoder/Dense_0/kernel')
    create_state: Callable[..., Any]  # (params, tx, model_state) -> state
    apply: ApplyFn  # (state.params, model_state, x, c, key, *, train) -> ((recon, mean, logvar), model_state), batched
    apply_gradients: Callable[[optax.GradientTransformation], Callable[[Any, Any], Any]]  # tx -> (state, grads) -> state
    to_functional: Callable[[Any], Any]  # state or params -> functional TrainState or params dict
    from_functional: Callable[[Any, Any], Any]  # (functional tree, like) -> like's form
    init_model_state: Callable[[], Any] = dict  # () -> the model's initial state in this form ({}: none)
    slot: StateSlot = MODEL_STATE  # where the state keeps the model state

    def model_state(self, state: Any) -> Any:
        """The model state ``state`` holds (``{}`` for a model without any)."""
        return self.slot.get(state)


def functional_backend(config: models.ModelConfig) -> Backend:
    """The core form: params are the functional dict, state a :class:`pureflax.TrainState`."""
    model = models.of(config)
    init = model.init  # one compiled program per config, shared by every backend

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
        apply=model.apply,
        apply_gradients=default_apply_gradients,
        to_functional=lambda obj: obj,
        from_functional=from_functional,
        init_model_state=model.init_state,
    )
