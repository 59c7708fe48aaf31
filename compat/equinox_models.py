"""The tutorial's VAE as an Equinox module built from ``eqx.nn.Linear``.

``__call__(x, c, key)`` takes ONE example (``x``: (784,), ``c``: (10,)); batches go
through :func:`batched_apply`, which draws the reparameterisation noise for the whole
batch from one key exactly as the tutorial's Flax ``VAE`` does, so the three forms give
the same numbers for the same key.

``eqx.nn.Linear`` keeps ``weight`` as (out, in), Flax's ``kernel`` is (in, out): the
converters in :mod:`pureflax.compat.convert` transpose, and never re-initialise.

Examples:
    >>> import jax, jax.numpy as jnp
    >>> model = VAE(latent_dim=4, key=jax.random.PRNGKey(0))
    >>> recon, mean, logvar = model(jnp.zeros(784), jnp.zeros(10), jax.random.PRNGKey(1))
    >>> recon.shape, mean.shape
    ((784,), (4,))
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jaxtyping import Array, Float, PRNGKeyArray, jaxtyped

from pureflax.compat.eqx_layers import BatchNorm, vmap_stateful

ArrayIn = Array | np.ndarray  # inputs may be jax or NumPy arrays

# The methods and batched_apply check their arguments' shapes when called (at trace time
# under jit/vmap, so free per step): the rank and the sizes named alike across arguments
# by jaxtyping (jaxtyping.TypeCheckError, a TypeError, naming the argument), the sizes
# the weights fix by _check_width (ValueError).


def _check_width(where: str, arg: str, value: ArrayIn, linear: eqx.nn.Linear, what: str, weight: str) -> None:
    """Raise ``ValueError`` unless ``value``'s last dimension is ``linear``'s input size."""
    shape, expected = tuple(jnp.shape(value)), linear.in_features
    if not shape or shape[-1] != expected:
        raise ValueError(
            f"{where}: {arg} has shape {shape} but the model takes {expected} {what} "
            f"({weight} is {tuple(linear.weight.shape)}, (out, in))"
        )


class FeedForward(eqx.Module):
    """A stack of ``eqx.nn.Linear`` with an activation after each (optionally not the last)."""

    # Flax names the i-th compact Dense of a module ``Dense_{i}``; the converters read this.
    flax_item_name: ClassVar[str] = "Dense_{i}"

    layers: tuple[eqx.nn.Linear, ...]
    activation_fn: Callable[[Array], Array] = eqx.field(static=True)
    drop_last_activation: bool = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        dimensions: tuple[int, ...] = (256, 128, 64),
        activation_fn: Callable[[Array], Array] = jax.nn.relu,
        drop_last_activation: bool = False,
        *,
        key: PRNGKeyArray,
    ):
        keys = jax.random.split(key, len(dimensions))
        sizes = (in_features, *dimensions)
        self.layers = tuple(eqx.nn.Linear(i, o, key=k) for i, o, k in zip(sizes[:-1], sizes[1:], keys))
        self.activation_fn = activation_fn
        self.drop_last_activation = drop_last_activation

    @jaxtyped(typechecker=beartype)
    def __call__(self, x: Float[ArrayIn, " features"]) -> Float[Array, " out"]:
        _check_width("FeedForward", "x", x, self.layers[0], "features", "layers[0].weight")
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i != last or not self.drop_last_activation:
                x = self.activation_fn(x)
        return x


class VAE(eqx.Module):
    """The class-conditioned VAE; field names are the tutorial's submodule names."""

    encoder: FeedForward
    pre_latent_proj: eqx.nn.Linear
    post_latent_proj: eqx.nn.Linear
    class_proj: eqx.nn.Linear
    decoder: FeedForward
    latent_dim: int = eqx.field(static=True)

    def __init__(
        self,
        latent_dim: int = 32,
        encoder_dimensions: tuple[int, ...] = (256, 128, 64),
        decoder_dimensions: tuple[int, ...] = (128, 256, 784),
        num_classes: int = 10,
        input_dim: int = 784,
        activation_fn: Callable[[Array], Array] = jax.nn.relu,
        *,
        key: PRNGKeyArray,
    ):
        k_enc, k_pre, k_post, k_class, k_dec = jax.random.split(key, 5)
        hidden = encoder_dimensions[-1]
        self.encoder = FeedForward(input_dim, encoder_dimensions, activation_fn, key=k_enc)
        self.pre_latent_proj = eqx.nn.Linear(hidden, latent_dim * 2, key=k_pre)
        self.post_latent_proj = eqx.nn.Linear(latent_dim, hidden, key=k_post)
        self.class_proj = eqx.nn.Linear(num_classes, hidden, key=k_class)
        self.decoder = FeedForward(hidden, decoder_dimensions, activation_fn, key=k_dec)
        self.latent_dim = latent_dim

    @jaxtyped(typechecker=beartype)
    def encode(self, x: Float[ArrayIn, " features"]) -> tuple[Float[Array, " latent"], Float[Array, " latent"]]:
        """One example's ``(mean, logvar)``; ``x`` is (features,): ``jax.vmap`` it for a batch."""
        _check_width("VAE.encode", "x", x, self.encoder.layers[0], "features", "encoder.layers[0].weight")
        mean, logvar = jnp.split(self.pre_latent_proj(self.encoder(x)), 2, axis=-1)
        return mean, logvar

    @jaxtyped(typechecker=beartype)
    def decode(self, z: Float[ArrayIn, " latent"], c: Float[ArrayIn, " classes"]) -> Float[Array, " features"]:
        """One example's image from ``z`` (latent,) and one-hot ``c`` (classes,)."""
        _check_width("VAE.decode", "z", z, self.post_latent_proj, "latent dimensions", "post_latent_proj.weight")
        _check_width("VAE.decode", "c", c, self.class_proj, "classes", "class_proj.weight")
        return self.decoder(self.post_latent_proj(z) + self.class_proj(c))

    @staticmethod
    @jaxtyped(typechecker=beartype)
    def reparam(
        mean: Float[ArrayIn, "*batch latent"], logvar: Float[ArrayIn, "*batch latent"], key: PRNGKeyArray
    ) -> Float[Array, "*batch latent"]:
        """Draw ``z = mean + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)`` from ``key``."""
        std = jnp.exp(logvar * 0.5)
        eps = jax.random.normal(key, mean.shape)
        return eps * std + mean

    @jaxtyped(typechecker=beartype)
    def __call__(
        self, x: Float[ArrayIn, " features"], c: Float[ArrayIn, " classes"], key: PRNGKeyArray
    ) -> tuple[Float[Array, " features"], Float[Array, " latent"], Float[Array, " latent"]]:
        _check_width("VAE", "x", x, self.encoder.layers[0], "features", "encoder.layers[0].weight")
        _check_width("VAE", "c", c, self.class_proj, "classes", "class_proj.weight")
        mean, logvar = self.encode(x)
        z = self.reparam(mean, logvar, key)
        return self.decode(z, c), mean, logvar


@jaxtyped(typechecker=beartype)
def batched_apply(
    model: VAE, x: Float[ArrayIn, "batch features"], c: Float[ArrayIn, "batch classes"], key: PRNGKeyArray
) -> tuple[Float[Array, "batch features"], Float[Array, "batch latent"], Float[Array, "batch latent"]]:
    """The model over a batch: ``encode`` and ``decode`` vmapped, noise drawn for the batch.

    Drawing ``eps`` of shape (batch, latent) from one key, rather than one key per
    example, is what the tutorial's Flax model does; it makes all forms agree.

    Raises:
        jaxtyping.TypeCheckError: ``x`` or ``c`` is not 2-D float, or their batch sizes differ.
        ValueError: ``x``'s width is not the model's input size, or ``c``'s not its class count.
    """
    _check_width("batched_apply", "x", x, model.encoder.layers[0], "features", "model.encoder.layers[0].weight")
    _check_width("batched_apply", "c", c, model.class_proj, "classes", "model.class_proj.weight")
    mean, logvar = jax.vmap(model.encode)(x)
    z = VAE.reparam(mean, logvar, key)
    return jax.vmap(model.decode)(z, c), mean, logvar


# ------------------------------------------------------------------ the convolutional VAE
# One example at a time, channels first (C, H, W), as Equinox layers take it. The convolutions
# pad 'SAME' as Flax's do (with stride 2 on 28 or 14 pixels that is (0, 1): more on the high
# side); the transposed ones use the padding of the convolution they invert, (0, 1), which
# gives Flax's ConvTranspose 'SAME' (lax padding (2, 1)). Flattening goes through (H, W, C) so
# the Dense rows are in Flax's order.
_INVERTS_SAME_STRIDE_2 = ((0, 1), (0, 1))


class ConvEncoder(eqx.Module):
    """The conv VAE's encoder, one image (channels first) at a time: conv, BatchNorm, conv."""
    conv_0: eqx.nn.Conv2d
    norm_0: BatchNorm
    conv_1: eqx.nn.Conv2d
    activation_fn: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(self, features: tuple[int, int], activation_fn, momentum: float, epsilon: float, *, key: PRNGKeyArray):
        k0, k1 = jax.random.split(key)
        self.conv_0 = eqx.nn.Conv2d(1, features[0], 3, stride=2, padding="SAME", use_bias=False, key=k0)  # BatchNorm follows
        self.norm_0 = BatchNorm(features[0], momentum=momentum, eps=epsilon)
        self.conv_1 = eqx.nn.Conv2d(features[0], features[1], 3, stride=2, padding="SAME", key=k1)
        self.activation_fn = activation_fn

    def __call__(self, x: Array, state: eqx.nn.State, *, train: bool) -> tuple[Array, eqx.nn.State]:
        h, state = self.norm_0(self.conv_0(x), state, inference=not train)
        return self.activation_fn(self.conv_1(self.activation_fn(h))), state


class ConvDecoder(eqx.Module):
    """The conv VAE's decoder, one image at a time: transposed conv, BatchNorm, transposed conv."""
    deconv_0: eqx.nn.ConvTranspose2d
    norm_0: BatchNorm
    deconv_1: eqx.nn.ConvTranspose2d
    activation_fn: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(self, features: tuple[int, int], activation_fn, momentum: float, epsilon: float, *, key: PRNGKeyArray):
        k0, k1 = jax.random.split(key)
        self.deconv_0 = eqx.nn.ConvTranspose2d(features[1], features[0], 3, stride=2, padding=_INVERTS_SAME_STRIDE_2, use_bias=False, key=k0)
        self.norm_0 = BatchNorm(features[0], momentum=momentum, eps=epsilon)
        self.deconv_1 = eqx.nn.ConvTranspose2d(features[0], 1, 3, stride=2, padding=_INVERTS_SAME_STRIDE_2, key=k1)
        self.activation_fn = activation_fn

    def __call__(self, x: Array, state: eqx.nn.State, *, train: bool) -> tuple[Array, eqx.nn.State]:
        h, state = self.norm_0(self.deconv_0(x), state, inference=not train)
        return self.activation_fn(self.deconv_1(self.activation_fn(h))), state


class ConvVAE(eqx.Module):
    """The convolutional VAE (``pureflax.convvae``) in Equinox; BatchNorm state in an ``eqx.nn.State``.

    Build it with ``eqx.nn.make_with_state(ConvVAE)(..., key=key)``; methods take one example
    and run under ``jax.vmap(..., axis_name="batch")`` (see :func:`batched_apply_stateful`).
    """

    flatten_order = "HWC"  # it flattens its feature maps as Linen does (read by pureflax.compat.migrate)

    encoder: ConvEncoder
    pre_latent_proj: eqx.nn.Linear
    post_latent_proj: eqx.nn.Linear
    class_proj: eqx.nn.Linear
    decoder: ConvDecoder
    activation_fn: Callable[[Array], Array] = eqx.field(static=True)
    image_size: int = eqx.field(static=True)
    bottleneck: tuple[int, int, int] = eqx.field(static=True)

    def __init__(self, latent_dim: int = 32, features: tuple[int, int] = (16, 32), num_classes: int = 10,
                 image_size: int = 28, activation_fn: Callable[[Array], Array] = jax.nn.relu,
                 momentum: float = 0.99, epsilon: float = 1e-5, *, key: PRNGKeyArray):
        k_enc, k_pre, k_post, k_class, k_dec = jax.random.split(key, 5)
        side = image_size // 4
        flat = side * side * features[1]
        self.encoder = ConvEncoder(features, activation_fn, momentum, epsilon, key=k_enc)
        self.pre_latent_proj = eqx.nn.Linear(flat, latent_dim * 2, key=k_pre)
        self.post_latent_proj = eqx.nn.Linear(latent_dim, flat, key=k_post)
        self.class_proj = eqx.nn.Linear(num_classes, flat, key=k_class)
        self.decoder = ConvDecoder(features, activation_fn, momentum, epsilon, key=k_dec)
        self.activation_fn, self.image_size, self.bottleneck = activation_fn, image_size, (side, side, features[1])

    def encode(self, x: Array, state: eqx.nn.State, *, train: bool) -> tuple[tuple[Array, Array], eqx.nn.State]:
        """One example's ``(mean, logvar)``; ``x`` is (image_size²,)."""
        h, state = self.encoder(jnp.reshape(x, (1, self.image_size, self.image_size)), state, train=train)
        mean, logvar = jnp.split(self.pre_latent_proj(jnp.transpose(h, (1, 2, 0)).reshape(-1)), 2)  # (H, W, C) order
        return (mean, logvar), state

    def decode(self, z: Array, c: Array, state: eqx.nn.State, *, train: bool) -> tuple[Array, eqx.nn.State]:
        """One example's image (image_size²,) from ``z`` and one-hot ``c``."""
        h = self.activation_fn(self.post_latent_proj(z) + self.class_proj(c))
        h, state = self.decoder(jnp.transpose(h.reshape(self.bottleneck), (2, 0, 1)), state, train=train)
        return jnp.transpose(h, (1, 2, 0)).reshape(-1), state


def batched_apply_stateful(model: ConvVAE, state: eqx.nn.State, x: Array, c: Array, key: PRNGKeyArray, *,
                           train: bool) -> tuple[tuple[Array, Array, Array], eqx.nn.State]:
    """The conv VAE over a batch: ``((recon, mean, logvar), state)``, noise drawn for the whole batch from ``key``."""
    (mean, logvar), state = vmap_stateful(partial(model.encode, train=train))(x, state)
    z = jax.random.normal(key, mean.shape) * jnp.exp(logvar * 0.5) + mean
    recon, state = jax.vmap(partial(model.decode, train=train), axis_name="batch", in_axes=(0, 0, None),
                            out_axes=(0, None))(z, c, state)
    return (recon, mean, logvar), state
