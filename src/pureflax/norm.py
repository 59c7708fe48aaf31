"""Normalisation layers (LayerNorm, GroupNorm, BatchNorm with its running statistics) and
embeddings, each as its flax.linen namesake: the same parameter names, init keys and operations
in the same order (tests/test_layers.py measures each). :mod:`pureflax.nn` exports them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from pureflax.layer import Example, Layer, Params, Scope, StatefulLayer, _shape, ones, param_key, zeros


def _stats(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """Mean and variance over ``axes`` as Flax computes them: E[x²] − E[x]², clipped at 0."""
    x = jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))
    mean, mean2 = x.mean(axes), jax.lax.square(x).mean(axes)
    return mean, jnp.maximum(0.0, mean2 - jax.lax.square(mean))


def _normalize(params: Params, x: Array, mean: Array, var: Array, reduction_axes: tuple[int, ...],
               epsilon: float, use_scale: bool, use_bias: bool) -> Array:
    """``(x − mean) · rsqrt(var + ε) · scale + bias`` in Flax's order of operations (features last)."""
    feature_shape = (1,) * (x.ndim - 1) + (x.shape[-1],)
    y = x - jnp.expand_dims(mean, reduction_axes)
    mul = jax.lax.rsqrt(jnp.expand_dims(var, reduction_axes) + epsilon)
    if use_scale:
        mul = mul * params["scale"].reshape(feature_shape)
    y = y * mul
    if use_bias:
        y = y + params["bias"].reshape(feature_shape)
    # the statistics are float32 at least; the output takes the input's and the params' dtype, as Flax's
    return jnp.asarray(y, jnp.result_type(x, *(params[k] for k in ("scale", "bias") if k in params)))


def _norm_params(key: PRNGKeyArray | Scope, features: int, use_scale: bool, use_bias: bool) -> Params:
    params = {}
    if use_scale:
        params["scale"] = ones(param_key(key, 1), (features,))
    if use_bias:
        params["bias"] = zeros(param_key(key, 1 + use_scale), (features,))
    return params


def layer_norm(*, epsilon: float = 1e-6, use_scale: bool = True, use_bias: bool = True) -> Layer:
    """Normalise each example over its last axis (Flax's ``nn.LayerNorm``: ε = 1e-6; Equinox's is 1e-5).

    Args:
        epsilon: added to the variance before the square root.
        use_scale: whether to learn a per-feature ``scale``.
        use_bias: whether to learn a per-feature ``bias``.

    Returns:
        A :class:`Layer` whose params are ``{'scale': (features,), 'bias': (features,)}``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = layer_norm()
        >>> p = layer.init(jax.random.key(0), jnp.zeros((2, 4)))
        >>> [round(float(v), 3) for v in layer.apply(p, jnp.array([[1., 2., 3., 4.]]))[0]]
        [-1.342, -0.447, 0.447, 1.342]
    """

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        return _norm_params(key, _shape(x)[-1], use_scale, use_bias)

    def apply(params: Params, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        mean, var = _stats(x, (x.ndim - 1,))
        return _normalize(params, x, mean, var, (x.ndim - 1,), epsilon, use_scale, use_bias)

    return Layer(init, apply)


def group_norm(num_groups: int = 32, *, epsilon: float = 1e-6, use_scale: bool = True, use_bias: bool = True) -> Layer:
    """Normalise each example over its spatial axes and groups of features (Flax's ``nn.GroupNorm``).

    Args:
        num_groups: how many groups the features split into; it must divide the feature count.
        epsilon: added to the variance before the square root.
        use_scale: whether to learn a per-feature ``scale``.
        use_bias: whether to learn a per-feature ``bias``.

    Returns:
        A :class:`Layer` whose params are ``{'scale': (features,), 'bias': (features,)}``.

    Raises:
        ValueError: if ``num_groups`` is not a positive int, or (at ``init`` and ``apply``)
            does not divide the input's features.
    """
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"group_norm: num_groups must be a positive int, got {num_groups!r}")

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        features = _shape(x)[-1]
        if features % num_groups:
            raise ValueError(f"group_norm: {num_groups} groups do not divide {features} features")
        return _norm_params(key, features, use_scale, use_bias)

    def apply(params: Params, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        if x.shape[-1] % num_groups:
            raise ValueError(f"group_norm: {num_groups} groups do not divide {x.shape[-1]} features")
        size = x.shape[-1] // num_groups
        grouped = x.reshape(x.shape[:-1] + (num_groups, size))
        mean, var = _stats(grouped, tuple(range(1, x.ndim - 1)) + (grouped.ndim - 1,))
        mean, var = jnp.repeat(mean, size, axis=-1), jnp.repeat(var, size, axis=-1)
        return _normalize(params, x, mean, var, tuple(range(1, x.ndim - 1)), epsilon, use_scale, use_bias)

    return Layer(init, apply)


def batch_norm(*, momentum: float = 0.99, epsilon: float = 1e-5, use_scale: bool = True, use_bias: bool = True) -> StatefulLayer:
    """Batch normalisation over every axis but the last (Flax's ``nn.BatchNorm``).

    Params ``scale``/``bias``; state ``mean`` (zeros) and ``var`` (ones) — Flax's
    ``batch_stats``. ``train=True`` normalises with the batch's statistics and returns the
    running ones updated as ``momentum · running + (1 − momentum) · batch``; ``train=False``
    uses the running statistics and returns the state unchanged.

    Args:
        momentum: the running statistics' weight on their old value, in [0, 1].
        epsilon: added to the variance before the square root.
        use_scale: whether to learn a per-feature ``scale``.
        use_bias: whether to learn a per-feature ``bias``.

    Returns:
        A :class:`StatefulLayer` with params ``{'scale', 'bias'}`` and state ``{'mean', 'var'}``,
        each (features,).

    Raises:
        ValueError: if ``momentum`` is not in [0, 1].

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = batch_norm()
        >>> x = jnp.array([[0.0], [2.0]])
        >>> p, s = layer.init(jax.random.key(0), x), layer.init_state(x)
        >>> y, s = layer.apply(p, s, x, train=True)
        >>> [round(float(v), 3) for v in y[:, 0]], round(float(s['mean'][0]), 3), round(float(s['var'][0]), 3)
        ([-1.0, 1.0], 0.01, 1.0)
    """
    if not 0 <= momentum <= 1:
        raise ValueError(f"batch_norm: momentum must be in [0, 1], got {momentum!r}")

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        return _norm_params(key, _shape(x)[-1], use_scale, use_bias)

    def init_state(x: Example) -> Params:
        features = _shape(x)[-1]
        return {"mean": jnp.zeros((features,), jnp.float32), "var": jnp.ones((features,), jnp.float32)}

    def apply(params: Params, state: Params, x: ArrayLike, *, train: bool) -> tuple[Array, Params]:
        x = jnp.asarray(x)
        axes = tuple(range(x.ndim - 1))
        if train:
            mean, var = _stats(x, axes)
            state = {"mean": momentum * state["mean"] + (1 - momentum) * mean,
                     "var": momentum * state["var"] + (1 - momentum) * var}
        else:
            mean, var = state["mean"], state["var"]
        return _normalize(params, x, mean, var, axes, epsilon, use_scale, use_bias), state

    return StatefulLayer(init, init_state, apply)


def embed(num_embeddings: int, features: int, *, embedding_init: Callable[..., Array] | None = None) -> Layer:
    """A lookup table (Flax's ``nn.Embed``): params ``embedding`` (num_embeddings, features).

    Args:
        num_embeddings: how many rows the table has (the number of distinct indices).
        features: the size of each row.
        embedding_init: ``init(key, shape, dtype)`` for the table; ``None`` is Flax's default,
            variance scaling 1 over fan-in, normal.

    Returns:
        A :class:`Layer` whose ``apply(params, indices)`` appends a ``features`` axis; it raises
        ``ValueError`` for indices that are not integers.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = embed(10, 4)
        >>> p = layer.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
        >>> layer.apply(p, jnp.array([[1, 2, 3]])).shape
        (1, 3, 4)
    """
    init_fn = embedding_init or jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        del x
        return {"embedding": init_fn(param_key(key, 1), (num_embeddings, features), jnp.float32)}

    def apply(params: Params, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"embed: indices must be integers, got {x.dtype}")
        return jnp.take(params["embedding"], x, axis=0)

    return Layer(init, apply)
