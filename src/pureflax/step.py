"""The one train step and the eval step that every backend uses.

A step is built once from a loss and an optimiser: ``step(state, batch, key) ->
(state, metrics)``. It derives its randomness as ``fold_in(key, state.step)``, so the
same ``key`` and state give the same update wherever a run is resumed. Backends differ
only in the ``apply`` the loss closes over and, for Flax's ``TrainState``, in how
gradients are applied.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from pureflax import vae
    >>> from pureflax.state import TrainState
    >>> tx = optax.adamw(1e-4)
    >>> state = TrainState.create(vae.init(jax.random.key(0), vae.VAEConfig(latent_dim=4)), tx)
    >>> loss_fn = make_loss_fn(vae.apply)
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

ApplyFn = Callable[..., tuple[Array, Array, Array]]  # (params, x, c, key) -> (recon, mean, logvar)
LossFn = Callable[..., tuple[Array, tuple[Array, Array]]]  # (params, batch, key) -> (loss, (mse, kl))


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
    """The tutorial's ``loss_fn`` over any ``apply(params, x, c, key)``.

    Returns:
        ``loss_fn(params, batch, key) -> (loss, (mse, kl))``.
    """

    def loss_fn(params: Any, batch: Batch, key: PRNGKeyArray):
        x, c = to_inputs(batch, num_classes)
        recon, mean, logvar = apply_fn(params, x, c, key)
        return vae_loss(recon, x, mean, logvar, kl_weight)

    return loss_fn


def default_apply_gradients(tx: optax.GradientTransformation) -> Callable[[Any, Any], Any]:
    """How a :class:`pureflax.TrainState` takes gradients: through ``tx``, explicitly."""
    return lambda state, grads: state.apply_gradients(grads=grads, tx=tx)


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    apply_gradients: Callable[[Any, Any], Any] | None = None,
) -> Callable[[Any, Batch, PRNGKeyArray], tuple[Any, Metrics]]:
    """Build THE jitted train step.

    Args:
        loss_fn: from :func:`make_loss_fn`.
        tx: the optimiser.
        apply_gradients: ``(state, grads) -> state``; defaults to
            ``state.apply_gradients(grads=grads, tx=tx)``. Flax's ``TrainState``
            passes ``lambda s, g: s.apply_gradients(grads=g)``.

    Returns:
        ``step(state, batch, key) -> (state, Metrics)``, jitted, with ``state`` donated.
        ``state`` needs ``.step`` and ``.params``.
    """
    update = apply_gradients or default_apply_gradients(tx)

    def step(state: Any, batch: Batch, key: PRNGKeyArray) -> tuple[Any, Metrics]:
        step_key = jax.random.fold_in(key, state.step)
        (loss, (mse, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, step_key)
        return update(state, grads), Metrics(loss, mse, kl)

    return jax.jit(step, donate_argnums=0)


def make_eval_step(loss_fn: LossFn) -> Callable[[Any, Batch, PRNGKeyArray], Metrics]:
    """Build the jitted eval step: ``eval_step(params, batch, key) -> Metrics``."""

    def eval_step(params: Any, batch: Batch, key: PRNGKeyArray) -> Metrics:
        loss, (mse, kl) = loss_fn(params, batch, key)
        return Metrics(loss, mse, kl)

    return jax.jit(eval_step)
