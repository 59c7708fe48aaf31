"""The tutorial's VAE loss: summed L2 reconstruction plus a weighted KL term."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from beartype import beartype
from jaxtyping import Array, Float, Real, jaxtyped

Weight = float | int | Real[Array, ""]  # a Python number, or a traced scalar (e.g. an annealed weight)
ArrayIn = Array | np.ndarray  # inputs may be jax or NumPy arrays

# Each function checks its arguments' shapes when called (at trace time under jit, so
# free per step): a wrong rank, or sizes named alike that differ (recon and x must both be
# (batch, features), mean and logvar (batch, latent) with the same batch), raise
# jaxtyping.TypeCheckError (a TypeError) naming the argument and the expected shape.


def _kl(mean: ArrayIn, logvar: ArrayIn) -> Array:
    mean, logvar = jnp.asarray(mean), jnp.asarray(logvar)
    return jnp.mean(-0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar), axis=-1))


def _l2(recon: ArrayIn, x: ArrayIn) -> Array:
    return optax.l2_loss(jnp.asarray(recon), jnp.asarray(x)).sum(axis=-1).mean()


@jaxtyped(typechecker=beartype)
def kl_divergence(
    mean: Float[ArrayIn, "batch latent"], logvar: Float[ArrayIn, "batch latent"]
) -> Float[Array, ""]:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over latents, averaged over the batch."""
    return _kl(mean, logvar)


@jaxtyped(typechecker=beartype)
def reconstruction(recon: Float[ArrayIn, "batch features"], x: Float[ArrayIn, "batch features"]) -> Float[Array, ""]:
    """``optax.l2_loss`` (half the squared error) summed over features, averaged over the batch."""
    return _l2(recon, x)


@jaxtyped(typechecker=beartype)
def vae_loss(
    recon: Float[ArrayIn, "batch features"],
    x: Float[ArrayIn, "batch features"],
    mean: Float[ArrayIn, "batch latent"],
    logvar: Float[ArrayIn, "batch latent"],
    kl_weight: Weight = 0.5,
) -> tuple[Float[Array, ""], tuple[Float[Array, ""], Float[Array, ""]]]:
    """The tutorial's ``loss_fn`` body: ``mse + kl_weight * kl``.

    Args:
        recon: the model's reconstruction.
        x: the input images in [0, 1].
        mean: encoder mean.
        logvar: encoder log-variance.
        kl_weight: weight of the KL term.

    Returns:
        ``(loss, (mse, kl))`` as the tutorial's ``loss_fn`` returns them.

    Examples:
        >>> import jax.numpy as jnp
        >>> z = jnp.zeros((2, 3))
        >>> loss, (mse, kl) = vae_loss(jnp.ones((2, 4)), jnp.zeros((2, 4)), z, z)
        >>> float(loss), float(mse), float(kl)
        (2.0, 2.0, 0.0)
    """
    mse = _l2(recon, x)  # the shapes are checked already, once
    kl = _kl(mean, logvar)
    return mse + kl_weight * kl, (mse, kl)
