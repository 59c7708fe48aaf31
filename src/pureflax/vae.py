"""The tutorial's class-conditioned MLP VAE as pure functions.

``init(key, config)`` returns a params tree with exactly the paths and shapes of the
tutorial's ``VAE(latent_dim=32).init(...)['params']`` — and, for the same key, the same
values (those of ``jax.jit(model.init)``; on a CPU the eager ``model.init`` gives them too). ``apply(params, x, c, key)`` returns ``(recon, mean, logvar)`` as the tutorial's
``model.apply`` does.

Examples:
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
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from beartype import beartype
from jaxtyping import Array, Float, Int, PRNGKeyArray, jaxtyped

from pureflax import nn

Params = dict[str, Any]
ParamsIn = Mapping[str, Any]  # what the functions accept: a dict, or a Flax FrozenDict
ArrayIn = Array | np.ndarray  # inputs may be jax or NumPy arrays; outputs are jax arrays


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


@functools.partial(jax.jit, static_argnames="config")
def init(key: PRNGKeyArray, config: VAEConfig = VAEConfig()) -> Params:
    """Initialise the VAE's params as Flax's ``jax.jit(VAE.init)`` does, key for key.

    One compiled program however it is called, so every form's init gives the same bits on every
    platform: on a GPU an eager initialiser and a jitted one differ in the last bits (Linen's
    ``model.init`` and ``jax.jit(model.init)`` do too; ours equals the jitted one).

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


def config_of(params: ParamsIn) -> VAEConfig:
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


def _input_sizes(params: ParamsIn) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """What each input's last dimension must be, read from the params: name -> (what, path, kernel shape)."""
    sizes = {}
    for arg, what, path in (
        ("x", "features", ("encoder", "Dense_0", "kernel")),
        ("c", "classes", ("class_proj", "kernel")),
        ("z", "latent dimensions", ("post_latent_proj", "kernel")),
    ):
        try:
            node = params
            for part in path:
                node = node[part]
            shape = tuple(node.shape)
        except (KeyError, TypeError, AttributeError):
            continue  # not a VAE params tree: the layers report what they find
        sizes[arg] = (what, "params" + "".join(f"[{part!r}]" for part in path), shape)
    return sizes


def _check_sizes(where: str, params: ParamsIn, **arrays: Any) -> None:
    """Raise ``ValueError`` if an input's last dimension is not the one ``params`` takes.

    Runs in Python, so under ``jax.jit`` it runs once per trace, never per step; the
    ranks and the batch sizes shared between arguments are checked by the jaxtyping
    annotations (``@jaxtyped``) before the body runs.
    """
    sizes = _input_sizes(params)
    for arg, value in arrays.items():
        if arg not in sizes:
            continue
        what, path, kernel = sizes[arg]
        shape = tuple(jnp.shape(value))
        if not shape or shape[-1] != kernel[0]:
            raise ValueError(
                f"{where}: {arg} has shape {shape} but the model takes {kernel[0]} {what} "
                f"({path} is {kernel})"
            )


def _encode(layers: dict[str, nn.Layer], params: ParamsIn, x: ArrayIn) -> tuple[Array, Array]:
    h = layers["encoder"].apply(params["encoder"], x)
    mean, logvar = jnp.split(layers["pre_latent_proj"].apply(params["pre_latent_proj"], h), 2, axis=-1)
    return mean, logvar


def _decode(layers: dict[str, nn.Layer], params: ParamsIn, z: ArrayIn, c: ArrayIn) -> Array:
    h = layers["post_latent_proj"].apply(params["post_latent_proj"], z)
    h = h + layers["class_proj"].apply(params["class_proj"], c)
    return layers["decoder"].apply(params["decoder"], h)


def _reparam(mean: ArrayIn, logvar: ArrayIn, key: PRNGKeyArray) -> Array:
    std = jnp.exp(logvar * 0.5)
    eps = jax.random.normal(key, jnp.shape(mean))
    return eps * std + mean


# Shapes are checked when called (at trace time under jit: free per step): the rank and
# the sizes named alike across arguments by jaxtyping, raising jaxtyping.TypeCheckError
# (a TypeError) that names the argument; the sizes the params fix by _check_sizes,
# raising ValueError. Inputs may be jax or NumPy arrays.


@jaxtyped(typechecker=beartype)
def encode(
    params: ParamsIn, x: Float[ArrayIn, "batch features"], config: VAEConfig | None = None
) -> tuple[Float[Array, "batch latent"], Float[Array, "batch latent"]]:
    """Map images to the latent Gaussian's ``(mean, logvar)``.

    Raises:
        jaxtyping.TypeCheckError: ``x`` is not a 2-D float array.
        ValueError: ``x``'s width is not the params' input size.
    """
    _check_sizes("vae.encode", params, x=x)
    return _encode(_layers(config or config_of(params)), params, x)


@jaxtyped(typechecker=beartype)
def decode(
    params: ParamsIn,
    z: Float[ArrayIn, "batch latent"],
    c: Float[ArrayIn, "batch classes"],
    config: VAEConfig | None = None,
) -> Float[Array, "batch features"]:
    """Map latents ``z`` and one-hot classes ``c`` to images.

    Raises:
        jaxtyping.TypeCheckError: ``z`` or ``c`` is not 2-D float, or their batch sizes differ.
        ValueError: ``z``'s or ``c``'s width is not the params' latent size / class count.
    """
    _check_sizes("vae.decode", params, z=z, c=c)
    return _decode(_layers(config or config_of(params)), params, z, c)


@jaxtyped(typechecker=beartype)
def reparam(
    mean: Float[ArrayIn, "*batch latent"], logvar: Float[ArrayIn, "*batch latent"], key: PRNGKeyArray
) -> Float[Array, "*batch latent"]:
    """Draw ``z = mean + exp(logvar / 2) * eps`` with ``eps ~ N(0, 1)`` from ``key``."""
    return _reparam(mean, logvar, key)


@jaxtyped(typechecker=beartype)
def apply(
    params: ParamsIn,
    x: Float[ArrayIn, "batch features"],
    c: Float[ArrayIn, "batch classes"],
    key: PRNGKeyArray,
    config: VAEConfig | None = None,
) -> tuple[Float[Array, "batch features"], Float[Array, "batch latent"], Float[Array, "batch latent"]]:
    """The full forward pass: encode, reparameterise with ``key``, decode.

    Args:
        params: from :func:`init`.
        x: images flattened to ``input_dim``, float in [0, 1], shape (batch, features).
        c: one-hot class vectors (``jax.nn.one_hot(labels, num_classes)``), (batch, classes).
        key: the reparameterisation key.
        config: sizes; read from ``params`` when omitted (activation relu).

    Returns:
        ``(recon, mean, logvar)``.

    Raises:
        jaxtyping.TypeCheckError: ``x`` or ``c`` is not 2-D float, or their batch sizes differ.
        ValueError: ``x``'s width is not the params' input size, or ``c``'s not their class count.
    """
    _check_sizes("vae.apply", params, x=x, c=c)
    layers = _layers(config or config_of(params))
    mean, logvar = _encode(layers, params, x)
    z = _reparam(mean, logvar, key)
    return _decode(layers, params, z, c), mean, logvar


@jaxtyped(typechecker=beartype)
def sample(
    params: ParamsIn,
    labels: Int[ArrayIn, " batch"],
    key: PRNGKeyArray,
    config: VAEConfig | None = None,
) -> Float[Array, "batch features"]:
    """Generate one image per class label by decoding ``z ~ N(0, I)``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> params = init(jax.random.key(0))
        >>> sample(params, jnp.arange(10), jax.random.key(1)).shape
        (10, 784)
    """
    config = config or config_of(params)
    z = jax.random.normal(key, (labels.shape[0], config.latent_dim))
    return _decode(_layers(config), params, z, jax.nn.one_hot(labels, config.num_classes))
