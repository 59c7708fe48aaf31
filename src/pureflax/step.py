"""The one train step and the eval step that every backend uses.

A step is built once from a loss and an optimiser: ``step(state, batch, key) ->
(state, metrics)``. It derives its randomness as ``fold_in(key, state.step)``, so the
same ``key`` and state give the same update wherever a run is resumed. Every model
speaks one protocol, ``apply(params, model_state, x, c, key, *, train) -> ((recon, mean,
logvar), model_state)``, with ``{}`` as the state of a model without any. Backends differ
only in the ``apply`` the loss closes over, where their state keeps the model state and,
for Flax's ``TrainState``, in how gradients are applied.

Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from pureflax import vae
    >>> from pureflax.state import TrainState
    >>> tx = optax.adamw(1e-4)
    >>> state = TrainState.create(vae.init(jax.random.key(0), vae.VAEConfig(latent_dim=4)), tx)
    >>> loss_fn = make_loss_fn(stateless(vae.apply))
    >>> step = make_train_step(loss_fn, tx)
    >>> batch = Batch(jnp.zeros((2, 784), jnp.uint8), jnp.array([1, 2], jnp.int32))
    >>> state, metrics = step(state, batch, jax.random.key(1))
    >>> int(state.step), metrics.loss.shape
    (1, ())
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt8

from pureflax.losses import Weight, vae_loss

# every model, with state or without: (params, model_state, x, c, key, *, train) -> ((recon, mean, logvar), model_state)
ApplyFn = Callable[..., tuple[tuple[Array, Array, Array], Any]]
LossFn = Callable[..., tuple[Array, Any]]  # (params, batch, key, model_state, train) -> (loss, ((mse, kl), model_state))


class StateSlot(NamedTuple):
    """Where a train state keeps its model's state (BatchNorm statistics): read it, and replace it."""

    get: Callable[[Any], Any]  # state -> model_state
    set: Callable[[Any, Any], Any]  # (state, model_state) -> state


def _keep_nothing(state: Any, model_state: Any) -> Any:
    if jax.tree_util.tree_leaves(model_state):
        raise ValueError("this train state has no place for a model state, but the model returned one "
                         "(give the state a field for it and the step its StateSlot)")
    return state


# pureflax's TrainState keeps it in ``model_state``; Flax's TrainState subclass (compat.flax_models) in ``batch_stats``;
# Flax's own TrainState has no field for it, which suits a model without state ({}).
MODEL_STATE = StateSlot(lambda state: state.model_state, lambda state, value: state._replace(model_state=value))
BATCH_STATS = StateSlot(lambda state: state.batch_stats, lambda state, value: state.replace(batch_stats=value))
NO_MODEL_STATE = StateSlot(lambda state: {}, _keep_nothing)


def stateless(apply: Callable[..., tuple[Array, Array, Array]]) -> ApplyFn:
    """A model without state, ``apply(params, x, c, key) -> (recon, mean, logvar)``, in the one protocol.

    The result takes the model state and hands it back unchanged (``{}`` for such a model); ``train``
    changes nothing, as nothing in the model behaves differently in training.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from pureflax import vae
        >>> config = vae.VAEConfig(latent_dim=4)
        >>> apply = stateless(lambda params, x, c, key: vae.apply(params, x, c, key, config))
        >>> (recon, mean, logvar), state = apply(vae.init(jax.random.key(0), config), {},
        ...                                      jnp.zeros((2, 784)), jnp.zeros((2, 10)), jax.random.key(1))
        >>> recon.shape, state
        ((2, 784), {})
    """

    def apply_with_state(params: Any, model_state: Any, x: Array, c: Array, key: PRNGKeyArray, *, train: bool = True):
        del train
        return apply(params, x, c, key), model_state

    return apply_with_state


class Batch(NamedTuple):
    """A batch as it lives on the device: raw pixels and integer labels."""

    images: UInt8[Array, "batch features"]  # dtype=uint8, 0..255
    labels: Int[Array, " batch"]  # dtype=int32, class index


class Metrics(NamedTuple):
    """The three loss terms of one step (or their sums / means over several)."""

    loss: Float[Array, ""]  # mse + kl_weight * kl
    mse: Float[Array, ""]  # summed half squared error, batch mean
    kl: Float[Array, ""]  # KL to N(0, I), batch mean


def to_inputs(batch: Batch, num_classes: int = 10) -> tuple[Float[Array, "batch features"], Float[Array, "batch classes"]]:
    """Pixels to float32 in [0, 1] and labels to one-hot, as the model takes them."""
    x = batch.images.astype(jnp.float32) / 255.0
    c = jax.nn.one_hot(batch.labels, num_classes, dtype=jnp.float32)
    return x, c


def make_loss_fn(apply_fn: ApplyFn, *, kl_weight: Weight = 0.5, num_classes: int = 10) -> LossFn:
    """The tutorial's ``loss_fn`` over any model.

    Args:
        apply_fn: the model, ``apply(params, model_state, x, c, key, train=...) -> ((recon, mean, logvar),
            model_state)``; :func:`stateless` makes one of ``apply(params, x, c, key)``.
        kl_weight: weight of the KL term.
        num_classes: for the one-hot labels.

    Returns:
        ``loss_fn(params, batch, key, model_state={}, train=True) -> (loss, ((mse, kl), model_state))``.
    """

    def loss_fn(params: Any, batch: Batch, key: PRNGKeyArray, model_state: Any = None, train: bool = True):
        x, c = to_inputs(batch, num_classes)
        (recon, mean, logvar), model_state = apply_fn(params, {} if model_state is None else model_state, x, c, key,
                                                      train=train)
        loss, terms = vae_loss(recon, x, mean, logvar, kl_weight)
        return loss, (terms, model_state)

    return loss_fn


def all_at_once(grads: Any) -> Any:
    """``grads`` unchanged, but only once every one of them is computed.

    An ``optimization_barrier``: XLA then schedules the whole optimiser update after the
    backward pass instead of interleaving each layer's update with the remaining matrix
    products (docs/performance.md measures it; the numbers are bit for bit the same).
    """
    return jax.lax.optimization_barrier(grads)


def default_apply_gradients(tx: optax.GradientTransformation) -> Callable[[Any, Any], Any]:
    """How a :class:`pureflax.TrainState` takes gradients: through ``tx``, explicitly."""
    return lambda state, grads: state.apply_gradients(grads=grads, tx=tx)


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    apply_gradients: Callable[[Any, Any], Any] | None = None,
    slot: StateSlot = MODEL_STATE,
) -> Callable[[Any, Batch, PRNGKeyArray], tuple[Any, Metrics]]:
    """Build THE jitted train step.

    Args:
        loss_fn: from :func:`make_loss_fn`.
        tx: the optimiser.
        apply_gradients: ``(state, grads) -> state``; defaults to
            ``state.apply_gradients(grads=grads, tx=tx)``. Flax's ``TrainState``
            passes ``lambda s, g: s.apply_gradients(grads=g)``.
        slot: where the state keeps the model state: :data:`MODEL_STATE` (pureflax's
            ``TrainState``), :data:`BATCH_STATS` or, for Flax's own ``TrainState``,
            :data:`NO_MODEL_STATE`. The step reads it, trains with it and stores what the
            model returns, beside the updated params.

    Returns:
        ``step(state, batch, key) -> (state, Metrics)``, jitted, with ``state`` donated.
        ``state`` needs ``.step`` and ``.params``.
    """
    update = apply_gradients or default_apply_gradients(tx)

    def step(state: Any, batch: Batch, key: PRNGKeyArray) -> tuple[Any, Metrics]:
        step_key = jax.random.fold_in(key, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, ((mse, kl), model_state)), grads = grad_fn(state.params, batch, step_key, slot.get(state))
        return slot.set(update(state, all_at_once(grads)), model_state), Metrics(loss, mse, kl)

    return jax.jit(step, donate_argnums=0)


def make_eval_step(loss_fn: LossFn) -> Callable[..., Metrics]:
    """Build the jitted eval step: ``eval_step(params, batch, key, model_state={}) -> Metrics``.

    The model runs with ``train=False`` (BatchNorm on the running statistics ``model_state`` holds).
    """

    def eval_step(params: Any, batch: Batch, key: PRNGKeyArray, model_state: Any = None) -> Metrics:
        loss, ((mse, kl), _) = loss_fn(params, batch, key, model_state, train=False)
        return Metrics(loss, mse, kl)

    return jax.jit(eval_step)
