"""The tutorial's VAE loss: summed L2 reconstruction plus a weighted KL term."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Real

Weight = float | int | Real[Array, ""]  # a Python number, or a traced scalar (e.g. an annealed weight)


def kl_divergence(
    mean: Float[Array, "batch latent"], logvar: Float[Array, "batch latent"]
) -> Float[Array, ""]:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over latents, averaged over the batch."""
    return jnp.mean(-0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar), axis=-1))


def reconstruction(recon: Float[Array, "batch features"], x: Float[Array, "batch features"]) -> Float[Array, ""]:
    """``optax.l2_loss`` (half the squared error) summed over features, averaged over the batch."""
    return optax.l2_loss(recon, x).sum(axis=-1).mean()


def vae_loss(
    recon: Float[Array, "batch features"],
    x: Float[Array, "batch features"],
    mean: Float[Array, "batch latent"],
    logvar: Float[Array, "batch latent"],
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

    Example:
        >>> import jax.numpy as jnp
        >>> z = jnp.zeros((2, 3))
        >>> loss, (mse, kl) = vae_loss(jnp.ones((2, 4)), jnp.zeros((2, 4)), z, z)
        >>> float(loss), float(mse), float(kl)
        (2.0, 2.0, 0.0)
    """
    mse = reconstruction(recon, x)
    kl = kl_divergence(mean, logvar)
    return mse + kl_weight * kl, (mse, kl)
