"""The tutorial's Flax linen modules, as the tutorial writes them.

``FeedForward`` (compact form), ``VAE`` (``setup`` form with ``encode``, ``decode``,
``reparam``), and the two small forms ``Model`` (setup) and ``ModelCompact``.
For the same key, ``jax.jit(VAE(latent_dim=32).init)(...)['params']`` equals
``pureflax.vae.init(key, VAEConfig(latent_dim=32))`` bit for bit (on a CPU the eager ``init`` too).

Examples:
    >>> import jax, jax.numpy as jnp
    >>> model = VAE(latent_dim=4)
    >>> x, c = jnp.zeros((2, 784)), jnp.zeros((2, 10))
    >>> variables = model.init(jax.random.PRNGKey(0), x, c, jax.random.PRNGKey(1))
    >>> recon, mean, logvar = model.apply(variables, x, c, jax.random.PRNGKey(2))
    >>> recon.shape, mean.shape
    ((2, 784), (2, 4))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state
from jax.typing import ArrayLike


class TrainState(train_state.TrainState):
    """Flax's ``TrainState`` with the ``batch_stats`` collection, as the Flax docs write it for BatchNorm.

    The step updates it from ``apply(..., mutable=['batch_stats'])``:
    ``state.apply_gradients(grads=grads).replace(batch_stats=updates['batch_stats'])``.
    """

    params: Any = struct.field(pytree_node=True)  # a dict or a FrozenDict, as Flax's own TrainState takes
    batch_stats: Any = None


class Model(nn.Module):
    """One dense layer and an activation, written with ``setup``."""

    dim: int
    activation_fn: Callable = nn.relu

    def setup(self):
        """Build the Dense layer."""
        self.layer = nn.Dense(self.dim)

    def __call__(self, x):
        x = self.layer(x)
        return self.activation_fn(x)


class ModelCompact(nn.Module):
    """The same model, written with ``nn.compact``."""

    dim: int
    activation_fn: Callable = nn.relu

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim)(x)
        return self.activation_fn(x)


class FeedForward(nn.Module):
    """A stack of dense layers with an activation after each (optionally not the last)."""

    dimensions: tuple[int, ...] = (256, 128, 64)
    activation_fn: Callable = nn.relu
    drop_last_activation: bool = False

    @nn.compact
    def __call__(self, x: ArrayLike) -> ArrayLike:
        for i, d in enumerate(self.dimensions):
            x = nn.Dense(d)(x)
            if i != len(self.dimensions) - 1 or not self.drop_last_activation:
                x = self.activation_fn(x)
        return x


class VAE(nn.Module):
    """The tutorial's class-conditioned VAE."""

    encoder_dimensions: tuple[int, ...] = (256, 128, 64)
    decoder_dimensions: tuple[int, ...] = (128, 256, 784)
    latent_dim: int = 4
    activation_fn: Callable = nn.relu

    def setup(self):
        """Build the encoder, the latent projections, the class projection and the decoder."""
        self.encoder = FeedForward(self.encoder_dimensions, self.activation_fn)
        self.pre_latent_proj = nn.Dense(self.latent_dim * 2)
        self.post_latent_proj = nn.Dense(self.encoder_dimensions[-1])
        self.class_proj = nn.Dense(self.encoder_dimensions[-1])
        self.decoder = FeedForward(self.decoder_dimensions, self.activation_fn, drop_last_activation=False)

    def reparam(self, mean: ArrayLike, logvar: ArrayLike, key: jax.Array) -> ArrayLike:
        """Draw ``z = mean + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)`` from ``key``."""
        std = jnp.exp(logvar * 0.5)
        eps = jax.random.normal(key, mean.shape)
        return eps * std + mean

    def encode(self, x: ArrayLike):
        """The latent distribution of ``x``: ``(mean, logvar)``."""
        x = self.encoder(x)
        mean, logvar = jnp.split(self.pre_latent_proj(x), 2, axis=-1)
        return mean, logvar

    def decode(self, x: ArrayLike, c: ArrayLike):
        """The reconstruction of the latent ``x`` for the one-hot classes ``c``."""
        x = self.post_latent_proj(x)
        x = x + self.class_proj(c)
        x = self.decoder(x)
        return x

    def __call__(self, x: ArrayLike, c: ArrayLike, key: jax.Array) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
        mean, logvar = self.encode(x)
        z = self.reparam(mean, logvar, key)
        y = self.decode(z, c)
        return y, mean, logvar


class ConvEncoder(nn.Module):
    """Two stride-2 3×3 convolutions, BatchNorm after the first (``pureflax.convvae``'s encoder)."""

    features: tuple[int, int] = (16, 32)
    activation_fn: Callable = nn.relu
    momentum: float = 0.99
    epsilon: float = 1e-5

    def setup(self):
        """Build the two convolutions and the BatchNorm between them."""
        self.conv_0 = nn.Conv(self.features[0], (3, 3), strides=2, use_bias=False)  # BatchNorm follows
        self.norm_0 = nn.BatchNorm(momentum=self.momentum, epsilon=self.epsilon)
        self.conv_1 = nn.Conv(self.features[1], (3, 3), strides=2)

    def __call__(self, x: ArrayLike, train: bool) -> jax.Array:
        x = self.norm_0(self.conv_0(x), use_running_average=not train)
        return self.activation_fn(self.conv_1(self.activation_fn(x)))


class ConvDecoder(nn.Module):
    """Two stride-2 3×3 transposed convolutions, BatchNorm after the first."""

    features: int = 16
    activation_fn: Callable = nn.relu
    momentum: float = 0.99
    epsilon: float = 1e-5

    def setup(self):
        """Build the two transposed convolutions and the BatchNorm between them."""
        self.deconv_0 = nn.ConvTranspose(self.features, (3, 3), strides=(2, 2), use_bias=False)
        self.norm_0 = nn.BatchNorm(momentum=self.momentum, epsilon=self.epsilon)
        self.deconv_1 = nn.ConvTranspose(1, (3, 3), strides=(2, 2))

    def __call__(self, x: ArrayLike, train: bool) -> jax.Array:
        x = self.norm_0(self.deconv_0(x), use_running_average=not train)
        return self.activation_fn(self.deconv_1(self.activation_fn(x)))


class ConvVAE(nn.Module):
    """The convolutional VAE (``pureflax.convvae``) in Linen: ``apply(variables, x, c, key, train=...)``.

    In training, call with ``mutable=['batch_stats']``: BatchNorm's running statistics come back
    in the second result, as the Flax docs show.
    """

    features: tuple[int, int] = (16, 32)
    latent_dim: int = 32
    num_classes: int = 10
    image_size: int = 28
    activation_fn: Callable = nn.relu
    momentum: float = 0.99
    epsilon: float = 1e-5

    def setup(self):
        """Build the convolutional encoder and decoder and the dense projections between them."""
        side = self.image_size // 4
        self.bottleneck = (side, side, self.features[1])
        norm = dict(activation_fn=self.activation_fn, momentum=self.momentum, epsilon=self.epsilon)
        self.encoder = ConvEncoder(self.features, **norm)
        self.pre_latent_proj = nn.Dense(self.latent_dim * 2)
        self.post_latent_proj = nn.Dense(side * side * self.features[1])
        self.class_proj = nn.Dense(side * side * self.features[1])
        self.decoder = ConvDecoder(self.features[0], **norm)

    def encode(self, x: ArrayLike, train: bool):
        """The latent distribution of the flat images ``x``: ``(mean, logvar)``; ``train`` picks BatchNorm's batch statistics."""
        h = self.encoder(jnp.reshape(x, (x.shape[0], self.image_size, self.image_size, 1)), train)
        mean, logvar = jnp.split(self.pre_latent_proj(jnp.reshape(h, (h.shape[0], -1))), 2, axis=-1)
        return mean, logvar

    def decode(self, z: ArrayLike, c: ArrayLike, train: bool):
        """The flat reconstruction of ``z`` for the one-hot classes ``c``; ``train`` picks BatchNorm's batch statistics."""
        h = self.activation_fn(self.post_latent_proj(z) + self.class_proj(c))
        h = self.decoder(jnp.reshape(h, (h.shape[0], *self.bottleneck)), train)
        return jnp.reshape(h, (h.shape[0], -1))

    def __call__(self, x: ArrayLike, c: ArrayLike, key: jax.Array, train: bool = False):
        mean, logvar = self.encode(x, train)
        z = jax.random.normal(key, mean.shape) * jnp.exp(logvar * 0.5) + mean
        return self.decode(z, c, train), mean, logvar


def tutorial_train_step(model: nn.Module, optimiser: optax.GradientTransformation, *, kl_weight: float = 0.5,
                        num_classes: int = 10):
    """The tutorial's jitted ``train_step`` as it writes it (its ``create_train_step``, the init left to the caller).

    ``train_step(params, opt_state, x, c, key) -> (params, opt_state, loss, mse_loss, kl_loss)``, with
    ``x`` the images in [0, 1] and ``c`` the integer labels (one-hot inside, as the tutorial does).
    """

    def loss_fn(params, x, c, key):
        reduce_dims = list(range(1, len(x.shape)))
        c = jax.nn.one_hot(c, num_classes)
        recon, mean, logvar = model.apply(params, x, c, key)
        mse_loss = optax.l2_loss(recon, x).sum(axis=reduce_dims).mean()
        kl_loss = jnp.mean(-0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar), axis=reduce_dims))
        loss = mse_loss + kl_weight * kl_loss
        return loss, (mse_loss, kl_loss)

    @jax.jit
    def train_step(params, opt_state, x, c, key):
        losses, grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, c, key)
        loss, (mse_loss, kl_loss) = losses
        updates, opt_state = optimiser.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, mse_loss, kl_loss

    return train_step
