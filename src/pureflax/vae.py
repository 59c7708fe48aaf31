"""The tutorial's class-conditioned MLP VAE as pure functions.

``init(key, config)`` returns a params tree with exactly the paths and shapes of the
tutorial's ``VAE(latent_dim=32).init(...)['params']`` — and, for the same key, the same
values. ``apply(params, x, c, key)`` returns ``(recon, mean, logvar)`` as the tutorial's
``model.apply`` does.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from pureflax import vae
    >>> config = vae.VAEConfig(latent_dim=4)
    >>> params = vae.init(jax.random.key(0), config)
    >>> x, c = jnp.zeros((2, 784)), jax.nn.one_hot(jnp.array([3, 7]), 10)
    >>> recon, mean, logvar = vae.apply(params, x, c, jax.random.key(1))
    >>> recon.shape, mean.shape
    ((2, 784), (2, 4))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from pureflax import nn

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Sizes of the VAE; the defaults are the tutorial's (with its latent_dim of 32)."""

    encoder_dimensions: tuple[int, ...] = (256, 128, 64)
    decoder_dimensions: tuple[int, ...] = (128, 256, 784)
    latent_dim: int = 32
    num_classes: int = 10
    input_dim: int = 784
    activation: str = "relu"

    def __post_init__(self):
        for name in ("encoder_dimensions", "decoder_dimensions"):
            dims = tuple(getattr(self, name))
            if not dims or any(not isinstance(d, int) or d < 1 for d in dims):
                raise ValueError(f"VAEConfig.{name} must be positive ints, got {dims!r}")
            object.__setattr__(self, name, dims)
        for name in ("latent_dim", "num_classes", "input_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VAEConfig.{name} must be a positive int, got {value!r}")
        if self.decoder_dimensions[-1] != self.input_dim:
            raise ValueError(
                f"VAEConfig: decoder_dimensions must end in input_dim={self.input_dim}, "
                f"got {self.decoder_dimensions!r}"
            )
        nn.activation(self.activation)  # fail now on an unknown name


def _layers(config: VAEConfig) -> dict[str, nn.Layer]:
    hidden = config.encoder_dimensions[-1]
    return {
        "encoder": nn.feed_forward(config.encoder_dimensions, config.activation),
        "pre_latent_proj": nn.dense(config.latent_dim * 2),
        "post_latent_proj": nn.dense(hidden),
        "class_proj": nn.dense(hidden),
        "decoder": nn.feed_forward(config.decoder_dimensions, config.activation, drop_last_activation=False),
    }


def init(key: PRNGKeyArray, config: VAEConfig = VAEConfig()) -> Params:
    """Initialise the VAE's params as Flax's ``VAE.init`` does, key for key.

    Args:
        key: the root key (the tutorial's ``model_key``).
        config: sizes.

    Returns:
        ``{'encoder': {'Dense_0': ...}, 'pre_latent_proj': ..., 'post_latent_proj': ...,
        'class_proj': ..., 'decoder': {...}}`` of float32 arrays.
    """
    layers = _layers(config)
    inputs = {
        "encoder": config.input_dim,
        "pre_latent_proj": config.encoder_dimensions[-1],
        "post_latent_proj": config.latent_dim,
        "class_proj": config.num_classes,
        "decoder": config.encoder_dimensions[-1],
    }
    return {
        name: layer.init(nn.child(key, name), jax.ShapeDtypeStruct((1, inputs[name]), jnp.float32))
        for name, layer in layers.items()
    }


def config_of(params: Params) -> VAEConfig:
    """Read the sizes back from a params tree (activation assumed relu)."""
    enc = params["encoder"]
    dec = params["decoder"]
    return VAEConfig(
        encoder_dimensions=tuple(enc[f"Dense_{i}"]["kernel"].shape[1] for i in range(len(enc))),
        decoder_dimensions=tuple(dec[f"Dense_{i}"]["kernel"].shape[1] for i in range(len(dec))),
        latent_dim=params["pre_latent_proj"]["kernel"].shape[1] // 2,
        num_classes=params["class_proj"]["kernel"].shape[0],
        input_dim=enc["Dense_0"]["kernel"].shape[0],
    )


def encode(
    params: Params, x: Float[Array, "*batch features"], config: VAEConfig | None = None
) -> tuple[Float[Array, "*batch latent"], Float[Array, "*batch latent"]]:
    """Map images to the latent Gaussian's ``(mean, logvar)``."""
    layers = _layers(config or config_of(params))
    h = layers["encoder"].apply(params["encoder"], x)
    mean, logvar = jnp.split(layers["pre_latent_proj"].apply(params["pre_latent_proj"], h), 2, axis=-1)
    return mean, logvar


def decode(
    params: Params,
    z: Float[Array, "*batch latent"],
    c: Float[Array, "*batch classes"],
    config: VAEConfig | None = None,
) -> Float[Array, "*batch features"]:
    """Map latents ``z`` and one-hot classes ``c`` to images."""
    layers = _layers(config or config_of(params))
    h = layers["post_latent_proj"].apply(params["post_latent_proj"], z)
    h = h + layers["class_proj"].apply(params["class_proj"], c)
    return layers["decoder"].apply(params["decoder"], h)


def reparam(
    mean: Float[Array, "*batch latent"], logvar: Float[Array, "*batch latent"], key: PRNGKeyArray
) -> Float[Array, "*batch latent"]:
    """Draw ``z = mean + exp(logvar / 2) * eps`` with ``eps ~ N(0, 1)`` from ``key``."""
    std = jnp.exp(logvar * 0.5)
    eps = jax.random.normal(key, mean.shape)
    return eps * std + mean


def apply(
    params: Params,
    x: Float[Array, "*batch features"],
    c: Float[Array, "*batch classes"],
    key: PRNGKeyArray,
    config: VAEConfig | None = None,
) -> tuple[Float[Array, "*batch features"], Float[Array, "*batch latent"], Float[Array, "*batch latent"]]:
    """The full forward pass: encode, reparameterise with ``key``, decode.

    Args:
        params: from :func:`init`.
        x: images flattened to ``input_dim``, float in [0, 1].
        c: one-hot class vectors (``jax.nn.one_hot(labels, num_classes)``).
        key: the reparameterisation key.
        config: sizes; read from ``params`` when omitted (activation relu).

    Returns:
        ``(recon, mean, logvar)``.
    """
    mean, logvar = encode(params, x, config)
    z = reparam(mean, logvar, key)
    return decode(params, z, c, config), mean, logvar


def sample(
    params: Params,
    labels: Int[Array, " n"],
    key: PRNGKeyArray,
    config: VAEConfig | None = None,
) -> Float[Array, "n features"]:
    """Generate one image per class label by decoding ``z ~ N(0, I)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = init(jax.random.key(0))
        >>> sample(params, jnp.arange(10), jax.random.key(1)).shape
        (10, 784)
    """
    config = config or config_of(params)
    z = jax.random.normal(key, (labels.shape[0], config.latent_dim))
    return decode(params, z, jax.nn.one_hot(labels, config.num_classes), config)
