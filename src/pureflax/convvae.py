"""A class-conditioned convolutional VAE as pure functions, with BatchNorm state.

The encoder is two stride-2 3×3 convolutions on the 28×28×1 image (28 → 14 → 7), the
first followed by BatchNorm (and so without a bias of its own: BatchNorm subtracts the mean,
so such a bias gets a zero gradient, in rounding only), then a Dense to ``(mean, logvar)``; the decoder is
conditioned as the tutorial's MLP VAE is — ``post_latent_proj(z) + class_proj(c)`` — then
two stride-2 transposed convolutions back to 28×28 (the first followed by BatchNorm).
Images travel flattened, (batch, 784), as for the MLP, so the loss, data and step are
the same; inside the model they are NHWC and flatten in (H, W, C) order, as Flax's.

``init(key, config)`` gives the params of ``jax.jit(flax_models.ConvVAE(...).init)(...)['params']``
bit for bit (Flax's names and init keys); ``init_state(config)`` the ``batch_stats``
(running mean 0, variance 1). ``apply(params, model_state, x, c, key, config, train=...)``
returns ``((recon, mean, logvar), model_state)``: with ``train=True`` BatchNorm uses the
batch's statistics and the running ones come back updated; with ``train=False`` the
running ones are used and returned unchanged.

Examples:
    >>> import jax, jax.numpy as jnp
    >>> config = ConvVAEConfig(latent_dim=4)
    >>> params, state = init(jax.random.key(0), config), init_state(config)
    >>> x, c = jnp.zeros((2, 784)), jax.nn.one_hot(jnp.array([3, 7]), 10)
    >>> (recon, mean, logvar), state = apply(params, state, x, c, jax.random.key(1), config, train=True)
    >>> recon.shape, mean.shape, params['encoder']['conv_0']['kernel'].shape
    ((2, 784), (2, 4), (3, 3, 1, 16))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from pureflax import nn

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ConvVAEConfig:
    """Sizes of the convolutional VAE: channels of the two stride-2 stages, latent size, classes."""

    features: tuple[int, int] = (16, 32)  # channels after the first and the second stride-2 conv
    latent_dim: int = 32
    num_classes: int = 10
    image_size: int = 28  # square, one channel; divisible by 4
    activation: str = "relu"
    momentum: float = 0.99  # BatchNorm's, Flax's default
    epsilon: float = 1e-5  # BatchNorm's, Flax's default

    def __post_init__(self):
        features = tuple(self.features)
        if len(features) != 2 or any(not isinstance(f, int) or f < 1 for f in features):
            raise ValueError(f"ConvVAEConfig.features must be two positive ints, got {features!r}")
        object.__setattr__(self, "features", features)
        for name in ("latent_dim", "num_classes", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ConvVAEConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % 4:
            raise ValueError(f"ConvVAEConfig.image_size must be divisible by 4 (two stride-2 stages), got {self.image_size}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"ConvVAEConfig.momentum must be in [0, 1], got {self.momentum!r}")
        nn.activation(self.activation)

    @property
    def input_dim(self) -> int:
        return self.image_size * self.image_size

    @property
    def bottleneck(self) -> tuple[int, int, int]:
        """(H, W, C) of the encoder's output, which the Dense layers see flattened."""
        side = self.image_size // 4
        return side, side, self.features[1]


def _layers(config: ConvVAEConfig) -> dict[str, Any]:
    norm = nn.batch_norm(momentum=config.momentum, epsilon=config.epsilon)
    flat = math.prod(config.bottleneck)
    return {
        "encoder": {"conv_0": nn.conv(config.features[0], (3, 3), strides=2, use_bias=False), "norm_0": norm,
                    "conv_1": nn.conv(config.features[1], (3, 3), strides=2)},
        "pre_latent_proj": nn.dense(config.latent_dim * 2),
        "post_latent_proj": nn.dense(flat),
        "class_proj": nn.dense(flat),
        "decoder": {"deconv_0": nn.conv_transpose(config.features[0], (3, 3), strides=2, use_bias=False), "norm_0": norm,
                    "deconv_1": nn.conv_transpose(1, (3, 3), strides=2)},
    }


def _example_inputs(config: ConvVAEConfig) -> dict[str, Any]:
    """The shape each layer sees (batch 1), for init."""
    s, (f0, f1), (h, w, c) = config.image_size, config.features, config.bottleneck
    shape = lambda *dims: jax.ShapeDtypeStruct((1, *dims), jnp.float32)  # noqa: E731
    return {
        "encoder": {"conv_0": shape(s, s, 1), "norm_0": shape(s // 2, s // 2, f0), "conv_1": shape(s // 2, s // 2, f0)},
        "pre_latent_proj": shape(h * w * c),
        "post_latent_proj": shape(config.latent_dim),
        "class_proj": shape(config.num_classes),
        "decoder": {"deconv_0": shape(h, w, c), "norm_0": shape(s // 2, s // 2, f0), "deconv_1": shape(s // 2, s // 2, f0)},
    }


@functools.partial(jax.jit, static_argnames="config")
def init(key: PRNGKeyArray, config: ConvVAEConfig = ConvVAEConfig()) -> Params:
    """The params, as Flax's ``jax.jit(ConvVAE.init)`` makes them for ``key``: one compiled program
    however it is called (on a GPU an eager initialiser differs from a jitted one in the last bits)."""
    layers, inputs = _layers(config), _example_inputs(config)

    def build(layer: Any, x: Any, scope: nn.Scope) -> Any:
        if isinstance(layer, dict):
            return {name: build(layer[name], x[name], nn.child(scope, name)) for name in layer}
        return layer.init(scope, x)

    return build(layers, inputs, nn.as_scope(key))


def init_state(config: ConvVAEConfig = ConvVAEConfig()) -> Params:
    """The ``batch_stats``: each BatchNorm's running ``mean`` (zeros) and ``var`` (ones)."""
    layers, inputs = _layers(config), _example_inputs(config)
    return {part: {"norm_0": layers[part]["norm_0"].init_state(inputs[part]["norm_0"])} for part in ("encoder", "decoder")}


def encode(params: Params, state: Params, x: Array, config: ConvVAEConfig, *, train: bool) -> tuple[tuple[Array, Array], Params]:
    """Images (batch, 784) to ``(mean, logvar)``, and the encoder's new BatchNorm state."""
    all_layers, act = _layers(config), nn.activation(config.activation)
    layers, p = all_layers["encoder"], params["encoder"]
    h = jnp.reshape(x, (x.shape[0], config.image_size, config.image_size, 1))
    h = layers["conv_0"].apply(p["conv_0"], h)
    h, norm = layers["norm_0"].apply(p["norm_0"], state["encoder"]["norm_0"], h, train=train)
    h = act(layers["conv_1"].apply(p["conv_1"], act(h)))
    h = jnp.reshape(h, (h.shape[0], -1))  # (H, W, C) order
    mean, logvar = jnp.split(all_layers["pre_latent_proj"].apply(params["pre_latent_proj"], h), 2, axis=-1)
    return (mean, logvar), {"norm_0": norm}


def decode(params: Params, state: Params, z: Array, c: Array, config: ConvVAEConfig, *, train: bool) -> tuple[Array, Params]:
    """Latents and one-hot classes to images (batch, 784), and the decoder's new BatchNorm state."""
    all_layers, act = _layers(config), nn.activation(config.activation)
    layers, p = all_layers["decoder"], params["decoder"]
    h = all_layers["post_latent_proj"].apply(params["post_latent_proj"], z)
    h = act(h + all_layers["class_proj"].apply(params["class_proj"], c))
    h = jnp.reshape(h, (h.shape[0], *config.bottleneck))
    h = layers["deconv_0"].apply(p["deconv_0"], h)
    h, norm = layers["norm_0"].apply(p["norm_0"], state["decoder"]["norm_0"], h, train=train)
    h = act(layers["deconv_1"].apply(p["deconv_1"], act(h)))
    return jnp.reshape(h, (h.shape[0], -1)), {"norm_0": norm}


def reparam(mean: Array, logvar: Array, key: PRNGKeyArray) -> Array:
    """``z = mean + exp(logvar / 2) · eps``, ``eps ~ N(0, 1)`` from ``key`` (the MLP VAE's rule)."""
    return jax.random.normal(key, jnp.shape(mean)) * jnp.exp(logvar * 0.5) + mean


def apply(params: Params, state: Params, x: Array, c: Array, key: PRNGKeyArray, config: ConvVAEConfig,
          *, train: bool) -> tuple[tuple[Array, Array, Array], Params]:
    """Encode, reparameterise with ``key``, decode: ``((recon, mean, logvar), new_state)``."""
    (mean, logvar), enc = encode(params, state, x, config, train=train)
    recon, dec = decode(params, state, reparam(mean, logvar, key), c, config, train=train)
    return (recon, mean, logvar), {"encoder": enc, "decoder": dec}


def sample(params: Params, state: Params, labels: Array, key: PRNGKeyArray, config: ConvVAEConfig) -> Array:
    """One image per label from ``z ~ N(0, I)``, BatchNorm in inference mode."""
    z = jax.random.normal(key, (labels.shape[0], config.latent_dim))
    return decode(params, state, z, jax.nn.one_hot(labels, config.num_classes), config, train=False)[0]


def reconstruct(params: Params, state: Params, x: Array, c: Array, config: ConvVAEConfig) -> Array:
    """The decoded latent mean (no sampling noise), BatchNorm in inference mode."""
    (mean, _), _ = encode(params, state, x, config, train=False)
    return decode(params, state, mean, c, config, train=False)[0]
