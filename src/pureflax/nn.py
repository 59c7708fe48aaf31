"""Layers as pairs of pure functions, with Flax's parameter names, layouts and keys.

Every layer is a :class:`Layer`: ``init(key, x) -> params`` and
``apply(params, x, ...) -> y``. ``x`` given to ``init`` is an example input (only
its shape is read), exactly like ``flax.linen.Module.init``.

Keys follow Flax: a parameter's key is the root key with the layer's path and a
per-layer counter folded in (Flax's ``LazyRng``). So ``dense(4).init(key, x)`` returns
bit-for-bit what ``flax.linen.Dense(4).init(key, x)['params']`` returns, and the same
holds for nested layers whose paths match the Flax module tree.

Examples:
    >>> import jax, jax.numpy as jnp
    >>> from pureflax import nn
    >>> layer = nn.feed_forward((4, 2, 1), drop_last_activation=True)
    >>> params = layer.init(jax.random.key(0), jnp.zeros((1, 8)))
    >>> layer.apply(params, jnp.ones((1, 8))).shape
    (1, 1)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from pureflax.conv import avg_pool, conv, conv_transpose, max_pool
from pureflax.layer import (
    ACTIVATIONS, Example, Layer, Params, PathPart, Scope, StatefulLayer, _add_bias, _check_last_dim, _shape, activation, as_scope, child,
    fold_in_path, lecun_normal, ones, param_key, zeros,
)
from pureflax.norm import batch_norm, embed, group_norm, layer_norm

__all__ = [
    "ACTIVATIONS", "Bound", "Example", "Layer", "Params", "PathPart", "Scope", "StatefulLayer", "activation", "as_scope",
    "avg_pool", "batch_norm", "bind", "child", "conv", "conv_transpose", "dense", "dropout", "embed", "feed_forward",
    "fold_in_path", "group_norm", "layer_norm", "lecun_normal", "max_pool", "ones", "param_key", "sequential", "unbind", "zeros",
]


def dense(
    features: int,
    *,
    use_bias: bool = True,
    kernel_init: Callable[..., Array] = lecun_normal,
    bias_init: Callable[..., Array] = zeros,
) -> Layer:
    """A fully connected layer, ``y = x @ kernel + bias`` (Flax's ``nn.Dense``).

    Args:
        features: output size.
        use_bias: whether to add a bias.
        kernel_init: ``init(key, shape, dtype)`` for the (in, out) kernel.
        bias_init: ``init(key, shape, dtype)`` for the (out,) bias.

    Returns:
        A :class:`Layer` whose params are ``{'kernel': (in, out), 'bias': (out,)}``.

    Raises:
        ValueError: if ``features`` is not a positive int.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = dense(2)
        >>> p = layer.init(jax.random.key(0), jnp.zeros(8))
        >>> p['kernel'].shape, layer.apply(p, jnp.ones(8)).shape
        ((8, 2), (2,))
    """
    if not isinstance(features, int) or features < 1:
        raise ValueError(f"dense: features must be a positive int, got {features!r}")

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        in_features = _shape(x)[-1]
        params = {"kernel": kernel_init(param_key(key, 1), (in_features, features))}
        if use_bias:
            params["bias"] = bias_init(param_key(key, 2), (features,))
        return params

    def apply(params: Params, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        kernel = params["kernel"]
        _check_last_dim("dense", x, kernel)
        y = jnp.dot(x, kernel)
        return _add_bias(y, params["bias"]) if use_bias else y

    return Layer(init, apply)


def feed_forward(
    dimensions: Sequence[int] = (256, 128, 64),
    activation_fn: str = "relu",
    drop_last_activation: bool = False,
) -> Layer:
    """A stack of dense layers with an activation after each (the tutorial's ``FeedForward``).

    Args:
        dimensions: output size of each dense layer, in order.
        activation_fn: activation name, see :data:`ACTIVATIONS`.
        drop_last_activation: leave the last layer linear.

    Returns:
        A :class:`Layer` with params ``{'Dense_0': ..., 'Dense_1': ..., ...}``.

    Raises:
        ValueError: if ``dimensions`` is empty or ``activation_fn`` is not a known name.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> ff = feed_forward((4, 2, 1), drop_last_activation=True)
        >>> p = ff.init(jax.random.key(0), jnp.zeros((1, 8)))
        >>> sorted(p)
        ['Dense_0', 'Dense_1', 'Dense_2']
    """
    dimensions = tuple(dimensions)
    if not dimensions:
        raise ValueError("feed_forward: dimensions must not be empty")
    layers = [dense(d) for d in dimensions]
    act = activation(activation_fn)
    names = [f"Dense_{i}" for i in range(len(layers))]
    last = len(layers) - 1

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        params = {}
        shape = _shape(x)
        for name, layer in zip(names, layers):
            params[name] = layer.init(child(key, name), jax.ShapeDtypeStruct(shape, jnp.float32))
            shape = shape[:-1] + (params[name]["kernel"].shape[1],)
        return params

    def apply(params: Params, x: ArrayLike) -> Array:
        for i, (name, layer) in enumerate(zip(names, layers)):
            # Name the layer: argument x for the first, the previous layer's output after.
            what = "argument x: input" if i == 0 else f"the output of {names[i - 1]}"
            _check_last_dim(f"feed_forward {name}", x, params[name]["kernel"], what=what, kernel_name=f"params[{name!r}]['kernel']")
            x = layer.apply(params[name], x)
            if i != last or not drop_last_activation:
                x = act(x)
        return x

    return Layer(init, apply)


def dropout(rate: float, *, deterministic: bool = False) -> Layer:
    """Dropout with an explicit key; numerically Flax's ``nn.Dropout``.

    ``rate`` is the probability of dropping an element. Kept elements are scaled
    by ``1 / (1 - rate)``. The mask is drawn from ``param_key(key, 1)``, the same key
    Flax's Dropout draws under ``rngs={'dropout': key}``.

    Args:
        rate: drop probability in [0, 1].
        deterministic: default for ``apply``; ``True`` returns the input unchanged.

    Returns:
        A :class:`Layer` with empty params; ``apply(params, x, *, key=None,
        deterministic=None)`` needs ``key`` unless deterministic.

    Raises:
        ValueError: if ``rate`` is not in [0, 1].

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> drop = dropout(0.5)
        >>> y = drop.apply({}, jnp.ones(4), key=jax.random.key(0))
        >>> set(y.tolist()) <= {0.0, 2.0}
        True
    """
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"dropout: rate is a probability in [0, 1], got {rate!r}")
    default_deterministic = deterministic

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        del key, x  # dropout has no parameters
        return {}

    def apply(
        params: Params,
        x: ArrayLike,
        *,
        key: PRNGKeyArray | Scope | None = None,
        deterministic: bool | None = None,
    ) -> Array:
        del params
        x = jnp.asarray(x)
        det = default_deterministic if deterministic is None else deterministic
        if rate == 0.0 or det:
            return x
        if rate == 1.0:
            return jnp.zeros_like(x)
        if key is None:
            raise ValueError(
                "dropout: a key is needed when not deterministic: "
                "apply(params, x, key=jax.random.key(0)) or deterministic=True"
            )
        keep_prob = 1.0 - rate
        mask = jax.random.bernoulli(param_key(key, 1), p=keep_prob, shape=x.shape)
        return jax.lax.select(mask, x / keep_prob, jnp.zeros_like(x))

    return Layer(init, apply, stochastic=True)


def _shape_fn(layer: Layer, params: Params) -> Callable[[Array], Array]:
    """``layer.apply`` with its params, deterministic: used only to infer shapes."""
    if layer.stochastic:
        return lambda v: layer.apply(params, v, deterministic=True)
    return lambda v: layer.apply(params, v)


def sequential(layers: Sequence[Layer | Callable[[Array], Array]]) -> Layer:
    """Chain layers and plain functions (Flax's ``nn.Sequential``).

    Layers with parameters are named ``layers_{i}`` by their index in ``layers``,
    as Flax names them; plain functions such as ``jax.nn.relu`` take no params.
    ``apply(params, x, *, key=None)`` passes each random layer (dropout) the scope
    ``layers_{i}`` of ``key``, so masks match Flax's under ``rngs={'dropout': key}``.

    Args:
        layers: the layers and functions, applied in order.

    Returns:
        A :class:`Layer` with params ``{'layers_{i}': ...}`` for each layer that has any.

    Raises:
        ValueError: if ``layers`` is empty.
        TypeError: if an entry is neither a :class:`Layer` nor callable.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> net = sequential([dense(4), jax.nn.relu, dense(2)])
        >>> p = net.init(jax.random.key(0), jnp.zeros((1, 8)))
        >>> sorted(p), net.apply(p, jnp.ones((1, 8))).shape
        (['layers_0', 'layers_2'], (1, 2))
    """
    layers = list(layers)
    if not layers:
        raise ValueError("sequential: needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer) and not callable(layer):
            raise TypeError(f"sequential: layers[{i}] is {layer!r}, not a Layer or a function")
    names = [f"layers_{i}" for i in range(len(layers))]

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        params = {}
        example = jax.ShapeDtypeStruct(_shape(x), jnp.float32)
        for name, layer in zip(names, layers):
            if isinstance(layer, Layer):
                p = layer.init(child(key, name), example)
                if p:
                    params[name] = p
                fn = _shape_fn(layer, p)
            else:
                fn = layer
            example = jax.eval_shape(fn, example)
        return params

    def apply(params: Params, x: ArrayLike, *, key: PRNGKeyArray | Scope | None = None) -> Array:
        for i, (name, layer) in enumerate(zip(names, layers)):
            if not isinstance(layer, Layer):
                x = layer(x)
                continue
            try:
                if layer.stochastic:
                    x = layer.apply(params.get(name, {}), x, key=None if key is None else child(key, name))
                else:
                    x = layer.apply(params.get(name, {}), x)
            except ValueError as e:  # name the failing layer (shape errors: once per trace)
                fed = "argument x" if i == 0 else f"the output of {names[i - 1]}"
                raise ValueError(f"sequential {name} (fed {fed}): {e}") from e
        return x

    return Layer(init, apply)


class Bound(NamedTuple):
    """An apply function with its params attached, callable like a stateful model.

    For inference and debugging (the tutorial's ``model.bind(params)``); train with
    ``apply`` and explicit params instead.
    """

    apply: Callable[..., Any]
    params: Params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Apply with the attached params: ``self.apply(self.params, *args, **kwargs)``.

        Args:
            *args: the apply function's arguments after its params.
            **kwargs: the apply function's keyword arguments.

        Returns:
            What the apply function returns.
        """
        return self.apply(self.params, *args, **kwargs)


def bind(apply: Callable[..., Any], params: Params) -> Bound:
    """Attach ``params`` to ``apply``: ``bind(layer.apply, p)(x) == layer.apply(p, x)``.

    Args:
        apply: a layer's apply function, params first.
        params: the params to attach.

    Returns:
        A :class:`Bound` that calls ``apply(params, ...)``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = dense(2)
        >>> model = bind(layer.apply, layer.init(jax.random.key(0), jnp.zeros(8)))
        >>> model(jnp.ones(8)).shape
        (2,)
    """
    return Bound(apply, params)


def unbind(bound: Bound) -> tuple[Callable[..., Any], Params]:
    """Split a :class:`Bound` back into ``(apply, params)``.

    Args:
        bound: what :func:`bind` returned.

    Returns:
        ``(apply, params)``, as given to :func:`bind`.
    """
    return bound.apply, bound.params
