"""The tutorial's VAE as Flax NNX modules, written as the NNX guides write them.

``VAE(latent_dim=32, *, rngs=nnx.Rngs(0))`` builds its ``nnx.Linear`` layers eagerly (NNX
modules own their parameters); ``model(x, c, key)`` returns ``(recon, mean, logvar)`` for a
batch, drawing the noise from ``key`` as the tutorial's Linen model does. ``nnx.Linear``
keeps Linen's ``kernel`` (in, out) and ``bias`` and computes what ``flax.linen.Dense``
computes, so from the same params the outputs are the same.

Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> model = VAE(latent_dim=4, rngs=nnx.Rngs(0))
    >>> x, c = jnp.zeros((2, 784)), jnp.zeros((2, 10))
    >>> recon, mean, logvar = model(x, c, jax.random.PRNGKey(1))
    >>> recon.shape, mean.shape, model.encoder.layers[0].kernel.shape
    ((2, 784), (2, 4), (784, 256))
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike


class FeedForward(nnx.Module):
    """A stack of ``nnx.Linear`` layers with an activation after each (optionally not the last)."""

    def __init__(
        self,
        in_features: int,
        dimensions: tuple[int, ...] = (256, 128, 64),
        activation_fn: Callable = jax.nn.relu,
        drop_last_activation: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        sizes = (in_features, *dimensions)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.activation_fn = activation_fn
        self.drop_last_activation = drop_last_activation

    def __call__(self, x: ArrayLike) -> jax.Array:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i != last or not self.drop_last_activation:
                x = self.activation_fn(x)
        return x


class VAE(nnx.Module):
    """The class-conditioned VAE; attribute names are the tutorial's submodule names."""

    def __init__(
        self,
        latent_dim: int = 32,
        encoder_dimensions: tuple[int, ...] = (256, 128, 64),
        decoder_dimensions: tuple[int, ...] = (128, 256, 784),
        num_classes: int = 10,
        input_dim: int = 784,
        activation_fn: Callable = jax.nn.relu,
        *,
        rngs: nnx.Rngs,
    ):
        hidden = encoder_dimensions[-1]
        self.encoder = FeedForward(input_dim, encoder_dimensions, activation_fn, rngs=rngs)
        self.pre_latent_proj = nnx.Linear(hidden, latent_dim * 2, rngs=rngs)
        self.post_latent_proj = nnx.Linear(latent_dim, hidden, rngs=rngs)
        self.class_proj = nnx.Linear(num_classes, hidden, rngs=rngs)
        self.decoder = FeedForward(hidden, decoder_dimensions, activation_fn, rngs=rngs)  # the tutorial keeps the last relu
        self.latent_dim = latent_dim

    @staticmethod
    def reparam(mean: ArrayLike, logvar: ArrayLike, key: jax.Array) -> jax.Array:
        """Draw ``z = mean + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)`` from ``key``."""
        std = jnp.exp(logvar * 0.5)
        eps = jax.random.normal(key, jnp.shape(mean))
        return eps * std + mean

    def encode(self, x: ArrayLike) -> tuple[jax.Array, jax.Array]:
        """The latent distribution of ``x``: ``(mean, logvar)``."""
        mean, logvar = jnp.split(self.pre_latent_proj(self.encoder(x)), 2, axis=-1)
        return mean, logvar

    def decode(self, z: ArrayLike, c: ArrayLike) -> jax.Array:
        """The reconstruction of ``z`` for the one-hot classes ``c``."""
        return self.decoder(self.post_latent_proj(z) + self.class_proj(c))

    def __call__(self, x: ArrayLike, c: ArrayLike, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        _check_width("x", x, self.encoder.layers[0], "features")
        _check_width("c", c, self.class_proj, "classes")
        mean, logvar = self.encode(x)
        z = self.reparam(mean, logvar, key)
        return self.decode(z, c), mean, logvar


def _check_width(name: str, x: ArrayLike, layer: nnx.Linear, what: str) -> None:
    """A shape error naming the argument, when it is traced rather than deep inside a matmul."""
    shape, expected = tuple(jnp.shape(x)), layer.in_features
    if len(shape) != 2 or shape[-1] != expected:
        raise ValueError(f"VAE: argument {name} has shape {shape}; expected (batch, {expected}) {what}")


class ConvEncoder(nnx.Module):
    """Two stride-2 3×3 convolutions, BatchNorm after the first (``pureflax.convvae``'s encoder)."""

    def __init__(self, features: tuple[int, int], activation_fn: Callable, momentum: float, epsilon: float, *, rngs: nnx.Rngs):
        self.conv_0 = nnx.Conv(1, features[0], (3, 3), strides=2, use_bias=False, rngs=rngs)  # BatchNorm follows
        self.norm_0 = nnx.BatchNorm(features[0], momentum=momentum, epsilon=epsilon, rngs=rngs)
        self.conv_1 = nnx.Conv(features[0], features[1], (3, 3), strides=2, rngs=rngs)
        self.activation_fn = activation_fn

    def __call__(self, x: ArrayLike, train: bool) -> jax.Array:
        x = self.norm_0(self.conv_0(x), use_running_average=not train)
        return self.activation_fn(self.conv_1(self.activation_fn(x)))


class ConvDecoder(nnx.Module):
    """Two stride-2 3×3 transposed convolutions, BatchNorm after the first."""

    def __init__(self, features: tuple[int, int], activation_fn: Callable, momentum: float, epsilon: float, *, rngs: nnx.Rngs):
        self.deconv_0 = nnx.ConvTranspose(features[1], features[0], (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.norm_0 = nnx.BatchNorm(features[0], momentum=momentum, epsilon=epsilon, rngs=rngs)
        self.deconv_1 = nnx.ConvTranspose(features[0], 1, (3, 3), strides=2, rngs=rngs)
        self.activation_fn = activation_fn

    def __call__(self, x: ArrayLike, train: bool) -> jax.Array:
        x = self.norm_0(self.deconv_0(x), use_running_average=not train)
        return self.activation_fn(self.deconv_1(self.activation_fn(x)))


class ConvVAE(nnx.Module):
    """The convolutional VAE (``pureflax.convvae``) in NNX; BatchNorm's statistics are ``nnx.BatchStat``.

    ``model(x, c, key, train=True)`` normalises with the batch's statistics and updates the
    running ones in place, as NNX modules do; ``train=False`` uses the running ones.
    """

    def __init__(self, latent_dim: int = 32, features: tuple[int, int] = (16, 32), num_classes: int = 10,
                 image_size: int = 28, activation_fn: Callable = jax.nn.relu, momentum: float = 0.99,
                 epsilon: float = 1e-5, *, rngs: nnx.Rngs):
        side = image_size // 4
        flat = side * side * features[1]
        self.encoder = ConvEncoder(features, activation_fn, momentum, epsilon, rngs=rngs)
        self.pre_latent_proj = nnx.Linear(flat, latent_dim * 2, rngs=rngs)
        self.post_latent_proj = nnx.Linear(latent_dim, flat, rngs=rngs)
        self.class_proj = nnx.Linear(num_classes, flat, rngs=rngs)
        self.decoder = ConvDecoder(features, activation_fn, momentum, epsilon, rngs=rngs)
        self.activation_fn, self.image_size, self.bottleneck = activation_fn, image_size, (side, side, features[1])

    def encode(self, x: ArrayLike, train: bool) -> tuple[jax.Array, jax.Array]:
        """The latent distribution of the flat images ``x``: ``(mean, logvar)``; ``train`` picks BatchNorm's batch statistics."""
        h = self.encoder(jnp.reshape(x, (x.shape[0], self.image_size, self.image_size, 1)), train)
        mean, logvar = jnp.split(self.pre_latent_proj(jnp.reshape(h, (h.shape[0], -1))), 2, axis=-1)
        return mean, logvar

    def decode(self, z: ArrayLike, c: ArrayLike, train: bool) -> jax.Array:
        """The flat reconstruction of ``z`` for the one-hot classes ``c``; ``train`` picks BatchNorm's batch statistics."""
        h = self.activation_fn(self.post_latent_proj(z) + self.class_proj(c))
        h = self.decoder(jnp.reshape(h, (h.shape[0], *self.bottleneck)), train)
        return jnp.reshape(h, (h.shape[0], -1))

    def __call__(self, x: ArrayLike, c: ArrayLike, key: jax.Array, train: bool = False):
        mean, logvar = self.encode(x, train)
        z = jax.random.normal(key, jnp.shape(mean)) * jnp.exp(logvar * 0.5) + mean
        return self.decode(z, c, train), mean, logvar
